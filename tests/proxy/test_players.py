"""Players: every forwarded Minecraft login carries its username (and offline-mode UUID)
in the API and the close line and is counted per route; the global and per-server
``players`` lists, ``wake.allow`` and ``max_players`` refuse at Login Start with their
texts."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from discoproxy.model import offline_uuid
from discoproxy.proxy.access_log import AccessLog
from discoproxy.proxy.stats import take_snapshot
from tests.proxy.helpers import (
    backend,
    handshake,
    keep_open,
    running_proxy,
    server,
)
from tests.proxy.test_guard_pipeline import attempt, disconnect_text, login, rejected, status_ping

pytestmark = pytest.mark.anyio


def test_the_offline_uuid_is_the_one_servers_compute() -> None:
    # Java's UUID.nameUUIDFromBytes("OfflinePlayer:Notch"), as offline-mode servers use
    assert str(offline_uuid("Notch")) == "b50ad385-829d-3141-a216-7e7d7539ba7f"


async def test_a_login_shows_its_player_in_the_api_the_gauge_and_the_close_line() -> None:
    lines: list[str] = []

    async with backend(keep_open) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes) as proxy:
            log = AccessLog("text", lines.append)
            await proxy.on_reactor(lambda ctx: setattr(ctx, "_access", log))
            stream = await proxy.connect()
            async with stream:
                await stream.send(handshake("a.example.com", username="Notch"))
                assert await stream.receive() == b"in"
                snap = await proxy.on_reactor(lambda ctx: take_snapshot(ctx, 10))
                (live,) = snap.connections
                assert live.player == "Notch"
                assert live.uuid == "b50ad385-829d-3141-a216-7e7d7539ba7f"
                assert snap.routes["a@test"].players == 1
            with anyio.fail_after(5):
                while not lines:
                    await anyio.sleep(0.02)
            assert await proxy.on_reactor(lambda ctx: ctx.stats.routes["a@test"].players) == 0
    (line,) = lines
    assert "route=a@test backend=" in line
    assert " player=Notch uuid=b50ad385-829d-3141-a216-7e7d7539ba7f up=" in line


@pytest.mark.parametrize(
    ("settings", "extra", "player", "admitted"),
    [
        ({"players": {"deny": ["Griefer"]}}, {}, "griefer", False),  # any case
        ({"players": {"deny": [str(offline_uuid("Griefer"))]}}, {}, "Griefer", False),
        ({"players": {"allow": ["Steve"]}}, {}, "Alex", False),
        ({"players": {"allow": ["Steve"]}}, {}, "Steve", True),
        ({}, {"players": {"allow": ["Steve"]}}, "Alex", False),
        ({}, {"players": {"allow": ["Steve"], "deny": ["Steve"]}}, "Steve", False),  # deny wins
        ({"players": {"allow": ["Alex"]}}, {"players": {"allow": ["Steve"]}}, "Steve", False),
    ],
)
async def test_players_lists_refuse_at_login_start_with_their_text(
    settings: dict[str, Any], extra: dict[str, Any], player: str, admitted: bool
) -> None:
    async def hello(stream: Any, info: Any) -> None:
        await stream.send(b"in")

    async with backend(hello) as info:
        routes = [server("a", "a.example.com", addresses=[info.address], name="Alpha", **extra)]
        async with running_proxy(routes, **settings) as proxy:
            reply = await attempt(proxy, login("a.example.com", player))
            if admitted:
                assert reply == b"in"
            else:
                assert disconnect_text(reply) == "You are not allowed to join Alpha"
                assert await rejected(proxy, "player not allowed") == 1


async def test_max_players_refuses_the_login_past_it_until_one_leaves() -> None:
    async with backend(keep_open) as info:
        routes = [server("a", "a.example.com", addresses=[info.address], max_players=1)]
        async with running_proxy(routes, server_full_message="{server} full: {max_players}") as p:
            first = await p.connect()
            async with first:
                await first.send(login("a.example.com", "Steve"))
                assert await first.receive() == b"in"
                reply = await attempt(p, login("a.example.com", "Alex"))
                assert disconnect_text(reply) == "a full: 1"
                assert await rejected(p, "server full") == 1
            with anyio.fail_after(5):  # the first left: its place is free again
                while await p.on_reactor(lambda ctx: ctx.stats.routes["a@test"].players):
                    await anyio.sleep(0.02)
            second = await p.connect()
            async with second:
                await second.send(login("a.example.com", "Alex"))
                assert await second.receive() == b"in"


async def test_status_pings_are_not_players() -> None:
    async def answer(stream: Any, info: Any) -> None:
        await stream.send(b"status")

    async with backend(answer) as info:
        routes = [server("a", "a.example.com", addresses=[info.address], max_players=1)]
        async with running_proxy(routes) as proxy:
            await attempt(proxy, status_ping("a.example.com"))
            assert await proxy.on_reactor(lambda ctx: ctx.stats.routes["a@test"].players) == 0


async def test_only_wake_allow_may_wake_a_sleeping_server() -> None:
    routes = [
        server(
            "a",
            "a.example.com",
            addresses=[],
            sleeping=True,
            auto_start=True,
            name="Alpha",
            wake={"allow": ["Steve"]},
        )
    ]
    async with running_proxy(routes) as proxy:
        reply = await attempt(proxy, login("a.example.com", "Alex"))
        assert disconnect_text(reply) == "Alpha is asleep, and you may not wake it"
        assert await rejected(proxy, "player may not wake the server") == 1
        # Steve may: his login goes on to waking it (nothing here can start it)
        reply = await attempt(proxy, login("a.example.com", "Steve"))
        assert "asleep" not in disconnect_text(reply)
