"""The six scenarios of issue 4, issue 5's status pings, issue 6's port routes (TCP
bulk and UDP) and issue 8's TLS termination, each one function that fills
:class:`Results`.

Every scenario measures each target in turn inside one repetition and repeats
(round-robin, so drift over the run hits every target alike); the report takes medians.
Proxy CPU is read from the proxy's own pid around the measured work only, and the
load core's busy share is recorded next to it: near 100 % means the load generator,
not the proxy, set the pace. Each target gets a short unmeasured warm-up first.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen
from bench.payloads import (
    BULK_NAME,
    ECHO_NAME,
    PING_CACHED_NAME,
    PING_UNCACHED_NAME,
    POOL_LC_NAME,
    POOL_RR_NAME,
    PROTOCOL_VERSION,
    REPLY,
    SERIAL_MARKER,
    STATUS_NAME,
    TLS_NAME,
    TLS_REQUEST,
    client_hello,
    login_handshake,
    status_request,
)
from bench.procs import CoreMeter, Cores, cpu_seconds, pin_process, rss_kib
from bench.route_lookup import make_table
from bench.route_lookup import measure as measure_lookup
from bench.targets import Certificate, Target

GIB = 1 << 30
CONNECT_TIMEOUT_S = 120.0
HOLD_TIMEOUT_S = 120.0
ROUTES = 10_000
WARMUP_BULK_BYTES = 64 << 20
WARMUP_CONNECTIONS = 500
WARMUP_ROUND_TRIPS = 500
# blocks per repetition of the latency and connection-cost scenarios, round-robin over
# the targets
LATENCY_BLOCKS = 10
CONNECTION_BLOCKS = 5
PING_BLOCKS = 5
WARMUP_IDLE_CONNECTIONS = 300
# UDP: client sockets (one proxy session each), datagrams in flight per client, bytes a
# datagram; blocks per repetition, round-robin over the targets
UDP_CLIENTS = 8
UDP_WINDOW = 8
UDP_SIZE = 64
UDP_BLOCKS = 5
WARMUP_UDP_S = 0.3
# TLS termination: full handshakes per target per repetition (2-3 s each here), and
# unmeasured ones per target before measuring
HANDSHAKES_FULL = 3_000
HANDSHAKES_QUICK = 2_000
WARMUP_HANDSHAKES = 200


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions; ``quick`` trades precision for a run under two minutes."""

    runs: int
    bulk_bytes: int
    connections: int
    concurrency: int
    round_trips: int
    idle_connections: int
    memory_runs: int
    pings: int  # status pings per leg per repetition
    udp_seconds: float  # UDP load per target per repetition
    handshakes: int  # TLS termination: full handshakes per target per repetition

    @classmethod
    def full(cls, idle_connections: int) -> Settings:
        return cls(5, GIB, 20_000, 50, 20_000, idle_connections, 3, 10_000, 3.0, HANDSHAKES_FULL)

    @classmethod
    def quick(cls, idle_connections: int) -> Settings:
        return cls(
            3, 256 << 20, 5_000, 50, 5_000, idle_connections, 1, 4_000, 1.5, HANDSHAKES_QUICK
        )


@dataclass
class Results:
    """Samples per metric per target; one sample per repetition."""

    samples: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    notes: list[str] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)

    def add(self, metric: str, target: str, value: float | None) -> None:
        """Record one sample; None (not measurable, e.g. proxy CPU of direct) is skipped."""
        if value is not None:
            self.samples[metric][target].append(value)

    def median(self, metric: str, target: str) -> float | None:
        values = self.samples.get(metric, {}).get(target)
        return statistics.median(values) if values else None


@dataclass
class Bench:
    """Everything a scenario needs: what to measure, how much, and where to write it."""

    settings: Settings
    results: Results
    cores: Cores
    source: Path
    direct: Target
    discoproxy: Target
    discoproxy_info: Target
    haproxies: list[Target]
    nginx: Target | None = None  # port routes only
    certificate: Certificate | None = None  # TLS termination only

    @property
    def proxies(self) -> list[Target]:
        return [self.discoproxy, *self.haproxies]


class Meter:
    """Proxy CPU seconds and the load core's busy share over one measured stretch."""

    def __init__(self, target: Target, cores: Cores) -> None:
        self.pid = target.pid
        self._cpu = cpu_seconds(self.pid) if self.pid is not None else 0.0
        self._load = CoreMeter(cores.load)

    def stop(self) -> tuple[float | None, float | None]:
        """(proxy CPU seconds, None for direct; load core busy %, None when unpinned)."""
        used = cpu_seconds(self.pid) - self._cpu if self.pid is not None else None
        busy = self._load.busy()
        return used, busy * 100 if busy is not None else None


def _bulk(bench: Bench, targets: list[Target], metric: str, port_of: str, prefix: bytes) -> None:
    """``bulk_bytes`` over 1 and over 8 connections to each target's ``port_of`` port,
    each opening with ``prefix``: GiB/s, proxy CPU s/GiB, load core busy %."""
    settings, results = bench.settings, bench.results
    gib = settings.bulk_bytes / GIB
    for target in targets:
        loadgen.bulk(getattr(target.ports, port_of), prefix, WARMUP_BULK_BYTES, 2, bench.source)
    for _ in range(settings.runs):
        for target in targets:
            port = getattr(target.ports, port_of)
            for streams in (1, 8):
                meter = Meter(target, bench.cores)
                seconds = loadgen.bulk(port, prefix, settings.bulk_bytes, streams, bench.source)
                used, busy = meter.stop()
                results.add(f"{metric}{streams}_gibps", target.name, gib / seconds)
                results.add(
                    f"{metric}{streams}_cpu", target.name, used / gib if used is not None else None
                )
                results.add(f"{metric}{streams}_load_busy", target.name, busy)


def run_bulk(bench: Bench) -> None:
    """1. Bulk: ``bulk_bytes`` over 1 and over 8 connections — GiB/s, proxy CPU s/GiB."""
    _bulk(bench, [bench.direct, *bench.proxies], "bulk", "bulk", login_handshake(BULK_NAME))


def run_port_bulk(bench: Bench) -> None:
    """8. TCP port route (issue 6): bulk as scenario 1, but to a port forwarded as it is,
    nothing read first (no handshake sent): discoproxy's TCP port route, nginx's stream
    server, HAProxy's ``bulk`` frontend (``default_backend``: the same thing)."""
    nginx = [bench.nginx] if bench.nginx is not None else []
    targets = [bench.direct, bench.discoproxy, *nginx, *bench.haproxies]
    _bulk(bench, targets, "pbulk", "portbulk", b"")


def run_udp(bench: Bench) -> None:
    """9. UDP port route (issue 6): ``UDP_CLIENTS`` client sockets, each one session in
    the proxy, each keeping ``UDP_WINDOW`` datagrams of ``UDP_SIZE`` bytes in flight to
    the UDP echo backend (:class:`loadgen.UdpLoad`) for ``udp_seconds`` per target per
    repetition, interleaved in ``UDP_BLOCKS`` blocks as the connection-cost scenarios.

    Per target: round trips/s (a datagram there and its echo back), loss % (sent and
    never echoed), proxy CPU µs per round trip (two datagrams through the proxy) and the
    share of its core the proxy used (near 100 %: the proxy set the pace).
    """
    settings, results = bench.settings, bench.results
    nginx = [bench.nginx] if bench.nginx is not None else []
    targets = [bench.direct, bench.discoproxy, *nginx]
    loads: dict[str, loadgen.UdpLoad] = {}
    try:
        for target in targets:
            assert target.ports.udp is not None
            loads[target.name] = loadgen.UdpLoad(
                target.ports.udp, UDP_CLIENTS, UDP_WINDOW, UDP_SIZE
            )
            loads[target.name].run(WARMUP_UDP_S)
        block = settings.udp_seconds / UDP_BLOCKS
        names = [t.name for t in targets]
        for _ in range(settings.runs):
            used = dict.fromkeys(names, 0.0)
            busy: dict[str, list[float]] = {name: [] for name in names}
            sent = dict.fromkeys(names, 0)
            received = dict.fromkeys(names, 0)
            seconds = dict.fromkeys(names, 0.0)
            for _ in range(UDP_BLOCKS):
                for target in targets:
                    meter = Meter(target, bench.cores)
                    result = loads[target.name].run(block)
                    cpu, load = meter.stop()
                    if result.errors:
                        results.notes.append(f"udp: {target.name}: {result.errors} errors")
                    sent[target.name] += result.sent
                    received[target.name] += result.received
                    seconds[target.name] += result.seconds
                    used[target.name] += cpu or 0.0
                    if load is not None:
                        busy[target.name].append(load)
            for target in targets:
                name, proxied = target.name, target.pid is not None
                results.add("udp_rtps", name, received[name] / seconds[name])
                results.add("udp_loss", name, (sent[name] - received[name]) / sent[name] * 100)
                per_trip = used[name] / max(received[name], 1) * 1e6
                results.add("udp_cpu_us", name, per_trip if proxied else None)
                share = used[name] / seconds[name] * 100
                results.add("udp_proxy_busy", name, share if proxied else None)
                results.add(
                    "udp_load_busy", name, statistics.mean(busy[name]) if busy[name] else None
                )
    finally:
        for generator in loads.values():
            generator.close()


def _connection_cost(
    bench: Bench, targets: list[Target], metric: str, payload: bytes, port_of: str
) -> None:
    """Proxy CPU per connection and connections/s; each repetition interleaves the
    targets in ``CONNECTION_BLOCKS`` blocks (see :func:`run_latency` for why)."""
    _connection_costs(bench, targets, [(metric, payload)], port_of)


def _connection_costs(
    bench: Bench, targets: list[Target], kinds: list[tuple[str, bytes]], port_of: str
) -> None:
    """:func:`_connection_cost` for several kinds of connection (metric, payload) at
    once: each block runs every kind on every target, so kinds compared with each other
    (a pool against a single backend) see the same machine."""
    settings, results = bench.settings, bench.results
    for target in targets:
        port = getattr(target.ports, port_of)
        for _, payload in kinds:
            loadgen.connect_loop(
                port,
                payload,
                len(REPLY),
                WARMUP_CONNECTIONS,
                settings.concurrency,
                CONNECT_TIMEOUT_S,
            )
    block = max(1, settings.connections // CONNECTION_BLOCKS)
    keys = [(metric, t.name) for metric, _ in kinds for t in targets]
    for _ in range(settings.runs):
        used = dict.fromkeys(keys, 0.0)
        busy: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
        ok = dict.fromkeys(keys, 0)
        seconds = dict.fromkeys(keys, 0.0)
        for _ in range(CONNECTION_BLOCKS):
            for metric, payload in kinds:
                for target in targets:
                    key = (metric, target.name)
                    port = getattr(target.ports, port_of)
                    meter = Meter(target, bench.cores)
                    result = loadgen.connect_loop(
                        port, payload, len(REPLY), block, settings.concurrency, CONNECT_TIMEOUT_S
                    )
                    cpu, load = meter.stop()
                    if result.failed:
                        results.notes.append(f"{metric}: {target.name}: {result.failed} failed")
                    ok[key] += result.ok
                    seconds[key] += result.seconds
                    used[key] += cpu or 0.0
                    if load is not None:
                        busy[key].append(load)
        for key in keys:
            metric, name = key
            proxied = next(t for t in targets if t.name == name).pid is not None
            results.add(f"{metric}_cps", name, ok[key] / seconds[key])
            per_conn = used[key] / max(ok[key], 1) * 1e6
            results.add(f"{metric}_cpu_us", name, per_conn if proxied else None)
            results.add(
                f"{metric}_load_busy", name, statistics.mean(busy[key]) if busy[key] else None
            )


def run_sni(bench: Bench) -> None:
    """2. Connection cost, TLS: ClientHello routed by SNI, small reply, close."""
    targets = [bench.direct, bench.discoproxy, bench.discoproxy_info, *bench.haproxies]
    _connection_cost(bench, targets, "sni", client_hello(), "sni")


def run_pool(bench: Bench) -> None:
    """11. Pools (issue 16): SNI-routed connections to 3 backends, round robin and least
    connections, each backend health-checked every second (HAProxy: ``balance
    roundrobin`` / ``leastconn``, ``check inter 1s fall 2``), against the single-backend
    SNI route measured in the same blocks (``pool_single``)."""
    targets = [bench.discoproxy, *bench.haproxies]
    kinds = [
        ("pool_single", client_hello()),
        ("pool_rr", client_hello(POOL_RR_NAME)),
        ("pool_lc", client_hello(POOL_LC_NAME)),
    ]
    _connection_costs(bench, targets, kinds, "sni")  # in the same blocks: comparable


def run_minecraft(bench: Bench) -> None:
    """3. Connection cost, Minecraft: handshake + status request, status response, close."""
    targets = [bench.direct, bench.discoproxy, bench.discoproxy_info]
    _connection_cost(bench, targets, "mc", status_request(STATUS_NAME), "status")


def run_tlsterm(bench: Bench) -> None:
    """10. TLS termination (issue 8): full TLS handshakes per second, each connection a
    new session (:func:`loadgen.tls_client_context`: nothing resumed), ``TLS_REQUEST``
    sent once it is done, the reply backend's ``REPLY`` read back in plaintext, close —
    ``handshakes`` per target per repetition with the load generator's concurrency,
    interleaved in ``CONNECTION_BLOCKS`` blocks as the connection-cost scenarios.

    Targets: discoproxy (``tls = {cert, key}`` on its one port) and the HAProxy variants
    given the certificate (``bind … ssl crt``: ``haproxy-default`` alone). Per target:
    handshakes/s, proxy CPU µs per handshake, the share of its core the proxy used and
    the load core busy % (the client's own handshake CPU is there: near 100 %, the
    client set the pace, and the CPU per handshake is the figure to compare).
    """
    settings, results = bench.settings, bench.results
    certificate = bench.certificate
    targets = [t for t in bench.proxies if t.ports.tlsterm is not None]
    if certificate is None or not targets:
        return  # no certificate: the run's notes say why
    negotiated = {}
    for target in targets:
        port = target.ports.tlsterm
        assert port is not None
        negotiated[target.name] = loadgen.tls_check(
            port, certificate.cert, TLS_NAME, TLS_REQUEST, REPLY
        )
    if len(set(negotiated.values())) > 1:
        results.notes.append(
            "tlsterm: the targets negotiated different parameters: "
            + ", ".join(f"{name} {what}" for name, what in negotiated.items())
        )
    context = loadgen.tls_client_context()

    def handshakes(target: Target, count: int) -> loadgen.TlsResult:
        port = target.ports.tlsterm
        assert port is not None
        return loadgen.tls_loop(
            port,
            context,
            TLS_NAME,
            TLS_REQUEST,
            len(REPLY),
            count,
            settings.concurrency,
            CONNECT_TIMEOUT_S,
        )

    for target in targets:
        handshakes(target, WARMUP_HANDSHAKES)
    block = max(1, settings.handshakes // CONNECTION_BLOCKS)
    names = [t.name for t in targets]
    for _ in range(settings.runs):
        used = dict.fromkeys(names, 0.0)
        busy: dict[str, list[float]] = {name: [] for name in names}
        ok = dict.fromkeys(names, 0)
        seconds = dict.fromkeys(names, 0.0)
        for _ in range(CONNECTION_BLOCKS):
            for target in targets:
                meter = Meter(target, bench.cores)
                result = handshakes(target, block)
                cpu, load = meter.stop()
                if result.failed:
                    results.notes.append(f"tlsterm: {target.name}: {result.failed} failed")
                if result.resumed:
                    results.notes.append(
                        f"tlsterm: {target.name}: {result.resumed} handshakes not full"
                    )
                ok[target.name] += result.ok
                seconds[target.name] += result.seconds
                used[target.name] += cpu or 0.0
                if load is not None:
                    busy[target.name].append(load)
        for name in names:
            results.add("tls_hps", name, ok[name] / seconds[name])
            results.add("tls_cpu_us", name, used[name] / max(ok[name], 1) * 1e6)
            results.add("tls_proxy_busy", name, used[name] / seconds[name] * 100)
            results.add("tls_load_busy", name, statistics.mean(busy[name]) if busy[name] else None)


def _check_status(target: Target, request: bytes, cached: bool) -> None:
    """Two pings in a row must both be the backend's answer (not one discoproxy made up
    because the backend did not answer), the same one when ``cached``, else two."""
    port = target.ports.mcstatus
    assert port is not None
    first, second = (loadgen.status_ping(port, request) for _ in range(2))
    marker = SERIAL_MARKER.decode()
    if marker not in first or marker not in second:
        raise RuntimeError(f"{target.name}: status not the mcstatus backend's: {second}")
    if (first == second) != cached:
        why = "cached answers differ" if cached else "ttl 0 answered from cache"
        raise RuntimeError(f"{target.name}: {why}: {first} then {second}")


def run_status(bench: Bench) -> None:
    """7. Status pings (issue 5): full server-list pings per second — handshake (next
    state 1) + status request, status response, ping, pong, close — ``pings`` per leg
    per repetition, interleaved in ``PING_BLOCKS`` blocks as the connection-cost
    scenarios. Legs (the metric prefix):

    - ``ping_cache``: discoproxy answers from its cache (``status_cache_ttl`` large);
    - ``ping_ttl0``: ``status_cache_ttl = 0``, every ping its own backend ping: each
      ping announces one of ``2 × concurrency`` protocol versions (the cache key is
      server and protocol), so no two pings in flight share one;
    - ``ping_shared``: ``status_cache_ttl = 0``, every client on one protocol version:
      the pings in flight at once share one backend ping;
    - direct: the backend alone, recorded in every leg's rows as their reference.

    ``*_backend``: status answers the backend gave per ping (distinct serials seen).
    """
    settings, results = bench.settings, bench.results
    cached = [status_request(PING_CACHED_NAME)]
    shared = [status_request(PING_UNCACHED_NAME)]
    versions = range(PROTOCOL_VERSION, PROTOCOL_VERSION + 2 * settings.concurrency)
    each = [status_request(PING_UNCACHED_NAME, version) for version in versions]
    legs = [
        ("ping_cache", bench.discoproxy, cached),
        ("ping_ttl0", bench.discoproxy, each),
        ("ping_shared", bench.discoproxy, shared),
        ("direct", bench.direct, each),
    ]
    for leg, target, requests in legs:
        _check_status(target, requests[0], leg == "ping_cache")
        port = target.ports.mcstatus
        assert port is not None
        loadgen.status_loop(
            port, requests, WARMUP_CONNECTIONS, settings.concurrency, CONNECT_TIMEOUT_S
        )
    block = max(1, settings.pings // PING_BLOCKS)
    names = [leg for leg, _, _ in legs]
    for _ in range(settings.runs):
        used = dict.fromkeys(names, 0.0)
        busy: dict[str, list[float]] = {leg: [] for leg in names}
        ok = dict.fromkeys(names, 0)
        answers = dict.fromkeys(names, 0)
        seconds = dict.fromkeys(names, 0.0)
        for _ in range(PING_BLOCKS):
            for leg, target, requests in legs:
                port = target.ports.mcstatus
                assert port is not None
                meter = Meter(target, bench.cores)
                result = loadgen.status_loop(
                    port, requests, block, settings.concurrency, CONNECT_TIMEOUT_S
                )
                cpu, load = meter.stop()
                if result.failed:
                    results.notes.append(f"status: {leg}: {result.failed} pings failed")
                ok[leg] += result.ok
                answers[leg] += result.answers
                seconds[leg] += result.seconds
                used[leg] += cpu or 0.0
                if load is not None:
                    busy[leg].append(load)
        for leg, target, _ in legs:
            name = target.name
            metrics = names[:-1] if target.pid is None else [leg]  # direct: every row
            for metric in metrics:
                results.add(f"{metric}_pps", name, ok[leg] / seconds[leg])
                per_ping = used[leg] / max(ok[leg], 1) * 1e6
                results.add(f"{metric}_cpu_us", name, per_ping if target.pid else None)
                results.add(f"{metric}_backend", name, answers[leg] / max(ok[leg], 1))
                results.add(
                    f"{metric}_load_busy", name, statistics.mean(busy[leg]) if busy[leg] else None
                )


def _add_percentiles(bench: Bench, target: Target, metric: str, times: list[int]) -> None:
    times.sort()
    bench.results.add(f"{metric}_p50_us", target.name, times[len(times) // 2] / 1e3)
    bench.results.add(f"{metric}_p99_us", target.name, times[int(len(times) * 0.99)] / 1e3)


def run_latency(bench: Bench) -> None:
    """4. Latency: 64-byte ping-pong over one connection — p50 and p99 in µs.

    Measured twice: with the proxy on its own core (as every other scenario), where
    each round trip crosses cores four times and, on a VM, each cross-core wake-up
    costs tens of µs whoever the proxy is; and with the proxy moved onto the load
    core for the measurement, where what remains is the proxies' own path.

    Each repetition interleaves the targets in ``LATENCY_BLOCKS`` short blocks and pools
    each target's round trips: the host's noise drifts over seconds, and blocks of a
    few hundred ms let every target see the same drift (one long stretch per target
    swung the ratios by ±30 % between runs here).
    """
    targets = [bench.direct, *bench.proxies]
    prefix = login_handshake(ECHO_NAME)
    for target in targets:
        loadgen.ping_pong(target.ports.echo, prefix, WARMUP_ROUND_TRIPS)
    block = max(1, bench.settings.round_trips // LATENCY_BLOCKS)
    for _ in range(bench.settings.runs):
        apart: dict[str, list[int]] = {t.name: [] for t in targets}
        together: dict[str, list[int]] = {t.name: [] for t in targets}
        for _ in range(LATENCY_BLOCKS):
            for target in targets:
                apart[target.name] += loadgen.ping_pong(target.ports.echo, prefix, block)
                if target.pid is None or bench.cores.load is None:
                    continue  # direct: one core either way
                pin_process(target.pid, bench.cores.load)
                try:
                    together[target.name] += loadgen.ping_pong(target.ports.echo, prefix, block)
                finally:
                    pin_process(target.pid, bench.cores.proxy)
        for target in targets:
            _add_percentiles(bench, target, "lat", apart[target.name])
            if target.pid is None:
                _add_percentiles(bench, target, "lat1", list(apart[target.name]))
            elif together[target.name]:
                _add_percentiles(bench, target, "lat1", together[target.name])


def _rss_while_idle(target: Target, count: int) -> tuple[int, loadgen.HoldResult]:
    """(ΔRSS KiB while ``count`` idle connections are open, how they fared)."""
    pid = target.pid
    assert pid is not None
    prefix = login_handshake(ECHO_NAME)
    loadgen.hold_idle(target.ports.echo, prefix, WARMUP_IDLE_CONNECTIONS, lambda: None, 60)
    before = rss_kib(pid)
    peak: list[int] = []
    held = loadgen.hold_idle(
        target.ports.echo, prefix, count, lambda: peak.append(rss_kib(pid)), HOLD_TIMEOUT_S
    )
    return peak[0] - before, held


def run_memory(bench: Bench) -> None:
    """5. Memory: ΔRSS per idle established connection, all held and still echoing.

    Each repetition starts the proxy afresh (a process that already held 10k connections
    keeps their memory in its pools), warms it with a few hundred connections, then reads
    RSS before and while ``idle_connections`` are open.
    """
    count = bench.settings.idle_connections
    for _ in range(bench.settings.memory_runs):
        for target in bench.proxies:
            target.restart()
            grown, held = _rss_while_idle(target, count)
            bench.results.add("mem_kib", target.name, grown / count)
            bench.results.add("held", target.name, held.echoed)
            bench.results.add("open_cps", target.name, held.opened / held.open_seconds)


def run_route_lookup(bench: Bench) -> None:
    """6. Route lookup with 10,000 routes: µs per exact and per wildcard lookup."""
    table = make_table(ROUTES)
    exact = [f"s{i * 7 % ROUTES}.example.com" for i in range(20_000)]
    wildcard = [f"a.b.w{i * 7 % ROUTES}.example.org" for i in range(20_000)]
    bench.results.add("route_exact_us", "discoproxy", measure_lookup(table, exact))
    bench.results.add("route_wild_us", "discoproxy", measure_lookup(table, wildcard))


SCENARIOS = {
    "bulk": run_bulk,
    "sni": run_sni,
    "minecraft": run_minecraft,
    "latency": run_latency,
    "routes": run_route_lookup,
    "memory": run_memory,
    "status": run_status,
    "portbulk": run_port_bulk,
    "udp": run_udp,
    "tlsterm": run_tlsterm,
    "pool": run_pool,
}
