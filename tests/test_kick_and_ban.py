"""A ban ends the open connections it matches at once (by address or username), wherever
it comes from: ``POST /api/bans`` (what ``discoproxy ban add`` uses, saying how many it
ended), or the bans file edited by hand. ``POST /api/kick`` (``discoproxy kick``) ends a
player's connections or one connection by id. Writes need a token and read_only = false."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from discoproxy.admin.client import fetch
from discoproxy.cli import main as cli_main
from discoproxy.guard import Ban, BanList, load_bans, save_bans
from tests.proxy.helpers import (
    backend,
    handshake,
    keep_open,
    running_proxy,
    server,
    until_closed,
)
from tests.test_admin import admin_for

pytestmark = pytest.mark.anyio
TOKEN = "s3cret"


async def ended(stream: Any) -> bool:
    """Whether the proxy ends this client connection within 5 s."""
    with anyio.move_on_after(5):
        await until_closed(stream)
        return True
    return False


async def post(url: str, path: str, body: Any, token: str = TOKEN) -> tuple[int, Any]:
    status, raw = await anyio.to_thread.run_sync(lambda: fetch(url, path, token, "POST", body))
    return status, json.loads(raw)


async def test_a_ban_through_the_api_ends_the_players_session_and_says_so(
    tmp_path: Path,
) -> None:
    bans_file = tmp_path / "bans.json"
    async with backend(keep_open) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, bans_file=str(bans_file)) as proxy:
            async with admin_for(proxy, token=TOKEN, read_only=False) as api:
                notch, steve = await proxy.connect(), await proxy.connect()
                async with notch, steve:
                    await notch.send(handshake("a.example.com", username="Notch"))
                    await steve.send(handshake("a.example.com", username="Steve"))
                    assert await notch.receive() == b"in" and await steve.receive() == b"in"
                    status, answer = await post(
                        api.url, "/api/bans", {"target": "notch", "reason": "x", "duration": 60}
                    )
                    assert status == 200, answer
                    assert answer["ended"] == 1 and answer["target"] == "user notch"
                    assert answer["expires"] == pytest.approx(time.time() + 60, abs=5)
                    assert await ended(notch)
                    assert not await _ended_quickly(steve)  # the other player stays
    (ban,) = load_bans(bans_file).bans  # written to the file, as ban add writes it
    assert ban.username == "notch" and ban.reason == "x"


async def _ended_quickly(stream: Any) -> bool:
    with anyio.move_on_after(0.3):
        await until_closed(stream)
        return True
    return False


async def test_a_ban_written_to_the_file_ends_matching_addresses(tmp_path: Path) -> None:
    bans_file = tmp_path / "bans.json"
    async with backend(keep_open) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, bans_file=str(bans_file)) as proxy:
            stream = await proxy.connect()
            async with stream:
                await stream.send(handshake("a.example.com"))
                assert await stream.receive() == b"in"
                loopback = ipaddress.ip_network("127.0.0.0/8")
                save_bans(bans_file, BanList([Ban("flood", time.time(), network=loopback)]))
                assert await ended(stream)


async def test_kick_by_name_and_by_connection_id() -> None:
    async with backend(keep_open) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes) as proxy:
            async with admin_for(proxy, token=TOKEN, read_only=False) as api:
                first, second = await proxy.connect(), await proxy.connect()
                async with first, second:
                    await first.send(handshake("a.example.com", username="Alex"))
                    await second.send(handshake("a.example.com", username="Steve"))
                    assert await first.receive() == b"in" and await second.receive() == b"in"
                    status, answer = await post(api.url, "/api/kick", {"target": "ALEX"})
                    assert (status, answer["ended"]) == (200, 1)
                    assert await ended(first)
                    ids = await proxy.on_reactor(
                        lambda ctx: [c.id for c in ctx.connections if c.player == "Steve"]
                    )
                    status, answer = await post(api.url, "/api/kick", {"target": str(ids[0])})
                    assert (status, answer["ended"]) == (200, 1)
                    assert await ended(second)
                    status, answer = await post(api.url, "/api/kick", {"target": "nobody"})
                    assert (status, answer["ended"]) == (200, 0)


@pytest.mark.parametrize(
    ("token", "read_only", "sent", "status", "message"),
    [
        ("", False, "", 403, "admin.token"),
        (TOKEN, True, TOKEN, 403, "read-only"),
        (TOKEN, False, "wrong", 401, "token"),
    ],
)
async def test_writes_need_a_token_and_read_only_false(
    token: str, read_only: bool, sent: str, status: int, message: str
) -> None:
    async with running_proxy([]) as proxy:
        async with admin_for(proxy, token=token, read_only=read_only) as api:
            for path in ("/api/kick", "/api/bans"):
                got, answer = await post(api.url, path, {"target": "Steve"}, token=sent)
                assert got == status and message in answer["error"], answer


async def test_a_bad_ban_request_says_what_is_expected(tmp_path: Path) -> None:
    async with running_proxy([], bans_file=str(tmp_path / "bans.json")) as proxy:
        async with admin_for(proxy, token=TOKEN, read_only=False) as api:
            status, answer = await post(api.url, "/api/bans", {"target": "not a name!"})
            assert status == 400 and "target" in answer["error"]
            status, answer = await post(api.url, "/api/bans", {"target": "x", "duration": -1})
            assert status == 400 and "duration" in answer["error"]


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return int(info.value.code or 0)


async def test_the_cli_bans_and_kicks_through_the_running_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bans_file = tmp_path / "bans.json"
    config = tmp_path / "discoproxy.toml"
    config.write_text(f'bans_file = "{bans_file}"\n')
    async with backend(keep_open) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, bans_file=str(bans_file)) as proxy:
            async with admin_for(proxy, token=TOKEN, read_only=False) as api:
                common = ["--config", str(config), "--admin", api.url, "--token", TOKEN]
                notch, alex = await proxy.connect(), await proxy.connect()
                async with notch, alex:
                    await notch.send(handshake("a.example.com", username="Notch"))
                    await alex.send(handshake("a.example.com", username="Alex"))
                    assert await notch.receive() == b"in" and await alex.receive() == b"in"
                    code = await anyio.to_thread.run_sync(
                        run_cli, ["ban", "add", "Notch", "--duration", "1h", *common]
                    )
                    out = capsys.readouterr().out
                    assert code == 0 and "banned user Notch until" in out, out
                    assert "ended 1 open connections" in out
                    assert await ended(notch)
                    code = await anyio.to_thread.run_sync(run_cli, ["kick", "alex", *common])
                    out = capsys.readouterr().out
                    assert code == 0 and "kicked alex: ended 1 open connections" in out
                    assert await ended(alex)
                    code = await anyio.to_thread.run_sync(run_cli, ["kick", "alex", *common])
                    assert code == 1  # nothing matched any more
    # without a reachable instance the file is written and the CLI says it did not ask
    code = run_cli(["ban", "add", "Steve", "--config", str(config), "--admin", "127.0.0.1:9"])
    out = capsys.readouterr().out
    assert code == 0 and "the running instance was not asked" in out
    assert {b.username for b in load_bans(bans_file).bans} == {"Notch", "Steve"}
