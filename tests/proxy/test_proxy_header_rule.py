"""One rule for the PROXY v2 header a backend gets, however discoproxy reached it
(passthrough, TLS termination, a status ping it sends for a player): the source is the
real client, the destination the address that client reached — the proxy's listener."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.model import ServerDefinition
from discoproxy.protocol import minecraft
from discoproxy.protocol.proxy_protocol import ProxyHeader, parse_proxy_header
from tests.proxy.helpers import Backend, backend, handshake, running_proxy, server
from tests.proxy.test_tls_termination import make_cert, talk

pytestmark = pytest.mark.anyio

Seen = list[tuple[object, object]]
STATUS = json.dumps({"version": {"name": "1.21", "protocol": 767}, "players": {"max": 1}})


async def _read_header(stream: SocketStream) -> tuple[ProxyHeader, bytes]:
    buffer = b""
    with anyio.fail_after(5):
        while True:
            buffer += await stream.receive()
            header = parse_proxy_header(buffer)
            if isinstance(header, ProxyHeader):
                return header, buffer[header.length :]


def recording(
    seen: Seen, reply: Callable[[bytes], bytes]
) -> Callable[[SocketStream, Backend], Awaitable[None]]:
    """A backend that records the header's (source, destination), then answers what
    follows it with ``reply``."""

    async def handler(stream: SocketStream, info: Backend) -> None:
        header, rest = await _read_header(stream)
        seen.append((header.source, header.destination))
        if not rest:
            rest = await stream.receive()
        await stream.send(reply(rest))

    return handler


async def test_terminated_tls_sends_the_listener_as_destination(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "a.example.com")
    seen: Seen = []
    async with backend(recording(seen, bytes.upper)) as b:
        route = ServerDefinition.model_validate(
            {
                "id": "a",
                "domains": ["a.example.com"],
                "addresses": [b.address],
                "send_proxy_protocol": True,
                "tls": {"cert": str(cert), "key": str(key)},
            }
        )
        async with running_proxy([route]) as proxy:
            _, answer = await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"hi")
            assert answer == b"HI"
    ((source, destination),) = seen
    assert isinstance(source, tuple) and source[0] == "127.0.0.1"
    assert destination == ("127.0.0.1", proxy.port)


async def test_a_status_ping_for_a_player_sends_the_listener_as_destination() -> None:
    seen: Seen = []
    answer = minecraft.encode_status_response(STATUS)
    async with backend(recording(seen, lambda _: answer)) as b:
        route = server("mc", "mc.example.com", addresses=[b.address], send_proxy_protocol=True)
        async with running_proxy([route], status_cache_ttl=0) as proxy:
            async with await proxy.connect() as stream:
                local = stream.extra(anyio.abc.SocketAttribute.local_address)
                await stream.send(handshake("mc.example.com", next_state=1) + b"\x01\x00")
                with anyio.fail_after(5):
                    assert await stream.receive()
    ((source, destination),) = seen
    assert source == (local[0], local[1])
    assert destination == ("127.0.0.1", proxy.port)
