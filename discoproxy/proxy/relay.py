"""The relay: bytes from one socket to another, copied or spliced, with backpressure.

Rules for this file:
- This is the hot path that is measured against HAProxy, so it drives raw fds with
  ``os.read``/``os.write``/``os.splice`` directly (no transports, no streams), as the
  style guide allows for one relay module behind a small interface. It runs on the
  reactor thread only.
- The interface: a :class:`Flow` moves one direction (``pump`` when its source is
  readable, ``flush`` when its destination is writable, ``source_eof``, ``release``) and
  tells its owner (a :class:`FlowOwner`, the connection) what happened through four
  calls: ``flow_failed``, ``sync_events``, ``close`` and reading ``lingering``/``active``.
  It knows nothing of routing, protocols or the reactor.
- A flow copies small transfers (read + write) and, once a read fills
  ``SMALL_READ_BYTES``, moves bytes with ``splice`` through a pipe borrowed from the
  :class:`PipePool` only while bytes are in flight (no copy into Python). While a flow
  cannot write, its source is not read.
- Half-close is carried: EOF from one side becomes ``shutdown(SHUT_WR)`` on the other;
  the owner closes when both directions are done or either side fails.
- Pipes are pooled and held only while bytes are in flight: an unprivileged process gets
  64 pipes of 1 MiB (then ``F_SETPIPE_SZ`` fails), and 64 KiB pipes cost twice the CPU
  per GiB.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
from typing import Protocol

from discoproxy.owners import REACTOR, owned_by

# Bytes one pipe holds; one splice moves at most this much.
PIPE_SIZE = 1 << 20
# Free pipes kept for reuse (two fds each); in-flight pipes beyond this are closed on release.
MAX_FREE_PIPES = 64
# Pipes in flight at once; past this, flows copy through user space instead of splicing.
MAX_PIPES_IN_FLIGHT = 1024
# A read at least this big marks a bulk stream: read again before going back to epoll,
# up to MAX_BULK_READS times (a splice moves ~200 KiB here, so a turn is a few ms at
# most; 8 reads per turn cost 1-conn bulk ~10% of throughput against HAProxy).
BULK_READ_BYTES = 64 * 1024
MAX_BULK_READS = 32
# One read when a flow has no pipe (the pool is exhausted) and copies instead.
COPY_READ_BYTES = 256 * 1024
# A flow copies until one read fills this much; then it splices (see Flow). Below
# malloc's mmap threshold (128 KiB), so a read's buffer never costs an mmap.
SMALL_READ_BYTES = 16 * 1024

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice
_read = os.read
_write = os.write


class FlowOwner(Protocol):
    """What a flow needs of the connection it belongs to."""

    up: Flow
    down: Flow
    cfd: int
    active: bool  # set on every move, for the idle sweep
    lingering: str  # a close reason waiting for a reply to be written

    def flow_failed(self, fd: int, exc: OSError) -> None: ...

    def sync_events(self) -> None: ...

    def close(self, reason: str) -> None: ...


Pipe = tuple[int, int, int]  # read end, write end, capacity in bytes


@owned_by(REACTOR)
class PipePool:
    """Pipes for ``splice``, lent while bytes are in flight and taken back empty."""

    __slots__ = ("free", "in_flight")

    def __init__(self) -> None:
        self.free: list[Pipe] = []  # Flow.pump pops from it inline (see acquire)
        self.in_flight = 0

    def acquire(self) -> Pipe | None:
        """A pipe, or None when none can be had (fd limit, budget): the caller copies."""
        if self.free:
            self.in_flight += 1
            return self.free.pop()
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
        if len(self.free) < MAX_FREE_PIPES and pipe[2] >= PIPE_SIZE:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe that may still hold bytes (its connection is gone)."""
        self.in_flight -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        for pipe in self.free:
            os.close(pipe[0])
            os.close(pipe[1])
        self.free.clear()


@owned_by(REACTOR)
class Flow:
    """One direction of a forwarded connection: bytes from ``src`` to ``dst``.

    A flow starts by copying (``read`` into ``out``, then ``write``), as HAProxy's
    ``splice-auto`` does: most connections move a few small messages and an EOF, which
    cost less as reads and writes than as splices through a borrowed pipe. The first read
    that fills ``SMALL_READ_BYTES`` marks a stream (``bulk``): from then on bytes go
    through a pooled pipe (``splice``, no copy), or a copy when no pipe can be had. While
    ``blocked`` (the destination is full), the source is not read; ``eof`` is the
    source's EOF, ``shut`` that it was passed on.
    """

    __slots__ = (
        "blocked",
        "bulk",
        "conn",
        "count",
        "dst",
        "eof",
        "out",
        "pending",
        "pipe",
        "pipes",
        "shut",
        "src",
    )

    def __init__(self, conn: FlowOwner, pipes: PipePool) -> None:
        self.conn = conn
        self.pipes = pipes
        self.bulk = False
        self.src = -1
        self.dst = -1
        self.pipe: Pipe | None = None
        self.pending = 0  # bytes in the pipe
        self.out: bytes | None = None  # bytes copied, not yet written
        self.count = 0
        self.blocked = False
        self.eof = False
        self.shut = False

    def pump(self) -> None:
        """The source is readable: move what it has (and was not refused) to ``dst``.

        A bulk read (at least ``BULK_READ_BYTES``) is followed by another at once while
        the destination keeps up, up to ``MAX_BULK_READS``: a stream then costs one
        epoll round per several reads. Small reads return, as one read is the common case.
        """
        if not self.bulk:
            if self._copy(SMALL_READ_BYTES) == SMALL_READ_BYTES:
                self.bulk = True  # a stream: splice from the next read on
            return
        conn = self.conn
        reads = MAX_BULK_READS
        while reads:  # not ``for … in range()``: a range object per call shows up here
            reads -= 1
            pipe = self.pipe
            if pipe is None:
                pool = self.pipes
                if pool.free:  # PipePool.acquire inlined: a free pipe is the common case
                    pipe = pool.free.pop()
                    pool.in_flight += 1
                else:
                    pipe = pool.acquire()
                    if pipe is None:
                        self._copy(COPY_READ_BYTES)
                        return
                self.pipe = pipe
            try:
                n = _splice(self.src, pipe[1], pipe[2], None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                n = -1
            except OSError as exc:
                conn.flow_failed(self.src, exc)
                return
            if n <= 0:
                if not self.pending:
                    self.pipe = None
                    self.pipes.release(pipe)
                if n == 0:
                    self.source_eof()
                return
            self.count += n
            self.pending += n
            conn.active = True
            self.flush()
            if n < BULK_READ_BYTES or self.blocked or self.conn is None:  # None: closed
                return

    def _copy(self, size: int) -> int:
        """Read up to ``size`` bytes into ``out`` and write them; how many were read."""
        conn = self.conn
        try:
            data = _read(self.src, size)
        except BlockingIOError:
            return 0
        except OSError as exc:
            conn.flow_failed(self.src, exc)
            return 0
        if not data:
            self.source_eof()
            return 0
        n = len(data)
        self.count += n
        conn.active = True
        self.out = data
        self.flush()
        return n

    def flush(self) -> None:
        """Write what is held for ``dst``; block the flow if it does not all fit."""
        out = self.out
        if out is not None:
            try:
                n = _write(self.dst, out)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.conn.flow_failed(self.dst, exc)
                return
            if n < len(out):
                self.out = out[n:]
                self._block()
                return
            self.out = None
            if self.conn.lingering:
                self.conn.close(self.conn.lingering)
                return
        if self.pending:
            pipe = self.pipe
            assert pipe is not None
            try:
                n = _splice(pipe[0], self.dst, self.pending, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.conn.flow_failed(self.dst, exc)
                return
            self.pending -= n
            if self.pending:
                self._block()
                return
            self.pipe = None
            self.pipes.release(pipe)
        if self.blocked:
            self.blocked = False
            self.conn.sync_events()
        if self.eof and not self.shut:
            self._pass_eof()

    def _block(self) -> None:
        if not self.blocked:
            self.blocked = True
            self.conn.sync_events()

    def source_eof(self) -> None:
        self.eof = True
        conn = self.conn
        if not self.pending and self.out is None:
            other = conn.down if self is conn.up else conn.up
            if other.shut:  # the last direction: no need to stop watching the source
                self.shut = True
                conn.close("both sides closed")
                return
            conn.sync_events()
            self._pass_eof()
        else:
            conn.sync_events()

    def _pass_eof(self) -> None:
        self.shut = True
        conn = self.conn
        other = conn.down if self is conn.up else conn.up
        if other.shut:
            conn.close("both sides closed")
            return
        try:
            _shutdown_write(self.dst)
        except OSError:
            conn.close("client closed" if self.dst == conn.cfd else "backend closed")

    def release(self) -> None:
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            self.pipes.discard(pipe)


def _shutdown_write(fd: int) -> None:
    # libc directly: a socket object over a raw fd costs a getsockname() per call
    if _libc_shutdown(fd, socket.SHUT_WR) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_libc = ctypes.CDLL(None, use_errno=True)
_libc_shutdown = _libc.shutdown  # no argtypes: plain ints convert natively, 30 % faster
_libc_shutdown.restype = ctypes.c_int
