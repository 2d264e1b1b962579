"""The admin listener (issue 9): /metrics, the JSON API, health, the token, bad requests.

An in-process proxy and its admin listener on loopback; real connections through the
proxy, and the numbers checked as Prometheus (its own parser) and the API report them.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from discoproxy.admin.client import fetch
from discoproxy.admin.server import Admin, Reload, serve_admin
from discoproxy.model import offline_uuid
from discoproxy.provider import ProviderStatus
from discoproxy.routing import SnapshotInbox
from tests.proxy.helpers import (
    RunningProxy,
    backend,
    echo,
    handshake,
    named,
    receive_all,
    running_proxy,
    server,
)

pytestmark = pytest.mark.anyio


@dataclass
class AdminUnderTest:
    url: str
    admin: Admin
    proxy: RunningProxy

    async def get(self, path: str, token: str = "") -> tuple[int, bytes]:
        return await anyio.to_thread.run_sync(fetch, self.url, path, token)

    async def json(self, path: str, token: str = "") -> Any:
        status, body = await self.get(path, token)
        assert status == 200, body
        return json.loads(body)

    async def metrics(
        self, token: str = ""
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = await self.get("/metrics", token)
        assert status == 200, body
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


@asynccontextmanager
async def admin_for(
    proxy: RunningProxy,
    *,
    token: str = "",
    read_only: bool = True,
    reload: Reload | None = None,
    providers: dict[str, ProviderStatus] | None = None,
    inbox: SnapshotInbox | None = None,
) -> AsyncIterator[AdminUnderTest]:
    admin = Admin(
        proxy.ctx,
        proxy.registry,
        token=token,
        read_only=read_only,
        reload=reload,
        providers=providers,
        inbox=inbox,
    )
    admin.ready = True
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(partial(serve_admin, admin, "127.0.0.1:0"))
        yield AdminUnderTest(f"http://{host}:{port}", admin, proxy)
        tg.cancel_scope.cancel()


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_live_connection_shows_in_the_api_and_metrics_then_its_totals() -> None:
    async with (
        backend(echo) as echo_backend,
        running_proxy(
            [server("game", "play.example.com", addresses=[echo_backend.address])]
        ) as proxy,
        admin_for(proxy) as api,
    ):
        listener = f"127.0.0.1:{proxy.port}"
        client = await proxy.connect()
        await client.send(handshake("play.example.com") + b"ping")
        echoed = b""
        with anyio.fail_after(5):
            while len(echoed) < len(handshake("play.example.com")) + 4:
                echoed += await client.receive()

        routes = (await api.json("/api/routes"))["routes"]
        assert routes == [
            {
                "id": "game@test",
                "provider": "test",
                "name": "game",
                "domains": ["play.example.com"],
                "default": False,
                "ports": [],
                "backends": [echo_backend.address],
                "balance": "failover",
                "pool": [
                    {
                        "address": echo_backend.address,
                        "weight": 1,
                        "state": "up",
                        "active": 1,
                        "failures": 0,
                        "dial_failures": 0,
                        "last_error": "",
                        "last_check": "",
                        "check_rtt_ms": None,
                        "players": None,
                    }
                ],
                "send_proxy_protocol": False,
                "state": "running",
                "active": 1,
                "connections_total": 1,
                "bytes_up": len(echoed),
                "bytes_down": len(echoed),
            }
        ]
        live = (await api.json("/api/connections"))["connections"]
        assert len(live) == 1
        assert live[0]["route"] == "game@test"
        assert live[0]["backend"] == echo_backend.address
        assert live[0]["listener"] == listener
        assert live[0]["state"] == "forwarding"
        assert live[0]["protocol"] == "tcp"
        assert live[0]["bytes_down"] == len(echoed)
        assert live[0]["player"] == "tester"  # from its Login Start
        assert live[0]["uuid"] == str(offline_uuid("tester"))

        metrics = await api.metrics()
        assert (
            sample(metrics, "discoproxy_connections_active", listener=listener, route="game@test")
            == 1
        )
        assert sample(metrics, "discoproxy_connections_accepted_total", listener=listener) == 1
        assert sample(metrics, "discoproxy_players_online", route="game@test") == 1
        assert sample(metrics, "discoproxy_bytes_total", route="game@test", direction="up") == len(
            echoed
        )
        assert sample(metrics, "discoproxy_handshake_seconds_count", listener=listener) == 1
        assert sample(metrics, "discoproxy_backend_connect_seconds_count", route="game@test") == 1
        pooled = {"route": "game@test", "backend": echo_backend.address}
        assert sample(metrics, "discoproxy_backend_up", **pooled) == 1
        assert sample(metrics, "discoproxy_backend_active_connections", **pooled) == 1
        assert sample(metrics, "discoproxy_backend_failed_dials_total", **pooled) == 0
        assert sample(metrics, "discoproxy_routes") == 1
        assert sample(metrics, "discoproxy_process_open_fds") > 0

        await client.aclose()
        with anyio.fail_after(5):
            while (await api.json("/api/connections"))["total"]:
                await anyio.sleep(0.02)
        metrics = await api.metrics()
        assert (
            sample(metrics, "discoproxy_connections_active", listener=listener, route="game@test")
            == 0
        )
        assert sample(metrics, "discoproxy_connections_total", route="game@test") == 1  # not lost
        assert sample(
            metrics, "discoproxy_bytes_total", route="game@test", direction="down"
        ) == len(echoed)
        assert (
            sample(metrics, "discoproxy_connection_duration_seconds_count", route="game@test") == 1
        )
        assert (await api.json("/api/routes"))["routes"][0]["connections_total"] == 1


async def test_dial_failures_and_rejections_are_counted_by_route_listener_and_reason() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: refused
    async with (
        running_proxy(
            [server("down", "down.example.com", addresses=[dead])],
            ip_filter={"deny": ["127.0.0.0/8"]},
        ) as proxy,
        admin_for(proxy) as api,
    ):
        client = await proxy.connect()
        await client.send(handshake("down.example.com"))
        assert await receive_all(client) == b""  # refused by ip_filter: closed, no reply
        listener = f"127.0.0.1:{proxy.port}"
        metrics = await api.metrics()
        reason = "denied by ip_filter"
        assert (
            sample(
                metrics, "discoproxy_connections_rejected_total", listener=listener, reason=reason
            )
            == 1
        )

    async with (
        running_proxy([server("down", "down.example.com", addresses=[dead])]) as proxy,
        admin_for(proxy) as api,
    ):
        client = await proxy.connect()
        await client.send(handshake("down.example.com"))
        await receive_all(client)  # the login gets "unreachable"
        metrics = await api.metrics()
        assert sample(metrics, "discoproxy_backend_dial_failures_total", route="down@test") == 1


async def test_status_cache_hits_and_misses_are_exported() -> None:
    async with (
        running_proxy([server("m", "m.example.com", addresses=["127.0.0.1:1"])]) as proxy,
        admin_for(proxy) as api,
    ):
        for _ in range(2):
            client = await proxy.connect()
            await client.send(handshake("m.example.com", next_state=1) + b"\x01\x00")
            with anyio.fail_after(5):
                assert await client.receive()  # the status answer ("unreachable")
            await client.aclose()
        metrics = await api.metrics()
        answered = sum(
            sample(metrics, "discoproxy_status_cache_total", result=result)
            for result in ("hit", "miss", "stale")
        )
        assert answered >= 1
        assert sample(metrics, "discoproxy_status_cache_total", result="miss") >= 1


async def test_udp_sessions_are_counted_per_route() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo_sock:
        echo_sock.bind(("127.0.0.1", 0))
        echo_port = echo_sock.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mapping = f"{port}:{echo_port}/udp"
        async with (
            running_proxy(
                [server("bedrock", addresses=["127.0.0.1"], ports=[mapping])],
                port_routes_bind="127.0.0.1",
            ) as proxy,
            admin_for(proxy) as api,
        ):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                with anyio.fail_after(10):
                    while True:  # the port opens a moment after the table applies
                        client.sendto(b"hello", ("127.0.0.1", port))
                        echo_sock.settimeout(0.2)
                        try:
                            data, peer = echo_sock.recvfrom(100)
                            break
                        except TimeoutError:
                            await anyio.sleep(0.05)
                assert data == b"hello"
                echo_sock.sendto(b"world", peer)
                assert client.recvfrom(100)[0] == b"world"
                metrics = await api.metrics()
                assert sample(metrics, "discoproxy_udp_sessions_active", route="bedrock@test") == 1
                assert sample(metrics, "discoproxy_udp_datagrams_total", direction="down") == 1
                live = (await api.json("/api/connections"))["connections"]
                assert [c["protocol"] for c in live] == ["udp"]
                assert live[0]["id"] > 0
                assert live[0]["listener"] == f"{port}/udp"


async def test_token_guards_everything_but_health_and_the_page() -> None:
    async with running_proxy() as proxy, admin_for(proxy, token="s3cret") as api:
        for path in (
            "/metrics",
            "/api/routes",
            "/api/connections",
            "/api/providers",
            "/api/history",
        ):
            status, _ = await api.get(path)
            assert status == 401, path
            status, _ = await api.get(path, token="wrong")
            assert status == 401, path
            status, _ = await api.get(path, token="s3cret")
            assert status == 200, path
        for path in ("/healthz", "/readyz", "/"):
            status, _ = await api.get(path)
            assert status == 200, path


async def test_reload_is_refused_while_read_only() -> None:
    calls: list[int] = []

    async def reload() -> str:
        calls.append(1)
        return "reloaded"

    async with running_proxy() as proxy:
        async with admin_for(proxy, reload=reload) as api:
            status, body = await anyio.to_thread.run_sync(_post, api.url + "/api/reload")
            assert status == 403
            assert b"read-only" in body
        async with admin_for(proxy, reload=reload, read_only=False) as api:
            status, body = await anyio.to_thread.run_sync(_post, api.url + "/api/reload")
            assert status == 200
            assert json.loads(body) == {"result": "reloaded"}
    assert calls == [1]


def _post(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b"")) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_bad_requests_get_an_error_and_the_listener_carries_on() -> None:
    async with running_proxy() as proxy, admin_for(proxy) as api:
        host, port = api.url.removeprefix("http://").split(":")
        for garbage in (b"\x16\x03\x01\x00\x05hello\r\n\r\n", b"GET /\r\n\r\n", b"A" * 20000):
            stream = await anyio.connect_tcp(host, int(port))
            await stream.send(garbage)
            reply = await receive_all(stream)
            assert reply.startswith(b"HTTP/1.1 4"), reply[:80]
        assert (await api.get("/nope"))[0] == 404
        status, _ = await api.get("/healthz")
        assert status == 200
        # a silent client is dropped at the request timeout, not held forever
        idle = await anyio.connect_tcp(host, int(port))
        assert (await api.get("/readyz"))[0] == 200
        await idle.aclose()


async def test_readyz_follows_readiness_and_providers_are_reported() -> None:
    inbox = SnapshotInbox()
    inbox.applied["file"] = (3, 1_700_000_000.0)
    statuses = {
        "file": ProviderStatus("file", "running"),
        "docker": ProviderStatus(
            "docker", "off", "no Docker engine at unix:///var/run/docker.sock"
        ),
    }
    async with running_proxy() as proxy, admin_for(proxy, providers=statuses, inbox=inbox) as api:
        assert (await api.get("/readyz"))[0] == 200
        api.admin.ready = False
        assert (await api.get("/readyz"))[0] == 503
        assert (await api.get("/healthz"))[0] == 200
        providers = (await api.json("/api/providers"))["providers"]
        assert providers == [
            {
                "name": "docker",
                "state": "off",
                "routes": 0,
                "updates": 0,
                "last_update": None,
                "error": "no Docker engine at unix:///var/run/docker.sock",
            },
            {
                "name": "file",
                "state": "running",
                "routes": 0,
                "updates": 3,
                "last_update": 1_700_000_000.0,
                "error": None,
            },
        ]
        metrics = await api.metrics()
        assert sample(metrics, "discoproxy_provider_state", provider="docker", state="off") == 1
        assert sample(metrics, "discoproxy_provider_updates_total", provider="file") == 3
        assert sample(metrics, "discoproxy_ready") == 0


async def test_history_samples_totals_for_the_charts() -> None:
    async with running_proxy() as proxy, admin_for(proxy) as api:
        with anyio.fail_after(5):
            while not (await api.json("/api/history"))["samples"]:
                await anyio.sleep(0.05)
        history = await api.json("/api/history")
        assert history["interval_s"] == 2.0
        assert set(history["samples"][0]) == {
            "t",
            "active",
            "connections_total",
            "bytes_up",
            "bytes_down",
        }


async def test_counters_of_a_removed_route_are_dropped() -> None:
    async with (
        backend(echo) as echo_backend,
        running_proxy(
            [server("old", "old.example.com", addresses=[echo_backend.address])]
        ) as proxy,
        admin_for(proxy) as api,
    ):
        client = await proxy.connect()
        await client.send(handshake("old.example.com"))
        with anyio.fail_after(5):
            await client.receive()
        await client.aclose()
        with anyio.fail_after(5):
            while (await api.json("/api/connections"))["total"]:
                await anyio.sleep(0.02)
        assert sample(await api.metrics(), "discoproxy_connections_total", route="old@test") == 1
        proxy.registry.apply_snapshot("test", [])
        with anyio.fail_after(5):
            while ("discoproxy_connections_total", (("route", "old@test"),)) in await api.metrics():
                await anyio.sleep(0.02)


async def test_history_and_the_connections_api_count_the_same_open_connections() -> None:
    """One walk, one sum: a client still sending its handshake is open in both."""
    async with running_proxy() as proxy, admin_for(proxy) as api:
        async with await proxy.connect() as stream:
            await stream.send(b"\x10")  # an incomplete handshake: open, not routed yet
            with anyio.fail_after(5):
                while (await api.json("/api/connections"))["total"] != 1:
                    await anyio.sleep(0.02)
            api.admin.history.clear()
            with anyio.fail_after(10):
                while not api.admin.history:
                    await anyio.sleep(0.05)
            sample = api.admin.history[-1]
            listed = await api.json("/api/connections")
            assert sample["active"] == listed["total"] == len(listed["connections"]) == 1


async def test_health_check_durations_are_a_histogram_by_route_and_result() -> None:
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{refused.getsockname()[1]}"
    check = {"type": "tcp", "interval": 0.2, "timeout": 1.0}
    try:
        async with backend(named(b"x")) as alive:
            routes = [
                server("pool", "p.example.com", addresses=[alive.address, dead], health_check=check)
            ]
            async with running_proxy(routes) as proxy, admin_for(proxy) as api:
                with anyio.fail_after(5):
                    while proxy.ctx.health.checks < 4:
                        await anyio.sleep(0.05)
                metrics = await api.metrics()
    finally:
        refused.close()
    name = "discoproxy_health_check_seconds_count"
    passed = sample(metrics, name, route="pool@test", result="passed")
    failed = sample(metrics, name, route="pool@test", result="failed")
    assert passed >= 1 and failed >= 1


async def test_api_routes_show_each_backends_newest_check_not_the_first() -> None:
    check = {"type": "tcp", "interval": 0.2, "timeout": 1.0}
    async with backend(named(b"x")) as alive:
        routes = [server("pool", "p.example.com", addresses=[alive.address], health_check=check)]
        async with running_proxy(routes) as proxy, admin_for(proxy) as api:
            with anyio.fail_after(5):
                while proxy.ctx.health.checks < 3:
                    await anyio.sleep(0.05)
            (target,) = proxy.ctx.health._targets.values()
            before = target.rtt
            rows = (await api.json("/api/routes"))["routes"]
            after = target.rtt  # a check may end while the API answers
    (entry,) = rows[0]["pool"]
    assert entry["last_check"] == "ok"
    assert before is not None and after is not None
    # the newest round trip, though the pool (round_robin) was told only of the first
    assert entry["check_rtt_ms"] in (round(before * 1000, 3), round(after * 1000, 3))


async def test_a_backend_that_leaves_with_open_connections_shows_as_draining() -> None:
    async with backend(echo) as a, backend(echo) as b:

        def game(*addresses: str) -> object:
            return server(
                "game", "game.example.com", addresses=list(addresses), balance="round_robin"
            )

        async with running_proxy([game(a.address, b.address)]) as proxy, admin_for(proxy) as api:
            clients = []
            for _ in range(2):  # round robin: one on each
                client = await proxy.connect()
                await client.send(handshake("game.example.com"))
                with anyio.fail_after(5):
                    assert await client.receive()
                clients.append(client)

            async def pool() -> dict[str, tuple[str, int]]:
                (row,) = (await api.json("/api/routes"))["routes"]
                return {p["address"]: (p["state"], p["active"]) for p in row["pool"]}

            proxy.registry.apply_snapshot("test", [game(a.address)])  # b's replica stopped
            assert await pool() == {a.address: ("up", 1), b.address: ("draining", 1)}
            for client in clients:
                await client.aclose()
            await proxy.wait_on_reactor(lambda ctx: not ctx.connections)
            assert await pool() == {a.address: ("up", 0)}  # drained: gone


async def test_api_workers_reports_the_one_process_as_it_reports_each_worker() -> None:
    """With one process, its one row has the fields a worker's has: RSS and CPU too."""
    async with running_proxy() as proxy, admin_for(proxy) as api:
        (row,) = (await api.json("/api/workers"))["workers"]
        assert row["index"] == 0 and row["restarts"] == 0 and row["ready"] is True
        assert row["rss_bytes"] > 1_000_000 and row["cpu_s"] > 0
