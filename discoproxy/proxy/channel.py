"""The control plane's line to each worker process (``workers = N``): messages and
listening sockets over one ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair, on the asyncio loop
of either side.

Rules for this file:
- A message is a pickled ``(kind, id, payload)``; what crosses is immutable values the
  other side keeps (a routing table, a config, a ban list, a snapshot) or module-level
  functions with their arguments: never a live object of either side. Both ends are the
  same program, started by the control plane itself, so unpickling is as trusted as
  importing (the socket pair is private to the two processes).
- A message longer than ``CHUNK`` goes as several packets (the first byte says whether
  more follow): a table of 10,000 routes is several MB, a packet is bounded by the
  socket's buffer. File descriptors (listening sockets) ride on a message's first packet.
- ``request`` awaits the answer to one message (``id`` > 0); ``send`` does not. A handler
  that raises answers with the error's text, raised on the asking side as
  :class:`ChannelError`; the channel itself carries on. End of file (the other process
  died or closed) fails every request in flight and ends :meth:`Channel.run`.
- Sends are ordered: one lock, one message at a time, in the order asked. One-way
  messages are also handled in that order, one after another (a listener's sockets
  before the table that routes to it); requests are handled concurrently.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import io
import itertools
import os
import pickle
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from loguru import logger

from discoproxy.model import ServerDefinition
from discoproxy.owners import LOOP, owned_by

if TYPE_CHECKING:
    from discoproxy.routing import RoutingTable

CHUNK = 60_000  # bytes of message per packet (the default unix buffer holds ~200 KB)
MAX_FDS = 64  # per message: one listener's sockets, with room to spare
_MORE = b"\x01"
_LAST = b"\x00"

Handler = Callable[[str, Any, list[int]], Awaitable[Any]]


def one_way(kind: str, payload: Any = None) -> bytes:
    """A one-way message, encoded."""
    return pickle.dumps((kind, 0, payload), pickle.HIGHEST_PROTOCOL)


class ChannelError(Exception):
    """The other side could not do what was asked (its error's text), or is gone."""


async def wait_readable(sock: socket.socket) -> None:
    """Until ``sock`` (non-blocking) can be read, on the running loop."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()  # kept: the socket may be closed while this waits
    readable = loop.create_future()
    loop.add_reader(fd, readable.set_result, None)
    try:
        await readable
    finally:
        loop.remove_reader(fd)


async def wait_writable(sock: socket.socket) -> None:
    """Until ``sock`` (non-blocking) can be written, on the running loop."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()  # kept: the socket may be closed while this waits
    writable = loop.create_future()
    loop.add_writer(fd, writable.set_result, None)
    try:
        await writable
    finally:
        loop.remove_writer(fd)


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors a ``recvmsg`` got by SCM_RIGHTS (the caller owns them), made
    non-inheritable at once: recvmsg does not, and a worker spawned meanwhile would get
    them (uvloop's spawn passes every inheritable fd on), keeping a handed client's
    socket open for its whole life."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(the control plane's end, the worker's end): the worker's is inheritable."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


@owned_by(LOOP)
class Channel:
    """One end of the line; every method runs on the loop that :meth:`run` runs on."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._lock = asyncio.Lock()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._ordered: asyncio.Queue[tuple[str, Any, list[int]]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, kind: str, payload: Any = None, fds: Sequence[int] = ()) -> None:
        await self._write(one_way(kind, payload), fds)

    async def send_encoded(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """A one-way message :func:`one_way` encoded: one table pickled once for every
        worker, not once per worker."""
        await self._write(message, fds)

    async def request(
        self, kind: str, payload: Any = None, fds: Sequence[int] = (), *, close_fds: bool = False
    ) -> Any:
        """The answer to ``kind``. ``close_fds``: ``fds`` are closed once written (or once
        the write failed), not when the answer comes: from then on they are the other
        side's (a handed client's socket, whose close must not wait for the answer)."""
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            try:
                if self._closed:
                    raise ChannelError("the other process is gone")
                await self._write(
                    pickle.dumps((kind, ident, payload), pickle.HIGHEST_PROTOCOL), fds
                )
            except ChannelError:
                if future.done():  # failed by the close: the write's error is the one raised
                    future.exception()
                raise
            finally:
                if close_fds:
                    for fd in fds:
                        os.close(fd)
            return await future
        finally:
            self._waiting.pop(ident, None)

    async def _write(self, data: bytes, fds: Sequence[int]) -> None:
        if self._closed:
            raise ChannelError("the other process is gone")
        async with self._lock:
            first = True
            for start in range(0, max(len(data), 1), CHUNK):
                end = start + CHUNK
                packet = (_MORE if end < len(data) else _LAST) + data[start:end]
                ancillary = []
                if first and fds:
                    rights = array.array("i", fds).tobytes()
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                first = False
                await self._send_packet(packet, ancillary)

    async def _send_packet(self, packet: bytes, ancillary: list[tuple[int, int, bytes]]) -> None:
        while True:
            try:
                self.sock.sendmsg([packet], ancillary)
                return
            except BlockingIOError:
                await wait_writable(self.sock)
            except OSError as exc:  # EPIPE, ECONNRESET: the other side is gone
                self._close()
                raise ChannelError(f"the other process is gone: {exc}") from exc

    async def run(self) -> None:
        """Read and dispatch messages until the other side closes (then return)."""
        parts: list[bytes] = []
        fds: list[int] = []
        space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        try:
            while True:
                try:
                    packet, ancillary, _flags, _ = self.sock.recvmsg(CHUNK + 1, space)
                except BlockingIOError:
                    await wait_readable(self.sock)
                    continue
                except OSError:
                    return
                if not packet:
                    return  # end of file
                fds.extend(received_fds(ancillary))
                parts.append(packet[1:])
                if packet[:1] == _MORE:
                    continue
                message, parts, taken = b"".join(parts), [], fds
                fds = []
                self._dispatch(pickle.loads(message), taken)  # our own process's bytes
        finally:
            self._close()

    def _dispatch(self, message: tuple[str, int, Any], fds: list[int]) -> None:
        kind, ident, payload = message
        if kind == "reply":
            future = self._waiting.get(ident)
            if future is not None and not future.done():
                ok, value = payload
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(ChannelError(value))
            return
        if not ident:  # one-way messages are handled one after another, in order
            self._ordered.put_nowait((kind, payload, fds))
            if self._consumer is None:
                self._consumer = asyncio.get_running_loop().create_task(self._consume())
                self._tasks.add(self._consumer)
            return
        task = asyncio.get_running_loop().create_task(self._handle(kind, ident, payload, fds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consume(self) -> None:
        while True:
            kind, payload, fds = await self._ordered.get()
            await self._handle(kind, 0, payload, fds)

    async def _handle(self, kind: str, ident: int, payload: Any, fds: list[int]) -> None:
        try:
            value = await self._handler(kind, payload, fds)
            answer: tuple[bool, Any] = (True, value)
        except Exception as exc:  # the asking side hears what went wrong; we carry on
            if not ident:
                logger.opt(exception=exc).error("worker channel: {} failed", kind)
            answer = (False, f"{type(exc).__name__}: {exc}")
        if ident and not self._closed:
            reply = pickle.dumps(("reply", ident, answer), pickle.HIGHEST_PROTOCOL)
            with contextlib.suppress(ChannelError):
                await self._write(reply, ())

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelError("the other process is gone"))
        self.sock.close()

    def close(self) -> None:
        """Hang up (the other side's :meth:`run` ends); requests in flight fail."""
        for task in self._tasks:
            task.cancel()
        self._close()


# -- routing tables: each server crosses once -------------------------------------------
#
# Pickling a 10,000-route table costs ~0.3 s and unpickling it ~0.6 s, nearly all of it
# the servers' pydantic models, and a swap (a container started) changes one or two of
# them. So a table crosses as a skeleton whose servers are references (pickle's
# persistent ids): each server is sent once, numbered, and the worker keeps what the
# current table uses. Unchanged servers keep their identity on the worker, as they do
# in a table built in the control plane (identity caches in pools and the status cache).


@owned_by(LOOP)
class TableEncoder:
    """The control plane's side: numbers every server it has sent."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        # id(server) → (number, the server: held, so its id stays its own)
        self._sent: dict[int, tuple[int, ServerDefinition]] = {}

    def encode(self, table: RoutingTable) -> tuple[bytes, list[tuple[int, ServerDefinition]]]:
        """The table's skeleton and the servers no worker has been sent yet."""
        sent = self._sent
        new: list[tuple[int, ServerDefinition]] = []
        used: dict[int, tuple[int, ServerDefinition]] = {}
        numbers = self._numbers

        class _Pickler(pickle.Pickler):
            def persistent_id(self, obj: Any) -> int | None:
                if type(obj) is not ServerDefinition:
                    return None
                entry = sent.get(id(obj))
                if entry is None:
                    entry = (next(numbers), obj)
                    new.append(entry)
                used[id(obj)] = entry
                return entry[0]

        out = io.BytesIO()
        _Pickler(out, pickle.HIGHEST_PROTOCOL).dump(table)
        self._sent = used  # what the current table uses; the rest may go
        return out.getvalue(), new

    def everything(self) -> list[tuple[int, ServerDefinition]]:
        """Every server the current table uses (a worker that starts needs them all)."""
        return list(self._sent.values())


class TableDecoder:
    """A worker's side: the servers by number, kept while the current table uses them."""

    def __init__(self) -> None:
        self._servers: dict[int, ServerDefinition] = {}

    def decode(self, skeleton: bytes, new: list[tuple[int, ServerDefinition]]) -> RoutingTable:
        self._servers.update(new)
        servers = self._servers
        used: dict[int, ServerDefinition] = {}

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> ServerDefinition:
                server = used[pid] = servers[pid]
                return server

        table: RoutingTable = _Unpickler(io.BytesIO(skeleton)).load()
        self._servers = used
        return table
