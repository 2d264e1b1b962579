"""The data plane's event source: one epoll set, nested in the asyncio loop, and a pipe pool.

Rules for this file:
- Connections and listeners are plain objects with ``on_event(fd, events)``; the reactor
  maps raw fds to them and calls them for every epoll event (level-triggered). There is no
  transport, future or handle per connection: on this machine uvloop's transports and
  ``create_connection`` cost more CPU per connection than all of HAProxy.
- The epoll fd itself is one reader of the asyncio loop (uvloop or not), so the rest of
  the program keeps its anyio structure and timers, and one wake-up serves a whole batch.
- An fd forgotten during a batch gets no more events from that batch, even when the
  kernel hands the same number to a new connection before the batch ends.
- Pipes for ``splice`` are pooled and held only while bytes are in flight: an
  unprivileged process gets 64 pipes of 1 MiB (then ``F_SETPIPE_SZ`` fails), and 64 KiB
  pipes cost twice the CPU per GiB.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
from typing import Protocol

from loguru import logger

# Bytes one pipe holds; one splice moves at most this much.
PIPE_SIZE = 1 << 20
# Free pipes kept for reuse (two fds each); in-flight pipes beyond this are closed on release.
MAX_FREE_PIPES = 64
# Pipes in flight at once; past this, flows copy through user space instead of splicing.
MAX_PIPES_IN_FLIGHT = 1024
# Events taken from the kernel per wake-up; epoll.poll allocates an array this long on
# every call, so it stays modest (the loop calls again while events remain).
MAX_EVENTS = 256


class Handler(Protocol):
    def on_event(self, fd: int, events: int) -> None: ...

    def on_internal_error(self, exc: Exception) -> None: ...


Pipe = tuple[int, int, int]  # read end, write end, capacity in bytes


class PipePool:
    """Pipes for ``splice``, lent while bytes are in flight and taken back empty."""

    __slots__ = ("_free", "in_flight")

    def __init__(self) -> None:
        self._free: list[Pipe] = []
        self.in_flight = 0

    def acquire(self) -> Pipe | None:
        """A pipe, or None when none can be had (fd limit, budget): the caller copies."""
        if self._free:
            self.in_flight += 1
            return self._free.pop()
        if self.in_flight >= MAX_PIPES_IN_FLIGHT:
            return None
        try:
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            capacity = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the per-user pipe budget: keep the kernel's size
            capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        self.in_flight += 1
        return (read_end, write_end, capacity)

    def release(self, pipe: Pipe) -> None:
        """Take back an empty pipe."""
        self.in_flight -= 1
        if len(self._free) < MAX_FREE_PIPES and pipe[2] >= PIPE_SIZE:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe that may still hold bytes (its connection is gone)."""
        self.in_flight -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        for pipe in self._free:
            os.close(pipe[0])
            os.close(pipe[1])
        self._free.clear()


class Reactor:
    """One epoll set for every data-plane fd, polled when the asyncio loop sees it ready."""

    __slots__ = ("_epoll", "_handlers", "_loop", "_stale", "pipes")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._stale: set[int] = set()
        self.pipes = PipePool()
        loop.add_reader(self._epoll.fileno(), self._dispatch)

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

    def _dispatch(self) -> None:
        handlers = self._handlers
        stale = self._stale
        stale.clear()
        for fd, events in self._epoll.poll(0, MAX_EVENTS):
            if fd in stale:
                continue
            handler = handlers.get(fd)
            if handler is None:
                continue
            try:
                handler.on_event(fd, events)
            except Exception as exc:
                logger.opt(exception=exc).error("internal error handling fd {}", fd)
                handler.on_internal_error(exc)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self.pipes.close()
