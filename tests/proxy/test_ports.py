"""Port routes in-process: TCP forwarded without sniffing (server speaks first), ranges
mapped by offset, listeners opened and closed with the table, UDP sessions, PROXY v2
on both, and the UDP limits. Loopback only; ports are taken from the OS."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from loguru import logger

from discoproxy.model import PortMapping, ServerDefinition
from discoproxy.protocol.errors import NeedData
from discoproxy.protocol.proxy_protocol import ProxyHeader, parse_proxy_header
from discoproxy.proxy.names import NAME_FAILURE_TTL_S, NameCache
from discoproxy.proxy.server import ProxyContext, reconfigure
from discoproxy.routing import build_table
from tests.proxy.helpers import (
    Backend,
    RunningProxy,
    backend,
    echo,
    receive_all,
    running_proxy,
    server,
)

pytestmark = pytest.mark.anyio


def free_ports(count: int, kind: int = socket.SOCK_STREAM) -> int:
    """The first of ``count`` consecutive ports free right now on 127.0.0.1, below the
    kernel's ephemeral range (where busy machines leave few runs of free ports)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        first = random.randrange(10_000, max(10_001, low - count))
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, kind)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return first
    raise AssertionError("no run of free ports")


async def banner(stream: SocketStream, info: Backend) -> None:
    """Speaks first, like SMTP, then echoes one line."""
    await stream.send(f"220 backend on {info.port}\r\n".encode())
    info.received.append(await stream.receive())
    await stream.send(b"250 " + info.received[-1])


async def wait_port(port: int, *, open_: bool = True) -> None:
    with anyio.fail_after(5):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                if not open_:
                    return
            else:
                await stream.aclose()
                if open_:
                    return
            await anyio.sleep(0.02)


def test_port_mappings_parse_single_ports_ranges_and_targets() -> None:
    assert PortMapping.parse("25575/tcp").pairs() == [(25575, 25575)]
    assert PortMapping.parse("19132/udp").protocol == "udp"
    assert PortMapping.parse("9000-9002:8000-8002/tcp").pairs() == [
        (9000, 8000),
        (9001, 8001),
        (9002, 8002),
    ]
    assert PortMapping.parse("9000-9001:7000").pairs() == [(9000, 7000), (9001, 7001)]
    assert str(PortMapping.parse("9000-9010:8000-8010/TCP")) == "9000-9010:8000-8010/tcp"
    for bad, message in [
        ("9000-8000/tcp", "runs backwards"),
        ("9000-9010:8000-8005/tcp", "differ in length"),
        ("70000/tcp", "expected 1-65535"),
        ("25565/sctp", "expected 'PORT"),
        ("1-2000/tcp", "at most 1024"),
    ]:
        with pytest.raises(ValueError, match=message):
            PortMapping.parse(bad)


def test_two_servers_claiming_one_port_is_a_conflict_with_a_deterministic_winner() -> None:
    a = server("a", addresses=["10.0.0.1"], ports=["9000-9001/tcp"])
    b = server("b", addresses=["10.0.0.2"], ports=["9001:7001/tcp", "9001/udp"])
    table = build_table({"file": [b, a]})
    assert table.ports[("tcp", 9001)].qualified_id == "a@file"
    assert table.ports[("tcp", 9001)].addresses == (("10.0.0.1", 9001),)
    assert table.ports[("udp", 9001)].addresses == (("10.0.0.2", 9001),)
    assert [str(c) for c in table.conflicts] == [
        "'9001/tcp' is claimed by a@file and b@file; a@file wins (first qualified id in sort order)"
    ]


async def test_a_tcp_port_route_forwards_a_server_first_protocol() -> None:
    port = free_ports(1)
    async with backend(banner) as info:
        route = server("smtp", addresses=[info.address], ports=[f"{port}:{info.port}/tcp"])
        async with running_proxy([route]) as _:
            await wait_port(port)
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                with anyio.fail_after(5):
                    assert await stream.receive() == f"220 backend on {info.port}\r\n".encode()
                    await stream.send(b"HELO me\r\n")
                    assert await stream.receive() == b"250 HELO me\r\n"


async def test_a_range_of_eleven_ports_maps_by_offset() -> None:
    listen, target = free_ports(11), free_ports(11)
    ranged = server(
        "range", addresses=["127.0.0.1"], ports=[f"{listen}-{listen + 10}:{target}-{target + 10}"]
    )
    async with _banner_servers(target) as ports, running_proxy([ranged]) as _:
        for i in range(11):
            await wait_port(listen + i)
            stream = await anyio.connect_tcp("127.0.0.1", listen + i)
            async with stream:
                with anyio.fail_after(5):
                    assert await stream.receive() == f"220 backend on {ports[i]}\r\n".encode()


async def test_listeners_follow_the_table_and_open_connections_survive_removal() -> None:
    port = free_ports(1)
    async with backend(banner) as info, running_proxy() as proxy:
        route = server("smtp", addresses=[info.address], ports=[f"{port}:{info.port}/tcp"])
        proxy.registry.apply_snapshot("test", [route])
        await wait_port(port)
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            with anyio.fail_after(5):
                await stream.receive()
            proxy.registry.apply_snapshot("test", [])
            await wait_port(port, open_=False)
            with anyio.fail_after(5):  # the open connection still works
                await stream.send(b"still here\r\n")
                assert await stream.receive() == b"250 still here\r\n"
        proxy.registry.apply_snapshot("test", [route])
        await wait_port(port)


async def test_a_port_that_cannot_be_bound_is_reported_and_the_rest_applies() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    port = free_ports(1)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), format="{message}")
    try:
        with closing(taken):
            async with backend(banner) as info:
                routes = [
                    server("busy", addresses=[info.address], ports=[f"{busy}/tcp"]),
                    server("fine", addresses=[info.address], ports=[f"{port}:{info.port}/tcp"]),
                ]
                async with running_proxy(routes) as _:
                    await wait_port(port)
    finally:
        logger.remove(sink)
    expected = f"cannot listen on {busy}/tcp for busy@test: Address already in use"
    assert any(expected in line for line in lines), lines


async def read_proxy_header(stream: SocketStream) -> tuple[ProxyHeader, bytes]:
    """A backend's read of the PROXY header it gets first, and what came after it."""
    buffer = bytearray()
    while isinstance(header := parse_proxy_header(buffer), NeedData):
        buffer += await stream.receive()
    assert isinstance(header, ProxyHeader)
    return header, bytes(buffer[header.length :])


async def test_tcp_port_routes_send_a_proxy_v2_header_with_the_client() -> None:
    port = free_ports(1)
    headers: list[ProxyHeader] = []

    async def reader(stream: SocketStream, info: Backend) -> None:
        header, _ = await read_proxy_header(stream)
        headers.append(header)
        await stream.send(b"ok")

    async with backend(reader) as info:
        route = server(
            "p",
            addresses=[info.address],
            ports=[f"{port}:{info.port}/tcp"],
            send_proxy_protocol=True,
        )
        async with running_proxy([route]) as _:
            await wait_port(port)
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                assert await receive_all(stream) == b"ok"
                local = stream.extra(anyio.abc.SocketAttribute.local_port)
    assert headers[-1].source == ("127.0.0.1", local)  # [0] is wait_port's probe
    assert headers[-1].destination == ("127.0.0.1", port)


async def test_a_port_route_behind_a_trusted_balancer_reads_its_proxy_header() -> None:
    """With receive_proxy_protocol, a port route's connection from trusted_proxies starts
    with the balancer's PROXY header: the guard judges the client it names (a denied one
    is refused), the header is not passed on as data, and the backend's own header (with
    send_proxy_protocol) names that client, with what the client sent after it intact."""
    port = free_ports(1)
    headers: list[ProxyHeader] = []
    data: list[bytes] = []

    async def reader(stream: SocketStream, info: Backend) -> None:
        header, rest = await read_proxy_header(stream)
        headers.append(header)
        while len(rest) < 5:
            rest += await stream.receive()
        data.append(rest)
        await stream.send(b"ok")

    def balanced(client: str, source_port: int) -> bytes:
        return f"PROXY TCP4 {client} 127.0.0.1 {source_port} {port}\r\n".encode()

    async with backend(reader) as info:
        route = server(
            "p", addresses=[info.address], ports=[f"{port}:{info.port}/tcp"],
            send_proxy_protocol=True,
        )  # fmt: skip
        settings = {
            "receive_proxy_protocol": True,
            "trusted_proxies": ["127.0.0.0/8"],
            "ip_filter": {"deny": ["203.0.113.0/24"]},
        }
        async with running_proxy([route], **settings) as _:
            await wait_port(port)  # no header: closed unrouted
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                await stream.send(balanced("198.51.100.7", 40000) + b"hello")
                assert await receive_all(stream) == b"ok"
            denied = await anyio.connect_tcp("127.0.0.1", port)
            async with denied:
                await denied.send(balanced("203.0.113.9", 40001) + b"hello")
                assert await receive_all(denied) == b""  # closed, the backend never dialed
    assert [h.source for h in headers] == [("198.51.100.7", 40000)]
    assert data == [b"hello"]


async def test_a_reload_names_port_routes_bind_as_restart_only_and_drains_as_reloaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The port listeners stay where they were bound, so a new port_routes_bind (or UDP
    buffer size) is reported as not applied and kept out of the config in force, while
    a new shutdown_timeout is what the shutdown's drain then gets."""
    port = free_ports(1)
    grace: list[float] = []
    async with backend(echo) as info:
        route = server("p", addresses=[info.address], ports=[f"{port}:{info.port}/tcp"])
        async with running_proxy([route], port_routes_bind="127.0.0.1") as proxy:
            await wait_port(port)
            ctx = proxy.ctx
            new = ctx.config.model_copy(
                update={"port_routes_bind": "0.0.0.0", "recv_buffer_size": 1 << 20,
                        "shutdown_timeout": 0.5}
            )  # fmt: skip
            problems = await reconfigure(ctx, new)
            assert problems == [
                "port_routes_bind changed: it takes effect at the next restart",
                "recv_buffer_size changed: it takes effect at the next restart",
            ]
            assert (ctx.config.port_routes_bind, ctx.config.recv_buffer_size) == ("127.0.0.1", 0)
            assert ctx.config.shutdown_timeout == 0.5
            drain = ctx.drain

            async def recorded(grace_period: float) -> None:
                grace.append(grace_period)
                await drain(grace_period)

            monkeypatch.setattr(ctx, "drain", recorded)
    assert grace == [0.5]


# -- UDP --------------------------------------------------------------------------------


@asynccontextmanager
async def udp_echo(prefix: bytes = b"echo:") -> AsyncIterator[tuple[int, list[bytes]]]:
    """A UDP backend answering every datagram with ``prefix + datagram``."""
    seen: list[bytes] = []
    async with await anyio.create_udp_socket(local_host="127.0.0.1") as sock:
        port = sock.extra(anyio.abc.SocketAttribute.local_port)

        async def serve() -> None:
            async for data, addr in sock:
                seen.append(data)
                await sock.sendto(prefix + data, *addr)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            yield port, seen
            tg.cancel_scope.cancel()


def udp_route(sid: str, port: int, backend_port: int, **extra: object) -> ServerDefinition:
    return server(
        sid, addresses=[f"127.0.0.1:{backend_port}"], ports=[f"{port}:{backend_port}/udp"], **extra
    )


async def udp_client(port: int) -> anyio.abc.ConnectedUDPSocket:
    return await anyio.create_connected_udp_socket("127.0.0.1", port, local_host="127.0.0.1")


async def test_udp_sessions_forward_both_ways_per_client() -> None:
    port = free_ports(1, socket.SOCK_DGRAM)
    async with udp_echo() as (backend_port, _):
        route = server(
            "bedrock", addresses=[f"127.0.0.1:{backend_port}"], ports=[f"{port}:{backend_port}/udp"]
        )
        async with running_proxy([route]) as proxy:
            await _wait_udp(proxy, port)
            a, b = await udp_client(port), await udp_client(port)
            async with a, b:
                for client, name in ((a, b"a"), (b, b"b")):
                    for i in range(3):
                        await client.send(name + str(i).encode())
                        with anyio.fail_after(5):
                            assert await client.receive() == b"echo:" + name + str(i).encode()
            counts = await proxy.on_reactor(
                lambda ctx: (ctx.udp_sessions, ctx.udp_stats.datagrams_up)
            )
            assert counts == (2, 6)


async def test_udp_sessions_expire_after_silence() -> None:
    port = free_ports(1, socket.SOCK_DGRAM)
    async with udp_echo() as (backend_port, _):
        route = server(
            "u", addresses=[f"127.0.0.1:{backend_port}"], ports=[f"{port}:{backend_port}/udp"]
        )
        async with running_proxy([route], udp_session_timeout=0.3) as proxy:
            await _wait_udp(proxy, port)
            async with await udp_client(port) as client:
                await client.send(b"x")
                with anyio.fail_after(5):
                    await client.receive()
                assert await proxy.on_reactor(lambda ctx: ctx.udp_sessions) == 1
                await proxy.wait_on_reactor(lambda ctx: not ctx.udp_sessions)
                assert await _udp_sessions_ended(proxy, "u@test") == 1


async def test_udp_datagrams_carry_a_proxy_v2_dgram_header_each() -> None:
    port = free_ports(1, socket.SOCK_DGRAM)
    async with udp_echo(prefix=b"") as (backend_port, seen):
        route = server(
            "u",
            addresses=[f"127.0.0.1:{backend_port}"],
            ports=[f"{port}:{backend_port}/udp"],
            send_proxy_protocol=True,
        )
        async with running_proxy([route]) as proxy:
            await _wait_udp(proxy, port)
            async with await udp_client(port) as client:
                local = client.extra(anyio.abc.SocketAttribute.local_port)
                for payload in (b"one", b"two"):
                    await client.send(payload)
                    with anyio.fail_after(5):
                        await client.receive()
    for datagram, payload in zip(seen, (b"one", b"two"), strict=True):
        header = parse_proxy_header(datagram)
        assert isinstance(header, ProxyHeader)
        assert header.transport == "udp"
        assert header.source == ("127.0.0.1", local)
        assert datagram[header.length :] == payload


async def test_a_per_ip_packet_limit_drops_the_excess_and_spares_others() -> None:
    port = free_ports(1, socket.SOCK_DGRAM)
    async with udp_echo() as (backend_port, seen):
        route = server(
            "u", addresses=[f"127.0.0.1:{backend_port}"], ports=[f"{port}:{backend_port}/udp"]
        )
        async with running_proxy([route], udp_per_ip_packets_per_s=20) as proxy:
            await _wait_udp(proxy, port)
            flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            flood.bind(("127.0.0.2", 0))  # another client IP on loopback
            with closing(flood):
                for i in range(200):
                    flood.sendto(b"f%d" % i, ("127.0.0.1", port))
                await proxy.wait_on_reactor(lambda ctx: sum(ctx.udp_stats.drops.values()) >= 150)
            async with await udp_client(port) as client:
                await client.send(b"legit")
                with anyio.fail_after(5):
                    assert await client.receive() == b"echo:legit"
            flooded = [d for d in seen if d.startswith(b"f")]
            assert 15 <= len(flooded) <= 30  # the one-second burst, not the 200
            drops = await proxy.on_reactor(lambda ctx: ctx.udp_stats.drops["per-IP packet rate"])
            assert drops >= 170


async def test_udp_max_sessions_refuses_new_clients_only() -> None:
    port = free_ports(1, socket.SOCK_DGRAM)
    async with udp_echo() as (backend_port, _):
        route = server(
            "u", addresses=[f"127.0.0.1:{backend_port}"], ports=[f"{port}:{backend_port}/udp"]
        )
        async with running_proxy([route], udp_max_sessions=1) as proxy:
            await _wait_udp(proxy, port)
            async with await udp_client(port) as first, await udp_client(port) as second:
                await first.send(b"1")
                with anyio.fail_after(5):
                    assert await first.receive() == b"echo:1"
                await second.send(b"2")
                await proxy.wait_on_reactor(
                    lambda ctx: ctx.udp_stats.drops["udp_max_sessions reached"]
                )
                await first.send(b"3")
                with anyio.fail_after(5):
                    assert await first.receive() == b"echo:3"


async def _wait_udp(proxy: RunningProxy, port: int) -> None:
    """Until the UDP listener of ``port`` is open (the loop's) and serving (the reactor's)."""
    with anyio.fail_after(5):
        while ("udp", port) not in proxy.ctx.ports.open:
            await anyio.sleep(0.02)
    listener = proxy.ctx.ports.open[("udp", port)]
    await proxy.wait_on_reactor(lambda ctx: listener in ctx.udp_listeners)


async def _udp_sessions_ended(proxy: RunningProxy, route: str) -> int:
    """UDP sessions of ``route`` that have ended, as /metrics counts them."""

    def ended(ctx: ProxyContext) -> int:
        stats = ctx.stats.routes.get(route)
        return stats.udp_sessions if stats is not None else 0

    return await proxy.on_reactor(ended)


@asynccontextmanager
async def _banner_servers(first: int) -> AsyncIterator[list[int]]:
    """Eleven banner servers on consecutive ports from ``first``."""
    listeners = []
    for i in range(11):
        listeners.append(
            await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=first + i)
        )

    async def serve(port: int, stream: SocketStream) -> None:
        async with stream:
            await stream.send(f"220 backend on {port}\r\n".encode())

    async with anyio.create_task_group() as tg:
        for i, listener in enumerate(listeners):
            tg.start_soon(listener.serve, lambda s, p=first + i: serve(p, s))
        yield [first + i for i in range(11)]
        tg.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()


def test_per_ip_rate_state_is_bounded_and_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    from discoproxy.proxy import ports

    monkeypatch.setattr(ports, "MAX_TRACKED_IPS", 100)
    limits = ports.UdpLimits(packets_per_s=2, bytes_per_s=1000)
    for i in range(10_000):  # a flood of distinct source addresses
        limits.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 10, now=0.0)
    assert len(limits) == 100
    assert limits.allow("192.0.2.1", 10, now=0.0) is None
    assert limits.allow("192.0.2.1", 10, now=0.0) is None
    assert limits.allow("192.0.2.1", 10, now=0.0) == "per-IP packet rate"
    assert limits.allow("192.0.2.1", 10, now=0.5) is None  # half a second: one more
    assert limits.allow("192.0.2.1", 2000, now=10.0) == "per-IP byte rate"


async def test_with_a_wildcard_bind_replies_leave_from_the_address_the_client_used() -> None:
    port = free_ports(1, socket.SOCK_DGRAM)
    async with udp_echo() as (backend_port, _):
        route = udp_route("u", port, backend_port, send_proxy_protocol=False)
        # loopback only: 127.0.0.2 is a loopback address the proxy's socket does not name
        async with running_proxy([route], port_routes_bind="0.0.0.0") as proxy:
            await _wait_udp(proxy, port)
            async with await anyio.create_connected_udp_socket("127.0.0.2", port) as client:
                await client.send(b"hi")  # a connected socket drops replies from elsewhere
                with anyio.fail_after(5):
                    assert await client.receive() == b"echo:hi"


async def test_a_refusing_udp_backend_is_passed_over_for_the_next_address() -> None:
    port = free_ports(1, socket.SOCK_DGRAM)
    async with udp_echo() as (backend_port, _):
        # nothing listens on 127.0.0.9: it answers with ICMP port unreachable
        route = server(
            "u", addresses=["127.0.0.9", "127.0.0.1"], ports=[f"{port}:{backend_port}/udp"]
        )
        async with running_proxy([route]) as proxy:
            await _wait_udp(proxy, port)
            async with await udp_client(port) as client:
                with anyio.fail_after(10):
                    while True:  # clients resend; the next session goes to 127.0.0.1
                        await client.send(b"x")
                        with anyio.move_on_after(0.3):
                            assert await client.receive() == b"echo:x"
                            break
            assert await _udp_sessions_ended(proxy, "u@test") >= 1


class HeldResolver:
    """Stands in for the loop's ``getaddrinfo``: counts lookups; each waits for
    ``release``, then fails as a name that does not exist does."""

    def __init__(self) -> None:
        self.lookups: list[tuple[str, int]] = []
        self.release = anyio.Event()

    async def getaddrinfo(self, host: str, port: int, **kwargs: Any) -> list[Any]:
        self.lookups.append((host, port))
        await self.release.wait()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def _flood(proxy: RunningProxy, port: int, count: int, cause: str) -> None:
    """Send ``count`` datagrams from as many source ports, in bursts the socket buffer
    holds, until each was dropped for ``cause``."""
    ctx = proxy.ctx
    before = await ctx.reactor.run(lambda: ctx.udp_stats.drops[cause])
    for burst in range(0, count, 25):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(25)]
        for sock in socks:
            with closing(sock):
                sock.sendto(b"ping", ("127.0.0.1", port))
        with anyio.fail_after(5):
            while await ctx.reactor.run(lambda: ctx.udp_stats.drops[cause]) < before + burst + 25:
                await anyio.sleep(0.01)


async def test_a_flood_to_an_unresolvable_udp_backend_resolves_once_per_hold_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_ports(1, socket.SOCK_DGRAM)
    route = server("u", addresses=["backend.invalid"], ports=[f"{port}:19132/udp"])
    resolver, now = HeldResolver(), [1000.0]
    cache = NameCache(clock=lambda: now[0])
    async with running_proxy([route]) as proxy:
        ctx = proxy.ctx
        monkeypatch.setattr(ctx.loop, "getaddrinfo", resolver.getaddrinfo)
        await ctx.reactor.run(lambda: setattr(ctx, "names", cache))
        await _wait_udp(proxy, port)
        await _flood(proxy, port, 100, "resolving backend")
        assert resolver.lookups == [("backend.invalid", 19132)]  # one, still in flight

        resolver.release.set()
        with anyio.fail_after(5):
            while await ctx.reactor.run(lambda: cache.get("backend.invalid", 19132)) is None:
                await anyio.sleep(0.01)
        await _flood(proxy, port, 100, "backend name unresolved")
        assert len(resolver.lookups) == 1  # the failure is honoured for its hold-off

        now[0] += NAME_FAILURE_TTL_S + 0.1
        await _flood(proxy, port, 25, "resolving backend")
        assert len(resolver.lookups) == 2  # then one lookup again, not one per datagram


def test_udp_backend_hold_offs_that_ran_out_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from discoproxy.proxy import ports

    now = [1000.0]
    monkeypatch.setattr(ports.time, "monotonic", lambda: now[0])
    ctx = SimpleNamespace(udp_stats=ports.UdpStats())
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        listener = ports.UdpListener(ctx, sock, ("udp", 19132), lambda: sock)  # type: ignore[arg-type]
        refused = ConnectionRefusedError(111, "Connection refused")
        for i in range(1000):  # container churn: each backend address refuses once, then goes
            backend = (f"10.0.{i >> 8}.{i & 255}", 19132)
            route = SimpleNamespace(addresses=(backend, ("10.1.0.1", 19132)))
            session = SimpleNamespace(
                route=route, backend=backend, entry=backend, client=("192.0.2.1", i)
            )
            listener.backend_failed(session, refused)  # type: ignore[arg-type]
            now[0] += ports.UDP_BACKEND_HOLD_OFF_S / 2
        assert len(listener._held_off) <= 3


async def test_a_udp_backend_name_that_never_answers_fails_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from discoproxy.proxy import ports

    monkeypatch.setattr(ports, "UDP_RESOLVE_TIMEOUT_S", 0.2)
    port = free_ports(1, socket.SOCK_DGRAM)
    route = server("u", addresses=["backend.invalid"], ports=[f"{port}:19132/udp"])
    resolver = HeldResolver()  # never released: a resolver that hangs
    async with running_proxy([route]) as proxy:
        ctx = proxy.ctx
        monkeypatch.setattr(ctx.loop, "getaddrinfo", resolver.getaddrinfo)
        await _wait_udp(proxy, port)
        await _flood(proxy, port, 1, "resolving backend")
        with anyio.fail_after(5):
            while (
                answer := await ctx.reactor.run(lambda: ctx.names.get("backend.invalid", 19132))
            ) is None:
                await anyio.sleep(0.02)
        assert answer.error.endswith("no answer within 0.2s") and not answer.addresses


async def test_a_port_route_connection_handed_to_another_worker_keeps_its_port_route() -> None:
    """Workers: a port route's connection handed over after its PROXY header (its
    client is another worker's) goes on to that port's route, even when a table swap
    came between the accept and the header (the route object it was accepted with is
    then in no table), not to a route chosen by name."""
    from discoproxy.proxy.connection import adopt_client
    from tests.proxy.helpers import echo, handshake, named

    port = free_ports(1)
    handed = []
    async with backend(echo) as port_backend, backend(named(b"DEFAULT")) as default_backend:
        routed = server(
            "p", addresses=[port_backend.address], ports=[f"{port}:{port_backend.port}/tcp"]
        )
        default = server("d", "default.example", addresses=[default_backend.address], default=True)
        settings = {"receive_proxy_protocol": True, "trusted_proxies": ["127.0.0.0/8"]}
        async with running_proxy([routed, default], **settings) as proxy:
            ctx = proxy.ctx
            await wait_port(port)

            async def hand_off(worker: int, what: object, fd: int) -> None:
                handed.append(what)
                ctx.steer = lambda ip: None  # "the other worker": this one, now its owner
                ctx.reactor.call(lambda: adopt_client(ctx, fd, what))  # type: ignore[arg-type]

            ctx.steer = lambda ip: 1
            ctx.hand_off = hand_off
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await anyio.sleep(0.2)  # accepted, waiting for its header
                other = server("other", "other.example", addresses=[default_backend.address])
                proxy.registry.apply_snapshot("test", [routed, default, other])  # a swap
                await anyio.sleep(0.1)
                hello = handshake("default.example")
                await stream.send(f"PROXY TCP4 198.51.100.7 127.0.0.1 40000 {port}\r\n".encode())
                await stream.send(hello)
                got = b""
                with anyio.fail_after(5):
                    while len(got) < len(hello):
                        got += await stream.receive()
    assert [h.port_key for h in handed] == [("tcp", port)]  # type: ignore[attr-defined]
    assert got == hello  # the port route's echo, not the default route's b"DEFAULT"
