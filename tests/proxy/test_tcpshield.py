"""TCPShield's real-IP handshake (``host///ip:port///unix-time///signature`` in the
address): routed by its host always, and with ``tcpshield_real_ip`` (Gate Lite's
``tcpShieldRealIP``) the backend is told the player's address in that format, checked by
the handshake a real backend receives."""

from __future__ import annotations

import time
from typing import Any

import pytest
from anyio.abc import SocketAttribute

from discoproxy.proxy.addresses import proxy_v2_header
from tests.proxy.helpers import (
    backend,
    handshake,
    receive_all,
    record_handshakes,
    running_proxy,
    server,
)

pytestmark = pytest.mark.anyio

FORGED = "play.example.com///6.6.6.6:1234///1700000000///c2lnbmF0dXJl"


async def seen(
    address: str,
    proxy_settings: dict[str, Any] | None = None,
    prefix: bytes = b"",
    **extra: Any,
) -> str:
    """The handshake address a backend sees when a client sends *address*; ``{port}`` in
    the answer stands for the client's own port."""
    addresses: list[str] = []
    async with backend(record_handshakes(addresses)) as info:
        routes = [server("play", "play.example.com", addresses=[info.address], **extra)]
        async with running_proxy(routes, **(proxy_settings or {})) as proxy:
            stream = await proxy.connect()
            async with stream:
                port = stream.extra(SocketAttribute.local_address)[1]
                await stream.send(prefix + handshake(address))
                assert await receive_all(stream) == b"ok"
    (got,) = addresses
    return got.replace(f":{port}///", ":{port}///")


def shield_time(address: str) -> int:
    return int(address.split("///")[2].split("\0")[0])


async def test_a_tcpshield_handshake_routes_by_its_host_and_a_clients_own_data_is_dropped() -> None:
    assert await seen(FORGED) == "play.example.com"  # from an untrusted peer: stripped


async def test_behind_a_proxy_header_the_handshakes_data_is_the_clients_and_is_replaced() -> None:
    trusted = {"receive_proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
    header = proxy_v2_header((("203.0.113.9", 4444), ("127.0.0.1", 25565)))
    got = await seen(FORGED, trusted, prefix=header, tcpshield_real_ip=True)
    assert got.startswith("play.example.com///203.0.113.9:4444///"), got
    assert await seen(FORGED, trusted, prefix=header) == "play.example.com"


async def test_the_backend_is_told_the_players_address() -> None:
    before = int(time.time())
    got = await seen("Play.Example.com", tcpshield_real_ip=True)
    host, client, stamp = got.split("///")
    assert host == "Play.Example.com" and client == "127.0.0.1:{port}"
    assert before <= int(stamp) <= time.time() + 1


async def test_real_ip_data_a_client_wrote_itself_is_replaced() -> None:
    got = await seen(FORGED, tcpshield_real_ip=True)
    assert got.startswith("play.example.com///127.0.0.1:{port}///"), got
    assert "6.6.6.6" not in got and "c2lnbmF0dXJl" not in got


async def test_real_ip_data_from_a_trusted_proxy_is_passed_on_as_sent() -> None:
    trusted = {"trusted_proxies": ["127.0.0.1/32"]}
    assert await seen(FORGED, trusted, tcpshield_real_ip=True) == FORGED


async def test_forge_marker_and_domain_rewrite_are_kept_around_it() -> None:
    got = await seen("play.example.com\0FML3\0", tcpshield_real_ip=True, domain_rewrite="mc.local")
    assert got.startswith("mc.local///127.0.0.1:{port}///") and got.endswith("\0FML3\0"), got
    assert shield_time(got) >= int(time.time()) - 5
