"""The data plane's coroutines on the loop: owned by one task group, cancellable from
the reactor thread, and a failure ends the connection that asked, not the proxy."""

from __future__ import annotations

import threading

import anyio
import pytest

from discoproxy.proxy.planes import LoopTasks
from discoproxy.proxy.reactor import Reactor

pytestmark = pytest.mark.anyio


class _Owner:
    def __init__(self) -> None:
        self.failed: list[tuple[str, Exception]] = []

    def on_event(self, fd: int, events: int) -> None:
        raise AssertionError("no fd")

    def on_internal_error(self, exc: Exception) -> None:
        self.failed.append((threading.current_thread().name, exc))


async def test_a_failing_coroutine_ends_its_owner_on_the_reactor_thread() -> None:
    reactor = Reactor()
    reactor.start()
    tasks = LoopTasks()
    owner = _Owner()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(tasks.run, reactor)

            async def broken() -> None:
                raise RuntimeError("bug in a loop task")

            await reactor.run(lambda: tasks.spawn(owner, broken()))
            with anyio.fail_after(5):
                while not owner.failed:
                    await anyio.sleep(0.01)
            tasks.stop()
    finally:
        await reactor.stop()
    ((thread, exc),) = owner.failed
    assert thread == "discoproxy-reactor" and str(exc) == "bug in a loop task"


async def test_cancel_from_the_reactor_and_stop_end_every_task() -> None:
    reactor = Reactor()
    reactor.start()
    tasks = LoopTasks()
    started: list[str] = []
    ended: list[str] = []

    async def waits(name: str) -> None:
        started.append(name)
        try:
            await anyio.sleep_forever()
        finally:
            ended.append(name)

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(tasks.run, reactor)
            first = await reactor.run(lambda: tasks.spawn(_Owner(), waits("first")))
            await reactor.run(lambda: tasks.spawn(_Owner(), waits("second")))
            with anyio.fail_after(5):
                while len(started) < 2:
                    await anyio.sleep(0.01)
            await reactor.run(first.cancel)
            with anyio.fail_after(5):
                while ended != ["first"]:
                    await anyio.sleep(0.01)
            tasks.stop()  # shutdown: what is left is cancelled and run() returns
        assert sorted(ended) == ["first", "second"]
    finally:
        await reactor.stop()
