"""The one API between the data plane (the reactor thread) and the control plane (the
asyncio loop).

Rules for this file (ARCHITECTURE.md draws the same picture):
- Loop → data plane: ``Reactor.call(fn)`` (ordered, fire and forget), ``Reactor.run(fn)``
  (awaits ``fn``'s result) and ``Reactor.call_into(conn, fn)`` (a failure ends ``conn``).
  Config reloads, ban lists, port-listener starts and every read of live numbers go
  this way; nothing on the loop touches a connection, a set of them or a counter.
- Data plane → loop: :meth:`LoopTasks.spawn` starts a coroutine (name resolution, a
  status fetch, a wake, a TLS-terminated relay) as a task the control plane owns and
  returns a :class:`TaskHandle` the reactor may cancel. What the coroutine needs from the
  connection is computed on the reactor and passed in; its answer comes back with
  ``Reactor.call_into``.
- Data plane → webhooks: :meth:`EventOutbox.put` queues an event (a player connected, a
  backend went down) with a deque append: no syscall, no task, bounded (dropped and
  counted when full); the loop drains it (``discoproxy.webhooks``). Events the config
  asks for no receiver of are not even queued (``wanted``, swapped by reference).
- Read across without a call, because they are immutable values swapped by reference by
  their one writer: the routing table (``Registry.table``, written on the loop), the
  config (``ProxyContext.config``, written on the reactor by ``apply_config``), a ban list
  (``Guard.bans``, written on the reactor by ``set_bans``), the status cache's answers.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Coroutine
from functools import partial
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from discoproxy.owners import LOOP, any_thread, on_reactor, owned_by


class TaskOwner(Protocol):
    """What spawned a coroutine (a connection): ended if the coroutine raises."""

    def on_internal_error(self, exc: Exception) -> None: ...


class _Reactor(Protocol):
    def call(self, fn: Any) -> None: ...

    def handler_failed(self, handler: Any, exc: Exception) -> None: ...


@owned_by(LOOP)
class TaskHandle:
    """A coroutine handed to the loop: ``cancel`` may be called from any thread."""

    __slots__ = ("_cancelled", "_loop", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cancelled = False
        self._task: asyncio.Task[None] | None = None  # loop only

    @any_thread
    def cancel(self) -> None:
        self._cancelled = True
        self._loop.call_soon_threadsafe(self._cancel_on_loop)

    def _cancel_on_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()


@owned_by(LOOP)
class LoopTasks:
    """The control plane's set of tasks for work the data plane asks for.

    Plain asyncio tasks, held in one set that :meth:`run` cancels and awaits when it
    ends: a task group and a cancel scope per coroutine cost more than the rest of a
    TLS-terminated connection's Python code together (bench: scenario tlsterm), and these
    tasks need neither — each ends its own connection, and shutdown ends them all.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] | None = None  # loop only; None: not running
        self._reactor: _Reactor | None = None
        self._scope: anyio.CancelScope | None = None

    async def run(
        self, reactor: _Reactor, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own every spawned coroutine until stopped (then cancel them all and wait)."""
        self._loop = asyncio.get_running_loop()
        self._reactor = reactor
        tasks: set[asyncio.Task[None]] = set()
        # shielded: the proxy's own cancellation must not end these before the drain,
        # which may still need them (a dial resolving a name); stop() ends them
        with anyio.CancelScope(shield=True) as scope:
            self._scope = scope
            self._tasks = tasks
            try:
                task_status.started()
                await anyio.sleep_forever()
            finally:
                self._tasks = None
                for task in tasks:
                    task.cancel()
                if tasks:
                    with anyio.CancelScope(shield=True):
                        await asyncio.wait(tasks)

    def stop(self) -> None:
        """Cancel every spawned coroutine and end :meth:`run` (loop thread)."""
        if self._scope is not None:
            self._scope.cancel()

    @on_reactor
    def spawn(self, owner: TaskOwner, coro: Coroutine[Any, Any, None]) -> TaskHandle:
        """Run ``coro`` on the loop (called from the reactor thread). An exception from
        it ends ``owner`` on the reactor thread, as a failed event would."""
        loop = self._loop
        assert loop is not None, "LoopTasks.run has not started"
        handle = TaskHandle(loop)
        loop.call_soon_threadsafe(self._start, handle, owner, coro)
        return handle

    def _start(self, handle: TaskHandle, owner: TaskOwner, coro: Coroutine[Any, Any, None]) -> None:
        tasks = self._tasks
        if handle._cancelled or tasks is None:  # cancelled before it started, or shutting down
            coro.close()
            return
        assert self._loop is not None
        task = self._loop.create_task(self._run(owner, coro))
        handle._task = task
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, owner: TaskOwner, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Exception as exc:  # a bug: it ends its connection, not the others
            reactor = self._reactor
            if reactor is None:
                logger.opt(exception=exc).error("internal error in a loop task")
            else:
                reactor.call(partial(reactor.handler_failed, owner, exc))


# Events waiting for the loop at most: a stalled loop costs dropped events, never memory.
OUTBOX_LIMIT = 10_000
# How often the liveness check (``stall_timeout``) asks each data plane: one process's
# reactor (server._watch_stall), each worker through its loop and reactor (WorkerSet._watch).
WATCHDOG_INTERVAL_S = 1.0
# A check's deadline noticed this much late means the checking loop itself was held up
# (a paused container or VM, a long synchronous step): the answer may be waiting unread,
# so the check is asked again instead of blaming the data plane.
WATCHDOG_LATE_S = 0.5


class EventOutbox:
    """Events for the webhooks, put from any thread (the reactor's player and backend
    events, the loop's route and wake events) and drained on the loop. A deque's append
    and popleft are atomic: the reactor pays one append per event, nothing else."""

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self._events: collections.deque[tuple[str, float, dict[str, Any]]] = collections.deque()
        self._limit = limit
        self.wanted: frozenset[str] = frozenset()  # set on the loop, read by reference
        self.dropped = 0  # events the full outbox turned away (reactor's count)

    @any_thread
    def put(self, event: str, data: dict[str, Any]) -> None:
        if event not in self.wanted:
            return
        if len(self._events) >= self._limit:
            self.dropped += 1
            return
        self._events.append((event, time.time(), data))

    def drain(self) -> list[tuple[str, float, dict[str, Any]]]:
        """Everything queued, oldest first (loop thread)."""
        events = self._events
        out = []
        while events:
            out.append(events.popleft())
        return out
