"""The highly available layout: two discoproxy instances behind an L4 load balancer.

HAProxy (Debian ``haproxy``) balances TCP round robin over two ``discoproxy serve``
processes and sends each a PROXY v2 header (``send-proxy-v2``); both instances follow
the same providers (one servers directory) and share one bans file, as two containers
sharing volumes would. Each trusts only the load balancer's address (127.0.0.1/32).

A client connecting from 127.0.0.9 reaches the backend through both instances, and
each logs that real address, not the balancer's. A ban made with ``discoproxy ban``
against one instance's config refuses that client at both, within the bans file's poll
(0.5 s) plus a connection; a server file written once is routed by both.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.peers import PeerProcess, free_port, running_peer, wait_for_port
from tests.proxy.helpers import handshake
from tests.support import ProxyProcess, require_program, running_proxy

pytestmark = pytest.mark.peer

CLIENT = "127.0.0.9"
IO_TIMEOUT_S = 5.0
# Deadlines, not measurements: a ban must refuse within the bans file's poll (0.5 s)
# and a file write within ~0.2 s; the machine is shared.
APPLIED_WITHIN_S = 10.0
# What the backend answers each connection with, then echoes.
BACKEND_SCRIPT = """
import socket, sys, threading
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
def serve(conn):
    with conn:
        if conn.recv(65536):
            conn.sendall(b"backend")
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@dataclass
class Layout:
    instances: list[ProxyProcess]
    haproxy: PeerProcess
    front: int  # HAProxy's frontend port
    servers: Path
    configs: list[Path]
    backend_port: int


def haproxy_config(front: int, ports: list[int]) -> str:
    servers = "\n".join(
        f"    server discoproxy{i} 127.0.0.1:{port} send-proxy-v2" for i, port in enumerate(ports)
    )
    return (
        textwrap.dedent(
            f"""\
        global
            log stderr format raw local0

        defaults
            log global
            timeout connect 2s
            timeout client 10s
            timeout server 10s

        frontend players
            mode tcp
            bind 127.0.0.1:{front}
            default_backend discoproxy

        backend discoproxy
            mode tcp
            balance roundrobin
        """
        )
        + servers
        + "\n"
    )


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    haproxy = require_program("haproxy", "apt-get install haproxy")
    backend_port, front = free_port(), free_port()
    shared = tmp_path / "shared"
    servers = shared / "servers"
    servers.mkdir(parents=True)
    (servers / "survival.toml").write_text(
        f'domains = ["survival.example.com"]\naddresses = ["127.0.0.1:{backend_port}"]\n'
    )
    config = textwrap.dedent(
        f"""\
        receive_proxy_protocol = true
        trusted_proxies = ["127.0.0.1/32"]
        bans_file = "{shared / "bans.json"}"
        [providers.file]
        directory = "{servers}"
        [providers.docker]
        enabled = false
        [providers.swarm]
        enabled = false
        """
    )
    with ExitStack() as stack:
        stack.enter_context(
            running_peer([sys.executable, "-c", BACKEND_SCRIPT, str(backend_port)], name="backend")
        ).wait_for_line("ready")
        instances = []
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            instances.append(stack.enter_context(running_proxy(directory, config=config)))
        configs = [tmp_path / name / "discoproxy.toml" for name in ("a", "b")]
        config_path = tmp_path / "haproxy.cfg"
        config_path.write_text(haproxy_config(front, [p.port for p in instances]))
        peer = stack.enter_context(
            running_peer([haproxy, "-f", str(config_path), "-db"], name="haproxy")
        )
        wait_for_port(("127.0.0.1", front), peer)
        yield Layout(instances, peer, front, servers, configs, backend_port)


def first_reply(layout: Layout, domain: str) -> tuple[bytes, int]:
    """Through HAProxy from :data:`CLIENT`: the first bytes answered, and our port."""
    with socket.create_connection(
        ("127.0.0.1", layout.front), timeout=IO_TIMEOUT_S, source_address=(CLIENT, 0)
    ) as conn:
        port = int(conn.getsockname()[1])
        conn.sendall(handshake(domain))
        try:
            return conn.recv(65536), port
        except OSError:
            return b"", port


def served_by(layout: Layout, port: int) -> int:
    """Which instance logged the connection from ``CLIENT:port`` (its real address)."""
    pattern = re.compile(rf"closed: client={re.escape(CLIENT)}:{port} ")
    deadline = time.monotonic() + IO_TIMEOUT_S
    while time.monotonic() < deadline:
        for index, instance in enumerate(layout.instances):
            if any(pattern.search(line) for line in list(instance.lines)):
                return index
        time.sleep(0.02)
    logs = "\n\n".join("\n".join(i.lines[-20:]) for i in layout.instances)
    raise AssertionError(f"no instance logged {CLIENT}:{port}\n{logs}")


def test_two_instances_behind_haproxy_share_routes_and_bans(layout: Layout) -> None:
    seen = set()
    for _ in range(4):  # round robin: both instances, each with the real client address
        reply, port = first_reply(layout, "survival.example.com")
        assert reply == b"backend"
        seen.add(served_by(layout, port))
    assert seen == {0, 1}

    # one server file, written once, is routed by both
    (layout.servers / "lobby.toml").write_text(
        f'domains = ["lobby.example.com"]\naddresses = ["127.0.0.1:{layout.backend_port}"]\n'
    )
    deadline = time.monotonic() + APPLIED_WITHIN_S
    routed: set[int] = set()
    while routed != {0, 1}:
        assert time.monotonic() < deadline, f"lobby routed only by {routed}"
        reply, port = first_reply(layout, "lobby.example.com")
        if reply == b"backend":
            routed.add(served_by(layout, port))

    # a ban through instance a's config refuses the client at both instances
    banned = subprocess.run(
        [
            sys.executable,
            "-m",
            "discoproxy",
            "ban",
            "add",
            CLIENT,
            "--config",
            str(layout.configs[0]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert banned.returncode == 0, banned.stderr
    deadline = time.monotonic() + APPLIED_WITHIN_S
    refused: set[int] = set()
    while refused != {0, 1}:
        assert time.monotonic() < deadline, f"banned only at {refused}"
        reply, port = first_reply(layout, "survival.example.com")
        if reply != b"backend":
            refused.add(served_by(layout, port))
    for instance in layout.instances:
        # the control plane logs the reload as it hands the list on; with workers the
        # refusal can be seen first (another process applies it), so wait for the line
        instance.wait_for_line("bans: 1 from", APPLIED_WITHIN_S)
