"""Minecraft: Java Edition wire format: VarInt, handshake, status, legacy ping.

Rules for this file:

1. Parsers take a :data:`Buffer` that starts at a packet boundary and return a
   result, :data:`NEED_DATA` (a valid but incomplete prefix), or raise a
   :class:`MalformedHandshake` subclass. They never log and never read past the
   packet they return; ``length`` says how many bytes it took, so the caller can
   replay the whole prefix to the backend untouched.
2. Every size a peer declares is checked against a named cap *before* waiting for
   the bytes, so a peer cannot make us buffer more than the cap.
3. Encoders raise :class:`LocalProtocolError` for values the protocol cannot carry.

Only the uncompressed, unencrypted framing before login completes is handled here:
``VarInt length, VarInt packet id, payload``.

Spec: https://minecraft.wiki/w/Java_Edition_protocol (formerly https://wiki.vg/Protocol),
https://minecraft.wiki/w/Java_Edition_protocol/Server_List_Ping (formerly
https://wiki.vg/Server_List_Ping) for the status exchange and the pre-1.7 ``0xFE`` ping.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

from ._types import Buffer
from .errors import (
    NEED_DATA,
    HandshakeTooLarge,
    LocalProtocolError,
    MalformedHandshake,
    NeedData,
)
from .names import TCPSHIELD_SEPARATOR as TCPSHIELD_SEPARATOR
from .names import minecraft_host as minecraft_host
from .names import normalize_host as normalize_host

# A VarInt carries a signed 32-bit int in 7-bit groups: ceil(32 / 7) = 5 bytes.
MAX_VARINT_BYTES = 5

# Cap on a handshake packet's declared length (packet id + fields, without the length
# prefix). The address alone is String(255): 255 UTF-16 units, up to 3 UTF-8 bytes each,
# 765 bytes; Velocity raises it to 255 + len("\0FML\0") + 1 = 261 characters (783 bytes)
# for Forge clients. BungeeCord IP forwarding appends "\0ip\0uuid\0properties-json" and
# the signed "textures" property alone is ~1.3 KB (base64 value plus a 684-character
# RSA signature), so a forwarded handshake is ~1.7 KB. 4096 keeps that with 2x headroom
# while a peer still cannot make us buffer more than one page before routing.
MAX_HANDSHAKE_PACKET_BYTES = 4096

# Vanilla's frame decoder reads the length as a VarInt of at most 3 bytes, so no
# uncompressed packet is longer than 2**21 - 1 bytes.
MAX_PACKET_BYTES = 2097151

# Longest String the protocol allows (wiki "Data types": String (32767)), in characters.
MAX_STRING_CHARS = 32767

# Legacy (pre-1.7) kick packet: id 0xFF, UTF-16BE string with a 16-bit length in units.
MAX_LEGACY_KICK_UNITS = 0xFFFF

# Host name in a 1.6 ``MC|PingHost`` ping, in UTF-16 units: the same 255 the modern
# handshake allows for its String(255) address. A 1.6 client sends the name typed in
# the server list, so anything longer is not a client we can route.
MAX_LEGACY_HOST_UNITS = 255

HANDSHAKE_PACKET_ID = 0x00
STATUS_RESPONSE_PACKET_ID = 0x00
PONG_PACKET_ID = 0x01
LOGIN_DISCONNECT_PACKET_ID = 0x00

NEXT_STATE_STATUS = 1
NEXT_STATE_LOGIN = 2
NEXT_STATE_TRANSFER = 3  # 1.20.5+: a login arriving through a Transfer packet
_NEXT_STATES = frozenset({NEXT_STATE_STATUS, NEXT_STATE_LOGIN, NEXT_STATE_TRANSFER})

_LEGACY_PING = 0xFE
_LEGACY_1_4_MARKER = 0x01
_LEGACY_1_6_PLUGIN_MESSAGE = 0xFA
_LEGACY_KICK = 0xFF
_LEGACY_SEPARATOR_BETA = "\u00a7"

# 1.6 ping: FE 01 FA, then a plugin message on the "MC|PingHost" channel.
_PING_HOST_CHANNEL = "MC|PingHost"
_PING_HOST_PREFIX = bytes((_LEGACY_PING, _LEGACY_1_4_MARKER, _LEGACY_1_6_PLUGIN_MESSAGE)) + (
    struct.pack(">H", len(_PING_HOST_CHANNEL)) + _PING_HOST_CHANNEL.encode("utf-16-be")
)
# Data after the channel: protocol byte, unsigned short host units, host, int32 port.
_PING_HOST_FIXED_DATA = 1 + 2 + 4
_MAX_PING_HOST_DATA = _PING_HOST_FIXED_DATA + 2 * MAX_LEGACY_HOST_UNITS
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1
_UINT32_MASK = 0xFFFFFFFF
_PORT = struct.Struct(">H")


class Handshake(NamedTuple):  # built per connection: 3× cheaper than a frozen dataclass
    """A parsed handshake (packet 0x00 in the Handshaking state)."""

    protocol_version: int
    server_address: str
    """Normalised with :func:`minecraft_host`: the name routes match against."""
    raw_address: str
    """The address exactly as sent, FML/BungeeCord suffixes included."""
    server_port: int
    next_state: int
    """1 status, 2 login, 3 transfer."""
    length: int
    """Bytes consumed, length prefix included."""


class Packet(NamedTuple):  # built per connection: 3× cheaper than a frozen dataclass
    """One uncompressed packet: id and raw payload."""

    packet_id: int
    payload: bytes
    length: int
    """Bytes consumed, length prefix included."""


def read_varint(buf: Buffer, offset: int = 0) -> tuple[int, int] | NeedData:
    """Read a VarInt at *offset*; return ``(value, offset_after)`` or NEED_DATA.

    The value is a signed 32-bit int, as Java reads it: bits past the 32nd are
    dropped. More than five bytes raises :class:`HandshakeTooLarge`.
    """
    end = len(buf)
    if offset >= end:
        return NEED_DATA
    byte = buf[offset]
    if byte < 0x80:
        return byte, offset + 1
    result = byte & 0x7F
    for index in range(1, MAX_VARINT_BYTES):
        pos = offset + index
        if pos >= end:
            return NEED_DATA
        byte = buf[pos]
        result |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            result &= _UINT32_MASK
            if result > _INT32_MAX:
                result -= 1 << 32
            return result, pos + 1
    raise HandshakeTooLarge(f"VarInt at offset {offset} is longer than {MAX_VARINT_BYTES} bytes")


def encode_varint(value: int) -> bytes:
    """Encode a signed 32-bit int as a VarInt (negatives as two's complement: 5 bytes)."""
    if not _INT32_MIN <= value <= _INT32_MAX:
        raise LocalProtocolError(f"VarInt value {value} outside int32 range")
    value &= _UINT32_MASK
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_frame(buf: Buffer, cap: int, what: str) -> tuple[int, int] | NeedData:
    """Check a frame's length prefix; return ``(body_start, body_end)`` or NEED_DATA."""
    header = read_varint(buf)
    if isinstance(header, NeedData):
        return NEED_DATA
    declared, start = header
    if declared > cap:
        raise HandshakeTooLarge(f"{what} length {declared} exceeds cap {cap}")
    if declared <= 0:
        raise MalformedHandshake(f"{what} length {declared}, expected at least 1 (the packet id)")
    return start, start + declared


def parse_handshake(buf: Buffer) -> Handshake | NeedData:
    """Parse the client's first packet: the handshake.

    Layout: VarInt length, VarInt packet id (0x00), VarInt protocol version, String
    server address, unsigned short port, VarInt next state (1, 2 or 3). The fields
    must exactly fill the declared length.
    """
    frame = _read_frame(buf, MAX_HANDSHAKE_PACKET_BYTES, "handshake packet")
    if isinstance(frame, NeedData):
        return NEED_DATA
    start, end = frame
    if len(buf) < end:
        # Reject a wrong one-byte packet id now rather than after waiting for the
        # whole packet (a byte >= 0x80 may still start an over-long encoding of 0).
        if len(buf) > start and HANDSHAKE_PACKET_ID != buf[start] < 0x80:
            raise MalformedHandshake(
                f"handshake packet id {buf[start]:#04x}, expected {HANDSHAKE_PACKET_ID:#04x}"
            )
        return NEED_DATA
    body = bytes(buf[start:end])
    packet_id, pos = _field_varint(body, 0, "packet id")
    if packet_id != HANDSHAKE_PACKET_ID:
        raise MalformedHandshake(
            f"handshake packet id {packet_id:#04x}, expected {HANDSHAKE_PACKET_ID:#04x}"
        )
    protocol_version, pos = _field_varint(body, pos, "protocol version")
    raw_address, pos = _field_string(body, pos, "server address")
    if pos + _PORT.size > len(body):
        raise MalformedHandshake(
            f"handshake ends at byte {len(body)} inside the server port at byte {pos}"
        )
    (server_port,) = _PORT.unpack_from(body, pos)
    next_state, pos = _field_varint(body, pos + _PORT.size, "next state")
    if next_state not in _NEXT_STATES:
        raise MalformedHandshake(
            f"handshake next state {next_state}, expected 1 (status), 2 (login) or 3 (transfer)"
        )
    if pos != len(body):
        raise MalformedHandshake(
            f"handshake packet declares {len(body)} bytes but its fields end at byte {pos}"
        )
    return Handshake(
        protocol_version=protocol_version,
        server_address=minecraft_host(raw_address),
        raw_address=raw_address,
        server_port=server_port,
        next_state=next_state,
        length=end,
    )


def _field_varint(body: bytes, pos: int, field: str) -> tuple[int, int]:
    result = read_varint(body, pos)
    if isinstance(result, NeedData):
        raise MalformedHandshake(f"packet ends at byte {len(body)} inside the {field} VarInt")
    return result


def _field_string(body: bytes, pos: int, field: str) -> tuple[str, int]:
    size, pos = _field_varint(body, pos, f"{field} length")
    if size < 0:
        raise MalformedHandshake(f"{field} length {size} is negative")
    end = pos + size
    if end > len(body):
        raise MalformedHandshake(
            f"{field} length {size} at byte {pos} runs past the packet end at byte {len(body)}"
        )
    try:
        return body[pos:end].decode("utf-8"), end
    except UnicodeDecodeError as exc:
        raise MalformedHandshake(
            f"{field} is not valid UTF-8: {exc.reason} at byte {pos + exc.start}"
        ) from None


def encode_handshake(
    protocol_version: int, server_address: str, server_port: int, next_state: int
) -> bytes:
    """Build a handshake packet that :func:`parse_handshake` reads back unchanged."""
    if not 0 <= server_port <= 0xFFFF:
        raise LocalProtocolError(f"server port {server_port} outside 0-65535")
    if next_state not in _NEXT_STATES:
        raise LocalProtocolError(f"next state {next_state}, expected 1, 2 or 3")
    payload = b"".join(
        (
            encode_varint(protocol_version),
            encode_string(server_address),
            _PORT.pack(server_port),
            encode_varint(next_state),
        )
    )
    return encode_packet(HANDSHAKE_PACKET_ID, payload)


def is_legacy_ping(buf: Buffer) -> bool:
    """Whether *buf* starts a pre-1.7 server-list ping, deciding as vanilla does.

    Beta 1.8-1.3 send ``FE``; 1.4-1.5 send ``FE 01``; 1.6 sends ``FE 01 FA ...``. A
    modern packet whose length is 126 mod 128 also starts with ``FE``, so like
    vanilla's ``LegacyQueryHandler`` this looks at what has arrived: ``FE`` alone or
    ``FE 01`` alone is legacy, ``FE 01 FA`` is legacy, anything else is not.
    """
    size = len(buf)
    if size == 0 or buf[0] != _LEGACY_PING:
        return False
    if size == 1:
        return True
    if buf[1] != _LEGACY_1_4_MARKER:
        return False
    return size == 2 or buf[2] == _LEGACY_1_6_PLUGIN_MESSAGE


class LegacyPing(NamedTuple):  # built per connection: 3× cheaper than a frozen dataclass
    """A parsed pre-1.7 server-list ping (see :func:`parse_legacy_ping`)."""

    kind: str
    """``"beta"`` (Beta 1.8-1.3: ``FE``), ``"1.4"`` (1.4-1.5: ``FE 01``) or ``"1.6"``."""
    protocol_version: int | None
    """1.6 only: the protocol byte of the ``MC|PingHost`` message (73 for 1.6.1)."""
    host: str | None
    """1.6 only: normalised with :func:`minecraft_host`, the name routes match against."""
    raw_host: str | None
    """1.6 only: the host exactly as sent."""
    port: int | None
    """1.6 only."""
    length: int
    """Bytes consumed."""


_BETA_PING = LegacyPing("beta", None, None, None, None, 1)
_PING_1_4 = LegacyPing("1.4", None, None, None, None, 2)


def parse_legacy_ping(buf: Buffer) -> LegacyPing | NeedData:
    """Parse a pre-1.7 server-list ping that :func:`is_legacy_ping` accepts.

    Like vanilla, the kind is decided by what has arrived: ``FE`` alone is a Beta
    1.8-1.3 ping and ``FE 01`` alone a 1.4-1.5 ping (those clients send nothing more
    and wait for the kick). ``FE 01 FA`` starts the 1.6 layout: unsigned short channel
    length in UTF-16 units (11), ``MC|PingHost`` in UTF-16BE, unsigned short data
    length (``7 + 2 * host units``), protocol byte, unsigned short host length in
    UTF-16 units, host in UTF-16BE, int32 port (0-65535). Anything else, ``FE 01``
    followed by another byte included (a modern packet of length 254), is not a legacy
    ping and raises :class:`MalformedHandshake`, as :func:`is_legacy_ping` decides.
    """
    if not buf:
        return NEED_DATA
    if not is_legacy_ping(buf):
        head = bytes(buf[:3]).hex(" ")
        raise MalformedHandshake(f"bytes {head} do not start a legacy ping (FE, FE 01, FE 01 FA)")
    size = len(buf)
    if size == 1:
        return _BETA_PING
    if size == 2:
        return _PING_1_4
    prefix_end = len(_PING_HOST_PREFIX)
    seen = bytes(buf[3:prefix_end])
    expected = _PING_HOST_PREFIX[3 : 3 + len(seen)]
    if seen != expected:
        if seen[:2] != expected[:2]:
            raise MalformedHandshake(
                f"1.6 ping channel length {seen[:2].hex(' ')}, expected 00 0b"
                f" ({len(_PING_HOST_CHANNEL)} UTF-16 units: {_PING_HOST_CHANNEL})"
            )
        raise MalformedHandshake(
            f"1.6 ping channel bytes {seen[2:].hex(' ')} are not {_PING_HOST_CHANNEL!r} in UTF-16BE"
        )
    host_start = prefix_end + 2 + 1 + 2
    if size < host_start:
        if size >= prefix_end + 2:
            _check_ping_host_data(_U16.unpack_from(buf, prefix_end)[0])
        return NEED_DATA
    (data_length,) = _U16.unpack_from(buf, prefix_end)
    _check_ping_host_data(data_length)
    protocol_version = buf[prefix_end + 2]
    (host_units,) = _U16.unpack_from(buf, prefix_end + 3)
    if host_units > MAX_LEGACY_HOST_UNITS:
        raise HandshakeTooLarge(
            f"1.6 ping host of {host_units} UTF-16 units exceeds cap {MAX_LEGACY_HOST_UNITS}"
        )
    if data_length != _PING_HOST_FIXED_DATA + 2 * host_units:
        raise MalformedHandshake(
            f"1.6 ping data length {data_length}, expected"
            f" {_PING_HOST_FIXED_DATA + 2 * host_units} for a host of {host_units} UTF-16 units"
        )
    port_start = host_start + 2 * host_units
    end = port_start + _I32.size
    if size < end:
        return NEED_DATA
    try:
        raw_host = bytes(buf[host_start:port_start]).decode("utf-16-be")
    except UnicodeDecodeError as exc:
        raise MalformedHandshake(
            f"1.6 ping host is not valid UTF-16BE: {exc.reason} at byte {host_start + exc.start}"
        ) from None
    (port,) = _I32.unpack_from(buf, port_start)
    if not 0 <= port <= 0xFFFF:
        raise MalformedHandshake(f"1.6 ping port {port} outside 0-65535")
    return LegacyPing(
        kind="1.6",
        protocol_version=protocol_version,
        host=minecraft_host(raw_host),
        raw_host=raw_host,
        port=port,
        length=end,
    )


def _check_ping_host_data(data_length: int) -> None:
    """Reject a 1.6 ping data length no host can give, before waiting for the host."""
    if data_length > _MAX_PING_HOST_DATA:
        raise HandshakeTooLarge(
            f"1.6 ping data length {data_length} exceeds cap {_MAX_PING_HOST_DATA}"
            f" (a host of {MAX_LEGACY_HOST_UNITS} UTF-16 units)"
        )
    if data_length < _PING_HOST_FIXED_DATA or data_length % 2 == 0:
        raise MalformedHandshake(
            f"1.6 ping data length {data_length}, expected 7 + 2 * host UTF-16 units"
        )


# -- pre-1.7 logins -------------------------------------------------------------------

LEGACY_LOGIN_PACKET_ID = 0x02
# Vanilla names are at most 16 characters; a little room for servers that allow more.
MAX_LEGACY_USERNAME_UNITS = 32
# 1.2.5 and older send "username;host:port" as one string.
MAX_LEGACY_PRE_1_3_UNITS = MAX_LEGACY_USERNAME_UNITS + 1 + MAX_LEGACY_HOST_UNITS + 6


class LegacyLogin(NamedTuple):
    """A parsed pre-1.7 login handshake (packet ``0x02``, see :func:`parse_legacy_login`)."""

    protocol_version: int
    """1.3-1.6: the protocol byte (39 for 1.3.1 … 78 for 1.6.4); 0 for 1.2.5 and older."""
    username: str
    host: str
    """Normalised with :func:`minecraft_host`, the name routes match against."""
    raw_host: str
    """The host exactly as sent."""
    port: int
    length: int
    """Bytes consumed."""


def is_legacy_login(buf: Buffer) -> bool:
    """``0x02`` first: a pre-1.7 login. No modern handshake starts so (a packet of
    length 2 is too short to be one)."""
    return len(buf) > 0 and buf[0] == LEGACY_LOGIN_PACKET_ID


def _legacy_string(buf: Buffer, pos: int, cap: int, what: str) -> tuple[str, int] | NeedData:
    """A string16 (unsigned short length in UTF-16 units, then UTF-16BE) at ``pos``."""
    if len(buf) < pos + 2:
        return NEED_DATA
    (units,) = _U16.unpack_from(buf, pos)
    if units > cap:
        raise HandshakeTooLarge(f"legacy login {what} of {units} UTF-16 units exceeds cap {cap}")
    end = pos + 2 + 2 * units
    if len(buf) < end:
        return NEED_DATA
    try:
        return bytes(buf[pos + 2 : end]).decode("utf-16-be"), end
    except UnicodeDecodeError as exc:
        raise MalformedHandshake(
            f"legacy login {what} is not valid UTF-16BE: {exc.reason} at byte {pos + 2 + exc.start}"
        ) from None


def parse_legacy_login(buf: Buffer) -> LegacyLogin | NeedData:
    """Parse a pre-1.7 login handshake that :func:`is_legacy_login` accepts.

    1.3-1.6: ``02``, protocol byte, username and host as string16 (unsigned short
    length in UTF-16 units, UTF-16BE), int32 port. 1.2.5 and older: ``02`` and one
    string16 ``username;host:port``; told apart by the byte after ``02``, a protocol
    number (39-78) there and the high byte of a short length (0) here.
    """
    if not buf:
        return NEED_DATA
    if not is_legacy_login(buf):
        raise MalformedHandshake(f"byte {buf[0]:02x} does not start a legacy login (02)")
    if len(buf) < 2:
        return NEED_DATA
    if buf[1] == 0:  # 1.2.5 and older
        text = _legacy_string(buf, 1, MAX_LEGACY_PRE_1_3_UNITS, "handshake")
        if isinstance(text, NeedData):
            return NEED_DATA
        combined, end = text
        username, sep, address = combined.partition(";")
        raw_host, colon, port_text = address.rpartition(":")
        if not sep or not colon or not port_text.isdigit() or not 0 <= int(port_text) <= 0xFFFF:
            raise MalformedHandshake(
                f"legacy login {combined!r} is not 'username;host:port' (1.2.5 and older)"
            )
        port = int(port_text)
        protocol_version = 0
    else:
        protocol_version = buf[1]
        name = _legacy_string(buf, 2, MAX_LEGACY_USERNAME_UNITS, "username")
        if isinstance(name, NeedData):
            return NEED_DATA
        username, pos = name
        host = _legacy_string(buf, pos, MAX_LEGACY_HOST_UNITS, "host")
        if isinstance(host, NeedData):
            return NEED_DATA
        raw_host, pos = host
        end = pos + _I32.size
        if len(buf) < end:
            return NEED_DATA
        (port,) = _I32.unpack_from(buf, pos)
        if not 0 <= port <= 0xFFFF:
            raise MalformedHandshake(f"legacy login port {port} outside 0-65535")
    if not username:
        raise MalformedHandshake("legacy login without a username")
    return LegacyLogin(protocol_version, username, minecraft_host(raw_host), raw_host, port, end)


def _encode_string16(value: str, cap: int, what: str) -> bytes:
    try:
        data = value.encode("utf-16-be")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"legacy {what} is not encodable: {exc.reason}") from None
    if len(data) // 2 > cap:
        raise LocalProtocolError(
            f"legacy {what} of {len(data) // 2} UTF-16 units exceeds cap {cap}"
        )
    return _U16.pack(len(data) // 2) + data


def encode_legacy_login(protocol_version: int, username: str, host: str, port: int) -> bytes:
    """Build the login handshake a pre-1.7 client sends (``protocol_version`` 0: the
    1.2.5 form); :func:`parse_legacy_login` reads it back."""
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"legacy login port {port} outside 0-65535")
    if protocol_version == 0:
        combined = f"{username};{host}:{port}"
        return bytes((LEGACY_LOGIN_PACKET_ID,)) + _encode_string16(
            combined, MAX_LEGACY_PRE_1_3_UNITS, "handshake"
        )
    if not 1 <= protocol_version <= 255:
        raise LocalProtocolError(f"legacy login protocol {protocol_version} outside 1-255")
    return (
        bytes((LEGACY_LOGIN_PACKET_ID, protocol_version))
        + _encode_string16(username, MAX_LEGACY_USERNAME_UNITS, "username")
        + _encode_string16(host, MAX_LEGACY_HOST_UNITS, "host")
        + _I32.pack(port)
    )


def encode_legacy_disconnect(text: str) -> bytes:
    """A pre-1.7 Disconnect/Kick (``0xFF``, string16 reason): what a 1.2-1.6 client
    shows when its login is refused."""
    data = text.encode("utf-16-be", "surrogatepass")
    units = min(len(data) // 2, MAX_LEGACY_KICK_UNITS)
    return bytes((_LEGACY_KICK,)) + _U16.pack(units) + data[: 2 * units]


def encode_legacy_ping_1_6(host: str, port: int, protocol_version: int = 74) -> bytes:
    """Build the ping a 1.6 client sends; :func:`parse_legacy_ping` reads it back."""
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"legacy ping port {port} outside 0-65535")
    if not 0 <= protocol_version <= 0xFF:
        raise LocalProtocolError(f"legacy ping protocol version {protocol_version} outside 0-255")
    try:
        data = host.encode("utf-16-be")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"legacy ping host is not encodable: {exc.reason}") from None
    units = len(data) // 2
    if units > MAX_LEGACY_HOST_UNITS:
        raise LocalProtocolError(
            f"legacy ping host of {units} UTF-16 units exceeds cap {MAX_LEGACY_HOST_UNITS}"
        )
    return b"".join(
        (
            _PING_HOST_PREFIX,
            _U16.pack(_PING_HOST_FIXED_DATA + len(data)),
            bytes((protocol_version,)),
            _U16.pack(units),
            data,
            _I32.pack(port),
        )
    )


def parse_packet(buf: Buffer, max_bytes: int = MAX_PACKET_BYTES) -> Packet | NeedData:
    """Parse one uncompressed packet (Status Request, Ping Request, Login Start, ...)."""
    frame = _read_frame(buf, max_bytes, "packet")
    if isinstance(frame, NeedData):
        return NEED_DATA
    start, end = frame
    if len(buf) < end:
        return NEED_DATA
    body = bytes(buf[start:end])
    packet_id, pos = _field_varint(body, 0, "packet id")
    return Packet(packet_id=packet_id, payload=body[pos:], length=end)


def encode_packet(packet_id: int, payload: bytes) -> bytes:
    """Frame *payload* as an uncompressed packet: VarInt length, VarInt id, payload."""
    body = encode_varint(packet_id) + payload
    if len(body) > MAX_PACKET_BYTES:
        raise LocalProtocolError(f"packet length {len(body)} exceeds cap {MAX_PACKET_BYTES}")
    return encode_varint(len(body)) + body


def encode_string(s: str) -> bytes:
    """Encode a protocol String: VarInt byte length, then UTF-8."""
    if len(s) > MAX_STRING_CHARS:
        raise LocalProtocolError(f"string of {len(s)} characters exceeds cap {MAX_STRING_CHARS}")
    try:
        data = s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"string is not encodable as UTF-8: {exc.reason}") from None
    return encode_varint(len(data)) + data


def encode_status_response(status_json: str) -> bytes:
    """Status Response (Status state, clientbound 0x00) carrying *status_json*."""
    return encode_packet(STATUS_RESPONSE_PACKET_ID, encode_string(status_json))


def encode_pong(payload: bytes) -> bytes:
    """Pong Response (Status state, clientbound 0x01) echoing the 8-byte ping payload."""
    if len(payload) != 8:
        raise LocalProtocolError(f"pong payload of {len(payload)} bytes, expected 8")
    return encode_packet(PONG_PACKET_ID, bytes(payload))


def encode_login_disconnect(reason_json: str) -> bytes:
    """Disconnect (Login state, clientbound 0x00) with a JSON text component."""
    return encode_packet(LOGIN_DISCONNECT_PACKET_ID, encode_string(reason_json))


def text_component(text: str) -> str:
    """A plain JSON text component, e.g. for :func:`encode_login_disconnect`."""
    return json.dumps({"text": text})


def status_json(
    description: str,
    version_name: str = "discoproxy",
    protocol: int = -1,
    max_players: int = 0,
    online: int = 0,
) -> str:
    """A server-list status document. ``protocol=-1`` makes clients show the version
    name as incompatible, which is what a proxy answering for a missing server wants.
    """
    return json.dumps(
        {
            "version": {"name": version_name, "protocol": protocol},
            "players": {"max": max_players, "online": online, "sample": []},
            "description": {"text": description},
        }
    )


def encode_legacy_kick(
    motd: str,
    protocol: int = 127,
    version_name: str = "discoproxy",
    online: int = 0,
    max_players: int = 0,
) -> bytes:
    """Answer a legacy ``0xFE`` ping in the 1.4+ format.

    ``0xFF``, UTF-16BE length in code units, then
    ``§1\\0{protocol}\\0{version}\\0{motd}\\0{online}\\0{max}``. Clients before 1.4
    show garbled text but still close cleanly.
    """
    for field, value in (("motd", motd), ("version name", version_name)):
        if "\0" in value:
            raise LocalProtocolError(f"legacy kick {field} {value!r} contains NUL, the separator")
    text = f"\u00a71\0{protocol}\0{version_name}\0{motd}\0{online}\0{max_players}"
    data = text.encode("utf-16-be", "surrogatepass")
    units = len(data) // 2
    if units > MAX_LEGACY_KICK_UNITS:
        raise LocalProtocolError(
            f"legacy kick of {units} UTF-16 units exceeds cap {MAX_LEGACY_KICK_UNITS}"
        )
    return bytes((_LEGACY_KICK,)) + struct.pack(">H", units) + data


def encode_legacy_beta_kick(motd: str, online: int, max_players: int) -> bytes:
    """Answer a Beta 1.8-1.3 ``FE`` ping: ``0xFF``, UTF-16BE length in code units, then
    ``{motd}§{online}§{max}``.

    ``§`` is the separator, so *motd* must not contain it: strip formatting codes first.
    """
    if _LEGACY_SEPARATOR_BETA in motd:
        raise LocalProtocolError(
            f"legacy beta kick motd {motd!r} contains \u00a7, the separator: strip codes first"
        )
    text = _LEGACY_SEPARATOR_BETA.join((motd, str(online), str(max_players)))
    try:
        data = text.encode("utf-16-be")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"legacy beta kick is not encodable: {exc.reason}") from None
    units = len(data) // 2
    if units > MAX_LEGACY_KICK_UNITS:
        raise LocalProtocolError(
            f"legacy kick of {units} UTF-16 units exceeds cap {MAX_LEGACY_KICK_UNITS}"
        )
    return bytes((_LEGACY_KICK,)) + _U16.pack(units) + data


LOGIN_START_PACKET_ID = 0x00
# Login Start's name is String(16), but 1.19-1.19.2 (protocols 759, 760) follow it with the
# player's signing key: a timestamp, a 294-byte public key and a 512-byte Mojang signature
# (845 bytes in all). A peer may not make us wait for more than this before we give up.
MAX_LOGIN_START_BYTES = 2048
MAX_USERNAME_CHARS = 16


class LoginStart(NamedTuple):
    """The client's first packet in the Login state: the player's name."""

    username: str
    length: int
    """Bytes consumed, length prefix included."""


def parse_login_start(buf: Buffer) -> LoginStart | NeedData:
    """Parse Login Start (Login state, serverbound 0x00): VarInt length, VarInt id, String(16)
    name, then version-dependent fields (UUID, signature data) that are skipped."""
    packet = parse_packet(buf, max_bytes=MAX_LOGIN_START_BYTES)
    if isinstance(packet, NeedData):
        return NEED_DATA
    if packet.packet_id != LOGIN_START_PACKET_ID:
        raise MalformedHandshake(
            f"login start packet id {packet.packet_id:#04x}, expected {LOGIN_START_PACKET_ID:#04x}"
        )
    name, _ = _field_string(packet.payload, 0, "username")
    if not 1 <= len(name) <= MAX_USERNAME_CHARS:
        raise MalformedHandshake(
            f"username of {len(name)} characters, expected 1-{MAX_USERNAME_CHARS}"
        )
    if not name.isprintable() or any(c.isspace() for c in name):
        # it goes into log lines, the API and webhooks: no line breaks, no controls
        raise MalformedHandshake(f"username {name!r} has spaces or control characters")
    return LoginStart(username=name, length=packet.length)


def encode_login_start(username: str, extra: bytes = b"") -> bytes:
    """Build Login Start (``extra``: the version's fields after the name, e.g. a UUID)."""
    return encode_packet(LOGIN_START_PACKET_ID, encode_string(username) + extra)
