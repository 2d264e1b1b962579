"""Players with real clients (issue 19): npm minecraft-protocol clients log in as named
players through a real ``discoproxy serve`` to a real minecraft-protocol server. Their
names are in /api/connections, the gauge and the close line; the allow list refuses
another player with its text; ``discoproxy ban add`` ends a live session and says so; a
webhook receiver (a real HTTP server here) gets each event in order."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from discoproxy.admin.client import fetch
from integration.test_minecraft_peers import (
    MC_VERSION,
    NODE_DIR,
    McBackend,
    backends,  # noqa: F401  (the module fixture: two real servers)
    node_json,
    require_node_peers,
)
from tests.support import ProxyProcess, running_proxy

TOKEN = "players-t0ken"
DOMAIN = "survival.example.com"


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(json.loads(body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/events", server.received  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(
    tmp_path: Path,
    backends: dict[str, McBackend],  # noqa: F811 (the imported fixture)
    hook: tuple[str, list[Any]],
) -> Iterator[ProxyProcess]:
    servers = {
        "survival.toml": f'domains = ["{DOMAIN}"]\naddresses = ["127.0.0.1:{backends["A"].port}"]\n'
    }
    config = (
        f'[admin]\ntoken = "{TOKEN}"\nread_only = false\n'
        '[players]\nallow = ["Steve", "Alex"]\n'
        f'[[webhooks]]\nurl = "{hook[0]}"\nevents = ["player_connected", "player_disconnected"]\n'
    )
    with running_proxy(tmp_path, servers, config=config) as running:
        yield running


def wait(condition: Any, what: str, within: float = 15) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def api(proxy: ProxyProcess, path: str) -> Any:
    status, body = fetch(proxy.admin_url(), path, TOKEN)
    assert status == 200, body
    return body


def test_named_players_are_seen_refused_banned_and_announced(
    proxy: ProxyProcess, hook: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    node = require_node_peers()
    steve = subprocess.Popen(
        [node, "mc_client.js", str(proxy.port), DOMAIN, "Steve", MC_VERSION, "hold"],
        cwd=NODE_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert steve.stdout is not None
        lines = iter(steve.stdout.readline, "")
        events = [json.loads(line) for line in (next(lines), next(lines))]
        assert [e["event"] for e in events] == ["connect", "play"], events
        steve_port = events[0]["port"]
        live = json.loads(api(proxy, "/api/connections"))["connections"]
        (row,) = [c for c in live if c["client"] == f"127.0.0.1:{steve_port}"]
        assert row["player"] == "Steve" and row["route"] == "survival@file"
        assert row["uuid"] == "5627dd98-e6be-3c21-b8a8-e92344183641"
        metrics = api(proxy, "/metrics").decode()
        assert 'discoproxy_players_online{route="survival@file"} 1.0' in metrics
        # a player the allow list leaves out is refused with its text
        refused = node_json(node, "mc_client.js", str(proxy.port), DOMAIN, "Mallory", MC_VERSION)
        (kicked,) = [e for e in refused if e["event"] == "disconnect"]
        assert "You are not allowed to join survival" in kicked["reason"]
        # a ban ends Steve's live session at once, and the CLI says so
        done = subprocess.run(
            [sys.executable, "-m", "discoproxy", "ban", "add", "Steve", "--config",
             str(tmp_path / "discoproxy.toml"), "--admin", proxy.admin_url(), "--token", TOKEN],
            capture_output=True, text=True, timeout=30, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0 and "ended 1 open connections" in done.stdout, done
        rest = [json.loads(line) for line in lines]
        assert rest and rest[-1]["event"] == "end", rest
        assert steve.wait(10) == 0
    finally:
        steve.kill()
    line = proxy.wait_for_line(rf"closed: client=127\.0\.0\.1:{steve_port} ")
    assert "player=Steve uuid=5627dd98-e6be-3c21-b8a8-e92344183641" in line
    assert "banned (user Steve) while connected" in line
    received = hook[1]
    wait(lambda: len(received) >= 2, "the webhook events")
    assert [(e["event"], e["player"]) for e in received] == [
        ("player_connected", "Steve"),
        ("player_disconnected", "Steve"),
    ]
    assert received[1]["reason"] == "banned (user Steve) while connected"
