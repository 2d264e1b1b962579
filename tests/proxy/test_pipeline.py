"""The connection pipeline end to end on loopback: sniff, route, dial, forward, close."""

from __future__ import annotations

import hashlib
import os
import socket
from select import EPOLLIN

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.protocol import minecraft, tls
from discoproxy.protocol.proxy_protocol import ProxyHeader, encode_v2, parse_proxy_header
from discoproxy.proxy.relay import COPY_READ_BYTES, PIPE_SIZE
from discoproxy.proxy.server import ProxyContext
from tests.proxy.helpers import (
    Backend,
    backend,
    client_hello,
    echo,
    handshake,
    named,
    read_string,
    receive_all,
    running_proxy,
    server,
)
from tests.support import captured_logs

pytestmark = pytest.mark.anyio


async def test_minecraft_handshake_routes_by_exact_and_wildcard_domain() -> None:
    async with backend(named(b"A")) as a, backend(named(b"B")) as b:
        servers = [
            server("a", "survival.example.com", addresses=[a.address]),
            server("b", "*.lobby.example.com", addresses=[b.address]),
        ]
        async with running_proxy(servers) as proxy:
            for domain, expected in [
                ("Survival.Example.com.", b"A"),
                ("eu.lobby.example.com\x00FML2\x00", b"B"),
            ]:
                async with await proxy.connect() as stream:
                    await stream.send(handshake(domain))
                    with anyio.fail_after(5):
                        assert await stream.receive() == expected
        # the backend sees the handshake exactly as the client sent it
        assert a.received == [handshake("Survival.Example.com.")]


async def test_tls_client_hello_routes_by_sni_and_is_replayed_whole() -> None:
    async with backend(named(b"A")) as a, backend(named(b"B")) as b:
        servers = [
            server("a", "a.example.com", addresses=[a.address]),
            server("b", "b.example.com", addresses=[b.address]),
        ]
        async with running_proxy(servers) as proxy:
            hello = client_hello("b.example.com")
            async with await proxy.connect() as stream:
                await stream.send(hello)
                with anyio.fail_after(5):
                    assert await stream.receive() == b"B"
            assert b.received == [hello]


async def test_http_routes_by_host_with_port_stripped() -> None:
    async with backend(named(b"A")) as a:
        async with running_proxy([server("a", "web.example.com", addresses=[a.address])]) as proxy:
            request = b"GET / HTTP/1.1\r\nHost: WEB.example.com:8080\r\n\r\n"
            async with await proxy.connect() as stream:
                await stream.send(request)
                with anyio.fail_after(5):
                    assert await stream.receive() == b"A"
            assert a.received == [request]


async def test_failover_to_the_second_address_when_the_first_refuses() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]  # bound, never listening: connection refused
        async with backend(named(b"second")) as second:
            servers = [
                server("mc", "mc.example.com", addresses=[f"127.0.0.1:{dead_port}", second.address])
            ]
            async with running_proxy(servers) as proxy, await proxy.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    assert await stream.receive() == b"second"


async def test_all_addresses_down_gives_the_player_a_disconnect() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
        async with running_proxy([server("mc", "mc.example.com", addresses=[dead])]) as proxy:
            async with await proxy.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                reply = await receive_all(stream)
    packet = minecraft.parse_packet(reply)
    assert isinstance(packet, minecraft.Packet)
    assert packet.packet_id == 0x00
    assert b"unreachable" in packet.payload


async def test_slow_client_is_cut_at_handshake_timeout() -> None:
    async with running_proxy([], handshake_timeout=0.3) as proxy:
        async with await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com")[:5])
            # bounded by the timeout plus slack; EOF proves the proxy closed it
            assert await receive_all(stream, limit=3) == b""


async def test_handshake_timeout_zero_never_cuts_a_slow_client() -> None:
    # documented: 0 = never; the half-sent handshake is then completed and routed
    async with running_proxy([], handshake_timeout=0, connect_timeout=0.3) as proxy:
        async with await proxy.connect() as stream:
            first = handshake("nope.example.com")
            await stream.send(first[:5])
            with anyio.move_on_after(1.2) as waited:  # 4x the other timeout's sweep tick
                await stream.receive()
            assert waited.cancelled_caught  # nothing came: no close, no reply
            await stream.send(first[5:])
            reply = await receive_all(stream)
    packet = minecraft.parse_packet(reply)
    assert isinstance(packet, minecraft.Packet)
    assert "Unknown server: nope.example.com" in read_string(packet.payload)


async def test_unknown_domain_login_gets_a_readable_disconnect() -> None:
    async with running_proxy([]) as proxy, await proxy.connect() as stream:
        await stream.send(handshake("nope.example.com"))
        reply = await receive_all(stream)
    packet = minecraft.parse_packet(reply)
    assert isinstance(packet, minecraft.Packet)
    assert packet.packet_id == 0x00
    assert "Unknown server: nope.example.com" in read_string(packet.payload)


async def test_unknown_domain_status_ping_gets_a_status_and_pong() -> None:
    async with running_proxy([]) as proxy, await proxy.connect() as stream:
        await stream.send(
            handshake("nope.example.com", next_state=1)
            + minecraft.encode_packet(0, b"")
            + minecraft.encode_packet(1, b"12345678")
        )
        reply = await receive_all(stream)
    status = minecraft.parse_packet(reply)
    assert isinstance(status, minecraft.Packet)
    assert status.packet_id == 0
    assert "Unknown server: nope.example.com" in read_string(status.payload)
    pong = minecraft.parse_packet(reply[status.length :])
    assert isinstance(pong, minecraft.Packet)
    assert (pong.packet_id, pong.payload) == (1, b"12345678")


async def test_unknown_sni_gets_an_unrecognized_name_alert() -> None:
    async with running_proxy([]) as proxy, await proxy.connect() as stream:
        await stream.send(client_hello("nope.example.com"))
        assert await receive_all(stream) == tls.encode_alert(tls.ALERT_UNRECOGNIZED_NAME)


async def test_unknown_http_host_gets_421() -> None:
    async with running_proxy([]) as proxy, await proxy.connect() as stream:
        await stream.send(b"GET / HTTP/1.1\r\nHost: nope.example.com\r\n\r\n")
        reply = await receive_all(stream)
    assert reply.startswith(b"HTTP/1.1 421 Misdirected Request\r\n")


async def test_the_unmatched_http_status_is_configurable() -> None:
    async with running_proxy([], http_unmatched_status=404) as proxy:
        async with await proxy.connect() as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: nope.example.com\r\n\r\n")
            reply = await receive_all(stream)
    assert reply.startswith(b"HTTP/1.1 404 Not Found\r\n")


async def test_a_listener_fallback_comes_before_the_global_default() -> None:
    async with (
        backend(named(b"web")) as web,
        backend(named(b"default")) as default,
        backend(named(b"named")) as named_backend,
    ):
        servers = [
            server("web", "web.example.com", addresses=[web.address]),
            server("default", addresses=[default.address], default=True),
            server("named", "named.example.com", addresses=[named_backend.address]),
        ]
        # bound twice: one listener with a fallback, one without
        settings = {
            "bind": ["127.0.0.1:0", "[::1]:0"],
            "fallbacks": {"127.0.0.1:0": "web@test"},
        }
        async with running_proxy(servers, **settings) as proxy:
            for name, expected in [("nope.example.com", b"web"), ("named.example.com", b"named")]:
                async with await proxy.connect() as stream:
                    await stream.send(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n")
                    with anyio.fail_after(5):
                        assert await stream.receive() == expected
            # the second listener has no fallback: the global default
            async with await anyio.connect_tcp(*proxy.bound[1]) as stream:
                await stream.send(b"GET / HTTP/1.1\r\nHost: nope.example.com\r\n\r\n")
                with anyio.fail_after(5):
                    assert await stream.receive() == b"default"


async def test_a_fallback_naming_an_absent_server_is_warned_about_until_it_comes() -> None:
    """A catch-all naming a server no provider serves (a typo, or a container not up yet)
    is not an error, but never silent: warned at start, logged when it is served."""
    settings = {"fallbacks": {"127.0.0.1:0": "web@test"}}
    with captured_logs() as lines:
        async with running_proxy([], **settings) as proxy:
            assert any(
                "fallbacks: '127.0.0.1:0' names 'web@test', which no provider serves now" in line
                for line in lines
            ), lines
            other = server("other", "other.example.com", addresses=["127.0.0.1:1"])
            proxy.registry.apply_snapshot("test", [other])  # a swap that does not bring it
            await proxy.wait_on_reactor(lambda ctx: "other@test" in ctx.registry.table.by_id)
            web = server("web", "web.example.com", addresses=["127.0.0.1:1"])
            proxy.registry.apply_snapshot("test", [other, web])
            with anyio.fail_after(5):
                while not any("'127.0.0.1:0''s catch-all is served again" in x for x in lines):
                    await anyio.sleep(0.01)
    assert sum("no provider serves now" in line for line in lines) == 1  # once, not per table


def test_fallbacks_must_name_a_bind_address_and_a_qualified_id() -> None:
    from pydantic import ValidationError

    from discoproxy.config import ProxyConfig

    with pytest.raises(ValidationError, match="is not one of the bind addresses"):
        ProxyConfig(bind=("0.0.0.0:443",), fallbacks={"0.0.0.0:80": "web@file"})
    with pytest.raises(ValidationError, match="is not a qualified id"):
        ProxyConfig(bind=("0.0.0.0:443",), fallbacks={"0.0.0.0:443": "web"})


async def test_default_server_catches_unknown_names() -> None:
    async with backend(named(b"fallback")) as fallback:
        servers = [server("fallback", addresses=[fallback.address], default=True)]
        async with running_proxy(servers) as proxy, await proxy.connect() as stream:
            await stream.send(handshake("whatever.example.com"))
            with anyio.fail_after(5):
                assert await stream.receive() == b"fallback"


async def test_malformed_handshake_closes_only_that_connection() -> None:
    async with backend(echo) as b:
        async with running_proxy([server("mc", "mc.example.com", addresses=[b.address])]) as proxy:
            async with await proxy.connect() as good:
                await good.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    assert await good.receive() == handshake("mc.example.com")
                async with await proxy.connect() as bad:
                    await bad.send(b"\xff\xff\xff\xff\xff\xff\xff")  # VarInt longer than 5 bytes
                    assert await receive_all(bad) == b""
                await good.send(b"still here")
                with anyio.fail_after(5):
                    assert await good.receive() == b"still here"


async def test_half_close_is_carried_both_ways() -> None:
    async def reply_after_eof(stream: SocketStream, info: Backend) -> None:
        data = await receive_all(stream)
        await stream.send(b"got " + str(len(data)).encode())

    async with backend(reply_after_eof) as b:
        async with running_proxy([server("mc", "mc.example.com", addresses=[b.address])]) as proxy:
            stream = await proxy.connect()
            async with stream:
                await stream.send(handshake("mc.example.com") + b"x" * 1000)
                await stream.send_eof()
                reply = await receive_all(stream)
    assert reply == f"got {len(handshake('mc.example.com')) + 1000}".encode()


async def test_proxy_header_from_trusted_upstream_reaches_the_backend_as_v2() -> None:
    headers: list[ProxyHeader] = []

    async def read_header(stream: SocketStream, info: Backend) -> None:
        data = b""
        while True:
            data += await stream.receive()
            header = parse_proxy_header(data)
            if isinstance(header, ProxyHeader):
                headers.append(header)
                await stream.send(data[header.length :])
                return

    async with backend(read_header) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address], send_proxy_protocol=True)]
        settings = {"receive_proxy_protocol": True, "trusted_proxies": ["127.0.0.0/8"]}
        async with running_proxy(servers, **settings) as proxy, await proxy.connect() as stream:
            upstream = encode_v2(("203.0.113.7", 40000), ("198.51.100.1", 25565))
            await stream.send(upstream + handshake("mc.example.com"))
            with anyio.fail_after(5):
                assert await stream.receive() == handshake("mc.example.com")
    assert headers[0].source == ("203.0.113.7", 40000)
    assert headers[0].destination == ("198.51.100.1", 25565)


async def test_untrusted_source_cannot_spoof_a_proxy_header() -> None:
    async with backend(named(b"A")) as a:
        servers = [server("mc", "mc.example.com", addresses=[a.address])]
        settings = {"receive_proxy_protocol": True, "trusted_proxies": ["10.0.0.0/8"]}
        async with running_proxy(servers, **settings) as proxy, await proxy.connect() as stream:
            spoof = encode_v2(("203.0.113.7", 40000), ("198.51.100.1", 25565))
            await stream.send(spoof + handshake("mc.example.com"))
            assert await receive_all(stream) == b""
        assert a.connections == 0


async def test_missing_proxy_header_from_a_trusted_upstream_is_rejected() -> None:
    settings = {"receive_proxy_protocol": True, "trusted_proxies": ["127.0.0.0/8"]}
    async with running_proxy([], **settings) as proxy:
        async with await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com"))
            assert await receive_all(stream) == b""


async def test_a_table_swap_leaves_open_connections_on_their_backend() -> None:
    async with (
        backend(echo) as old,
        backend(named(b"new")) as new,
        running_proxy([server("mc", "mc.example.com", addresses=[old.address])]) as proxy,
    ):
        async with await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com"))
            with anyio.fail_after(5):
                await stream.receive()
            proxy.registry.apply_snapshot(
                "test", [server("mc", "mc.example.com", addresses=[new.address])]
            )
            await stream.send(b"after swap")
            with anyio.fail_after(5):
                assert await stream.receive() == b"after swap"
        async with await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com"))
            with anyio.fail_after(5):
                assert await stream.receive() == b"new"


async def test_idle_connections_are_closed() -> None:
    async with backend(echo) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers, idle_timeout=0.4) as proxy, await proxy.connect() as s:
            await s.send(handshake("mc.example.com"))
            with anyio.fail_after(5):
                await s.receive()
            assert await receive_all(s, limit=5) == b""


async def test_max_connections_refuses_the_excess() -> None:
    async with backend(echo) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers, max_connections=2) as proxy:
            first, second = await proxy.connect(), await proxy.connect()
            for stream in (first, second):
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    await stream.receive()
            async with await proxy.connect() as third:
                assert await receive_all(third) == b""
            await first.aclose()
            await second.aclose()


async def test_thousand_concurrent_connections_lose_no_byte() -> None:
    count, size = 1000, 32 * 1024
    async with backend(echo) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers) as proxy:
            failures: list[str] = []
            all_open = anyio.Event()
            peak = 0

            async def one(index: int) -> None:
                nonlocal peak
                payload = os.urandom(size)
                prefix = handshake("mc.example.com")
                async with await proxy.connect() as stream:
                    await stream.send(prefix + payload)
                    received = bytearray()
                    while len(received) < len(prefix) + size:
                        received += await stream.receive()
                    peak = max(peak, await proxy.on_reactor(lambda ctx: len(ctx.connections)))
                    if peak == count:
                        all_open.set()
                    await all_open.wait()  # every connection is open at the same time
                if hashlib.sha256(received).digest() != hashlib.sha256(prefix + payload).digest():
                    failures.append(f"connection {index}: checksum mismatch")

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for index in range(count):
                        tg.start_soon(one, index)
            assert failures == []
            assert peak == count
        assert b.connections == count


async def test_a_slow_client_stops_the_backend_from_being_read() -> None:
    chunk = b"z" * 65536

    async def firehose(stream: SocketStream, info: Backend) -> None:
        await stream.receive()
        with anyio.move_on_after(10):
            while True:
                await stream.send(chunk)

    async with backend(firehose) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers) as proxy, await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com"))
            # the client reads nothing; wait until the proxy pushes back
            await proxy.wait_on_reactor(
                lambda ctx: any(c.down is not None and c.down.blocked for c in ctx.connections), 10
            )

            def backend_read_and_held(ctx: ProxyContext) -> tuple[int, int]:
                (conn,) = ctx.connections
                return conn.bmask & EPOLLIN, conn.down.pending + len(conn.down.out or b"")

            reading, held = await proxy.on_reactor(backend_read_and_held)
            # the backend is no longer read: what the proxy holds stops at one pipe
            assert not reading
            assert held <= max(PIPE_SIZE, COPY_READ_BYTES)
            received = 0
            with anyio.fail_after(10):
                while received < 8 * 1024 * 1024:  # reading resumes the flow
                    received += len(await stream.receive())


@pytest.mark.parametrize(
    ("global_timeout", "server_timeout"),
    [(0.5, None), (60.0, 0.5), (0.0, 0.5)],  # the server's own (Infrarust's timeouts.connect)
)
async def test_an_address_that_never_answers_times_out_and_the_next_is_tried(
    global_timeout: float, server_timeout: float | None
) -> None:
    # A loopback listener that never accepts, its backlog filled: further SYNs are
    # dropped, so a dial to it hangs until connect_timeout.
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        fillers = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(stuck.getsockname())
            fillers.append(filler)
        try:
            async with backend(named(b"second")) as second:
                stuck_address = f"127.0.0.1:{stuck.getsockname()[1]}"
                addresses = [stuck_address, second.address]
                extra = {"connect_timeout": server_timeout} if server_timeout else {}
                servers = [server("mc", "mc.example.com", addresses=addresses, **extra)]
                async with running_proxy(servers, connect_timeout=global_timeout) as proxy:
                    async with await proxy.connect() as stream:
                        await stream.send(handshake("mc.example.com"))
                        with anyio.fail_after(5):
                            assert await stream.receive() == b"second"
                    assert await proxy.on_reactor(lambda ctx: len(ctx.dialing)) == 0
        finally:
            for filler in fillers:
                filler.close()
