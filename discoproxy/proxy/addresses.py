"""Socket addresses as the data plane and the operator see them.

Rules for this file:
- Pure functions over ``(host, port)`` tuples: no sockets, no logging. Every module that
  prints, keys or sends an address goes through these, so one address reads the same in
  the close line, ``/api/connections``, ``/metrics`` and a PROXY header.
- Every PROXY header discoproxy sends (passthrough, TLS termination, status pings, UDP)
  is built by :func:`proxy_v2_header`, from the same :data:`Proxied` pair.
- ``format_addr`` brackets IPv6 hosts (``[::1]:25565``), as URLs and HAProxy logs do.
"""

from __future__ import annotations

import ipaddress
import socket

from discoproxy.protocol.proxy_protocol import encode_v2

Address = tuple[str, int]
# What a PROXY header to a backend carries: (source, destination) = the real client and
# the address it reached — both as a trusted upstream's PROXY header said, when it did.
Proxied = tuple[Address, Address]

# host → family for IP literals (None: a name to resolve); bounded, hosts repeat
_LITERAL_FAMILY: dict[str, socket.AddressFamily | None] = {}
MAX_LITERAL_CACHE = 4096


def format_addr(addr: tuple[str, int] | None) -> str:
    """``host:port``, ``[v6]:port``, or ``-`` for no address."""
    if addr is None:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def literal_family(host: str) -> socket.AddressFamily | None:
    """The address family of an IP literal, or None when ``host`` is a name."""
    try:
        return _LITERAL_FAMILY[host]
    except KeyError:
        pass
    family: socket.AddressFamily | None
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = None
    if len(_LITERAL_FAMILY) < MAX_LITERAL_CACHE:
        _LITERAL_FAMILY[host] = family
    return family


def unmapped(addr: tuple[str, int]) -> tuple[str, int]:
    """``::ffff:a.b.c.d`` → ``a.b.c.d`` (and no ``%zone``), so a dual-stack listener
    still sends v4 PROXY headers."""
    host = addr[0]
    if host.startswith("::ffff:"):
        mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
        if mapped is not None:
            return (str(mapped), addr[1])
    return (host.split("%", 1)[0], addr[1])


def proxy_v2_header(proxied: Proxied, transport: str = "tcp") -> bytes:
    """The PROXY v2 header for a backend: IPv4-mapped addresses sent as IPv4, zones
    dropped, so a dual-stack listener still says "a.b.c.d"."""
    source, destination = proxied
    return encode_v2(unmapped(source), unmapped(destination), transport=transport)
