"""The live dashboard in a real browser: Debian's ``chromium``, headless, driven by
``playwright-core`` (``integration/node/dashboard_check.js``; no downloaded browser).

One ``discoproxy serve`` (module-scoped) routes ``dash.example.com`` (a server file) to a
local echo backend and serves its admin listener on a loopback port with a bearer token.

What proves what:

- Opened as ``/?token=…``, the page sends ``Authorization: Bearer`` with every API call,
  gets 200s and refreshes at least three times (it polls every 2 s). Its routes table
  shows a row with the route's domain and its backend address; its connections table
  shows a row with the client address of a Minecraft connection this test holds open
  through the proxy (data echoed both ways all along, so the connection is forwarding and
  the throughput chart has something to draw) and that connection's backend; the
  active-connections chart drew its line; the throughput chart is there. Nothing the page
  ran threw. The screenshot is saved as ``artifacts/dashboard.png``.
- Opened without the token, the page shows its "unauthorized" banner
  (``artifacts/dashboard-unauthorized.png``).

Needs ``node``, ``chromium`` and ``npm ci --prefix integration/node``: under ``CI`` a missing
one fails the test, elsewhere it skips saying what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from discoproxy.protocol import minecraft
from integration.test_minecraft_peers import NODE_DIR, require_node_peers
from tests.support import REPO, ProxyProcess, require_program, running_proxy

pytestmark = pytest.mark.peer

ARTIFACTS = REPO / "artifacts"
TOKEN = "dashboard-test-token"
DOMAIN = "dash.example.com"
ADMIN_STARTUP_TIMEOUT_S = 15.0
# Each wait inside dashboard_check.js; the whole run gets a little more than a few of them.
PAGE_TIMEOUT_MS = 15_000
NODE_TIMEOUT_S = 90.0
TRAFFIC_CHUNK = 16 * 1024
TRAFFIC_PERIOD_S = 0.1


def require_browser() -> tuple[str, str]:
    """``node`` and Debian's ``chromium``, with playwright-core installed for the script."""
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if browser is None:
        browser = require_program("chromium", "apt-get install chromium (Debian's, not a download)")
    return require_node_peers("playwright-core"), browser


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@dataclass
class Dashboard:
    proxy: ProxyProcess
    backend: str
    admin: str  # http://127.0.0.1:PORT
    node: str
    browser: str


def wait_for_admin(base: str, proxy: ProxyProcess) -> None:
    """Return once the admin listener answers /healthz; fail if discoproxy exits first."""
    deadline = time.monotonic() + ADMIN_STARTUP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline or proxy.process.poll() is not None:
            raise AssertionError(
                f"the admin listener at {base} never answered /healthz:\n{proxy.output()}"
            )
        time.sleep(0.05)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    backend = f"127.0.0.1:{echo.server_address[1]}"
    node, browser = require_browser()  # before anything starts: skip or fail at once
    # running_proxy puts the admin listener on a free loopback port; the token is ours.
    # Docker is off: containers other tests label on a shared engine stay out of the table.
    config = f'\n[admin]\ntoken = "{TOKEN}"\n\n[providers.docker]\nenabled = "false"\n'
    servers = {"dash.toml": f'domains = ["{DOMAIN}"]\naddresses = ["{backend}"]\n'}
    try:
        with running_proxy(tmp_path_factory.mktemp("dashboard"), servers, config) as proxy:
            admin = proxy.admin_url()
            wait_for_admin(admin, proxy)
            yield Dashboard(proxy, backend, admin, node, browser)
    finally:
        echo.shutdown()
        echo.server_close()


def run_check(dashboard: Dashboard, spec: dict[str, Any]) -> dict[str, Any]:
    """Run dashboard_check.js with ``spec``; its one JSON line, or a failure showing it all."""
    ARTIFACTS.mkdir(exist_ok=True)
    completed = subprocess.run(
        [dashboard.node, "dashboard_check.js", json.dumps({"chromium": dashboard.browser, **spec})],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if completed.returncode != 0 or not result.get("ok"):
        raise AssertionError(
            f"dashboard_check.js failed (exit {completed.returncode}): "
            f"{result.get('error', '(no result line)')}\n"
            f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
        )
    return result


def exchange(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` through the proxy and read the echo back."""
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "the proxy closed the connection"
        received += chunk
    assert received == data


@contextmanager
def traffic(sock: socket.socket) -> Iterator[list[Exception]]:
    """Echo ``TRAFFIC_CHUNK`` bytes every ``TRAFFIC_PERIOD_S`` while the block runs, so the
    throughput chart (and the screenshot) shows bytes moving; yields the thread's errors."""
    stop = threading.Event()
    errors: list[Exception] = []

    def run() -> None:
        try:
            while not stop.wait(TRAFFIC_PERIOD_S):
                exchange(sock, b"y" * TRAFFIC_CHUNK)
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="dashboard-traffic", daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(5)


def test_dashboard_shows_routes_and_a_live_connection(dashboard: Dashboard) -> None:
    with socket.create_connection(("127.0.0.1", dashboard.proxy.port), timeout=5) as sock:
        exchange(
            sock,
            minecraft.encode_handshake(765, DOMAIN, 25565, 2)
            + minecraft.encode_login_start("tester")
            + b"x" * 1000,
        )
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        with traffic(sock) as errors:
            result = run_check(
                dashboard,
                {
                    "url": f"{dashboard.admin}/?token={TOKEN}",
                    "screenshot": str(ARTIFACTS / "dashboard.png"),
                    # the backend with its open connection (this one), not in a tooltip
                    "routes": [[DOMAIN, f"{dashboard.backend} · 1 open"]],
                    "connections": [[client, "tester", dashboard.backend]],  # its player
                    "timeout_ms": PAGE_TIMEOUT_MS,
                    # three refreshes, 4 s of history: the screenshot's charts have lines
                    "min_updates": 3,
                },
            )
        assert not errors, f"the connection stopped forwarding: {errors}"

    assert result["status"] == 200
    assert result["updates"] >= 3
    assert result["status_text"] == "live"
    api_calls = [r for r in result["requests"] if "/api/" in r["path"]]
    assert {"/api/routes", "/api/connections", "/api/providers", "/api/history"} <= {
        r["path"] for r in api_calls
    }
    assert all(r["status"] == 200 and r["authorization"] == "bearer" for r in api_calls), api_calls
    (connection,) = [row for row in result["connections"] if client in row]
    assert "dash" in connection  # the route, by name or id
    assert any(row.startswith("file") for row in result["providers"]), result["providers"]
    assert result["chart"]["width"] > 200 and result["chart"]["height"] > 80
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_dashboard_without_the_token_says_unauthorized(dashboard: Dashboard) -> None:
    result = run_check(
        dashboard,
        {
            "url": f"{dashboard.admin}/dashboard",
            "screenshot": str(ARTIFACTS / "dashboard-unauthorized.png"),
            "unauthorized": True,
            "timeout_ms": PAGE_TIMEOUT_MS,
        },
    )
    assert result["status"] == 200  # the page itself carries no data and needs no token
    assert "Unauthorized" in result["banner"]
    assert any(r["status"] == 401 for r in result["requests"] if "/api/" in r["path"])
