"""Pre-1.7 logins (1.2.5-1.6.4, packet 0x02) through the proxy, built byte by byte as
the protocol documents them (no maintained client speaks it): routed by the host in the
handshake and forwarded to a backend that answers as a 1.6 server does (0xFD, the
encryption request, which it sends in offline mode too); the host rewritten with
domain_rewrite; unknown hosts, bans by username and unreachable backends answered with a
legacy Kick (0xFF) the old client can show."""

from __future__ import annotations

import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.guard import Ban, BanList, save_bans
from discoproxy.protocol import minecraft
from tests.proxy.helpers import Backend, backend, running_proxy, server
from tests.proxy.test_guard_pipeline import attempt

pytestmark = pytest.mark.anyio

# What a 1.6 server sends after the handshake: 0xFD, server id "-" (offline), a public
# key and a verify token (short length-prefixed byte arrays).
ENCRYPTION_REQUEST = (
    b"\xfd" + struct.pack(">H", 1) + "-".encode("utf-16-be") + b"\x00\x03key\x00\x04tokn"
)


def legacy_server(
    seen: list[minecraft.LegacyLogin],
) -> Callable[[SocketStream, Backend], Awaitable[None]]:
    async def handler(stream: SocketStream, info: Backend) -> None:
        buffer = b""
        while (login := minecraft.parse_legacy_login(buffer)) is minecraft.NEED_DATA:
            buffer += await stream.receive()
        assert isinstance(login, minecraft.LegacyLogin)
        seen.append(login)
        await stream.send(ENCRYPTION_REQUEST)

    return handler


def kick_text(reply: bytes) -> str:
    assert reply[:1] == b"\xff", reply
    (units,) = struct.unpack(">H", reply[1:3])
    return reply[3 : 3 + 2 * units].decode("utf-16-be")


@pytest.mark.parametrize("protocol", [78, 61, 39, 0], ids=["1.6.4", "1.5.2", "1.3.1", "1.2.5"])
async def test_a_legacy_login_is_routed_by_its_host_and_reaches_the_backend(protocol: int) -> None:
    seen: list[minecraft.LegacyLogin] = []
    async with backend(legacy_server(seen)) as info:
        routes = [
            server("old", "old.example.com", addresses=[info.address]),
            server("other", "other.example.com", addresses=["127.0.0.1:1"]),
        ]
        async with running_proxy(routes) as proxy:
            wire = minecraft.encode_legacy_login(protocol, "Steve", "Old.Example.com", 25565)
            assert await attempt(proxy, wire) == ENCRYPTION_REQUEST
    (login,) = seen
    assert (login.protocol_version, login.username, login.raw_host) == (
        protocol,
        "Steve",
        "Old.Example.com",  # forwarded exactly as sent
    )


@pytest.mark.parametrize("protocol", [78, 0])
async def test_domain_rewrite_rewrites_the_legacy_handshakes_host(protocol: int) -> None:
    seen: list[minecraft.LegacyLogin] = []
    async with backend(legacy_server(seen)) as info:
        routes = [
            server(
                "old", "old.example.com", addresses=[info.address], domain_rewrite="internal.lan"
            )
        ]
        async with running_proxy(routes) as proxy:
            wire = minecraft.encode_legacy_login(protocol, "Steve", "old.example.com", 25565)
            assert await attempt(proxy, wire) == ENCRYPTION_REQUEST
    (login,) = seen
    assert (login.raw_host, login.username, login.port) == ("internal.lan", "Steve", 25565)


async def test_unknown_hosts_banned_names_and_dead_backends_get_a_legacy_kick(
    tmp_path: Path,
) -> None:
    bans_file = tmp_path / "bans.json"
    save_bans(bans_file, BanList([Ban("griefing", time.time(), None, username="Griefer")]))
    routes = [server("dead", "dead.example.com", addresses=["127.0.0.1:1"])]
    async with running_proxy(routes, bans_file=str(bans_file)) as proxy:
        with anyio.fail_after(5):
            while not proxy.ctx.guard.bans.has_usernames:
                await anyio.sleep(0.02)
        unknown = minecraft.encode_legacy_login(78, "Steve", "nowhere.example.com", 25565)
        assert "nowhere.example.com" in kick_text(await attempt(proxy, unknown))
        banned = minecraft.encode_legacy_login(78, "griefer", "dead.example.com", 25565)
        assert kick_text(await attempt(proxy, banned)).endswith("griefing")
        dead = minecraft.encode_legacy_login(78, "Steve", "dead.example.com", 25565)
        assert "unreachable" in kick_text(await attempt(proxy, dead)).lower()


async def test_a_malformed_legacy_login_closes_that_connection_only() -> None:
    seen: list[minecraft.LegacyLogin] = []
    async with backend(legacy_server(seen)) as info:
        routes = [server("old", "old.example.com", addresses=[info.address])]
        async with running_proxy(routes) as proxy:
            bad = b"\x02\x4e" + struct.pack(">H", 500)  # a username past the cap
            assert await attempt(proxy, bad) == b""
            good = minecraft.encode_legacy_login(78, "Steve", "old.example.com", 25565)
            assert await attempt(proxy, good) == ENCRYPTION_REQUEST
