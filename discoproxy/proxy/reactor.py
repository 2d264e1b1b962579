"""The data plane's own thread: one epoll set, its timers, and the relay's pipe pool.

Rules for this file:
- Connections and listeners are plain objects with ``on_event(fd, events)``; the reactor
  maps raw fds to them and calls them for every epoll event (level-triggered). There is no
  transport, future or handle per connection: on this machine uvloop's transports and
  ``create_connection`` cost more CPU per connection than all of HAProxy.
- The reactor runs in its own thread, blocked in ``epoll_wait`` on the data plane's fds
  only. Nested in the asyncio loop instead, every event paid for uvloop's wake-up and
  callback as well: about 3 µs more per hop and a longer latency tail. The asyncio loop
  (providers, the CLI, shutdown) and the reactor meet through ``proxy/planes.py`` only:
  ``call``/``call_into``/``run`` run a function in the reactor thread (ordered, woken
  through a pipe), and connections hand coroutines to the loop with
  ``LoopTasks.spawn``. Connection state is touched by the reactor thread alone.
- Periodic work (deadline and idle sweeps, listener back-off) runs as reactor timers,
  so no sweep ever races a connection.
- An fd forgotten during a batch gets no more events from that batch, even when the
  kernel hands the same number to a new connection before the batch ends.
- It owns the relay's :class:`~discoproxy.proxy.relay.PipePool` (``pipes``), closed
  with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from loguru import logger

from discoproxy.owners import REACTOR, any_thread, owned_by
from discoproxy.proxy.relay import PipePool

# Events taken from the kernel per wake-up; epoll.poll allocates an array this long on
# every call, so it stays modest (the loop calls again while events remain).
MAX_EVENTS = 256


class Handler(Protocol):
    def on_event(self, fd: int, events: int) -> None: ...

    def on_internal_error(self, exc: Exception) -> None:
        """An unexpected exception met this handler: end it cleanly (never raises)."""


T = TypeVar("T")


@owned_by(REACTOR)
class Reactor:
    """One epoll set for every data-plane fd, served by a thread of its own."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._stale: set[int] = set()
        self.pipes = PipePool()
        self._calls: deque[Callable[[], object]] = deque()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._timers: list[tuple[float, int, Callable[[], object]]] = []
        self._timer_ids = itertools.count()
        self._running = False
        self._thread = threading.Thread(target=self._run, name="discoproxy-reactor", daemon=True)
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._waiting: set[concurrent.futures.Future[Any]] = set()  # run() calls not run yet

    # -- any thread ---------------------------------------------------------------------

    @any_thread
    def start(self) -> None:
        self._running = True
        self._thread.start()

    @property
    @any_thread
    def alive(self) -> bool:
        return self._thread.is_alive()

    @any_thread
    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the reactor thread, after every earlier call."""
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError):  # full: wake-ups are pending already
            os.write(self._wake_write, b"\0")

    @any_thread
    def call_into(self, handler: Handler, fn: Callable[[], object]) -> None:
        """:meth:`call` for a function that acts on ``handler`` (a connection): if it
        raises, ``handler`` is ended through :meth:`handler_failed`, as for an event."""
        self.call(lambda: self.guarded(handler, fn))

    @any_thread
    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the reactor thread and await its result (from the asyncio loop)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            self._waiting.discard(future)
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

        self._waiting.add(future)
        self.call(call)
        if not self._thread.is_alive():  # it will never run: don't wait forever
            self._fail_waiting()
        return await asyncio.wrap_future(future)

    @any_thread
    def _fail_waiting(self) -> None:
        for future in list(self._waiting):
            self._waiting.discard(future)
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the data plane's reactor is not running"))

    @any_thread
    async def stop(self) -> None:
        """Stop the thread once the calls queued so far have run; then close everything."""

        def finish() -> None:
            self._running = False

        if self._thread.is_alive():
            self.call(finish)
            with contextlib.suppress(Exception):  # a failure was reported when it happened
                await asyncio.shield(asyncio.wrap_future(self._stopped))
        if self._thread.ident is not None:
            self._thread.join()
        self._epoll.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        self.pipes.close()

    # -- reactor thread -----------------------------------------------------------------

    def register(self, fd: int, handler: Handler, events: int) -> None:
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def forget(self, fd: int) -> None:
        """Stop delivering events for ``fd``; the caller closes it (which leaves epoll)."""
        if self._handlers.pop(fd, None) is not None:
            self._stale.add(fd)

    def unregister(self, fd: int) -> None:
        """Leave epoll without closing ``fd`` (listeners that back off, shutdown)."""
        if self._handlers.pop(fd, None) is not None:
            self._stale.add(fd)
            self._epoll.unregister(fd)

    def call_later(self, delay: float, fn: Callable[[], object]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_ids), fn))

    def call_later_into(self, delay: float, handler: Handler, fn: Callable[[], object]) -> None:
        """:meth:`call_later` for a function that acts on ``handler`` (see :meth:`call_into`)."""
        self.call_later(delay, lambda: self.guarded(handler, fn))

    def guarded(self, handler: Handler, fn: Callable[[], object]) -> None:
        """Run ``fn`` (reactor thread); an exception ends ``handler``, not the caller's
        batch: sweeps, accept loops and cross-thread calls into connections use it."""
        try:
            fn()
        except Exception as exc:
            self.handler_failed(handler, exc)

    def every(self, interval: float, fn: Callable[[], object]) -> Callable[[], None]:
        """Run ``fn`` every ``interval`` seconds from now on, until the returned function
        is called."""
        stopped = False

        def tick() -> None:
            if not stopped:
                self.call_later(interval, tick)
                fn()

        def stop() -> None:
            nonlocal stopped
            stopped = True

        self.call_later(interval, tick)
        return stop

    def _run(self) -> None:
        poll = self._epoll.poll
        handlers = self._handlers
        stale = self._stale
        wake = self._wake_read
        timers = self._timers
        try:
            while self._running:
                timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else 1.0
                stale.clear()
                for fd, events in poll(timeout, MAX_EVENTS):
                    if fd in stale:
                        continue
                    handler = handlers.get(fd)
                    if handler is None:
                        if fd == wake:
                            self._run_calls()
                        continue
                    try:
                        handler.on_event(fd, events)
                    except Exception as exc:
                        self.handler_failed(handler, exc)
                if timers and timers[0][0] <= time.monotonic():
                    self._run_timers()
        except BaseException as exc:  # the data plane is gone: say so, and let run() fail
            logger.opt(exception=exc).critical("the data plane stopped: {!r}", exc)
            # a plain error for the loop: SystemExit & co. would tear the asyncio loop down
            failure = RuntimeError(f"the data plane's reactor thread failed: {exc!r}")
            failure.__cause__ = exc
            self._stopped.set_exception(failure)
        else:
            self._stopped.set_result(None)
        finally:
            self._fail_waiting()

    def handler_failed(self, handler: Handler, exc: Exception) -> None:
        """A bug met one handler (a connection, a listener): log it once with the
        traceback and let the handler end itself cleanly; everything else keeps going."""
        logger.opt(exception=exc).error("internal error in {!r}: {!r}", handler, exc)
        try:
            handler.on_internal_error(exc)
        except Exception as cleanup:  # on_internal_error must not raise: a second bug
            logger.opt(exception=cleanup).error("internal error ending {!r}", handler)

    @any_thread
    async def wait_stopped(self) -> None:
        """Return when the reactor thread ends; raise what ended it if it failed."""
        # shielded: a cancelled waiter must not cancel the future the thread completes
        await asyncio.shield(asyncio.wrap_future(self._stopped))

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        calls = self._calls
        while calls:
            fn = calls.popleft()
            try:
                fn()
            except Exception as exc:
                logger.opt(exception=exc).error("internal error in a reactor call")

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, fn = heapq.heappop(timers)
            try:
                fn()
            except Exception as exc:
                logger.opt(exception=exc).error("internal error in a reactor timer")
