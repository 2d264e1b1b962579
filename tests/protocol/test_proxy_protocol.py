from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discoproxy.protocol import (
    MAX_PROXY_HEADER_BYTES,
    NEED_DATA,
    SIGNATURE_DEADLINE_BYTES,
    V2_SIGNATURE,
    InvalidProxyHeader,
    LocalProtocolError,
    ProxyHeader,
    encode_v1,
    encode_v2,
    encode_v2_local,
    parse_proxy_header,
)

from .captures import HAPROXY_V1_HEADER, HAPROXY_V2_HEADER_IPV6, HAPROXY_V2_HEADER_WITH_TLVS
from .feed import PROPERTY, feed, feed_error, feed_reads, split_at, survives

PAYLOAD = b"payload\n"


def v2(ver_cmd: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes((ver_cmd, family)) + struct.pack(">H", len(block)) + block


IPV4_BLOCK = bytes((192, 0, 2, 1, 198, 51, 100, 7)) + struct.pack(">HH", 56324, 443)


# --- Real senders and the spec's examples ------------------------------------------------


def test_haproxy_send_proxy_v1_capture() -> None:
    assert HAPROXY_V1_HEADER.endswith(PAYLOAD)
    header = feed(parse_proxy_header, HAPROXY_V1_HEADER[: -len(PAYLOAD)])
    assert header == ProxyHeader(
        1, "PROXY", "tcp", ("127.0.0.1", 54484), ("127.0.0.1", 18450), len(HAPROXY_V1_HEADER) - 8
    )


def test_haproxy_send_proxy_v2_capture_with_tlvs() -> None:
    header = feed(parse_proxy_header, HAPROXY_V2_HEADER_WITH_TLVS[: -len(PAYLOAD)])
    assert (header.version, header.command, header.transport) == (2, "PROXY", "tcp")
    assert header.source == ("127.0.0.1", 52150)
    assert header.destination == ("127.0.0.1", 18452)
    assert [tlv_type for tlv_type, _ in header.tlvs] == [0x03, 0x05]  # CRC32C, UNIQUE_ID
    assert header.tlvs[1] == (0x05, b"discoproxy-test-7F000001")
    assert parse_proxy_header(HAPROXY_V2_HEADER_WITH_TLVS) == header


def test_haproxy_send_proxy_v2_capture_over_ipv6() -> None:
    header = feed(parse_proxy_header, HAPROXY_V2_HEADER_IPV6[: -len(PAYLOAD)])
    assert header == ProxyHeader(2, "PROXY", "tcp", ("::1", 37522), ("::1", 18454), 52)


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
        ),
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            ("255.255.255.255", 65535),
            ("255.255.255.255", 65535),
        ),
        (
            b"PROXY TCP6 2001:DB8::1 2001:db8:0:0:0:0:0:2 0 65535\r\n",
            ("2001:db8::1", 0),
            ("2001:db8::2", 65535),
        ),
        (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ::1 1 2\r\n",
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1),
            ("::1", 2),
        ),
    ],
)
def test_v1_lines_from_the_spec(
    line: bytes, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    assert feed(parse_proxy_header, line) == ProxyHeader(
        1, "PROXY", "tcp", source, destination, len(line)
    )


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        b"PROXY UNKNOWN anything at all\r\n",
    ],
)
def test_v1_unknown_means_local(line: bytes) -> None:
    assert feed(parse_proxy_header, line) == ProxyHeader(
        1, "LOCAL", "unspec", None, None, len(line)
    )


def test_v1_worst_case_is_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(line) == 107
    assert feed(parse_proxy_header, line).length == 107


# --- v2 ------------------------------------------------------------------------------


def test_v2_local() -> None:
    assert encode_v2_local() == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert feed(parse_proxy_header, encode_v2_local()) == ProxyHeader(
        2, "LOCAL", "unspec", None, None, 16
    )


def test_v2_local_skips_whatever_block_it_carries() -> None:
    wire = v2(0x20, 0x11, IPV4_BLOCK + b"\x04\x00\x00")
    assert feed(parse_proxy_header, wire) == ProxyHeader(
        2, "LOCAL", "unspec", None, None, len(wire)
    )


def test_v2_proxy_ipv4_and_udp() -> None:
    header = feed(parse_proxy_header, v2(0x21, 0x12, IPV4_BLOCK))
    assert header == ProxyHeader(2, "PROXY", "udp", ("192.0.2.1", 56324), ("198.51.100.7", 443), 28)


def test_v2_unspec_family_has_no_addresses() -> None:
    header = feed(parse_proxy_header, v2(0x21, 0x00, b"\xaa" * 7))
    assert header == ProxyHeader(2, "PROXY", "unspec", None, None, 23)


def test_v2_tlvs_are_returned_in_order() -> None:
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00" + b"\x02\x00\x0bexample.com"
    header = feed(parse_proxy_header, v2(0x21, 0x11, IPV4_BLOCK + tlvs))
    assert header.tlvs == ((0x01, b"h2"), (0x04, b""), (0x02, b"example.com"))


def test_v2_header_of_536_bytes_is_accepted() -> None:
    filler = MAX_PROXY_HEADER_BYTES - 16 - len(IPV4_BLOCK) - 3
    header = feed(
        parse_proxy_header,
        v2(0x21, 0x11, IPV4_BLOCK + b"\x04" + struct.pack(">H", filler) + b"\x00" * filler),
    )
    assert header.length == MAX_PROXY_HEADER_BYTES


def test_v2_over_536_bytes_is_rejected_from_its_fixed_header() -> None:
    filler = MAX_PROXY_HEADER_BYTES + 1 - 16 - len(IPV4_BLOCK) - 3
    wire = v2(0x21, 0x11, IPV4_BLOCK + b"\x04" + struct.pack(">H", filler) + b"\x00" * filler)
    assert len(wire) == MAX_PROXY_HEADER_BYTES + 1
    assert (
        feed_error(
            parse_proxy_header,
            wire,
            InvalidProxyHeader,
            match="header length 537 exceeds maximum size 536",
        )
        == 16
    )


@pytest.mark.parametrize(
    ("wire", "match", "early_at"),
    [
        (v2(0x11, 0x11, IPV4_BLOCK), "version 1, expected 2", 13),
        (v2(0x22, 0x11, IPV4_BLOCK), "command 0x2, expected 0", 13),
        (v2(0x21, 0x41, IPV4_BLOCK), "family/protocol byte 0x41", 14),
        (v2(0x21, 0x13, IPV4_BLOCK), "family/protocol byte 0x13", 14),
        (v2(0x21, 0x31, b"\x00" * 216), "unsupported address family AF_UNIX", 232),
        (
            v2(0x21, 0x11, IPV4_BLOCK[:11]),
            "block of 11 bytes, expected at least 12 for AF_INET",
            27,
        ),
        (v2(0x21, 0x21, b"\x00" * 35), "expected at least 36 for AF_INET6", 51),
        (v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00"), "TLV header at byte 28 is cut off", 30),
        (v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00\x05ab"), "TLV type 0x01 length 5 runs past", 33),
    ],
)
def test_bad_v2_headers_are_rejected(wire: bytes, match: str, early_at: int) -> None:
    assert feed_error(parse_proxy_header, wire, InvalidProxyHeader, match=match) == early_at


# --- v1 rejections -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "bare LF"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\r\n", "CR not followed by LF"),
        (b"PROXY TCP5 192.168.0.1 192.168.0.11 56324 443\r\n", "protocol 'TCP5'"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n", "5 space-separated fields"),
        (b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n", "7 space-separated fields"),
        (b"PROXY TCP4 ::1 192.168.0.11 56324 443\r\n", "address '::1', expected an IPv4"),
        (b"PROXY TCP6 192.168.0.1 ::1 56324 443\r\n", "address '192.168.0.1', expected an IPv6"),
        (b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n", "address '192.168.000.1'"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "fe80::1%eth0"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "port '056324'"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 00 443\r\n", "port '00'"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "port '65536'"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n", "port '\\+1'"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 1 -1\r\n", "port '-1'"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 1 \xd9\xa1\r\n", "not plain ASCII"),
    ],
)
def test_bad_v1_lines_are_rejected(line: bytes, match: str) -> None:
    feed_error(parse_proxy_header, line, InvalidProxyHeader, match=match)


def test_v1_without_crlf_within_107_bytes_is_rejected_at_107() -> None:
    wire = b"PROXY UNKNOWN " + b"x" * 200
    assert (
        feed_error(parse_proxy_header, wire, InvalidProxyHeader, match="no CRLF within 107") == 107
    )


# --- Signature detection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "decided_at"),
    [
        (b"GET / HTTP/1.1\r\n", 1),
        (b"\x16\x03\x01\x02\x00", 1),
        (b"PROXX TCP4", 5),
        (b"PROXY\tTCP4", 6),
        (b"proxy TCP4", 1),
        (b"\r\n\r\nGET / HTTP/1.1", 5),
        (V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c", 12),
    ],
)
def test_missing_signature_is_rejected_as_early_as_possible(wire: bytes, decided_at: int) -> None:
    assert (
        feed_error(
            parse_proxy_header,
            wire,
            InvalidProxyHeader,
            match="data does not start with a proxy protocol signature",
        )
        == decided_at
    )


@PROPERTY
@given(st.binary(min_size=SIGNATURE_DEADLINE_BYTES, max_size=64))
def test_no_signature_within_16_bytes_is_rejected_early(data: bytes) -> None:
    if data.startswith((V2_SIGNATURE, b"PROXY ")):
        return
    with pytest.raises(InvalidProxyHeader, match="signature"):
        parse_proxy_header(data[:SIGNATURE_DEADLINE_BYTES])


@PROPERTY
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_invalid_proxy_header(data: bytes) -> None:
    survives(parse_proxy_header, data, InvalidProxyHeader)
    survives(parse_proxy_header, V2_SIGNATURE + data, InvalidProxyHeader)
    survives(parse_proxy_header, b"PROXY " + data, InvalidProxyHeader)


# --- Encoders -------------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5)


@PROPERTY
@given(
    addresses=st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    source_port=ports,
    destination_port=ports,
    transport=st.sampled_from(["tcp", "udp"]),
    tlvs=tlv_lists,
    data=st.data(),
)
def test_v2_round_trips(
    addresses: tuple[str, str],
    source_port: int,
    destination_port: int,
    transport: str,
    tlvs: list[tuple[int, bytes]],
    data: st.DataObject,
) -> None:
    wire = encode_v2(
        (addresses[0], source_port),
        (addresses[1], destination_port),
        transport=transport,
        tlvs=tlvs,
    )
    header = parse_proxy_header(wire + PAYLOAD)
    assert header == ProxyHeader(
        2,
        "PROXY",
        transport,
        (addresses[0], source_port),
        (addresses[1], destination_port),
        len(wire),
        tuple(tlvs),
    )
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=5))
    assert feed_reads(parse_proxy_header, split_at(wire, cuts)) == header


@PROPERTY
@given(source=ipv4, destination=ipv6, source_port=ports, destination_port=ports)
def test_v2_mixed_families_map_ipv4_into_ipv6(
    source: str, destination: str, source_port: int, destination_port: int
) -> None:
    mapped = str(ipaddress.IPv6Address(f"::ffff:{source}"))
    for src, dst, expect_src, expect_dst in (
        (source, destination, mapped, destination),
        (destination, source, destination, mapped),
    ):
        header = feed(parse_proxy_header, encode_v2((src, source_port), (dst, destination_port)))
        assert header.source == (expect_src, source_port)
        assert header.destination == (expect_dst, destination_port)
        assert header.length == 16 + 36


def test_v2_mixed_families_literal() -> None:
    wire = encode_v2(("192.0.2.1", 1), ("2001:db8::1", 2))
    assert wire[13] == 0x21  # AF_INET6, STREAM
    assert wire[16:32] == bytes(10) + b"\xff\xff" + bytes((192, 0, 2, 1))


def test_v2_ipv4_mapped_on_both_sides_stays_ipv6() -> None:
    wire = encode_v2(("::ffff:192.0.2.1", 1), ("::ffff:198.51.100.7", 2))
    assert wire[13] == 0x21
    assert feed(parse_proxy_header, wire).source == (
        str(ipaddress.ip_address("::ffff:192.0.2.1")),
        1,
    )


@pytest.mark.parametrize(
    ("source", "destination", "kwargs", "match"),
    [
        (("example.com", 1), ("192.0.2.1", 2), {}, "source address 'example.com' is not an IP"),
        (
            ("192.0.2.1", 1),
            ("fe80::1%eth0", 2),
            {},
            "destination address 'fe80::1%eth0' has a scope id",
        ),
        (("192.0.2.1", 65536), ("192.0.2.1", 2), {}, "source port 65536"),
        (("192.0.2.1", -1), ("192.0.2.1", 2), {}, "source port -1"),
        (("192.0.2.1", True), ("192.0.2.1", 2), {}, "source port True"),
        (("192.0.2.1", 1), ("192.0.2.1", 2), {"transport": "sctp"}, "transport 'sctp'"),
        (("192.0.2.1", 1), ("192.0.2.1", 2), {"tlvs": [(256, b"")]}, "TLV type 256"),
        (
            ("192.0.2.1", 1),
            ("192.0.2.1", 2),
            {"tlvs": [(4, b"\x00" * 600)]},
            "exceeds maximum size 536",
        ),
    ],
)
def test_encode_v2_refuses_what_it_cannot_represent(
    source: tuple[str, int], destination: tuple[str, int], kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_v2(source, destination, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "destination", "line"),
    [
        (
            ("192.0.2.1", 56324),
            ("198.51.100.7", 443),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n",
        ),
        (("2001:db8::1", 1), ("::1", 2), b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"),
        (("192.0.2.1", 1), ("::1", 2), b"PROXY TCP6 ::ffff:c000:201 ::1 1 2\r\n"),
    ],
)
def test_encode_v1(source: tuple[str, int], destination: tuple[str, int], line: bytes) -> None:
    assert encode_v1(source, destination) == line
    header = feed(parse_proxy_header, line)
    assert header.source is not None
    assert ipaddress.ip_address(header.source[0]) == ipaddress.ip_address(
        source[0]
        if ":" in source[0]
        else f"::ffff:{source[0]}"
        if ":" in destination[0]
        else source[0]
    )


@PROPERTY
@given(
    addresses=st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6), st.tuples(ipv4, ipv6)),
    sport=ports,
    dport=ports,
)
def test_v1_round_trips(addresses: tuple[str, str], sport: int, dport: int) -> None:
    line = encode_v1((addresses[0], sport), (addresses[1], dport))
    assert len(line) <= 107
    header = parse_proxy_header(line)
    assert header is not NEED_DATA
    assert header.source is not None and header.destination is not None
    assert header.source[1] == sport and header.destination[1] == dport


# --- v1 through the feed path: every truncation of a valid line -------------------------


def ipv6_spellings(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> st.SearchStrategy[str]:
    """Ways a sender may write one IPv6 address (RFC 4291 §2.2): compressed, every
    group written out, upper-case hex."""
    return st.sampled_from([str(address), address.exploded, address.exploded.upper()])


@st.composite
def v1_lines(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v1 line as any sender may write it, and the header it must parse to."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":  # spec §2.1: whatever precedes the CRLF is ignored
        junk = draw(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
        line = ("PROXY UNKNOWN" + (" " + junk if junk else ""))[:105]
        return line.encode() + b"\r\n", ProxyHeader(1, "LOCAL", "unspec", None, None, 0)
    sport, dport = draw(ports), draw(ports)
    if kind == "TCP4":
        src, dst = draw(st.ip_addresses(v=4)), draw(st.ip_addresses(v=4))
        src_text, dst_text = str(src), str(dst)
    else:
        src, dst = draw(st.ip_addresses(v=6)), draw(st.ip_addresses(v=6))
        src_text, dst_text = draw(ipv6_spellings(src)), draw(ipv6_spellings(dst))
    line = f"PROXY {kind} {src_text} {dst_text} {sport} {dport}\r\n".encode()
    header = ProxyHeader(1, "PROXY", "tcp", (str(src), sport), (str(dst), dport), 0)
    return line, header


@PROPERTY
@given(v1_lines(), st.data())
def test_every_truncation_of_a_v1_line_is_incomplete_and_the_whole_line_parses(
    case: tuple[bytes, ProxyHeader], data: st.DataObject
) -> None:
    line, expected = case
    assert len(line) <= 107
    expected = ProxyHeader(
        expected.version,
        expected.command,
        expected.transport,
        expected.source,
        expected.destination,
        len(line),
    )
    # feed: every strict prefix NEED_DATA, the line whole, each buffer kind, trailing data
    assert feed(parse_proxy_header, line) == expected
    # read by read as a connection gets it, the payload arriving with the line's end
    cuts = data.draw(st.lists(st.integers(0, len(line) - 1), max_size=6))
    assert feed_reads(parse_proxy_header, split_at(line, cuts)) == expected
    assert feed_reads(parse_proxy_header, split_at(line + PAYLOAD, cuts)) == expected
