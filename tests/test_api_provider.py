"""The ``api`` provider end to end, on a real ``discoproxy serve``: ``discoproxy server
put FILE`` stores a server through the admin API (validated exactly as a server file,
the same messages), it routes at once as ``ID@api``, survives a restart (its state
file), and ``server delete`` removes it. Refused without a token or with read_only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from discoproxy.admin.client import fetch
from discoproxy.protocol import minecraft
from tests.support import running_proxy
from tests.test_serve import connect, echo_server, roundtrip

TOKEN = "api-t0ken"
WRITABLE = f'[admin]\ntoken = "{TOKEN}"\nread_only = false\n'


def cli(*argv: str, admin: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "discoproxy", *argv, "--config", str(config), "--admin", admin,
         "--token", TOKEN],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip


def routed(port: int, domain: str) -> bool:
    """Whether a login for *domain* reaches the echo backend (it answers what it got)."""
    hello = minecraft.encode_handshake(765, domain, 25565, 2) + minecraft.encode_login_start("a")
    with connect(port) as sock:
        return roundtrip(sock, hello) == hello


def test_a_server_put_through_the_api_routes_survives_a_restart_and_is_deleted(
    tmp_path: Path,
) -> None:
    config = tmp_path / "discoproxy.toml"
    state = tmp_path / "api-servers.json"
    server_file = tmp_path / "shop.toml"
    with echo_server() as port:
        server_file.write_text(
            f'domains = ["shop.example.com"]\naddresses = ["127.0.0.1:{port}"]\n'
        )
        with running_proxy(tmp_path, config=WRITABLE) as proxy:
            admin = proxy.admin_url()
            done = cli("server", "put", str(server_file), admin=admin, config=config)
            assert done.returncode == 0, done.stderr
            assert "stored shop@api (shop.example.com)" in done.stdout
            proxy.wait_for_line(r"routing table updated by api: 1 routes")
            assert routed(proxy.port, "shop.example.com")
            listed = json.loads(cli("server", "list", admin=admin, config=config).stdout)
            assert listed == [
                {"id": "shop", "server": {"domains": ["shop.example.com"],
                                          "addresses": [f"127.0.0.1:{port}"]}}
            ]  # fmt: skip
        assert json.loads(state.read_text())["servers"]["shop"]["domains"] == ["shop.example.com"]
        with running_proxy(tmp_path, config=WRITABLE) as proxy:  # a restart keeps it
            proxy.wait_for_line(r"routing table updated by api: 1 routes")
            assert routed(proxy.port, "shop.example.com")
            done = cli("server", "delete", "shop", admin=proxy.admin_url(), config=config)
            assert done.returncode == 0 and "deleted shop@api" in done.stdout, done.stderr
            proxy.wait_for_line(r"routing table updated by api: 0 routes")
            assert not routed(proxy.port, "shop.example.com")  # unknown now


def test_a_bad_server_is_refused_with_the_server_files_message(tmp_path: Path) -> None:
    config = tmp_path / "discoproxy.toml"
    bad = tmp_path / "bad.toml"
    bad.write_text('domains = ["bad.example.com"]\naddresses = ["a:1"]\nbalance = "fastest"\n')
    with running_proxy(tmp_path, config=WRITABLE) as proxy:
        done = cli("server", "put", str(bad), admin=proxy.admin_url(), config=config)
        assert done.returncode == 1
        assert "api servers/bad" in done.stderr and "unknown balance 'fastest'" in done.stderr
        assert "'failover'" in done.stderr  # the accepted values, as for a file
        status, body = fetch(proxy.admin_url(), "/api/servers", TOKEN)
        assert status == 200 and json.loads(body) == {"servers": []}  # nothing stored


def test_writes_are_refused_when_the_api_is_read_only(tmp_path: Path) -> None:
    config = tmp_path / "discoproxy.toml"
    server_file = tmp_path / "x.toml"
    server_file.write_text('domains = ["x.example.com"]\naddresses = ["a:1"]\n')
    readonly = f'[admin]\ntoken = "{TOKEN}"\n[providers.api]\nenabled = true\n'
    with running_proxy(tmp_path, config=readonly) as proxy:
        done = cli("server", "put", str(server_file), admin=proxy.admin_url(), config=config)
        assert done.returncode != 0 and "read-only" in done.stderr, done.stderr


def test_a_stored_document_that_no_longer_loads_is_kept_until_replaced(tmp_path: Path) -> None:
    """Not routed and reported, but a PUT of another server does not delete it."""
    import anyio

    from discoproxy.config import ProxyConfig
    from providers.api import ApiProvider, ApiSettings

    state = tmp_path / "api-servers.json"
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "servers": {
                    "good": {"domains": ["good.example.com"], "addresses": ["a:1"]},
                    "old": {"domains": ["old.example.com"], "addresses": ["a:1"], "gone": 1},
                },
            }
        )
    )
    config = ProxyConfig.model_validate({"admin": {"token": TOKEN, "read_only": False}})
    provider = ApiProvider("api", ApiSettings(state_file=state), config)
    published: list[list[str]] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(provider.run, lambda servers: published.append([s.id for s in servers]))
            with anyio.fail_after(5):
                while not published:
                    await anyio.sleep(0.01)
            await provider.put_server("new", {"domains": ["new.example.com"], "addresses": ["b:1"]})
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert published == [["good"], ["good", "new"]]
    assert sorted(json.loads(state.read_text())["servers"]) == ["good", "new", "old"]
