"""Tell Minecraft, legacy Minecraft ping, TLS and HTTP apart from the first bytes.

Rules for this file:

1. :func:`detect_protocol` looks at a prefix only; it never raises on peer bytes and
   returns :data:`NEED_DATA` while the prefix could still become more than one
   protocol. The caller then runs the matching parser on the same buffer.
2. Checks run from the most specific signature to the least: legacy ``FE``, a
   pre-1.7 login ``02``, TLS ``16 03``, an HTTP method, and last the Minecraft frame
   (a VarInt length and packet id 0x00), the only check that matches almost any first
   byte.
   (A complete ``16 03`` is tested first of all, inline: no other signature starts
   with ``16``, and it saves the TLS path three calls per connection.)

The signatures do not collide: a Minecraft handshake of length 22 starts ``16 00``,
not ``16 03``; one of length 65-90 starts with an upper-case letter and then ``00``,
never a second letter. A handshake whose length is 126 mod 128 starts with ``FE``;
see :func:`is_legacy_ping` for how vanilla, and we, read that. A modern handshake is
never 2 bytes long, so none starts ``02``: that is a pre-1.7 login.
"""

from __future__ import annotations

import enum

from ._types import Buffer
from .errors import NEED_DATA, HandshakeTooLarge, NeedData
from .http import looks_like_http
from .minecraft import (
    HANDSHAKE_PACKET_ID,
    LEGACY_LOGIN_PACKET_ID,
    MAX_HANDSHAKE_PACKET_BYTES,
    is_legacy_ping,
    read_varint,
)
from .tls import CONTENT_TYPE_HANDSHAKE, is_tls

_LEGACY_PING = 0xFE
_LEGACY_LOGIN_PROTOCOLS = (39, 78)  # 1.3.1 … 1.6.4


class Sniffed(enum.Enum):
    """The protocol a connection's first bytes belong to."""

    MINECRAFT = "minecraft"
    MINECRAFT_LEGACY = "minecraft_legacy"
    MINECRAFT_LEGACY_LOGIN = "minecraft_legacy_login"
    TLS = "tls"
    HTTP = "http"
    UNKNOWN = "unknown"


# Members as module constants: on Python 3.11 ``Sniffed.X`` goes through EnumType's
# ``__getattr__`` hook, about 4x a plain load, once per connection.
_MINECRAFT = Sniffed.MINECRAFT
_MINECRAFT_LEGACY = Sniffed.MINECRAFT_LEGACY
_MINECRAFT_LEGACY_LOGIN = Sniffed.MINECRAFT_LEGACY_LOGIN
_TLS = Sniffed.TLS
_HTTP = Sniffed.HTTP
_UNKNOWN = Sniffed.UNKNOWN


def detect_protocol(buf: Buffer) -> Sniffed | NeedData:
    """Classify the connection from the bytes received so far."""
    size = len(buf)
    if size > 1 and buf[0] == CONTENT_TYPE_HANDSHAKE and buf[1] == 3:
        return _TLS  # is_tls inlined
    if size == 0:
        return NEED_DATA
    if buf[0] == _LEGACY_PING and is_legacy_ping(buf):
        return _MINECRAFT_LEGACY
    if buf[0] == LEGACY_LOGIN_PACKET_ID:
        if size < 2:
            return NEED_DATA
        # 1.2.5 and older: a string16's high length byte (0); 1.3.1-1.6.4: protocol 39-78.
        # Anything else after 02 is some other protocol (the default route may take it).
        if buf[1] == 0 or _LEGACY_LOGIN_PROTOCOLS[0] <= buf[1] <= _LEGACY_LOGIN_PROTOCOLS[1]:
            return _MINECRAFT_LEGACY_LOGIN
    tls = is_tls(buf)
    if isinstance(tls, NeedData):
        return NEED_DATA
    if tls:
        return _TLS
    http = looks_like_http(buf)
    if isinstance(http, NeedData):
        return NEED_DATA
    if http:
        return _HTTP
    return _detect_minecraft(buf)


def _detect_minecraft(buf: Buffer) -> Sniffed | NeedData:
    try:
        header = read_varint(buf)
    except HandshakeTooLarge:
        return _UNKNOWN
    if isinstance(header, NeedData):
        return NEED_DATA
    length, pos = header
    if not 0 < length <= MAX_HANDSHAKE_PACKET_BYTES:
        return _UNKNOWN
    if len(buf) <= pos:
        return NEED_DATA
    return _MINECRAFT if buf[pos] == HANDSHAKE_PACKET_ID else _UNKNOWN
