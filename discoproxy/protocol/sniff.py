"""Tell Minecraft, legacy Minecraft ping, TLS and HTTP apart from the first bytes.

Rules for this file:

1. :func:`detect_protocol` looks at a prefix only; it never raises on peer bytes and
   returns :data:`NEED_DATA` while the prefix could still become more than one
   protocol. The caller then runs the matching parser on the same buffer.
2. Checks run from the most specific signature to the least: legacy ``FE``, TLS
   ``16 03``, an HTTP method, and last the Minecraft frame (a VarInt length and
   packet id 0x00), which is the only check that can match almost any first byte.

The signatures do not collide: a Minecraft handshake of length 22 starts ``16 00``,
not ``16 03``; one of length 65-90 starts with an upper-case letter and then ``00``,
never a second letter. A handshake whose length is 126 mod 128 starts with ``FE``;
see :func:`is_legacy_ping` for how vanilla, and we, read that.
"""

from __future__ import annotations

import enum

from ._types import Buffer
from .errors import NEED_DATA, HandshakeTooLarge, _NeedData
from .http import looks_like_http
from .minecraft import HANDSHAKE_PACKET_ID, MAX_HANDSHAKE_PACKET_BYTES, is_legacy_ping, read_varint
from .tls import is_tls

_LEGACY_PING = 0xFE


class Sniffed(enum.Enum):
    """The protocol a connection's first bytes belong to."""

    MINECRAFT = "minecraft"
    MINECRAFT_LEGACY = "minecraft_legacy"
    TLS = "tls"
    HTTP = "http"
    UNKNOWN = "unknown"


def detect_protocol(buf: Buffer) -> Sniffed | _NeedData:
    """Classify the connection from the bytes received so far."""
    if len(buf) == 0:
        return NEED_DATA
    if buf[0] == _LEGACY_PING and is_legacy_ping(buf):
        return Sniffed.MINECRAFT_LEGACY
    tls = is_tls(buf)
    if isinstance(tls, _NeedData):
        return NEED_DATA
    if tls:
        return Sniffed.TLS
    http = looks_like_http(buf)
    if isinstance(http, _NeedData):
        return NEED_DATA
    if http:
        return Sniffed.HTTP
    return _detect_minecraft(buf)


def _detect_minecraft(buf: Buffer) -> Sniffed | _NeedData:
    try:
        header = read_varint(buf)
    except HandshakeTooLarge:
        return Sniffed.UNKNOWN
    if isinstance(header, _NeedData):
        return NEED_DATA
    length, pos = header
    if not 0 < length <= MAX_HANDSHAKE_PACKET_BYTES:
        return Sniffed.UNKNOWN
    if len(buf) <= pos:
        return NEED_DATA
    return Sniffed.MINECRAFT if buf[pos] == HANDSHAKE_PACKET_ID else Sniffed.UNKNOWN
