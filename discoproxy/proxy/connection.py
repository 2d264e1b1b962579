"""One client connection, from accept to close: the data plane's hot path.

Rules for this file:
- This is the one relay module allowed to drive sockets through asyncio protocols and
  transports directly (STYLE.md §2): forwarding on anyio byte streams measured about 4×
  the CPU and 7× the memory per connection. Everything around it (listeners, shutdown,
  sweeps) is structured with anyio in ``server.py``.
- The pipeline is one enum plus one transition table: accepted → [PROXY header] →
  sniffing → (answering | dialing → forwarding) → closed. An impossible step raises.
- While forwarding, ``data_received`` does the least possible: count, write, mark active.
  Backpressure: when one side's write buffer passes its high-water mark, the other side
  stops reading until it drains.
- Half-close is carried: EOF from one side becomes ``write_eof`` on the other; the
  connection closes when both directions are done or either side is lost.
- Parsers come from ``discoproxy.protocol`` (sans-IO); this module turns their results
  and errors into socket actions and exactly one log line per connection.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import math
import time
from typing import TYPE_CHECKING, cast

from loguru import logger

from discoproxy.protocol import http, minecraft, tls
from discoproxy.protocol.errors import NEED_DATA, Hint, ProtocolError
from discoproxy.protocol.proxy_protocol import ProxyHeader, encode_v2, parse_proxy_header
from discoproxy.protocol.sniff import Sniffed, detect_protocol

if TYPE_CHECKING:
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.routing import Route

# Bytes a client may send before it is routed: the largest of the sniffers' own caps
# (TLS ClientHello 16 KiB) plus a PROXY header and a following packet. Beyond it, the
# client is not speaking any protocol we route.
MAX_PREFIX_BYTES = 20 * 1024
# Write-buffer marks for backpressure. 256 KiB keeps a 1 Gbit/s stream full across a
# few ms of scheduling delay while bounding memory per stalled connection.
WRITE_HIGH_WATER_BYTES = 256 * 1024
WRITE_LOW_WATER_BYTES = 64 * 1024


class ConnState(enum.IntEnum):
    # IntEnum: members hash in C, which matters for the per-step transition check
    ACCEPTED = 1
    PROXY_HEADER = 2
    SNIFFING = 3
    ANSWERING = 4
    DIALING = 5
    FORWARDING = 6
    CLOSED = 7


_TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    ConnState.ACCEPTED: frozenset({ConnState.PROXY_HEADER, ConnState.SNIFFING, ConnState.CLOSED}),
    ConnState.PROXY_HEADER: frozenset({ConnState.SNIFFING, ConnState.CLOSED}),
    ConnState.SNIFFING: frozenset({ConnState.ANSWERING, ConnState.DIALING, ConnState.CLOSED}),
    ConnState.ANSWERING: frozenset({ConnState.CLOSED}),
    ConnState.DIALING: frozenset({ConnState.FORWARDING, ConnState.CLOSED}),
    ConnState.FORWARDING: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset(),
}


_PRE_ROUTING = frozenset({ConnState.PROXY_HEADER, ConnState.SNIFFING, ConnState.ANSWERING})


class IllegalTransition(RuntimeError):
    """Raised when the pipeline is asked to make a step its transition table forbids."""


def _format_addr(addr: tuple[str, int] | None) -> str:
    if addr is None:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackendProtocol(asyncio.Protocol):
    """The backend side of a forwarded connection; all decisions belong to the client side."""

    __slots__ = ("conn", "transport")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER_BYTES, WRITE_LOW_WATER_BYTES)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.bytes_down += len(data)
        conn.active = True
        conn.transport.write(data)

    def eof_received(self) -> bool:
        self.conn.backend_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.backend_lost(exc)

    def pause_writing(self) -> None:
        self.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.conn.transport.resume_reading()


class ClientConnection(asyncio.Protocol):
    """The client side: runs the pipeline, owns both transports, writes the close log line."""

    __slots__ = (
        "_backend_eof",
        "_buffer",
        "_client_eof",
        "_dial_expired",
        "_dial_task",
        "_handshake_length",
        "_kind",
        "_name",
        "_next_state",
        "_proxy_header",
        "active",
        "backend",
        "backend_addr",
        "bytes_down",
        "bytes_up",
        "client_addr",
        "ctx",
        "dial_deadline",
        "id",
        "idle_ticks",
        "reason",
        "route",
        "started",
        "state",
        "transport",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.id = 0
        self.state = ConnState.ACCEPTED
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.backend: BackendProtocol | None = None
        self.client_addr: tuple[str, int] | None = None
        self.backend_addr: tuple[str, int] | None = None
        self.route: Route | None = None
        self.reason = ""
        self.bytes_up = 0
        self.bytes_down = 0
        self.active = True
        self.idle_ticks = 0
        self.started = 0.0
        self._buffer = bytearray()
        self._client_eof = False
        self._backend_eof = False
        self._dial_task: asyncio.Task[None] | None = None
        self._dial_expired = False
        self.dial_deadline = math.inf
        self._kind: Sniffed | None = None
        self._name: str | None = None
        self._next_state = 0
        self._handshake_length = 0
        self._proxy_header: ProxyHeader | None = None

    def __repr__(self) -> str:
        route = self.route.qualified_id if self.route else "-"
        state = self.state.name.lower()
        return f"<conn #{self.id} {_format_addr(self.client_addr)} {route} {state}>"

    # -- pipeline ---------------------------------------------------------------------

    def _move(self, new: ConnState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self!r}: cannot go from {self.state.name} to {new.name}")
        self.state = new

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        self.started = time.monotonic()
        peer = transport.get_extra_info("peername")
        self.client_addr = (peer[0], peer[1]) if peer else None
        if ctx.at_capacity():
            self.reason = "max_connections reached"
            self.state = ConnState.CLOSED
            ctx.rejected += 1
            ctx.log_rejection(self.client_addr, self.reason)
            transport.abort()
            return
        self.id = ctx.register(self)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER_BYTES, WRITE_LOW_WATER_BYTES)
        ctx.handshaking.add(self)  # swept for handshake_timeout by ProxyContext
        if ctx.config.receive_proxy_protocol and ctx.is_trusted(self.client_addr):
            self._move(ConnState.PROXY_HEADER)
        else:
            self._move(ConnState.SNIFFING)

    def data_received(self, data: bytes) -> None:
        if self.state is ConnState.FORWARDING:
            self.bytes_up += len(data)
            self.active = True
            self.backend.transport.write(data)  # type: ignore[union-attr]
            return
        if self.state is ConnState.CLOSED:
            return
        self.bytes_up += len(data)
        buffer = self._buffer
        buffer += data
        try:
            self._advance()
        except ProtocolError as exc:
            self._fail(str(exc), exc.hint)
            return
        # Each sniffer caps its own message; this bounds what no sniffer claimed yet.
        if len(buffer) > MAX_PREFIX_BYTES and self.state in _PRE_ROUTING:
            self._fail(f"sent {len(buffer)} bytes without a routable handshake", Hint.CLOSE)

    def _advance(self) -> None:
        buffer = self._buffer
        if self.state is ConnState.PROXY_HEADER:
            header = parse_proxy_header(buffer)
            if header is NEED_DATA:
                return
            del buffer[: header.length]
            self._proxy_header = header
            if header.command == "PROXY" and header.source is not None:
                self.client_addr = header.source
            self._move(ConnState.SNIFFING)
            if not buffer:
                return
        if self.state is ConnState.SNIFFING:
            self._sniff()
        elif self.state is ConnState.ANSWERING:
            self._answer_status_packets()

    def _sniff(self) -> None:
        buffer = self._buffer
        kind = detect_protocol(buffer)
        if kind is NEED_DATA:
            return
        name: str | None
        if kind is Sniffed.MINECRAFT:
            handshake = minecraft.parse_handshake(buffer)
            if handshake is NEED_DATA:
                return
            name = handshake.server_address
            self._next_state = handshake.next_state
            self._handshake_length = handshake.length
        elif kind is Sniffed.TLS:
            hello = tls.parse_client_hello(buffer)
            if hello is NEED_DATA:
                return
            name = hello.server_name
        elif kind is Sniffed.HTTP:
            head = http.parse_request_head(buffer)
            if head is NEED_DATA:
                return
            name = head.host
        else:
            name = None
        self._kind = kind
        self._name = name
        route = self.ctx.registry.table.lookup_or_default(name)
        if route is None:
            self._answer_unknown(kind, name)
            return
        self.route = route
        self._move(ConnState.DIALING)
        self.ctx.handshaking.discard(self)
        self.transport.pause_reading()
        self._dial_task = self.ctx.spawn(self._dial(route))

    # -- answers when nothing routes ----------------------------------------------------

    def _reply(self, data: bytes) -> None:
        """Answer the client ourselves (no backend): counted as bytes down."""
        self.bytes_down += len(data)
        self.transport.write(data)

    def _unknown_text(self, name: str | None) -> str:
        return self.ctx.config.unknown_server_message.replace("{domain}", name or "(none)")

    def _answer_unknown(self, kind: Sniffed, name: str | None) -> None:
        text = self._unknown_text(name)
        reason = f"unknown server {name!r}" if name else "no server name and no default route"
        if kind is Sniffed.MINECRAFT:
            if self._next_state == 1:
                del self._buffer[: self._handshake_length]
                self.reason = reason
                self._move(ConnState.ANSWERING)
                self._answer_status_packets()
                return
            self._reply(minecraft.encode_login_disconnect(minecraft.text_component(text)))
        elif kind is Sniffed.MINECRAFT_LEGACY:
            self._reply(minecraft.encode_legacy_kick(text))
        elif kind is Sniffed.TLS:
            self._reply(tls.encode_alert(tls.ALERT_UNRECOGNIZED_NAME))
        elif kind is Sniffed.HTTP:
            if name:
                self._reply(http.encode_response(421, "Misdirected Request", text + "\n"))
            else:
                self._reply(http.encode_response(400, "Bad Request", "missing Host\n"))
        self._close(reason)

    def _answer_status_packets(self) -> None:
        """Status request → unknown-server status; ping → pong and close (wiki.vg SLP)."""
        buffer = self._buffer
        while True:
            packet = minecraft.parse_packet(buffer, max_bytes=64)
            if packet is NEED_DATA:
                return
            del buffer[: packet.length]
            if packet.packet_id == 0x00:
                status = minecraft.status_json(self._unknown_text(self._name))
                self._reply(minecraft.encode_status_response(status))
            elif packet.packet_id == 0x01:
                self._reply(minecraft.encode_pong(packet.payload))
                self._close(self.reason)
                return
            else:
                self._close(f"unexpected status packet 0x{packet.packet_id:02x}")
                return

    # -- dialing ------------------------------------------------------------------------

    async def _dial(self, route: Route) -> None:
        """Dial ``route``'s addresses in order; ``ProxyContext.sweep_deadlines`` enforces
        ``connect_timeout`` per address (cheaper than a timeout scope per attempt)."""
        ctx = self.ctx
        timeout = ctx.config.connect_timeout
        errors: list[str] = []
        for host, port in route.addresses:
            self.dial_deadline = time.monotonic() + timeout if timeout else math.inf
            ctx.dialing.add(self)
            try:
                _, protocol = await ctx.loop.create_connection(
                    lambda: BackendProtocol(self), host, port
                )
            except asyncio.CancelledError:
                if not self._dial_expired or self._dial_task is None:
                    raise
                self._dial_expired = False
                self._dial_task.uncancel()
                errors.append(f"{_format_addr((host, port))}: timed out after {timeout}s")
            except OSError as exc:
                errors.append(f"{_format_addr((host, port))}: {exc.strerror or exc}")
            else:
                self._start_forwarding(protocol, (host, port))
                return
            finally:
                ctx.dialing.discard(self)
            if self.state is ConnState.CLOSED:
                return
        self._backend_unreachable(route, errors)

    def dial_timed_out(self) -> None:
        """The current dial attempt passed ``connect_timeout``: abandon it, try the next."""
        if self._dial_task is not None and not self._dial_task.done():
            self._dial_expired = True
            self._dial_task.cancel()

    def _backend_unreachable(self, route: Route, errors: list[str]) -> None:
        if self.state is ConnState.CLOSED:
            return
        logger.bind(conn=self.id, route=route.qualified_id).warning(
            "conn #{} backend unreachable for {}: {}",
            self.id,
            route.qualified_id,
            "; ".join(errors),
        )
        if self._kind is Sniffed.MINECRAFT and self._next_state != 1:
            message = f"Server {route.server.name or route.server.id} is unreachable"
            self._reply(minecraft.encode_login_disconnect(minecraft.text_component(message)))
        elif self._kind is Sniffed.HTTP:
            self._reply(http.encode_response(502, "Bad Gateway", "backend unreachable\n"))
        self._close("backend unreachable")

    def _start_forwarding(self, backend: BackendProtocol, addr: tuple[str, int]) -> None:
        backend_transport = backend.transport
        assert backend_transport is not None
        if self.state is ConnState.CLOSED:
            backend_transport.close()
            return
        self.backend = backend
        self.backend_addr = addr
        self._move(ConnState.FORWARDING)
        route = self.route
        assert route is not None
        if route.send_proxy_protocol:
            backend_transport.write(self._proxy_header_for_backend())
        if self._buffer:
            backend_transport.write(bytes(self._buffer))
        self._buffer = bytearray()
        if self._client_eof:
            backend_transport.write_eof()
        else:
            self.transport.resume_reading()

    def _proxy_header_for_backend(self) -> bytes:
        """PROXY v2 with the real client: one received from upstream wins over the peer."""
        source = self.client_addr
        header = self._proxy_header
        destination = header.destination if header is not None else None
        if destination is None:
            sock = self.transport.get_extra_info("sockname")
            destination = (sock[0], sock[1])
        if source is None:
            return b""
        return encode_v2(_unmapped(source), _unmapped(destination))

    # -- half-close and teardown --------------------------------------------------------

    def pause_writing(self) -> None:
        # The client is slower than its backend: stop reading the backend until it drains.
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.pause_reading()

    def resume_writing(self) -> None:
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.resume_reading()

    def eof_received(self) -> bool:
        self._client_eof = True
        if self.state is ConnState.FORWARDING:
            backend_transport = self.backend.transport  # type: ignore[union-attr]
            if self._backend_eof:
                self._close("both sides closed")
                return True
            assert backend_transport is not None
            if backend_transport.can_write_eof():
                backend_transport.write_eof()
                return True
            self._close("client closed")
            return True
        if self.state is ConnState.DIALING:
            return True  # the prefix is replayed, then EOF is passed on
        self._close(
            "client closed before handshake"
            if self.state is not ConnState.ANSWERING
            else self.reason or "client closed"
        )
        return False

    def backend_eof(self) -> None:
        self._backend_eof = True
        if self._client_eof:
            self._close("both sides closed")
        elif self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self._close("backend closed")

    def backend_lost(self, exc: Exception | None) -> None:
        if self.state is not ConnState.CLOSED:
            self._close(f"backend reset: {exc}" if exc else "backend closed")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not ConnState.CLOSED:
            self._close(f"client reset: {exc}" if exc else "client closed")

    def handshake_timed_out(self) -> None:
        if self.state in _PRE_ROUTING:
            self._fail(
                f"no complete handshake within {self.ctx.config.handshake_timeout}s "
                f"({len(self._buffer)} bytes received)",
                Hint.CLOSE,
                reason="handshake timeout",
            )

    def _fail(self, message: str, hint: Hint, reason: str | None = None) -> None:
        logger.bind(conn=self.id, client=_format_addr(self.client_addr)).warning(
            "conn #{} from {} rejected: {}", self.id, _format_addr(self.client_addr), message
        )
        if hint is Hint.HTTP_400:
            self._reply(http.encode_response(400, "Bad Request", message + "\n"))
        elif hint is Hint.TLS_ALERT:
            self._reply(tls.encode_alert(tls.ALERT_HANDSHAKE_FAILURE))
        self._close(reason or f"protocol error: {message}")

    def close_idle(self) -> None:
        self._close("idle timeout")

    def abort(self, reason: str) -> None:
        """Hard stop (shutdown deadline): drop both sides without flushing."""
        if self.state is ConnState.CLOSED:
            return
        self._close(reason)
        self.transport.abort()
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.abort()

    def _close(self, reason: str) -> None:
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        self.reason = reason
        self.ctx.handshaking.discard(self)
        if self._dial_task is not None and not self._dial_task.done():
            self._dial_task.cancel()
        self.transport.close()
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()
        self.ctx.unregister(self)


def _unmapped(addr: tuple[str, int]) -> tuple[str, int]:
    """``::ffff:a.b.c.d`` → ``a.b.c.d`` so a dual-stack listener still sends v4 headers."""
    host = addr[0]
    if host.startswith("::ffff:"):
        mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
        if mapped is not None:
            return (str(mapped), addr[1])
    return (host.split("%", 1)[0], addr[1])
