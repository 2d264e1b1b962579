from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discoproxy.protocol import (
    NEED_DATA,
    Sniffed,
    detect_protocol,
    encode_handshake,
    encode_varint,
)

from .captures import CURL_CLIENT_HELLO, CURL_HTTP_REQUEST, OPENSSL_CLIENT_HELLO
from .feed import PROPERTY

LOGIN = encode_handshake(767, "mc.example.com", 25565, 2)

CASES = [
    (OPENSSL_CLIENT_HELLO, Sniffed.TLS),
    (CURL_CLIENT_HELLO, Sniffed.TLS),
    (b"\x16\x03", Sniffed.TLS),  # decided on two bytes, as is_tls does
    (b"\x16\x03\x03\x00", Sniffed.TLS),
    (CURL_HTTP_REQUEST, Sniffed.HTTP),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Sniffed.HTTP),
    (LOGIN, Sniffed.MINECRAFT),
    (encode_handshake(767, "a" * 12, 25565, 1), Sniffed.MINECRAFT),  # length 22: starts 16 00
    (encode_handshake(767, "a" * 55, 25565, 1), Sniffed.MINECRAFT),  # length 65: starts 'A' 00
    (encode_handshake(767, "a" * 246, 25565, 2), Sniffed.MINECRAFT),  # length 254: FE 01 00
    (encode_handshake(767, "a" * 374, 25565, 2), Sniffed.MINECRAFT),  # length 382: FE 02
    (b"\xfe", Sniffed.MINECRAFT_LEGACY),
    (b"\xfe\x01", Sniffed.MINECRAFT_LEGACY),
    (bytes.fromhex("fe01fa000b004d007c00500069006e00670048006f00730074"), Sniffed.MINECRAFT_LEGACY),
    (b"SSH-2.0-OpenSSH_9.2p1\r\n", Sniffed.UNKNOWN),
    (b"\x05\x01\x00", Sniffed.UNKNOWN),  # SOCKS5 greeting
    (b"\x80\x80\x80\x80\x80\x01", Sniffed.UNKNOWN),  # VarInt longer than 5 bytes
    (encode_varint(5000) + b"\x00", Sniffed.UNKNOWN),  # over the handshake cap
    (b"\x00\x00", Sniffed.UNKNOWN),
    (b"get / HTTP/1.1\r\n", Sniffed.UNKNOWN),
]


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_detect_protocol(wire: bytes, expected: Sniffed) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert detect_protocol(kind(wire)) is expected


@pytest.mark.parametrize(("wire", "expected"), [case for case in CASES if case[0][0] != 0xFE])
def test_every_prefix_is_undecided_or_already_right(wire: bytes, expected: Sniffed) -> None:
    for cut in range(len(wire)):
        assert detect_protocol(wire[:cut]) in (NEED_DATA, expected)


def test_fe_prefix_is_decided_on_what_has_arrived_as_vanilla_does() -> None:
    # A handshake of length 254 starts FE 01 00: split after FE or FE 01 it reads as a
    # legacy ping (vanilla's LegacyQueryHandler has the same window); whole, it does not.
    wire = encode_handshake(767, "a" * 246, 25565, 2)
    assert [detect_protocol(wire[:cut]) for cut in (1, 2, 3)] == [
        Sniffed.MINECRAFT_LEGACY,
        Sniffed.MINECRAFT_LEGACY,
        Sniffed.MINECRAFT,
    ]


@pytest.mark.parametrize(
    "wire", [b"", b"G", b"GET", b"\x16", b"\x80", b"\xff\xff", b"\x15", b"OPTIONS"]
)
def test_ambiguous_prefixes_need_data(wire: bytes) -> None:
    assert detect_protocol(wire) is NEED_DATA


@PROPERTY
@given(st.binary(max_size=24))
def test_detect_protocol_never_raises_and_never_changes_its_mind(data: bytes) -> None:
    final = detect_protocol(data)
    if data[:1] == b"\xfe":
        return
    for cut in range(len(data)):
        assert detect_protocol(data[:cut]) in (NEED_DATA, final)
