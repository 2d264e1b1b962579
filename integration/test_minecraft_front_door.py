"""Minecraft front door: discoproxy answers the server list itself, against real peers.

What proves what:

- npm ``minecraft-protocol`` offline backends (``integration/node/mc_server.js``) print a
  JSON ``status`` line for every status ping that reaches them and a ``login`` line per
  player, each with the handshake host they saw. Counting those lines proves the status
  cache (a cache hit never reaches the backend) and ``domain_rewrite`` (the host the
  backend saw). Their MOTD, ``backend-<name>``, shows which backend an answer came from.
- ``mcstatus`` (PyPI), a status client nobody here wrote, reads what discoproxy answers:
  cached and stale answers, the unreachable and unknown-domain MOTDs, an
  ``[motds.online]`` patch with its favicon; its ``LegacyServer`` sends the stalled
  ``FE 01 FA`` ping that discoproxy answers in the 1.4 format.
- Raw sockets send the 1.6 ``MC|PingHost`` ping (built by
  ``discoproxy.protocol.minecraft.encode_legacy_ping_1_6``; the answer is parsed here
  from the wire format, not with discoproxy's code) and the Beta ``FE`` ping.
- npm ``minecraft-protocol``'s client (``mc_client.js``) shows that login disconnect
  messages are readable by a real client; its ``mc.ping`` (``mc_ping.js``) that its own
  status ping gets the backend's answer through discoproxy.
- discoproxy's own log (close-line reasons ``status answered (online|cached|stale|
  unreachable)``, ``served stale``) says how each answer was made.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mcstatus import LegacyServer
from mcstatus._net.address import Address
from mcstatus._protocol.io.connection import TCPSocketConnection
from mcstatus._protocol.java_client import JavaClient

from discoproxy.protocol.minecraft import encode_legacy_ping_1_6
from integration.peers import free_port, json_lines, running_peer
from integration.test_minecraft_peers import (
    MC_PROTOCOL,
    MC_VERSION,
    MCSTATUS_TIMEOUT_S,
    NODE_DIR,
    McBackend,
    StatusResult,
    closed_line,
    login_via,
    node_json,
    require_node_peers,
)
from tests.support import ProxyProcess, running_proxy

pytestmark = pytest.mark.peer

# Another protocol a client may announce (1.20.2); the status cache keys on it.
OTHER_PROTOCOL = 764
# mc_server.js answers with minecraft-protocol's default player limit.
BACKEND_MAX_PLAYERS = 20
# How long a check that something did NOT reach a backend waits for it anyway.
QUIET_S = 0.3


@contextmanager
def mc_backend(node: str, name: str) -> Iterator[McBackend]:
    """``mc_server.js <name>`` on a port the OS picks; its MOTD is ``backend-<name>``."""
    with running_peer(
        [node, "mc_server.js", name, MC_VERSION], name=f"mc-{name}", cwd=NODE_DIR
    ) as peer:
        port = int(peer.wait_for_line(r'"event":"listening".*"port":(\d+)').group(1))
        yield McBackend(peer, port)


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, McBackend]]:
    node = require_node_peers()
    with mc_backend(node, "A") as a, mc_backend(node, "B") as b:
        yield {"A": a, "B": b}


def server_file(domain: str, port: int, extra: str = "") -> str:
    return f'domains = ["{domain}"]\naddresses = ["127.0.0.1:{port}"]\n{extra}'


def status_as(proxy: ProxyProcess, domain: str, protocol: int = MC_PROTOCOL) -> StatusResult:
    """mcstatus status request and ping to the proxy, announcing ``domain`` and ``protocol``
    (``status_via`` in test_minecraft_peers, with the protocol a parameter)."""
    with TCPSocketConnection(proxy.address, timeout=MCSTATUS_TIMEOUT_S) as connection:
        client = JavaClient(connection, address=Address(domain, proxy.port), version=protocol)
        client.handshake()
        status = client.read_status()
        latency_ms = client.test_ping()
        return StatusResult(status, latency_ms, connection.socket.getsockname()[1])


def ping_reason(
    proxy: ProxyProcess, domain: str, route: str, protocol: int = MC_PROTOCOL
) -> tuple[StatusResult, str]:
    """A status ping and the reason discoproxy logged when it closed the connection."""
    result = status_as(proxy, domain, protocol)
    line = closed_line(proxy, result.client_port, route)
    return result, line.rpartition(" reason=")[2]


def status_events(backend: McBackend, since: int, host: str) -> list[dict[str, Any]]:
    return [
        event
        for event in json_lines(backend.peer.lines[since:])
        if event.get("event") == "status" and event.get("host") == host
    ]


def png_64x64() -> bytes:
    """A valid 64x64 RGBA PNG: signature, IHDR, one zlib IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + bytes((4 * y, 255 - 4 * y, 128, 255)) * 64 for y in range(64))
    header = struct.pack(">IIBBBBB", 64, 64, 8, 6, 0, 0, 0)  # 8-bit RGBA, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def legacy_exchange(proxy: ProxyProcess, request: bytes) -> tuple[str, int]:
    """Send a pre-1.7 ping; the ``0xFF`` kick's UTF-16BE text and our client port."""
    with socket.create_connection(proxy.address, timeout=MCSTATUS_TIMEOUT_S) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data[:1] == b"\xff", f"not a legacy kick: {data[:16]!r}"
    (units,) = struct.unpack(">H", data[1:3])
    assert len(data) == 3 + 2 * units, f"kick declares {units} UTF-16 units, got {data!r}"
    return data[3:].decode("utf-16-be"), client_port


def legacy_fields_1_4(text: str) -> dict[str, str]:
    """``§1\\0proto\\0version\\0motd\\0online\\0max`` (the 1.4+ answer) by name."""
    parts = text.split("\0")
    assert len(parts) == 6 and parts[0] == "\u00a71", repr(text)
    return dict(zip(("protocol", "version", "motd", "online", "max"), parts[1:], strict=True))


# -- status cache -------------------------------------------------------------------------


def test_cache_hit_is_answered_without_asking_the_backend(
    tmp_path: Path, backends: dict[str, McBackend]
) -> None:
    a = backends["A"]
    domain = "cached.example.com"
    servers = {"cached.toml": server_file(domain, a.port, "status_cache_ttl = 30\n")}
    with running_proxy(tmp_path, servers) as proxy:
        seen = len(a.peer.lines)
        first, first_reason = ping_reason(proxy, domain, "cached@file")
        second, second_reason = ping_reason(proxy, domain, "cached@file")

        assert first.status.motd.to_plain() == second.status.motd.to_plain() == "backend-A"
        assert first_reason == "status answered (online)"
        assert second_reason == "status answered (cached)"
        assert second.latency_ms >= 0
        time.sleep(QUIET_S)
        assert len(status_events(a, seen, domain)) == 1, a.peer.output()

        # Another client protocol is another cache entry: the backend is asked once more.
        other, other_reason = ping_reason(proxy, domain, "cached@file", OTHER_PROTOCOL)
        again, again_reason = ping_reason(proxy, domain, "cached@file", OTHER_PROTOCOL)
        assert other.status.motd.to_plain() == again.status.motd.to_plain() == "backend-A"
        assert (other_reason, again_reason) == (
            "status answered (online)",
            "status answered (cached)",
        )
        time.sleep(QUIET_S)
        assert len(status_events(a, seen, domain)) == 2, a.peer.output()


def test_ttl_zero_asks_the_backend_on_every_ping(
    tmp_path: Path, backends: dict[str, McBackend]
) -> None:
    b = backends["B"]
    domain = "live.example.com"
    servers = {"live.toml": server_file(domain, b.port, "status_cache_ttl = 0\n")}
    with running_proxy(tmp_path, servers) as proxy:
        seen = len(b.peer.lines)
        for count in range(1, 4):
            result, reason = ping_reason(proxy, domain, "live@file")
            assert result.status.motd.to_plain() == "backend-B"
            assert reason == "status answered (online)"
            b.peer.wait_for_json(seen, timeout=5, event="status", host=domain)
            assert len(status_events(b, seen, domain)) == count, b.peer.output()


def test_stale_answer_is_served_after_the_backend_dies_then_unreachable(tmp_path: Path) -> None:
    node = require_node_peers()
    ttl, stale_for = 0.5, 2.0
    domain = "fragile.example.com"
    with mc_backend(node, "S") as backend:
        extra = f'name = "Fragile"\nstatus_cache_ttl = {ttl}\n'
        servers = {"fragile.toml": server_file(domain, backend.port, extra)}
        config = f"status_stale_for = {stale_for}\nstatus_timeout = 1\n"
        with running_proxy(tmp_path, servers, config) as proxy:
            before = time.monotonic()
            first, reason = ping_reason(proxy, domain, "fragile@file")
            filled = time.monotonic()  # the cache entry is stamped between before and filled
            assert first.status.motd.to_plain() == "backend-S"
            assert reason == "status answered (online)"

            backend.peer.process.terminate()
            backend.peer.process.wait(5)
            time.sleep(max(0.0, filled + ttl + 0.05 - time.monotonic()))
            stale, reason = ping_reason(proxy, domain, "fragile@file")
            assert time.monotonic() < before + ttl + stale_for, "too slow to see the stale answer"
            assert stale.status.motd.to_plain() == "backend-S"
            assert stale.status.version.name == MC_VERSION
            assert reason == "status answered (stale)"
            proxy.wait_for_line(r"status of Fragile served stale")

            time.sleep(max(0.0, filled + ttl + stale_for + 0.05 - time.monotonic()))
            gone, reason = ping_reason(proxy, domain, "fragile@file")
            assert gone.status.motd.to_plain() == "Fragile is unreachable"
            assert gone.status.version.name == "offline"
            assert reason == "status answered (unreachable)"


def test_cached_online_motd_names_the_domain_of_each_ping(
    tmp_path: Path, backends: dict[str, McBackend]
) -> None:
    a = backends["A"]
    extra = 'status_cache_ttl = 30\n[motds.online]\ntext = "Welcome to {domain}"\n'
    servers = {
        "multi.toml": (
            'domains = ["one.example.com", "two.example.com"]\n'
            f'addresses = ["127.0.0.1:{a.port}"]\n{extra}'
        )
    }
    with running_proxy(tmp_path, servers) as proxy:
        one, reason = ping_reason(proxy, "one.example.com", "multi@file")
        assert one.status.motd.to_plain() == "Welcome to one.example.com"
        assert reason == "status answered (online)"
        two, reason = ping_reason(proxy, "two.example.com", "multi@file")
        assert reason == "status answered (cached)"
        assert two.status.motd.to_plain() == "Welcome to two.example.com"


# -- answers discoproxy makes up ----------------------------------------------------------


def test_unreachable_backend_shows_the_unreachable_motd(tmp_path: Path) -> None:
    closed = free_port()
    servers = {
        "alpha.toml": server_file(
            "alpha.example.com",
            closed,
            'name = "Alpha"\n[motds.unreachable]\ntext = "§cAlpha is down"\n',
        ),
        "beta.toml": server_file("beta.example.com", closed, 'name = "Beta"\n'),
    }
    with running_proxy(tmp_path, servers) as proxy:
        alpha, reason = ping_reason(proxy, "alpha.example.com", "alpha@file")
        assert alpha.status.motd.to_plain() == "Alpha is down"
        assert "§c" in json.dumps(alpha.status.motd.raw, ensure_ascii=False)
        assert alpha.status.version.name == "offline"
        assert reason == "status answered (unreachable)"

        # No override: the global default names the server.
        beta, reason = ping_reason(proxy, "beta.example.com", "beta@file")
        assert beta.status.motd.to_plain() == "Beta is unreachable"
        assert beta.status.version.name == "offline"
        assert reason == "status answered (unreachable)"


def test_unknown_domain_shows_the_configured_motd(tmp_path: Path) -> None:
    config = '[motds.unknown_domain]\ntext = "No such server: {domain}"\nversion_name = "nope"\n'
    with running_proxy(tmp_path, {}, config) as proxy:
        result = status_as(proxy, "ghost.example.com")
        assert result.status.motd.to_plain() == "No such server: ghost.example.com"
        assert result.status.version.name == "nope"
        assert result.latency_ms >= 0
        closed_line(proxy, result.client_port, "-")

        # A 1.6 client's ping for the same name gets the same answer, legacy format.
        text, _ = legacy_exchange(proxy, encode_legacy_ping_1_6("ghost.example.com", proxy.port))
        fields = legacy_fields_1_4(text)
        assert fields["motd"] == "No such server: ghost.example.com"
        assert fields["version"] == "nope"


def test_global_unreachable_text_keeps_the_default_version(tmp_path: Path) -> None:
    servers = {"gone.toml": server_file("gone.example.com", free_port(), 'name = "Gone"\n')}
    config = '[motds.unreachable]\ntext = "§c{server} is down"\n'
    with running_proxy(tmp_path, servers, config) as proxy:
        result, reason = ping_reason(proxy, "gone.example.com", "gone@file")
        assert result.status.motd.to_plain() == "Gone is down"
        assert reason == "status answered (unreachable)"
        assert result.status.version.name == "offline"
        assert result.status.version.protocol == -1


def test_online_motd_patches_the_backend_answer(
    tmp_path: Path, backends: dict[str, McBackend]
) -> None:
    a = backends["A"]
    icon = tmp_path / "icon.png"
    icon.write_bytes(png_64x64())
    domain = "patched.example.com"
    extra = (
        'name = "Patchy"\n'
        "[motds.online]\n"
        'text = "§6Welcome to {server}"\n'
        'version_name = "Patched 1.20.4"\n'
        "max_players = 500\n"
        f'favicon = "{icon}"\n'
    )
    servers = {"patched.toml": server_file(domain, a.port, extra)}
    with running_proxy(tmp_path, servers) as proxy:
        seen = len(a.peer.lines)
        result, reason = ping_reason(proxy, domain, "patched@file")

        assert result.status.motd.to_plain() == "Welcome to Patchy"
        assert result.status.version.name == "Patched 1.20.4"
        assert result.status.version.protocol == MC_PROTOCOL  # not patched: the backend's
        assert result.status.players.max == 500
        assert result.status.players.online == 0  # not patched: the backend's
        data_uri = "data:image/png;base64," + base64.b64encode(icon.read_bytes()).decode()
        assert result.status.icon == data_uri
        assert reason == "status answered (online)"
        a.peer.wait_for_json(seen, timeout=5, event="status", host=domain)


# -- legacy pings -------------------------------------------------------------------------


def test_legacy_pings_are_routed_and_answered_in_their_format(
    tmp_path: Path, backends: dict[str, McBackend]
) -> None:
    a, b = backends["A"], backends["B"]
    servers = {
        "survival.toml": server_file("survival.example.com", a.port),
        "fallback.toml": f'default = true\naddresses = ["127.0.0.1:{b.port}"]\n',
    }
    with running_proxy(tmp_path, servers) as proxy:
        # 1.6: routed by the host in its MC|PingHost message.
        seen = len(a.peer.lines)
        request = encode_legacy_ping_1_6("survival.example.com", proxy.port)
        text, client_port = legacy_exchange(proxy, request)
        fields = legacy_fields_1_4(text)
        assert fields["motd"] == "backend-A"
        assert fields["version"] == MC_VERSION
        assert fields["protocol"] == str(MC_PROTOCOL)
        assert (fields["online"], fields["max"]) == ("0", str(BACKEND_MAX_PLAYERS))
        a.peer.wait_for_json(seen, timeout=5, event="status", host="survival.example.com")
        line = closed_line(proxy, client_port, "survival@file")
        assert line.endswith("reason=status answered (online)")

        # mcstatus LegacyServer: FE 01 FA and nothing more, answered as 1.4 after a
        # moment; no host, so the default route's backend.
        legacy = LegacyServer("127.0.0.1", proxy.port, timeout=MCSTATUS_TIMEOUT_S).status(tries=1)
        assert legacy.motd.to_plain() == "backend-B"
        assert legacy.version.name == MC_VERSION
        assert legacy.players.max == BACKEND_MAX_PLAYERS

        # Beta 1.8-1.3: FE alone, answered as motd§online§max.
        text, client_port = legacy_exchange(proxy, b"\xfe")
        assert text == f"backend-B\u00a70\u00a7{BACKEND_MAX_PLAYERS}"
        closed_line(proxy, client_port, "fallback@file")


# -- players' clients ----------------------------------------------------------------------


def test_login_disconnect_messages_reach_the_client(tmp_path: Path) -> None:
    node = require_node_peers()
    servers = {
        "down.toml": server_file("down.example.com", free_port(), 'name = "Downtown"\n'),
    }
    config = (
        'unreachable_message = "Sorry, {server} is down ({domain})"\n'
        'unknown_server_message = "Nothing at {domain}"\n'
    )
    with running_proxy(tmp_path, servers, config) as proxy:
        events = login_via(proxy, "down.example.com", node)
        kicks = [event for event in events if event["event"] == "disconnect"]
        assert kicks, events
        assert "Sorry, Downtown is down (down.example.com)" in kicks[0]["reason"]
        assert not any(event["event"] == "play" for event in events)
        connect = next(event for event in events if event["event"] == "connect")
        line = closed_line(proxy, connect["port"], "down@file")
        assert line.endswith("reason=backend unreachable")

        events = login_via(proxy, "ghost.example.com", node)
        kicks = [event for event in events if event["event"] == "disconnect"]
        assert kicks, events
        assert "Nothing at ghost.example.com" in kicks[0]["reason"]

        # With no [motds.unknown_domain] text, the status answer says the same.
        result = status_as(proxy, "ghost.example.com")
        assert result.status.motd.to_plain() == "Nothing at ghost.example.com"


@pytest.mark.parametrize(
    ("rewrite", "seen_host"),
    [
        pytest.param("mc.internal", "mc.internal", id="explicit"),
        pytest.param("backend", "127.0.0.1", id="dialed-host"),
    ],
)
def test_domain_rewrite_is_what_the_backend_sees(
    tmp_path: Path, backends: dict[str, McBackend], rewrite: str, seen_host: str
) -> None:
    node = require_node_peers()
    a = backends["A"]
    domain = "rewrite.example.com"
    servers = {"rewrite.toml": server_file(domain, a.port, f'domain_rewrite = "{rewrite}"\n')}
    with running_proxy(tmp_path, servers) as proxy:
        seen = len(a.peer.lines)
        events = login_via(proxy, domain, node)
        assert {"event": "play", "state": "play"} in events, events
        login = a.peer.wait_for_json(seen, timeout=5, event="login", username="tester")
        assert login["host"] == seen_host

        seen = len(a.peer.lines)
        result, reason = ping_reason(proxy, domain, "rewrite@file")
        assert result.status.motd.to_plain() == "backend-A"
        assert reason == "status answered (online)"
        status = a.peer.wait_for_json(seen, timeout=5, event="status")
        assert status["host"] == seen_host


def test_minecraft_protocol_ping_gets_the_backend_answer(
    tmp_path: Path, backends: dict[str, McBackend]
) -> None:
    node = require_node_peers()
    b = backends["B"]
    domain = "npm.example.com"
    servers = {"npm.toml": server_file(domain, b.port)}
    with running_proxy(tmp_path, servers) as proxy:
        seen = len(b.peer.lines)
        events = node_json(node, "mc_ping.js", str(proxy.port), domain, MC_VERSION)
        status = next((event for event in events if event["event"] == "status"), None)
        assert status is not None, events
        description = status["description"]
        text = description if isinstance(description, str) else description.get("text")
        assert text == "backend-B", status
        assert status["version"] == {"name": MC_VERSION, "protocol": MC_PROTOCOL}
        assert status["players"]["max"] == BACKEND_MAX_PLAYERS
        assert status["latency"] is not None and status["latency"] >= 0
        b.peer.wait_for_json(seen, timeout=5, event="status", host=domain)
        line = closed_line(proxy, status["port"], "npm@file")
        assert line.endswith("reason=status answered (online)")
