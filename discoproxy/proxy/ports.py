"""Port routes: listeners opened and closed live as servers' ``ports`` come and go, TCP
forwarded without sniffing, and UDP sessions.

Rules for this file:
- :class:`PortListeners` follows the routing table (``RoutingTable.ports``): a port that
  appears is bound at once, one that goes is closed. Closing a listener touches no
  connection or session already open on it: they finish; new ones are refused (a UDP
  socket stays bound while it has sessions, since their replies leave through it, and
  is taken back if the route returns). A port that cannot be bound (in use,
  privileged) is logged with the reason, once, and tried again on the next table
  change; every other port still applies.
- A TCP port route dials its backend as soon as it accepts and reads nothing first, so
  protocols where the server speaks first work. Its listener does not use
  ``TCP_DEFER_ACCEPT`` (the client may never speak first).
- UDP: one session per client address. The first datagram opens a connected socket to
  the backend (registered in the reactor); replies go back through the listening socket
  to that client. Sessions end after ``udp_session_timeout`` of silence both ways. With
  ``send_proxy_protocol``, every datagram to the backend starts with a PROXY v2 header
  (transport DGRAM), as HAProxy's spec describes for datagrams. A backend host name is
  resolved on the loop, one lookup in flight per name however many clients ask; a new
  client's datagrams are dropped (and counted) while it resolves and for the name
  cache's failure hold-off after it failed (a spoofed flood must not queue lookups).
- With a wildcard ``port_routes_bind``, each datagram's local address is read
  (``IP_PKTINFO``/``IPV6_PKTINFO``) and replies leave from it: a client that sent to a
  secondary address gets its answers from that address. A backend address that refuses
  (ICMP) is passed over for new sessions for a few seconds when the route has another.
- Limits: ``udp_max_sessions`` overall; per client IP, datagrams/s and bytes/s in token
  buckets kept for at most :data:`MAX_TRACKED_IPS` addresses (least recently seen
  evicted), so a flood of source addresses cannot grow memory without bound. Every drop
  is counted by cause in :class:`UdpStats`.
- Everything here that touches sockets runs on the reactor thread, except binding and
  the table-following in :class:`PortListeners`, which runs on the asyncio loop and hands
  listeners to the reactor with ``Reactor.call``.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from select import EPOLLIN
from typing import TYPE_CHECKING

import anyio
from loguru import logger

from discoproxy.guard import Guard, Refusal, client_ip, global_refusal, routed_refusal
from discoproxy.owners import LOOP, REACTOR, owned_by
from discoproxy.proxy.access_log import AccessLog
from discoproxy.proxy.addresses import format_addr, literal_family, proxy_v2_header
from discoproxy.proxy.connection import ClientConnection
from discoproxy.proxy.listener import ACCEPT_BATCH, BaseListener
from discoproxy.proxy.names import Resolved, resolved_addresses
from discoproxy.proxy.takeover import Handed, port_name
from discoproxy.rejections import Rejection
from discoproxy.routing import PortKey, RoutingTable, format_port

if TYPE_CHECKING:
    from discoproxy.config import ProxyConfig
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.routing import Route

LISTEN_BACKLOG = 4096
# Datagrams read per wake-up of a UDP socket before other fds get their turn.
UDP_BATCH = 64
# Largest UDP payload (IPv4: 65,535 - 20 IP - 8 UDP).
MAX_DATAGRAM = 65507
# Client IPs whose rate buckets are kept; the least recently seen is evicted beyond it.
MAX_TRACKED_IPS = 65536
# How often idle UDP sessions are looked for, at most.
UDP_SWEEP_S = 1.0
# A backend address that refused (ICMP port unreachable) is passed over for new UDP
# sessions this long, when the route has another.
UDP_BACKEND_HOLD_OFF_S = 5.0
# A UDP backend's name gets this long to resolve (the datagram that asked was dropped and
# clients resend; resolv.conf's default is 5 s per try): then it counts as a failure.
UDP_RESOLVE_TIMEOUT_S = 5.0
# Linux's IP_PKTINFO (Python 3.11 does not export it): with a wildcard bind, which local
# address a datagram arrived on, so the reply leaves from that address.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO_SPACE = socket.CMSG_SPACE(20) * 2  # in6_pktinfo (20) and/or in_pktinfo (12)
_WILDCARDS = frozenset({"0.0.0.0", "::"})
# UdpLimits.allow's answers (also the drop causes) as rejection causes
_RATE_REJECTIONS = {
    "per-IP packet rate": Rejection.UDP_PACKET_RATE,
    "per-IP byte rate": Rejection.UDP_BYTE_RATE,
}


@dataclass
class UdpStats:
    """Counters for UDP: datagrams each way, and drops by cause (ended sessions are
    counted per route, in the data plane's stats)."""

    datagrams_up: int = 0
    datagrams_down: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)


@owned_by(REACTOR)
class PortListener(BaseListener):
    """A TCP listening socket of port routes: each accepted connection is dialed to the
    route the table has for this port *now* (so a route that moves applies at once)."""

    __slots__ = ("_key",)

    def __init__(self, ctx: ProxyContext, sock: socket.socket, key: PortKey) -> None:
        super().__init__(ctx, sock, format_port(key))
        self._key = key

    def on_event(self, fd: int, events: int) -> None:
        accept = self._sock._accept  # type: ignore[attr-defined]  # (fd, address), no object
        ctx = self._ctx
        label = self.label
        accepted = 0
        try:
            for _ in range(ACCEPT_BATCH):
                try:
                    conn_fd, addr = accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._accept_failed(exc, label)
                    return
                accepted += 1
                route = ctx.registry.table.ports.get(self._key)
                if route is None:  # removed a moment ago: new connections are refused
                    os.close(conn_fd)
                    ctx.stats.rejected[(label, Rejection.NO_ROUTE)] += 1
                    continue
                conn = ClientConnection(ctx, conn_fd, (addr[0], addr[1]))
                conn.listener = label
                try:  # zero-cost unless raised: a bug ends this connection, not the batch
                    conn.start_port(route, self._key)
                except Exception as exc:
                    ctx.reactor.handler_failed(conn, exc)
        finally:  # counted once per batch, not per connection
            if accepted:
                ctx.stats.accepted[label] += accepted


class _Bucket:
    __slots__ = ("bytes", "packets", "stamp")

    def __init__(self, packets: float, size: float, now: float) -> None:
        self.packets = packets
        self.bytes = size
        self.stamp = now


@owned_by(REACTOR)
class UdpLimits:
    """Per client IP token buckets (one second of burst), bounded in number."""

    def __init__(self, packets_per_s: float, bytes_per_s: float) -> None:
        self.packets_per_s = packets_per_s
        self.bytes_per_s = bytes_per_s
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self.packets_per_s or self.bytes_per_s)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str, size: int, now: float) -> str | None:
        """None if the datagram may pass, else the limit it broke."""
        buckets = self._buckets
        bucket = buckets.get(ip)
        pps, bps = self.packets_per_s, self.bytes_per_s
        if bucket is None:
            if len(buckets) >= MAX_TRACKED_IPS:
                buckets.popitem(last=False)
            bucket = buckets[ip] = _Bucket(pps, bps, now)
        else:
            buckets.move_to_end(ip)
            elapsed = now - bucket.stamp
            bucket.stamp = now
            if pps:
                bucket.packets = min(pps, bucket.packets + elapsed * pps)
            if bps:
                bucket.bytes = min(bps, bucket.bytes + elapsed * bps)
        if pps and bucket.packets < 1:
            return "per-IP packet rate"
        if bps:
            if bucket.bytes < size:
                return "per-IP byte rate"
            bucket.bytes -= size
        if pps:
            bucket.packets -= 1
        return None


@owned_by(REACTOR)
class UdpSession:
    """One client address on a UDP port route and its connected backend socket."""

    __slots__ = (
        "backend",
        "bytes_down",
        "bytes_up",
        "client",
        "entry",
        "fd",
        "header",
        "id",
        "last",
        "listener",
        "pktinfo",
        "route",
        "sock",
        "started",
    )

    def __init__(
        self,
        listener: UdpListener,
        client: tuple[str, int],
        route: Route,
        sock: socket.socket,
        backend: tuple[str, int],
        header: bytes,
        pktinfo: list[tuple[int, int, bytes]],
        entry: tuple[str, int],
    ) -> None:
        self.listener = listener
        self.id = listener.ctx.new_id()  # shared with TCP connections: unique in the API
        self.client = client
        self.route = route
        self.sock = sock
        self.fd = sock.fileno()
        self.backend = backend
        self.header = header
        # with a wildcard bind: the address the client sent to, for the replies' source
        self.pktinfo = pktinfo
        self.started = self.last = time.monotonic()
        self.bytes_up = self.bytes_down = 0
        self.entry = entry  # the route's address it came from (before name resolution)

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(self.header + data if self.header else data)
        except BlockingIOError:
            self.listener.stats.drops["backend socket full"] += 1
            return
        except OSError as exc:  # ICMP port unreachable from an earlier datagram
            self.listener.backend_failed(self, exc)
            return
        self.bytes_up += len(data)
        self.last = time.monotonic()
        self.listener.stats.datagrams_up += 1

    def on_event(self, fd: int, events: int) -> None:
        """The backend answered: send its datagrams back to the client."""
        listener = self.listener
        recv = self.sock.recv
        sock = listener.sock
        client = self.client
        stats = listener.stats
        pktinfo = self.pktinfo
        for _ in range(UDP_BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as exc:
                listener.backend_failed(self, exc)
                return
            try:
                if pktinfo:
                    sock.sendmsg((data,), pktinfo, 0, client)
                else:
                    sock.sendto(data, client)
            except BlockingIOError:
                stats.drops["client socket full"] += 1
                continue
            except OSError:
                stats.drops["client unreachable"] += 1
                continue
            self.bytes_down += len(data)
            stats.datagrams_down += 1
        self.last = time.monotonic()

    def on_internal_error(self, exc: Exception) -> None:
        self.listener.end(self, f"internal error: {exc!r}")


@owned_by(REACTOR)
class UdpListener:
    """A UDP port route's listening socket and its sessions, by client address."""

    def __init__(
        self,
        ctx: ProxyContext,
        sock: socket.socket,
        key: PortKey,
        rebind: Callable[[], socket.socket],
    ) -> None:
        self.ctx = ctx
        self.sock = sock
        self.key = key
        self.label = format_port(key)  # in metrics and logs: "19132/udp"
        self.rebind = rebind
        self.address = sock.getsockname()
        self.sessions: dict[tuple[str, int], UdpSession] = {}
        self.stats = ctx.udp_stats
        self.wildcard = self.address[0] in _WILDCARDS
        self._held_off: dict[tuple[str, int], float] = {}  # backend → until
        self.retired = False  # its route is gone: no new sessions, shut when none is left
        self._access: AccessLog | None = None  # its close lines' (made at the first)

    def on_event(self, fd: int, events: int) -> None:
        ctx = self.ctx
        recvfrom = self.sock.recvfrom
        recvmsg = self.sock.recvmsg
        wildcard = self.wildcard
        sessions = self.sessions
        limits = ctx.udp_limits
        stats = self.stats
        now = time.monotonic()
        ancillary: list[tuple[int, int, bytes]] = []
        for _ in range(UDP_BATCH):
            try:
                if wildcard:
                    data, ancillary, _, addr = recvmsg(MAX_DATAGRAM, _PKTINFO_SPACE)
                else:
                    data, addr = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error queued on the socket: nothing to do
            client = (addr[0], addr[1])
            if limits.enabled:
                broken = limits.allow(client[0], len(data), now)
                if broken is not None:
                    stats.drops[broken] += 1
                    ctx.log_rejection(
                        client,
                        f"UDP {self.label}: {broken} exceeded",
                        _RATE_REJECTIONS[broken],
                        self.label,
                    )
                    continue
            session = sessions.get(client)
            if session is None:
                session = self._open(client, ancillary)
                if session is None:
                    continue
            session.send(data)

    def _open(
        self, client: tuple[str, int], ancillary: list[tuple[int, int, bytes]]
    ) -> UdpSession | None:
        ctx = self.ctx
        stats = self.stats
        route = ctx.registry.table.ports.get(self.key)
        if self.retired or route is None or not route.addresses:
            stats.drops["no route"] += 1
            return None
        guard = ctx.guard
        if not guard.idle or route.ip_filter is not None:
            refusal = udp_refusal(guard, client, route)
            if refusal is not None:
                stats.drops[refusal.cause] += 1
                why = f"UDP {self.label}: {refusal.reason}"
                ctx.log_rejection(client, why, refusal.cause, self.label)
                return None
        limit = ctx.config.udp_max_sessions
        if limit and ctx.udp_sessions >= limit:
            cause = Rejection.UDP_MAX_SESSIONS
            stats.drops[cause] += 1
            ctx.log_rejection(client, cause, cause, self.label)
            return None
        host, port = entry = self._pick(route, client[0])
        family = literal_family(host)
        if family is None:
            names = ctx.names
            cached = names.get(host, port)
            if cached is None:
                # resolved off the reactor, once however many datagrams ask meanwhile;
                # this one is dropped (clients resend)
                stats.drops["resolving backend"] += 1
                if names.start_resolving(host, port):
                    ctx.spawn(self, _resolve(ctx, host, port))
                return None
            if not cached.addresses:  # failed moments ago: not again before its hold-off
                stats.drops["backend name unresolved"] += 1
                return None
            family, host, port, _ = cached.addresses[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _buffers(sock, ctx.config.recv_buffer_size, ctx.config.send_buffer_size)
            sock.connect((host, port))
        except OSError as exc:
            sock.close()
            stats.drops[Rejection.BACKEND_CONNECT_FAILED] += 1
            ctx.log_rejection(
                client,
                f"UDP backend {format_addr((host, port))}: {exc}",
                Rejection.BACKEND_CONNECT_FAILED,
                self.label,
            )
            return None
        pktinfo, local_ip = _reply_source(ancillary)
        header = b""
        if route.send_proxy_protocol:
            local = (local_ip or self.address[0], self.address[1])
            header = proxy_v2_header((client, local), transport="udp")
        session = UdpSession(self, client, route, sock, (host, port), header, pktinfo, entry)
        ctx.pools.get(route).dialing(entry)  # open sessions count for least_connections
        self.sessions[client] = session
        ctx.udp_sessions += 1
        ctx.reactor.register(session.fd, session, EPOLLIN)
        return session

    def _pick(self, route: Route, client_ip: str) -> tuple[str, int]:
        """The pool's choice (``balance``), passing over addresses held off after a
        refusal (all held off: the pool's first)."""
        now = time.monotonic()
        order = self.ctx.pools.get(route).order(client_ip, now) or list(route.addresses)
        held = self._held_off
        if held:
            for address in order:
                if held.get(address, 0.0) <= now:
                    return address
        return order[0]

    def backend_failed(self, session: UdpSession, exc: OSError) -> None:
        """The backend refused (ICMP): end the session; new ones try the next address."""
        if len(session.route.addresses) > 1:
            now = time.monotonic()
            held = self._held_off  # past hold-offs go: backends come and go with containers
            for address in [a for a, until in held.items() if until <= now]:
                del held[address]
            held[session.entry] = now + UDP_BACKEND_HOLD_OFF_S
        self.end(session, f"backend error: {exc.strerror or exc}")

    def end(self, session: UdpSession, reason: str) -> None:
        if self.sessions.pop(session.client, None) is None:
            return
        ctx = self.ctx
        ctx.udp_sessions -= 1
        pool = ctx.pools.get(session.route)
        pool.done(session.entry)
        if pool.sticky_ttl:  # the client is remembered from when its session ended
            pool.left(session.entry, session.client[0], time.monotonic())
        route_stats = ctx.stats.route(session.route.qualified_id)
        route_stats.udp_sessions += 1
        route_stats.udp_bytes_up += session.bytes_up
        route_stats.udp_bytes_down += session.bytes_down
        ctx.reactor.forget(session.fd)
        session.sock.close()
        if ctx.logs_info:  # the TCP close line's fields and shape (json: bound), worker=N
            access = self._access
            if access is None:  # log_format and the worker are the process's for good
                access = self._access = AccessLog(ctx.config.log_format, worker=ctx.worker)
            access.session_closed(session, self.label, reason)

    def sweep(self, now: float) -> None:
        timeout = self.ctx.config.udp_session_timeout
        for session in [s for s in self.sessions.values() if now - s.last >= timeout]:
            self.end(session, "idle timeout")
        if self.retired and not self.sessions:
            self._shut()

    def on_internal_error(self, exc: Exception) -> None:
        pass  # logged by the reactor; the listener carries on

    def start(self) -> None:
        self.ctx.reactor.register(self.sock.fileno(), self, EPOLLIN)
        self.ctx.udp_listeners.add(self)

    def retire(self) -> None:
        """Its route is gone: take no new client; shut once the sessions have ended."""
        self.retired = True
        if not self.sessions:
            self._shut()

    def revive(self) -> None:
        """Its route is back: serve again (bind again if it was shut meanwhile)."""
        self.retired = False
        if self.sock.fileno() >= 0:
            return
        try:
            self.sock = self.rebind()
        except OSError as exc:
            logger.error("cannot listen on {} again: {}", format_port(self.key), exc)
            return
        self.start()

    def _shut(self) -> None:
        self.ctx.udp_listeners.discard(self)
        if self.sock.fileno() >= 0:
            self.ctx.reactor.unregister(self.sock.fileno())
        self.sock.close()

    def close(self) -> None:
        """Shutdown: end every session and close the socket."""
        for session in list(self.sessions.values()):
            self.end(session, "shutdown")
        self._shut()


def udp_refusal(guard: Guard, client: tuple[str, int], route: Route) -> Refusal | None:
    """A new UDP client: guard.py's precedence without the TCP-only steps (the datagram
    rate is limited per IP separately, by UdpLimits)."""
    ip = client_ip(client[0])
    if ip is None:
        return None
    return global_refusal(guard, ip) or routed_refusal(
        guard, ip, route.ip_filter, route.qualified_id, None
    )


def _reply_source(
    ancillary: list[tuple[int, int, bytes]],
) -> tuple[list[tuple[int, int, bytes]], str | None]:
    """From a datagram's IP_PKTINFO / IPV6_PKTINFO: the control message that makes a
    reply leave from the address it arrived on, and that address."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # in_pktinfo: ifindex, spec_dst, addr; send back with spec_dst = addr
            reply = bytes(4) + data[8:12] + bytes(4)
            return [(level, kind, reply)], socket.inet_ntop(socket.AF_INET, data[8:12])
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            return [(level, kind, data[:20])], socket.inet_ntop(socket.AF_INET6, data[:16])
    return [], None


async def _resolve(ctx: ProxyContext, host: str, port: int) -> None:
    """Resolve on the asyncio loop; the name cache belongs to the reactor thread, so the
    answer is put there through ``Reactor.call`` (as connections do). Whatever happens
    (even cancellation), an answer is put: it ends the resolution in flight."""
    resolved: tuple[Resolved, ...] = ()
    error = f"{format_addr((host, port))}: not resolved"
    try:
        with anyio.fail_after(UDP_RESOLVE_TIMEOUT_S):
            infos = await ctx.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        resolved = resolved_addresses(infos, host, port)
        error = ""
    except TimeoutError:
        error = f"{format_addr((host, port))}: no answer within {UDP_RESOLVE_TIMEOUT_S}s"
        logger.warning("UDP backend {}; datagrams to it are dropped for now", error)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
        error = f"{format_addr((host, port))}: {getattr(exc, 'strerror', None) or exc}"
        logger.warning("UDP backend {}; datagrams to it are dropped for now", error)
    finally:
        ctx.reactor.call(lambda: ctx.names.put(host, port, resolved, error))


def _buffers(sock: socket.socket, receive: int, send: int) -> None:
    if receive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive)
    if send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send)


def port_socket(config: ProxyConfig, key: PortKey) -> socket.socket:
    """A port route's socket, options set, not bound yet."""
    protocol, _ = key
    host = config.port_routes_bind
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if protocol == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            _buffers(sock, config.recv_buffer_size, config.send_buffer_size)
            if host in _WILDCARDS:  # learn each datagram's local address (replies)
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    except OSError:
        sock.close()
        raise
    return sock


_TCP_LISTEN = "0A"  # a /proc/net/tcp state
# A port another process holds is tried again at the first table change this long
# after (not at every one: its check reads /proc, which grows with the connections open).
PORT_RETRY_S = 5.0
HELD = "held by another process"


def claim_port(config: ProxyConfig, key: PortKey, ours: Iterable[int]) -> None:
    """Refuse (EADDRINUSE) a port route's port that another process holds, before our
    socket binds it: a UDP socket (SO_REUSEADDR) and a worker group's (SO_REUSEPORT)
    would bind beside another discoproxy's and silently share its traffic, as a plain
    bind never does. A probe binds without either; when the port is taken, the sockets
    on it are looked up (``/proc/net``) and only those of processes ``ours`` (this one,
    its workers: a retired UDP listener with sessions, a worker's copy not closed yet)
    are let be."""
    host = config.port_routes_bind
    probe = port_socket(config, key)
    try:
        if key[0] == "udp":  # (TCP keeps it: only a listening socket then conflicts)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        probe.bind((host, key[1]))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        if _foreign_sockets(key, ours):
            raise OSError(errno.EADDRINUSE, HELD) from None
    finally:
        probe.close()


def _foreign_sockets(key: PortKey, ours: Iterable[int]) -> set[int]:
    """Inodes of the sockets bound to ``key``'s port (TCP: listening) that none of the
    processes ``ours`` holds (their fds, ``/proc/PID/fd``)."""
    protocol, port = key
    inodes: set[int] = set()
    for name in (protocol, protocol + "6"):
        try:
            with open(f"/proc/net/{name}") as table:
                lines = table.readlines()[1:]  # after the header
        except OSError:
            continue  # no IPv6
        for line in lines:
            fields = line.split()
            try:
                if int(fields[1].rpartition(":")[2], 16) != port:
                    continue
                if protocol == "tcp" and fields[3] != _TCP_LISTEN:
                    continue
                inodes.add(int(fields[9]))
            except (IndexError, ValueError):
                continue  # a line of another shape: judged on the others
    for pid in ours:
        if not inodes:
            break
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            return set()  # one of ours we cannot read (not dumpable): cannot tell, let be
        except OSError:
            continue  # it ended
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.discard(int(link[8:-1]))
    return inodes


def note_port_failure(
    failed: dict[PortKey, tuple[str, float]],
    key: PortKey,
    table: RoutingTable,
    exc: OSError,
    now: float,
) -> None:
    """A port route's port could not be bound: logged once per reason, and kept in
    ``failed`` with when to try again (a port another process holds after PORT_RETRY_S,
    its check reads /proc; any other failure at the next table change). The one process's
    listeners and the workers' control plane both keep their failures so."""
    why = exc.strerror or str(exc)
    if exc.errno == errno.EACCES:
        why += " (ports below 1024 need CAP_NET_BIND_SERVICE)"
    if failed.get(key, ("", 0.0))[0] != why:
        logger.error(
            "cannot listen on {} for {}: {}; the other routes still apply",
            format_port(key),
            table.ports[key].qualified_id,
            why,
        )
    failed[key] = (why, now + PORT_RETRY_S if why == HELD else now)


@owned_by(LOOP)
class PortListeners:
    """Keeps one listener per (protocol, port) of the routing table; asyncio side."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.open: dict[PortKey, PortListener | UdpListener] = {}
        self._retired: dict[PortKey, UdpListener] = {}  # may still carry sessions
        # port → why it could not be bound (logged), and when it may be tried again
        self._failed: dict[PortKey, tuple[str, float]] = {}
        # a worker's: sockets the control plane opened, taken by the next sync
        self.inherited: dict[PortKey, socket.socket] | None = None

    def sync(self, table: RoutingTable) -> None:
        """Open the ports ``table`` claims and close the others."""
        if self.ctx.closing or not self.ctx.reactor.alive:
            return
        wanted = set(table.ports)
        for key in sorted(set(self.open) - wanted):
            leaving = self.open.pop(key)
            if isinstance(leaving, UdpListener):
                self._retired[key] = leaving
                self.ctx.reactor.call(leaving.retire)
            else:
                self.ctx.reactor.call(leaving.close)
            logger.info("port {} closed: no route claims it", format_port(key))
        now = time.monotonic()
        for key in sorted(wanted - set(self.open)):
            if self._failed.get(key, ("", 0.0))[1] > now:
                continue  # failed a moment ago: retried at a later change (PORT_RETRY_S)
            retired = self._retired.pop(key, None)
            if retired is not None and self.inherited is not None:
                if key not in self.inherited:  # the control plane could not open it
                    self._retired[key] = retired  # its sessions still end as they would
                    continue
                # a worker's port came back with a new socket from the control plane:
                # the retired one's sessions end (its group is not the one steered now)
                self.ctx.reactor.call(retired.close)
                retired = None
            if self.inherited is not None and key not in self.inherited:
                continue  # the control plane could not open it and logged why
            try:
                if retired is not None:
                    # its socket may have been shut meanwhile and the port taken: a
                    # revive binds again (with SO_REUSEADDR, beside the taker)
                    claim_port(self.ctx.config, key, (os.getpid(),))
                    listener: PortListener | UdpListener = retired
                else:
                    listener = self._bind(key)
            except OSError as exc:
                if retired is not None:
                    self._retired[key] = retired
                note_port_failure(self._failed, key, table, exc, now)
                continue
            self._failed.pop(key, None)
            self.open[key] = listener
            if retired is not None:
                self.ctx.reactor.call(retired.revive)
            else:
                self.ctx.reactor.call(listener.start)
            logger.info("port {} open for {}", format_port(key), table.ports[key].qualified_id)
        for key in set(self._failed) - wanted:
            del self._failed[key]

    def _bind(self, key: PortKey) -> PortListener | UdpListener:
        sock = self._socket(key)
        if key[0] == "tcp":
            return PortListener(self.ctx, sock, key)
        return UdpListener(self.ctx, sock, key, lambda: self._socket(key, again=True))

    def inherit(self, key: PortKey, sock: socket.socket) -> None:
        """A worker: the control plane opened ``key``'s socket for it (before the table
        that claims it). A retired UDP listener of the same port is replaced."""
        assert self.inherited is not None
        sock.setblocking(False)
        stale = self.inherited.pop(key, None)
        if stale is not None:
            stale.close()
        self.inherited[key] = sock

    def handover(self) -> Iterator[tuple[Handed, PortListener | UdpListener]]:
        """Every port route's listener, for a takeover (its socket is the reactor's to
        read: a UDP listener's may be closed and reopened there)."""
        for key, listener in self.open.items():
            yield Handed("port", port_name(key, str(listener.address[0])), 0, 0), listener

    def _socket(self, key: PortKey, again: bool = False) -> socket.socket:
        """``key``'s socket: inherited from a takeover or a control plane, else new; a
        UDP listener's rebind (``again``, on the reactor) is always a new one."""
        taken = self.ctx.inherited
        if taken is not None and not again:
            handed = taken.take_one("port", port_name(key, self.ctx.config.port_routes_bind))
            if handed is not None:
                return handed
        if self.inherited is not None:
            sock = self.inherited.pop(key, None)
            if sock is None:  # the control plane could not bind it, and said so
                raise OSError(errno.EADDRNOTAVAIL, "not opened by the control plane")
            return sock
        if key[0] == "udp" and not again:  # a TCP bind is exclusive by itself
            claim_port(self.ctx.config, key, (os.getpid(),))
        sock = port_socket(self.ctx.config, key)
        try:
            sock.bind((self.ctx.config.port_routes_bind, key[1]))
            if key[0] == "tcp":
                sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def close_all(self) -> None:
        for key in sorted(self.open):
            self.ctx.reactor.call(self.open.pop(key).close)
        for key in sorted(self._retired):
            self.ctx.reactor.call(self._retired.pop(key).close)


def sweep_udp(ctx: ProxyContext) -> None:
    """Reactor thread: end idle UDP sessions, shut retired sockets left without any."""
    now = time.monotonic()
    for listener in list(ctx.udp_listeners):
        listener.sweep(now)
