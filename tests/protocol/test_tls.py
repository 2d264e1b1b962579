from __future__ import annotations

import re
import ssl
import struct
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discoproxy.protocol import (
    ALERT_HANDSHAKE_FAILURE,
    ALERT_UNRECOGNIZED_NAME,
    MAX_CLIENT_HELLO_BYTES,
    NEED_DATA,
    ClientHello,
    ClientHelloTooLarge,
    LocalProtocolError,
    MalformedClientHello,
    encode_alert,
    is_tls,
    parse_client_hello,
)
from discoproxy.protocol.errors import NeedData
from discoproxy.protocol.tls import (
    MAX_CLIENT_HELLO_RECORDS,
    _fast_client_hello,
    _parse_client_hello_body,
)

from .captures import CURL_CLIENT_HELLO, OPENSSL_CLIENT_HELLO
from .feed import (
    BUFFER_KINDS,
    PROPERTY,
    TRAILING,
    feed,
    feed_error,
    feed_reads,
    split_at,
    survives,
)


def u8(n: int) -> bytes:
    return bytes((n,))


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def sni_extension(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(u8(kind) + u16(len(name)) + name for kind, name in names)
    return u16(len(entries)) + entries


def alpn_extension(*protocols: bytes) -> bytes:
    entries = b"".join(u8(len(p)) + p for p in protocols)
    return u16(len(entries)) + entries


def client_hello_message(
    server_name: bytes | None = b"example.com",
    alpn: tuple[bytes, ...] = (),
    extra: tuple[tuple[int, bytes], ...] = (),
    *,
    session_id: bytes = b"\x11" * 32,
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    version: bytes = b"\x03\x03",
    with_extensions: bool = True,
) -> bytes:
    """A ClientHello handshake message (type, 3-byte length, body), field by field."""
    extensions: list[tuple[int, bytes]] = []
    if server_name is not None:
        extensions.append((0, sni_extension((0, server_name))))
    if alpn:
        extensions.append((16, alpn_extension(*alpn)))
    extensions.extend(extra)
    body = (
        version
        + b"\x42" * 32
        + u8(len(session_id))
        + session_id
        + u16(len(suites))
        + suites
        + u8(len(compression))
        + compression
    )
    if with_extensions:
        block = b"".join(u16(kind) + u16(len(data)) + data for kind, data in extensions)
        body += u16(len(block)) + block
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: tuple[int, ...] = (), version: bytes = b"\x03\x01") -> bytes:
    """*message* as handshake records of the given fragment sizes (the rest in one)."""
    out = bytearray()
    pos = 0
    for size in (*sizes, len(message)):
        fragment = message[pos : pos + size]
        if fragment:
            out += b"\x16" + version + u16(len(fragment)) + fragment
        pos += len(fragment)
    return bytes(out)


@cache
def python_ssl_client_hello(server_hostname: str, alpn: tuple[str, ...]) -> bytes:
    """A ClientHello from the stdlib's OpenSSL binding, generated at test time."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- Real clients -------------------------------------------------------------------


def test_python_ssl_client_hello() -> None:
    hello = feed(parse_client_hello, python_ssl_client_hello("Www.Example.ORG", ("h2", "http/1.1")))
    assert hello == ClientHello("www.example.org", ("h2", "http/1.1"), hello.length)


def test_python_ssl_client_hello_without_alpn() -> None:
    hello = feed(parse_client_hello, python_ssl_client_hello("mc.example.net", ()))
    assert (hello.server_name, hello.alpn) == ("mc.example.net", ())


def test_openssl_s_client_capture() -> None:
    hello = feed(parse_client_hello, OPENSSL_CLIENT_HELLO)
    assert hello == ClientHello("play.example.com", ("h2", "http/1.1"), len(OPENSSL_CLIENT_HELLO))


def test_curl_capture() -> None:
    hello = feed(parse_client_hello, CURL_CLIENT_HELLO)
    assert hello == ClientHello("www.example.org", ("h2", "http/1.1"), 517)


def test_client_hello_split_across_three_reads() -> None:
    wire = python_ssl_client_hello("split.example.com", ("h2",))
    third = len(wire) // 3
    hello = feed_reads(
        parse_client_hello, [wire[:third], wire[third : 2 * third], wire[2 * third :]]
    )
    assert hello.server_name == "split.example.com"
    assert hello.length == len(wire)


def test_client_hello_split_across_three_records() -> None:
    message = python_ssl_client_hello("split.example.com", ("h2",))[5:]
    third = len(message) // 3
    wire = records(message, (third, third))
    assert wire.count(b"\x16\x03\x01") >= 3
    hello = feed(parse_client_hello, wire)
    assert (hello.server_name, hello.alpn, hello.length) == (
        "split.example.com",
        ("h2",),
        len(wire),
    )


def test_record_with_the_hello_header_split_one_byte_per_record() -> None:
    message = client_hello_message(b"tiny.example")
    hello = feed(parse_client_hello, records(message, (1, 1, 1, 1)))
    assert hello.server_name == "tiny.example"


@PROPERTY
@given(data=st.data())
def test_client_hello_split_across_random_records_and_reads(data: st.DataObject) -> None:
    message = python_ssl_client_hello("random.example.com", ("h2", "http/1.1"))[5:]
    sizes = data.draw(st.lists(st.integers(1, 600), max_size=6))
    wire = records(message, tuple(sizes))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    hello = feed_reads(parse_client_hello, split_at(wire, cuts))
    assert hello == ClientHello("random.example.com", ("h2", "http/1.1"), len(wire))


def test_records_after_the_hello_are_not_consumed() -> None:
    wire = records(client_hello_message(b"a.example"))
    change_cipher_spec = b"\x14\x03\x03\x00\x01\x01"
    assert parse_client_hello(wire + change_cipher_spec) == parse_client_hello(wire)


# --- Variants -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "server_name", "alpn"),
    [
        (client_hello_message(None), None, ()),
        (client_hello_message(None, with_extensions=False), None, ()),
        (client_hello_message(b"Example.COM."), "example.com", ()),
        (client_hello_message(b"a.example", (b"acme-tls/1",)), "a.example", ("acme-tls/1",)),
        (client_hello_message(b"a.example", session_id=b""), "a.example", ()),
        (
            client_hello_message(b"a.example", extra=((0x0A0A, b""), (0xFF01, b"\x00"))),
            "a.example",
            (),
        ),
        (
            client_hello_message(
                None, extra=((0, sni_extension((7, b"\x00\x01"), (0, b"b.example"))),)
            ),
            "b.example",
            (),
        ),
    ],
)
def test_client_hello_variants(
    message: bytes, server_name: str | None, alpn: tuple[str, ...]
) -> None:
    hello = feed(parse_client_hello, records(message))
    assert (hello.server_name, hello.alpn) == (server_name, alpn)


def test_sslv3_record_version_is_accepted() -> None:
    hello = feed(parse_client_hello, records(client_hello_message(), version=b"\x03\x00"))
    assert hello.server_name == "example.com"


# --- Rejections -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "message", "early_at"),
    [
        (b"GET / HTTP/1.1\r\n", "record type 71 at offset 0, expected 22", 1),
        (b"\x16\x02\x00\x00\x05", "version major 2", 2),
        (b"\x16\x03\x01\x00\x00", "empty TLS handshake record", 5),
        (b"\x16\x03\x01\x40\x01", "record length 16385 at offset 0 exceeds cap 16384", 5),
        (records(b"\x02\x00\x00\x01\x00"), "handshake message type 2, expected 1", 9),
        (
            records(client_hello_message(), (10,))[:15] + b"\x15\x03\x01\x00\x02\x02\x28",
            "record type 21 at offset 15, expected 22",
            16,
        ),
    ],
)
def test_bad_records_are_rejected_early(wire: bytes, message: str, early_at: int) -> None:
    shortest = feed_error(parse_client_hello, wire, MalformedClientHello, match=message)
    assert shortest == early_at


def test_client_hello_over_the_cap_is_rejected_from_its_header() -> None:
    wire = records(b"\x01" + (MAX_CLIENT_HELLO_BYTES - 3).to_bytes(3, "big") + b"\x03\x03")
    assert (
        feed_error(
            parse_client_hello,
            wire,
            ClientHelloTooLarge,
            match=f"ClientHello length {MAX_CLIENT_HELLO_BYTES + 1} exceeds cap",
        )
        == 9
    )


def test_client_hello_exactly_at_the_cap_is_accepted() -> None:
    padding = client_hello_message(b"big.example", extra=((21, b""),))
    filler = MAX_CLIENT_HELLO_BYTES - len(padding)
    message = client_hello_message(b"big.example", extra=((21, b"\x00" * filler),))
    assert len(message) == MAX_CLIENT_HELLO_BYTES
    assert parse_client_hello(records(message)) != NEED_DATA
    assert parse_client_hello(records(message, (100, 200))) != NEED_DATA


def test_too_many_records_are_rejected() -> None:
    message = client_hello_message(b"many.example", extra=((21, b"\x00" * 300),))
    allowed = records(message, (1,) * (MAX_CLIENT_HELLO_RECORDS - 1))
    assert isinstance(parse_client_hello(allowed), ClientHello)
    too_many = records(message, (1,) * MAX_CLIENT_HELLO_RECORDS)
    with pytest.raises(ClientHelloTooLarge, match="more than 256 records"):
        parse_client_hello(too_many)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (client_hello_message(version=b"\x02\x00"), "ClientHello version 2.0, expected 3.x"),
        (client_hello_message(session_id=b"\x00" * 33), "session id length 33"),
        (client_hello_message(suites=b""), "cipher_suites length 0"),
        (client_hello_message(suites=b"\x13\x01\x13"), "cipher_suites length 3"),
        (client_hello_message(compression=b""), "no compression methods"),
        (client_hello_message(b""), "SNI host_name is empty"),
        (client_hello_message(b"caf\xc3\xa9.example"), "byte 0xc3 at index 3, expected printable"),
        (client_hello_message(b"a.example\x00evil.example"), "byte 0x00 at index 9"),
        (client_hello_message(b"a b"), "byte 0x20 at index 1"),
        (
            client_hello_message(None, extra=((0, sni_extension((0, b"a.io"), (0, b"b.io"))),)),
            "two host_name entries",
        ),
        (client_hello_message(None, extra=((0, sni_extension((1, b"x"))),)), "without a host_name"),
        (client_hello_message(None, extra=((0, b""),)), "server_name list length"),
        (client_hello_message(None, extra=((0, b"\x00\x09\x00\x00\x04a.io"),)), "list length 9"),
        (client_hello_message(None, extra=((0, b"\x00\x06\x00\x00\x04a.i"),)), "server_name entry"),
        (
            client_hello_message(b"a.io", extra=((0, sni_extension((0, b"b.io"))),)),
            "repeats extension 0",
        ),
        (client_hello_message(None, (b"",)), "ALPN protocol name is empty"),
        (client_hello_message(None, extra=((16, b"\x00\x00"),)), "ALPN list length 0"),
        (client_hello_message(None, extra=((16, b"\x00\x03\x05h2"),)), "ALPN protocol name"),
    ],
)
def test_malformed_client_hello_is_rejected(message: bytes, match: str) -> None:
    feed_error(parse_client_hello, records(message), MalformedClientHello, match=match)


def test_extensions_block_must_end_the_message() -> None:
    message = client_hello_message(b"a.example")
    body = message[4:] + b"\x00"
    wire = records(b"\x01" + len(body).to_bytes(3, "big") + body)
    feed_error(
        parse_client_hello, wire, MalformedClientHello, match="does not end at the message end"
    )


def test_extension_running_past_the_block_is_rejected() -> None:
    message = client_hello_message(None, extra=((21, b"\x00" * 4),))
    body = bytearray(message[4:])
    body[-5] = 9  # extension 21's length: 4 -> 9
    wire = records(message[:4] + bytes(body))
    feed_error(parse_client_hello, wire, MalformedClientHello, match="extension 21: 9 bytes")


@PROPERTY
@given(st.binary(max_size=96))
def test_random_bytes_only_raise_malformed_client_hello(data: bytes) -> None:
    survives(parse_client_hello, data, MalformedClientHello)
    survives(parse_client_hello, b"\x16\x03\x01" + u16(len(data)) + data, MalformedClientHello)


@PROPERTY
@given(st.data())
def test_corrupted_real_hello_only_raises_malformed_client_hello(data: st.DataObject) -> None:
    wire = bytearray(OPENSSL_CLIENT_HELLO)
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    survives(parse_client_hello, bytes(wire), MalformedClientHello)


@PROPERTY
@given(st.data())
def test_body_cut_short_with_consistent_outer_lengths_is_malformed(data: st.DataObject) -> None:
    body = OPENSSL_CLIENT_HELLO[9:]
    cut = data.draw(st.integers(0, len(body) - 1))
    short = body[:cut]
    message = b"\x01" + len(short).to_bytes(3, "big") + short
    result = survives(parse_client_hello, records(message), MalformedClientHello)
    assert result is None or isinstance(result, ClientHello)


# --- Fast path ----------------------------------------------------------------------
# A hello in one record goes through _fast_client_hello; it must agree with the careful
# walk wherever it answers, and give up (None) or fail to read wherever it does not.


GAVE_UP = (None, "read past the end")


def fast(wire: bytes) -> object:
    """What the fast path makes of *wire*: a ClientHello, its error, or one of GAVE_UP."""
    end = 5 + int.from_bytes(wire[3:5], "big")
    try:
        return _fast_client_hello(wire, end)
    except (IndexError, struct.error):
        return "read past the end"
    except MalformedClientHello as exc:
        return exc


def careful(wire: bytes) -> object:
    """The careful walk's answer for the single-record hello in *wire*, or its error."""
    end = 5 + int.from_bytes(wire[3:5], "big")
    try:
        server_name, alpn = _parse_client_hello_body(wire[9:end])
    except MalformedClientHello as exc:
        return exc
    return ClientHello(server_name, alpn, end)


@pytest.mark.parametrize(
    "wire",
    [
        python_ssl_client_hello("fast.example.com", ()),
        python_ssl_client_hello("fast.example.com", ("h2", "http/1.1")),
        OPENSSL_CLIENT_HELLO,
        CURL_CLIENT_HELLO,
        records(client_hello_message(b"a.example", session_id=b"")),
        records(client_hello_message(None, (b"h2",))),
    ],
)
def test_fast_path_takes_real_hellos(wire: bytes) -> None:
    assert fast(wire) == careful(wire)
    assert fast(wire + TRAILING) == careful(wire)
    assert isinstance(fast(wire), ClientHello)


@pytest.mark.parametrize(
    "message",
    [
        client_hello_message(None, with_extensions=False),  # no extensions block
        client_hello_message(
            None, extra=((0, sni_extension((7, b"\x00\x01"), (0, b"b.example"))),)
        ),  # a second server_name entry
        client_hello_message(None, extra=((0, sni_extension((1, b"x"), (0, b"c.example"))),)),
        client_hello_message(b"Caf\xc3\xa9.example"),  # not ASCII
        client_hello_message(b"a b.example"),  # a space
        client_hello_message(b"a\x7f.example"),  # DEL
        client_hello_message(b""),
        client_hello_message(b"a.io", extra=((0, sni_extension((0, b"b.io"))),)),  # repeat
        client_hello_message(b"a.io", extra=((21, b""), (21, b""))),
        client_hello_message(version=b"\x02\x00"),
        client_hello_message(session_id=b"\x00" * 33),
        client_hello_message(suites=b""),
        client_hello_message(suites=b"\x13\x01\x13"),
        client_hello_message(compression=b""),
    ],
)
def test_fast_path_gives_up_on_what_it_does_not_check(message: bytes) -> None:
    wire = records(message)
    assert fast(wire) in GAVE_UP
    assert fast(wire + TRAILING) in GAVE_UP
    outcome = careful(wire)
    if isinstance(outcome, ClientHello):
        assert parse_client_hello(wire) == outcome
    else:
        with pytest.raises(MalformedClientHello, match=re.escape(str(outcome))):
            parse_client_hello(wire)


def test_fast_path_raises_the_careful_walks_alpn_error() -> None:
    wire = records(client_hello_message(b"a.example", (b"",)))
    assert str(fast(wire)) == str(careful(wire)) == "ALPN protocol name is empty"


def test_fast_path_does_not_read_into_the_next_record() -> None:
    # the last extension claims 6 bytes, 2 of which only the next record holds: the
    # bytes are in the buffer, but the hello must still be rejected
    message = client_hello_message(b"a.example", extra=((21, b"\x00" * 4),))
    body = bytearray(message[4:])
    body[-5] = 6  # extension 21's length: 4 -> 6
    wire = records(message[:4] + bytes(body))
    assert fast(wire + b"\x00\x00" + TRAILING) in GAVE_UP
    with pytest.raises(MalformedClientHello, match="extension 21: 6 bytes"):
        parse_client_hello(wire + b"\x00\x00" + TRAILING)


@PROPERTY
@given(st.data())
def test_fast_path_agrees_with_the_careful_walk(data: st.DataObject) -> None:
    base = data.draw(
        st.sampled_from(
            [
                OPENSSL_CLIENT_HELLO,
                CURL_CLIENT_HELLO,
                python_ssl_client_hello("prop.example.com", ("h2", "http/1.1")),
                records(client_hello_message(b"Prop.Example.", (b"h2",), ((21, b"\x00" * 3),))),
            ]
        )
    )
    wire = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        # corrupt the body only: the record and handshake headers choose the path
        wire[data.draw(st.integers(9, len(wire) - 1))] = data.draw(st.integers(0, 255))
    expected = careful(bytes(wire))
    for tail in (b"", TRAILING):
        outcome = fast(bytes(wire) + tail)
        if isinstance(outcome, MalformedClientHello):
            assert str(outcome) == str(expected)
        elif outcome not in GAVE_UP:
            assert outcome == expected


# --- Helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"", NEED_DATA),
        (b"\x16", NEED_DATA),
        (b"\x16\x03", True),
        (b"\x16\x00", False),  # a Minecraft packet of length 22
        (b"G", False),
        (OPENSSL_CLIENT_HELLO, True),
    ],
)
def test_is_tls(wire: bytes, expected: object) -> None:
    assert is_tls(wire) is expected


def test_encode_alert() -> None:
    assert encode_alert(ALERT_UNRECOGNIZED_NAME) == b"\x15\x03\x01\x00\x02\x02\x70"
    assert encode_alert(ALERT_HANDSHAKE_FAILURE, level=1) == b"\x15\x03\x01\x00\x02\x01\x28"
    with pytest.raises(LocalProtocolError, match="description 256"):
        encode_alert(256)


# --- is_tls: random and truncated bytes ----------------------------------------------


def tls_record_start(data: bytes) -> bool | NeedData:
    """The rule is_tls implements (RFC 8446 §5.1: a handshake record, 22, of a 3.x
    record version), decided on two bytes."""
    if data in (b"", b"\x16"):
        return NEED_DATA
    return data[:2] == b"\x16\x03"


HEADER_LIKE = st.binary(max_size=12) | st.tuples(
    st.sampled_from([b"\x16", b"\x16\x03", b"\x16\x02", b"\x15\x03"]), st.binary(max_size=10)
).map(b"".join)


@PROPERTY
@given(HEADER_LIKE)
def test_is_tls_on_random_bytes_reads_the_record_header_only(data: bytes) -> None:
    for kind in BUFFER_KINDS:
        assert is_tls(kind(data)) is tls_record_start(data)


@PROPERTY
@given(HEADER_LIKE, st.data())
def test_is_tls_never_changes_its_mind_when_more_bytes_arrive(
    data: bytes, draw: st.DataObject
) -> None:
    cut = draw.draw(st.integers(0, len(data)))
    early = is_tls(data[:cut])
    if early is not NEED_DATA:
        assert is_tls(data) is early


def test_every_truncation_of_a_real_client_hello_is_tls_once_two_bytes_are_in() -> None:
    hellos = [OPENSSL_CLIENT_HELLO, CURL_CLIENT_HELLO, python_ssl_client_hello("a.example", ())]
    for hello in hellos:
        for cut in range(len(hello) + 1):
            assert is_tls(hello[:cut]) is (NEED_DATA if cut < 2 else True), cut


@PROPERTY
@given(st.sampled_from([OPENSSL_CLIENT_HELLO, CURL_CLIENT_HELLO]), st.data())
def test_a_truncated_client_hello_is_incomplete_never_another_answer(
    hello: bytes, draw: st.DataObject
) -> None:
    cut = draw.draw(st.integers(0, len(hello) - 1))
    assert is_tls(hello[:cut]) in (NEED_DATA, True)
    assert parse_client_hello(hello[:cut]) is NEED_DATA
