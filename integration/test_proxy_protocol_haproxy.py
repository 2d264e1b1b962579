"""PROXY protocol v1/v2 into and out of discoproxy, with HAProxy on both sides.

Peers: one HAProxy (Debian ``haproxy``, run in the foreground) with
- ``send_v2`` / ``send_v1``: TCP frontends that forward to discoproxy with
  ``send-proxy-v2`` / ``send-proxy`` (an upstream load balancer);
- ``whoami``: an HTTP frontend with ``accept-proxy`` answering ``src=<client address>``
  (a backend that trusts discoproxy's PROXY v2 header);
- ``whoami_plain``: the same without ``accept-proxy``, so it sees discoproxy's address.

The client connects from 127.0.0.7 (or ::1, through HAProxy's IPv6 binds), so the real
client address is told apart from the 127.0.0.1 every hop uses; discoproxy routes the
HTTP request by its Host header. Its ``trusted_proxies`` is 127.0.0.1/32: HAProxy's
connections carry a header, the client's direct ones (from 127.0.0.7) are not expected to.
The ``::1`` cases need an IPv6 loopback: without one they fail under ``CI`` and skip elsewhere.
"""

from __future__ import annotations

import http.client
import re
import socket
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from integration.peers import PeerProcess, free_port, running_peer, wait_for_port
from tests.support import ProxyProcess, dependency_missing, require_program, running_proxy

pytestmark = pytest.mark.peer

IO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Client:
    """Where the test client connects from, and the loopback address it connects to."""

    source: str
    target: str

    def logged(self, port: int) -> str:
        """How discoproxy's close line shows this client."""
        return f"[{self.source}]:{port}" if ":" in self.source else f"{self.source}:{port}"


IPV4 = Client(source="127.0.0.7", target="127.0.0.1")
IPV6 = Client(source="::1", target="::1")
# (PROXY version, client) pairs for HAProxy's send-proxy frontends; v1 says TCP4/TCP6,
# v2 carries AF_INET/AF_INET6 addresses.
UPSTREAMS = [
    pytest.param("v1", IPV4, id="v1-ipv4"),
    pytest.param("v2", IPV4, id="v2-ipv4"),
    pytest.param("v1", IPV6, id="v1-ipv6"),
    pytest.param("v2", IPV6, id="v2-ipv6"),
]


@dataclass
class Topology:
    proxy: ProxyProcess
    haproxy: PeerProcess
    ports: dict[str, int]
    ipv6: bool

    def upstream(self, version: str, client: Client) -> int:
        """The HAProxy frontend that sends PROXY ``version`` for ``client``."""
        if client is IPV6:
            if not self.ipv6:
                dependency_missing(
                    "no IPv6 loopback (::1) on this host: sysctl net.ipv6.conf.lo.disable_ipv6=0"
                )
            return self.ports[f"send_{version}_ipv6"]
        return self.ports[f"send_{version}"]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def haproxy_config(ports: dict[str, int], discoproxy_port: int) -> str:
    binds_v6 = {
        version: f"bind [::1]:{ports[f'send_{version}_ipv6']}"
        if f"send_{version}_ipv6" in ports
        else ""
        for version in ("v1", "v2")
    }
    return textwrap.dedent(
        f"""\
        global
            log stderr format raw local0

        defaults
            log global
            option dontlognull
            timeout connect 2s
            timeout client 5s
            timeout server 5s

        frontend send_v2
            mode tcp
            bind 127.0.0.1:{ports["send_v2"]}
            {binds_v6["v2"]}
            default_backend discoproxy_v2

        frontend send_v1
            mode tcp
            bind 127.0.0.1:{ports["send_v1"]}
            {binds_v6["v1"]}
            default_backend discoproxy_v1

        backend discoproxy_v2
            mode tcp
            server discoproxy 127.0.0.1:{discoproxy_port} send-proxy-v2

        backend discoproxy_v1
            mode tcp
            server discoproxy 127.0.0.1:{discoproxy_port} send-proxy

        frontend whoami
            mode http
            bind 127.0.0.1:{ports["whoami"]} accept-proxy
            http-request return status 200 content-type text/plain lf-string "src=%[src]"

        frontend whoami_plain
            mode http
            bind 127.0.0.1:{ports["whoami_plain"]}
            http-request return status 200 content-type text/plain lf-string "src=%[src]"
        """
    )


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    haproxy = require_program("haproxy", "apt-get install haproxy")
    directory = tmp_path_factory.mktemp("haproxy")
    ipv6 = has_ipv6_loopback()
    ports = {name: free_port() for name in ("send_v2", "send_v1", "whoami", "whoami_plain")}
    if ipv6:
        ports |= {f"send_{version}_ipv6": free_port("::1") for version in ("v1", "v2")}
    servers = {
        "whoami.toml": (
            'domains = ["whoami.example.com"]\n'
            f'addresses = ["127.0.0.1:{ports["whoami"]}"]\n'
            "send_proxy_protocol = true\n"
        ),
        "plain.toml": (
            f'domains = ["plain.example.com"]\naddresses = ["127.0.0.1:{ports["whoami_plain"]}"]\n'
        ),
    }
    config = 'receive_proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n'
    with running_proxy(directory, servers, config=config) as proxy:
        config_path = directory / "haproxy.cfg"
        config_path.write_text(haproxy_config(ports, proxy.port))
        with running_peer([haproxy, "-f", str(config_path), "-db"], name="haproxy") as peer:
            # HAProxy binds every frontend before it accepts on any; probing the plain
            # HTTP one leaves no half-open PROXY connection behind.
            wait_for_port(("127.0.0.1", ports["whoami_plain"]), peer)
            yield Topology(proxy, peer, ports, ipv6)


def get_from(client: Client, port: int, host: str) -> tuple[int, str, int]:
    """GET / with ``host`` from ``client`` to its target: status, body, client port."""
    connection = http.client.HTTPConnection(
        client.target, port, timeout=IO_TIMEOUT_S, source_address=(client.source, 0)
    )
    try:
        connection.connect()
        assert connection.sock is not None
        client_port = int(connection.sock.getsockname()[1])
        connection.request("GET", "/", headers={"Host": host, "Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read().decode(), client_port
    finally:
        connection.close()


def closed_line(topology: Topology, client: Client, client_port: int, route: str) -> str:
    """discoproxy's close line for the connection from ``client`` at ``client_port``."""
    logged = re.escape(client.logged(client_port))
    return topology.proxy.wait_for_line(rf"closed: client={logged} route={route} ")


@pytest.mark.parametrize(("version", "client"), UPSTREAMS)
def test_client_address_from_haproxy_header_is_logged(
    topology: Topology, version: str, client: Client
) -> None:
    status, body, client_port = get_from(
        client, topology.upstream(version, client), "plain.example.com"
    )

    assert status == 200
    # Without send_proxy_protocol the backend sees discoproxy's own address.
    assert body == "src=127.0.0.1"
    closed_line(topology, client, client_port, "plain@file")


def test_send_proxy_protocol_gives_haproxy_accept_proxy_the_client_address(
    topology: Topology,
) -> None:
    status, body, client_port = get_from(IPV4, topology.proxy.port, "whoami.example.com")

    assert (status, body) == (200, f"src={IPV4.source}")
    closed_line(topology, IPV4, client_port, "whoami@file")


@pytest.mark.parametrize(("version", "client"), UPSTREAMS)
def test_client_address_survives_haproxy_discoproxy_haproxy_chain(
    topology: Topology, version: str, client: Client
) -> None:
    status, body, client_port = get_from(
        client, topology.upstream(version, client), "whoami.example.com"
    )

    assert (status, body) == (200, f"src={client.source}")
    closed_line(topology, client, client_port, "whoami@file")


def test_untrusted_direct_client_is_routed_without_a_header(topology: Topology) -> None:
    status, body, client_port = get_from(IPV4, topology.proxy.port, "plain.example.com")

    assert (status, body) == (200, "src=127.0.0.1")
    closed_line(topology, IPV4, client_port, "plain@file")


def test_unknown_host_through_haproxy_gets_421(topology: Topology) -> None:
    status, body, _ = get_from(IPV4, topology.ports["send_v2"], "nowhere.example.com")

    assert status == 421
    assert "Unknown server: nowhere.example.com" in body
