from __future__ import annotations

import http.client
import re
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discoproxy.protocol import (
    MAX_HTTP_HEAD_BYTES,
    NEED_DATA,
    HttpHead,
    HttpHeadTooLarge,
    LocalProtocolError,
    MalformedHttpHead,
    encode_response,
    looks_like_http,
    parse_request_head,
    strip_port,
)
from discoproxy.protocol.errors import NeedData

from .captures import CURL_HTTP_REQUEST
from .feed import PROPERTY, feed, feed_error, feed_reads, split_at, survives


def head(method: str, target: str, version: str, host: str | None, wire: bytes) -> HttpHead:
    return HttpHead(method, target, version, host, len(wire))


def test_curl_capture() -> None:
    assert feed(parse_request_head, CURL_HTTP_REQUEST) == head(
        "GET", "/path?q=1", "HTTP/1.1", "shop.example.net", CURL_HTTP_REQUEST
    )


def test_stdlib_http_client_request() -> None:
    client_end, server_end = socket.socketpair()
    with client_end, server_end:
        connection = http.client.HTTPConnection("Api.Example.com", 8443)
        connection.sock = client_end
        connection.request("POST", "/v1/items", body=b'{"a": 1}', headers={"X-Test": "yes"})
        server_end.settimeout(5)
        wire = server_end.recv(65536)
    end = wire.index(b"\r\n\r\n") + 4
    parsed = feed(parse_request_head, wire[:end])
    assert parsed == head("POST", "/v1/items", "HTTP/1.1", "api.example.com", wire[:end])
    assert parse_request_head(wire) == parsed  # the body stays for the backend


@pytest.mark.parametrize(
    ("wire", "expected_host"),
    [
        (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "example.com"),
        (b"GET / HTTP/1.1\r\nHost: Example.COM.:8080\r\n\r\n", "example.com"),
        (b"GET / HTTP/1.1\r\nhOsT:example.com \t\r\n\r\n", "example.com"),
        (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", "::1"),
        (b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]\r\n\r\n", "2001:db8::1"),
        (b"GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n", "192.0.2.1"),
        (b"GET / HTTP/1.1\r\nHost: example.com:\r\n\r\n", "example.com"),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", None),
        (b"GET / HTTP/1.0\r\n\r\n", None),
        (b"GET / HTTP/1.1\nHost: lf.example\n\n", "lf.example"),
        (b"GET / HTTP/1.1\r\nHost: mixed.example\n\r\n", "mixed.example"),
        (b"GET / HTTP/1.1\r\nX-Latin: caf\xe9\r\nHost: h.example\r\n\r\n", "h.example"),
        (b"OPTIONS * HTTP/1.1\r\nHost: star.example\r\n\r\n", "star.example"),
        (b"PRI * HTTP/2.0\r\n\r\n", None),
    ],
)
def test_host_is_found_and_normalised(wire: bytes, expected_host: str | None) -> None:
    assert feed(parse_request_head, wire).host == expected_host


def test_host_with_port_is_stripped() -> None:
    assert feed(parse_request_head, b"GET / HTTP/1.1\r\nHost: Web.Example:8080\r\n\r\n").host == (
        "web.example"
    )


def test_ipv6_host_with_port() -> None:
    parsed = feed(parse_request_head, b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert parsed.host == "::1"


def test_absolute_form_target_overrides_host() -> None:
    wire = b"GET http://user:pw@Target.Example:8080/a?b HTTP/1.1\r\nHost: other.example\r\n\r\n"
    parsed = feed(parse_request_head, wire)
    assert parsed == head(
        "GET", "http://user:pw@Target.Example:8080/a?b", "HTTP/1.1", "target.example", wire
    )


def test_connect_authority_form_names_the_host() -> None:
    wire = b"CONNECT Tunnel.Example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n"
    assert feed(parse_request_head, wire).host == "tunnel.example"


def test_head_split_across_random_reads_is_found_whole() -> None:
    cuts = [1, 5, 17, 18, 30, 60, len(CURL_HTTP_REQUEST) - 1]
    assert feed_reads(parse_request_head, split_at(CURL_HTTP_REQUEST, cuts)) == (
        parse_request_head(CURL_HTTP_REQUEST)
    )


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
            "2 Host fields, expected at most one",
        ),
        (b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\n\r\n", "2 Host fields"),
        (b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", "whitespace before ':'"),
        (b"GET / HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n", "obsolete line folding"),
        (b"GET / HTTP/1.1\r\nX-A: 1\r2\r\n\r\n", "bare CR"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", "expected 'name: value'"),
        (b"GET / HTTP/1.1\r\nX-A: \x01\r\n\r\n", "expected 'name: value'"),
        (b"GET / HTTP/1.1\r\nHost: exa mple.com\r\n\r\n", "Host field 'exa mple.com', expected"),
        (b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", "port 99999, expected 0-65535"),
        (b"GET / HTTP/1.1\r\nHost: a.example:8x\r\n\r\n", "port '8x', expected 0-65535"),
        (b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", "IPv6 literal must be in brackets"),
        (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "without a closing"),
        (b"GET / HTTP/1.1\r\nHost: [v1.x]\r\n\r\n", "expected host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "expected host"),
        (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", "expected host"),
        (b"GET http:///x HTTP/1.1\r\n\r\n", "absolute-form target '', expected host"),
        (b"GET http://a.example/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "2 Host"),
        (b"CONNECT :443 HTTP/1.1\r\n\r\n", "CONNECT target"),
    ],
)
def test_malformed_head_is_rejected(wire: bytes, match: str) -> None:
    feed_error(parse_request_head, wire, MalformedHttpHead, match=match)


@pytest.mark.parametrize(
    "line",
    [
        b"GET  / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET /\x7f HTTP/1.1",
        b"GET / HTTP/11",
        b"GET / FTP/1.1",
        b"G@T / HTTP/1.1",
        b"",
    ],
)
def test_bad_request_line_is_rejected_once_the_line_ends(line: bytes) -> None:
    wire = line + b"\r\nHost: a.example\r\n\r\n"
    rejected_at = feed_error(parse_request_head, wire, MalformedHttpHead, match="request line")
    assert rejected_at == len(line) + 2  # as soon as its CRLF is in


def test_head_over_the_cap_is_rejected() -> None:
    wire = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HTTP_HEAD_BYTES
    assert (
        feed_error(
            parse_request_head,
            wire,
            HttpHeadTooLarge,
            match="request head exceeds cap 8192 bytes without a blank line",
        )
        == MAX_HTTP_HEAD_BYTES
    )


def test_head_exactly_at_the_cap_is_accepted() -> None:
    start = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: "
    wire = start + b"a" * (MAX_HTTP_HEAD_BYTES - len(start) - 4) + b"\r\n\r\n"
    assert len(wire) == MAX_HTTP_HEAD_BYTES
    assert feed(parse_request_head, wire).host == "a.example"


@PROPERTY
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_malformed_http_head(data: bytes) -> None:
    survives(parse_request_head, data, MalformedHttpHead)
    survives(parse_request_head, b"GET / HTTP/1.1\r\n" + data + b"\r\n\r\n", MalformedHttpHead)


@PROPERTY
@given(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){1,2}", fullmatch=True),
    st.none() | st.integers(0, 65535),
)
def test_host_values_round_trip(name: str, port: int | None) -> None:
    value = name.upper() + ("" if port is None else f":{port}")
    wire = f"GET / HTTP/1.1\r\nHost: {value}\r\n\r\n".encode()
    assert feed(parse_request_head, wire).host == name


# --- looks_like_http --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"", NEED_DATA),
        (b"G", NEED_DATA),
        (b"GET", NEED_DATA),
        (b"GET ", True),
        (b"PRI * HTTP/2.0", True),
        (b"OPTIONS ", True),
        (b"PROPPATCH ", True),
        (b"ABCDEFGHIJ", NEED_DATA),
        (b"ABCDEFGHIJ ", True),
        (b"ABCDEFGHIJK", False),
        (b"GE ", False),
        (b"get ", False),
        (b"Get ", False),
        (b"G\x00", False),
        (b"A\x00\x00", False),  # a Minecraft handshake of length 65
        (b"\x16\x03\x01", False),
        (b"SSH-2.0-OpenSSH_9.2", False),
        (b" GET", False),
    ],
)
def test_looks_like_http(wire: bytes, expected: object) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert looks_like_http(kind(wire)) is expected


@PROPERTY
@given(st.binary(max_size=16))
def test_looks_like_http_is_total(data: bytes) -> None:
    assert looks_like_http(data) in (True, False, NEED_DATA)


# --- strip_port and encode_response ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("example.com", "example.com"),
        ("example.com:80", "example.com"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("example.com:", "example.com"),
    ],
)
def test_strip_port(value: str, host: str) -> None:
    assert strip_port(value) == host


@pytest.mark.parametrize("value", ["[::1", "[::1]x", "::1", "a:65536", "a:-1", "a:\u0661"])
def test_strip_port_rejects_what_is_not_host_port(value: str) -> None:
    with pytest.raises(ValueError, match="host"):
        strip_port(value)


def test_encode_response() -> None:
    assert encode_response(421, "Misdirected Request", "no route for h\u00e9\n") == (
        b"HTTP/1.1 421 Misdirected Request\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 17\r\n"
        b"Connection: close\r\n\r\n"
        b"no route for h\xc3\xa9\n"
    )


@pytest.mark.parametrize(("status", "reason"), [(99, "Low"), (600, "High"), (400, "Bad\r\nX: y")])
def test_encode_response_refuses_bad_status_lines(status: int, reason: str) -> None:
    with pytest.raises(LocalProtocolError):
        encode_response(status, reason)


# --- looks_like_http and strip_port: random and truncated input ---------------------------


def http_method_start(data: bytes) -> bool | NeedData:
    """The rule looks_like_http implements: 3-10 upper-case ASCII letters and a space;
    undecided while what has arrived could still become that."""
    if re.match(rb"[A-Z]{3,10} ", data):
        return True
    if re.fullmatch(rb"[A-Z]{0,10}", data):
        return NEED_DATA
    return False


METHOD_LIKE = st.binary(max_size=16) | st.from_regex(
    rb"\A[A-Za-z]{0,12}[ \x00\t]?[\x00-\xff]{0,3}\Z", fullmatch=True
)


@PROPERTY
@given(METHOD_LIKE)
def test_looks_like_http_on_random_bytes_follows_its_rule(data: bytes) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert looks_like_http(kind(data)) is http_method_start(data)


@PROPERTY
@given(METHOD_LIKE, st.data())
def test_looks_like_http_never_changes_its_mind_when_more_bytes_arrive(
    data: bytes, draw: st.DataObject
) -> None:
    cut = draw.draw(st.integers(0, len(data)))
    early = looks_like_http(data[:cut])
    if early is not NEED_DATA:
        assert looks_like_http(data) is early


@PROPERTY
@given(st.from_regex(r"\A[A-Z]{3,10}\Z", fullmatch=True), st.binary(max_size=20))
def test_every_truncation_of_a_request_is_undecided_until_its_method_ends(
    method: str, rest: bytes
) -> None:
    wire = method.encode() + b" " + rest
    for cut in range(len(wire) + 1):
        expected = NEED_DATA if cut <= len(method) else True
        assert looks_like_http(wire[:cut]) is expected, cut


def test_every_truncation_of_the_curl_capture_is_http_once_its_method_ends() -> None:
    for cut in range(len(CURL_HTTP_REQUEST) + 1):
        expected = NEED_DATA if cut <= len(b"GET") else True
        assert looks_like_http(CURL_HTTP_REQUEST[:cut]) is expected, cut


_BRACKETED = re.compile(r"\[([^\]]*)\](?::([0-9]{0,5}))?")
_PLAIN = re.compile(r"([^:]*)(?::([0-9]{0,5}))?")


def host_of(value: str) -> str | None:
    """What strip_port implements (RFC 3986 §3.2.2 host, RFC 9110 §7.2 port 0-65535,
    brackets required around an IPv6 literal): the host, or None (ValueError)."""
    match = (_BRACKETED if value.startswith("[") else _PLAIN).fullmatch(value)
    if match is None or (match[2] and int(match[2]) > 65535):
        return None
    return match[1]


HOST_LIKE = (
    st.text(max_size=20)
    | st.text(alphabet="[]:0123456789abc.\u0661", max_size=14)
    | st.tuples(
        st.sampled_from(["a.example", "[::1]", "[v1.x]", "", "[", "a:b"]),
        st.sampled_from([":", "", "]:", "::"]),
        st.sampled_from(["65535", "65536", "99999", "000080", "100000", "0", ""])
        | st.integers(0, 99_999).map(str)
        | st.text(alphabet="0123456789+-_ \u0661", max_size=6),
    ).map("".join)
)


@PROPERTY
@given(HOST_LIKE)
def test_strip_port_on_any_text_returns_the_host_or_raises_value_error(value: str) -> None:
    expected = host_of(value)
    if expected is None:
        with pytest.raises(ValueError, match="host"):
            strip_port(value)
    else:
        assert strip_port(value) == expected


@PROPERTY
@given(
    st.from_regex(r"\A[a-z0-9.-]{0,20}\Z", fullmatch=True)
    | st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
    st.integers(0, 65535),
)
def test_every_truncation_of_host_and_port_is_the_host_or_a_prefix_of_it(
    host: str, port: int
) -> None:
    value = f"{host}:{port}"
    bracketed = host.startswith("[")
    name = host[1:-1] if bracketed else host
    for cut in range(len(value) + 1):
        part = value[:cut]
        if cut >= len(host):  # the whole host: the port, cut or not, is stripped
            assert strip_port(part) == name, part
        elif bracketed and cut > 0:  # no closing bracket yet
            with pytest.raises(ValueError, match="without a closing"):
                strip_port(part)
        else:
            assert strip_port(part) == part
