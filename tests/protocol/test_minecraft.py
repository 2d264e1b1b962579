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
    MAX_PACKET_BYTES,
    NEED_DATA,
    Handshake,
    HandshakeTooLarge,
    LocalProtocolError,
    MalformedHandshake,
    encode_handshake,
    encode_legacy_kick,
    encode_login_disconnect,
    encode_packet,
    encode_pong,
    encode_status_response,
    encode_string,
    encode_varint,
    is_legacy_ping,
    normalize_host,
    parse_handshake,
    parse_packet,
    read_varint,
    status_json,
    text_component,
)
from discoproxy.protocol.errors import _NeedData

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
    assert hs.server_address == normalize_host(address)
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
        handshake: Handshake | _NeedData = NEED_DATA
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
