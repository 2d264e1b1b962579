"""A bug met by one connection ends that connection cleanly, from whichever path it came:
the first synchronous read after accept, a later epoll event, a call posted from the
asyncio loop, a reactor timer or sweep. Its fds are closed, it is in no set, it is counted
as an internal error, and everything else keeps serving."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from discoproxy.proxy import connection as connection_module
from discoproxy.proxy.connection import ClientConnection
from tests.proxy.helpers import backend, handshake, named, receive_all, running_proxy, server

pytestmark = pytest.mark.anyio


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _failing_once(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, except that the first call raises (a bug met by one connection)."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected sniff failure")
        return real(*args, **kwargs)

    return wrapper


async def _state(proxy: Any) -> tuple[int, int, int, int]:
    ctx = proxy.ctx
    return await ctx.reactor.run(
        lambda: (
            len(ctx.connections),
            len(ctx.handshaking),
            len(ctx.dialing),
            ctx.stats.internal_errors,
        )
    )


async def test_a_failure_in_the_first_read_after_accept_ends_that_connection_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        connection_module, "detect_protocol", _failing_once(connection_module.detect_protocol)
    )
    async with backend(named(b"survival")) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers, shutdown_timeout=30) as proxy:
            before = _open_fds()
            # the handshake is there at accept (TCP_DEFER_ACCEPT): start() sniffs it at once
            async with await proxy.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    assert await receive_all(stream) == b""  # closed, not left hanging
            with anyio.fail_after(5):
                while (await _state(proxy))[0]:
                    await anyio.sleep(0.01)
            assert await _state(proxy) == (0, 0, 0, 1)
            assert _open_fds() <= before
            # the next connection is served as usual
            async with await proxy.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    assert await stream.receive() == b"survival"
        # and shutdown does not wait for a leaked connection (shutdown_timeout is 30 s)


async def test_a_failure_in_a_call_from_the_loop_ends_that_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = ClientConnection._resolved
    monkeypatch.setattr(ClientConnection, "_resolved", _failing_once(real))
    async with backend(named(b"survival")) as b:
        # a host name: resolved on the asyncio loop, the answer posted back to the reactor
        servers = [server("mc", "mc.example.com", addresses=[f"localhost:{b.port}"])]
        async with running_proxy(servers, shutdown_timeout=30) as proxy:
            async with await proxy.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    assert await receive_all(stream) == b""
            with anyio.fail_after(5):
                while (await _state(proxy))[0]:
                    await anyio.sleep(0.01)
            assert await _state(proxy) == (0, 0, 0, 1)


async def test_a_failure_in_a_sweep_ends_that_connection_and_not_the_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        ClientConnection,
        "handshake_timed_out",
        _failing_once(ClientConnection.handshake_timed_out),
    )
    async with running_proxy([], handshake_timeout=0.2) as proxy:
        first = await proxy.connect()
        second = await proxy.connect()
        async with first, second:
            await first.send(b"\x10")  # an incomplete handshake: both wait for the sweep
            await second.send(b"\x10")
            with anyio.fail_after(5):
                assert await receive_all(first) == b""
                assert await receive_all(second) == b""
        assert await _state(proxy) == (0, 0, 0, 1)


async def test_a_bad_packet_sent_while_a_status_answer_was_pending_is_a_protocol_error() -> None:
    """The client's bytes that arrived while the backend's status answer was awaited are
    read when it comes: a malformed packet there closes the connection as any protocol
    error does (a refusal, with its reason), not as a bug of ours."""
    import json

    from discoproxy.protocol import minecraft
    from tests.proxy.helpers import Backend

    async def slow_status(stream: Any, info: Backend) -> None:
        await stream.receive()  # the proxy's handshake and status request
        await anyio.sleep(0.5)  # the client's next bytes arrive meanwhile
        document = {"version": {"name": "x", "protocol": 765}, "description": "slow"}
        await stream.send(minecraft.encode_status_response(json.dumps(document)))

    async with backend(slow_status) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address], status_cache_ttl=0)]
        async with running_proxy(servers) as proxy:
            async with await proxy.connect() as stream:
                too_long = minecraft.encode_varint(200) + b"\x00" * 200  # over the 64-byte cap
                await stream.send(handshake("mc.example.com", 1) + b"\x01\x00" + too_long)
                with anyio.fail_after(5):
                    await receive_all(stream)  # the answer, then closed
            with anyio.fail_after(5):
                while (await _state(proxy))[0]:
                    await anyio.sleep(0.01)
            assert (await _state(proxy))[3] == 0  # not an internal error
            rejected = await proxy.ctx.reactor.run(lambda: dict(proxy.ctx.stats.rejected))
            assert any("protocol error" in str(key) for key in rejected), rejected
