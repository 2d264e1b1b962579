"""The guard in the pipeline, in-process: filters on the real (PROXY-carried) address,
per-IP limits, separate status and login budgets, bans by IP and by username with the
reason shown, and a bans file followed live. Loopback only; other client addresses are
carried in PROXY v2 headers from a trusted 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream
from loguru import logger

from discoproxy.guard import Ban, BanList, client_ip, filter_refusal, save_bans
from discoproxy.model import IpFilterSettings
from discoproxy.protocol import minecraft
from discoproxy.protocol.proxy_protocol import encode_v2
from discoproxy.rejections import Rejection
from tests.proxy.helpers import (
    RunningProxy,
    backend,
    handshake,
    named,
    read_string,
    receive_all,
    running_proxy,
    server,
)
from tests.support import captured_logs

pytestmark = pytest.mark.anyio


def from_ip(client: str) -> bytes:
    """A PROXY v2 header saying the connection comes from ``client``."""
    return encode_v2((client, 40000), ("127.0.0.1", 25565))


async def attempt(proxy: RunningProxy, payload: bytes) -> bytes:
    """Send ``payload``; everything the proxy (or backend) answers until it closes."""
    stream = await proxy.connect()
    async with stream:
        await stream.send(payload)
        try:
            return await receive_all(stream, limit=5)
        except anyio.BrokenResourceError:
            return b""


def login(domain: str, username: str = "tester") -> bytes:
    return handshake(domain, username=username)


def disconnect_text(reply: bytes) -> str:
    packet = minecraft.parse_packet(reply)
    assert isinstance(packet, minecraft.Packet) and packet.packet_id == 0, reply
    return str(json.loads(read_string(packet.payload))["text"])


def status_ping(domain: str) -> bytes:
    return (
        minecraft.encode_handshake(765, domain, 25565, 1)
        + minecraft.encode_packet(0, b"")
        + minecraft.encode_packet(1, b"12345678")
    )


PROXIED = {"receive_proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}


async def rejected(proxy: RunningProxy, cause: str) -> int:
    """Rejections counted for ``cause`` on every listener, as /metrics shows them."""
    return await proxy.on_reactor(
        lambda ctx: sum(n for (_, c), n in ctx.stats.rejected.items() if c == cause)
    )


async def wait_for_bans(proxy: RunningProxy, condition: Callable[[BanList], object]) -> None:
    """Until the guard's ban list (the reactor's) satisfies ``condition``."""
    await proxy.wait_on_reactor(lambda ctx: condition(ctx.guard.bans))


async def test_the_global_filter_uses_the_address_from_the_proxy_header() -> None:
    async with backend(named(b"A")) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        ip_filter = {"deny": ["203.0.113.0/24"]}
        async with running_proxy(routes, ip_filter=ip_filter, **PROXIED) as proxy:
            refused = await attempt(proxy, from_ip("203.0.113.9") + login("a.example.com"))
            assert refused == b""  # closed without a reply, the backend never dialed
            assert info.connections == 0
            allowed = await attempt(proxy, from_ip("198.51.100.9") + login("a.example.com"))
            assert allowed == b"A"
            assert await rejected(proxy, "denied by ip_filter") == 1


async def test_an_allow_list_refuses_everyone_else_and_deny_wins_inside_it() -> None:
    async with backend(named(b"A")) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        ip_filter = {"allow": ["10.0.0.0/8"], "deny": ["10.9.0.0/16"]}
        async with running_proxy(routes, ip_filter=ip_filter, **PROXIED) as proxy:
            assert await attempt(proxy, from_ip("10.1.1.1") + login("a.example.com")) == b"A"
            assert await attempt(proxy, from_ip("10.9.1.1") + login("a.example.com")) == b""
            assert await attempt(proxy, from_ip("192.0.2.1") + login("a.example.com")) == b""


async def test_a_server_filter_narrows_and_the_player_reads_why() -> None:
    async with backend(named(b"A")) as a, backend(named(b"B")) as b:
        routes = [
            server(
                "a", "a.example.com", addresses=[a.address], ip_filter={"allow": ["10.0.0.0/8"]}
            ),
            server("b", "b.example.com", addresses=[b.address]),
        ]
        async with running_proxy(routes, **PROXIED) as proxy:
            reply = await attempt(proxy, from_ip("192.0.2.1") + login("a.example.com"))
            assert disconnect_text(reply) == "You may not join this server from your address"
            assert await attempt(proxy, from_ip("192.0.2.1") + login("b.example.com")) == b"B"
            assert await attempt(proxy, from_ip("10.0.0.1") + login("a.example.com")) == b"A"


def test_every_ip_filter_answer_is_a_rejection_cause() -> None:
    ip = client_ip("192.0.2.1")
    assert ip is not None
    for settings in ({"deny": ["192.0.2.0/24"]}, {"allow": ["10.0.0.0/8"]}):
        why = filter_refusal(IpFilterSettings.model_validate(settings), ip)
        assert why is not None and Rejection(why) == why


async def test_server_filter_refusals_share_one_metric_reason_and_the_log_names_the_route() -> None:
    deny = {"deny": ["192.0.2.0/24"]}
    routes = [
        server(f"s{i}", f"s{i}.example.com", addresses=["127.0.0.1:1"], ip_filter=deny)
        for i in range(20)
    ]
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), format="{message}")
    try:
        async with running_proxy(routes, **PROXIED) as proxy:
            for i in range(20):
                reply = await attempt(proxy, from_ip("192.0.2.1") + login(f"s{i}.example.com"))
                assert disconnect_text(reply) == "You may not join this server from your address"
            ctx = proxy.ctx
            rejected = await ctx.reactor.run(lambda: dict(ctx.stats.rejected))
    finally:
        logger.remove(sink)
    # a label value per route would grow /metrics with every container ever seen
    assert {reason for _, reason in rejected} == {"server ip_filter"}
    assert sum(rejected.values()) == 20
    assert any("rejected 192.0.2.1:40000: s0@test: denied by ip_filter" in line for line in lines)


async def test_max_connections_per_ip_counts_open_connections_of_one_address() -> None:
    async def hold(stream: SocketStream, info: object) -> None:
        await stream.send(b"held")
        async for _ in stream:  # until the client goes
            pass

    async with backend(hold) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, max_connections_per_ip=2, **PROXIED) as proxy:
            held = []
            for _ in range(2):
                stream = await proxy.connect()
                await stream.send(from_ip("198.51.100.1") + login("a.example.com"))
                assert await stream.receive() == b"held"
                held.append(stream)
            assert await attempt(proxy, from_ip("198.51.100.1") + login("a.example.com")) == b""
            other = await proxy.connect()  # another address is not affected
            await other.send(from_ip("198.51.100.2") + login("a.example.com"))
            assert await other.receive() == b"held"
            await held.pop().aclose()
            await proxy.wait_on_reactor(lambda ctx: ctx.guard.open_per_ip.get("198.51.100.1") == 1)
            third = await proxy.connect()
            await third.send(from_ip("198.51.100.1") + login("a.example.com"))
            assert await third.receive() == b"held"
            for stream in [*held, other, third]:
                await stream.aclose()


async def test_status_pings_and_logins_spend_separate_budgets() -> None:
    async with backend(named(b"A")) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        rate_limit = {"connections": 2, "status": 5, "window": 60}
        async with running_proxy(routes, rate_limit=rate_limit, **PROXIED) as proxy:
            client = from_ip("198.51.100.5")
            logins = [await attempt(proxy, client + login("a.example.com")) for _ in range(3)]
            assert logins[:2] == [b"A", b"A"]
            assert disconnect_text(logins[2]) == (
                "Too many connections from your address; wait a moment"
            )
            # the looser status budget is untouched by the logins
            pings = [
                await attempt(proxy, client + status_ping("nope.example.com")) for _ in range(6)
            ]
            assert all(pings[:5]) and pings[5] == b""
            assert await rejected(proxy, "rate_limit status exceeded") == 1
            assert await rejected(proxy, "rate_limit connections exceeded") == 1


async def test_bans_by_ip_and_by_username_show_the_reason(tmp_path: Path) -> None:
    bans_file = tmp_path / "bans.json"
    now = time.time()
    import ipaddress

    save_bans(
        bans_file,
        BanList(
            [
                Ban("griefing", now, now + 3600, network=ipaddress.ip_network("192.0.2.0/24")),
                Ban("cheating", now, None, username="Hacker"),
            ]
        ),
    )
    async with backend(named(b"A")) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, bans_file=str(bans_file), **PROXIED) as proxy:
            await wait_for_bans(proxy, lambda bans: len(bans) == 2)
            by_ip = disconnect_text(
                await attempt(proxy, from_ip("192.0.2.7") + login("a.example.com"))
            )
            assert by_ip.startswith("You are banned from this server: griefing (until ")
            by_name = await attempt(
                proxy, from_ip("198.51.100.1") + login("a.example.com", "hacker")
            )
            assert disconnect_text(by_name) == "You are banned from this server: cheating"
            fine = await attempt(proxy, from_ip("198.51.100.1") + login("a.example.com", "Steve"))
            assert fine == b"A"
            assert info.connections == 1


async def test_the_bans_file_is_followed_live(tmp_path: Path) -> None:
    bans_file = tmp_path / "bans.json"
    with captured_logs("ERROR") as logs:
        async with backend(named(b"A")) as info:
            routes = [server("a", "a.example.com", addresses=[info.address])]
            async with running_proxy(routes, bans_file=str(bans_file), **PROXIED) as proxy:
                assert (
                    await attempt(proxy, from_ip("198.51.100.1") + login("a.example.com", "Notch"))
                    == b"A"
                )
                save_bans(bans_file, BanList([Ban("test", time.time(), None, username="Notch")]))
                await wait_for_bans(proxy, lambda bans: bans.has_usernames)
                reply = await attempt(
                    proxy, from_ip("198.51.100.1") + login("a.example.com", "Notch")
                )
                assert "banned" in disconnect_text(reply)
                bans_file.write_text("{ not json")  # a bad edit keeps the last good list
                with anyio.fail_after(5):  # read and refused
                    while not any("bans not applied" in line for line in logs):
                        await anyio.sleep(0.02)
                refused = next(line for line in logs if "bans not applied" in line)
                assert f"{bans_file}: invalid JSON" in refused
                assert await proxy.on_reactor(lambda ctx: ctx.guard.bans.has_usernames)
                reply = await attempt(
                    proxy, from_ip("198.51.100.1") + login("a.example.com", "Notch")
                )
                assert "banned" in disconnect_text(reply)
                save_bans(bans_file, BanList())
                await wait_for_bans(proxy, lambda bans: not bans.has_usernames)
                assert (
                    await attempt(proxy, from_ip("198.51.100.1") + login("a.example.com", "Notch"))
                    == b"A"
                )


async def test_a_username_check_waits_for_a_login_start_sent_later(tmp_path: Path) -> None:
    bans_file = tmp_path / "bans.json"
    save_bans(bans_file, BanList([Ban("x", time.time(), None, username="Banned")]))
    async with backend(named(b"A")) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, bans_file=str(bans_file)) as proxy:
            await wait_for_bans(proxy, lambda bans: bans.has_usernames)
            stream = await proxy.connect()
            async with stream:
                await stream.send(handshake("a.example.com", username=None))
                await anyio.sleep(0.2)
                await stream.send(minecraft.encode_login_start("Steve"))
                with anyio.fail_after(5):
                    assert await stream.receive() == b"A"
