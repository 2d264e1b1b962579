"""The guard (IP filters, per-IP limits, rate budgets, bans) against real clients, on the
real client address that HAProxy carries in a PROXY v2 header.

Topology, loopback only::

    mcstatus / minecraft-protocol client  (bound to 127.0.0.2, 127.0.0.3, …)
      → HAProxy (``mode tcp``, ``server … send-proxy-v2``)
      → discoproxy (``receive_proxy_protocol``, ``trusted_proxies = ["127.0.0.1/32"]``)
      → npm minecraft-protocol backend (``node/mc_server.js``, MOTD ``backend-G``)

Every client connects to HAProxy FROM its own loopback address (all of 127/8 is on ``lo``
on Linux): ``mcstatus`` through a ``socket.create_connection`` given a
``source_address``, the minecraft-protocol client through ``node/guard_client.js``
(``localAddress``; it prints the address it connected from, and can hold the play state
open). HAProxy connects to discoproxy from 127.0.0.1 for every client, so whatever
tells clients apart can only be the address in the PROXY header: a verdict that differs
between two sources proves the guard decided on the header's address, and each
rejection line names it with the client's own port ("rejected 127.0.0.2:<port>: …").

What proves what:
- global ``[ip_filter] deny``: the denied source's status ping is closed without an
  answer while another source reads the backend's MOTD;
- a server's ``[ip_filter] allow``: a login from outside it reads ``not_allowed_message``
  in a login Disconnect, one from inside reaches the play state (and the refused source
  still reaches a server without a filter: the filter is the server's, not global);
- ``[rate_limit]``: the third login in a window from one source reads
  ``rate_limited_message`` while another source logs in, and that source's status pings
  spend their own budget (they keep working, until that budget runs out too);
- bans: ``discoproxy ban add|remove`` run as a separate process while the proxy runs;
  the proxy follows the file ("bans: N from …"), a banned address reads the ban message
  with its reason, a banned username is refused from any address while another
  username logs in, and ``ban remove`` lets it in again;
- ``max_connections_per_ip = 1``: while a login from one source is held in the play
  state, a second one from that source is closed without a reply, one from another
  source logs in, and once the held one ends the source may connect again.

Each test starts its own discoproxy and HAProxy (budgets, counts and the per-cause log
rate limit start fresh); the backend is shared.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from mcstatus._net.address import Address
from mcstatus._protocol.io.connection import TCPSocketConnection
from mcstatus._protocol.java_client import JavaClient

from integration.peers import PeerProcess, free_port, json_lines, running_peer, wait_for_port
from integration.test_minecraft_peers import (
    MC_PROTOCOL,
    MC_VERSION,
    NODE_DIR,
    require_node_peers,
)
from tests.support import REPO, ProxyProcess, require_program, running_proxy

pytestmark = pytest.mark.peer

IO_TIMEOUT_S = 5.0
# guard_client.js gives up after 10 s (plus any hold) by itself; this guards against a
# hung node.
CLIENT_TIMEOUT_S = 20.0
CLI_TIMEOUT_S = 20.0
LOG_TIMEOUT_S = 5.0
# How long the held login of the max_connections_per_ip test may stay; it is ended as
# soon as the test is done with it.
HOLD_S = 30

OPEN = "open.example.com"
VIP = "vip.example.com"
NOT_ALLOWED = "Only players from the office may join this server"
RATE_LIMITED = "Slow down: too many logins from your address"


# -- topology -------------------------------------------------------------------------


@dataclass
class Backend:
    peer: PeerProcess
    port: int


@dataclass
class Guarded:
    """One test's HAProxy → discoproxy pair in front of the shared backend; ``start``
    brings it up (and is torn down with the test). Its processes are fields, so a failed
    test's report shows their output (integration/conftest.py)."""

    backend: PeerProcess
    backend_port: int
    haproxy_path: str
    directory: Path
    stack: ExitStack
    proxy: ProxyProcess | None = None
    haproxy: PeerProcess | None = None
    port: int = 0  # HAProxy's send-proxy-v2 frontend, where every client connects

    @property
    def config_path(self) -> Path:
        return self.directory / "discoproxy.toml"  # written by running_proxy

    @property
    def bans_path(self) -> Path:
        return self.directory / "bans.json"

    def start(self, guard_config: str, servers: dict[str, str] | None = None) -> ProxyProcess:
        upstream = f"127.0.0.1:{self.backend_port}"
        files = {"open.toml": f'domains = ["{OPEN}"]\naddresses = ["{upstream}"]\n'}
        for name, text in (servers or {}).items():
            files[name] = text.replace("{backend}", upstream)
        config = (
            "receive_proxy_protocol = true\n"
            'trusted_proxies = ["127.0.0.1/32"]\n'
            f'bans_file = "{self.bans_path}"\n' + textwrap.dedent(guard_config)
        )
        proxy = self.stack.enter_context(running_proxy(self.directory, files, config=config))
        self.proxy = proxy
        self.port = free_port()
        ready_port = free_port()
        haproxy_config = self.directory / "haproxy.cfg"
        haproxy_config.write_text(haproxy_config_text(self.port, ready_port, proxy.port))
        self.haproxy = self.stack.enter_context(
            running_peer([self.haproxy_path, "-f", str(haproxy_config), "-db"], name="haproxy")
        )
        # A plain HTTP frontend: probing it leaves no half-open PROXY connection behind.
        wait_for_port(("127.0.0.1", ready_port), self.haproxy)
        return proxy


def haproxy_config_text(port: int, ready_port: int, discoproxy_port: int) -> str:
    return textwrap.dedent(
        f"""\
        global
            log stderr format raw local0

        defaults
            log global
            option dontlognull
            timeout connect 2s
            timeout client {HOLD_S + 10}s
            timeout server {HOLD_S + 10}s

        frontend guard
            mode tcp
            bind 127.0.0.1:{port}
            default_backend discoproxy

        backend discoproxy
            mode tcp
            server discoproxy 127.0.0.1:{discoproxy_port} send-proxy-v2

        frontend ready
            mode http
            bind 127.0.0.1:{ready_port}
            http-request return status 200 content-type text/plain string "ready"
        """
    )


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    node = require_node_peers()
    with running_peer([node, "mc_server.js", "G", MC_VERSION], name="mc-G", cwd=NODE_DIR) as peer:
        port = int(peer.wait_for_line(r'"event":"listening".*"port":(\d+)').group(1))
        yield Backend(peer, port)


@pytest.fixture
def guarded(tmp_path: Path, backend: Backend) -> Iterator[Guarded]:
    haproxy = require_program("haproxy", "apt-get install haproxy")
    with ExitStack() as stack:
        yield Guarded(backend.peer, backend.port, haproxy, tmp_path, stack)


# -- clients --------------------------------------------------------------------------


@dataclass
class Status:
    motd: str
    client_port: int


@contextmanager
def mcstatus_connection(source: str, port: int) -> Iterator[TCPSocketConnection]:
    """mcstatus's TCP connection to HAProxy on ``port``, from ``source``.

    TCPSocketConnection calls ``socket.create_connection`` without a source address;
    while it connects, that call is given one."""
    bound = functools.partial(socket.create_connection, source_address=(source, 0))
    with mock.patch.object(socket, "create_connection", bound):
        connection = TCPSocketConnection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    with connection:
        assert connection.socket.getsockname()[0] == source
        yield connection


def status_exchange(connection: TCPSocketConnection, port: int, domain: str) -> str:
    """Handshake, status request and ping on ``connection``; the MOTD as plain text."""
    client = JavaClient(connection, address=Address(domain, port), version=MC_PROTOCOL)
    client.handshake()
    status = client.read_status()
    client.test_ping()
    return status.motd.to_plain()


def status_from(source: str, port: int, domain: str = OPEN) -> Status:
    """An mcstatus status request and ping from ``source``, announcing ``domain``."""
    with mcstatus_connection(source, port) as connection:
        client_port = int(connection.socket.getsockname()[1])
        return Status(status_exchange(connection, port, domain), client_port)


def status_refused(source: str, port: int, domain: str = OPEN) -> int:
    """``source``'s status ping is closed by the far end, neither answered nor left
    hanging; the client port it was sent from."""
    with mcstatus_connection(source, port) as connection:
        client_port = int(connection.socket.getsockname()[1])
        with pytest.raises(OSError) as failure:
            status_exchange(connection, port, domain)
    assert not isinstance(failure.value, TimeoutError), "the proxy held the connection open"
    return client_port


@dataclass
class Login:
    """What guard_client.js printed for one login."""

    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def source(self) -> str:
        return str(self.connect["address"])

    @property
    def connect(self) -> dict[str, Any]:
        connects = [e for e in self.events if e["event"] == "connect"]
        assert connects, self.events
        return connects[0]

    @property
    def client_port(self) -> int:
        return int(self.connect["port"])

    @property
    def played(self) -> bool:
        return any(e["event"] == "play" for e in self.events)

    @property
    def disconnect(self) -> str | None:
        """The text of the Disconnect the client read, if any."""
        kicks = [e for e in self.events if e["event"] == "disconnect"]
        return chat_text(kicks[0]["reason"]) if kicks else None


def chat_text(reason: str) -> str:
    """A login Disconnect's reason (a JSON text component) as plain text."""
    try:
        component = json.loads(reason)
    except json.JSONDecodeError:
        return reason
    if isinstance(component, str):
        return component
    if isinstance(component, dict):
        return str(component.get("text", "")) + "".join(
            chat_text(json.dumps(extra)) for extra in component.get("extra", [])
        )
    return reason


def login_from(source: str, port: int, username: str = "tester", domain: str = OPEN) -> Login:
    """An offline login through HAProxy on ``port``, from ``source``."""
    node = require_node_peers()
    argv = [node, "guard_client.js", str(port), domain, username, MC_VERSION, source]
    result = subprocess.run(
        argv, cwd=NODE_DIR, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False
    )
    login = Login(json_lines(result.stdout.splitlines()))
    printed = f"guard_client.js (rc={result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert login.events, printed
    assert login.source == source, login.events
    assert any(e["event"] == "end" for e in login.events), login.events  # not a timeout
    return login


def logins_at_once(*calls: Callable[[], Login]) -> list[Login]:
    """Independent logins, run side by side (each is a node process of about a second)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


@contextmanager
def held_login(source: str, port: int) -> Iterator[PeerProcess]:
    """A login from ``source`` held in the play state until the block ends."""
    node = require_node_peers()
    argv = [node, "guard_client.js", str(port), OPEN, "holder", MC_VERSION, source, str(HOLD_S)]
    with running_peer(argv, name="held-client", cwd=NODE_DIR) as peer:
        peer.wait_for_json(event="play")
        yield peer


# -- proxy side -----------------------------------------------------------------------


def wait_for_line_after(proxy: ProxyProcess, since: int, pattern: str) -> str:
    """The first log line from line ``since`` on that matches ``pattern``."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + LOG_TIMEOUT_S
    while True:
        for line in proxy.lines[since:]:
            if regex.search(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r} after line {since}")
        time.sleep(0.02)


def rejected_line(proxy: ProxyProcess, source: str, client_port: int, reason: str) -> str:
    """discoproxy's rejection line for the client at ``source``:``client_port``."""
    return proxy.wait_for_line(
        rf"rejected {re.escape(source)}:{client_port}: {re.escape(reason)}", LOG_TIMEOUT_S
    )


def closed_line(proxy: ProxyProcess, login: Login, reason: str) -> str:
    """discoproxy's close line for ``login``'s connection, which ended with ``reason``."""
    client = re.escape(f"{login.source}:{login.client_port}")
    return proxy.wait_for_line(
        rf"closed: client={client} .* reason={re.escape(reason)}$", LOG_TIMEOUT_S
    )


def ban_cli(guarded: Guarded, action: str, *args: str) -> str:
    """``discoproxy ban <action> … --config <the running proxy's>``, as an operator runs it.

    ``--config`` goes before the action: after it, argparse refuses it (see
    test_ban_action_accepts_config_after_it)."""
    config = str(guarded.config_path)
    result = subprocess.run(
        [sys.executable, "-m", "discoproxy", "ban", action, *args, "--config", config],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"ban {action} {args}: rc={result.returncode}\n{result.stderr}"
    return result.stdout


def ban_and_wait(guarded: Guarded, count: int, action: str, *args: str) -> None:
    """Run ``discoproxy ban … <action> …``; return once the proxy has loaded ``count`` bans."""
    proxy = guarded.proxy
    assert proxy is not None
    since = len(proxy.lines)
    ban_cli(guarded, action, *args)
    wait_for_line_after(proxy, since, rf"bans: {count} from {re.escape(str(guarded.bans_path))}")


# -- tests ----------------------------------------------------------------------------


def test_global_deny_applies_to_the_address_in_the_proxy_header(guarded: Guarded) -> None:
    proxy = guarded.start('[ip_filter]\ndeny = ["127.0.0.2/32"]\n')

    denied_port = status_refused("127.0.0.2", guarded.port)
    allowed = status_from("127.0.0.3", guarded.port)

    assert allowed.motd == "backend-G"
    proxy.wait_for_line(
        rf"closed: client=127\.0\.0\.3:{allowed.client_port} route=open@file ", LOG_TIMEOUT_S
    )
    # HAProxy accepted the client at 127.0.0.2:<port> and dialed discoproxy from 127.0.0.1;
    # the refusal names the client's own address and port: the PROXY header's.
    assert guarded.haproxy is not None
    guarded.haproxy.wait_for_line(rf"Connect from 127\.0\.0\.2:{denied_port} ", LOG_TIMEOUT_S)
    rejected_line(proxy, "127.0.0.2", denied_port, "denied by ip_filter")


def test_server_allow_list_refuses_a_login_from_outside_it(guarded: Guarded) -> None:
    vip = f'domains = ["{VIP}"]\naddresses = ["{{backend}}"]\n[ip_filter]\nallow = ["127.0.0.3"]\n'
    proxy = guarded.start(f'not_allowed_message = "{NOT_ALLOWED}"\n', {"vip.toml": vip})

    outsider, insider, outsider_elsewhere = logins_at_once(
        lambda: login_from("127.0.0.2", guarded.port, domain=VIP),
        lambda: login_from("127.0.0.3", guarded.port, domain=VIP),
        lambda: login_from("127.0.0.2", guarded.port, domain=OPEN),
    )

    assert outsider.disconnect == NOT_ALLOWED, outsider.events
    assert not outsider.played
    assert insider.played and insider.disconnect is None, insider.events
    assert outsider_elsewhere.played, outsider_elsewhere.events
    rejected_line(proxy, "127.0.0.2", outsider.client_port, "vip@file: not in ip_filter allow")


def test_rate_limit_budgets_logins_and_status_pings_per_source(guarded: Guarded) -> None:
    proxy = guarded.start(
        f'rate_limited_message = "{RATE_LIMITED}"\n'
        "[rate_limit]\nconnections = 2\nstatus = 3\nwindow = 60\n"
    )

    first = login_from("127.0.0.5", guarded.port)
    second = login_from("127.0.0.5", guarded.port)
    third = login_from("127.0.0.5", guarded.port)
    other = login_from("127.0.0.6", guarded.port)

    assert first.played and second.played, (first.events, second.events)
    assert third.disconnect == RATE_LIMITED, third.events
    assert not third.played
    assert other.played, other.events
    rejected_line(proxy, "127.0.0.5", third.client_port, "rate_limit connections exceeded")

    # Status pings spend their own budget: three go through for the refused source…
    for _ in range(3):
        assert status_from("127.0.0.5", guarded.port).motd == "backend-G"
    # …and the fourth is refused (closed without an answer) while others still get theirs.
    refused_port = status_refused("127.0.0.5", guarded.port)
    assert status_from("127.0.0.6", guarded.port).motd == "backend-G"
    rejected_line(proxy, "127.0.0.5", refused_port, "rate_limit status exceeded")


def test_bans_by_address_and_username_follow_the_ban_command(guarded: Guarded) -> None:
    proxy = guarded.start("")
    assert login_from("127.0.0.4", guarded.port).played  # before any ban

    ban_and_wait(guarded, 1, "add", "127.0.0.4", "--reason", "griefing")
    banned = login_from("127.0.0.4", guarded.port)

    assert banned.disconnect == "You are banned from this server: griefing", banned.events
    assert not banned.played
    rejected_line(proxy, "127.0.0.4", banned.client_port, "banned (127.0.0.4/32)")

    ban_and_wait(guarded, 2, "add", "griefer", "--reason", "cheating")
    from_a, from_b, other_user = logins_at_once(
        lambda: login_from("127.0.0.7", guarded.port, "griefer"),
        lambda: login_from("127.0.0.8", guarded.port, "Griefer"),
        lambda: login_from("127.0.0.7", guarded.port, "builder"),
    )

    for login in (from_a, from_b):
        assert login.disconnect == "You are banned from this server: cheating", login.events
        assert not login.played
    assert other_user.played, other_user.events
    # One "rejected" line per cause per few seconds: the address ban above had it.
    for login in (from_a, from_b):
        closed_line(proxy, login, "refused: banned (user griefer)")

    ban_and_wait(guarded, 1, "remove", "griefer")
    assert login_from("127.0.0.8", guarded.port, "griefer").played
    assert login_from("127.0.0.4", guarded.port).disconnect == (
        "You are banned from this server: griefing"  # the address ban is still in force
    )


def test_max_connections_per_ip_counts_the_real_client_address(guarded: Guarded) -> None:
    proxy = guarded.start("max_connections_per_ip = 1\n")

    with held_login("127.0.0.9", guarded.port) as held:
        second, elsewhere = logins_at_once(
            lambda: login_from("127.0.0.9", guarded.port),
            lambda: login_from("127.0.0.10", guarded.port),
        )

        # Refused right after the PROXY header: closed, no Disconnect to read.
        assert not second.played and second.disconnect is None, second.events
        assert elsewhere.played, elsewhere.events
        rejected_line(proxy, "127.0.0.9", second.client_port, "max_connections_per_ip reached")
        held_connect = held.wait_for_json(event="connect")
        assert held_connect["address"] == "127.0.0.9", held_connect
        held_port = int(held_connect["port"])

    proxy.wait_for_line(rf"closed: client=127\.0\.0\.9:{held_port} route=open@file ", LOG_TIMEOUT_S)
    assert login_from("127.0.0.9", guarded.port).played  # the held one no longer counts


def test_ban_action_accepts_config_after_it(tmp_path: Path) -> None:
    bans = tmp_path / "bans.json"
    config = tmp_path / "discoproxy.toml"
    config.write_text(f'bans_file = "{bans}"\n')
    argv = ["ban", "add", "127.0.0.4", "--reason", "griefing", "--config", str(config)]

    result = subprocess.run(
        [sys.executable, "-m", "discoproxy", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert [ban["ip"] for ban in json.loads(bans.read_text())["bans"]] == ["127.0.0.4/32"]
