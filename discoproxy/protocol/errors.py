"""Errors raised by the sans-IO parsers and encoders.

Rule: parsers never log and never touch sockets. What went wrong goes into the
exception message (what was seen, where, what was expected); the I/O side logs it
once and decides how to answer, guided by ``hint``.
"""

from __future__ import annotations

import enum
from typing import Final, Literal


class Hint(enum.Enum):
    """What the I/O side should answer before closing, so nobody parses messages."""

    CLOSE = "close"
    HTTP_400 = "http_400"
    TLS_ALERT = "tls_alert"


class ProtocolError(Exception):
    """Root of every error raised by :mod:`discoproxy.protocol`."""

    hint: Hint = Hint.CLOSE


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; close that connection only."""


class LocalProtocolError(ProtocolError):
    """The caller misused an encoder (e.g. an out-of-range value); a bug on our side."""


class MalformedHandshake(RemoteProtocolError):
    """A Minecraft packet or handshake does not follow the protocol."""


class HandshakeTooLarge(MalformedHandshake):
    """A Minecraft VarInt or packet length exceeds its cap."""


class MalformedClientHello(RemoteProtocolError):
    """A TLS record or ClientHello cannot be parsed."""

    hint = Hint.TLS_ALERT


class ClientHelloTooLarge(MalformedClientHello):
    """The ClientHello exceeds ``MAX_CLIENT_HELLO_BYTES``."""


class MalformedHttpHead(RemoteProtocolError):
    """An HTTP/1 request head cannot be parsed."""

    hint = Hint.HTTP_400


class HttpHeadTooLarge(MalformedHttpHead):
    """The request head exceeds ``MAX_HTTP_HEAD_BYTES``."""


class InvalidProxyHeader(RemoteProtocolError):
    """A PROXY protocol header is missing, malformed or too large."""


class NeedData(enum.Enum):
    """Sentinel type: the parser needs more bytes before it can decide.

    A one-member enum rather than a plain singleton class so that type checkers
    narrow on identity: after ``if result is NEED_DATA: return``, mypy knows
    ``result`` is the parser's result type.
    """

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __bool__(self) -> Literal[False]:
        return False


NEED_DATA: Final = NeedData.NEED_DATA
