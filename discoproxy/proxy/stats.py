"""The data plane's counters: owned by the reactor thread, copied into snapshots.

Rules for this file:
- The hot path pays plain ``int`` increments on objects owned by the reactor thread,
  never a lock: prometheus-client's own ``Counter.inc`` takes one per call, and a
  connection would touch several. Per connection the cost is one :meth:`DataPlaneStats.closed`
  call at close (a dict lookup, a few additions, one bisect per histogram).
- Everything here that reads live state (:func:`take_snapshot`, :func:`take_totals`)
  runs on the reactor thread, called through ``Reactor.run``; what it returns is a copy
  the loop may keep. Live connections are counted there and then, so an open connection's
  bytes show before it closes, and ``connections_total`` (closed + open) never goes down.
- One walk (:func:`open_counts`) and one sum (:func:`route_totals`) serve ``/metrics``,
  the API and the dashboard's history, so they cannot disagree.
- Labels are bounded: routes come from the routing table (stats of routes gone from it
  are dropped once they have no connection left), listeners from the config and the
  port routes, rejection causes and UDP drop causes are fixed strings.
- Totals never go down while the process lives (Prometheus counters; the dashboard
  graphs rates from the differences of its history): a route's stats that are dropped
  are first folded into the :data:`REMOVED` route's (:meth:`DataPlaneStats.prune`), which
  every sum counts like any other route. That costs the prune, never a connection, and
  crosses to the control plane as one more route (``workers = N`` sums it unchanged).
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from discoproxy.logwriter import writer
from discoproxy.model import offline_uuid
from discoproxy.owners import REACTOR, owned_by
from discoproxy.proxy.addresses import format_addr
from discoproxy.proxy.balance import BackendState, Pool
from discoproxy.routing import format_port

if TYPE_CHECKING:
    from discoproxy.proxy.connection import ClientConnection
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.routing import RoutingTable

# Seconds. Handshakes and dials are sub-millisecond on a LAN and seconds when something
# is wrong; connections last from a status ping (ms) to a play session (hours).
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DURATION_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)
UNROUTED = "-"  # route label of connections that never reached a route
# route label of the counters of routes gone from the table, summed (no qualified id,
# which is always ``id@provider``, has no "@")
REMOVED = "(removed)"


class Histogram:
    """Cumulative-at-export histogram: ``counts[i]`` is observations ≤ ``bounds[i]``
    (and above the last bound in the extra last slot)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def add(self, other: Histogram) -> None:
        """Add ``other``'s observations (the same bounds) to these."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total

    def copy(self) -> Histogram:
        other = Histogram.__new__(Histogram)
        other.bounds = self.bounds
        other.counts = list(self.counts)
        other.count = self.count
        other.total = self.total
        return other

    def buckets(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs, ``+Inf`` last, as Prometheus wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((_le(bound), running))
        out.append(("+Inf", self.count))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class RouteStats:
    """One route's counters: TCP connections that closed, and UDP sessions that ended."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "closed",
        "connect",
        "dial_failures",
        "duration",
        "players",
        "udp_bytes_down",
        "udp_bytes_up",
        "udp_sessions",
    )

    def __init__(self) -> None:
        self.closed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.dial_failures = 0
        self.players = 0  # open Minecraft logins (a gauge: +1 admitted, -1 closed)
        self.duration = Histogram(DURATION_BUCKETS)
        self.connect = Histogram(FAST_BUCKETS)
        self.udp_sessions = 0
        self.udp_bytes_up = 0
        self.udp_bytes_down = 0

    def copy(self) -> RouteStats:
        other = RouteStats.__new__(RouteStats)
        for name in RouteStats.__slots__:
            setattr(other, name, getattr(self, name))
        other.duration = self.duration.copy()
        other.connect = self.connect.copy()
        return other

    def fold(self, other: RouteStats) -> None:
        """Add ``other``'s counters to these (its ``players``, a gauge, not)."""
        self.closed += other.closed
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.dial_failures += other.dial_failures
        self.udp_sessions += other.udp_sessions
        self.udp_bytes_up += other.udp_bytes_up
        self.udp_bytes_down += other.udp_bytes_down
        self.duration.add(other.duration)
        self.connect.add(other.connect)


@owned_by(REACTOR)
class DataPlaneStats:
    """Every counter of the data plane; the reactor thread is its only writer."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.accepted: collections.Counter[str] = collections.Counter()  # by listener
        self.rejected: collections.Counter[tuple[str, str]] = collections.Counter()
        self.handshake: dict[str, Histogram] = {}  # by listener: accept → routed
        self.internal_errors = 0  # connections ended by an unexpected exception

    def route(self, route_id: str) -> RouteStats:
        stats = self.routes.get(route_id)
        if stats is None:
            stats = self.routes[route_id] = RouteStats()
        return stats

    def routed(self, listener: str, seconds: float) -> None:
        histogram = self.handshake.get(listener)
        if histogram is None:
            histogram = self.handshake[listener] = Histogram(FAST_BUCKETS)
        histogram.observe(seconds)

    def closed(self, conn: ClientConnection, now: float) -> None:
        stats = conn.route_stats
        if stats is None:
            stats = self.route(UNROUTED)
        stats.closed += 1
        stats.bytes_up += conn.prefix_bytes + conn.up.count
        stats.bytes_down += conn.down.count
        seconds = now - conn.started
        duration = stats.duration  # Histogram.observe inlined: once per connection
        duration.counts[bisect.bisect_left(duration.bounds, seconds)] += 1
        duration.count += 1
        duration.total += seconds

    def prune(self, table: RoutingTable, live: Iterable[str]) -> None:
        """Forget routes gone from ``table`` that no open connection still uses, their
        counters added to :data:`REMOVED`'s first (so no total goes down)."""
        keep = set(table.by_id) | set(live) | {UNROUTED, REMOVED}
        gone = [r for r in self.routes if r not in keep]
        if not gone:
            return
        removed = self.route(REMOVED)
        for route_id in gone:
            removed.fold(self.routes.pop(route_id))


@dataclass
class LiveConnection:
    id: int
    protocol: str  # "tcp" | "udp"
    client: str
    listener: str
    route: str | None
    backend: str | None
    state: str
    age_s: float
    bytes_up: int
    bytes_down: int
    player: str | None = None  # a Minecraft login's username
    uuid: str | None = None  # its offline-mode UUID
    worker: int | None = None  # which worker's (workers = N)


OpenTcp = dict[tuple[str, str], list[int]]  # (listener, route) → [open, bytes up, down]
OpenUdp = dict[str, list[int]]  # route → [open sessions, bytes up, bytes down]


@dataclass
class Snapshot:
    """The data plane's numbers at one instant, copied on the reactor thread."""

    taken: float  # time.time()
    routes: dict[str, RouteStats]  # closed connections / ended sessions
    accepted: dict[str, int]
    rejected: dict[tuple[str, str], int]
    handshake: dict[str, Histogram]
    open_tcp: OpenTcp
    open_udp: OpenUdp
    udp_drops: dict[str, int]
    udp_datagrams: tuple[int, int]
    status: tuple[int, int, int]  # hits, misses, stale
    internal_errors: int = 0  # connections ended by a bug of ours (logged with a traceback)
    table_listener_errors: int = 0  # the control plane's: routing-table listeners that raised
    log_lines_dropped: int = 0  # the log writer's queue was full (stderr stalled)
    connections: list[LiveConnection] = field(default_factory=list)
    # each name route's pool (route id → its backends), for routes a connection used
    backends: dict[str, list[BackendState]] = field(default_factory=dict)

    def route_totals(self) -> dict[str, dict[str, int]]:
        """Per route: open and total connections, bytes each way (TCP and UDP together)."""
        return route_totals(self.routes, self.open_tcp, self.open_udp)

    def totals(self) -> dict[str, int]:
        """All routes together (unrouted open connections included): the dashboard's
        charts, ``/api/connections``' total."""
        return grand_totals(self.route_totals())


def open_counts(ctx: ProxyContext) -> tuple[OpenTcp, OpenUdp]:
    """The one walk over open connections and UDP sessions (reactor thread): every
    number about what is open now comes from here."""
    open_tcp: OpenTcp = {}
    for conn in ctx.connections:
        route = conn.route
        key = (conn.listener, route.qualified_id if route is not None else UNROUTED)
        item = open_tcp.get(key)
        if item is None:
            item = open_tcp[key] = [0, 0, 0]
        item[0] += 1
        if conn.up is not None:
            item[1] += conn.prefix_bytes + conn.up.count
            item[2] += conn.down.count
    open_udp: OpenUdp = {}
    for listener in ctx.udp_listeners:
        for session in listener.sessions.values():
            item = open_udp.setdefault(session.route.qualified_id, [0, 0, 0])
            item[0] += 1
            item[1] += session.bytes_up
            item[2] += session.bytes_down
    return open_tcp, open_udp


def route_totals(
    routes: Mapping[str, RouteStats], open_tcp: OpenTcp, open_udp: OpenUdp
) -> dict[str, dict[str, int]]:
    """The one sum of closed and open numbers per route (``-``: not routed yet)."""
    out: dict[str, dict[str, int]] = {}

    def entry(route_id: str) -> dict[str, int]:
        return out.setdefault(
            route_id, {"active": 0, "connections_total": 0, "bytes_up": 0, "bytes_down": 0}
        )

    for route_id, stats in routes.items():
        item = entry(route_id)
        item["connections_total"] += stats.closed + stats.udp_sessions
        item["bytes_up"] += stats.bytes_up + stats.udp_bytes_up
        item["bytes_down"] += stats.bytes_down + stats.udp_bytes_down
    for (_, route_id), (count, up, down) in open_tcp.items():
        item = entry(route_id)
        item["active"] += count
        item["connections_total"] += count
        item["bytes_up"] += up
        item["bytes_down"] += down
    for route_id, (count, up, down) in open_udp.items():
        item = entry(route_id)
        item["active"] += count
        item["connections_total"] += count
        item["bytes_up"] += up
        item["bytes_down"] += down
    return out


def grand_totals(per_route: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    keys = ("active", "connections_total", "bytes_up", "bytes_down")
    return {key: sum(item[key] for item in per_route.values()) for key in keys}


def take_totals(ctx: ProxyContext) -> dict[str, int]:
    """:meth:`Snapshot.totals` without copying every route's stats (reactor thread):
    the dashboard's history samples it every few seconds."""
    return grand_totals(route_totals(ctx.stats.routes, *open_counts(ctx)))


def take_snapshot(ctx: ProxyContext, connections: int = 0) -> Snapshot:
    """Copy the numbers (reactor thread only). ``connections``: also list up to that many
    open connections, oldest first, for the API."""
    stats = ctx.stats
    now = time.monotonic()
    open_tcp, open_udp = open_counts(ctx)
    status = ctx.status
    udp = ctx.udp_stats
    snapshot = Snapshot(
        taken=time.time(),
        routes={route_id: s.copy() for route_id, s in stats.routes.items()},
        accepted=dict(stats.accepted),
        rejected=dict(stats.rejected),
        handshake={name: h.copy() for name, h in stats.handshake.items()},
        open_tcp=open_tcp,
        open_udp=open_udp,
        udp_drops=dict(udp.drops),
        udp_datagrams=(udp.datagrams_up, udp.datagrams_down),
        status=(status.reactor_hits, 0, 0),  # the loop's counts are added on the loop
        internal_errors=stats.internal_errors,
        log_lines_dropped=writer().dropped,
    )
    pools = ctx.pools
    by_id = ctx.registry.table.by_id  # the table: read by reference
    current: dict[str, Pool] = {}
    for route in by_id.values():
        pool = pools.peek(route)
        if pool is not None:
            current[route.qualified_id] = pool
            snapshot.backends[route.qualified_id] = pool.states()
    # backends that left their route (a replica stopped) while connections to them
    # still run: "draining" until the last one ends
    # the backend lists the table routes to (a server's own, its port routes'): a pool
    # of one of them is current, not a leftover
    in_table = {(r.qualified_id, r.addresses) for r in by_id.values()}
    in_table.update((r.qualified_id, r.addresses) for r in ctx.registry.table.ports.values())
    for key, pool in pools.keyed():  # a copy: pools.get below may add one
        route_id = key[0]
        routed = by_id.get(route_id)
        newest = current.get(route_id)
        if routed is None or pool is newest or key in in_table:
            continue
        if newest is None:
            newest = current[route_id] = pools.get(routed)
            snapshot.backends[route_id] = newest.states()
        listed = snapshot.backends[route_id]
        shown = {b.address for b in listed}
        for state in pool.leaving(newest):
            if state.address not in shown:
                shown.add(state.address)
                listed.append(state)
    if connections:
        snapshot.connections = _live(ctx, connections, now)
    return snapshot


def _live(ctx: ProxyContext, limit: int, now: float) -> list[LiveConnection]:
    live: list[LiveConnection] = []
    for conn in sorted(ctx.connections, key=lambda c: c.started)[:limit]:
        route = conn.route
        has_flows = conn.up is not None
        live.append(
            LiveConnection(
                id=conn.id,
                protocol="tcp",
                client=format_addr(conn.client_addr),
                listener=conn.listener,
                route=route.qualified_id if route is not None else None,
                backend=format_addr(conn.backend_addr) if conn.backend_addr else None,
                state=conn.state.name.lower(),
                age_s=round(now - conn.started, 3),
                bytes_up=conn.prefix_bytes + conn.up.count if has_flows else conn.prefix_bytes,
                bytes_down=conn.down.count if has_flows else 0,
                player=conn.player,
                uuid=str(offline_uuid(conn.player)) if conn.player is not None else None,
                worker=ctx.worker,
            )
        )
    for listener in ctx.udp_listeners:
        for session in listener.sessions.values():
            if len(live) >= limit:
                return live
            live.append(
                LiveConnection(
                    id=session.id,
                    protocol="udp",
                    client=format_addr(session.client),
                    listener=format_port(listener.key),
                    route=session.route.qualified_id,
                    backend=format_addr(session.backend),
                    state="udp session",
                    age_s=round(now - session.started, 3),
                    bytes_up=session.bytes_up,
                    bytes_down=session.bytes_down,
                    worker=ctx.worker,
                )
            )
    return live
