"""Pre-1.7 login handshakes (packet 0x02): 1.3-1.6 (protocol byte, username, host,
port) and 1.2.5 and older (one ``username;host:port`` string), built as the protocol
documents them; random, truncated and corrupted bytes only ever raise the parser's own
errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discoproxy.protocol.errors import (
    NEED_DATA,
    HandshakeTooLarge,
    MalformedHandshake,
    ProtocolError,
)
from discoproxy.protocol.minecraft import (
    LegacyLogin,
    encode_handshake,
    encode_legacy_disconnect,
    encode_legacy_login,
    is_legacy_login,
    parse_legacy_login,
)
from discoproxy.protocol.sniff import Sniffed, detect_protocol

from .feed import PROPERTY, feed_reads, split_at, survives


def string16(text: str) -> bytes:
    data = text.encode("utf-16-be")
    return struct.pack(">H", len(data) // 2) + data


# A 1.6.4 client (protocol 78) logging in as Steve to mc.example.com:25565, as documented
# (wiki.vg, "Protocol History", pre-netty 0x02 Handshake), byte by byte.
def login_1_6(username: str, host: str, port: int) -> bytes:
    """Any fields, unchecked (encode_legacy_login refuses what a client cannot send)."""
    return b"\x02\x4e" + string16(username) + string16(host) + struct.pack(">i", port)


WIRE_1_6 = b"\x02\x4e" + string16("Steve") + string16("mc.example.com") + struct.pack(">i", 25565)
WIRE_1_2 = b"\x02" + string16("Steve;mc.example.com:25565")


def test_a_1_6_login_is_read_with_its_host_and_username() -> None:
    login = parse_legacy_login(WIRE_1_6 + b"more")
    assert login == LegacyLogin(
        78, "Steve", "mc.example.com", "mc.example.com", 25565, len(WIRE_1_6)
    )
    assert encode_legacy_login(78, "Steve", "mc.example.com", 25565) == WIRE_1_6


def test_a_1_2_5_login_is_one_string() -> None:
    login = parse_legacy_login(WIRE_1_2)
    assert isinstance(login, LegacyLogin)
    assert (login.protocol_version, login.username, login.host, login.port) == (
        0,
        "Steve",
        "mc.example.com",
        25565,
    )
    assert encode_legacy_login(0, "Steve", "mc.example.com", 25565) == WIRE_1_2


def test_the_host_is_normalised_for_routing_and_kept_as_sent() -> None:
    login = parse_legacy_login(encode_legacy_login(74, "Alex", "MC.Example.COM.", 25565))
    assert isinstance(login, LegacyLogin)
    assert (login.host, login.raw_host) == ("mc.example.com", "MC.Example.COM.")


def test_sniffing_tells_a_legacy_login_from_everything_else() -> None:
    assert detect_protocol(WIRE_1_6) is Sniffed.MINECRAFT_LEGACY_LOGIN
    assert detect_protocol(WIRE_1_2) is Sniffed.MINECRAFT_LEGACY_LOGIN
    assert detect_protocol(WIRE_1_2[:1]) is NEED_DATA
    # 02 followed by no protocol of those versions: some other protocol, not refused here
    assert detect_protocol(b"\x02\xc8\x00\x01") is not Sniffed.MINECRAFT_LEGACY_LOGIN
    assert is_legacy_login(WIRE_1_6) and not is_legacy_login(b"\x10\x00")


@pytest.mark.parametrize(
    ("wire", "error", "message"),
    [
        (b"\x02\x4e" + struct.pack(">H", 40), HandshakeTooLarge, "username of 40"),
        (b"\x02\x4e" + string16("Steve") + struct.pack(">H", 300), HandshakeTooLarge, "host"),
        (login_1_6("", "a", 1), MalformedHandshake, "without a username"),
        (login_1_6("S", "a", 70000), MalformedHandshake, "port 70000"),
        (b"\x02" + string16("Steve"), MalformedHandshake, "username;host:port"),
        (b"\x02\x4e\x00\x01\xd8\x00" + string16("a"), MalformedHandshake, "UTF-16BE"),
    ],
)  # fmt: skip
def test_bad_logins_say_what_is_wrong(wire: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_legacy_login(wire)


@given(st.text(min_size=1, max_size=16), st.text(max_size=40), st.integers(0, 65535), st.data())
def test_a_login_truncated_anywhere_needs_data(
    username: str, host: str, port: int, data: st.DataObject
) -> None:
    protocol = data.draw(st.sampled_from([0, 39, 61, 74, 78]))
    if protocol == 0:
        username = username.replace(";", "_") or "_"
    try:
        wire = encode_legacy_login(protocol, username, host, port)
    except ProtocolError:
        return  # over a cap: nothing a client sends
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert parse_legacy_login(wire[:cut]) is NEED_DATA
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=4))
    assert feed_reads(parse_legacy_login, split_at(wire, cuts)) == parse_legacy_login(wire)


@PROPERTY
@given(st.binary(max_size=80))
def test_random_bytes_after_02_only_raise_its_errors(data: bytes) -> None:
    survives(parse_legacy_login, b"\x02" + data, ProtocolError)


@PROPERTY
@given(st.integers(1, len(WIRE_1_6) - 1), st.integers(0, 255))
def test_a_corrupted_byte_only_raises_its_errors(index: int, byte: int) -> None:
    wire = bytearray(WIRE_1_6)
    wire[index] = byte
    survives(parse_legacy_login, bytes(wire), ProtocolError)


def test_the_legacy_disconnect_is_ff_and_a_string16() -> None:
    assert encode_legacy_disconnect("Banned") == b"\xff" + string16("Banned")


# --- is_legacy_login: random and truncated bytes ------------------------------------------


@PROPERTY
@given(st.binary(max_size=24) | st.binary(max_size=24).map(lambda data: b"\x02" + data))
def test_is_legacy_login_on_random_bytes_reads_the_first_byte_only(data: bytes) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert is_legacy_login(kind(data)) is (data[:1] == b"\x02")


@PROPERTY
@given(
    st.sampled_from([0, 39, 61, 74, 78]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=16),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.integers(0, 65535),
)
def test_every_truncation_of_a_legacy_login_is_a_legacy_login_still_incomplete(
    protocol: int, username: str, host: str, port: int
) -> None:
    if protocol == 0:
        username = username.replace(";", "_")
    try:
        wire = encode_legacy_login(protocol, username, host, port)
    except ProtocolError:
        return  # over a cap: nothing a client sends
    for cut in range(1, len(wire)):
        assert is_legacy_login(wire[:cut])
        assert parse_legacy_login(wire[:cut]) is NEED_DATA, cut
        assert detect_protocol(wire[:cut]) in (Sniffed.MINECRAFT_LEGACY_LOGIN, NEED_DATA)
    login = parse_legacy_login(wire)
    assert isinstance(login, LegacyLogin) and login.length == len(wire)
    assert (login.username, login.raw_host, login.port) == (username, host, port)


@PROPERTY
@given(
    st.integers(-(2**31), 2**31 - 1),
    st.text(max_size=40),
    st.integers(0, 65535),
    st.sampled_from([1, 2, 3]),
)
def test_no_modern_handshake_prefix_is_a_legacy_login(
    protocol: int, address: str, port: int, state: int
) -> None:
    # a modern packet of length 2 is too short for a handshake: no handshake starts 02
    wire = encode_handshake(protocol, address, port, state)
    assert not any(is_legacy_login(wire[:cut]) for cut in range(len(wire) + 1))
