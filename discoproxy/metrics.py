"""How the data plane's numbers become Prometheus metrics.

Rules for this file:
- It only renders: the numbers come as a :class:`~discoproxy.proxy.stats.Snapshot`
  (copied on the reactor thread) plus the control plane's own (routing table,
  providers); nothing here reads live state.
- :func:`render` turns them into the text exposition format, with prometheus-client
  doing the format (its process and platform collectors included).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from discoproxy.proxy.addresses import format_addr

if TYPE_CHECKING:
    from discoproxy.proxy.stats import Histogram, Snapshot
    from discoproxy.routing import RoutingTable
    from discoproxy.webhooks import HookStats


@dataclass(frozen=True)
class ProviderInfo:
    """One provider as the admin side reports it."""

    name: str
    state: str  # starting | running | failed | off | disabled
    routes: int
    updates: int
    last_update: float | None  # time.time() of the last applied snapshot
    error: str | None


class _Families(Collector):
    """Hands prometheus-client the families built for one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(
    snapshot: Snapshot,
    table: RoutingTable,
    providers: Sequence[ProviderInfo],
    ready: bool,
    checks: Mapping[tuple[str, str], Histogram] | None = None,
    webhooks: Mapping[str, HookStats] | None = None,
    events_dropped: int = 0,
    workers: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """The text exposition of everything, process metrics included. ``checks``: the
    health checker's durations by (route, result), read on the loop that owns them."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(namespace="discoproxy", registry=registry)
    PlatformCollector(registry=registry)
    families = list(_families(snapshot, table, providers, ready))
    families.append(_check_family(checks or {}))
    families.extend(_webhook_families(webhooks or {}, events_dropped))
    if workers:
        families.extend(_worker_families(workers))
    registry.register(_Families(families))
    return generate_latest(registry)


def _webhook_families(hooks: Mapping[str, HookStats], events_dropped: int) -> Iterator[Metric]:
    """Each webhook receiver's deliveries (the loop's counts, read on the loop)."""
    helps = {
        "delivered": "Events a webhook receiver accepted (2xx/3xx)",
        "failures": "Delivery attempts that failed (error, timeout, 4xx/5xx), retries included",
        "dropped": "Events never delivered: its queue was full, or every attempt failed",
    }
    for name, text in helps.items():
        family = CounterMetricFamily(f"discoproxy_webhook_{name}", text, labels=["webhook"])
        for label, stats in sorted(hooks.items()):
            family.add_metric([label], getattr(stats, "failed" if name == "failures" else name))
        yield family
    yield CounterMetricFamily(
        "discoproxy_events_dropped",
        "Events the data plane could not queue for the webhooks (its outbox was full)",
        value=events_dropped,
    )


def _worker_families(workers: Sequence[Mapping[str, Any]]) -> Iterator[Metric]:
    """``workers = N``: each worker process (the process_* metrics are the control
    plane's own)."""
    up = GaugeMetricFamily(
        "discoproxy_worker_up", "1 while the worker runs and serves", labels=["worker"]
    )
    restarts = CounterMetricFamily(
        "discoproxy_worker_restarts", "Times the worker was started again", labels=["worker"]
    )
    memory = GaugeMetricFamily(
        "discoproxy_worker_resident_memory_bytes", "The worker's RSS", labels=["worker"]
    )
    cpu = CounterMetricFamily(
        "discoproxy_worker_cpu_seconds", "The worker's user and system CPU", labels=["worker"]
    )
    for worker in workers:
        label = [str(worker["index"])]
        up.add_metric(label, 1 if worker["ready"] else 0)
        restarts.add_metric(label, worker["restarts"])
        if worker.get("rss_bytes") is not None:
            memory.add_metric(label, worker["rss_bytes"])
            cpu.add_metric(label, worker["cpu_s"])
    yield from (up, restarts, memory, cpu)


def _check_family(checks: Mapping[tuple[str, str], Histogram]) -> Metric:
    family = HistogramMetricFamily(
        "discoproxy_health_check_seconds",
        "Active health checks' durations, by route and result (passed or failed)",
        labels=["route", "result"],
    )
    for (route_id, result), histogram in sorted(checks.items()):
        family.add_metric([route_id, result], histogram.buckets(), histogram.total)
    return family


def _families(
    snap: Snapshot, table: RoutingTable, providers: Sequence[ProviderInfo], ready: bool
) -> Iterator[Metric]:
    accepted = CounterMetricFamily(
        "discoproxy_connections_accepted",
        "TCP connections accepted, by listener",
        labels=["listener"],
    )
    for listener, count in sorted(snap.accepted.items()):
        accepted.add_metric([listener], count)
    yield accepted

    active = GaugeMetricFamily(
        "discoproxy_connections_active",
        "Open TCP connections, by listener and route ('-': not routed yet)",
        labels=["listener", "route"],
    )
    for (listener, route_id), (count, _, _) in sorted(snap.open_tcp.items()):
        active.add_metric([listener, route_id], count)
    yield active

    totals = CounterMetricFamily(
        "discoproxy_connections",
        "TCP connections per route, closed and open",
        labels=["route"],
    )
    byte_counts = CounterMetricFamily(
        "discoproxy_bytes",
        "Bytes forwarded per route and direction (up: client to backend), TCP and UDP",
        labels=["route", "direction"],
    )
    open_tcp: collections.Counter[str] = collections.Counter()
    for (_, route_id), (count, _, _) in snap.open_tcp.items():
        open_tcp[route_id] += count
    for route_id, item in sorted(snap.route_totals().items()):
        stats = snap.routes.get(route_id)
        totals.add_metric([route_id], (stats.closed if stats else 0) + open_tcp[route_id])
        byte_counts.add_metric([route_id, "up"], item["bytes_up"])
        byte_counts.add_metric([route_id, "down"], item["bytes_down"])
    yield totals
    yield byte_counts
    players = GaugeMetricFamily(
        "discoproxy_players_online",
        "Minecraft logins admitted and still open, by route (no username label)",
        labels=["route"],
    )
    for route_id, stats in sorted(snap.routes.items()):
        if stats.players or route_id in table.by_id:
            players.add_metric([route_id], stats.players)
    yield players
    udp_by_route = snap.open_udp

    rejected = CounterMetricFamily(
        "discoproxy_connections_rejected",
        "Connections and datagrams refused, by listener and reason",
        labels=["listener", "reason"],
    )
    for (listener, reason), count in sorted(snap.rejected.items()):
        rejected.add_metric([listener, reason], count)
    yield rejected

    handshake = HistogramMetricFamily(
        "discoproxy_handshake_seconds",
        "From accept to a routing decision (PROXY header, sniffing), by listener",
        labels=["listener"],
    )
    for listener, histogram in sorted(snap.handshake.items()):
        handshake.add_metric([listener], histogram.buckets(), histogram.total)
    yield handshake

    connect = HistogramMetricFamily(
        "discoproxy_backend_connect_seconds",
        "From the first dial to the backend accepting, by route",
        labels=["route"],
    )
    duration = HistogramMetricFamily(
        "discoproxy_connection_duration_seconds",
        "Lifetime of closed TCP connections, by route",
        labels=["route"],
    )
    dial_failures = CounterMetricFamily(
        "discoproxy_backend_dial_failures",
        "Backend addresses that refused, timed out or failed to resolve, by route",
        labels=["route"],
    )
    for route_id, stats in sorted(snap.routes.items()):
        if stats.connect.count:
            connect.add_metric([route_id], stats.connect.buckets(), stats.connect.total)
        if stats.closed:
            duration.add_metric([route_id], stats.duration.buckets(), stats.duration.total)
        dial_failures.add_metric([route_id], stats.dial_failures)
    yield connect
    yield duration
    yield dial_failures
    yield from _backend_families(snap, table)

    status = CounterMetricFamily(
        "discoproxy_status_cache",
        "Minecraft status pings answered: from cache (hit), after a backend ping (miss), "
        "or from a stale entry when the backend did not answer (stale)",
        labels=["result"],
    )
    for result, count in zip(("hit", "miss", "stale"), snap.status, strict=True):
        status.add_metric([result], count)
    yield status

    udp_active = GaugeMetricFamily(
        "discoproxy_udp_sessions_active", "Open UDP sessions, by route", labels=["route"]
    )
    udp_total = CounterMetricFamily(
        "discoproxy_udp_sessions", "UDP sessions per route, ended and open", labels=["route"]
    )
    for route_id in sorted(
        set(udp_by_route) | {r for r, s in snap.routes.items() if s.udp_sessions}
    ):
        count = udp_by_route.get(route_id, [0, 0, 0])[0]
        stats = snap.routes.get(route_id)
        udp_active.add_metric([route_id], count)
        udp_total.add_metric([route_id], count + (stats.udp_sessions if stats else 0))
    yield udp_active
    yield udp_total
    datagrams = CounterMetricFamily(
        "discoproxy_udp_datagrams", "UDP datagrams forwarded, by direction", labels=["direction"]
    )
    datagrams.add_metric(["up"], snap.udp_datagrams[0])
    datagrams.add_metric(["down"], snap.udp_datagrams[1])
    yield datagrams
    drops = CounterMetricFamily(
        "discoproxy_udp_drops", "UDP datagrams dropped, by cause", labels=["cause"]
    )
    for cause, count in sorted(snap.udp_drops.items()):
        drops.add_metric([cause], count)
    yield drops

    internal = CounterMetricFamily(
        "discoproxy_internal_errors",
        "Unexpected exceptions (a bug: logged with its traceback): a connection ended, or "
        "a routing-table listener that kept its previous state",
        labels=["where"],
    )
    internal.add_metric(["connection"], snap.internal_errors)
    internal.add_metric(["table listener"], snap.table_listener_errors)
    yield internal
    yield CounterMetricFamily(
        "discoproxy_log_lines_dropped",
        "Log lines dropped because stderr did not keep up (the data plane never waits)",
        value=snap.log_lines_dropped,
    )
    yield GaugeMetricFamily("discoproxy_routes", "Routes in the routing table", value=len(table))
    yield GaugeMetricFamily(
        "discoproxy_route_conflicts",
        "Names claimed by more than one server (the loser is not routed)",
        value=len(table.conflicts),
    )
    yield GaugeMetricFamily(
        "discoproxy_ready", "1 when listening with every provider's first routes", value=ready
    )
    yield from _provider_families(providers)


PROVIDER_STATES = ("starting", "running", "failed", "off", "disabled")


def _backend_families(snap: Snapshot, table: RoutingTable) -> Iterator[Metric]:
    """Each backend of every route: its pool's state (up, open, failed dials) once a
    connection or a check used it, else up with nothing against it (as ``/api/routes``
    shows it); and the replicas a provider holds back (a Docker HEALTHCHECK starting or
    unhealthy), down, so an alert on ``backend_up`` sees every backend."""
    up = GaugeMetricFamily(
        "discoproxy_backend_up",
        "1 while a backend takes new connections, 0 while marked down (failed dials or "
        "checks) or held back by its provider (a Docker HEALTHCHECK starting or unhealthy)",
        labels=["route", "backend"],
    )
    active = GaugeMetricFamily(
        "discoproxy_backend_active_connections",
        "Connections dialing or forwarding to a backend",
        labels=["route", "backend"],
    )
    failed = CounterMetricFamily(
        "discoproxy_backend_failed_dials",
        "Dials to a backend that failed (each address of a host name that all failed: one)",
        labels=["route", "backend"],
    )
    transitions = CounterMetricFamily(
        "discoproxy_backend_transitions",
        "Times a backend went down or up again (its checks' verdicts, or failed dials and "
        "the dial that brought it back), by the state it went to",
        labels=["route", "backend", "to"],
    )
    # the replicas a provider holds back, by route, in its order; those still listed
    # above (draining their connections) are shown there, down, and not again
    held_by_route = {
        route.qualified_id: dict.fromkeys(held.address for held in route.server.held_back)
        for route in table.by_id.values()
        if route.server.held_back
    }
    for route_id, backends in sorted(snap.backends.items()):
        held_here = held_by_route.get(route_id, {})
        for backend in backends:
            labels = [route_id, format_addr(backend.address)]
            taking = backend.state != "down" and labels[1] not in held_here
            held_here.pop(labels[1], None)
            up.add_metric(labels, 1 if taking else 0)
            active.add_metric(labels, backend.active)
            failed.add_metric(labels, backend.dial_failures)
            transitions.add_metric([*labels, "down"], backend.went_down)
            transitions.add_metric([*labels, "up"], backend.went_up)
    for route_id, route in sorted(table.by_id.items()):  # no pool yet: nothing known against
        if route_id not in snap.backends:
            for listed in dict.fromkeys(route.addresses):
                labels = [route_id, format_addr(listed)]
                up.add_metric(labels, 1)
                active.add_metric(labels, 0)
                failed.add_metric(labels, 0)
                transitions.add_metric([*labels, "down"], 0)
                transitions.add_metric([*labels, "up"], 0)
    for route_id, held in sorted(held_by_route.items()):
        for address in held:
            up.add_metric([route_id, address], 0)
            active.add_metric([route_id, address], 0)
    yield up
    yield active
    yield failed
    yield transitions


def _provider_families(providers: Sequence[ProviderInfo]) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "discoproxy_provider_state",
        "1 for the state each provider is in",
        labels=["provider", "state"],
    )
    routes = GaugeMetricFamily(
        "discoproxy_provider_routes", "Servers a provider supplies", labels=["provider"]
    )
    updates = CounterMetricFamily(
        "discoproxy_provider_updates", "Snapshots applied, by provider", labels=["provider"]
    )
    last = GaugeMetricFamily(
        "discoproxy_provider_last_update_timestamp_seconds",
        "When a provider's last snapshot was applied (Unix time)",
        labels=["provider"],
    )
    for info in providers:
        for name in PROVIDER_STATES:
            state.add_metric([info.name, name], 1.0 if info.state == name else 0.0)
        routes.add_metric([info.name], info.routes)
        updates.add_metric([info.name], info.updates)
        if info.last_update is not None:
            last.add_metric([info.name], info.last_update)
    yield state
    yield routes
    yield updates
    yield last
