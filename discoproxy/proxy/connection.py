"""One client connection, from accept to close: the data plane's hot path.

Rules for this file:
- Connections are driven by raw fds and the :class:`~discoproxy.proxy.reactor.Reactor`
  (level-triggered epoll), not by asyncio transports or anyio streams: measured here,
  anyio byte streams cost about 4× HAProxy's CPU per connection and uvloop transports
  with ``create_connection`` about 1.7×. Everything around it (listeners, shutdown,
  sweeps) is structured with anyio in ``server.py``.
- The pipeline is one enum plus one transition table: accepted → [PROXY header] →
  sniffing → (answering | [waking →] dialing → forwarding) → closed. An impossible step
  raises. Minecraft status pings for routed servers are answered here (answering), from
  ``discoproxy.status``; a login for a stopped ``auto_start`` server waits in waking
  while ``discoproxy.wake`` starts it.
- The first read happens right after accept (listeners use ``TCP_DEFER_ACCEPT``, so the
  handshake is usually there); a client is registered with epoll only when it must be
  waited for. The backend is dialed with a non-blocking connect and the replayed prefix
  is written at once: on a fast network the connection is already up.
- Forwarding is two :class:`~discoproxy.proxy.relay.Flow` objects, one per direction
  (``proxy/relay.py``: copy or splice, backpressure, half-close); the connection is their
  :class:`~discoproxy.proxy.relay.FlowOwner` and closes when they say so.
- Parsers come from ``discoproxy.protocol`` (sans-IO); this module turns their results
  and errors into socket actions and exactly one log line per connection.
"""

from __future__ import annotations

import _socket
import contextlib
import enum
import errno
import http as http_status
import json
import math
import os
import socket
import time
from bisect import bisect_left as _bisect_left
from dataclasses import dataclass
from select import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from typing import TYPE_CHECKING, Any

from loguru import logger

from discoproxy.guard import (
    RATE_LIMITED,
    Ban,
    IpAddress,
    Refusal,
    client_ip,
    global_refusal,
    routed_refusal,
)
from discoproxy.model import DEFAULT_BACKEND_PORT, offline_uuid
from discoproxy.motd import legacy_fields, strip_codes
from discoproxy.owners import REACTOR, any_thread, on_loop, on_reactor, owned_by
from discoproxy.protocol import http, minecraft, tls
from discoproxy.protocol.errors import NEED_DATA, Hint, ProtocolError
from discoproxy.protocol.proxy_protocol import ProxyHeader, parse_proxy_header
from discoproxy.protocol.sniff import Sniffed, detect_protocol
from discoproxy.proxy.addresses import Proxied, format_addr, literal_family, proxy_v2_header
from discoproxy.proxy.balance import FALL
from discoproxy.proxy.names import Resolved, resolved_addresses
from discoproxy.proxy.relay import Flow
from discoproxy.proxy.tls_termination import Handoff, terminate
from discoproxy.rejections import Rejection
from discoproxy.status import LEGACY_PING_PROTOCOL, StatusState, display_name, rewritten_host

if TYPE_CHECKING:
    from collections.abc import Coroutine, Sequence

    from discoproxy.config import ProxyConfig
    from discoproxy.proxy.balance import Pool
    from discoproxy.proxy.planes import TaskHandle
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.proxy.stats import RouteStats
    from discoproxy.routing import Route

# Bytes a client may send before it is routed: the largest of the sniffers' own caps
# (TLS ClientHello 16 KiB) plus a PROXY header and a following packet. Beyond it, the
# client is not speaking any protocol we route.
MAX_PREFIX_BYTES = 20 * 1024
# A 1.6 ping ("FE 01 FA" + MC|PingHost) still incomplete after this long is answered as
# a 1.4 one: some clients (mcstatus) send only "FE 01 FA", and 1.6 writes its ping in
# several small writes, so the rest is normally there within a round trip.
LEGACY_PING_GRACE_S = 0.3
# One read while the prefix is gathered.
PREFIX_READ_BYTES = 32 * 1024
# plain ints: OR-ing socket's IntFlag members runs enum code on every dial
_STREAM_NONBLOCK = int(socket.SOCK_STREAM) | int(socket.SOCK_NONBLOCK)
_IPPROTO_TCP = int(socket.IPPROTO_TCP)
_TCP_NODELAY = int(socket.TCP_NODELAY)
_READABLE = EPOLLIN | EPOLLHUP | EPOLLERR
_FAILED = EPOLLHUP | EPOLLERR
_read = os.read
_write = os.write


class ConnState(enum.IntEnum):
    # IntEnum: members hash in C, which matters for the per-step transition check
    ACCEPTED = 1
    PROXY_HEADER = 2
    SNIFFING = 3
    ANSWERING = 4
    DIALING = 5
    FORWARDING = 6
    CLOSED = 7
    WAKING = 8  # a login held while its stopped server starts (auto_start)
    TERMINATING = 9  # TLS terminated: the asyncio side runs it (tls_termination.py)


# Members as module constants: on Python 3.11 ``ConnState.X`` goes through EnumType's
# ``__getattr__`` hook (about 4x a plain load), and the pipeline checks state dozens of
# times per connection.
ACCEPTED = ConnState.ACCEPTED
PROXY_HEADER = ConnState.PROXY_HEADER
SNIFFING = ConnState.SNIFFING
ANSWERING = ConnState.ANSWERING
DIALING = ConnState.DIALING
FORWARDING = ConnState.FORWARDING
CLOSED = ConnState.CLOSED
WAKING = ConnState.WAKING
TERMINATING = ConnState.TERMINATING
_MINECRAFT = Sniffed.MINECRAFT
_MINECRAFT_LEGACY = Sniffed.MINECRAFT_LEGACY
_MINECRAFT_LEGACY_LOGIN = Sniffed.MINECRAFT_LEGACY_LOGIN
_TLS = Sniffed.TLS
_HTTP = Sniffed.HTTP

_TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    # accepted → dialing: a port route forwards at once, without reading a name
    ACCEPTED: frozenset({PROXY_HEADER, SNIFFING, DIALING, CLOSED}),
    # proxy header → dialing: a port route behind a trusted balancer, the header read
    PROXY_HEADER: frozenset({SNIFFING, DIALING, CLOSED}),
    SNIFFING: frozenset({ANSWERING, DIALING, WAKING, TERMINATING, CLOSED}),
    TERMINATING: frozenset({CLOSED}),
    ANSWERING: frozenset({CLOSED}),
    # waking → dialing: the server answers in time; → answering: it gets the "starting" text
    WAKING: frozenset({DIALING, ANSWERING, CLOSED}),
    # dialing → answering: every address failed, the client gets told so
    # dialing → waking: a woken server does not accept yet, the login is held for it
    DIALING: frozenset({ANSWERING, FORWARDING, WAKING, CLOSED}),
    FORWARDING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


_PRE_ROUTING = frozenset({PROXY_HEADER, SNIFFING, ANSWERING})

_HTTP_PHRASES = {status.value: status.phrase for status in http_status.HTTPStatus}


class IllegalTransition(RuntimeError):
    """Raised when the pipeline is asked to make a step its transition table forbids."""


def _dial_target(ip: str, port: int, name: str | None) -> str:
    where = format_addr((ip, port))
    return f"{name} ({where})" if name else where


def _socket_error(fd: int) -> str:
    """The pending error on a socket fd, as text (after EPOLLERR/EPOLLHUP)."""
    sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    finally:
        sock.detach()
    return os.strerror(code) if code else "connection closed"


@owned_by(REACTOR)
class ClientConnection:
    """One client and its backend: runs the pipeline, owns both fds, logs the close."""

    __slots__ = (
        "_announced",
        "_dial_at",
        "_dial_errors",
        "_dial_name",
        "_dial_task",
        "_entry",
        "_guarded",
        "_handshake",
        "_handshake_length",
        "_held",
        "_ip",
        "_ip_key",
        "_kind",
        "_legacy",
        "_legacy_login",
        "_legacy_wait",
        "_name",
        "_next_address",
        "_next_state",
        "_order",
        "_player",
        "_players_in",
        "_pool",
        "_proxy_header",
        "_resolved_addresses",
        "_status_pending",
        "active",
        "backend_addr",
        "bfd",
        "bmask",
        "buffer",
        "cfd",
        "client_addr",
        "cmask",
        "ctx",
        "dial_deadline",
        "down",
        "fallback",
        "id",
        "idle_ticks",
        "lingering",
        "listener",
        "player",
        "port_key",
        "prefix_bytes",
        "reason",
        "route",
        "route_stats",
        "started",
        "state",
        "up",
    )

    def __init__(self, ctx: ProxyContext, fd: int, client_addr: tuple[str, int] | None) -> None:
        # every slot is set here: slot loads are specialised by CPython, class-level
        # defaults behind an instance miss are not
        self.ctx = ctx
        self.cfd = fd
        self.client_addr = client_addr
        self.started = time.monotonic()
        self.id = 0
        self.state = ACCEPTED
        self.bfd = -1
        self.cmask = -1  # events registered for cfd; -1: not in epoll
        self.bmask = -1
        self.backend_addr: tuple[str, int] | None = None
        self.route: Route | None = None
        self.route_stats: RouteStats | None = None  # its route's counters, once routed
        self.reason = ""
        self.lingering = ""  # close reason waiting for a reply to be written
        self.prefix_bytes = 0
        self.active = True
        self.idle_ticks = 0
        self.buffer: bytearray | bytes = b""
        self.up: Flow = None  # type: ignore[assignment]  # set when admitted
        self.down: Flow = None  # type: ignore[assignment]
        self.dial_deadline = math.inf
        self.fallback: str | None = None  # the listener's catch-all server (qualified id)
        self.listener = ""  # its listener's label (metrics, API)
        self.port_key: tuple[str, int] | None = None  # a port route's listener's (proto, port)
        self._dial_at = 0.0  # when the first backend address was dialed
        self._dial_task: TaskHandle | None = None
        self._dial_errors: list[str] | None = None
        self._next_address = 0
        self._order: Sequence[tuple[str, int]] | None = None  # the pool's answer, once asked
        self._entry: tuple[str, int] | None = None  # the pool entry dialed (counted open)
        self._pool: Pool | None = None
        self._kind: Sniffed | None = None
        self._name: str | None = None
        self._next_state = 0
        self._handshake_length = 0
        self._handshake: minecraft.Handshake | None = None
        self._legacy: minecraft.LegacyPing | None = None
        self._legacy_login: minecraft.LegacyLogin | None = None  # a 1.2-1.6 login
        self._legacy_wait = 0  # 1: a 1.6 ping is incomplete, 2: waited enough for it
        self._status_pending = False
        self._held = False  # held once for a woken server (auto_start_wait)
        self._ip: IpAddress | None = None  # the real client address, once known
        self._ip_key: str | None = None  # counted in max_connections_per_ip
        self._guarded = False  # bans, rate budget and server filter checked
        self._player = False
        # the stats its login is counted in, and that route's id (workers: shared counts)
        self._players_in: tuple[RouteStats, str] | None = None
        self._announced = False  # player_connected went out (player_disconnected will)
        self.player: str | None = None  # a Minecraft login's username, from Login Start
        self._proxy_header: ProxyHeader | None = None
        self._resolved_addresses: list[Resolved] | None = None
        self._dial_name: str | None = None

    @any_thread
    def __repr__(self) -> str:
        route = self.route.qualified_id if self.route else "-"
        state = self.state.name.lower()
        return f"<conn #{self.id} {format_addr(self.client_addr)} {route} {state}>"

    @property
    def bytes_up(self) -> int:
        return self.prefix_bytes + self.up.count

    @property
    def bytes_down(self) -> int:
        return self.down.count

    # -- pipeline ---------------------------------------------------------------------

    def _move(self, new: ConnState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self!r}: cannot go from {self.state.name} to {new.name}")
        self.state = new

    def _admit(self) -> bool:
        ctx = self.ctx
        if len(ctx.connections) >= ctx.max_connections:
            self.state = CLOSED
            self.reason = Rejection.MAX_CONNECTIONS
            os.close(self.cfd)
            ctx.log_rejection(self.client_addr, self.reason, self.reason, self.listener)
            return False
        ctx.connections.add(self)
        self.id = next(ctx.ids)  # ProxyContext.new_id(), without the call
        pipes = ctx.reactor.pipes
        self.up = Flow(self, pipes)
        self.down = Flow(self, pipes)
        os.set_blocking(self.cfd, False)  # fcntl.fcntl with an int builds and drops a TypeError
        return True

    def start_port(self, route: Route, key: tuple[str, int]) -> None:
        """Accepted on a port route: dial its backend at once, reading nothing first, so
        protocols where the server speaks first work. From a trusted balancer (with
        ``receive_proxy_protocol``) its PROXY header is read first: the real client is
        the one the guard judges and the backend's own PROXY header names."""
        if not self._admit():
            return
        self.route = route
        self.port_key = key
        ctx = self.ctx
        self.route_stats = ctx.stats.route(route.qualified_id)
        if ctx.config.receive_proxy_protocol and ctx.is_trusted(self.client_addr):
            self._move(PROXY_HEADER)
            self._read_prefix()  # then _advance: _dial_port once the header is in
            if self.state is PROXY_HEADER:
                ctx.handshaking.add(self)  # the header within handshake_timeout
            return
        if not ctx.guard.idle and not self._guard_address():
            return
        self._dial_port(route)

    def _dial_port(self, route: Route) -> None:
        """A port route's client is known (the global guard steps done, after its PROXY
        header if it sends one): the routed ones, then the dial; what the client sent
        after a header goes first."""
        ctx = self.ctx
        ctx.handshaking.discard(self)
        guarded = not ctx.guard.idle or route.ip_filter is not None
        if guarded and not self._guard_checks(None, route):
            return
        self._move(DIALING)
        if self.cmask > 0:
            self.sync_events()  # stop reading the client until the backend is up
        self._dial_next()

    def start(self) -> None:
        """Just accepted: admit or refuse, then read what the client already sent."""
        if not self._admit():
            return
        ctx = self.ctx
        if ctx.config.receive_proxy_protocol and ctx.is_trusted(self.client_addr):
            self._move(PROXY_HEADER)
        else:
            if not ctx.guard.idle and not self._guard_address():
                return
            self.state = SNIFFING  # from ACCEPTED, always allowed: no _move check
        self._read_prefix()
        if self.state in _PRE_ROUTING:  # must wait for more: watch it and its deadline
            ctx.handshaking.add(self)

    def on_event(self, fd: int, events: int) -> None:
        state = self.state
        if state is FORWARDING:  # client and backend branches mirror each other on purpose:
            # one helper taking the side would cost a call per event on the hot path
            if fd == self.cfd:
                if events & EPOLLOUT:
                    self.down.flush()
                if events & _READABLE and self.state is FORWARDING:
                    if self.cmask & EPOLLIN:
                        self.up.pump()
                    elif events & _FAILED:
                        self.close(f"client reset: {_socket_error(fd)}")
            else:
                if events & EPOLLOUT:
                    self.up.flush()
                if events & _READABLE and self.state is FORWARDING:
                    if self.bmask & EPOLLIN:
                        self.down.pump()
                    elif events & _FAILED:
                        self.close(f"backend reset: {_socket_error(fd)}")
            return
        if state is CLOSED:
            return
        if fd == self.cfd:
            if events & EPOLLOUT:
                self.down.flush()
            if events & _READABLE and self.state is not CLOSED:
                if self.cmask & EPOLLIN:
                    self._read_prefix()
                elif events & _FAILED:  # while dialing: the client gave up
                    self.close(f"client reset: {_socket_error(fd)}")
        elif fd == self.bfd and state is DIALING:
            self._backend_writable()

    def on_internal_error(self, exc: Exception) -> None:
        """A bug met this connection (the reactor logged it with the traceback): end it
        and count it; if even the orderly close fails, tear it down by hand. Never raises:
        a connection that escaped every set would hold its fds until the process ends."""
        ctx = self.ctx
        ctx.stats.internal_errors += 1
        reason = f"internal error: {exc!r}"
        try:
            self.abort(reason)
            return
        except Exception as cleanup:
            logger.opt(exception=cleanup).error("internal error closing {!r}", self)
        self._tear_down(reason)

    def _tear_down(self, reason: str) -> None:
        """Last resort after a failed close: release fds and leave every set, touching
        nothing that may be half-built."""
        ctx = self.ctx
        handed_off = self.state is TERMINATING
        self.state = CLOSED
        self.reason = reason
        ctx.handshaking.discard(self)
        ctx.dialing.discard(self)
        if self._dial_task is not None:
            self._dial_task.cancel()
            self._dial_task = None
        for flow in (self.up, self.down):
            if flow is not None and flow.pipe is not None:
                with contextlib.suppress(Exception):
                    flow.release()
        with contextlib.suppress(Exception):  # the counts close() keeps: never leaked
            self._release_counts()
        for fd, owned in ((self.cfd, not handed_off), (self.bfd, True)):
            if fd >= 0:
                ctx.reactor.forget(fd)
                if owned:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self.cfd = self.bfd = -1
        ctx.connections.discard(self)

    def _release_counts(self) -> None:
        """Leave what this connection is counted in: its IP's open connections, its
        route's players, the waker's players (each once)."""
        ctx = self.ctx
        if self._ip_key is not None:
            ctx.guard.closed(self._ip_key)
            self._ip_key = None
        players_in = self._players_in
        if players_in is not None:
            self._players_in = None
            route_stats, qid = players_in
            route_stats.players -= 1
            if ctx.shared_players is not None:
                ctx.shared_players.publish(qid, route_stats.players)
        if self._player and self.route is not None:
            self._player = False
            ctx.waker.player_left(self.route.qualified_id)

    def sync_events(self) -> None:
        """Register what each fd must be watched for, from the state of both flows."""
        up, down = self.up, self.down
        reactor = self.ctx.reactor
        if self.state is FORWARDING:
            cmask = (0 if up.blocked or up.eof else EPOLLIN) | (EPOLLOUT if down.blocked else 0)
            bmask = (0 if down.blocked or down.eof else EPOLLIN) | (EPOLLOUT if up.blocked else 0)
            if bmask != self.bmask:
                if self.bmask < 0:
                    reactor.register(self.bfd, self, bmask)
                else:
                    reactor.modify(self.bfd, bmask)
                self.bmask = bmask
        elif self.state in _PRE_ROUTING:
            cmask = (EPOLLIN if not self.lingering else 0) | (EPOLLOUT if down.blocked else 0)
        else:  # dialing: the client waits, unread
            cmask = 0
        if cmask != self.cmask:
            if self.cmask < 0:
                reactor.register(self.cfd, self, cmask)
            else:
                reactor.modify(self.cfd, cmask)
            self.cmask = cmask

    def _read_prefix(self) -> None:
        try:
            data = _read(self.cfd, PREFIX_READ_BYTES)
        except BlockingIOError:
            if self.cmask < 0:
                self.sync_events()
            return
        except OSError as exc:
            self.close(f"client reset: {exc.strerror or exc}")
            return
        if not data:
            self._client_eof_before_forwarding()
            return
        self.prefix_bytes += len(data)
        buffer = self.buffer
        if not buffer:
            buffer = self.buffer = data  # the common case: one read holds the handshake
        else:
            if isinstance(buffer, bytes):
                buffer = self.buffer = bytearray(buffer)
            buffer += data
        try:
            self._advance()
        except ProtocolError as exc:
            self._fail(str(exc), exc.hint)
            return
        # Each sniffer caps its own message; this bounds what no sniffer claimed yet
        # (self.buffer, not the local: a PROXY header or answered packet was cut off it).
        if self.state in _PRE_ROUTING:
            pending = len(self.buffer)
            if pending > MAX_PREFIX_BYTES:
                self._prefix_too_long(pending)
            elif self.cmask < 0:
                self.sync_events()

    def _prefix_too_long(self, pending: int) -> None:
        self._fail(f"sent {pending} bytes without a routable handshake", Hint.CLOSE)

    def _client_eof_before_forwarding(self) -> None:
        if self.state is ANSWERING:
            self.close(self.reason or "client closed")
        else:
            self.close("client closed before handshake")

    def _advance(self) -> None:
        buffer = self.buffer
        if self.state is PROXY_HEADER:
            header = parse_proxy_header(buffer)
            if header is NEED_DATA:
                return
            if header.command == "PROXY" and header.source is not None:
                steer = self.ctx.steer  # workers: the real client's worker, by its address
                if (
                    steer is not None
                    and (owner := steer(header.source[0])) != self.ctx.worker
                    and not self.ctx.closing  # draining: served here (the drain waits)
                ):
                    self._hand_off(owner, bytes(buffer), header.source)
                    return
            buffer = self.buffer = buffer[header.length :]
            self._proxy_header = header
            if header.command == "PROXY" and header.source is not None:
                self.client_addr = header.source
            if not self.ctx.guard.idle and not self._guard_address():
                return
            if self.route is not None:  # a port route: nothing to sniff
                self._dial_port(self.route)
                return
            self._move(SNIFFING)
            if not buffer:
                return
        if self.state is SNIFFING:
            self._sniff()
        elif self.state is ANSWERING:
            self._answer_status_packets()

    def _hand_off(self, worker: int, data: bytes, client: tuple[str, int]) -> None:
        """Workers: the kernel steered this connection by its balancer's address, but
        its PROXY header names a client another worker owns (per-IP limits, budgets and
        bans are kept whole there). The socket and what was read go to that worker
        (``ProxyContext.hand_off``, through the control plane); nothing is logged or
        counted closed here once that one took it (it does both). Until then this
        connection is out of every set, waiting only for the answer: one it could not
        hand comes back to :meth:`_hand_off_failed`."""
        ctx = self.ctx
        ctx.handshaking.discard(self)
        if self.cmask >= 0:
            ctx.reactor.unregister(self.cfd)  # its epoll entry would outlive our close
            self.cmask = -1
        fd, self.cfd = self.cfd, -1
        handed = HandedClient(
            peer=self.client_addr,
            listener=self.listener,
            fallback=self.fallback,
            port_key=self.port_key,  # a port route's: the other worker looks it up
            started=self.started,
            data=data,
        )
        self.client_addr = client  # a failed hand-off's close line: the real client
        self.state = CLOSED
        self.up.release()
        self.down.release()
        ctx.handed_off(self)
        assert ctx.hand_off is not None  # set with steer
        ctx.spawn(self, self._await_hand_off(ctx.hand_off(worker, handed, fd)))

    @on_loop
    async def _await_hand_off(self, hand_off: Coroutine[Any, Any, None]) -> None:
        """``ProxyContext.hand_off`` until answered; one that failed (its socket closed
        on the way) ends this connection back on the reactor."""
        internal = False
        try:
            await hand_off
        except HandoffFailed as exc:
            reason = str(exc)
        except Exception as exc:  # a bug: logged, and the connection still ends counted
            logger.opt(exception=exc).error("internal error handing a connection off")
            reason, internal = f"handoff failed: internal error: {exc!r}", True
        else:
            return
        self.ctx.reactor.call_into(self, lambda: self._hand_off_failed(reason, internal))

    def _hand_off_failed(self, reason: str, internal: bool = False) -> None:
        """The other worker never took this connection (``_hand_off``): accepted and
        counted here, it ends here, with its close line and in the stats (its socket
        is closed already, the backend never dialed); a bug of ours on the way counts
        as an internal error too."""
        self.reason = reason
        if internal:
            self.ctx.stats.internal_errors += 1
        self.ctx.unregister(self)

    def adopt(self, handed: HandedClient) -> None:
        """A connection another worker handed over (``_hand_off``): admitted here, its
        PROXY header read again from what it had read, then on as if accepted here."""
        ctx = self.ctx
        self.listener = handed.listener
        self.fallback = handed.fallback
        if not self._admit():
            return
        self.started = handed.started  # its deadlines and duration count from the accept
        if handed.port_key is not None:
            route = ctx.registry.table.ports.get(handed.port_key)
            if route is None:
                self.close("port route gone")
                return
            self.route = route
            self.route_stats = ctx.stats.route(route.qualified_id)
        self._move(PROXY_HEADER)
        self.buffer = handed.data
        self.prefix_bytes = len(handed.data)
        try:
            self._advance()
        except ProtocolError as exc:
            self._fail(str(exc), exc.hint)
            return
        if self.state in _PRE_ROUTING:
            pending = len(self.buffer)  # the bound _read_prefix keeps, on what it read
            if pending > MAX_PREFIX_BYTES:
                self._prefix_too_long(pending)
                return
            ctx.handshaking.add(self)
            if self.cmask < 0:
                self.sync_events()

    def _sniff(self) -> None:
        buffer = self.buffer
        kind = detect_protocol(buffer)
        if kind is NEED_DATA:
            return
        name: str | None
        if kind is _MINECRAFT:
            handshake = minecraft.parse_handshake(buffer)
            if handshake is NEED_DATA:
                return
            name = handshake.server_address
            self._handshake = handshake
            self._next_state = handshake.next_state
            self._handshake_length = handshake.length
        elif kind is _MINECRAFT_LEGACY:
            ping = minecraft.parse_legacy_ping(buffer)
            if ping is NEED_DATA:
                if self._legacy_wait == 0:  # a stalled 1.6 ping is answered as 1.4 soon
                    self._legacy_wait = 1
                    self.ctx.reactor.call_later_into(
                        LEGACY_PING_GRACE_S, self, self._legacy_stalled
                    )
                if self._legacy_wait == 1:
                    return
                ping = minecraft.LegacyPing("1.4", None, None, None, None, len(buffer))
            self._legacy = ping
            name = ping.host
        elif kind is _MINECRAFT_LEGACY_LOGIN:
            legacy_login = minecraft.parse_legacy_login(buffer)
            if legacy_login is NEED_DATA:
                return
            self._legacy_login = legacy_login
            name = legacy_login.host
        elif kind is _TLS:
            hello = tls.parse_client_hello(buffer)
            if hello is NEED_DATA:
                return
            name = hello.server_name
        elif kind is _HTTP:
            head = http.parse_request_head(buffer)
            if head is NEED_DATA:
                return
            name = head.host
        else:
            name = None
        self._kind = kind
        self._name = name
        table = self.ctx.registry.table
        if self.fallback is None:
            route = table.lookup_or_default(name)
        else:  # the listener's catch-all comes before the global default
            route = table.lookup_host(name) if name else None
            route = route or table.by_id.get(self.fallback) or table.default
        self.route = route  # the close line names it from here on, a refusal's too
        login = (
            kind is _MINECRAFT and self._next_state != minecraft.NEXT_STATE_STATUS
        ) or kind is _MINECRAFT_LEGACY_LOGIN
        if (
            login
            and self.player is None
            and (route is not None or self.ctx.guard.bans.has_usernames)
        ):
            # who logs in: bans, players lists, the API, the close line
            if self._legacy_login is not None:  # the username is in the handshake
                self.player = self._legacy_login.username
            else:
                start = minecraft.parse_login_start(buffer[self._handshake_length :])
                if start is NEED_DATA:
                    return  # Login Start follows the handshake at once; wait for it
                self.player = start.username
        guarded = not self.ctx.guard.idle or (route is not None and route.ip_filter is not None)
        if guarded and not self._guard_checks(kind, route):
            return  # refused
        if route is None:
            self._answer_unknown(kind, name)
            return
        stats = self.ctx.stats
        route_stats = self.route_stats = stats.route(route.qualified_id)
        stats.routed(self.listener, time.monotonic() - self.started)
        if kind is _MINECRAFT_LEGACY:
            self._answer_status(0)
            return
        if kind is _MINECRAFT and not login:
            self._answer_status(self._handshake_length)
            return
        if login:
            if not self._admit_player(route, route_stats):
                return
            if route.server.sleeping:
                self._wake()
                return
        elif kind is _TLS and route.server.tls is not None:
            self._terminate(route)
            return
        self.state = DIALING  # from SNIFFING (this method's state), always allowed
        self.ctx.handshaking.discard(self)
        if self.cmask > 0:
            self.sync_events()  # stop reading the client until the backend is up
        self._dial_next()

    def _legacy_stalled(self) -> None:
        if self.state is SNIFFING and self._legacy is None:
            self._legacy_wait = 2
            try:
                self._sniff()
            except ProtocolError as exc:
                self._fail(str(exc), exc.hint)

    # -- TLS termination (discoproxy/proxy/tls_termination.py) ---------------------------

    def _terminate(self, route: Route) -> None:
        """Hand the client to the asyncio side, which completes the TLS handshake with
        the server's certificate and relays plaintext; it comes back in ``terminated``."""
        ctx = self.ctx
        self._move(TERMINATING)
        ctx.handshaking.discard(self)
        if self.cmask >= 0:
            ctx.reactor.unregister(self.cfd)  # leaves epoll; the fd now belongs to asyncio
            self.cmask = -1
        order = tuple(self._pool_order(route))
        proxied = self._proxied_for(route)
        handoff = Handoff(self.id, self.started, bytes(self.buffer), proxied, order)
        self._dial_task = ctx.spawn(self, terminate(ctx, self, route, self.cfd, handoff))

    def tls_dialed(
        self, backend: tuple[str, int] | None, failed: tuple[tuple[str, int], ...]
    ) -> None:
        """The terminated connection's dials are done: the pool hears at once which
        backends failed, and the one that answered counts this connection open (for
        least_connections) until it closes, as a passthrough connection does."""
        for entry in failed:
            self._pool_failed(entry)
        if backend is None or self.state is CLOSED or self._pool is None:
            return
        self.backend_addr = backend  # the close line's, whoever ends the connection
        self._pool.dialing(backend)
        self._entry = backend  # close() counts it done
        self._pool_connected(backend, time.monotonic())

    def terminated(self, backend: tuple[str, int] | None, up: int, down: int, reason: str) -> None:
        """The terminated relay ended (its fd is closed): account and log it. Closed here
        meanwhile (a kick, a ban, the shutdown deadline): close() left the close line to
        this, for the relay's own bytes and backend, under close()'s reason."""
        self._dial_task = None
        self.cfd = -1
        closed = self.state is CLOSED
        if closed and self not in self.ctx.connections:
            return  # torn down by hand after an internal error: nothing left to account
        self.backend_addr = backend or self.backend_addr
        self.prefix_bytes = 0  # the close line counts plaintext: up and down alike
        self.up.count += up
        self.down.count += down
        if closed:
            self.ctx.unregister(self)
        else:
            self.close(reason)

    # -- guard (discoproxy/guard.py: precedence and bounds) -----------------------------

    def _guard_address(self) -> bool:
        """The real client address is known: global ip_filter, then
        max_connections_per_ip (guard.py: steps 1-2). A refused client is closed
        without a reply."""
        guard = self.ctx.guard
        addr = self.client_addr
        ip = client_ip(addr[0]) if addr is not None else None
        self._ip = ip
        if ip is None:
            return True
        refusal = global_refusal(guard, ip)
        if refusal is None and guard.max_per_ip:
            key = str(ip)
            if guard.opened(key):
                self._ip_key = key
            else:
                cause = Rejection.MAX_CONNECTIONS_PER_IP
                refusal = Refusal(cause, str(cause))
        if refusal is not None:
            self._refused(refusal)
            return False
        return True

    def _guard_checks(self, kind: Sniffed | None, route: Route | None) -> bool:
        """After the handshake (guard.py: steps 3-5): bans by IP, the rate budget, the
        server's ip_filter (once), then a username ban (Minecraft logins: waits for Login
        Start). False: refused, or waiting for more bytes."""
        guard = self.ctx.guard
        config = self.ctx.config
        login = (
            kind is _MINECRAFT and self._next_state != minecraft.NEXT_STATE_STATUS
        ) or kind is _MINECRAFT_LEGACY_LOGIN
        if not self._guarded:
            self._guarded = True
            ip = self._ip
            if ip is None and self.client_addr is not None:  # the global steps were idle
                ip = self._ip = client_ip(self.client_addr[0])
            if ip is not None:
                status = (kind is _MINECRAFT and not login) or kind is _MINECRAFT_LEGACY
                refusal = routed_refusal(
                    guard,
                    ip,
                    route.ip_filter if route is not None else None,
                    route.qualified_id if route is not None else "-",
                    guard.status if status else guard.connections,
                )
                if refusal is not None:
                    if refusal.ban is not None:
                        text = _ban_text(config, refusal.ban)
                    elif refusal.cause in RATE_LIMITED:
                        text = config.rate_limited_message
                    else:
                        text = config.not_allowed_message
                    self._refused(refusal, login, text)
                    return False
        username = self.player  # read by _sniff for every login
        if username is not None and guard.bans.has_usernames:
            ban = guard.bans.user_ban(username)
            if ban is not None:
                refusal = Refusal(Rejection.BANNED, f"banned ({ban.target})", ban)
                self._refused(refusal, login, _ban_text(config, ban))
                return False
        return True

    def _admit_player(self, route: Route, route_stats: RouteStats) -> bool:
        """A login to *route* (its username read): the global and the server's
        ``players`` lists, ``wake.allow`` while it sleeps, then ``max_players``; counted
        in its route's ``players`` until it closes. False: refused with a Disconnect."""
        username = self.player
        assert username is not None
        config = self.ctx.config
        server = route.server
        refusal: Refusal | None = None
        if config.players.refuses(username) or server.players.refuses(username):
            text = config.player_not_allowed_message
            refusal = Refusal(Rejection.PLAYER_NOT_ALLOWED, f"player {username} not allowed")
        elif server.sleeping and server.wake.allow and username not in server.wake.allow:
            text = config.wake_not_allowed_message
            refusal = Refusal(Rejection.WAKE_NOT_ALLOWED, f"player {username} may not wake it")
        elif server.max_players and self._players_of(route, route_stats) >= server.max_players:
            text = config.server_full_message.replace("{max_players}", str(server.max_players))
            refusal = Refusal(Rejection.SERVER_FULL, f"full ({server.max_players} players)")
        if refusal is not None:
            self._refused(refusal, True, self._message(text))
            return False
        route_stats.players += 1
        qid = route.qualified_id
        self._players_in = (route_stats, qid)
        shared = self.ctx.shared_players
        if shared is not None:
            shared.publish(qid, route_stats.players)
        return True

    def _players_of(self, route: Route, route_stats: RouteStats) -> int:
        """Players of ``route`` through this proxy: this data plane's, plus the other
        workers' (``workers = N``: the shared counts, player_counts.py)."""
        shared = self.ctx.shared_players
        if shared is None:
            return route_stats.players
        return shared.total(route.qualified_id, route_stats.players)

    def _refused(self, refusal: Refusal, login: bool = False, text: str = "") -> None:
        """Refuse this connection: a Minecraft login reads ``text`` in a Disconnect."""
        reason = refusal.reason
        self.ctx.log_rejection(self.client_addr, reason, refusal.cause, self.listener)
        if login and self.state is SNIFFING:
            self._move(ANSWERING)
            self._reply(self._login_disconnect(text))
        self.close(f"refused: {reason}")

    def _login_disconnect(self, text: str) -> bytes:
        """The Disconnect a refused or unanswered login reads, in its client's format."""
        if self._legacy_login is not None:
            return minecraft.encode_legacy_disconnect(text)
        return minecraft.encode_login_disconnect(minecraft.text_component(text))

    # -- answers when nothing routes ----------------------------------------------------

    def _reply(self, data: bytes) -> None:
        """Answer the client ourselves (no backend): counted as bytes down."""
        down = self.down
        down.count += len(data)
        down.dst = self.cfd
        down.out = down.out + data if down.out is not None else data
        down.flush()

    def _unknown_text(self, name: str | None) -> str:
        return self.ctx.config.unknown_server_message.replace("{domain}", name or "(none)")

    def _answer_unknown(self, kind: Sniffed, name: str | None) -> None:
        text = self._unknown_text(name)
        reason = f"unknown server {name!r}" if name else "no server name and no default route"
        if kind is _MINECRAFT and self._next_state == 1:
            self.buffer = self.buffer[self._handshake_length :]
            self.reason = reason
            self._move(ANSWERING)
            self._answer_status_packets()
            return
        if kind is _MINECRAFT or kind is _MINECRAFT_LEGACY_LOGIN:  # a login: its Disconnect
            self._reply(self._login_disconnect(text))
        elif kind is _MINECRAFT_LEGACY:
            status = self.ctx.status.synthesized(None, StatusState.UNKNOWN, -1, name or "")
            self._reply(_legacy_answer(self._legacy, status))
        elif kind is _TLS:
            self._reply(tls.encode_alert(tls.ALERT_UNRECOGNIZED_NAME))
        elif kind is _HTTP:
            if name:
                code = self.ctx.config.http_unmatched_status
                phrase = _HTTP_PHRASES.get(code, "Error")
                self._reply(http.encode_response(code, phrase, text + "\n"))
            else:
                self._reply(http.encode_response(400, "Bad Request", "missing Host\n"))
        self.close(reason)

    def _answer_status(self, handshake_length: int) -> None:
        """A status ping (modern or legacy) for a routed server: answered here, from the
        status cache or one ping to the backend (``discoproxy.status``)."""
        self.buffer = self.buffer[handshake_length:]
        self.reason = "status answered"
        self._move(ANSWERING)
        if self._legacy is not None:
            self._status_pending = True
            self._dial_task = self.ctx.spawn(
                self, self._fetch_status(self._proxied_for(self.route), self._status_order())
            )
            return
        self._answer_status_packets()

    def _proxied_for(self, route: Route | None) -> Proxied | None:
        """The PROXY addresses a backend of ``route`` is sent, taken on the reactor thread
        for work that runs on the loop (status pings, TLS termination)."""
        return self.proxy_addresses() if route is not None and route.send_proxy_protocol else None

    def _status_order(self) -> tuple[tuple[str, int], ...]:
        """The backends a status ping asks (none: all down, so the answer is the stale
        cache or the unreachable MOTD at once): the pool's up ones, without moving its
        cursor or spending its probe (``Pool.status_order``)."""
        route = self.route
        assert route is not None
        return self.ctx.pools.get(route).status_order()

    def _pool_order(self, route: Route) -> Sequence[tuple[str, int]]:
        """The route's pool (kept in ``_pool``) and its order for this client."""
        pool = self._pool = self.ctx.pools.get(route)
        client = self.client_addr
        return pool.order(client[0] if client else None, time.monotonic())

    @on_loop
    async def _fetch_status(
        self, proxied: Proxied | None, order: tuple[tuple[str, int], ...]
    ) -> None:
        """On the asyncio loop: the status to answer with; back to the reactor with it."""
        route = self.route
        assert route is not None
        handshake, legacy = self._handshake, self._legacy
        if handshake is not None:
            protocol, domain, port = (
                handshake.protocol_version,
                handshake.server_address,
                handshake.server_port,
            )
        else:
            # no host before 1.6: the server's own first name, for backends that care
            fallback = next((d for d in route.server.domains if not d.startswith("*")), "")
            protocol, domain = LEGACY_PING_PROTOCOL, (legacy.host if legacy else None) or fallback
            port = (legacy.port if legacy else None) or DEFAULT_BACKEND_PORT
        status = self.ctx.status
        try:
            text, state = await status.answer(route, protocol, domain, port, proxied, order)
        except Exception as exc:  # a bug: this connection only
            logger.opt(exception=exc).error("internal error answering a status ping")
            reason = f"internal error: {exc!r}"
            self.ctx.reactor.call_into(self, lambda: self.abort(reason))
            return
        self.ctx.reactor.call_into(self, lambda: self._status_ready(text, state))

    def _status_ready(self, text: str, state: StatusState) -> None:
        if self.state is not ANSWERING:
            return
        self._dial_task = None
        self._status_pending = False
        self.reason = f"status answered ({state.value})"
        if self._legacy is not None:
            self._reply(_legacy_answer(self._legacy, text))
            self.close(self.reason)
            return
        self._reply(minecraft.encode_status_response(text))
        try:  # what the client sent while it waited: a bad packet is its protocol error
            self._answer_status_packets()
        except ProtocolError as exc:
            self._fail(str(exc), exc.hint)

    def _answer_status_packets(self) -> None:
        """Status request → status; ping → pong and close (wiki.vg SLP)."""
        while self.state is ANSWERING and not self._status_pending:
            packet = minecraft.parse_packet(self.buffer, max_bytes=64)
            if packet is NEED_DATA:
                return
            self.buffer = self.buffer[packet.length :]
            if packet.packet_id == 0x00:
                route = self.route
                if route is None:
                    protocol = self._handshake.protocol_version if self._handshake else -1
                    status = self.ctx.status.synthesized(
                        None, StatusState.UNKNOWN, protocol, self._name or ""
                    )
                    self._reply(minecraft.encode_status_response(status))
                    continue
                if self.down.count:  # a second status request: vanilla closes too
                    self.close("unexpected second status request")
                    return
                handshake = self._handshake
                assert handshake is not None
                cached = self.ctx.status.cached(
                    route, handshake.protocol_version, handshake.server_address
                )
                if cached is not None:
                    self.reason = "status answered (cached)"
                    self._reply(cached)
                    continue
                self._status_pending = True
                self._dial_task = self.ctx.spawn(
                    self, self._fetch_status(self._proxied_for(self.route), self._status_order())
                )
                return
            elif packet.packet_id == 0x01:
                self._reply(minecraft.encode_pong(packet.payload))
                self.close(self.reason)
                return
            else:
                self.close(f"unexpected status packet 0x{packet.packet_id:02x}")
                return

    # -- dialing ------------------------------------------------------------------------

    def _dial_next(self) -> None:
        """Dial the next address: what a host name resolved to first, then the route's
        next one. The deadline sweep (``ProxyContext.start_sweeps``) enforces
        ``connect_timeout`` per attempt (cheaper than a timer per attempt)."""
        route = self.route
        assert route is not None
        addresses = self._order
        if addresses is None:
            addresses = self._order = self._pool_order(route)
            if not addresses:
                self._dial_error(f"every backend of {route.qualified_id} is down")
        timeout = route.server.connect_timeout or self.ctx.config.connect_timeout
        while self.state is DIALING:
            now = time.monotonic()
            if not self._dial_at:
                self._dial_at = now
            self.dial_deadline = now + timeout if timeout else math.inf
            resolved = self._resolved_addresses
            if resolved:
                resolved_family, ip, port, name = resolved.pop(0)
                if self._connect(resolved_family, ip, port, name):
                    return
                continue
            if self._entry is not None:  # every address of the last entry failed
                self._entry_failed()
            if self._next_address >= len(addresses):
                self._backend_unreachable()
                return
            host, port = entry = addresses[self._next_address]
            self._next_address += 1
            self._entry = entry
            assert self._pool is not None
            self._pool.dialing(entry)
            family = literal_family(host)
            if family is None:
                cached = self.ctx.names.get(host, port)
                if cached is not None:  # resolved moments ago: no round trip to a thread
                    self._resolved_addresses = list(cached.addresses)
                    if cached.error:
                        self._dial_error(cached.error)
                    continue
                self.ctx.dialing.add(self)
                token = self._next_address
                self._dial_task = self.ctx.spawn(self, self._resolve(host, port, token))
                return
            if self._connect(family, host, port):
                return

    def _pool_connected(self, entry: tuple[str, int], now: float) -> None:
        """A dial to pool entry ``entry`` went through: tell the pool."""
        pool, route = self._pool, self.route
        if pool is None or route is None:
            return
        client = self.client_addr
        if pool.connected(entry, client[0] if client else None, now):
            worker = self.ctx.worker
            logger.bind(route=route.qualified_id, worker=worker).warning(
                "backend {} of {} up again{}",
                format_addr(entry),
                route.qualified_id,
                "" if worker is None else f" on worker {worker}",
            )
            event: dict[str, object] = {
                "route": route.qualified_id,
                "backend": format_addr(entry),
                "reason": "dialed",
            }
            if worker is not None:
                event["worker"] = worker
            self.ctx.events.put("backend_up", event)

    def _entry_failed(self) -> None:
        """The pool entry being dialed failed (each of its addresses): it is no longer
        counted open, and the pool hears of the failure."""
        entry, pool = self._entry, self._pool
        assert entry is not None and pool is not None
        self._entry = None
        pool.done(entry)
        self._pool_failed(entry)

    def _pool_failed(self, entry: tuple[str, int]) -> None:
        """A dial to pool entry ``entry`` failed: tell the pool; log when it went down."""
        pool, route = self._pool, self.route
        if pool is None or route is None:
            return
        last = self._dial_errors[-1] if self._dial_errors else "failed"
        if pool.failed(entry, time.monotonic(), last):
            # passive health is each worker's own (its dials): the line says whose
            worker = self.ctx.worker
            logger.bind(route=route.qualified_id, worker=worker).warning(
                "backend {} of {} down: {} dials failed in a row{}: {}",
                format_addr(entry),
                route.qualified_id,
                FALL,
                "" if worker is None else f" on worker {worker}",
                last,
            )
            event: dict[str, object] = {
                "route": route.qualified_id,
                "backend": format_addr(entry),
                "reason": f"{FALL} dials failed in a row: {last}",
            }
            if worker is not None:
                event["worker"] = worker
            self.ctx.events.put("backend_down", event)

    @on_loop
    async def _resolve(self, host: str, port: int, token: int) -> None:
        """Resolve a backend host name on the asyncio loop (its resolver runs in a thread
        pool); the answer goes back to the reactor thread, which owns the connection."""
        try:
            infos = await self.ctx.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            error = f"{format_addr((host, port))}: {exc.strerror or exc}"
            self.ctx.reactor.call_into(self, lambda: self._resolved(host, port, token, [], error))
        else:
            self.ctx.reactor.call_into(self, lambda: self._resolved(host, port, token, infos, ""))

    def _resolved(
        self, host: str, port: int, token: int, infos: list[tuple[Any, ...]], error: str
    ) -> None:
        resolved = list(resolved_addresses(infos, host, port))
        self.ctx.names.put(host, port, tuple(resolved), error)
        if token != self._next_address or self._dial_task is None:
            return  # this attempt timed out meanwhile, or the connection is gone
        self._dial_task = None
        self.ctx.dialing.discard(self)
        if error:
            self._dial_error(error)
        if self.state is not DIALING:
            return
        self._resolved_addresses = resolved
        self._dial_next()

    def _connect(
        self, family: socket.AddressFamily, ip: str, port: int, name: str | None = None
    ) -> bool:
        """Start a non-blocking connect; False when it failed at once (try the next)."""
        try:
            sock = _socket.socket(family, _STREAM_NONBLOCK)
        except OSError as exc:
            self._dial_error(f"{_dial_target(ip, port, name)}: {exc.strerror or exc}")
            return False
        try:
            sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
            code = sock.connect_ex((ip, port))
        except OSError as exc:
            sock.close()
            self._dial_error(f"{_dial_target(ip, port, name)}: {exc.strerror or exc}")
            return False
        if code and code != errno.EINPROGRESS:
            sock.close()
            self._dial_error(f"{_dial_target(ip, port, name)}: {os.strerror(code)}")
            return False
        self.bfd = sock.detach()
        self.backend_addr = (ip, port)
        self._dial_name = name
        up = self.up
        route = self.route
        assert route is not None
        server = route.server
        handshake = self._handshake
        rewrite = (
            server.domain_rewrite is not None
            or server.tcpshield_real_ip
            or (  # TCPShield data the client may have written itself: never passed on
                handshake is not None
                and minecraft.TCPSHIELD_SEPARATOR in handshake.raw_address
                and not self._shield_trusted()
            )
        ) and (handshake is not None or self._legacy_login is not None)
        if up.out is None or rewrite:  # what the backend must see first
            header = self._proxy_header_for_backend() if route.send_proxy_protocol else b""
            prefix = self._rewritten_prefix(name or ip) if rewrite else self.buffer
            up.out = header + prefix if header else bytes(prefix)
        self._backend_writable()
        return True

    def _rewritten_prefix(self, dialed_host: str) -> bytes:
        """The prefix with the handshake's address rebuilt: the host replaced
        (``domain_rewrite``), TCPShield's real-IP data written (``tcpshield_real_ip``);
        what follows after a NUL (Forge's ``\0FML…``, forwarding data) is kept."""
        handshake = self._handshake
        route = self.route
        assert route is not None
        server = route.server
        legacy = self._legacy_login
        if legacy is not None:  # a 1.2-1.6 login: the same packet with the new host
            host = rewritten_host(server, dialed_host, legacy.host)
            rebuilt = minecraft.encode_legacy_login(
                legacy.protocol_version, legacy.username, host, legacy.port
            )
            return rebuilt + bytes(self.buffer[legacy.length :])
        assert handshake is not None
        raw = handshake.raw_address
        cut = raw.find("\0")
        head, suffix = (raw[:cut], raw[cut:]) if cut >= 0 else (raw, "")
        shield_at = head.find(minecraft.TCPSHIELD_SEPARATOR)
        host, shield = (head[:shield_at], head[shield_at:]) if shield_at >= 0 else (head, "")
        if server.domain_rewrite is not None:
            host = rewritten_host(server, dialed_host, handshake.server_address)
        if shield and not self._shield_trusted():
            shield = ""  # the client's own words: it could name any address
        if server.tcpshield_real_ip and not shield:
            shield = self._tcpshield_data()
        rebuilt = minecraft.encode_handshake(
            handshake.protocol_version,
            host + shield + suffix,
            handshake.server_port,
            handshake.next_state,
        )
        return rebuilt + bytes(self.buffer[handshake.length :])

    def _player_event(self) -> dict[str, Any]:
        """What a webhook hears of this player's connection (README "Webhooks")."""
        player = self.player
        assert player is not None
        route = self.route
        return {
            "conn": self.id,
            "player": player,
            "uuid": str(offline_uuid(player)),
            "client": format_addr(self.client_addr),
            "route": route.qualified_id if route is not None else None,
            "backend": format_addr(self.backend_addr) if self.backend_addr else None,
        }

    def _shield_trusted(self) -> bool:
        """Whether TCPShield real-IP data in the handshake may reach the backend: only when
        the TCP peer itself is one of trusted_proxies (TCPShield connecting directly).
        Behind a PROXY header the handshake's bytes are the client's own."""
        return self._proxy_header is None and self.ctx.is_trusted(self.client_addr)

    def _tcpshield_data(self) -> str:
        """TCPShield's real-IP part, ``///ip:port///unix-time``, for the client as this
        connection knows it (after a trusted PROXY header); IPv6 in brackets."""
        client = self.client_addr
        if client is None:  # a UNIX-socket peer: no address to tell
            return ""
        sep = minecraft.TCPSHIELD_SEPARATOR
        return f"{sep}{format_addr(client)}{sep}{int(time.time())}"

    def _backend_writable(self) -> None:
        """Connecting: write the prefix. It goes through once the connection is up."""
        up = self.up
        prefix = up.out
        assert prefix is not None
        try:
            n = _write(self.bfd, prefix)
        except BlockingIOError:  # still connecting: watch it, and its connect_timeout
            self.ctx.dialing.add(self)
            if self.bmask < 0:
                self.ctx.reactor.register(self.bfd, self, EPOLLOUT)
                self.bmask = EPOLLOUT
            return
        except OSError as exc:
            self._drop_backend(f"{format_addr(self.backend_addr)}: {exc.strerror or exc}")
            self._dial_next()
            return
        ctx = self.ctx
        ctx.dialing.discard(self)
        up.out = prefix[n:] if n < len(prefix) else None
        route_stats = self.route_stats
        assert route_stats is not None
        now = time.monotonic()
        seconds = now - self._dial_at
        connect = route_stats.connect  # Histogram.observe inlined: once per connection
        connect.counts[_bisect_left(connect.bounds, seconds)] += 1
        connect.count += 1
        connect.total += seconds
        if self._entry is not None:
            self._pool_connected(self._entry, now)
        self._start_forwarding()

    def _dial_error(self, error: str) -> None:
        if self.route_stats is not None:
            self.route_stats.dial_failures += 1
        if self._dial_errors is None:
            self._dial_errors = []
        self._dial_errors.append(error)

    def _drop_backend(self, error: str) -> None:
        self._dial_error(error)
        if self._dial_name is not None and self.backend_addr is not None:
            # the name may point elsewhere now (a container restarted): ask again next time
            self.ctx.names.forget(self._dial_name, self.backend_addr[1])
        self.ctx.dialing.discard(self)
        if self.bfd >= 0:
            self.ctx.reactor.forget(self.bfd)
            os.close(self.bfd)
            self.bfd = -1
            self.bmask = -1
        self.backend_addr = None

    def dial_timed_out(self) -> None:
        """The current dial attempt passed ``connect_timeout``: abandon it, try the next."""
        if self.state is not DIALING:
            return
        route = self.route
        assert route is not None
        timeout = route.server.connect_timeout or self.ctx.config.connect_timeout
        task = self._dial_task
        if task is not None:
            self._dial_task = None
            task.cancel()
        where = format_addr(self.backend_addr) if self.backend_addr else "name resolution"
        self._drop_backend(f"{where}: timed out after {timeout}s")
        self._dial_next()

    def _backend_unreachable(self) -> None:
        route = self.route
        assert route is not None
        waker = self.ctx.waker
        if waker is not None and waker.is_starting(route.qualified_id):
            self.up.out = None
            if self.ctx.config.auto_start_wait > 0 and not self._held:
                self._wake()  # hold it as the login that woke the server is held
            else:
                self._starting_disconnect()
            return
        logger.bind(conn=self.id, route=route.qualified_id).warning(
            "conn #{} backend unreachable for {}: {}",
            self.id,
            route.qualified_id,
            "; ".join(self._dial_errors or ()),
        )
        self.up.out = None
        self._move(ANSWERING)
        if (self._kind is _MINECRAFT and self._next_state != 1) or self._legacy_login:
            server = self.route.server if self.route is not None else None
            template = (
                server and server.unreachable_message
            ) or self.ctx.config.unreachable_message
            self._reply(self._login_disconnect(self._message(template)))
        elif self._kind is _HTTP:
            if self._order is not None and not self._order:  # all down: nothing dialed
                self._reply(http.encode_response(503, "Service Unavailable", "no backend up\n"))
            else:
                self._reply(http.encode_response(502, "Bad Gateway", "backend unreachable\n"))
        self.close("backend unreachable")

    def _message(self, template: str) -> str:
        route = self.route
        server = display_name(route.server) if route is not None else ""
        return template.replace("{server}", server).replace("{domain}", self._name or "")

    # -- wake-on-connect ----------------------------------------------------------------

    def _wake(self) -> None:
        """A login for a stopped server: start it, hold the login up to
        ``auto_start_wait`` for it, else tell the player to come back."""
        route = self.route
        assert route is not None
        self._move(WAKING)
        self._held = True
        self.ctx.handshaking.discard(self)
        self.sync_events()  # the client waits, unread
        self._dial_task = self.ctx.spawn(self, self._await_wake(route))

    @on_loop
    async def _await_wake(self, route: Route) -> None:
        waker = self.ctx.waker
        ready = None
        if not (route.server.auto_start and route.provider in waker.controls):
            self.ctx.reactor.call_into(self, self._cannot_wake)
            return
        await waker.wake(route)
        wait = self.ctx.config.auto_start_wait
        if wait > 0:
            ready = await waker.wait_ready(route.qualified_id, wait)
        self.ctx.reactor.call_into(self, lambda: self._woken(ready))

    def _cannot_wake(self) -> None:
        if self.state is WAKING:
            self._dial_task = None
            self._dial_error("the server is stopped and nothing here can start it")
            self._backend_unreachable()

    def _woken(self, route: Route | None) -> None:
        if self.state is not WAKING:
            return
        self._dial_task = None
        if route is None:
            self._starting_disconnect()
            return
        self.route = route
        self.route_stats = self.ctx.stats.route(route.qualified_id)
        self._next_address = 0  # the woken server's addresses, from the first, all of them
        self._pool = self.ctx.pools.get(route)
        self._order = route.addresses
        self._resolved_addresses = None
        self._dial_errors = None
        self._move(DIALING)
        self._dial_next()

    def _starting_disconnect(self) -> None:
        self._move(ANSWERING)
        message = self._message(self.ctx.config.starting_message)
        self._reply(self._login_disconnect(message))
        self.close("server starting")

    def _start_forwarding(self) -> None:
        self.state = FORWARDING  # only ever called while DIALING: always allowed
        if self.player is not None:
            wanted = self.ctx.events.wanted
            if "player_connected" in wanted or "player_disconnected" in wanted:
                self._announced = True
                self.ctx.events.put("player_connected", self._player_event())
        if self.player is not None:  # a forwarded login: counted for auto_stop_after
            route = self.route
            waker = self.ctx.waker
            if waker is not None and route is not None and route.server.auto_start:
                waker.player_joined(route.qualified_id)
                self._player = True
        up, down = self.up, self.down
        up.src = down.dst = self.cfd
        up.dst = down.src = self.bfd
        up.blocked = up.out is not None
        self.buffer = b""
        self.sync_events()

    def proxy_addresses(self) -> Proxied | None:
        """(source, destination) for a backend's PROXY header: the real client and the
        address it reached, as an upstream PROXY header said when there was one, else the
        peer and the listening socket's own address. None when the client is unknown."""
        source = self.client_addr
        if source is None:
            return None
        header = self._proxy_header
        destination = header.destination if header is not None else None
        if destination is None:
            sock = socket.socket(fileno=self.cfd)
            try:
                local = sock.getsockname()
            finally:
                sock.detach()
            destination = (local[0], local[1])
        return (source, destination)

    def _proxy_header_for_backend(self) -> bytes:
        proxied = self.proxy_addresses()
        return proxy_v2_header(proxied) if proxied is not None else b""

    # -- failures and teardown ----------------------------------------------------------

    def flow_failed(self, fd: int, exc: OSError) -> None:
        side = "client" if fd == self.cfd else "backend"
        self.close(f"{side} reset: {exc.strerror or exc}")

    def handshake_timed_out(self) -> None:
        if self.state in _PRE_ROUTING and not self.lingering:
            waited = "no complete handshake"
            if self._handshake is not None and self._next_state != minecraft.NEXT_STATE_STATUS:
                waited = "no Login Start after the login handshake"
            self._fail(
                f"{waited} within {self.ctx.config.handshake_timeout}s "
                f"({len(self.buffer)} bytes received)",
                Hint.CLOSE,
                reason=Rejection.HANDSHAKE_TIMEOUT,
            )
        elif self.lingering:
            self.abort(self.lingering)

    def _fail(self, message: str, hint: Hint, reason: Rejection | None = None) -> None:
        # counted, and logged at most every few seconds per cause: a flood of garbage must
        # not become a log flood (the close line still says what happened to this one)
        self.ctx.log_rejection(
            self.client_addr,
            f"conn #{self.id}: {message}",
            cause=reason or Rejection.PROTOCOL_ERROR,
            listener=self.listener,
        )
        if hint is Hint.HTTP_400:
            self._reply(http.encode_response(400, "Bad Request", message + "\n"))
        elif hint is Hint.TLS_ALERT:
            self._reply(tls.encode_alert(tls.ALERT_HANDSHAKE_FAILURE))
        self.close(reason or f"protocol error: {message}")

    def close_idle(self) -> None:
        self.abort("idle timeout")

    def abort(self, reason: str) -> None:
        """Hard stop (idle, shutdown deadline): drop both sides, unwritten bytes too."""
        self.lingering = ""
        self.down.out = None
        self.close(reason)

    def close(self, reason: str) -> None:
        if self.state is CLOSED:
            return
        if self.down.out is not None and self.state is not FORWARDING:
            # a reply is still being written: close once it is out (or at the deadline)
            self.lingering = reason
            self.ctx.handshaking.add(self)
            self.sync_events()
            return
        handed_off = self.state is TERMINATING  # the asyncio side owns (and closes) cfd
        reached = handed_off or self.state is FORWARDING  # (TLS: _entry set once dialed)
        self.state = CLOSED
        self.reason = reason
        ctx = self.ctx
        ctx.handshaking.discard(self)
        ctx.dialing.discard(self)
        task = self._dial_task
        if task is not None:
            self._dial_task = None
            task.cancel()
        up, down = self.up, self.down
        up.release()
        down.release()
        entry = self._entry
        if entry is not None:
            pool = self._pool
            assert pool is not None
            pool.done(entry)
            if pool.sticky_ttl and reached and self.client_addr is not None:
                pool.left(entry, self.client_addr[0], time.monotonic())  # remembered from now
            self._entry = None
        if self._ip_key is not None or self._players_in is not None or self._player:
            self._release_counts()  # a call only when counted in something
        if self._announced:
            self._announced = False
            event = self._player_event()
            event.update(
                bytes_up=self.bytes_up,
                bytes_down=self.bytes_down,
                duration_s=round(time.monotonic() - self.started, 3),
                reason=reason,
            )
            ctx.events.put("player_disconnected", event)
        # break the conn <-> flow cycles: refcounting frees the connection now, not
        # the cyclic GC later (fewer collections, memory reused at once)
        up.conn = down.conn = None  # type: ignore[assignment]
        reactor = ctx.reactor
        if self.cmask >= 0:
            reactor.forget(self.cfd)
        if self.cfd >= 0 and not handed_off:
            os.close(self.cfd)
        if self.bfd >= 0:
            if self.bmask >= 0:
                reactor.forget(self.bfd)
            os.close(self.bfd)
        if handed_off and task is not None:
            return  # the relay, cancelled, reports its bytes: terminated() unregisters it
        ctx.unregister(self)


@on_reactor
def adopt_client(ctx: ProxyContext, fd: int, handed: HandedClient) -> None:
    """A connection another worker handed over: served here from where it was (while
    draining too: the drain waits for it as for the connections it had)."""
    conn = ClientConnection(ctx, fd, handed.peer)
    try:
        conn.adopt(handed)
    except Exception as exc:
        ctx.reactor.handler_failed(conn, exc)


class HandoffFailed(Exception):
    """``ProxyContext.hand_off`` could not hand a connection over: its text is the close
    line's reason ("handoff failed: worker 1 restarting")."""


@dataclass(frozen=True, slots=True)
class HandedClient:
    """What a worker hands another with a connection's socket (``_hand_off``)."""

    peer: tuple[str, int] | None  # the balancer, as accepted
    listener: str
    fallback: str | None
    port_key: tuple[str, int] | None  # a port route's (protocol, port); None: by name
    started: float  # monotonic: the same clock in every process of the host
    data: bytes  # what was read: the PROXY header and whatever followed it


def _legacy_answer(ping: minecraft.LegacyPing | None, status: str) -> bytes:
    """A pre-1.7 ping's answer from a status document: Beta's ``motd§online§max``, or
    the 1.4+ ``§1`` format."""
    motd, version, protocol, online, max_players = legacy_fields(json.loads(status))
    if ping is None or ping.kind == "beta":
        return minecraft.encode_legacy_beta_kick(strip_codes(motd), online, max_players)
    return minecraft.encode_legacy_kick(
        motd.replace("\0", ""),
        protocol=protocol,
        version_name=version.replace("\0", ""),
        online=online,
        max_players=max_players,
    )


def _ban_text(config: ProxyConfig, ban: Ban) -> str:
    until = ""
    if ban.expires is not None:
        until = " (until " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ban.expires)) + ")"
    return config.ban_message.replace("{reason}", ban.reason or "no reason given").replace(
        "{until}", until
    )
