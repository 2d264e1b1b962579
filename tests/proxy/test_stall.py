"""One process's liveness check: a reactor that stops answering (stuck in a handler or a
blocking call, its thread still alive) fails ``/healthz`` until it answers again. With
workers the control plane kills the stuck worker instead (tests/proxy/test_workers.py)."""

from __future__ import annotations

import threading

import anyio
import pytest
from loguru import logger

from tests.proxy.helpers import running_proxy

pytestmark = pytest.mark.anyio


async def test_a_stuck_reactor_fails_healthz_until_it_answers_again() -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip()), format="{message}", level="INFO")
    release = threading.Event()
    try:
        async with running_proxy(stall_timeout=0.5) as proxy:
            planes = proxy.ctx.planes
            await anyio.sleep(1.5)  # a reactor that answers stays alive through checks
            assert planes.alive and not any("stuck" in line for line in lines)
            proxy.ctx.reactor.call(lambda: release.wait(10))  # the thread lives, stuck
            with anyio.fail_after(5):
                while planes.alive:
                    await anyio.sleep(0.05)
            assert proxy.ctx.reactor.alive  # the thread is alive: only the check tells
            assert "the data plane's reactor answered nothing in 0.5s: stuck" in lines
            release.set()
            with anyio.fail_after(5):
                while not planes.alive:
                    await anyio.sleep(0.05)
            assert "the data plane's reactor answers again" in lines
    finally:
        release.set()
        logger.remove(sink)


async def test_stall_timeout_zero_switches_the_check_off() -> None:
    release = threading.Event()
    try:
        async with running_proxy(stall_timeout=0) as proxy:
            proxy.ctx.reactor.call(lambda: release.wait(10))
            await anyio.sleep(2.5)
            assert proxy.ctx.planes.alive
            release.set()
    finally:
        release.set()


async def test_a_deadline_noticed_late_by_a_held_up_control_plane_kills_no_worker() -> None:
    """The workers' check runs on the control plane's loop. Held up past stall_timeout
    (a long synchronous step, a paused container) right after asking, it noticed the
    deadline on resume before the answer waiting for it: it killed a healthy worker."""
    import time
    from types import SimpleNamespace
    from typing import Any

    from discoproxy.proxy.workers import WorkerSet

    kills: list[int] = []
    owner: Any = SimpleNamespace(
        _stopping=False, ctx=SimpleNamespace(config=SimpleNamespace(stall_timeout=0.3))
    )

    class Answering:
        """Answers in time, through a task of its own (as Channel.run reads answers)."""

        closed = False

        def __init__(self) -> None:
            self.tg: Any = None

        async def request(self, kind: str) -> bool:
            answered = anyio.Event()

            async def answer() -> None:
                await anyio.sleep(0.2)
                answered.set()

            self.tg.start_soon(answer)
            await answered.wait()
            return True

    async def hold_up_once() -> None:
        await anyio.sleep(1.1)  # just after the first check asked, before its answer
        time.sleep(0.8)  # noqa: ASYNC251 (the point: the loop is held past the deadline)
        await anyio.sleep(1.5)
        owner._stopping = True

    worker = SimpleNamespace(ready=True, index=1)
    process = SimpleNamespace(pid=4242, kill=lambda: kills.append(4242))
    channel = Answering()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            channel.tg = tg
            tg.start_soon(hold_up_once)
            await WorkerSet._watch(owner, worker, channel, process)  # type: ignore[arg-type]
    assert kills == []
