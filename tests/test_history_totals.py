"""Totals never go down when a route leaves the table (Prometheus counter semantics; the
dashboard graphs rates from the differences of ``/api/history``'s samples).

A route's counters are dropped from the data plane's stats once the route is gone from
the table and no connection uses it (label values stay bounded); what it counted is
folded into the ``(removed)`` route, which every total includes. One process in-process,
and ``workers = 2`` as a real ``discoproxy serve``, its workers pruning on their own.
"""

from __future__ import annotations

import collections
import socketserver
import time
import urllib.request
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from discoproxy.admin import server as admin_server
from discoproxy.proxy.stats import REMOVED, UNROUTED
from tests.proxy.helpers import backend, echo, handshake, running_proxy, server
from tests.proxy.test_workers import HELLO, ON, api, dial, echoes, mc, wait_until
from tests.support import ProxyProcess, serving
from tests.support import running_proxy as serve_process
from tests.test_admin import AdminUnderTest, admin_for

HISTORY_KEYS = ("connections_total", "bytes_up", "bytes_down")
# the counters of /metrics summed over their route label: totals as a query would sum them
SUMMED = (
    "discoproxy_connections_total",
    "discoproxy_bytes_total",
    "discoproxy_connection_duration_seconds_count",
    "discoproxy_backend_connect_seconds_count",
    "discoproxy_backend_dial_failures_total",
)


def route_sums(text: str) -> tuple[dict[str, float], set[str]]:
    """Each of ``SUMMED`` summed over routes (per direction for bytes), and the route
    labels seen."""
    sums: collections.Counter[str] = collections.Counter()
    routes: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SUMMED:
                key = sample.name + "/" + sample.labels.get("direction", "")
                sums[key] += sample.value
                routes.add(sample.labels["route"])
    return dict(sums), routes


def not_lower(before: dict[str, float], after: dict[str, float]) -> dict[str, object]:
    """The sums that went down (empty: none did)."""
    return {k: (v, after.get(k)) for k, v in before.items() if after.get(k, 0.0) < v}


def monotonic(samples: list[dict[str, float]]) -> None:
    for key in HISTORY_KEYS:
        series = [s[key] for s in samples]
        assert series == sorted(series), (key, series)


# -- one process --------------------------------------------------------------------------


async def talk(api: AdminUnderTest, domain: str, payload: bytes) -> None:
    """One connection through the proxy to the echo backend, closed and counted."""
    client = await api.proxy.connect()
    sent = handshake(domain) + payload
    await client.send(sent)
    echoed = b""
    with anyio.fail_after(5):
        while len(echoed) < len(sent):
            echoed += await client.receive()
    await client.aclose()
    await api.proxy.wait_on_reactor(lambda ctx: not ctx.connections)


async def metrics_text(api: AdminUnderTest) -> str:
    status, body = await api.get("/metrics")
    assert status == 200, body
    return body.decode()


async def sample_after(api: AdminUnderTest, moment: float) -> list[dict[str, float]]:
    """``/api/history``'s samples once one was taken after ``moment`` (time.time())."""
    with anyio.fail_after(5):
        while True:
            samples: list[dict[str, float]] = (await api.json("/api/history"))["samples"]
            if samples and samples[-1]["t"] > moment:
                return samples
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_one_process_keeps_a_pruned_routes_counters_in_its_totals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin_server, "HISTORY_INTERVAL_S", 0.05)
    async with backend(echo) as echo_backend:
        old = server("old", "old.example.com", addresses=[echo_backend.address])
        kept = server("kept", "kept.example.com", addresses=[echo_backend.address])
        async with running_proxy([old, kept]) as proxy, admin_for(proxy) as api:
            await talk(api, "old.example.com", b"x" * 1000)
            await talk(api, "kept.example.com", b"y" * 10)
            before_text = await metrics_text(api)
            before, labels = route_sums(before_text)
            assert "old@test" in labels
            assert before["discoproxy_connections_total/"] == 2
            samples = await sample_after(api, time.time())
            last = samples[-1]
            assert last["connections_total"] == 2

            proxy.registry.apply_snapshot("test", [kept])  # old's server is gone
            await proxy.wait_on_reactor(lambda ctx: "old@test" not in ctx.stats.routes)
            pruned_at = time.time()

            after, labels = route_sums(await metrics_text(api))
            samples = await sample_after(api, pruned_at)
            assert not_lower(before, after) == {}
            monotonic(samples)
            assert after == before
            for key in HISTORY_KEYS:
                assert samples[-1][key] == last[key], key
            assert "old@test" not in labels  # its own label is gone: labels stay bounded
            assert REMOVED in labels  # what it counted is there
            totals = await proxy.ctx.planes.totals()
            assert totals == {**{k: last[k] for k in HISTORY_KEYS}, "active": 0}

            # the route comes back: it counts from zero, on top of what it had counted
            proxy.registry.apply_snapshot("test", [old, kept])
            await talk(api, "old.example.com", b"z")
            again, labels = route_sums(await metrics_text(api))
            assert {"old@test", REMOVED} <= labels
            assert again["discoproxy_connections_total/"] == 3
            samples = await sample_after(api, time.time())
            monotonic(samples)
            assert samples[-1]["connections_total"] == 3


@pytest.mark.anyio
async def test_pruning_folds_only_the_routes_that_are_gone() -> None:
    """The unit: a pruned route's counters (histograms included, not its players
    gauge) add to ``(removed)``; the table's routes, the ones in use, ``-`` and
    ``(removed)`` itself stay as they are."""
    from discoproxy.proxy.stats import DataPlaneStats, route_totals
    from discoproxy.routing import Registry

    registry = Registry()
    registry.apply_snapshot("test", [server("here", "here.example.com", addresses=["x:1"])])
    stats = DataPlaneStats()
    for route_id, closed in (("here@test", 1), ("gone@test", 2), ("used@test", 4)):
        entry = stats.route(route_id)
        entry.closed, entry.bytes_up, entry.bytes_down = closed, 10 * closed, 100 * closed
        entry.dial_failures = closed
        entry.udp_sessions, entry.udp_bytes_up = closed, closed
        entry.duration.observe(1.0)
        entry.connect.observe(0.001)
    stats.route(UNROUTED).closed = 8
    before = route_totals(stats.routes, {}, {})
    stats.prune(registry.table, ["used@test"])
    assert set(stats.routes) == {"here@test", "used@test", UNROUTED, REMOVED}
    removed = stats.routes[REMOVED]
    assert (removed.closed, removed.bytes_up, removed.bytes_down) == (2, 20, 200)
    assert (removed.dial_failures, removed.udp_sessions, removed.udp_bytes_up) == (2, 2, 2)
    assert removed.duration.count == removed.connect.count == 1
    assert removed.players == 0
    stats.route("other@test").closed = 16  # pruned next: adds to what (removed) holds
    stats.prune(registry.table, [])
    assert set(stats.routes) == {"here@test", UNROUTED, REMOVED}
    assert stats.routes[REMOVED].closed == 2 + 4 + 16
    assert stats.routes[REMOVED].duration.count == 2
    after = route_totals(stats.routes, {}, {})
    grand = {k: sum(item[k] for item in after.values()) for k in HISTORY_KEYS}
    was = {k: sum(item[k] for item in before.values()) for k in HISTORY_KEYS}
    assert grand == {**was, "connections_total": was["connections_total"] + 16}


# -- workers = 2 --------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


# the server files only: a Docker engine on this host may have labelled containers
ISOLATED = "workers = 2\n[providers.docker]\nenabled = false\n"


def mc_row(proxy: ProxyProcess) -> dict[str, object] | None:
    """The server file's route in /api/routes (None: not in the table)."""
    rows = [r for r in api(proxy, "/api/routes")["routes"] if r["id"] == "mc@file"]
    return rows[0] if rows else None


def metrics_of(proxy: ProxyProcess) -> str:
    with urllib.request.urlopen(proxy.admin_url() + "/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def test_workers_keep_a_pruned_routes_counters_in_their_totals(tmp_path: Path) -> None:
    """Each worker prunes its own stats when the table it gets drops the route: the
    summed /metrics and the history keep what the route counted on both workers."""
    assert ON[0] and ON[1], "the sources must reach both workers"
    with (
        serving(_Echo) as port,
        serve_process(tmp_path, mc(port), ISOLATED) as proxy,
    ):
        proxy.wait_for_line("worker 1 ready")
        for ip in (ON[0][0], ON[1][0], ON[1][1]):
            with dial(proxy, ip) as sock:
                assert echoes(sock, HELLO + b"\x00" * 5000)
        wait_until(lambda: (mc_row(proxy) or {}).get("connections_total") == 3)
        wait_until(lambda: (mc_row(proxy) or {}).get("active") == 0)
        settled = {"active": 0, "connections_total": 3}
        wait_until(lambda: settled.items() <= api(proxy, "/api/history")["samples"][-1].items())
        last = api(proxy, "/api/history")["samples"][-1]
        before, labels = route_sums(metrics_of(proxy))
        assert "mc@file" in labels, labels
        assert before["discoproxy_connections_total/"] == 3

        (tmp_path / "servers" / "mc.toml").unlink()
        wait_until(lambda: mc_row(proxy) is None)
        # both workers got the table without it and pruned: no worker reports it
        wait_until(lambda: "mc@file" not in route_sums(metrics_of(proxy))[1])
        pruned_at = time.time()
        after, labels = route_sums(metrics_of(proxy))
        wait_until(lambda: api(proxy, "/api/history")["samples"][-1]["t"] > pruned_at + 0.5)
        samples = api(proxy, "/api/history")["samples"]
        assert not_lower(before, after) == {}
        monotonic(samples)
        assert after == before
        for key in HISTORY_KEYS:
            assert samples[-1][key] == last[key], key
        assert REMOVED in labels


@pytest.mark.anyio
async def test_a_retired_slots_counters_of_a_removed_route_stay_in_the_sums() -> None:
    """A worker died (its last counters kept in its slot), then the route leaves the
    table: the live worker folds its own into ``(removed)``; the slot's must stay too."""
    from discoproxy.proxy.stats import RouteStats
    from discoproxy.proxy.workers import merge_snapshots
    from tests.proxy.test_workers_sums import answer, numbers, worker_set

    workers, (first, second) = worker_set()
    answer(first, numbers(closed=3, open_=0, accepted=3))
    answer(second, numbers(closed=5, open_=0, accepted=5))
    assert (await workers.snapshot()).totals()["connections_total"] == 8
    await workers.totals()
    dead = workers.workers[1]
    dead.channel = None  # its process ended: what _run_once does then
    dead.ready = False
    workers._retire(dead)
    workers.ctx.registry.apply_snapshot("test", [])  # mc@test leaves the table
    pruned = merge_snapshots(())  # the live worker's answer once it pruned mc@test
    removed = pruned.routes[REMOVED] = RouteStats()
    removed.closed, removed.bytes_up = 3, 30
    answer(first, pruned)
    assert (await workers.totals())["connections_total"] == 8  # the history's: kept
    assert (await workers.snapshot()).totals()["connections_total"] == 8  # /metrics'
