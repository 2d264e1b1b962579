"""Minecraft Java through discoproxy, against clients and servers nobody here wrote.

Peers: ``mcstatus`` (PyPI) for the status ping, npm ``minecraft-protocol`` for two
offline-mode backends and a client that logs in to the play state
(``integration/node/mc_server.js``, ``mc_client.js``). The backends' MOTDs and their
JSON event lines prove which one a connection reached.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# mcstatus's public JavaServer announces the host it connects to; these lower-level
# classes (mcstatus 14) let the handshake name a domain while the socket goes to the
# proxy on 127.0.0.1, as a player's client does through DNS.
from mcstatus._net.address import Address
from mcstatus._protocol.io.connection import TCPSocketConnection
from mcstatus._protocol.java_client import JavaClient
from mcstatus.responses import JavaStatusResponse

from integration.peers import PeerProcess, json_lines, running_peer
from tests.support import ProxyProcess, dependency_missing, require_program, running_proxy

pytestmark = pytest.mark.peer

NODE_DIR = Path(__file__).resolve().parent / "node"
# A version minecraft-protocol supports fully, configuration state included.
MC_VERSION = "1.20.4"
MC_PROTOCOL = 765  # 1.20.4, announced in the mcstatus handshake
MCSTATUS_TIMEOUT_S = 5.0
# mc_client.js gives up after 10 s by itself; this only guards against a hung node.
CLIENT_TIMEOUT_S = 20.0

ROUTES = [
    pytest.param("survival.example.com", "A", "survival@file", id="exact"),
    pytest.param("eu.lobby.example.com", "B", "lobby@file", id="wildcard"),
]


def require_node_peers(module: str = "minecraft-protocol") -> str:
    """``node``, with ``module`` installed in integration/node (fails under CI)."""
    node = require_program("node", "apt-get install nodejs npm")
    if not (NODE_DIR / "node_modules" / module).is_dir():
        dependency_missing(
            f"{module} is missing from integration/node: run: npm ci --prefix integration/node"
        )
    return node


@dataclass
class McBackend:
    peer: PeerProcess
    port: int


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, McBackend]]:
    node = require_node_peers()
    with (
        running_peer([node, "mc_server.js", "A", MC_VERSION], name="mc-A", cwd=NODE_DIR) as a,
        running_peer([node, "mc_server.js", "B", MC_VERSION], name="mc-B", cwd=NODE_DIR) as b,
    ):
        ports = {
            name: int(peer.wait_for_line(r'"event":"listening".*"port":(\d+)').group(1))
            for name, peer in (("A", a), ("B", b))
        }
        yield {"A": McBackend(a, ports["A"]), "B": McBackend(b, ports["B"])}


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, backends: dict[str, McBackend]
) -> Iterator[ProxyProcess]:
    servers = {
        "survival.toml": (
            f'domains = ["survival.example.com"]\naddresses = ["127.0.0.1:{backends["A"].port}"]\n'
        ),
        "lobby.toml": (
            f'domains = ["*.lobby.example.com"]\naddresses = ["127.0.0.1:{backends["B"].port}"]\n'
        ),
    }
    with running_proxy(tmp_path_factory.mktemp("minecraft"), servers) as running:
        yield running


@dataclass
class StatusResult:
    status: JavaStatusResponse
    latency_ms: float
    client_port: int


def status_via(proxy: ProxyProcess, domain: str) -> StatusResult:
    """mcstatus status request and ping to the proxy, announcing ``domain``."""
    with TCPSocketConnection(proxy.address, timeout=MCSTATUS_TIMEOUT_S) as connection:
        client = JavaClient(connection, address=Address(domain, proxy.port), version=MC_PROTOCOL)
        client.handshake()
        status = client.read_status()
        latency_ms = client.test_ping()
        return StatusResult(status, latency_ms, connection.socket.getsockname()[1])


def closed_line(proxy: ProxyProcess, client_port: int, route: str) -> str:
    """The proxy's close line for the connection from 127.0.0.1:<client_port>."""
    return proxy.wait_for_line(rf"closed: client=127\.0\.0\.1:{client_port} route={route} ")


def node_json(node: str, script: str, *args: str) -> list[dict[str, Any]]:
    """Run ``integration/node/<script>`` with ``args``; its JSON event lines."""
    result = subprocess.run(
        [node, script, *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    events = json_lines(result.stdout.splitlines())
    assert events, f"{script} printed nothing (rc={result.returncode}):\n{result.stderr}"
    return events


def login_via(proxy: ProxyProcess, domain: str, node: str) -> list[dict[str, Any]]:
    """Run mc_client.js against the proxy; its JSON event lines."""
    return node_json(node, "mc_client.js", str(proxy.port), domain, "tester", MC_VERSION)


@pytest.mark.parametrize(("domain", "backend", "route"), ROUTES)
def test_mcstatus_ping_is_answered_by_backend_chosen_by_domain(
    proxy: ProxyProcess, backends: dict[str, McBackend], domain: str, backend: str, route: str
) -> None:
    seen = len(backends[backend].peer.lines)
    result = status_via(proxy, domain)

    assert result.status.motd.to_plain() == f"backend-{backend}"
    assert result.status.version.name == MC_VERSION
    assert result.latency_ms >= 0
    backends[backend].peer.wait_for_json(seen, timeout=5, event="status", host=domain)
    closed_line(proxy, result.client_port, route)


def test_mcstatus_ping_for_unknown_domain_says_unknown_server(proxy: ProxyProcess) -> None:
    result = status_via(proxy, "nowhere.example.com")

    assert result.status.motd.to_plain() == "Unknown server: nowhere.example.com"
    assert result.latency_ms >= 0  # the proxy answers the ping packet itself
    line = closed_line(proxy, result.client_port, "-")
    assert "nowhere.example.com" in line


@pytest.mark.parametrize(("domain", "backend", "route"), ROUTES)
def test_offline_login_reaches_play_state_on_backend_chosen_by_domain(
    proxy: ProxyProcess, backends: dict[str, McBackend], domain: str, backend: str, route: str
) -> None:
    seen = len(backends[backend].peer.lines)
    events = login_via(proxy, domain, require_node_peers())

    assert {"event": "play", "state": "play"} in events, events
    login = backends[backend].peer.wait_for_json(seen, timeout=5, event="login", host=domain)
    assert login == {"event": "login", "server": backend, "username": "tester", "host": domain}
    connect = next(event for event in events if event["event"] == "connect")
    closed_line(proxy, connect["port"], route)


def test_login_for_unknown_domain_is_disconnected_naming_the_domain(proxy: ProxyProcess) -> None:
    events = login_via(proxy, "nowhere.example.com", require_node_peers())

    kicks = [event for event in events if event["event"] == "disconnect"]
    assert kicks, events
    assert "Unknown server: nowhere.example.com" in kicks[0]["reason"]
    assert not any(event["event"] == "play" for event in events)
    connect = next(event for event in events if event["event"] == "connect")
    assert "nowhere.example.com" in closed_line(proxy, connect["port"], "-")
