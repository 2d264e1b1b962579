"""Minecraft Bedrock Edition (RakNet over UDP) through a UDP port route, with real peers.

Peers: npm ``bedrock-protocol``'s offline server and client (``integration/node/
bedrock_server.js``, ``bedrock_client.js``), and ``mcstatus``'s ``BedrockServer`` ping.
A Bedrock join is a RakNet handshake, login and encryption over many datagrams both
ways, so a client that spawns proves the session table carries a real UDP protocol; the
server's MOTD, ``backend-<name>``, shows the ping reached it. discoproxy runs as
``discoproxy serve`` with a server file whose ``ports`` maps the proxy's port to the
server's (a different number: the route maps, it does not mirror).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from mcstatus import BedrockServer

from integration.peers import PeerProcess, json_lines, running_peer
from integration.test_minecraft_peers import NODE_DIR, require_node_peers
from tests.support import ProxyProcess, running_proxy

pytestmark = pytest.mark.peer

BEDROCK_VERSION = "1.26.45"
# bedrock_client.js gives up after 15 s by itself; this only guards against a hung node.
CLIENT_TIMEOUT_S = 30.0
PING_TIMEOUT_S = 5.0


def free_udp_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_bedrock_peers() -> str:
    node = require_node_peers()
    if not (NODE_DIR / "node_modules" / "bedrock-protocol").is_dir():
        pytest.fail("integration/node/node_modules lacks bedrock-protocol: run npm ci")
    return node


@pytest.fixture(scope="module")
def bedrock_backend() -> Iterator[tuple[PeerProcess, int]]:
    node = require_bedrock_peers()
    argv = [node, "bedrock_server.js", "A", BEDROCK_VERSION]
    with running_peer(argv, name="bedrock-A", cwd=NODE_DIR) as peer:
        port = int(peer.wait_for_line(r'"event":"listening".*"port":(\d+)').group(1))
        yield peer, port


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bedrock_backend: tuple[PeerProcess, int]
) -> Iterator[ProxyProcess]:
    _, backend_port = bedrock_backend
    listen = free_udp_port()
    servers = {
        "bedrock.toml": (
            f'addresses = ["127.0.0.1"]\nports = ["{listen}:{backend_port}/udp"]\n'
            'name = "Bedrock"\n'
        )
    }
    config = 'port_routes_bind = "127.0.0.1"\nudp_session_timeout = 2\n'
    with running_proxy(tmp_path_factory.mktemp("bedrock"), servers, config) as running:
        running.wait_for_line(rf"port {listen}/udp open for bedrock@file")
        running.udp_port = listen  # type: ignore[attr-defined]
        yield running


def udp_port(proxy: ProxyProcess) -> int:
    return int(proxy.udp_port)  # type: ignore[attr-defined]


def bedrock_client(node: str, port: int, username: str) -> list[dict[str, object]]:
    result = subprocess.run(
        [node, "bedrock_client.js", "127.0.0.1", str(port), username, BEDROCK_VERSION],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    events = json_lines(result.stdout.splitlines())
    assert events, f"bedrock_client.js printed nothing (rc={result.returncode}):\n{result.stderr}"
    return events


def test_a_bedrock_client_joins_and_spawns_through_the_udp_route(
    proxy: ProxyProcess, bedrock_backend: tuple[PeerProcess, int]
) -> None:
    backend, _ = bedrock_backend
    seen = len(backend.lines)
    events = bedrock_client(require_bedrock_peers(), udp_port(proxy), "Steve")

    kinds = [event["event"] for event in events]
    assert "join" in kinds and "spawn" in kinds, events
    joined = backend.wait_for_json(seen, timeout=5, event="join")
    assert joined["username"] == "Steve"
    # the session ends after udp_session_timeout of silence, with its line
    closed = r"udp session #\d+ closed: client=127\.0\.0\.1:\d+ route=bedrock@file"
    line = proxy.wait_for_line(closed, 10)
    assert f"port={udp_port(proxy)}/udp" in line and "reason=idle timeout" in line
    assert "up=0B" not in line and "down=0B" not in line


def test_two_bedrock_clients_at_once_are_two_sessions(
    proxy: ProxyProcess, bedrock_backend: tuple[PeerProcess, int]
) -> None:
    node = require_bedrock_peers()
    argv = ["bedrock_client.js", "127.0.0.1", str(udp_port(proxy))]
    with (
        running_peer([node, *argv, "Alex", BEDROCK_VERSION], name="alex", cwd=NODE_DIR) as a,
        running_peer([node, *argv, "Sam", BEDROCK_VERSION], name="sam", cwd=NODE_DIR) as b,
    ):
        a.wait_for_json(timeout=CLIENT_TIMEOUT_S, event="spawn")
        b.wait_for_json(timeout=CLIENT_TIMEOUT_S, event="spawn")


def test_mcstatus_bedrock_ping_through_the_route_gets_the_backend_motd(
    proxy: ProxyProcess,
) -> None:
    status = BedrockServer("127.0.0.1", udp_port(proxy), timeout=PING_TIMEOUT_S).status()
    assert status.motd.raw == "backend-A"
    assert status.version.name == BEDROCK_VERSION


def test_the_route_s_file_removed_closes_the_udp_port(
    tmp_path: Path, bedrock_backend: tuple[PeerProcess, int]
) -> None:
    _, backend_port = bedrock_backend
    listen = free_udp_port()
    servers = {"b.toml": f'addresses = ["127.0.0.1"]\nports = ["{listen}:{backend_port}/udp"]\n'}
    config = 'port_routes_bind = "127.0.0.1"\n'
    with running_proxy(tmp_path, servers, config) as running:
        running.wait_for_line(rf"port {listen}/udp open for b@file")
        assert BedrockServer("127.0.0.1", listen, timeout=PING_TIMEOUT_S).status()
        (tmp_path / "servers" / "b.toml").unlink()
        running.wait_for_line(rf"port {listen}/udp closed")
        for _ in range(3):  # the reactor retires the socket a moment after the log line
            try:
                BedrockServer("127.0.0.1", listen, timeout=1).status()
            except TimeoutError:
                break  # nobody answers on it any more
        else:
            raise AssertionError(f"port {listen}/udp still answers after its route went")
