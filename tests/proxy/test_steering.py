"""Steering client addresses across a SO_REUSEPORT group (issue 20's building block): the
kernel, running our classic BPF program, hands every connection and datagram of one
client IP to the same socket, the one :func:`steer_index` names, and spreads different
IPs over the group. Loopback only: 127.0.0.0/8 gives many source addresses; IPv6
loopback has one (::1), so many IPv6 sources are tried in a network namespace of their
own (``unshare -rn``), whose loopback gets documentation addresses (2001:db8::/32)."""

from __future__ import annotations

import collections
import json
import select
import socket
import subprocess
import sys

import pytest

from discoproxy.proxy.steering import attach, program, steer_index
from tests.support import REPO, dependency_missing, require_program


def group(kind: int, family: int, host: str, size: int, v6only: bool = True) -> list[socket.socket]:
    socks: list[socket.socket] = []
    for _ in range(size):
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((host, socks[0].getsockname()[1] if socks else 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        socks.append(sock)
    attach(socks[0], size)
    return socks


def reach(kind: int, source: str, port: int) -> None:
    """One connection (or datagram) from ``source`` to 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, kind) as client:
        client.bind((source, 0))
        if kind == socket.SOCK_STREAM:
            client.connect(("127.0.0.1", port))
        else:
            client.sendto(b"x", ("127.0.0.1", port))


def landed(socks: list[socket.socket]) -> int:
    ready, _, _ = select.select(socks, [], [], 5)
    (sock,) = ready
    if sock.type == socket.SOCK_STREAM:
        conn, _ = sock.accept()
        conn.close()
    else:
        sock.recvfrom(64)
    return socks.index(sock)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_each_client_ip_always_reaches_the_socket_steer_index_names(kind: int, size: int) -> None:
    socks = group(kind, socket.AF_INET, "127.0.0.1", size)
    port = socks[0].getsockname()[1]
    seen: dict[str, set[int]] = collections.defaultdict(set)
    try:
        for n in range(2, 26):
            source = f"127.0.0.{n}"
            for _ in range(3):  # new source ports each time: the address alone decides
                reach(kind, source, port)
                seen[source].add(landed(socks))
    finally:
        for sock in socks:
            sock.close()
    assert {ip: sorted(i) for ip, i in seen.items()} == {ip: [steer_index(ip, size)] for ip in seen}
    assert len(set().union(*seen.values())) == size  # every socket gets clients


def test_ipv6_loopback_is_steered_too() -> None:
    if not socket.has_ipv6:
        dependency_missing("no IPv6 on this host: this Python was built without it")
    try:
        socks = group(socket.SOCK_STREAM, socket.AF_INET6, "::1", 3)
    except OSError as exc:
        dependency_missing(f"no IPv6 loopback here (net.ipv6.conf.lo.disable_ipv6?): {exc}")
    try:
        for _ in range(3):
            with socket.create_connection(("::1", socks[0].getsockname()[1])):
                assert landed(socks) == steer_index("::1", 3)
    finally:
        for sock in socks:
            sock.close()


# Run in a new user and network namespace: loopback up with one destination and many
# source addresses, then one group steered over them; prints where each source landed.
_IN_NAMESPACE = """
import collections, json, socket, subprocess, sys
from tests.proxy.test_steering import group, landed

kind, size, destination, sources = json.loads(sys.argv[1])
commands = ["link set lo up", f"addr add {destination}/128 dev lo nodad"]
commands += [f"addr add {source}/128 dev lo nodad" for source in sources]
subprocess.run(["ip", "-batch", "-"], input="\\n".join(commands) + "\\n", text=True, check=True)
socks = group(kind, socket.AF_INET6, destination, size)
port = socks[0].getsockname()[1]
seen = collections.defaultdict(list)
for source in sources:
    for _ in range(3):  # new source ports each time: the address alone decides
        with socket.socket(socket.AF_INET6, kind) as client:
            client.bind((source, 0))
            if kind == socket.SOCK_STREAM:
                client.connect((destination, port))
            else:
                client.sendto(b"x", (destination, port))
        seen[source].append(landed(socks))
print(json.dumps(seen))
"""


def _namespaces() -> str:
    """``unshare``, once it made a user and network namespace here (else fail under CI,
    skip elsewhere)."""
    unshare = require_program("unshare", "install util-linux")
    require_program("ip", "install iproute2")
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode:
        dependency_missing(
            "no user and network namespace here (unshare -rn: "
            f"{probe.stderr.strip()}; kernel.unprivileged_userns_clone, a seccomp profile?)"
        )
    return unshare


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_ipv6_clients_are_steered_by_their_source_address(kind: int) -> None:
    """Many IPv6 sources to one destination: each lands where steer_index of its source
    says, and they spread over the group (a program reading the destination, or the
    wrong words of the header, would put them all in one place or elsewhere)."""
    unshare = _namespaces()
    size, destination = 3, "2001:db8::1"
    sources = [f"2001:db8:{n:x}::{n * 7919 % 0xFFFF:x}" for n in range(2, 26)]
    assert len({steer_index(source, size) for source in sources}) == size
    ran = subprocess.run(
        [
            unshare,
            "-rn",
            sys.executable,
            "-c",
            _IN_NAMESPACE,
            json.dumps([kind, size, destination, sources]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert ran.returncode == 0, ran.stderr
    seen: dict[str, list[int]] = json.loads(ran.stdout)
    assert {ip: sorted(set(i)) for ip, i in seen.items()} == {
        ip: [steer_index(ip, size)] for ip in sources
    }


def test_mapped_addresses_count_as_ipv4_and_bad_sizes_are_refused() -> None:
    assert steer_index("::ffff:192.0.2.7", 4) == steer_index("192.0.2.7", 4)
    with pytest.raises(ValueError, match="workers: expected 1 or more"):
        program(0)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_a_dual_stack_socket_steers_its_ipv4_clients_by_their_ipv4_address(kind: int) -> None:
    """Port routes listen on "::" without IPV6_V6ONLY when configured so: an IPv4 packet
    reaches an IPv6 socket, and the program reads it as IPv4 (the version nibble)."""
    if not socket.has_ipv6:
        dependency_missing("no IPv6 on this host: this Python was built without it")
    try:
        socks = group(kind, socket.AF_INET6, "::", 3, v6only=False)
    except OSError as exc:
        dependency_missing(f"no IPv6 here (net.ipv6.conf.all.disable_ipv6?): {exc}")
    port = socks[0].getsockname()[1]
    try:
        for n in range(2, 14):
            source = f"127.0.0.{n}"
            reach(kind, source, port)
            assert landed(socks) == steer_index(source, 3), source
    finally:
        for sock in socks:
            sock.close()
