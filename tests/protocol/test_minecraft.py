from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcstatus import JavaServer, LegacyServer

from discoproxy.protocol import (
    MAX_HANDSHAKE_PACKET_BYTES,
    MAX_LEGACY_HOST_UNITS,
    MAX_PACKET_BYTES,
    NEED_DATA,
    Buffer,
    Handshake,
    HandshakeTooLarge,
    LegacyPing,
    LocalProtocolError,
    LoginStart,
    MalformedHandshake,
    encode_handshake,
    encode_legacy_beta_kick,
    encode_legacy_kick,
    encode_legacy_ping_1_6,
    encode_login_disconnect,
    encode_login_start,
    encode_packet,
    encode_pong,
    encode_status_response,
    encode_string,
    encode_varint,
    is_legacy_ping,
    minecraft_host,
    normalize_host,
    parse_handshake,
    parse_legacy_ping,
    parse_login_start,
    parse_packet,
    read_varint,
    status_json,
    text_component,
)
from discoproxy.protocol.errors import NeedData

from .feed import PROPERTY, feed, feed_error, feed_reads, split_at, survives

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)

# https://minecraft.wiki/w/Java_Edition_protocol#VarInt_and_VarLong sample values.
VARINTS = [
    (0, "00"),
    (1, "01"),
    (2, "02"),
    (127, "7f"),
    (128, "8001"),
    (255, "ff01"),
    (25565, "ddc701"),
    (2097151, "ffff7f"),
    (2147483647, "ffffffff07"),
    (-1, "ffffffff0f"),
    (-2147483648, "8080808008"),
]


def handshake_body(*fields: bytes) -> bytes:
    """A packet from raw field bytes, for handshakes the encoder refuses to build."""
    body = b"".join(fields)
    return encode_varint(len(body)) + body


# --- VarInt -------------------------------------------------------------------


@pytest.mark.parametrize(("value", "wire"), VARINTS)
def test_varint_matches_wiki_samples(value: int, wire: str) -> None:
    assert encode_varint(value) == bytes.fromhex(wire)
    assert read_varint(bytes.fromhex(wire)) == (value, len(wire) // 2)


def test_read_varint_starts_at_offset() -> None:
    assert read_varint(b"\xaa\xbb\xdd\xc7\x01\xff", 2) == (25565, 5)
    assert read_varint(b"\xaa", 1) is NEED_DATA


def test_read_varint_needs_data_until_last_byte() -> None:
    for cut in range(5):
        assert read_varint(bytes.fromhex("ffffffff07")[:cut]) is NEED_DATA


def test_varint_longer_than_five_bytes_is_rejected() -> None:
    with pytest.raises(HandshakeTooLarge, match="longer than 5 bytes"):
        read_varint(b"\x80\x80\x80\x80\x80\x00")


def test_varint_fifth_byte_high_bits_are_dropped_like_java() -> None:
    assert read_varint(b"\xff\xff\xff\xff\x7f") == (-1, 5)


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 2**40])
def test_encode_varint_outside_int32_is_our_bug(value: int) -> None:
    with pytest.raises(LocalProtocolError, match=f"VarInt value {value} outside int32"):
        encode_varint(value)


@PROPERTY
@given(INT32)
def test_varint_round_trips_over_int32(value: int) -> None:
    wire = encode_varint(value)
    assert len(wire) <= 5
    assert feed(read_varint, wire) == (value, len(wire))


@PROPERTY
@given(st.binary(max_size=8))
def test_read_varint_on_random_bytes_only_raises_its_error(data: bytes) -> None:
    survives(read_varint, data, HandshakeTooLarge)


# --- Handshake ------------------------------------------------------------------

# A 1.21 (protocol 767) login handshake for mc.example.com:25565, laid out per the wiki:
# length 0x15, id 0x00, version ff 05, address (0e + 14 bytes), port 63 dd, state 02.
VANILLA_LOGIN_HANDSHAKE = bytes.fromhex("1500ff050e6d632e6578616d706c652e636f6d63dd02")


def test_vanilla_login_handshake() -> None:
    assert feed(parse_handshake, VANILLA_LOGIN_HANDSHAKE) == (
        parse_handshake(encode_handshake(767, "mc.example.com", 25565, 2))
    )
    hs = parse_handshake(VANILLA_LOGIN_HANDSHAKE)
    assert hs is not NEED_DATA
    assert (hs.protocol_version, hs.server_address, hs.server_port, hs.next_state) == (
        767,
        "mc.example.com",
        25565,
        2,
    )


@pytest.mark.parametrize(
    ("sent", "routed"),
    [
        ("mc.example.com\0FML\0", "mc.example.com"),
        ("mc.example.com\0FML2\0", "mc.example.com"),
        ("mc.example.com\0FML3\0", "mc.example.com"),
        ("MC.Example.COM", "mc.example.com"),
        ("mc.example.com.", "mc.example.com"),
        ("Mc.Example.Com.\0FML3\0", "mc.example.com"),
        ("Mc.Example.com///203.0.113.7:5555///1700000000///c2ln", "mc.example.com"),  # TCPShield
        ("mc.example.com///203.0.113.7:5555///1700000000\0FML3\0", "mc.example.com"),
    ],
)
def test_fml_markers_trailing_dot_and_case_are_normalised(sent: str, routed: str) -> None:
    hs = feed(parse_handshake, encode_handshake(766, sent, 25565, 2))
    assert hs.server_address == routed
    assert hs.raw_address == sent


def test_bungeecord_ip_forwarding_handshake_fits_the_cap() -> None:
    # host\0client-ip\0uuid\0properties, with a signed textures property as a
    # BungeeCord in front of us sends it (value and 684-char signature are base64).
    properties = json.dumps(
        [{"name": "textures", "value": "e" * 600, "signature": "s" * 684}],
        separators=(",", ":"),
    )
    address = "\0".join(("mc.example.com", "203.0.113.7", "0" * 32, properties))
    hs = feed(parse_handshake, encode_handshake(767, address, 25565, 2))
    assert hs.server_address == "mc.example.com"
    assert hs.raw_address == address


@pytest.mark.parametrize("state", [1, 2, 3])
def test_status_login_and_transfer_states_are_accepted(state: int) -> None:
    assert feed(parse_handshake, encode_handshake(767, "a", 1, state)).next_state == state


def test_handshake_length_cap_rejected_from_the_prefix_alone() -> None:
    prefix = encode_varint(3000000)
    assert feed_error(
        parse_handshake,
        prefix,
        HandshakeTooLarge,
        match="^handshake packet length 3000000 exceeds cap 4096$",
    ) == len(prefix)


def test_handshake_one_byte_over_the_cap_is_rejected() -> None:
    packet = handshake_body(b"\x00" * (MAX_HANDSHAKE_PACKET_BYTES + 1))
    feed_error(parse_handshake, packet, HandshakeTooLarge, match="exceeds cap")


def test_handshake_exactly_at_the_cap_is_accepted() -> None:
    fixed = 1 + 2 + 2 + 2 + 1  # id, version 767, string length (2 bytes), port, state
    address = "a" * (MAX_HANDSHAKE_PACKET_BYTES - fixed)
    wire = encode_handshake(767, address, 25565, 2)
    assert read_varint(wire) == (MAX_HANDSHAKE_PACKET_BYTES, 2)
    assert parse_handshake(wire) != NEED_DATA


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x00", "length 0, expected at least 1"),
        (b"\xff\xff\xff\xff\x0f", "length -1, expected at least 1"),
        (handshake_body(b"\x01\x00"), "packet id 0x01, expected 0x00"),
        (handshake_body(b"\x00\xff\x05\x7f"), "server address length 127 at byte 4 runs past"),
        (
            handshake_body(b"\x00\x00\xff\xff\xff\xff\x0f" + b"\x00" * 3),
            "server address length -1 is negative",
        ),
        (handshake_body(b"\x00\x00\x02\xc3\x28\x63\xdd\x02"), "not valid UTF-8"),
        (handshake_body(b"\x00\x00\x01a\x63"), "inside the server port"),
        (handshake_body(b"\x00\x00\x01a\x63\xdd"), "inside the next state VarInt"),
        (handshake_body(b"\x00\x00\x01a\x63\xdd\x04"), "next state 4, expected 1"),
        (handshake_body(b"\x00\x00\x01a\x63\xdd\x00"), "next state 0, expected 1"),
        (
            handshake_body(b"\x00\x00\x01a\x63\xdd\x02\x00"),
            "declares 8 bytes but its fields end at byte 7",
        ),
        (handshake_body(b"\x00\x80\x80\x80\x80\x80\x01"), "longer than 5 bytes"),
    ],
)
def test_malformed_handshake_is_rejected(wire: bytes, message: str) -> None:
    feed_error(parse_handshake, wire, MalformedHandshake, match=message)


def test_wrong_packet_id_is_rejected_before_the_packet_arrives() -> None:
    wire = handshake_body(b"\x05" + b"\x00" * 40)
    assert feed_error(parse_handshake, wire, MalformedHandshake, match="packet id 0x05") == 2


def test_over_long_packet_id_encoding_is_accepted_like_java() -> None:
    hs = parse_handshake(handshake_body(b"\x80\x00\x00\x01a\x63\xdd\x01"))
    assert hs is not NEED_DATA
    assert hs.server_address == "a"


@PROPERTY
@given(
    version=INT32,
    address=st.text(max_size=255),
    port=st.integers(0, 65535),
    state=st.sampled_from([1, 2, 3]),
)
def test_handshake_round_trips(version: int, address: str, port: int, state: int) -> None:
    wire = encode_handshake(version, address, port, state)
    hs = parse_handshake(wire + b"\x01\x00")
    assert hs is not NEED_DATA
    assert (hs.protocol_version, hs.raw_address, hs.server_port, hs.next_state) == (
        version,
        address,
        port,
        state,
    )
    assert hs.server_address == minecraft_host(address)
    assert "///" not in hs.server_address and "\0" not in hs.server_address
    assert hs.length == len(wire)


@PROPERTY
@given(address=st.text(max_size=40), data=st.data())
def test_handshake_truncated_anywhere_needs_data(address: str, data: st.DataObject) -> None:
    wire = encode_handshake(767, address, 25565, 2)
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert parse_handshake(wire[:cut]) is NEED_DATA
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=4))
    assert feed_reads(parse_handshake, split_at(wire, cuts)) == parse_handshake(wire)


@PROPERTY
@given(st.binary(max_size=64))
def test_handshake_on_random_bytes_only_raises_its_error(data: bytes) -> None:
    survives(parse_handshake, data, MalformedHandshake)


@PROPERTY
@given(st.binary(min_size=1, max_size=40), st.integers(0, 39), st.integers(0, 255))
def test_handshake_with_a_corrupted_byte_only_raises_its_error(
    address: bytes, index: int, byte: int
) -> None:
    wire = bytearray(encode_handshake(767, address.hex(), 25565, 1))
    wire[index % len(wire)] = byte
    survives(parse_handshake, bytes(wire), MalformedHandshake)


# --- Packets after the handshake ---------------------------------------------------


def test_status_request_and_ping_request() -> None:
    assert feed(parse_packet, b"\x01\x00") == parse_packet(encode_packet(0, b""))
    ping = feed(parse_packet, b"\x09\x01" + struct.pack(">q", 1234567890123))
    assert (ping.packet_id, ping.payload) == (1, struct.pack(">q", 1234567890123))


def test_login_start_payload_is_returned_raw() -> None:
    payload = encode_string("Notch") + bytes(range(16))
    packet = feed(parse_packet, encode_packet(0x00, payload))
    assert packet.payload == payload


def test_packet_over_max_bytes_is_rejected_from_the_prefix() -> None:
    assert (
        feed_error(
            lambda buf: parse_packet(buf, max_bytes=16),
            encode_packet(0, b"x" * 16),
            HandshakeTooLarge,
        )
        == 1
    )
    feed_error(
        parse_packet, encode_varint(MAX_PACKET_BYTES + 1), HandshakeTooLarge, match="2097152"
    )


def test_packet_length_zero_is_malformed() -> None:
    feed_error(parse_packet, b"\x00", MalformedHandshake, match="length 0")


@PROPERTY
@given(st.binary(max_size=32))
def test_parse_packet_on_random_bytes_only_raises_its_error(data: bytes) -> None:
    survives(parse_packet, data, MalformedHandshake)


@PROPERTY
@given(st.integers(-(2**31), 2**31 - 1), st.binary(max_size=300))
def test_packets_round_trip(packet_id: int, payload: bytes) -> None:
    packet = feed(parse_packet, encode_packet(packet_id, payload))
    assert (packet.packet_id, packet.payload) == (packet_id, payload)


# --- Encoders ---------------------------------------------------------------------


def test_status_json_is_a_valid_status_document() -> None:
    document = json.loads(status_json("Server offline", protocol=767, max_players=20, online=3))
    assert document == {
        "version": {"name": "discoproxy", "protocol": 767},
        "players": {"max": 20, "online": 3, "sample": []},
        "description": {"text": "Server offline"},
    }


def test_status_response_and_login_disconnect_carry_one_string() -> None:
    for encode in (encode_status_response, encode_login_disconnect):
        packet = feed(parse_packet, encode(text_component("Nope \u00a7c!")))
        assert packet.packet_id == 0
        assert packet.payload == encode_string('{"text": "Nope \\u00a7c!"}')


def test_pong_echoes_eight_bytes() -> None:
    assert encode_pong(b"\x00" * 7 + b"\x2a") == b"\x09\x01" + b"\x00" * 7 + b"\x2a"
    with pytest.raises(LocalProtocolError, match="pong payload of 3 bytes, expected 8"):
        encode_pong(b"abc")


def test_encoders_refuse_what_the_protocol_cannot_carry() -> None:
    with pytest.raises(LocalProtocolError, match="port 65536"):
        encode_handshake(767, "a", 65536, 2)
    with pytest.raises(LocalProtocolError, match="next state 0"):
        encode_handshake(767, "a", 1, 0)
    with pytest.raises(LocalProtocolError, match="32768 characters"):
        encode_string("x" * 32768)
    with pytest.raises(LocalProtocolError, match="UTF-8"):
        encode_string("\ud800")
    with pytest.raises(LocalProtocolError, match="exceeds cap"):
        encode_packet(0, b"\x00" * MAX_PACKET_BYTES)
    with pytest.raises(LocalProtocolError, match="contains NUL"):
        encode_legacy_kick("a\0b")


def test_legacy_kick_matches_the_wiki_layout() -> None:
    # https://minecraft.wiki/w/Java_Edition_protocol/Server_List_Ping#1.4_to_1.5
    text = "\u00a71\x0047\x001.4.2\x00A Minecraft Server\x000\x0020"
    expected = b"\xff" + struct.pack(">H", len(text)) + text.encode("utf-16-be")
    kick = encode_legacy_kick("A Minecraft Server", 47, "1.4.2", online=0, max_players=20)
    assert kick == expected


@pytest.mark.parametrize(
    ("wire", "legacy"),
    [
        (b"", False),
        (b"\xfe", True),  # Beta 1.8 - 1.3
        (b"\xfe\x01", True),  # 1.4 - 1.5
        (bytes.fromhex("fe01fa000b004d007c00500069006e00670048006f00730074"), True),  # 1.6
        (b"\xfe\x01\x00", False),  # modern handshake of length 254
        (b"\xfe\x02\x00", False),  # modern handshake of length 382
        (VANILLA_LOGIN_HANDSHAKE, False),
        (b"\x16\x03\x01", False),
    ],
)
def test_is_legacy_ping_reads_bytes_as_vanilla_does(wire: bytes, legacy: bool) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert is_legacy_ping(kind(wire)) is legacy


def test_modern_handshake_of_length_254_is_not_legacy() -> None:
    wire = encode_handshake(767, "a" * 246, 25565, 2)
    assert wire[:3] == b"\xfe\x01\x00"
    assert not is_legacy_ping(wire)
    assert feed(parse_handshake, wire).server_address == "a" * 246


# --- A real client: mcstatus over loopback ------------------------------------------


class _StatusServer:
    """Answers status pings with our encoders; records what the client sent."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        buffer = bytearray()
        handshake: Handshake | NeedData = NEED_DATA
        while handshake is NEED_DATA:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buffer += chunk
            if is_legacy_ping(buffer) and buffer[:3] == b"\xfe\x01\xfa":
                self.received.append(bytes(buffer))
                conn.sendall(encode_legacy_kick("Legacy says hi", 74, "1.6.2", 1, 10))
                return
            handshake = parse_handshake(buffer)
        self.received.append(bytes(buffer[: handshake.length]))
        del buffer[: handshake.length]
        while True:
            packet = parse_packet(buffer)
            if packet is NEED_DATA:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buffer += chunk
                continue
            del buffer[: packet.length]
            if packet.packet_id == 0:
                conn.sendall(
                    encode_status_response(status_json("Hello \u00e9", "1.21", 767, 20, 5))
                )
            else:
                conn.sendall(encode_pong(packet.payload))
                return


@pytest.fixture
def status_server() -> Iterator[_StatusServer]:
    server = _StatusServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.thread.join(timeout=5)
        server.listener.close()


def test_mcstatus_status_and_ping_through_our_codec(status_server: _StatusServer) -> None:
    server = JavaServer("127.0.0.1", status_server.port, timeout=3)
    status = server.status(tries=1)
    assert status.motd.to_plain() == "Hello \u00e9"
    assert (status.version.name, status.version.protocol) == ("1.21", 767)
    assert (status.players.online, status.players.max) == (5, 20)
    assert server.ping(tries=1) >= 0
    handshake = feed(parse_handshake, status_server.received[0])
    assert (handshake.server_address, handshake.server_port, handshake.next_state) == (
        "127.0.0.1",
        status_server.port,
        1,
    )
    assert handshake.protocol_version == 47  # mcstatus' default


def test_mcstatus_legacy_ping_gets_our_kick(status_server: _StatusServer) -> None:
    status = LegacyServer("127.0.0.1", status_server.port, timeout=3).status()
    assert status.motd.to_plain() == "Legacy says hi"
    assert (status.version.name, status.version.protocol) == ("1.6.2", 74)
    assert (status.players.online, status.players.max) == (1, 10)
    assert status_server.received == [b"\xfe\x01\xfa"]


# --- Legacy (pre-1.7) ping parser -----------------------------------------------------

# What a 1.6 client (protocol 74, 1.6.2) sends for localhost:25565, byte by byte from
# https://minecraft.wiki/w/Java_Edition_protocol/Server_List_Ping#1.6
LEGACY_1_6_CAPTURE = bytes.fromhex(
    "fe"  # server list ping
    "01"  # its payload, always 1
    "fa"  # plugin message
    "000b"  # channel length in UTF-16 units: 11
    "004d0043007c00500069006e00670048006f00730074"  # "MC|PingHost" in UTF-16BE
    "0019"  # data length: 7 + 2 * 9
    "4a"  # protocol version 74
    "0009"  # host length in UTF-16 units
    "006c006f00630061006c0068006f00730074"  # "localhost" in UTF-16BE
    "000063dd"  # port 25565 as an int
)


def parse_1_6(buf: Buffer) -> LegacyPing | NeedData:
    """parse_legacy_ping as a caller that waits for ``FE 01 FA`` uses it.

    ``FE`` and ``FE 01`` alone are complete Beta and 1.4 pings (vanilla decides on what
    has arrived), so a 1.6 ping's first two prefixes are not NEED_DATA by design.
    """
    if len(buf) < 3:
        return NEED_DATA
    return parse_legacy_ping(buf)


def ping_1_6_header(data_length: int, protocol: int, host_units: int) -> bytes:
    """A 1.6 ping up to the host, with any declared lengths."""
    return LEGACY_1_6_CAPTURE[:27] + struct.pack(">HBH", data_length, protocol, host_units)


def test_legacy_1_6_capture_from_the_wiki() -> None:
    ping = feed(parse_1_6, LEGACY_1_6_CAPTURE)
    assert ping == LegacyPing(
        kind="1.6",
        protocol_version=74,
        host="localhost",
        raw_host="localhost",
        port=25565,
        length=len(LEGACY_1_6_CAPTURE),
    )
    assert encode_legacy_ping_1_6("localhost", 25565, 74) == LEGACY_1_6_CAPTURE
    assert encode_legacy_ping_1_6("localhost", 25565) == LEGACY_1_6_CAPTURE
    assert is_legacy_ping(LEGACY_1_6_CAPTURE)


@pytest.mark.parametrize(
    ("wire", "kind", "length"),
    [(b"\xfe", "beta", 1), (b"\xfe\x01", "1.4", 2)],
)
def test_legacy_beta_and_1_4_pings(wire: bytes, kind: str, length: int) -> None:
    for buffer_kind in (bytes, bytearray, memoryview):
        assert parse_legacy_ping(buffer_kind(wire)) == LegacyPing(
            kind, None, None, None, None, length
        )


def test_legacy_ping_prefixes() -> None:
    assert parse_legacy_ping(b"") is NEED_DATA
    assert parse_legacy_ping(LEGACY_1_6_CAPTURE[:1]).kind == "beta"  # type: ignore[union-attr]
    assert parse_legacy_ping(LEGACY_1_6_CAPTURE[:2]).kind == "1.4"  # type: ignore[union-attr]
    for cut in range(3, len(LEGACY_1_6_CAPTURE)):
        assert parse_legacy_ping(LEGACY_1_6_CAPTURE[:cut]) is NEED_DATA


def test_legacy_1_6_host_is_normalised_like_the_handshake() -> None:
    ping = feed(parse_1_6, encode_legacy_ping_1_6("MC.Example.COM.\0FML\0", 25566, 78))
    assert (ping.host, ping.raw_host, ping.port, ping.protocol_version) == (
        "mc.example.com",
        "MC.Example.COM.\0FML\0",
        25566,
        78,
    )


def test_legacy_1_6_read_by_read() -> None:
    wire = encode_legacy_ping_1_6("play.example.org", 25565)
    reads = split_at(wire, [3, 10, 29, 33, len(wire) - 1])
    assert feed_reads(parse_legacy_ping, reads) == parse_legacy_ping(wire)


def test_legacy_1_6_stops_at_its_end() -> None:
    wire = encode_legacy_ping_1_6("a", 1)
    ping = parse_legacy_ping(wire + b"\x00\x01\x02")
    assert ping is not NEED_DATA
    assert ping.length == len(wire)


@pytest.mark.parametrize(
    "wire",
    [b"\x00", b"\xfe\x02", b"\xfe\x01\x00", VANILLA_LOGIN_HANDSHAKE, b"\x16\x03\x01"],
)
def test_not_a_legacy_ping_is_rejected(wire: bytes) -> None:
    # FE 01 followed by anything but FA is a modern packet of length 254, as
    # is_legacy_ping decides: not ours to answer.
    with pytest.raises(MalformedHandshake, match="do not start a legacy ping"):
        parse_legacy_ping(wire)


def _channel(name: str) -> bytes:
    return b"\xfe\x01\xfa" + struct.pack(">H", len(name)) + name.encode("utf-16-be")


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (_channel("MC|PingHosts") + b"\x00" * 20, "channel length 00 0c, expected 00 0b"),
        (_channel("MC|PingHos") + b"\x00" * 20, "channel length 00 0a"),
        (_channel("MC|PingPort") + b"\x00" * 20, "are not 'MC|PingHost'"),
        (ping_1_6_header(0x19, 74, 8) + b"\x00" * 20, "data length 25, expected 23"),
        (ping_1_6_header(0x18, 74, 9), "data length 24, expected 7 \\+ 2"),
        (ping_1_6_header(5, 74, 0), "data length 5, expected 7 \\+ 2"),
        (
            ping_1_6_header(9, 74, 1) + b"\xd8\x00" + struct.pack(">i", 25565),
            "host is not valid UTF-16BE",
        ),
        (encode_legacy_ping_1_6("a", 1)[:-4] + struct.pack(">i", 65536), "port 65536 outside"),
        (encode_legacy_ping_1_6("a", 1)[:-4] + struct.pack(">i", -1), "port -1 outside"),
    ],
)
def test_malformed_legacy_1_6_ping_is_rejected(wire: bytes, message: str) -> None:
    feed_error(parse_1_6, wire, MalformedHandshake, match=message)


def test_wrong_channel_is_rejected_before_the_rest_arrives() -> None:
    assert feed_error(parse_1_6, _channel("XX|PingHost") + b"\x00" * 40, MalformedHandshake) == 7


def test_legacy_host_cap_is_enforced_before_the_host_arrives() -> None:
    # A host over the cap, with a consistent data length: rejected from the data length.
    over = MAX_LEGACY_HOST_UNITS + 1
    wire = ping_1_6_header(7 + 2 * over, 74, over) + b"\x00\x61" * over + b"\x00" * 4
    assert feed_error(parse_1_6, wire, HandshakeTooLarge, match="exceeds cap") == 29
    # A small data length but a host length over the cap: rejected from the host length.
    wire = ping_1_6_header(9, 74, 0xFFFF) + b"\x00" * 40
    assert (
        feed_error(
            parse_1_6,
            wire,
            HandshakeTooLarge,
            match="^1.6 ping host of 65535 UTF-16 units exceeds cap 255$",
        )
        == 32
    )


def test_legacy_host_exactly_at_the_cap_is_accepted() -> None:
    host = "h" * MAX_LEGACY_HOST_UNITS
    assert feed(parse_1_6, encode_legacy_ping_1_6(host, 25565)).raw_host == host


def test_legacy_ping_encoder_refuses_what_the_protocol_cannot_carry() -> None:
    with pytest.raises(LocalProtocolError, match="port 65536"):
        encode_legacy_ping_1_6("a", 65536)
    with pytest.raises(LocalProtocolError, match="protocol version 256"):
        encode_legacy_ping_1_6("a", 1, 256)
    with pytest.raises(LocalProtocolError, match="256 UTF-16 units exceeds cap 255"):
        encode_legacy_ping_1_6("h" * 256, 1)
    with pytest.raises(LocalProtocolError, match="not encodable"):
        encode_legacy_ping_1_6("\ud800", 1)


LEGACY_HOSTS = st.text(alphabet=st.characters(codec="utf-8"), max_size=100)  # no surrogates


@PROPERTY
@given(host=LEGACY_HOSTS, port=st.integers(0, 65535), protocol=st.integers(0, 255))
def test_legacy_1_6_round_trips(host: str, port: int, protocol: int) -> None:
    ping = feed(parse_1_6, encode_legacy_ping_1_6(host, port, protocol))
    assert (ping.kind, ping.raw_host, ping.port, ping.protocol_version) == (
        "1.6",
        host,
        port,
        protocol,
    )
    assert ping.host == normalize_host(host)


@PROPERTY
@given(host=LEGACY_HOSTS, data=st.data())
def test_legacy_1_6_truncated_anywhere_needs_data(host: str, data: st.DataObject) -> None:
    wire = encode_legacy_ping_1_6(host, 25565)
    cut = data.draw(st.integers(3, len(wire) - 1))
    assert parse_legacy_ping(wire[:cut]) is NEED_DATA
    cuts = data.draw(st.lists(st.integers(3, len(wire)), max_size=4))
    assert feed_reads(parse_legacy_ping, split_at(wire, [3, *cuts])) == parse_legacy_ping(wire)


@PROPERTY
@given(st.binary(max_size=80))
def test_legacy_ping_on_random_bytes_after_fe01fa_only_raises_its_errors(data: bytes) -> None:
    # HandshakeTooLarge is a MalformedHandshake.
    survives(parse_legacy_ping, b"\xfe\x01\xfa" + data, MalformedHandshake)
    survives(parse_legacy_ping, LEGACY_1_6_CAPTURE[:27] + data, MalformedHandshake)


@PROPERTY
@given(st.integers(0, len(LEGACY_1_6_CAPTURE) - 1), st.integers(0, 255))
def test_legacy_ping_with_a_corrupted_byte_only_raises_its_errors(index: int, byte: int) -> None:
    wire = bytearray(LEGACY_1_6_CAPTURE)
    wire[index] = byte
    survives(parse_legacy_ping, bytes(wire), MalformedHandshake)


# --- Legacy answers --------------------------------------------------------------------


def test_legacy_beta_kick_matches_the_wiki_layout() -> None:
    # https://minecraft.wiki/w/Java_Edition_protocol/Server_List_Ping#Beta_1.8_to_1.3
    text = "A Minecraft Server\u00a70\u00a720"
    expected = b"\xff" + struct.pack(">H", len(text)) + text.encode("utf-16-be")
    assert encode_legacy_beta_kick("A Minecraft Server", 0, 20) == expected
    # Length counts UTF-16 units: an astral character is two.
    kick = encode_legacy_beta_kick("\U0001f600", 1, 2)
    assert struct.unpack(">H", kick[1:3]) == (6,)
    assert len(kick) == 3 + 12


def test_legacy_beta_kick_refuses_the_separator() -> None:
    with pytest.raises(LocalProtocolError, match="separator"):
        encode_legacy_beta_kick("\u00a7aGreen", 0, 20)
    with pytest.raises(LocalProtocolError, match="exceeds cap"):
        encode_legacy_beta_kick("x" * 0xFFFF, 0, 20)


class _OneAnswerServer:
    """Reads the client's first bytes, answers *answer*, closes; records what it read."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(5)
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(5)
            buffer = bytearray()
            while len(buffer) < 3:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buffer += chunk
            self.received = bytes(buffer)
            conn.sendall(self.answer)

    def close(self) -> None:
        self.thread.join(timeout=5)
        self.listener.close()


def test_mcstatus_reads_our_legacy_beta_kick() -> None:
    server = _OneAnswerServer(encode_legacy_beta_kick("Beta says hi", 3, 12))
    try:
        status = LegacyServer("127.0.0.1", server.port, timeout=3).status(tries=1)
    finally:
        server.close()
    assert status.motd.to_plain() == "Beta says hi"
    assert (status.players.online, status.players.max) == (3, 12)
    assert (status.version.name, status.version.protocol) == ("<1.4", -1)
    # mcstatus sends FE 01 FA and nothing more: the start of a 1.6 ping that never
    # completes, so a caller must answer it after a timeout as it would a 1.4 ping.
    assert server.received == b"\xfe\x01\xfa"
    assert parse_legacy_ping(server.received) is NEED_DATA


def test_mcstatus_reads_our_legacy_kick_with_a_colour_code() -> None:
    kick = encode_legacy_kick("\u00a7aGreen", 78, "1.6.4", online=2, max_players=8)
    server = _OneAnswerServer(kick)
    try:
        status = LegacyServer("127.0.0.1", server.port, timeout=3).status(tries=1)
    finally:
        server.close()
    assert status.motd.to_plain() == "Green"
    assert (status.version.name, status.version.protocol) == ("1.6.4", 78)
    assert (status.players.online, status.players.max) == (2, 8)


# -- Login Start (usernames, for bans) ---------------------------------------------------


UUID_BYTES = bytes(range(16))
# 1.19-1.19.2 with a signing key: has-sig-data, expiry (Long), public key (VarInt-prefixed,
# 294 bytes), signature (VarInt-prefixed, 512 bytes)
SIGNED_1_19 = (
    b"\x01"
    + struct.pack(">q", 1_700_000_000_000)
    + encode_varint(294)
    + bytes(294)
    + encode_varint(512)
    + bytes(512)
)


@pytest.mark.parametrize(
    "extra",
    [b"", UUID_BYTES, b"\x01" + UUID_BYTES, b"\x00\x00", SIGNED_1_19],
    ids=["1.7-1.18", "1.20.2+ uuid", "1.19.1 has-uuid", "1.19 no-signature", "1.19 signed"],
)
def test_login_start_gives_the_username_whatever_follows_it(extra: bytes) -> None:
    packet = encode_login_start("Notch_42", extra)
    assert parse_login_start(packet) == LoginStart("Notch_42", len(packet))
    assert parse_login_start(packet + b"more") == LoginStart("Notch_42", len(packet))
    assert feed(parse_login_start, packet) == LoginStart("Notch_42", len(packet))


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (encode_packet(0x01, encode_string("x")), "login start packet id 0x01"),
        (encode_packet(0x00, encode_string("")), "username of 0 characters"),
        (encode_packet(0x00, encode_string("x" * 17)), "username of 17 characters"),
        (encode_packet(0x00, b"\x05ab"), "username length 5"),
        (encode_varint(4096) + b"\x00", "exceeds cap"),
        (encode_packet(0x00, encode_string("evil\nINFO x")), "spaces or control characters"),
        (encode_packet(0x00, encode_string("a b")), "spaces or control characters"),
    ],
)
def test_bad_login_starts_say_why(packet: bytes, message: str) -> None:
    with pytest.raises((MalformedHandshake, HandshakeTooLarge), match=message):
        parse_login_start(packet)


@given(st.binary(max_size=600))
@PROPERTY
def test_login_start_on_random_bytes_only_returns_or_raises_protocol_errors(data: bytes) -> None:
    survives(parse_login_start, data, MalformedHandshake)


@given(st.text(alphabet="abcXYZ019_", min_size=1, max_size=16), st.binary(max_size=40))
@PROPERTY
def test_every_prefix_of_a_login_start_needs_data(name: str, extra: bytes) -> None:
    packet = encode_login_start(name, extra)
    for cut in range(len(packet)):
        assert parse_login_start(packet[:cut]) is NEED_DATA
    assert parse_login_start(packet).username == name


# --- Legacy pings: random and truncated bytes ------------------------------------------

BETA_PING = LegacyPing("beta", None, None, None, None, 1)
PING_1_4 = LegacyPing("1.4", None, None, None, None, 2)


def legacy_ping_start(data: bytes) -> bool:
    """The rule is_legacy_ping implements (vanilla's LegacyQueryHandler): ``FE`` alone,
    ``FE 01`` alone, or ``FE 01 FA`` and anything."""
    return data in (b"\xfe", b"\xfe\x01") or data[:3] == b"\xfe\x01\xfa"


# no fixed prefix: anything, and the starts each kind and its look-alikes have
LEGACY_LIKE = st.binary(max_size=60) | st.tuples(
    st.sampled_from(
        [b"\xfe", b"\xfe\x01", b"\xfe\x01\xfa", b"\xfe\x00", b"\xfe\x01\x00", LEGACY_1_6_CAPTURE]
    ),
    st.binary(max_size=40),
).map(b"".join)
HANDSHAKES = st.builds(
    encode_handshake,
    INT32,
    st.text(max_size=40) | st.integers(0, 300).map(lambda n: "a" * n),  # lengths near 254
    st.integers(0, 65535),
    st.sampled_from([1, 2, 3]),
)


@PROPERTY
@given(LEGACY_LIKE)
def test_is_legacy_ping_on_random_bytes_follows_vanilla(data: bytes) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert is_legacy_ping(kind(data)) is legacy_ping_start(data)


@PROPERTY
@given(HANDSHAKES)
def test_no_modern_handshake_is_a_legacy_ping_once_three_bytes_are_in(wire: bytes) -> None:
    for cut in range(3, len(wire) + 1):
        assert not is_legacy_ping(wire[:cut]), cut
    assert parse_handshake(wire) == feed(parse_handshake, wire)


@PROPERTY
@given(LEGACY_LIKE)
def test_parse_legacy_ping_on_random_bytes_decides_as_is_legacy_ping(data: bytes) -> None:
    try:
        ping = parse_legacy_ping(data)
    except MalformedHandshake:
        # not a legacy ping at all, or a bad 1.6 one
        assert data[:3] == b"\xfe\x01\xfa" or not is_legacy_ping(data)
        return
    if ping is NEED_DATA:
        assert data == b"" or data[:3] == b"\xfe\x01\xfa"
        return
    assert is_legacy_ping(data)
    kinds = {b"\xfe": "beta", b"\xfe\x01": "1.4"}
    assert ping.kind == kinds.get(data, "1.6")
    assert ping.length <= len(data)
    if ping.kind == "1.6":  # it stops at its own end, and every shorter cut waits for it
        assert parse_legacy_ping(data[: ping.length]) == ping
        for cut in range(3, ping.length):
            assert parse_legacy_ping(data[:cut]) is NEED_DATA


@pytest.mark.parametrize("wire", [b"\xfe", b"\xfe\x01", LEGACY_1_6_CAPTURE])
def test_every_truncation_of_each_kind_of_legacy_ping(wire: bytes) -> None:
    """Incomplete, or (by design: the kind is what has arrived) the shorter kind."""
    whole = parse_legacy_ping(wire)
    assert whole is not NEED_DATA and whole.length == len(wire)
    for cut in range(len(wire)):
        expected = {1: BETA_PING, 2: PING_1_4}.get(cut, NEED_DATA)
        assert parse_legacy_ping(wire[:cut]) == expected, cut


@PROPERTY
@given(
    host=LEGACY_HOSTS,
    port=st.integers(0, 65535),
    protocol=st.integers(0, 255),
    trailing=st.binary(max_size=16),
)
def test_every_truncation_of_a_1_6_ping_is_incomplete(
    host: str, port: int, protocol: int, trailing: bytes
) -> None:
    wire = encode_legacy_ping_1_6(host, port, protocol)
    whole = parse_legacy_ping(wire)
    assert whole is not NEED_DATA and (whole.raw_host, whole.port) == (host, port)
    for cut in range(3, len(wire)):
        assert parse_legacy_ping(wire[:cut]) is NEED_DATA, cut
        assert is_legacy_ping(wire[:cut])
    assert parse_legacy_ping(wire + trailing) == whole  # what follows is not read
