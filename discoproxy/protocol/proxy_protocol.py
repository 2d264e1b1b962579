"""HAProxy PROXY protocol: decode v1 and v2 headers, encode v2 (and v1 for peers/tests).

Rules for this file:

1. :func:`parse_proxy_header` takes a :data:`Buffer` starting at the connection's
   first byte and returns a :class:`ProxyHeader`, :data:`NEED_DATA`, or raises
   :class:`InvalidProxyHeader`. It decides whether a signature is present as soon as
   the bytes allow and never later than :data:`SIGNATURE_DEADLINE_BYTES`: a listener
   that requires the header drops a connection without one at once (spec §2: "the
   protocol is not covered by this specification and the connection must be dropped").
2. Nothing past the header is read; ``length`` says where the payload starts.
3. Addresses come back canonical (``str(ipaddress.ip_address(...))``), so
   ``"::FFFF:1.2.3.4"`` and ``"::ffff:102:304"`` compare equal after parsing.
4. Encoders raise :class:`LocalProtocolError` for input they cannot represent.

Spec: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt — §2.1 (v1 text
line), §2.2 (v2 binary header), §2.2.x (TLVs).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ._types import Buffer
from .errors import NEED_DATA, InvalidProxyHeader, LocalProtocolError, NeedData

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "

# The v2 fixed part: 12-byte signature, version/command, family/protocol, u16 length.
V2_HEADER_BYTES = 16

# Spec §2.1: the longest v1 line, "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n", is
# 107 characters; "If the CRLF sequence is not found in the first 107 characters,
# the receiver should declare the line invalid."
MAX_V1_HEADER_BYTES = 107

# Spec §2: "Both formats are designed to fit in the smallest TCP segment that any
# TCP/IP host is required to support (576 - 40 = 536 bytes)." That holds the 16-byte
# v2 header, a 216-byte AF_UNIX block and ~300 bytes of TLVs; senders (HAProxy,
# nginx, AWS NLB, our own encoder) stay under it, so a longer header is an attack.
MAX_PROXY_HEADER_BYTES = 536

# Spec §2.2: the v2 signature is 12 bytes and the v1 "PROXY " prefix 6, and the
# receiver identifies the version from at most the first 16 bytes.
SIGNATURE_DEADLINE_BYTES = 16

V2_VERSION = 2
V2_COMMAND_LOCAL = 0x0
V2_COMMAND_PROXY = 0x1
V2_FAMILY_UNSPEC = 0x0
V2_FAMILY_INET = 0x1
V2_FAMILY_INET6 = 0x2
V2_FAMILY_UNIX = 0x3
V2_TRANSPORT_UNSPEC = 0x0
V2_TRANSPORT_STREAM = 0x1
V2_TRANSPORT_DGRAM = 0x2

_COMMANDS = {V2_COMMAND_LOCAL: "LOCAL", V2_COMMAND_PROXY: "PROXY"}
_TRANSPORTS = {V2_TRANSPORT_UNSPEC: "unspec", V2_TRANSPORT_STREAM: "tcp", V2_TRANSPORT_DGRAM: "udp"}
_TRANSPORT_CODES = {"tcp": V2_TRANSPORT_STREAM, "udp": V2_TRANSPORT_DGRAM}
_INET = struct.Struct(">4s4sHH")
_INET6 = struct.Struct(">16s16sHH")
_U16 = struct.Struct(">H")
_TLV_HEADER = struct.Struct(">BH")
_MAX_PORT = 65535

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY header."""

    version: int
    """1 (text) or 2 (binary)."""
    command: str
    """``"PROXY"`` (relayed) or ``"LOCAL"`` (v2 LOCAL or v1 UNKNOWN: use the real peer)."""
    transport: str
    """``"tcp"``, ``"udp"`` or ``"unspec"``."""
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int
    """Bytes consumed: the payload starts here."""
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """v2 type-length-value pairs after the addresses, in order."""


def parse_proxy_header(buf: Buffer) -> ProxyHeader | NeedData:
    """Decode the PROXY v1 or v2 header at the start of *buf*."""
    size = len(buf)
    if size == 0:
        return NEED_DATA
    first = bytes(buf[:SIGNATURE_DEADLINE_BYTES])
    if first[0] == V2_SIGNATURE[0]:
        seen = min(size, len(V2_SIGNATURE))
        if first[:seen] != V2_SIGNATURE[:seen]:
            raise _no_signature(first)
        return _parse_v2(buf, size)
    seen = min(size, len(V1_PREFIX))
    if first[:seen] != V1_PREFIX[:seen]:
        raise _no_signature(first)
    if size == seen:
        return NEED_DATA
    return _parse_v1(buf, size)


def _no_signature(first: bytes) -> InvalidProxyHeader:
    return InvalidProxyHeader(
        f"data does not start with a proxy protocol signature: got {first!r}, "
        f"expected {V2_SIGNATURE!r} (v2) or {V1_PREFIX!r} (v1)"
    )


def _parse_v2(buf: Buffer, size: int) -> ProxyHeader | NeedData:
    if size <= len(V2_SIGNATURE):
        return NEED_DATA
    version, command = buf[12] >> 4, buf[12] & 0x0F
    if version != V2_VERSION:
        raise InvalidProxyHeader(f"PROXY v2 version {version}, expected 2")
    if command not in _COMMANDS:
        raise InvalidProxyHeader(f"PROXY v2 command {command:#x}, expected 0 (LOCAL) or 1 (PROXY)")
    if size < 14:
        return NEED_DATA
    family, transport = buf[13] >> 4, buf[13] & 0x0F
    if family > V2_FAMILY_UNIX or transport not in _TRANSPORTS:
        raise InvalidProxyHeader(
            f"PROXY v2 family/protocol byte {buf[13]:#04x}, expected family 0-3 and protocol 0-2"
        )
    if size < V2_HEADER_BYTES:
        return NEED_DATA
    (block_length,) = _U16.unpack_from(buf, 14)
    total = V2_HEADER_BYTES + block_length
    if total > MAX_PROXY_HEADER_BYTES:
        raise InvalidProxyHeader(
            f"PROXY v2 header length {total} exceeds maximum size {MAX_PROXY_HEADER_BYTES}"
        )
    if size < total:
        return NEED_DATA
    # Spec §2.2: LOCAL "must discard the protocol block including the family", and an
    # UNSPEC family carries no address the receiver can interpret.
    if command == V2_COMMAND_LOCAL:
        return ProxyHeader(2, "LOCAL", "unspec", None, None, total)
    transport_name = _TRANSPORTS[transport]
    if family == V2_FAMILY_UNSPEC:
        return ProxyHeader(2, "PROXY", transport_name, None, None, total)
    if family == V2_FAMILY_UNIX:
        raise InvalidProxyHeader("PROXY v2 unsupported address family AF_UNIX")
    block = bytes(buf[V2_HEADER_BYTES:total])
    layout, name = (_INET, "AF_INET") if family == V2_FAMILY_INET else (_INET6, "AF_INET6")
    if block_length < layout.size:
        raise InvalidProxyHeader(
            f"PROXY v2 address block of {block_length} bytes, "
            f"expected at least {layout.size} for {name}"
        )
    src, dst, src_port, dst_port = layout.unpack_from(block)
    return ProxyHeader(
        version=2,
        command="PROXY",
        transport=transport_name,
        source=(str(ipaddress.ip_address(src)), src_port),
        destination=(str(ipaddress.ip_address(dst)), dst_port),
        length=total,
        tlvs=_parse_tlvs(block, layout.size),
    )


def _parse_tlvs(block: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    end = len(block)
    while pos < end:
        if pos + _TLV_HEADER.size > end:
            raise InvalidProxyHeader(
                f"PROXY v2 TLV header at byte {V2_HEADER_BYTES + pos} is cut off "
                f"by the header end at byte {V2_HEADER_BYTES + end}"
            )
        tlv_type, tlv_length = _TLV_HEADER.unpack_from(block, pos)
        value_start = pos + _TLV_HEADER.size
        pos = value_start + tlv_length
        if pos > end:
            raise InvalidProxyHeader(
                f"PROXY v2 TLV type {tlv_type:#04x} length {tlv_length} runs past "
                f"the header end at byte {V2_HEADER_BYTES + end}"
            )
        tlvs.append((tlv_type, block[value_start:pos]))
    return tuple(tlvs)


def _parse_v1(buf: Buffer, size: int) -> ProxyHeader | NeedData:
    region = bytes(buf[:MAX_V1_HEADER_BYTES])
    newline = region.find(b"\n")
    if newline < 0:
        carriage_return = region.find(b"\r")
        if 0 <= carriage_return < len(region) - 1:
            raise InvalidProxyHeader("PROXY v1 line has a CR not followed by LF")
        if size >= MAX_V1_HEADER_BYTES:
            raise InvalidProxyHeader(
                f"PROXY v1 line has no CRLF within {MAX_V1_HEADER_BYTES} bytes"
            )
        return NEED_DATA
    if region[newline - 1] != 0x0D:
        raise InvalidProxyHeader("PROXY v1 line ends with a bare LF, expected CRLF")
    raw_line = region[: newline - 1]
    if b"\r" in raw_line:
        raise InvalidProxyHeader("PROXY v1 line has a CR not followed by LF")
    if not raw_line.isascii():
        raise InvalidProxyHeader(f"PROXY v1 line {raw_line!r} is not plain ASCII text")
    line = raw_line.decode("ascii")
    fields = line.split(" ")
    length = newline + 1
    # Spec §2.1: for UNKNOWN "the receiver must ignore anything presented before the CRLF".
    if fields[1] == "UNKNOWN":
        return ProxyHeader(1, "LOCAL", "unspec", None, None, length)
    if fields[1] not in ("TCP4", "TCP6"):
        raise InvalidProxyHeader(
            f"PROXY v1 protocol {fields[1]!r}, expected 'TCP4', 'TCP6' or 'UNKNOWN'"
        )
    if len(fields) != 6:
        raise InvalidProxyHeader(
            f"PROXY v1 line {line!r} has {len(fields)} space-separated fields, expected 6"
        )
    ip_version = 4 if fields[1] == "TCP4" else 6
    source = (_v1_address(fields[2], ip_version), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], ip_version), _v1_port(fields[5]))
    return ProxyHeader(1, "PROXY", "tcp", source, destination, length)


def _v1_address(text: str, ip_version: int) -> str:
    try:
        address: IPAddress = (
            ipaddress.IPv4Address(text) if ip_version == 4 else ipaddress.IPv6Address(text)
        )
    except ValueError:
        raise InvalidProxyHeader(
            f"PROXY v1 address {text!r}, expected an IPv{ip_version} address "
            f"matching TCP{ip_version}"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise InvalidProxyHeader(f"PROXY v1 address {text!r} has a scope id")
    return str(address)


def _v1_port(text: str) -> int:
    # Spec §2.1: decimal 0-65535, "Heading zeroes are not permitted".
    if (
        not text.isdigit()
        or len(text) > 5
        or (text[0] == "0" and text != "0")
        or int(text) > _MAX_PORT
    ):
        raise InvalidProxyHeader(f"PROXY v1 port {text!r}, expected 0-65535 without leading zeros")
    return int(text)


def encode_v2(
    source: tuple[str, int],
    destination: tuple[str, int],
    *,
    transport: str = "tcp",
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 PROXY-command header for a relayed connection.

    When one side is IPv4 and the other IPv6, the IPv4 one is sent as its
    IPv4-mapped IPv6 form (``::ffff:a.b.c.d``): the header has one family.
    """
    src_ip, src_port = _endpoint(source, "source")
    dst_ip, dst_port = _endpoint(destination, "destination")
    if src_ip.version != dst_ip.version:
        src_ip, dst_ip = _as_ipv6(src_ip), _as_ipv6(dst_ip)
    if transport not in _TRANSPORT_CODES:
        raise LocalProtocolError(f"PROXY v2 transport {transport!r}, expected 'tcp' or 'udp'")
    family = V2_FAMILY_INET if src_ip.version == 4 else V2_FAMILY_INET6
    parts = [src_ip.packed, dst_ip.packed, struct.pack(">HH", src_port, dst_port)]
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF or len(value) > 0xFFFF:
            raise LocalProtocolError(
                f"PROXY v2 TLV type {tlv_type} with {len(value)} bytes, "
                "expected type 0-255 and at most 65535 bytes"
            )
        parts.append(_TLV_HEADER.pack(tlv_type, len(value)) + bytes(value))
    block = b"".join(parts)
    if V2_HEADER_BYTES + len(block) > MAX_PROXY_HEADER_BYTES:
        raise LocalProtocolError(
            f"PROXY v2 header length {V2_HEADER_BYTES + len(block)} exceeds "
            f"maximum size {MAX_PROXY_HEADER_BYTES}"
        )
    return b"".join(
        (
            V2_SIGNATURE,
            bytes(
                (
                    V2_VERSION << 4 | V2_COMMAND_PROXY,
                    family << 4 | _TRANSPORT_CODES[transport],
                )
            ),
            _U16.pack(len(block)),
            block,
        )
    )


def encode_v2_local() -> bytes:
    """A v2 LOCAL header (health checks: the receiver uses the real endpoints)."""
    return V2_SIGNATURE + bytes((V2_VERSION << 4 | V2_COMMAND_LOCAL, 0)) + _U16.pack(0)


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 ``PROXY TCP4|TCP6`` line.

    Mixed families become ``TCP6`` with the IPv4 side IPv4-mapped, written in hex
    groups (``::ffff:102:304``) as spec §2.1 asks for IPv6 text; ``UNKNOWN`` would
    lose the addresses.
    """
    src_ip, src_port = _endpoint(source, "source")
    dst_ip, dst_port = _endpoint(destination, "destination")
    if src_ip.version != dst_ip.version:
        src_ip, dst_ip = _as_ipv6(src_ip), _as_ipv6(dst_ip)
    protocol = "TCP4" if src_ip.version == 4 else "TCP6"
    src_text, dst_text = _v1_text(src_ip), _v1_text(dst_ip)
    return f"PROXY {protocol} {src_text} {dst_text} {src_port} {dst_port}\r\n".encode("ascii")


def _endpoint(endpoint: tuple[str, int], side: str) -> tuple[IPAddress, int]:
    host, port = endpoint
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise LocalProtocolError(f"{side} address {host!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise LocalProtocolError(
            f"{side} address {host!r} has a scope id, which PROXY cannot carry"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
        raise LocalProtocolError(f"{side} port {port!r}, expected 0-65535")
    return address, port


def _as_ipv6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def _v1_text(address: IPAddress) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        high, low = struct.unpack(">HH", address.packed[12:])
        return f"::ffff:{high:x}:{low:x}"
    return str(address)
