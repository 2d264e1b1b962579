"""The Minecraft front door in-process: status cache, MOTD states, legacy pings,
domain_rewrite and wake-on-connect, against scripted backends on loopback.

The real-peer versions (mcstatus, npm minecraft-protocol, a Docker engine) are in
``integration/``; these pin the rules of ``discoproxy/status.py`` and ``wake.py`` and the
pipeline steps in ``connection.py`` that use them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.config import ProxyConfig
from discoproxy.protocol import minecraft
from discoproxy.protocol.errors import NeedData
from discoproxy.protocol.proxy_protocol import ProxyHeader, parse_proxy_header
from discoproxy.proxy.planes import EventOutbox
from discoproxy.routing import Registry
from discoproxy.status import StatusService, StatusState
from discoproxy.wake import Waker
from tests.proxy.helpers import (
    Backend,
    RunningProxy,
    backend,
    handshake,
    read_string,
    receive_all,
    running_proxy,
    server,
)
from tests.support import FakeClock

pytestmark = pytest.mark.anyio


@dataclass
class McBackend:
    """What a scripted Minecraft backend saw: handshakes, PROXY headers, pings."""

    handshakes: list[minecraft.Handshake] = field(default_factory=list)
    headers: list[ProxyHeader] = field(default_factory=list)
    status_pings: int = 0
    description: str = "backend-A"
    online: int = 3  # the players its status answers count
    open_now: int = 0
    most_open: int = 0


def minecraft_backend(seen: McBackend) -> Callable[[SocketStream, Backend], Awaitable[None]]:
    """Answers status like a server (version 765) and a login with a Disconnect that
    names the host it was asked for."""

    async def handler(stream: SocketStream, info: Backend) -> None:
        seen.open_now += 1
        seen.most_open = max(seen.most_open, seen.open_now)
        try:
            await answer(stream)
        finally:
            seen.open_now -= 1

    async def answer(stream: SocketStream) -> None:
        buffer = bytearray(await stream.receive())
        if buffer.startswith((b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n")):
            while isinstance(header := parse_proxy_header(buffer), NeedData):
                buffer += await stream.receive()
            assert isinstance(header, ProxyHeader)
            seen.headers.append(header)
            del buffer[: header.length]
        while isinstance(hs := minecraft.parse_handshake(buffer), NeedData):
            buffer += await stream.receive()
        seen.handshakes.append(hs)
        del buffer[: hs.length]
        if hs.next_state != 1:
            text = minecraft.text_component(f"login for {hs.raw_address}")
            await stream.send(minecraft.encode_login_disconnect(text))
            return
        while True:
            while isinstance(packet := minecraft.parse_packet(buffer), NeedData):
                buffer += await stream.receive()
            del buffer[: packet.length]
            if packet.packet_id == 0:
                seen.status_pings += 1
                document = {
                    "version": {"name": "Paper 1.20.4", "protocol": hs.protocol_version},
                    "players": {"max": 20, "online": seen.online, "sample": []},
                    "description": {"text": seen.description},
                }
                await stream.send(minecraft.encode_status_response(json.dumps(document)))
            else:
                await stream.send(minecraft.encode_pong(packet.payload))
                return

    return handler


@asynccontextmanager
async def mc_backend() -> AsyncIterator[tuple[Backend, McBackend]]:
    seen = McBackend()
    async with backend(minecraft_backend(seen)) as info:
        yield info, seen


async def status_ping(
    proxy: RunningProxy, domain: str, protocol: int = 765
) -> tuple[dict[str, Any], bytes]:
    """A full server-list ping; the status document and the proxy's raw answer."""
    stream = await proxy.connect()
    async with stream:
        ping = minecraft.encode_packet(0x01, b"12345678")
        hello = minecraft.encode_handshake(protocol, domain, 25565, 1)
        await stream.send(hello + minecraft.encode_packet(0x00, b"") + ping)
        reply = await receive_all(stream)
    status = minecraft.parse_packet(reply)
    assert isinstance(status, minecraft.Packet), reply
    pong = minecraft.parse_packet(reply[status.length :])
    assert isinstance(pong, minecraft.Packet) and pong.payload == b"12345678", reply
    return json.loads(read_string(status.payload)), reply


async def login(proxy: RunningProxy, domain: str) -> str:
    """Send a login handshake; the Disconnect text the client gets back."""
    stream = await proxy.connect()
    async with stream:
        await stream.send(handshake(domain) + minecraft.encode_packet(0x00, b"\x06tester"))
        reply = await receive_all(stream)
    packet = minecraft.parse_packet(reply)
    assert isinstance(packet, minecraft.Packet) and packet.packet_id == 0, reply
    return str(json.loads(read_string(packet.payload))["text"])


def plain(document: dict[str, Any]) -> str:
    description = document["description"]
    return description if isinstance(description, str) else str(description.get("text", ""))


async def test_a_fresh_status_is_served_from_cache_without_the_backend() -> None:
    async with mc_backend() as (info, seen):
        routes = [server("a", "a.example.com", addresses=[info.address], status_cache_ttl=30)]
        async with running_proxy(routes) as proxy:
            first, _ = await status_ping(proxy, "a.example.com")
            second, _ = await status_ping(proxy, "a.example.com")
            assert plain(first) == plain(second) == "backend-A"
            assert seen.status_pings == 1
            assert await proxy.ctx.reactor.run(lambda: proxy.ctx.status.reactor_hits) == 1
            await status_ping(proxy, "a.example.com", protocol=47)  # another protocol
            assert seen.status_pings == 2


async def test_status_cache_ttl_zero_asks_the_backend_every_time() -> None:
    async with mc_backend() as (info, seen):
        routes = [server("a", "a.example.com", addresses=[info.address], status_cache_ttl=0)]
        async with running_proxy(routes) as proxy:
            for _ in range(3):
                await status_ping(proxy, "a.example.com")
            assert seen.status_pings == 3


async def test_concurrent_pings_on_a_miss_share_one_backend_ping() -> None:
    async with mc_backend() as (info, seen):
        route = server("a", "a.example.com", addresses=[info.address])
        registry = Registry()
        registry.apply_snapshot("test", [route])
        from discoproxy.config import ProxyConfig

        service = StatusService(ProxyConfig(), Waker(registry, {}))
        (live,) = registry.table.routes
        answers: list[tuple[str, StatusState]] = []

        async def ask() -> None:
            answers.append(await service.answer(live, 765, "a.example.com", 25565, None))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(ask)
        assert seen.status_pings == 1
        assert {state for _, state in answers} == {StatusState.ONLINE}


async def test_a_failed_refresh_serves_the_stale_answer_then_unreachable() -> None:
    clock = FakeClock()
    async with running_proxy(status_stale_for=2, status_timeout=1) as proxy:
        proxy.ctx.status.clock = clock  # before the first ping: every entry uses it
        async with mc_backend() as (info, seen):
            route = server("a", "a.example.com", addresses=[info.address], status_cache_ttl=1)
            proxy.registry.apply_snapshot("test", [route])
            await status_ping(proxy, "a.example.com")
            clock.advance(0.5)  # inside the TTL: from the cache, the backend not asked
            await status_ping(proxy, "a.example.com")
            assert seen.status_pings == 1
            assert await proxy.on_reactor(lambda ctx: ctx.status.reactor_hits) == 1
        # the backend is gone: its port refuses
        clock.advance(0.5)  # exactly the TTL: no longer fresh, the refresh fails
        stale, _ = await status_ping(proxy, "a.example.com")
        assert plain(stale) == "backend-A"
        assert proxy.ctx.status.stale == 1
        clock.advance(1.5)  # just inside TTL + status_stale_for: still the stale answer
        stale, _ = await status_ping(proxy, "a.example.com")
        assert plain(stale) == "backend-A"
        assert proxy.ctx.status.stale == 2
        clock.advance(0.5)  # exactly TTL + status_stale_for: unreachable
        gone, _ = await status_ping(proxy, "a.example.com")
        assert plain(gone) == "§ca is unreachable"
        assert gone["version"]["name"] == "offline"
        assert proxy.ctx.status.stale == 2


async def test_unreachable_and_unknown_motds_are_configurable() -> None:
    routes = [
        server(
            "a",
            "a.example.com",
            addresses=["127.0.0.1:1"],
            name="Alpha",
            motds={"unreachable": {"text": "§c{server} is down", "max_players": 7}},
        )
    ]
    motds = {"unknown_domain": {"text": "No such server: {domain}", "version_name": "nope"}}
    async with running_proxy(routes, motds=motds) as proxy:
        down, _ = await status_ping(proxy, "a.example.com")
        assert plain(down) == "§cAlpha is down"
        assert down["players"]["max"] == 7
        unknown, _ = await status_ping(proxy, "zzz.example.com")
        assert plain(unknown) == "No such server: zzz.example.com"
        assert unknown["version"]["name"] == "nope"


async def test_online_motd_patches_the_backend_answer_and_old_clients_get_named_colors() -> None:
    async with mc_backend() as (info, _):
        text = '{"text": "Alpha", "color": "#ff5555"}'
        online = {"text": text, "version_name": "Alpha 1.20", "max_players": 100}
        routes = [server("a", "a.example.com", addresses=[info.address], motds={"online": online})]
        async with running_proxy(routes) as proxy:
            modern, _ = await status_ping(proxy, "a.example.com")
            assert modern["description"] == {"text": "Alpha", "color": "#ff5555"}
            assert modern["version"] == {"name": "Alpha 1.20", "protocol": 765}
            assert modern["players"]["max"] == 100 and modern["players"]["online"] == 3
            old, _ = await status_ping(proxy, "a.example.com", protocol=47)  # 1.8
            assert not old["description"]["color"].startswith("#")


async def test_legacy_pings_are_answered_from_the_status_routed_by_the_1_6_host() -> None:
    async with mc_backend() as (info, seen):
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes) as proxy:
            stream = await proxy.connect()
            async with stream:
                await stream.send(minecraft.encode_legacy_ping_1_6("a.example.com", 25565))
                reply = await receive_all(stream)
            fields = reply[3:].decode("utf-16-be").split("\0")
            assert fields[0] == "§1" and fields[3] == "backend-A", fields
            assert (fields[4], fields[5]) == ("3", "20")
            assert seen.handshakes[-1].server_address == "a.example.com"
            stream = await proxy.connect()
            async with stream:
                await stream.send(b"\xfe")  # Beta: motd§online§max, no default route here
                reply = await receive_all(stream)
            assert reply[3:].decode("utf-16-be").split("§")[1:] == ["0", "0"]


async def test_a_stalled_1_6_ping_is_answered_as_1_4_by_the_default_server() -> None:
    async with mc_backend() as (info, _):
        routes = [server("d", addresses=[info.address], default=True)]
        async with running_proxy(routes) as proxy:
            stream = await proxy.connect()
            async with stream:
                await stream.send(b"\xfe\x01\xfa")  # what mcstatus's LegacyServer sends
                reply = await receive_all(stream)
            assert reply[3:].decode("utf-16-be").split("\0")[3] == "backend-A"


@pytest.mark.parametrize(
    ("rewrite", "expected"), [("mc.internal", "mc.internal"), ("backend", "127.0.0.1")]
)
async def test_domain_rewrite_is_what_the_backend_sees_forge_suffix_kept(
    rewrite: str, expected: str
) -> None:
    async with mc_backend() as (info, seen):
        routes = [server("a", "a.example.com", addresses=[info.address], domain_rewrite=rewrite)]
        async with running_proxy(routes) as proxy:
            assert await login(proxy, "a.example.com") == f"login for {expected}"
            stream = await proxy.connect()
            async with stream:
                forge = minecraft.encode_handshake(
                    765, "a.example.com\0FML3\0", 25565, 2
                ) + minecraft.encode_login_start("tester")
                await stream.send(forge)
                reply = await receive_all(stream)
            packet = minecraft.parse_packet(reply)
            assert isinstance(packet, minecraft.Packet)
            assert json.loads(read_string(packet.payload))["text"] == (
                f"login for {expected}\0FML3\0"
            )
            await status_ping(proxy, "a.example.com")
            assert seen.handshakes[-1].server_address == expected


async def test_status_pings_carry_a_proxy_header_when_the_server_wants_one() -> None:
    async with mc_backend() as (info, seen):
        routes = [server("a", "a.example.com", addresses=[info.address], send_proxy_protocol=True)]
        async with running_proxy(routes) as proxy:
            await status_ping(proxy, "a.example.com")
            assert seen.headers and seen.headers[0].source is not None
            assert seen.headers[0].source[0] == "127.0.0.1"


async def test_login_to_an_unreachable_server_gets_the_configured_message() -> None:
    routes = [server("a", "a.example.com", addresses=["127.0.0.1:1"], name="Alpha")]
    async with running_proxy(routes, unreachable_message="{server} sleeps with the fishes") as p:
        assert await login(p, "a.example.com") == "Alpha sleeps with the fishes"


# -- wake-on-connect --------------------------------------------------------------------


@dataclass
class FakeControl:
    """A provider that 'starts' a server by publishing it with an address."""

    registry: Registry
    running: Any = None
    starts: int = 0
    stops: int = 0
    delay: float = 0.2
    events: list[str] = field(default_factory=list)

    async def start_server(self, server_id: str) -> None:
        self.starts += 1
        await anyio.sleep(self.delay)
        self.registry.apply_snapshot("test", [self.running])

    async def stop_server(self, server_id: str) -> None:
        self.stops += 1


def sleeping_server(**extra: Any) -> Any:
    return server(
        "a", "a.example.com", addresses=[], sleeping=True, auto_start=True, name="Alpha", **extra
    )


@asynccontextmanager
async def waking_proxy(
    running_address: str, **settings: Any
) -> AsyncIterator[tuple[RunningProxy, FakeControl]]:
    async with running_proxy([sleeping_server()], **settings) as proxy:
        running = server(
            "a", "a.example.com", addresses=[running_address], auto_start=True, name="Alpha"
        )
        control = FakeControl(proxy.registry, running)
        proxy.ctx.waker.controls["test"] = control
        yield proxy, control


async def test_a_login_wakes_a_sleeping_server_once_and_is_told_to_come_back() -> None:
    async with mc_backend() as (info, _), waking_proxy(info.address) as (proxy, control):
        sleeping, _ = await status_ping(proxy, "a.example.com")
        assert "Alpha is sleeping" in plain(sleeping)
        texts: list[str] = []

        async def player() -> None:
            texts.append(await login(proxy, "a.example.com"))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(player)
        assert texts == ["Server Alpha is starting, try again in a few seconds"] * 5
        assert control.starts == 1
        with anyio.fail_after(5):
            while proxy.registry.table.routes[0].server.sleeping:
                await anyio.sleep(0.05)
        assert await login(proxy, "a.example.com") == "login for a.example.com"
        assert control.starts == 1


async def test_pings_show_starting_until_the_woken_backend_answers() -> None:
    async with waking_proxy("127.0.0.1:1") as (proxy, _):
        await login(proxy, "a.example.com")
        with anyio.fail_after(5):
            while proxy.registry.table.routes[0].server.sleeping:
                await anyio.sleep(0.05)
        starting, _ = await status_ping(proxy, "a.example.com")
        assert plain(starting).startswith("§eAlpha is starting")
        assert starting["version"]["name"] == "starting"
        # a login while the backend still refuses: starting, not unreachable
        assert "starting" in await login(proxy, "a.example.com")


async def test_auto_start_wait_holds_the_login_and_forwards_it() -> None:
    async with (
        mc_backend() as (info, _),
        waking_proxy(info.address, auto_start_wait=5) as (proxy, control),
    ):
        started = time.monotonic()
        assert await login(proxy, "a.example.com") == "login for a.example.com"
        assert control.starts == 1
        assert time.monotonic() - started >= control.delay


async def test_a_sleeping_server_nothing_can_start_is_unreachable() -> None:
    async with running_proxy([sleeping_server()]) as proxy:
        assert await login(proxy, "a.example.com") == "Server Alpha is unreachable"


async def test_idle_servers_are_stopped_after_auto_stop_after() -> None:
    registry = Registry()
    awake = server("a", "a.example.com", addresses=["127.0.0.1:1"], auto_start=True)
    idle = awake.model_copy(update={"auto_stop_after": 10.0})
    registry.apply_snapshot("test", [idle])
    control = FakeControl(registry)
    clock = FakeClock()
    waker = Waker(registry, {"test": control}, clock=clock)
    waker.events = events = EventOutbox()
    events.wanted = frozenset({"server_stopped"})

    async def stops_after(seconds: float) -> int:
        clock.advance(seconds)
        await waker.stop_idle()
        return control.stops

    assert await stops_after(0) == 0  # first sight: idle from now on
    assert await stops_after(9.5) == 0  # just short of auto_stop_after
    waker.player_joined("a@test")
    assert await stops_after(5) == 0  # past it, but a player is on
    waker.player_left("a@test")
    assert await stops_after(9.5) == 0  # idle counts from when the last player left
    assert await stops_after(0.5) == 1  # exactly auto_stop_after without a player
    ((event, _, data),) = events.drain()  # the webhooks hear of it
    assert event == "server_stopped" and data == {"route": "a@test", "server": "a", "idle_s": 10.0}
    assert await stops_after(9.5) == 1  # not again before another full period
    assert await stops_after(0.5) == 2


async def test_auto_stop_keeps_a_server_whose_backend_counts_players_of_other_instances() -> None:
    """Several discoproxy instances in front of one server: this one has had no player
    for auto_stop_after, but the backend's own status answer counts players (who came
    through another instance), so it is not stopped until that count is 0 too."""
    async with mc_backend() as (info, seen):
        registry = Registry()
        idle = server(
            "a", "a.example.com", addresses=[info.address], auto_start=True, auto_stop_after=10.0
        )
        registry.apply_snapshot("test", [idle])
        control = FakeControl(registry)
        clock = FakeClock()
        waker = Waker(registry, {"test": control}, clock=clock)
        waker.backend_players = StatusService(ProxyConfig(), waker).online_players

        async def stops_after(seconds: float) -> int:
            clock.advance(seconds)
            await waker.stop_idle()
            return control.stops

        assert await stops_after(0) == 0
        assert await stops_after(10) == 0  # idle here, but 3 online at the backend
        pings = seen.status_pings
        assert pings >= 1
        seen.online = 0
        assert await stops_after(9.5) == 0  # asked again only after another period
        assert seen.status_pings == pings
        assert await stops_after(0.5) == 1  # nobody anywhere: stopped


async def test_a_client_cycling_protocol_numbers_cannot_multiply_backend_pings() -> None:
    from discoproxy.status import MAX_PROTOCOLS_PER_SERVER

    async with mc_backend() as (info, seen):
        routes = [server("a", "a.example.com", addresses=[info.address], status_cache_ttl=30)]
        async with running_proxy(routes) as proxy:
            for protocol in range(1, MAX_PROTOCOLS_PER_SERVER + 10):
                document, _ = await status_ping(proxy, "a.example.com", protocol=protocol)
                assert plain(document) == "backend-A"
            assert seen.status_pings == MAX_PROTOCOLS_PER_SERVER


async def test_one_server_gets_one_status_ping_at_a_time_whatever_the_protocols() -> None:
    async with mc_backend() as (info, seen):
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes) as proxy, anyio.create_task_group() as tg:
            for protocol in (47, 340, 765, 766) * 3:
                tg.start_soon(status_ping, proxy, "a.example.com", protocol)
        assert seen.status_pings == 4  # one per protocol
        assert seen.most_open == 1


def ids_kept(*objects: object) -> set[str]:
    """The route ids that keys of the objects' dicts name (a key is an id or (id, …))."""
    ids = set()
    for obj in objects:
        for value in vars(obj).values():
            if isinstance(value, dict):
                ids.update(key[0] if isinstance(key, tuple) else key for key in list(value))
    return ids


async def test_status_and_waker_forget_a_route_once_it_leaves_the_table() -> None:
    async with mc_backend() as (info, _), waking_proxy(info.address) as (proxy, _):
        ctx = proxy.ctx
        assert "starting" in await login(proxy, "a.example.com")  # woken
        with anyio.fail_after(5):
            while proxy.registry.table.routes[0].server.sleeping:
                await anyio.sleep(0.05)
        assert await login(proxy, "a.example.com") == "login for a.example.com"  # a player
        for protocol in (47, 765):
            await status_ping(proxy, "a.example.com", protocol=protocol)
        with anyio.fail_after(5):  # the player's connection is closed on the reactor
            while await ctx.reactor.run(lambda: ctx.waker.players.get("a@test", 0)):
                await anyio.sleep(0.02)
        # the maps are read on the reactor thread, where the player counts live
        assert "a@test" in await ctx.reactor.run(lambda: ids_kept(ctx.status, ctx.waker))

        other = server("b", "b.example.com", addresses=[info.address])
        proxy.registry.apply_snapshot("test", [other])  # a@test leaves
        assert "a@test" not in await ctx.reactor.run(lambda: ids_kept(ctx.status, ctx.waker))


async def test_a_status_ping_in_flight_when_its_route_leaves_stores_nothing() -> None:
    from discoproxy.config import ProxyConfig

    release = anyio.Event()
    answer = minecraft_backend(McBackend())

    async def held(stream: SocketStream, info: Backend) -> None:
        await release.wait()
        await answer(stream, info)

    async with backend(held) as info:
        registry = Registry()
        registry.apply_snapshot("test", [server("a", "a.example.com", addresses=[info.address])])
        service = StatusService(ProxyConfig(), Waker(registry, {}))
        (route,) = registry.table.routes
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.answer, route, 765, "a.example.com", 25565, None)
            with anyio.fail_after(5):
                while not info.connections:  # the backend is being asked
                    await anyio.sleep(0.01)
            registry.apply_snapshot("test", [])
            service.table_changed(registry.table)
            release.set()
        assert "a@test" not in ids_kept(service)


async def test_a_worker_does_not_stop_a_server_whose_backend_does_not_answer_its_count() -> None:
    """A worker of workers = N counts its own players only: with no answer from the
    backend, players on another worker may be on it, so it is not stopped (one process,
    which sees every player of this proxy, still stops it)."""
    registry = Registry()
    idle = server(
        "a", "a.example.com", addresses=["127.0.0.1:1"], auto_start=True, auto_stop_after=10.0
    )
    registry.apply_snapshot("test", [idle])
    stops = []
    for sees_every_player in (False, True):
        control = FakeControl(registry)
        clock = FakeClock()
        waker = Waker(registry, {"test": control}, clock=clock)

        async def no_answer(route: object) -> int | None:
            return None

        waker.backend_players = no_answer
        waker.sees_every_player = sees_every_player
        await waker.stop_idle()
        clock.advance(10)
        await waker.stop_idle()
        stops.append(control.stops)
    assert stops == [0, 1]


async def test_a_worker_does_not_stop_a_server_whose_every_replica_is_held_back() -> None:
    """No address to ask (every replica held back by its HEALTHCHECK) is no answer: a
    worker, which sees its own players only, does not stop it."""
    from discoproxy.model import HeldBack

    registry = Registry()
    held = server(
        "a", "a.example.com", addresses=["127.0.0.1:1"], auto_start=True, auto_stop_after=10.0
    ).model_copy(
        update={
            "addresses": (),
            "held_back": (HeldBack(address="127.0.0.1:1", health="unhealthy"),),
        }
    )
    registry.apply_snapshot("test", [held])
    control = FakeControl(registry)
    clock = FakeClock()
    waker = Waker(registry, {"test": control}, clock=clock)

    async def asked(route: object) -> int | None:
        raise AssertionError("nothing to ask: the route has no address")

    waker.backend_players = asked
    waker.sees_every_player = False
    await waker.stop_idle()
    clock.advance(10)
    await waker.stop_idle()
    assert control.stops == 0
