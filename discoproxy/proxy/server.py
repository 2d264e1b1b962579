"""Listeners, connection bookkeeping and graceful shutdown, structured with anyio.

Rules for this file:
- ``run_proxy`` reports the addresses it bound through ``TaskGroup.start``, so tests bind
  port 0. Cancelling it stops accepting at once; open connections then get
  ``shutdown_timeout`` to finish before they are aborted.
- The listeners of ``bind`` live in :class:`BindListeners`; a reloaded config
  (:func:`reconfigure`, on SIGHUP) opens and closes them like port routes, and every
  other setting applies to new connections. Open connections are never touched.
- Listening sockets and connections live in one :class:`Reactor` (an epoll set served by
  its own thread); a listener accepts in batches and hands each fd to a
  :class:`ClientConnection`. An accept error (out of fds) rests the listener for
  ``ACCEPT_BACKOFF_S`` instead of spinning on a socket that stays readable. Code on the
  asyncio side reaches connections only through ``Reactor.call``/``Reactor.run``.
- The only tasks a connection starts resolve backend host names not in the name cache
  (IP literals are dialed in place), fetch a status a ping needs (cache misses) or wake
  a stopped server; they run on the asyncio loop, are owned by :class:`ProxyContext`,
  and are cancelled at shutdown. Nothing is fire-and-forget.
- Reactor timers sweep ``handshake_timeout``, ``connect_timeout`` and ``idle_timeout``
  for all connections at a fixed tick, instead of one timer per connection.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import itertools
import math
import socket
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from discoproxy.config import ProxyConfig, parse_bind
from discoproxy.guard import Ban, BanList, Guard, client_ip, load_bans
from discoproxy.health import HealthChecker
from discoproxy.owners import LOOP, any_thread, on_loop, on_reactor, owned_by
from discoproxy.proxy.access_log import AccessLog
from discoproxy.proxy.addresses import format_addr
from discoproxy.proxy.balance import Pools
from discoproxy.proxy.connection import ClientConnection, ConnState, HandedClient
from discoproxy.proxy.listener import ACCEPT_BATCH, BaseListener, ListenError
from discoproxy.proxy.names import NameCache
from discoproxy.proxy.planes import (
    WATCHDOG_INTERVAL_S,
    WATCHDOG_LATE_S,
    EventOutbox,
    LoopTasks,
    TaskHandle,
    TaskOwner,
)
from discoproxy.proxy.player_counts import PlayerCounts
from discoproxy.proxy.ports import (
    UDP_SWEEP_S,
    PortListeners,
    UdpLimits,
    UdpListener,
    UdpStats,
    sweep_udp,
)
from discoproxy.proxy.reactor import Reactor
from discoproxy.proxy.stats import DataPlaneStats, Snapshot, take_snapshot, take_totals
from discoproxy.proxy.takeover import Handed, Inherited
from discoproxy.proxy.tls_termination import CertStore
from discoproxy.rejections import Rejection
from discoproxy.routing import Registry, RoutingTable, missing_fallbacks
from discoproxy.status import StatusService
from discoproxy.wake import ServerControl, Waker
from discoproxy.webhooks import Webhooks

if TYPE_CHECKING:
    from discoproxy.proxy.workers import WorkerSet

# A burst of connections must not be refused by the kernel while the loop is busy;
# 4096 matches common somaxconn defaults on current kernels.
LISTEN_BACKLOG = 4096
# TCP_DEFER_ACCEPT: the kernel hands over a connection once its first bytes arrived, or
# after about this many seconds of silence (then handshake_timeout applies).
DEFER_ACCEPT_S = 1
TERMINATING = ConnState.TERMINATING
# Rejections (e.g. max_connections) are logged at most this often, so a flood does not
# become a log flood; the count in between is reported with the next line.
REJECTION_LOG_INTERVAL_S = 5.0
# After the shutdown deadline's aborts, how long the cancelled TLS relays (on the loop)
# get to report back, so their close lines are written: they end within a loop turn.
RELAYS_REPORT_S = 2.0
# How often clients whose stickiness (sticky_ttl) ran out are forgotten.
STICKY_SWEEP_S = 10.0
# The bans file is re-read this long after its directory went quiet (a burst of writes
# is one reload, at most DEBOUNCE later).
BANS_WATCH_STEP_MS = 50
BANS_WATCH_DEBOUNCE_MS = 400
BANS_WATCH_TIMEOUT_MS = 500
# The bans file is also stat'ed this often (shared between instances: see _poll_bans).
BANS_POLL_S = 0.5


class DataPlanes(Protocol):
    """What the control plane asks of the data plane(s): the one reactor of this process
    (:class:`LocalPlanes`), or every worker of ``workers = N`` (``workers.WorkerSet``)."""

    @property
    def alive(self) -> bool:
        """Serving, or about to again (``/healthz``)."""

    @property
    def ready(self) -> bool:
        """Every data plane serving now (``/readyz``)."""

    async def snapshot(self, connections: int = 0) -> Snapshot: ...

    async def totals(self) -> dict[str, int]: ...

    async def apply_bans(self, bans: BanList) -> int: ...

    def post_bans(self, bans: BanList) -> None: ...

    async def kick(self, target: str) -> int: ...

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        """``fn(ctx, *args)`` on each data plane's reactor, each with its own context."""


@owned_by(LOOP)
class LocalPlanes:
    """This process's own reactor, through ``Reactor.call`` / ``Reactor.run``."""

    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx

    @property
    def alive(self) -> bool:
        ctx = self._ctx
        return ctx.reactor is not None and ctx.reactor.alive and not ctx.stalled

    @property
    def ready(self) -> bool:
        return self.alive

    async def snapshot(self, connections: int = 0) -> Snapshot:
        ctx = self._ctx
        snap = await ctx.reactor.run(lambda: take_snapshot(ctx, connections))
        status = ctx.status  # the loop's own counts, added here on the loop
        snap.status = (snap.status[0] + status.hits, status.misses, status.stale)
        return snap

    async def totals(self) -> dict[str, int]:
        ctx = self._ctx
        return await ctx.reactor.run(lambda: take_totals(ctx))

    async def apply_bans(self, bans: BanList) -> int:
        ctx = self._ctx
        return await ctx.reactor.run(lambda: ctx.apply_bans(bans))

    def post_bans(self, bans: BanList) -> None:
        ctx = self._ctx
        ctx.reactor.call(lambda: ctx.apply_bans(bans))

    async def kick(self, target: str) -> int:
        ctx = self._ctx
        return await ctx.reactor.run(lambda: ctx.kick(target))

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        ctx = self._ctx
        ctx.reactor.call(lambda: fn(ctx, *args))


class ProxyContext:
    """What every connection shares: config, the registry, and the set of live connections."""

    def __init__(
        self,
        config: ProxyConfig,
        registry: Registry,
        controls: Mapping[str, ServerControl] | None = None,
        worker: int | None = None,
    ) -> None:
        self.config = config
        # this data plane's index when it is one of workers = N (None: the only one)
        self.worker = worker
        self.workers: WorkerSet | None = None  # the control plane's, when workers > 1
        # a worker's (workers > 1): the worker the kernel steers a client address to, and
        # how a connection whose PROXY header names another worker's client goes there
        self.steer: Callable[[str], int] | None = None
        self.hand_off: Callable[[int, HandedClient, int], Coroutine[Any, Any, None]] | None = None
        self.planes: DataPlanes = LocalPlanes(self)
        self.registry = registry
        self.events = EventOutbox()  # for the webhooks: put on any thread, drained on the loop
        self.webhooks: Webhooks | None = None  # the loop's, when [[webhooks]] are set
        self.waker = Waker(registry, controls or {})
        self.waker.events = self.events
        self.status = StatusService(config, self.waker)
        self.waker.backend_players = self.status.online_players
        self.ports = PortListeners(self)
        self.certs = CertStore()
        # a takeover's sockets from the old process, used by the listeners as they open
        self.inherited: Inherited | None = None
        self.admin_sockets: list[socket.socket] = []  # the admin listener's, if any
        # UDP port routes (reactor thread)
        self.udp_listeners: set[UdpListener] = set()
        self.udp_sessions = 0
        self.udp_stats = UdpStats()
        self.udp_limits = UdpLimits(config.udp_per_ip_packets_per_s, config.udp_per_ip_bytes_per_s)
        self.connections: set[ClientConnection] = set()
        # connections still owing their PROXY header / handshake, for sweep_handshakes
        self.handshaking: set[ClientConnection] = set()
        self.dialing: set[ClientConnection] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by run_proxy
        self.reactor: Reactor = None  # type: ignore[assignment]  # set by run_proxy
        self.closing = False
        self.stalled = False  # one process: the reactor answered no liveness check (loop's)
        self.ids = itertools.count(1)
        self.tasks = LoopTasks()  # what the data plane asks the loop to run
        self._rejections_unlogged: collections.Counter[Rejection] = collections.Counter()
        self._last_rejection_log: dict[Rejection, float] = {}  # a fixed set of causes
        self.guard = Guard(config)
        self._on_drained: Callable[[], object] | None = None
        self._idle_limit = 0
        self._stop_sweeps: list[Callable[[], None]] = []
        self.names = NameCache()
        self.stats = DataPlaneStats()  # reactor thread; read through metrics.take_snapshot
        self.pools = Pools()  # reactor thread: each route's balancing and backend health
        # workers = N: every worker's players per capped route (reactor thread; None alone)
        self.shared_players: PlayerCounts | None = None
        self.health = HealthChecker(self)  # loop: active checks, verdicts to the pools
        self.binds = BindListeners(self)
        self._fallbacks_missing: dict[str, str] = {}  # note_fallbacks' last warnings
        self._derive(config)

    def _derive(self, config: ProxyConfig) -> None:
        """What the hot path reads precomputed from the config."""
        self._trusted = tuple(config.trusted_proxies)
        # 0.0.0.0/0 and ::/0 together trust everyone: skip the per-connection check
        self._trust_all = {net.version for net in self._trusted if net.prefixlen == 0} == {4, 6}
        self.max_connections = config.max_connections or math.inf
        logs_info = logger.level(config.log_level).no <= logger.level("INFO").no
        self.logs_info = logs_info
        self._access = AccessLog(config.log_format, worker=self.worker) if logs_info else None

    @on_loop
    def note_fallbacks(self, table: RoutingTable) -> None:
        """A registry listener: warn when a listener's catch-all names a server the table
        lacks (once, until it is back), and when it is back."""
        missing = missing_fallbacks(self.config.fallbacks, table)
        for bind, line in missing.items():
            if bind not in self._fallbacks_missing:
                logger.warning(line)
        for bind in self._fallbacks_missing.keys() - missing.keys():
            logger.info("fallbacks: {!r}'s catch-all is served again", bind)
        self._fallbacks_missing = missing

    @on_reactor
    def apply_config(
        self, config: ProxyConfig, listeners: Sequence[tuple[Listener, str]] = ()
    ) -> None:
        """A reloaded config (reactor thread): new connections, dials and sweeps follow
        it; open connections keep going. ``listeners``: those of ``bind`` with the entry
        each is now written as (the loop's bookkeeping), which picks its fallback."""
        previous = self.config
        self.config = config
        self._derive(config)
        self.guard.configure(config)
        if (config.udp_per_ip_packets_per_s, config.udp_per_ip_bytes_per_s) != (
            previous.udp_per_ip_packets_per_s,
            previous.udp_per_ip_bytes_per_s,
        ):
            self.udp_limits = UdpLimits(
                config.udp_per_ip_packets_per_s, config.udp_per_ip_bytes_per_s
            )
        for listener, bind in listeners:
            listener.fallback = config.fallbacks.get(bind)
        self.start_sweeps()

    # -- connections --------------------------------------------------------------------

    @property
    @any_thread
    def speaks_for_all(self) -> bool:
        """Whether this data plane logs and reports what every one of them hears alike
        (a health verdict): the only one, or worker 0 of several."""
        return not self.worker

    def number_ids(self, first: int, step: int) -> None:
        """Connection ids from ``first`` in steps of ``step`` (workers: unique over all)."""
        self.ids = itertools.count(first, step)

    @on_reactor
    def new_id(self) -> int:
        """The next connection id (a UDP session takes one too)."""
        return next(self.ids)

    @on_reactor
    def apply_bans(self, bans: BanList) -> int:
        """Swap in *bans* and end the open connections and UDP sessions they match (by
        the client's real address, or a login's username) at once: how many it ended."""
        self.guard.set_bans(bans)
        if not len(bans):
            return 0
        now = time.time()
        ended = 0

        def address_ban(addr: tuple[str, int] | None) -> Ban | None:
            ip = client_ip(addr[0]) if addr is not None else None
            return bans.ip_ban(ip, now) if ip is not None else None

        for conn in list(self.connections):
            ban = address_ban(conn.client_addr)
            if ban is None and conn.player is not None:
                ban = bans.user_ban(conn.player, now)
            if ban is not None and conn.state is not ConnState.CLOSED:
                conn.close(f"banned ({ban.target}) while connected")
                ended += 1
        for listener in self.udp_listeners:
            for session in list(listener.sessions.values()):
                ban = address_ban(session.client)
                if ban is not None:
                    listener.end(session, f"banned ({ban.target}) while connected")
                    ended += 1
        if ended:
            logger.info("bans: ended {} open connections they match", ended)
        return ended

    @on_reactor
    def kick(self, target: str) -> int:
        """End the open connections of player *target* (any case), or the one whose id it
        is: how many it ended."""
        by_id = int(target) if target.isdigit() else None
        name = target.lower()
        matched = [
            c
            for c in self.connections
            if c.id == by_id or (c.player is not None and c.player.lower() == name)
        ]
        for conn in matched:
            conn.close("kicked through the admin API")
        ended = len(matched)
        for listener in self.udp_listeners if by_id is not None else ():
            session = next((s for s in listener.sessions.values() if s.id == by_id), None)
            if session is not None:
                listener.end(session, "kicked through the admin API")
                ended += 1
        return ended

    @on_reactor
    def handed_off(self, conn: ClientConnection) -> None:
        """``conn`` went to another worker (``ClientConnection._hand_off``): it leaves
        this data plane's sets without being counted or logged closed, which the other
        worker does once it takes it; one it never takes comes back to be ended here
        (``ClientConnection._hand_off_failed``)."""
        self.connections.discard(conn)
        if self._on_drained is not None and not self.connections:
            self._on_drained()
            self._on_drained = None

    @on_reactor
    def unregister(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.stats.closed(conn, time.monotonic())
        if self._on_drained is not None and not self.connections:
            self._on_drained()
            self._on_drained = None
        if self._access is not None:
            self._access.closed(conn)

    @on_reactor
    def is_trusted(self, addr: tuple[str, int] | None) -> bool:
        if self._trust_all:
            return True
        if addr is None:
            return False
        ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._trusted)

    @on_reactor
    def log_rejection(
        self,
        client: tuple[str, int] | None,
        reason: str,
        cause: Rejection,
        listener: str = "",
    ) -> None:
        """Count a rejection by ``cause`` (and by listener, for /metrics) and log
        ``reason``, at most once per ``REJECTION_LOG_INTERVAL_S`` per cause (a flood must
        not become a log flood)."""
        self.stats.rejected[(listener, cause)] += 1
        now = time.monotonic()
        last = self._last_rejection_log.get(cause, -math.inf)
        if now - last < REJECTION_LOG_INTERVAL_S:
            self._rejections_unlogged[cause] += 1
            return
        suppressed = self._rejections_unlogged.pop(cause, 0)
        self._last_rejection_log[cause] = now
        more = f" ({suppressed} more like it since the last report)" if suppressed else ""
        logger.warning("rejected {}: {}{}", format_addr(client), reason, more)

    @on_loop
    def prune_stats(self, table: RoutingTable) -> None:
        """The table changed: drop the counters of routes gone from it (once unused), so
        container churn does not grow /metrics forever; the waker's player times too."""

        def prune() -> None:
            used = [c.route for c in self.connections if c.route is not None]
            for listener in self.udp_listeners:
                used.extend(s.route for s in listener.sessions.values())
            live = {route.qualified_id for route in used}
            self.stats.prune(table, live)
            in_table = [*table.by_id.values(), *table.ports.values()]
            self.pools.prune({(r.qualified_id, r.addresses) for r in [*in_table, *used]})
            self.waker.forget_gone(table.by_id)

        self.reactor.call(prune)

    # -- tasks (called from the reactor thread; the coroutines run on the asyncio loop) --

    @on_reactor
    def spawn(self, owner: TaskOwner, coro: Coroutine[Any, Any, None]) -> TaskHandle:
        """Run ``coro`` in the control plane's task group (see ``proxy/planes.py``)."""
        return self.tasks.spawn(owner, coro)

    # -- shutdown (asyncio side) --------------------------------------------------------

    @on_loop
    async def drain(self, grace_period: float) -> None:
        """Wait for open connections to finish, then abort whatever is left."""
        drained, reported = anyio.Event(), anyio.Event()
        loop = self.loop

        def until_empty(event: anyio.Event) -> int:
            """(reactor) ``event`` set once the last connection leaves; how many are open."""
            if self.connections:
                self._on_drained = lambda: loop.call_soon_threadsafe(event.set)
            return len(self.connections)

        count = await self.reactor.run(lambda: until_empty(drained))
        if count:
            logger.info("waiting up to {}s for {} open connections", grace_period, count)
            with anyio.move_on_after(grace_period):
                await drained.wait()

        def abort_all() -> tuple[int, int]:
            self._on_drained = None
            left = list(self.connections)
            for conn in left:
                conn.abort("shutdown timeout")
            # left still: TLS relays, cancelled, whose close lines terminated() writes
            return len(left), until_empty(reported)

        aborted, relaying = await self.reactor.run(abort_all)
        if aborted:
            logger.warning("aborted {} connections still open at shutdown_timeout", aborted)
        if relaying:
            with anyio.move_on_after(RELAYS_REPORT_S):
                await reported.wait()

    # -- sweeps (reactor timers) --------------------------------------------------------

    @on_reactor
    def start_sweeps(self) -> None:
        """Enforce ``handshake_timeout``, ``connect_timeout`` and ``idle_timeout``.

        One sweep at a quarter of the shorter timeout (at most 1 s) replaces a timer per
        connection (a heap push and a cancel on every accept and dial); a deadline fires
        at most 25% late (a server's own ``connect_timeout`` at most one tick late).
        """
        for stop in self._stop_sweeps:  # a reload: the timeouts may have changed
            stop()
        self._stop_sweeps.clear()
        handshake = self.config.handshake_timeout
        timeouts = [t for t in (handshake, self.config.connect_timeout) if t > 0]
        # always swept: a server's own connect_timeout holds with the global one off
        tick = min(1.0, min(timeouts) / 4) if timeouts else 1.0
        self._stop_sweeps.append(self.reactor.every(tick, self._sweep_deadlines))
        self._stop_sweeps.append(
            self.reactor.every(STICKY_SWEEP_S, lambda: self.pools.expire_sticky(time.monotonic()))
        )
        idle = self.config.idle_timeout
        if idle > 0:
            tick = min(1.0, idle / 4)
            self._idle_limit = math.ceil(idle / tick)
            self._stop_sweeps.append(self.reactor.every(tick, self._sweep_idle))

    @on_reactor
    def _sweep_deadlines(self) -> None:
        now = time.monotonic()
        handshake = self.config.handshake_timeout
        guarded = self.reactor.guarded
        if handshake > 0:
            for conn in [c for c in self.handshaking if now - c.started >= handshake]:
                guarded(conn, conn.handshake_timed_out)
        for conn in [c for c in self.dialing if now >= c.dial_deadline]:
            guarded(conn, conn.dial_timed_out)

    @on_reactor
    def _sweep_idle(self) -> None:
        """Close connections that moved no byte either way for ``idle_timeout``."""
        limit = self._idle_limit
        for conn in list(self.connections):
            if conn.state is TERMINATING:  # the loop's TLS relay keeps its own deadline
                continue
            if conn.active:
                conn.active = False
                conn.idle_ticks = 0
            else:
                conn.idle_ticks += 1
                if conn.idle_ticks >= limit:
                    self.reactor.guarded(conn, conn.close_idle)


class Listener(BaseListener):
    """A name-routing listening socket: accepts in batches and starts connections."""

    __slots__ = ("fallback",)

    def __init__(
        self, ctx: ProxyContext, sock: socket.socket, fallback: str | None, label: str
    ) -> None:
        super().__init__(ctx, sock, label)
        self.fallback = fallback  # qualified id of this listener's catch-all server

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
                    self._accept_failed(exc, format_addr(self.address))
                    return
                accepted += 1
                conn = ClientConnection(ctx, conn_fd, (addr[0], addr[1]))
                conn.listener = label
                if self.fallback is not None:
                    conn.fallback = self.fallback
                try:  # zero-cost unless raised: a bug ends this connection, not the batch
                    conn.start()
                except Exception as exc:
                    ctx.reactor.handler_failed(conn, exc)
        finally:  # counted once per batch, not per connection
            if accepted:
                ctx.stats.accepted[label] += accepted


def listening_socket(family: int, type_: int, proto: int) -> socket.socket:
    """A name-routing listener's socket, options set, not bound yet."""
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # accepted sockets inherit it: one setsockopt per listener, not per connection
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # every protocol routed by name speaks first: accept when its bytes are there
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
    except OSError:
        sock.close()
        raise
    return sock


class _Bound(Protocol):
    @property
    def address(self) -> tuple[str, int]: ...


def find_bind(bind: str, opened: Mapping[str, Sequence[_Bound]]) -> str | None:
    """The open bind that ``bind`` names, however it is spelt: ``:25565`` is
    ``0.0.0.0:25565``, and ``127.0.0.1:41234`` is a ``127.0.0.1:0`` that got that port
    (``opened``: each bind entry with what listens for it, listeners or worker groups)."""
    wanted = parse_bind(bind)
    for key, bound in opened.items():
        if parse_bind(key) == wanted or (wanted[1] and any(b.address == wanted for b in bound)):
            return key
    return None


async def open_bind(
    bind: str, open_address: Callable[[int, int, int, tuple[Any, ...]], list[socket.socket]]
) -> list[list[socket.socket]]:
    """``bind`` resolved and each address it names (once) opened by ``open_address(family,
    type, proto, sockaddr)``: one listening socket (one process) or a worker group. On a
    failure what was opened is closed and :class:`ListenError` raised."""
    host, port = parse_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_UNSPEC
    opened: list[list[socket.socket]] = []
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host or None, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[Any, ...]] = set()
        for family_, type_, proto, _, sockaddr in infos:
            if (family_, sockaddr) in seen:
                continue
            seen.add((family_, sockaddr))
            opened.append(open_address(family_, type_, proto, sockaddr))
    except OSError as exc:
        for socks in opened:
            for sock in socks:
                sock.close()
        setting = 'bind = ["host:port"] (or serve --bind host:port) to listen elsewhere'
        raise ListenError(format_addr((host, port)), port, setting, exc) from exc
    return opened


def _listening(
    family: int, type_: int, proto: int, sockaddr: tuple[Any, ...]
) -> list[socket.socket]:
    """One process's listener on ``sockaddr``: one socket, bound, listening."""
    sock = listening_socket(family, type_, proto)
    try:
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return [sock]


@owned_by(LOOP)
class BindListeners:
    """The listeners of the config's ``bind``, by bind string: opened at start, and
    opened or closed on a reload (connections they accepted carry on)."""

    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx
        self._open: dict[str, list[Listener]] = {}

    def listeners(self) -> list[tuple[Listener, str]]:
        """Each listener with the ``bind`` entry it is written as now."""
        return [(listener, bind) for bind, group in self._open.items() for listener in group]

    @property
    def binds(self) -> list[str]:
        return list(self._open)

    async def open(self, bind: str) -> list[tuple[str, int]]:
        """Listen on ``bind``; the addresses bound. Raises :class:`ListenError`."""
        ctx = self._ctx
        # a takeover's sockets for this bind, as the old process had them, or new ones
        inherited = ctx.inherited.take("bind", bind) if ctx.inherited is not None else None
        opened = inherited if inherited is not None else await open_bind(bind, _listening)
        socks = [group[0] for group in opened]
        port = parse_bind(bind)[1]
        fallback = ctx.config.fallbacks.get(bind)
        # labelled as configured; a port picked by the kernel (":0") by the address it got
        listeners = [
            Listener(ctx, sock, fallback, bind if port else format_addr(sock.getsockname()))
            for sock in socks
        ]
        self._open[bind] = listeners
        for listener in listeners:
            await ctx.reactor.run(listener.start)
        bound = [listener.address for listener in listeners]
        logger.info("listening on {}", ", ".join(format_addr(addr) for addr in bound))
        return bound

    def handover(self) -> Iterator[tuple[Handed, socket.socket]]:
        """Every listening socket, for a takeover."""
        for bind, listeners in self._open.items():
            for group, listener in enumerate(listeners):
                yield Handed("bind", bind, group, 0), listener.sock

    def adopt(self, bind: str, label: str, sock: socket.socket) -> None:
        """A worker: accept on ``sock``, opened by the control plane for ``bind``."""
        sock.setblocking(False)
        listener = Listener(self._ctx, sock, self._ctx.config.fallbacks.get(bind), label)
        self._open.setdefault(bind, []).append(listener)
        self._ctx.reactor.call(listener.start)

    def find(self, bind: str) -> str | None:
        return find_bind(bind, self._open)

    def rename(self, old: str, new: str) -> None:
        """The same listeners, now written ``new`` in the config (``fallbacks`` keys)."""
        self._open[new] = self._open.pop(old)

    def close(self, bind: str) -> None:
        """Stop accepting on ``bind`` (in order, before any later reactor call)."""
        listeners = self._open.pop(bind, [])
        for listener in listeners:
            self._ctx.reactor.call(listener.close)
        if listeners:
            where = ", ".join(format_addr(listener.address) for listener in listeners)
            logger.info("stopped listening on {}", where)

    def close_all(self) -> None:
        for bind in list(self._open):
            self.close(bind)


# Keys a reload cannot apply to a running process: they name what was set up at start.
RESTART_ONLY = (
    "admin",
    "providers",
    "servers_dir",
    "bans_file",
    "log_format",
    "workers",
    "takeover_socket",
    # the port-route listeners stay bound where they were opened (a reload would move
    # only those opened after it), and so do their UDP socket buffers
    "port_routes_bind",
    "recv_buffer_size",
    "send_buffer_size",
)


async def reconfigure(ctx: ProxyContext, config: ProxyConfig) -> list[str]:
    """Apply a reloaded global config: listeners of ``bind`` opened and closed, every
    other setting for new connections. Returns what could not be applied (bind
    failures, keys that need a restart), each already logged."""
    problems: list[str] = []
    previous = ctx.config
    kept = {}
    for key in RESTART_ONLY:
        if getattr(config, key) != getattr(previous, key):
            kept[key] = getattr(previous, key)
            problems.append(f"{key} changed: it takes effect at the next restart")
            logger.warning("config reload: {}", problems[-1])
    config = config.model_copy(update=kept)  # ctx.config says what is in force
    wanted = list(dict.fromkeys(config.bind))
    opened = 0
    binds: BindListeners | WorkerSet = ctx.workers or ctx.binds
    for bind in wanted:
        existing = binds.find(bind)
        if existing is not None:
            if existing != bind:
                binds.rename(existing, bind)
        else:
            try:
                await binds.open(bind)
                opened += 1
            except OSError as exc:
                problems.append(str(exc))
                logger.error("config reload: {}", exc)
    closed = [bind for bind in binds.binds if bind not in wanted]
    for bind in closed:
        binds.close(bind)
    if ctx.workers is not None:
        ctx.workers.configure(config)  # each worker applies it to its own listeners
        ctx.config = config  # nothing on the control plane's reactor reads it
    else:
        listeners = ctx.binds.listeners()
        await ctx.reactor.run(lambda: ctx.apply_config(config, listeners))
    ctx.status.config = config  # the status service is the loop's
    if ctx.webhooks is not None and config.webhooks != previous.webhooks:
        ctx.webhooks.reconfigure(config.webhooks)
    ctx.note_fallbacks(ctx.registry.table)  # the new fallbacks against today's table
    logger.info(
        "config reloaded: {} listeners ({} opened, {} closed){}",
        len(binds.binds),
        opened,
        len(closed),
        f"; {len(problems)} not applied" if problems else "",
    )
    return problems


async def watch_bans(ctx: ProxyContext) -> None:
    """Load the bans file, then again whenever it changes (a bad file keeps the last
    good list, with an error naming the file and entry)."""
    path = ctx.config.bans_file.absolute()
    current = BanList()  # what was last handed to the guard (which the reactor owns)

    def load(first: bool) -> None:
        nonlocal current
        try:
            bans = load_bans(path)
        except ValueError as exc:
            logger.error("bans not applied: {}; keeping the previous list", exc)
            return
        if first or bans.bans != current.bans:
            current = bans
            ctx.planes.post_bans(bans)
            if bans or not first:
                logger.info("bans: {} from {}", len(bans), path)

    load(first=True)
    if not path.parent.is_dir():
        logger.info("bans: {} does not exist; not watched", path.parent)
        return
    async with anyio.create_task_group() as tg:
        tg.start_soon(_poll_bans, path, load)
        await _notified_bans(path, load)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


async def _poll_bans(path: Path, load: Callable[[bool], None]) -> None:
    """Re-read the bans file when its inode, mtime or size changed: a file shared between
    instances on a network filesystem raises no inotify event for another host's
    write, and a ban made through one instance must refuse at the others within 1 s."""
    seen = _stamp(path)
    while True:
        await anyio.sleep(BANS_POLL_S)
        stamp = await anyio.to_thread.run_sync(_stamp, path)
        if stamp != seen:
            seen = stamp
            load(False)


async def _notified_bans(path: Path, load: Callable[[bool], None]) -> None:
    """Re-read the bans file on inotify events (a local write: within ~0.1 s)."""
    import watchfiles  # here: the control plane's alone, not every worker's (~1 MiB)

    async for changes in watchfiles.awatch(
        path.parent,
        watch_filter=lambda _change, changed: Path(changed).name == path.name,
        step=BANS_WATCH_STEP_MS,
        debounce=BANS_WATCH_DEBOUNCE_MS,
        recursive=False,
        # the watcher thread checks for cancellation this often: shutdown waits for it
        rust_timeout=BANS_WATCH_TIMEOUT_MS,
        yield_on_timeout=True,
    ):
        if any(Path(changed).name == path.name for _, changed in changes):
            load(False)


async def _watch_reactor(ctx: ProxyContext) -> None:
    """The reactor thread must only end when told to: otherwise fail the whole proxy, so
    the process exits (and a supervisor restarts it) instead of accepting nothing."""
    await ctx.reactor.wait_stopped()
    if not ctx.closing:
        raise RuntimeError("the data plane's reactor thread stopped unexpectedly")


async def _watch_stall(ctx: ProxyContext) -> None:
    """One process: a reactor that answers nothing for ``stall_timeout`` (stuck in a
    handler, or in a blocking call) fails ``/healthz`` until it answers again, logged
    both ways, so an orchestrator restarts the proxy (workers: ``WorkerSet._watch``
    kills the stuck one instead). The check is queued behind the reactor's calls, so a
    busy reactor answers; a stuck one leaves one check queued per ``stall_timeout``."""
    while True:
        await anyio.sleep(WATCHDOG_INTERVAL_S)
        stall = ctx.config.stall_timeout
        if stall <= 0 or ctx.closing:
            ctx.stalled = False
            continue
        asked = anyio.current_time()
        with anyio.move_on_after(stall) as waited:
            try:
                await ctx.reactor.run(lambda: None)
            except RuntimeError:
                return  # it ended: _watch_reactor tells why
        if waited.cancelled_caught and anyio.current_time() - asked - stall > WATCHDOG_LATE_S:
            continue  # this loop was held up itself: ask again
        if waited.cancelled_caught and not ctx.stalled:
            logger.error("the data plane's reactor answered nothing in {:g}s: stuck", stall)
            ctx.stalled = True
        elif not waited.cancelled_caught and ctx.stalled:
            logger.warning("the data plane's reactor answers again")
            ctx.stalled = False


async def run_proxy(
    config: ProxyConfig,
    registry: Registry,
    *,
    context: ProxyContext | None = None,
    controls: Mapping[str, ServerControl] | None = None,
    workers: int = 1,
    task_status: TaskStatus[list[tuple[str, int]]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run every listener until cancelled, then drain connections gracefully. With
    ``workers`` > 1 the listeners are worker processes' (``workers.py``) and this
    process is their control plane."""
    ctx = context or ProxyContext(config, registry, controls)
    if workers > 1:
        from discoproxy.proxy.workers import WorkerSet

        ctx.workers = WorkerSet(ctx, workers)
        ctx.planes = ctx.workers
    ctx.loop = asyncio.get_running_loop()
    ctx.reactor = Reactor()
    ctx.reactor.call(ctx.start_sweeps)  # timers are the reactor's: set up on its thread
    ctx.reactor.call(lambda: ctx.reactor.every(UDP_SWEEP_S, lambda: sweep_udp(ctx)))
    ctx.reactor.start()
    # the control plane's task group for the data plane's coroutines outlives the
    # listeners' (it is stopped after the drain, which may still need it)
    async with anyio.create_task_group() as control:
        await control.start(ctx.tasks.run, ctx.reactor)
        try:
            async with anyio.create_task_group() as tg:
                bound: list[tuple[str, int]] = []
                binds: BindListeners | WorkerSet = ctx.workers or ctx.binds
                for bind in dict.fromkeys(config.bind):
                    bound += await binds.open(bind)
                if ctx.workers is not None:
                    ctx.workers.table_changed(registry.table)
                    registry.add_listener(ctx.workers.table_changed)
                else:
                    ctx.ports.sync(registry.table)
                    registry.add_listener(ctx.ports.sync)
                    registry.add_listener(ctx.prune_stats)
                registry.add_listener(ctx.status.table_changed)
                registry.add_listener(ctx.waker.table_changed)
                ctx.note_fallbacks(registry.table)
                registry.add_listener(ctx.note_fallbacks)
                ctx.health.table_changed(registry.table)
                registry.add_listener(ctx.health.table_changed)
                tg.start_soon(ctx.health.run)
                tg.start_soon(_watch_reactor, ctx)
                if ctx.workers is None:
                    tg.start_soon(_watch_stall, ctx)
                tg.start_soon(watch_bans, ctx)
                # always there (maybe with no receiver), so a reload can add some
                ctx.webhooks = Webhooks(config.webhooks, ctx.events, registry)
                await tg.start(ctx.webhooks.run)
                if ctx.workers is not None:
                    await tg.start(ctx.workers.run)  # the wakes and stops are theirs
                elif ctx.waker.controls:
                    tg.start_soon(ctx.waker.run)
                task_status.started(bound)
                await anyio.sleep_forever()
        finally:
            ctx.closing = True
            if ctx.workers is not None:
                # WorkerSet.run closed them as the drain began (and each worker drained
                # as it stopped): this is for a start that failed before it ran
                ctx.workers.close_all()
            elif ctx.reactor.alive:  # a dead reactor's own failure is what run_proxy raises
                ctx.binds.close_all()  # in order, before the drain's calls
                ctx.ports.close_all()
            with anyio.CancelScope(shield=True):
                try:
                    if ctx.reactor.alive:
                        await ctx.drain(ctx.config.shutdown_timeout)  # as last reloaded
                finally:
                    ctx.tasks.stop()  # what connections still asked of the loop
                    await ctx.reactor.stop()
