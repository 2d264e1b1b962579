"""Active health checks (discoproxy/health.py): tcp, minecraft, tls and http checks
against real loopback servers; rise/fall; the verdicts reach the pools; lowest_latency
and fewest_players pick what they claim."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.health import _reason, _spread, online_players, probe
from discoproxy.model import Balance, HealthCheck
from discoproxy.protocol import minecraft
from discoproxy.protocol.errors import NeedData
from discoproxy.proxy.balance import Pool
from discoproxy.routing import build_table
from tests.proxy.helpers import Backend, backend, named, running_proxy, server

pytestmark = pytest.mark.anyio

FAST = {"interval": 0.2, "timeout": 1.0, "rise": 2, "fall": 2}


def mc_status(online: int, pong: bool = True) -> Callable[[SocketStream, Backend], Awaitable[None]]:
    """A server's server-list side: the status response, then the ping's pong (unless
    ``pong`` is False: the connection just stays open)."""

    async def handler(stream: SocketStream, info: Backend) -> None:
        buffer = bytearray()
        while isinstance(hs := minecraft.parse_handshake(buffer), NeedData):
            buffer += await stream.receive()
        while isinstance(minecraft.parse_packet(buffer[hs.length :]), NeedData):
            buffer += await stream.receive()
        info.received.append(bytes(buffer))  # the handshake and the status request
        document = {
            "version": {"name": "x", "protocol": 765},
            "players": {"max": 20, "online": online},
        }
        await stream.send(minecraft.encode_status_response(json.dumps(document)))
        buffer = bytearray()
        while isinstance(ping := minecraft.parse_packet(buffer), NeedData):
            buffer += await stream.receive()
        info.received.append(minecraft.encode_packet(ping.packet_id, ping.payload))
        if pong:
            await stream.send(minecraft.encode_packet(0x01, ping.payload))
        else:
            await anyio.sleep(10)

    return handler


async def http_answer(stream: SocketStream, info: Backend) -> None:
    request = await stream.receive()
    info.received.append(request)
    status = b"200 OK" if b"GET /health " in request else b"404 Not Found"
    await stream.send(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")


def route_for(*addresses: str, **extra: object) -> object:
    table = build_table(
        {"test": [server("pool", "pool.example.com", addresses=list(addresses), **extra)]}
    )
    return table.by_id["pool@test"]


def refused_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


# -- one check ----------------------------------------------------------------------------


async def test_a_tcp_check_passes_on_a_listener_and_fails_on_a_refusal() -> None:
    async with backend(named(b"x")) as up:
        route = route_for(up.address)
        check = HealthCheck(type="tcp")
        assert await probe(check, route, "127.0.0.1", up.port) is None  # type: ignore[arg-type]
    closed = refused_port()
    try:
        with pytest.raises(OSError) as refused:
            await probe(check, route, "127.0.0.1", closed.getsockname()[1])  # type: ignore[arg-type]
    finally:
        closed.close()
    # what the transition line, the event and the API's last_check say
    assert _reason(refused.value) == "connection refused"


@pytest.mark.parametrize("kind", ["minecraft", "http", "tls"])
async def test_every_check_kind_says_connection_refused_for_a_refusal(kind: str) -> None:
    """The checks that connect through anyio get its "all connection attempts failed":
    the reason shown is the attempt's own, as the tcp check's."""
    closed = refused_port()
    try:
        with pytest.raises(OSError) as refused:
            check = HealthCheck(type=kind, timeout=1.0)
            await probe(check, route_for("127.0.0.1:1"), "127.0.0.1", closed.getsockname()[1])  # type: ignore[arg-type]
    finally:
        closed.close()
    assert _reason(refused.value) == "connection refused"


async def test_a_minecraft_check_is_the_whole_server_list_ping_with_its_pong() -> None:
    check = HealthCheck(type="minecraft", timeout=0.5)
    async with backend(mc_status(3)) as mc:
        await probe(check, route_for(mc.address), "127.0.0.1", mc.port)  # type: ignore[arg-type]
        ping = minecraft.parse_packet(bytearray(mc.received[1]))
        assert isinstance(ping, minecraft.Packet)
        assert ping.packet_id == 0x01 and len(ping.payload) == 8
    async with backend(mc_status(3, pong=False)) as mute:
        with pytest.raises(TimeoutError):  # a status answer alone does not pass
            with anyio.fail_after(0.5):
                await probe(check, route_for(mute.address), "127.0.0.1", mute.port)  # type: ignore[arg-type]


async def test_a_minecraft_check_reads_the_online_players() -> None:
    async with backend(mc_status(7)) as mc:
        route = route_for(mc.address, domain_rewrite="inner.example.com")
        document = await probe(HealthCheck(type="minecraft"), route, "127.0.0.1", mc.port, 767)  # type: ignore[arg-type]
    assert online_players(document) == 7
    # the check asks as a player's ping would: the protocol asked for, the rewritten host
    sent = minecraft.parse_handshake(bytearray(mc.received[0]))
    assert isinstance(sent, minecraft.Handshake)
    assert (sent.protocol_version, sent.server_address) == (767, "inner.example.com")


async def test_an_http_check_wants_its_status() -> None:
    async with backend(http_answer) as web:
        route = route_for(web.address)
        good = HealthCheck(type="http", http_path="/health")
        await probe(good, route, "127.0.0.1", web.port)  # type: ignore[arg-type]
        with pytest.raises(Exception, match="HTTP 404, expected 200"):
            await probe(HealthCheck(type="http", http_path="/nope"), route, "127.0.0.1", web.port)  # type: ignore[arg-type]
    assert web.received[0].startswith(b"GET /health HTTP/1.1\r\nHost: pool.example.com\r\n")


async def test_a_tls_check_sends_the_proxy_header_before_its_client_hello() -> None:
    """A backend behind send_proxy_protocol refuses a connection without the header,
    so a check without it would mark every healthy backend down."""
    from discoproxy.protocol import proxy_protocol

    first: list[bytes] = []

    async def serve(stream: SocketStream) -> None:
        async with stream:
            first.append(await stream.receive())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        route = route_for(f"127.0.0.1:{port}", send_proxy_protocol=True)
        with pytest.raises(
            (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream)
        ):  # the server above speaks no TLS
            await probe(HealthCheck(type="tls"), route, "127.0.0.1", port)  # type: ignore[arg-type]
        tg.cancel_scope.cancel()
    assert first and first[0].startswith(proxy_protocol.V2_SIGNATURE)


async def test_a_tls_check_completes_a_handshake(tmp_path: Path) -> None:
    from tests.proxy.test_tls_termination import make_cert  # a self-signed pair

    cert, key = make_cert(tmp_path, "pool.example.com")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve(stream: SocketStream) -> None:
        from anyio.streams.tls import TLSStream

        async with stream:
            try:
                tls = await TLSStream.wrap(stream, server_side=True, ssl_context=context)
                await tls.aclose()
            except Exception:
                pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        route = route_for(f"127.0.0.1:{port}")
        await probe(HealthCheck(type="tls"), route, "127.0.0.1", port)  # type: ignore[arg-type]
        tg.cancel_scope.cancel()


def test_first_checks_are_spread_over_the_interval() -> None:
    offsets = [_spread(("r", (), ("10.0.0.1", p)), 5.0) for p in range(1000)]
    assert all(0 <= o < 5 for o in offsets)
    assert sum(o < 1 for o in offsets) < 300  # about a fifth in each fifth, not all at 0


# -- the pool's side ----------------------------------------------------------------------


def test_rise_and_fall_move_a_backend_down_and_up() -> None:
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 1)
    pool = Pool([(*a, 1), (*b, 1)], Balance.ROUND_ROBIN)
    assert pool.checked(a, False, 2, 3, 1, "refused") is None
    assert pool.checked(a, False, 2, 3, 2, "refused") is None
    assert pool.checked(a, False, 2, 3, 3, "refused") is False  # down
    assert all(list(pool.order(None, 1e9)) == [b] for _ in range(3))  # no probe: the checks decide
    assert pool.checked(a, True, 2, 3, 1, "ok", 0.001) is None
    assert pool.checked(a, True, 2, 3, 2, "ok", 0.001) is True  # up after rise
    assert a in pool.order(None, 0)


def test_lowest_latency_and_fewest_players_pick_what_they_claim() -> None:
    a, b, c = ("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)
    fast = Pool([(*a, 1), (*b, 1), (*c, 1)], Balance.LOWEST_LATENCY)
    for address, rtt in ((a, 0.030), (b, 0.002), (c, 0.010)):
        fast.checked(address, True, 1, 1, 1, "ok", rtt)
    assert {fast.order(None, 0)[0] for _ in range(5)} == {b}
    few = Pool([(*a, 1), (*b, 1), (*c, 1)], Balance.FEWEST_PLAYERS)
    for address, players in ((a, 12), (b, 40), (c, 3)):
        few.checked(address, True, 1, 1, 1, "ok", 0.01, players)
    assert {few.order(None, 0)[0] for _ in range(5)} == {c}
    tied = Pool([(*a, 1), (*b, 1)], Balance.FEWEST_PLAYERS)
    for address in (a, b):
        tied.checked(address, True, 1, 1, 1, "ok", 0.01, 5)
    spread = set()
    for _ in range(4):  # short logins, one after the other: ties rotate, as in leastconn
        first = tied.order(None, 0)[0]
        tied.dialing(first)
        tied.done(first)
        spread.add(first)
    assert spread == {a, b}


# -- through a running proxy --------------------------------------------------------------


@asynccontextmanager
async def two_backends(
    first: Callable[..., Awaitable[None]], second: Callable[..., Awaitable[None]]
) -> AsyncIterator[tuple[Backend, Backend]]:
    async with backend(first) as one, backend(second) as two:
        yield one, two


async def _pool_state(proxy: object, address: tuple[str, int]) -> str:
    def read(ctx: object) -> str:
        pool = dict(proxy.ctx.pools).get("pool@test")  # type: ignore[attr-defined]
        if pool is None:
            return "none"
        return "down" if pool.by_address[address].down else "up"

    return await proxy.on_reactor(read)  # type: ignore[attr-defined]


async def test_checks_mark_a_dead_backend_down_before_any_client_dials_it_and_up_again() -> None:
    dead = refused_port()
    dead_port = dead.getsockname()[1]
    try:
        async with backend(named(b"alive")) as alive:
            pool_server = server(
                "pool",
                "pool.example.com",
                addresses=[f"127.0.0.1:{dead_port}", alive.address],
                balance="round_robin",
                health_check={"type": "tcp", **FAST},
            )
            async with running_proxy([pool_server]) as proxy:
                with anyio.fail_after(5):
                    while await _pool_state(proxy, ("127.0.0.1", dead_port)) != "down":
                        await anyio.sleep(0.05)
                for _ in range(6):  # every client reaches the live one, none dials the dead
                    async with await anyio.connect_tcp("127.0.0.1", proxy.port) as stream:
                        await stream.send(b"GET / HTTP/1.1\r\nHost: pool.example.com\r\n\r\n")
                        with anyio.fail_after(5):
                            assert await stream.receive() == b"alive"

                def failed_dials(ctx: object) -> int:
                    pool = dict(proxy.ctx.pools)["pool@test"]
                    return pool.by_address[("127.0.0.1", dead_port)].failed_total

                assert await proxy.on_reactor(failed_dials) == 0
                dead.listen()  # it comes back: rise checks later it takes connections again
                with anyio.fail_after(5):
                    while await _pool_state(proxy, ("127.0.0.1", dead_port)) != "up":
                        await anyio.sleep(0.05)
                assert proxy.ctx.health.checks >= FAST["fall"] + FAST["rise"]

                def transitions(ctx: object) -> tuple[int, int]:
                    b = dict(proxy.ctx.pools)["pool@test"].by_address[("127.0.0.1", dead_port)]
                    return b.went_down, b.went_up

                assert await proxy.on_reactor(transitions) == (1, 1)  # counted, once each
    finally:
        dead.close()


async def test_fewest_players_sends_logins_to_the_emptiest_server() -> None:
    async with two_backends(mc_status(30), mc_status(2)) as (busy, quiet):
        pool_server = server(
            "pool",
            "pool.example.com",
            addresses=[busy.address, quiet.address],
            balance="fewest_players",
            health_check={"type": "minecraft", **FAST},
        )
        async with running_proxy([pool_server]) as proxy:

            def players(ctx: object) -> list[int | None]:
                pool = dict(proxy.ctx.pools).get("pool@test")
                return [b.players for b in pool.backends] if pool else []

            with anyio.fail_after(5):
                while await proxy.on_reactor(players) != [30, 2]:
                    await anyio.sleep(0.05)
            routed = await proxy.on_reactor(
                lambda ctx: [
                    ctx.pools.get(ctx.registry.table.by_id["pool@test"]).order(None, 0)[0]
                    for _ in range(4)
                ]
            )
        assert routed == [("127.0.0.1", quiet.port)] * 4


async def test_minecraft_checks_feed_the_status_cache_so_pings_never_wait() -> None:
    async with backend(mc_status(5)) as mc:
        pinged = server(
            "pool",
            "pool.example.com",
            addresses=[mc.address],
            status_cache_ttl=30,
            health_check={"type": "minecraft", **FAST},
        )
        async with running_proxy([pinged]) as proxy:
            with anyio.fail_after(5):
                while proxy.ctx.health.checks < 1:
                    await anyio.sleep(0.02)
            stream = await proxy.connect()
            async with stream:
                hello = minecraft.encode_handshake(765, "pool.example.com", 25565, 1)
                await stream.send(hello + minecraft.encode_packet(0x00, b""))
                buffer = bytearray()
                with anyio.fail_after(5):
                    while isinstance(packet := minecraft.parse_packet(buffer), NeedData):
                        buffer += await stream.receive()
            document = json.loads(packet.payload[1:])  # one-byte string length
            assert document["players"]["online"] == 5
            # the ping was answered from what the check stored, on the reactor
            assert await proxy.ctx.reactor.run(lambda: proxy.ctx.status.reactor_hits) == 1
            assert proxy.ctx.status.misses == 0
            # only checks reached it (each: the status request, then the ping)
            assert mc.connections - proxy.ctx.health.checks in (0, 1)  # (1: one under way)


def test_port_routes_to_other_ports_are_checked_by_tcp_connect_as_pools_of_their_own() -> None:
    from discoproxy.health import HealthChecker

    defined = server(
        "mc",
        "mc.example.com",
        addresses=["10.0.0.1:25565", "10.0.0.2:25565"],
        ports=["25565/tcp", "25575/tcp", "19132/udp"],
        health_check={"type": "minecraft", **FAST},
    )
    table = build_table({"test": [defined]})
    checker = HealthChecker(object())  # type: ignore[arg-type]
    checker.table_changed(table)
    checked = {(key[2], target.check.type.value) for key, target in checker._targets.items()}
    assert checked == {
        (("10.0.0.1", 25565), "minecraft"),  # the server's pool, and its own port's route
        (("10.0.0.2", 25565), "minecraft"),
        (("10.0.0.1", 25575), "tcp"),  # RCON: its own pool, a connect
        (("10.0.0.2", 25575), "tcp"),
    }  # the UDP port: passive health only
    rcon = table.ports[("tcp", 25575)]
    assert {key[1] for key in checker._targets if key[2][1] == 25575} == {rcon.addresses}


async def test_a_dead_port_route_backend_is_marked_down_in_its_own_pool() -> None:
    async with backend(mc_status(1)) as mc, backend(named(b"rcon")) as rcon:
        free = refused_port()  # a free port for the proxy's port route
        listen_port = free.getsockname()[1]
        free.close()
        # 127.0.0.2 listens on neither port: down in both pools
        defined = server(
            "mc",
            "mc.example.com",
            addresses=[mc.address, f"127.0.0.2:{mc.port}"],
            ports=[f"{listen_port}:{rcon.port}/tcp"],
            balance="round_robin",
            health_check={"type": "minecraft", **FAST},
        )
        async with running_proxy([defined]) as proxy:

            def states(ctx: object) -> dict[tuple[str, int], bool]:
                port_route = proxy.registry.table.ports[("tcp", listen_port)]
                pool = proxy.ctx.pools.get(port_route)
                return {b.address: b.down for b in pool.backends}

            want = {("127.0.0.1", rcon.port): False, ("127.0.0.2", rcon.port): True}
            with anyio.fail_after(5):
                while await proxy.on_reactor(states) != want:
                    await anyio.sleep(0.05)
            assert rcon.received == []  # a tcp connect: nothing sent to RCON


async def test_a_status_answer_the_cache_refuses_fails_the_check_not_the_checker() -> None:
    """Whatever a backend's answer does to the status service, that backend's check fails
    and is scheduled again; before, the error escaped the check and the backend was
    never checked again."""
    async with backend(mc_status(1)) as mc:
        checked = server(
            "pool",
            "pool.example.com",
            addresses=[mc.address],
            health_check={"type": "minecraft", **FAST},
        )
        async with running_proxy([checked]) as proxy:

            def offer(*args: object) -> None:
                raise RecursionError("maximum recursion depth exceeded")

            proxy.ctx.status.offer = offer  # type: ignore[method-assign]
            with anyio.fail_after(5):
                while await _pool_state(proxy, ("127.0.0.1", mc.port)) != "down":
                    await anyio.sleep(0.05)
            checks = proxy.ctx.health.checks
            with anyio.fail_after(5):
                while proxy.ctx.health.checks < checks + 2:  # still checked, on schedule
                    await anyio.sleep(0.05)
            last = await proxy.on_reactor(
                lambda ctx: dict(ctx.pools)["pool@test"].backends[0].last_check
            )
    assert last == "maximum recursion depth exceeded"


async def test_a_late_pool_hears_a_backend_passing_again_short_of_rise_as_down() -> None:
    """A worker started again gets the verdicts in force: a backend that fell and now
    passes, fewer than ``rise`` times, stays down in its new pool as in the others."""
    import asyncio
    from types import SimpleNamespace

    from discoproxy.health import HealthChecker
    from discoproxy.proxy.balance import Pools
    from discoproxy.proxy.workers import restore_verdicts

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    check = {"type": "tcp", "interval": 0.2, "timeout": 1.0, "rise": 3, "fall": 2}
    addresses = [f"127.0.0.1:{port}", "127.0.0.1:1"]
    table = build_table(
        {"test": [server("pool", "pool.test", addresses=addresses, health_check=check)]}
    )
    told: list[tuple[object, ...]] = []
    planes = SimpleNamespace(call=lambda fn, *verdict: told.append(verdict))
    checker = HealthChecker(SimpleNamespace(status=None, planes=planes))  # type: ignore[arg-type]
    checker.table_changed(table)
    key, target = next((k, t) for k, t in checker._targets.items() if t.address[1] == port)
    limiter = asyncio.Semaphore(1)

    def late_pool_says() -> bool:
        pools = Pools()
        restore_verdicts(SimpleNamespace(pools=pools), checker.verdicts())  # type: ignore[arg-type]
        return pools.get(target.route).by_address[target.address].down

    await checker._check(key, target, limiter)
    assert late_pool_says() is False  # passing from the start: up
    listener.close()
    for _ in range(2):  # fall = 2
        await checker._check(key, target, limiter)
    assert late_pool_says() is True
    with socket.create_server(("127.0.0.1", port)):
        for passes in (1, 2):  # short of rise = 3: still down, as the running pools hold it
            await checker._check(key, target, limiter)
            assert late_pool_says() is True, passes
        await checker._check(key, target, limiter)
        assert late_pool_says() is False  # rise reached: up
    # what a late pool heard while down names the failure, and the last check says "ok"
    assert target.detail == "ok" and "refused" in target.downed_by
