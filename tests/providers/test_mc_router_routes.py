"""The mc_router_routes provider: mc-router's ``-routes-config`` JSON as mc-router
documents it (``default-server`` and ``mappings``), read once and followed live; bad
entries name the file and key and drop only themselves; a bad file keeps the last good
routes."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from discoproxy.config import ProxyConfig
from discoproxy.model import ServerDefinition
from providers.mc_router_routes import (
    McRouterRoutesProvider,
    McRouterRoutesSettings,
    servers_from_routes,
)

pytestmark = pytest.mark.anyio

ROUTES = {
    "default-server": "lobby:25565",
    "mappings": {"Survival.Example.com": "survival:25566", "creative.example.com": "creative"},
}


def test_mappings_and_the_default_server_become_servers() -> None:
    servers, errors = servers_from_routes(json.dumps(ROUTES), "routes.json")
    assert errors == []
    by_id = {s.id: s for s in servers}
    assert by_id["survival.example.com"].domains == ("survival.example.com",)
    assert [str(a) for a in by_id["survival.example.com"].addresses] == ["survival:25566"]
    assert [str(a) for a in by_id["creative.example.com"].addresses] == ["creative:25565"]
    assert by_id["default"].default and by_id["default"].domains == ()


def test_a_bad_entry_names_the_file_and_key_and_drops_only_itself() -> None:
    routes = {"mappings": {"ok.example.com": "ok:25565", "bad.example.com": "host:99999"}}
    servers, errors = servers_from_routes(json.dumps(routes), "routes.json")
    assert [s.id for s in servers] == ["ok.example.com"]
    (error,) = errors
    assert error.startswith("routes.json: bad.example.com: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", "invalid JSON"), ('{"mapping": {}}', "mapping: unknown key"), ("[]", "expected")],
)
def test_a_bad_file_says_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        servers_from_routes(text, "routes.json")


async def test_the_file_is_followed_live_and_a_bad_version_keeps_the_last_good(
    tmp_path: Path,
) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"mappings": {"a.example.com": "a:25565"}}))
    provider = McRouterRoutesProvider(
        "mc_router_routes", McRouterRoutesSettings(path=path), ProxyConfig()
    )
    assert await provider.available()
    snapshots: list[list[ServerDefinition]] = []

    async def until(check: object) -> None:
        with anyio.fail_after(5):
            while not check():  # type: ignore[operator]
                await anyio.sleep(0.02)

    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.run, snapshots.append)
        await until(lambda: snapshots and [s.id for s in snapshots[-1]] == ["a.example.com"])
        path.write_text(json.dumps({"mappings": {"b.example.com": "b:25565"}}))
        await until(lambda: [s.id for s in snapshots[-1]] == ["b.example.com"])
        count = len(snapshots)
        path.write_text("{ not json")
        await anyio.sleep(0.8)
        assert len(snapshots) == count  # the last good routes stay
        tg.cancel_scope.cancel()
    result = await provider.load_once()
    assert result.errors and "invalid JSON" in result.errors[0]
