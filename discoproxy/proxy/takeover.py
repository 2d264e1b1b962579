"""Zero-downtime restart: a new discoproxy takes the running one's listening sockets over.

With ``takeover_socket = "/run/discoproxy/takeover.sock"`` a running ``serve`` listens
there (``AF_UNIX``, ``SOCK_SEQPACKET``, mode 0600, a peer of another uid refused).
``discoproxy serve --take-over`` (same config) connects and:

1. asks for the sockets, saying how many data planes it runs (``workers``): a group of
   ``SO_REUSEPORT`` sockets keeps its steering only with as many sockets as before, so a
   different count is refused and the new process stops (exit 3) while the old one carries
   on;
2. gets every listening socket, by SCM_RIGHTS, with what it was opened for: a ``bind``
   entry as configured (its sockets, group by group), a port route (``25/tcp``) and the
   admin listener's ``listen``. It opens what its config asks for from those first (the
   same kernel sockets: connections in their backlog wait for whichever process accepts
   next, none is refused), and new sockets for the rest;
3. once listening, with its workers ready and every provider's first routes in (it
   waits up to :data:`READY_TIMEOUT_S`, then gives up and the old one serves on; a stop
   signal meanwhile gives up too), says so: the old
   process stops accepting, stops listening on the takeover socket (which the new one
   then listens on, for the next restart), drains its connections within
   ``shutdown_timeout`` as on SIGTERM, and exits. Sockets the new config no longer asks
   for are closed then.

If the new process goes away before step 3 the old one never stopped accepting: nothing
changes; if the old one does not take the word and still listens, the new one stops
(exit 3) rather than run beside it. Messages are JSON (never pickled: the socket is a
file another program can reach), one per packet; each side checks the other's uid, and
the sockets are sent as duplicates taken where they are owned (a UDP listener's on the
reactor thread). Each message is checked field by field against its one shape
(:func:`_decode` and its readers): anything else is a :class:`TakeoverMessageError`,
which abandons that takeover (the old process serves on; the new one stops, exit 3),
never an exception out of the running proxy.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import reprlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from discoproxy.config import parse_bind
from discoproxy.owners import LOOP, owned_by
from discoproxy.proxy.addresses import format_addr
from discoproxy.proxy.channel import received_fds, wait_readable, wait_writable
from discoproxy.routing import PortKey, format_port

if TYPE_CHECKING:
    from discoproxy.proxy.server import ProxyContext

# Sockets per packet (the kernel takes up to 253 fds in one SCM_RIGHTS message).
FDS_PER_PACKET = 64
PACKET_BYTES = 256 * 1024
# The old process answers at once; a new one that says nothing for this long is dropped.
ANSWER_TIMEOUT_S = 10.0
# From the sockets to "ready": the new process's start (providers, workers, first table).
READY_TIMEOUT_S = 120.0
ACCEPT_BACKOFF_S = 1.0


class TakeoverError(Exception):
    """The running process could not be taken over (why, for the operator)."""


class TakeoverMessageError(TakeoverError, ValueError):
    """A takeover message is not what the protocol says: not JSON, not an object, or a
    field of another shape (raised by :func:`_decode` and its readers)."""


@dataclass(frozen=True)
class Handed:
    """One listening socket as the old process opened it: for what, and its place in
    its SO_REUSEPORT group."""

    kind: str  # "bind" | "port" | "admin"
    name: str  # the bind entry or admin listen as configured, or a port ("25/tcp")
    group: int  # which of the entry's addresses (a bind may resolve to several)
    index: int  # the socket's place in its group (the worker it goes to)

    def to_json(self) -> list[Any]:
        return [self.kind, self.name, self.group, self.index]

    @classmethod
    def from_json(cls, entry: object) -> Handed:
        """An entry as :meth:`to_json` wrote it; :class:`TakeoverMessageError` else."""
        if isinstance(entry, list) and len(entry) == 4:
            kind, name, group, index = entry
            if isinstance(kind, str) and isinstance(name, str) and _is_count(group, index):
                return cls(kind, name, group, index)
        raise TakeoverMessageError(
            f"takeover: socket entry {_show(entry)}, expected [kind, name, group, index]"
        )


def port_name(key: PortKey, host: str) -> str:
    """A port route's socket, named by the port and the address it listens on."""
    return f"{format_port(key)}@{format_addr((host, key[1]))}"


# Cap on what one takeover may hand over: entries and packets (a bound on what a peer
# can make this process hold).
MAX_SOCKETS = 65536


@owned_by(LOOP)
@dataclass
class Inherited:
    """Sockets taken over from the old process, until the start has used what it needs."""

    sockets: dict[tuple[str, str], list[list[socket.socket]]] = field(default_factory=dict)
    conn: socket.socket | None = None  # the line to the old process, until finish()

    def take(self, kind: str, name: str) -> list[list[socket.socket]] | None:
        """The groups handed over for ``kind``/``name`` (each in worker order), or None.
        A bind or admin entry matches by its host and port as parsed (not its spelling)."""
        found = self.sockets.pop((kind, name), None)
        if found is not None or kind == "port":
            return found
        wanted = parse_bind(name)
        for key in list(self.sockets):
            if key[0] == kind and parse_bind(key[1]) == wanted:
                return self.sockets.pop(key)
        return None

    def take_one(self, kind: str, name: str) -> socket.socket | None:
        """The one socket of a single-group, one-socket entry (one process, admin)."""
        groups = self.take(kind, name)
        if groups is None:
            return None
        first, *rest = [sock for group in groups for sock in group]
        for sock in rest:
            sock.close()
        return first

    def close_rest(self, quiet: bool = False) -> None:
        """What the new config does not listen on any more."""
        for (kind, name), groups in self.sockets.items():
            if not quiet:
                logger.info("takeover: {} {} is not in this config: closed", kind, name)
            for group in groups:
                for sock in group:
                    sock.close()
        self.sockets.clear()

    def abandon(self) -> None:
        """Give up before ``ready``: the old process never stopped and serves on."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self.close_rest(quiet=True)

    async def finish(self, path: Path) -> None:
        """Listening and ready: tell the old process, which stops accepting and drains.
        Raises :class:`TakeoverError` when it did not take the word and still listens on
        ``path`` (it serves on: this process must not run beside it)."""
        conn, self.conn = self.conn, None
        self.close_rest()
        if conn is None:
            return
        loop = asyncio.get_running_loop()
        with conn:
            try:
                await loop.sock_sendall(conn, _encode({"ready": os.getpid()}))
                async with asyncio.timeout(ANSWER_TIMEOUT_S):
                    answer, fds = await _receive(conn)
                for fd in fds:
                    os.close(fd)
            except (OSError, TimeoutError, ValueError) as exc:  # TakeoverMessageError too
                if _answers(path):
                    raise TakeoverError(
                        f"takeover: the old process did not stop ({exc!r}) and still serves"
                    ) from exc
                logger.warning("takeover: no answer from the old process ({!r}); it is gone", exc)
                return
        logger.info("takeover: pid {} stops accepting and drains", _pid(answer, "draining"))


def _answers(path: Path) -> bool:
    """Whether a process listens on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def _decode(data: bytes) -> dict[str, Any]:
    """One packet's message: a JSON object, else :class:`TakeoverMessageError` (not
    UTF-8, not JSON, an int past Python's digit limit, nesting past the parser's)."""
    try:
        message = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise TakeoverMessageError(
            f"takeover: a message of {len(data)} bytes is not JSON ({type(exc).__name__})"
        ) from None
    if not isinstance(message, dict):
        raise TakeoverMessageError(f"takeover: message {_show(message)} is not a JSON object")
    return message


def _is_count(*values: object) -> bool:
    """Groups or indexes as :meth:`Handed.to_json` writes them (JSON ints, not bools:
    ``Infinity`` or ``1.5`` is no place in a group)."""
    return all(type(value) is int and 0 <= value <= MAX_SOCKETS for value in values)


def _pid(message: dict[str, Any], key: str) -> int | None:
    value = message.get(key)
    return value if type(value) is int else None


def _show(value: object) -> str:
    """A peer's value for a message: bounded in length and depth whatever it is."""
    return reprlib.repr(value)


def _sockets_message(message: dict[str, Any]) -> tuple[list[Handed], bool]:
    """A ``{"sockets": [...], "more": bool}`` packet's entries and whether more follow."""
    entries, more = message.get("sockets", []), message.get("more", False)
    if not isinstance(entries, list) or not isinstance(more, bool):
        raise TakeoverMessageError(
            f"takeover: message {_show(message)}, expected"
            ' {"sockets": [[kind, name, group, index], ...], "more": true|false}'
        )
    return [Handed.from_json(entry) for entry in entries], more


async def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One packet: its message and the fds that came with it."""
    space = socket.CMSG_SPACE(FDS_PER_PACKET * array.array("i").itemsize)
    while True:
        try:
            data, ancillary, _, _ = conn.recvmsg(PACKET_BYTES, space)
            break
        except BlockingIOError:
            await wait_readable(conn)
    fds = received_fds(ancillary)
    if not data:
        for fd in fds:
            os.close(fd)
        raise ConnectionResetError("the other process closed the takeover socket")
    try:
        return _decode(data), fds
    except TakeoverMessageError:
        for fd in fds:
            os.close(fd)
        raise


async def take_over(path: Path, workers: int) -> Inherited:
    """The new process's side, steps 1 and 2: the old process's listening sockets."""
    loop = asyncio.get_running_loop()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.setblocking(False)
    inherited = Inherited(conn=conn)
    try:
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                await loop.sock_connect(conn, str(path))
                if _peer_uid(conn) != os.getuid():
                    raise TakeoverError(f"{path} is another user's: not taken over")
                await loop.sock_sendall(conn, _encode({"take": "sockets", "workers": workers}))
                count = 0
                while True:
                    message, fds = await _receive(conn)
                    socks = [socket.socket(fileno=fd) for fd in fds]  # closed if we fail
                    inherited.sockets.setdefault(("", ""), []).append(socks)
                    if "error" in message:
                        why = message["error"]
                        raise TakeoverError(why if isinstance(why, str) else _show(why))
                    entries, more = _sockets_message(message)
                    count += len(entries)
                    if len(entries) != len(socks) or count > MAX_SOCKETS:
                        raise ValueError("sockets and their descriptions differ")
                    for entry, sock in zip(entries, socks, strict=True):
                        kind, name, group, index = entry.kind, entry.name, entry.group, entry.index
                        groups = inherited.sockets.setdefault((kind, name), [])
                        if group == len(groups):
                            groups.append([])
                        if not 0 <= group < len(groups) or index != len(groups[group]):
                            raise ValueError(f"{kind} {name}: sockets out of order")
                        sock.setblocking(False)
                        groups[group].append(sock)
                    inherited.sockets.pop(("", ""))
                    if not more:
                        break
        except (OSError, TimeoutError, ValueError, TypeError) as exc:  # TakeoverMessageError
            raise TakeoverError(f"cannot take over from {path}: {exc!r}") from exc
    except BaseException:
        conn.close()
        inherited.close_rest(quiet=True)
        raise
    count = sum(len(g) for groups in inherited.sockets.values() for g in groups)
    logger.info("takeover: {} listening sockets from the process on {}", count, path)
    return inherited


async def _send_packet(
    conn: socket.socket, data: bytes, ancillary: list[tuple[int, int, bytes]]
) -> None:
    while True:
        try:
            conn.sendmsg([data], ancillary)
            return
        except BlockingIOError:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                await wait_writable(conn)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def handed_fds(ctx: ProxyContext) -> list[tuple[Handed, int]]:
    """Every listening socket this process has, with what it was opened for, as a
    duplicate fd (the caller closes it): a UDP listener's socket is the reactor's, which
    may close and reopen it, so port routes' are duplicated on the reactor thread."""
    handed: list[tuple[Handed, int]] = []
    try:
        if ctx.workers is not None:
            handed += [(h, os.dup(sock.fileno())) for h, sock in ctx.workers.handover()]
        else:
            handed += [(h, os.dup(sock.fileno())) for h, sock in ctx.binds.handover()]
            ports = list(ctx.ports.handover())

            def dup_ports() -> list[tuple[Handed, int]]:
                socks = [(h, listener.sock) for h, listener in ports]
                return [(h, os.dup(sock.fileno())) for h, sock in socks if sock.fileno() >= 0]

            handed += await ctx.reactor.run(dup_ports)
        for group, sock in enumerate(ctx.admin_sockets):
            handed.append(
                (Handed("admin", ctx.config.admin.listen, group, 0), os.dup(sock.fileno()))
            )
    except BaseException:
        for _, fd in handed:
            os.close(fd)
        raise
    return handed


@owned_by(LOOP)
class TakeoverServer:
    """The running process's side: hands its sockets to a new process, then stops."""

    def __init__(self, ctx: ProxyContext, path: Path, stop: Callable[[], None]) -> None:
        self.ctx = ctx
        self.path = path
        self.stop = stop
        self._sock: socket.socket | None = None

    def open(self) -> bool:
        """Listen on the path; False (logged) when it cannot be, or another process does."""
        path = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if path.is_socket():
                if _answers(path):
                    sock.close()
                    logger.error(
                        "takeover socket {} is another running discoproxy's: not listening "
                        "there (serve --take-over takes a running one over)",
                        path,
                    )
                    return False
                path.unlink()  # a dead process's
            sock.bind(str(path))
            os.chmod(path, 0o600)  # before listen: nobody can connect before this
            sock.listen(4)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            logger.error("cannot listen on takeover socket {}: {}", path, exc.strerror or exc)
            return False
        self._sock = sock
        logger.info("takeover socket on {} (serve --take-over restarts without downtime)", path)
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._sock is not None:
                try:
                    conn, _ = await loop.sock_accept(self._sock)
                except OSError as exc:  # out of fds, say: this process serves on
                    logger.warning("takeover socket: accept failed: {}", exc)
                    await asyncio.sleep(ACCEPT_BACKOFF_S)
                    continue
                with conn:
                    try:
                        conn.setblocking(False)
                        if _peer_uid(conn) != os.getuid():
                            logger.warning("takeover: a process of another user refused")
                            continue
                        if await self._hand_over(conn):
                            return
                    except (OSError, TimeoutError, ValueError, TypeError) as exc:
                        logger.warning("takeover abandoned, still serving: {!r}", exc)
                    except Exception:  # a bug of ours here must not end the proxy it serves
                        logger.exception("takeover abandoned on an internal error, still serving")
        finally:
            self.close()

    async def _hand_over(self, conn: socket.socket) -> bool:
        """One new process: True once it took over (this process is stopping then)."""
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            ask, fds = await _receive(conn)
        for fd in fds:
            os.close(fd)
        ours = ctx.workers.count if ctx.workers is not None else 1
        theirs = ask.get("workers")
        if ask.get("take") != "sockets" or type(theirs) is not int:
            raise TakeoverMessageError(
                f'takeover: request {_show(ask)}, expected {{"take": "sockets", "workers": N}}'
            )
        if theirs != ours:
            why = (
                f"the running discoproxy (pid {os.getpid()}) has {ours} data planes and this "
                f"one would have {theirs}: its SO_REUSEPORT groups keep their "
                f"steering only with as many sockets; set workers = {ours}, or restart "
                "without --take-over"
            )
            await loop.sock_sendall(conn, _encode({"error": why}))
            logger.warning("takeover refused: {}", why)
            return False
        handed = await handed_fds(ctx)
        try:
            for start in range(0, max(len(handed), 1), FDS_PER_PACKET):
                batch = handed[start : start + FDS_PER_PACKET]
                more = start + FDS_PER_PACKET < len(handed)
                data = _encode({"sockets": [h.to_json() for h, _ in batch], "more": more})
                rights = array.array("i", [fd for _, fd in batch]).tobytes()
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if batch else []
                await _send_packet(conn, data, ancillary)
        finally:
            for _, fd in handed:
                os.close(fd)
        logger.info("takeover: {} listening sockets handed over; waiting for it", len(handed))
        async with asyncio.timeout(READY_TIMEOUT_S):
            ready, fds = await _receive(conn)  # ConnectionResetError: it went away
        for fd in fds:
            os.close(fd)
        pid = _pid(ready, "ready")
        if pid is None:
            raise TakeoverMessageError(f'takeover: {_show(ready)}, expected {{"ready": pid}}')
        logger.info(
            "taken over by pid {}: no new connections here; open ones get up to {}s",
            pid,
            ctx.config.shutdown_timeout,
        )
        self.close()  # the new process listens on the path next
        await loop.sock_sendall(conn, _encode({"draining": os.getpid()}))
        self.stop()
        return True
