"""Host-name normalisation shared by the Minecraft, TLS and HTTP sniffers.

Rules for this file:

1. A route's ``domains`` match whatever name the sniffer found (Minecraft handshake
   address, TLS SNI, HTTP Host), so every sniffer normalises through
   :func:`normalize_host` and nothing else: cut at the first NUL, drop one trailing
   dot, lower-case. A Minecraft address is first cut at TCPShield's ``///`` too
   (:func:`minecraft_host`): ``/`` is never part of a host name.
2. Pure string functions; nothing here knows which protocol the name came from.

References: Forge's ``\\0FML\\0`` / ``\\0FML2\\0`` / ``\\0FML3\\0`` handshake markers and
BungeeCord's ``host\\0ip\\0uuid\\0properties`` IP forwarding both append to the address
after a NUL (https://minecraft.wiki/w/Java_Edition_protocol); a fully-qualified name's
trailing dot (RFC 1034 §3.1) names the same host; RFC 3986 §3.2.2 (``host``) and
RFC 9110 §7.2 (``Host = uri-host [ ":" port ]``) for :func:`strip_port`. TCPShield's
real-IP handshake writes ``host///ip:port///timestamp///signature`` into the address
(its plugin's docs; Gate Lite's ``ClearVirtualHost`` cuts at ``///`` the same way).
"""

from __future__ import annotations

# RFC 3986 §3.2.3: port = *DIGIT; TCP ports stop at 65535, so more digits are junk.
_MAX_PORT_DIGITS = 5
_MAX_PORT = 65535


def normalize_host(name: str) -> str:
    """Return *name* cut at its first NUL, without one trailing dot, lower-cased.

    ``"Play.Example.COM.\\0FML3\\0"`` becomes ``"play.example.com"``.
    """
    nul = name.find("\0")
    if nul >= 0:
        name = name[:nul]
    if name.endswith("."):
        name = name[:-1]
    return name.lower()


TCPSHIELD_SEPARATOR = "///"


def minecraft_host(address: str) -> str:
    """The name a Minecraft handshake address routes by: :func:`normalize_host` of the
    part before TCPShield's ``///`` real-IP data.

    ``"Play.Example.com///1.2.3.4:5555///1700000000///c2ln"`` gives ``"play.example.com"``.
    """
    cut = address.find(TCPSHIELD_SEPARATOR)
    return normalize_host(address if cut < 0 else address[:cut])


def strip_port(host: str) -> str:
    """Return the host part of an HTTP ``Host`` value (``uri-host [":" port]``).

    ``"example.com:8080"`` gives ``"example.com"``; ``"[::1]:8080"`` and ``"[::1]"``
    give ``"::1"`` (brackets dropped, so the value compares equal to an address
    literal in a route). An empty port (``"host:"``) is allowed by RFC 3986.

    Raises ``ValueError`` naming what was seen for an unclosed bracket, a bare IPv6
    literal (RFC 3986 requires brackets in an authority) or a port that is not 0-65535.
    """
    if host.startswith("["):
        close = host.find("]")
        if close < 0:
            raise ValueError(f"host {host!r} opens '[' without a closing ']'")
        rest = host[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"host {host!r} has {rest!r} after ']', expected ':port' or nothing")
        _check_port(host, rest[1:])
        return host[1:close]
    colon = host.find(":")
    if colon < 0:
        return host
    port = host[colon + 1 :]
    if ":" in port:
        raise ValueError(f"host {host!r} has several ':', an IPv6 literal must be in brackets")
    _check_port(host, port)
    return host[:colon]


def _check_port(host: str, port: str) -> None:
    if not port:
        return
    if not (len(port) <= _MAX_PORT_DIGITS and port.isascii() and port.isdigit()):
        raise ValueError(f"host {host!r} has port {port!r}, expected 0-{_MAX_PORT}")
    if int(port) > _MAX_PORT:
        raise ValueError(f"host {host!r} has port {port}, expected 0-{_MAX_PORT}")
