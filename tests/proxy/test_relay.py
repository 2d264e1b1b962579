"""The forwarding fast path: splice through pooled pipes, its copy fallback, resets, names."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import threading
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.proxy import relay
from discoproxy.proxy.connection import ClientConnection
from discoproxy.proxy.relay import COPY_READ_BYTES, Flow
from discoproxy.proxy.server import ProxyContext
from tests.proxy.helpers import (
    Backend,
    RunningProxy,
    backend,
    echo,
    handshake,
    receive_all,
    running_proxy,
    server,
)

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024


async def _echo_round_trip(proxy: RunningProxy, size: int) -> tuple[bytes, bytes]:
    """Send ``size`` random bytes through an echo route while reading them back."""
    payload = os.urandom(size)
    prefix = handshake("mc.example.com")
    received = bytearray()
    async with await proxy.connect() as stream:

        async def send() -> None:
            await stream.send(prefix)
            view = memoryview(payload)
            for offset in range(0, size, 256 * 1024):
                await stream.send(view[offset : offset + 256 * 1024])
            await stream.send_eof()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                while len(received) < len(prefix) + size:
                    received += await stream.receive()
    return hashlib.sha256(prefix + payload).digest(), hashlib.sha256(received).digest()


async def test_a_large_transfer_each_way_arrives_intact() -> None:
    async with backend(echo) as b:
        async with running_proxy([server("mc", "mc.example.com", addresses=[b.address])]) as p:
            sent, received = await _echo_round_trip(p, 32 * MIB)
            assert sent == received
            # every pipe came back
            assert await p.on_reactor(lambda ctx: ctx.reactor.pipes.in_flight) == 0


async def test_without_pipes_flows_copy_and_still_arrive_intact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay, "MAX_PIPES_IN_FLIGHT", 0)
    async with backend(echo) as b:
        async with running_proxy([server("mc", "mc.example.com", addresses=[b.address])]) as p:
            sent, received = await _echo_round_trip(p, 8 * MIB)
            assert sent == received
            assert await p.on_reactor(lambda ctx: ctx.reactor.pipes.in_flight) == 0


@pytest.mark.parametrize("pipes", [True, False], ids=["splice", "copy"])
async def test_a_slow_backend_stops_the_client_from_being_read(
    pipes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pipes:
        monkeypatch.setattr(relay, "MAX_PIPES_IN_FLIGHT", 0)
    # a raw socket, not an anyio stream: anyio's protocol reads eagerly into its buffer
    listener = socket.create_server(("127.0.0.1", 0))
    got = 0

    def serve_slowly(release: threading.Event) -> None:
        nonlocal got
        conn, _ = listener.accept()
        with conn:
            release.wait(20)  # read nothing until told
            while True:  # then everything, to EOF
                data = conn.recv(MIB)
                if not data:
                    return
                got += len(data)

    release = threading.Event()
    thread = threading.Thread(target=serve_slowly, args=(release,), daemon=True)
    thread.start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        servers = [server("mc", "mc.example.com", addresses=[address])]
        async with running_proxy(servers) as proxy, await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com"))

            async def push() -> None:
                chunk = b"u" * 65536
                with anyio.move_on_after(20):
                    while True:
                        await stream.send(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(push)
                # the backend reads nothing: the proxy must push back
                await proxy.wait_on_reactor(
                    lambda ctx: any(c.up is not None and c.up.blocked for c in ctx.connections),
                    10,
                )

                def upload(ctx: ProxyContext) -> tuple[int, int, bool]:
                    (conn,) = ctx.connections
                    held = conn.up.pending + len(conn.up.out or b"")
                    return conn.cmask & select.EPOLLIN, held, conn.up.pipe is not None

                reading, held, piped = await proxy.on_reactor(upload)
                assert not reading  # the client is not read
                assert held <= (relay.PIPE_SIZE if pipes else COPY_READ_BYTES)
                assert piped is pipes
                release.set()
                with anyio.fail_after(10):
                    while got < 8 * MIB:  # reading resumes the flow
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
    finally:
        release.set()
        listener.close()
        thread.join(5)


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _closed(proxy: RunningProxy, conn: ClientConnection) -> str:
    """Why ``conn`` closed, once it has (its state is the reactor thread's)."""
    await proxy.wait_on_reactor(lambda _: conn.state.name == "CLOSED")
    return await proxy.on_reactor(lambda _: conn.reason)


async def test_a_client_reset_mid_stream_closes_the_backend_side() -> None:
    backend_saw: list[bytes] = []

    async def record(stream: SocketStream, info: Backend) -> None:
        data = b""
        with anyio.fail_after(5):
            async for chunk in stream:
                data += chunk
        backend_saw.append(data)

    async with backend(record) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers) as proxy:
            raw = socket.create_connection(("127.0.0.1", proxy.port))
            raw.sendall(handshake("mc.example.com") + b"x" * 1000)
            await proxy.wait_on_reactor(lambda ctx: ctx.connections)
            (conn,) = await proxy.connections()
            sent = len(handshake("mc.example.com")) + 1000
            await proxy.wait_on_reactor(lambda _: conn.bytes_up >= sent)
            _reset(raw)
            assert (await _closed(proxy, conn)).startswith("client reset")
            with anyio.fail_after(5):
                while not backend_saw:
                    await anyio.sleep(0.01)
    assert backend_saw[0].endswith(b"x" * 1000)  # what came before the reset got through


async def test_a_backend_reset_mid_stream_closes_the_client() -> None:
    async def reset_after_first_chunk(stream: SocketStream, info: Backend) -> None:
        await stream.receive()
        await stream.send(b"partial")
        await anyio.sleep(0.1)
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # with a zero linger: an RST

    async with backend(reset_after_first_chunk) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers) as proxy, await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com"))
            with anyio.fail_after(5):
                assert await stream.receive() == b"partial"
            (conn,) = await proxy.connections()
            assert (await _closed(proxy, conn)).startswith("backend reset")
            assert await receive_all(stream) == b""


async def test_half_close_from_the_backend_keeps_the_upload_open() -> None:
    async def greet_then_listen(stream: SocketStream, info: Backend) -> None:
        await stream.receive()
        await stream.send(b"banner")
        await stream.send_eof()  # the backend is done talking, not listening
        info.received.append(await receive_all(stream))

    async with backend(greet_then_listen) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers) as proxy, await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com"))
            assert await receive_all(stream) == b"banner"  # EOF from the backend arrived
            (conn,) = await proxy.connections()  # still open: the upload continues
            await stream.send(b"still uploading")
            await stream.send_eof()
            assert await _closed(proxy, conn) == "both sides closed"
            with anyio.fail_after(5):
                while not b.received:
                    await anyio.sleep(0.01)
    assert b.received == [b"still uploading"]


def _fake_resolver(
    monkeypatch: pytest.MonkeyPatch, proxy: RunningProxy, answers: dict[str, list[str]]
) -> list[str]:
    """Make the proxy's loop resolve ``answers``' names to those IPv4s; log each lookup."""
    lookups: list[str] = []

    async def getaddrinfo(host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        lookups.append(host)
        family, kind = socket.AF_INET, socket.SOCK_STREAM
        return [(family, kind, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(proxy.ctx.loop, "getaddrinfo", getaddrinfo)
    return lookups


async def test_a_backend_name_is_resolved_and_each_address_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with backend(echo) as b:
        servers = [server("mc", "mc.example.com", addresses=[f"backend.test:{b.port}"])]
        async with running_proxy(servers) as proxy:
            # 127.0.0.2 is loopback too, but the backend listens on 127.0.0.1 only
            _fake_resolver(monkeypatch, proxy, {"backend.test": ["127.0.0.2", "127.0.0.1"]})
            async with await proxy.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    assert await stream.receive() == handshake("mc.example.com")
                (conn,) = await proxy.connections()
                assert await proxy.on_reactor(lambda _: conn.backend_addr) == ("127.0.0.1", b.port)
            # the refusing address made it forget the name: the next connection asks again
            assert await proxy.on_reactor(lambda ctx: ctx.names.get("backend.test", b.port)) is None


async def test_an_unresolvable_backend_name_gives_the_player_a_disconnect() -> None:
    servers = [server("mc", "mc.example.com", addresses=["no-such-host.invalid:25565"])]
    async with running_proxy(servers) as proxy, await proxy.connect() as stream:
        await stream.send(handshake("mc.example.com"))
        reply = await receive_all(stream)
    assert b"unreachable" in reply


async def test_a_bug_in_one_connection_drops_it_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with backend(echo) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers) as proxy:
            async with await proxy.connect() as healthy:
                await healthy.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    await healthy.receive()

                async with await proxy.connect() as victim:
                    await victim.send(handshake("mc.example.com"))
                    with anyio.fail_after(5):
                        await victim.receive()
                    (conn,) = await proxy.on_reactor(
                        lambda ctx: [c for c in ctx.connections if c.id == 2]
                    )
                    pump = Flow.pump

                    def broken(self: Flow) -> None:
                        if self.conn is conn:
                            raise RuntimeError("bug")
                        pump(self)

                    monkeypatch.setattr(Flow, "pump", broken)
                    await victim.send(b"boom")
                    assert (await _closed(proxy, conn)).startswith("internal error")
                    assert await receive_all(victim) == b""
                await healthy.send(b"still fine")
                with anyio.fail_after(5):
                    assert await healthy.receive() == b"still fine"


async def test_the_proxy_fails_loudly_when_its_reactor_dies() -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        async with running_proxy([]) as proxy:

            def die() -> None:
                raise SystemExit("reactor killed")

            proxy.ctx.reactor.call(die)
            with anyio.fail_after(5):
                await anyio.sleep_forever()
    assert caught.group_contains(RuntimeError, match="reactor thread failed")


async def test_ipv6_listener_and_ipv6_backend() -> None:
    listener = await anyio.create_tcp_listener(local_host="::1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve(stream: SocketStream) -> None:
        async with stream:
            data = await stream.receive()
            peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
            await stream.send(data + str(peer[0]).encode())

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        servers = [server("mc", "mc.example.com", addresses=[f"[::1]:{port}"])]
        async with running_proxy(servers, bind=["[::1]:0"]) as proxy:
            assert proxy.address[0] == "::1"
            async with await anyio.connect_tcp("::1", proxy.port) as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    reply = await stream.receive()
        tg.cancel_scope.cancel()
    assert reply == handshake("mc.example.com") + b"::1"


async def test_a_backend_name_is_resolved_once_for_many_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with backend(echo) as b:
        servers = [server("mc", "mc.example.com", addresses=[f"backend.test:{b.port}"])]
        async with running_proxy(servers) as proxy:
            lookups = _fake_resolver(monkeypatch, proxy, {"backend.test": ["127.0.0.1"]})
            for _ in range(5):
                async with await proxy.connect() as stream:
                    await stream.send(handshake("mc.example.com"))
                    with anyio.fail_after(5):
                        assert await stream.receive() == handshake("mc.example.com")
            assert lookups == ["backend.test"]
            # as a failed dial does
            await proxy.on_reactor(lambda ctx: ctx.names.forget("backend.test", b.port))
            async with await proxy.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    await stream.receive()
            assert lookups == ["backend.test", "backend.test"]
