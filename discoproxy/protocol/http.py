"""HTTP/1.x request head → Host, for routing plain-HTTP connections by name.

Rules for this file:

1. :func:`parse_request_head` takes a :data:`Buffer` starting at the request line and
   returns an :class:`HttpHead`, :data:`NEED_DATA` (no blank line yet, under the cap),
   or raises a :class:`MalformedHttpHead` subclass (``hint`` says: answer 400). It
   reads only the head; ``length`` counts bytes through the blank line so the caller
   replays the untouched head (and whatever followed) to the backend.
2. Strict where ambiguity could route a request differently than the backend would
   read it (RFC 9112 §11.2 request smuggling): one Host field at most, no whitespace
   before a field's colon, no obs-fold, no bare CR.
3. Lenient where RFC 9112 §2.2 allows it: a bare LF ends a line like CRLF does
   (h11 does the same). Leading empty lines before the request line are not skipped:
   the sniffer never sends such a connection here.

Specs: RFC 9112 §2.2 (message parsing), §3 (request line), §3.2 (request target and
Host), §5 (field syntax); RFC 9110 §5.6.2 (token), §7.2 (Host); RFC 3986 §3.2.2 (host).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ._types import Buffer
from .errors import NEED_DATA, HttpHeadTooLarge, LocalProtocolError, MalformedHttpHead, NeedData
from .names import normalize_host, strip_port

# Cap on the head, request line through the blank line. nginx's default
# large_client_header_buffers is 4 x 8k (one request line or field must fit 8 KiB),
# Apache's LimitRequestLine/LimitRequestFieldSize are 8190, and h11 uses 16 KiB for a
# whole incomplete event; a routed head only needs its request line and Host, so 8 KiB
# for everything keeps the sniff buffer small without refusing real browsers.
MAX_HTTP_HEAD_BYTES = 8192

# looks_like_http: methods in use are 3 (GET, PUT, PRI) to 10 letters; 7 is
# the longest registered common one (CONNECT, OPTIONS), WebDAV goes to 10.
MIN_METHOD_LETTERS = 3
MAX_METHOD_LETTERS = 10

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])")
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*)")
# RFC 3986 §3.2.2 host, after strip_port took the port off: the inside of an
# IP-literal, or a reg-name (unreserved / sub-delims, pct-encoding accepted loosely).
_IP_LITERAL = re.compile(r"[0-9A-Fa-f:.]+")
_REG_NAME = re.compile(r"[-A-Za-z0-9._~!$&'()*+,;=%]+")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][-A-Za-z0-9+.]*://([^/?#]*)")


class HttpHead(NamedTuple):  # built per connection: 3× cheaper than a frozen dataclass
    """What routing needs from a request head."""

    method: str
    target: str
    version: str
    """As sent, e.g. ``"HTTP/1.1"``."""
    host: str | None
    """From an absolute-form target, else the Host field; port stripped, normalised.
    None when neither carries one (HTTP/1.0, or an HTTP/1.1 request the caller rejects)."""
    length: int
    """Bytes through the blank line ending the head."""


def looks_like_http(buf: Buffer) -> bool | NeedData:
    """Whether *buf* starts with ``METHOD SP``: 3-10 upper-case ASCII letters, a space."""
    head = bytes(buf[: MAX_METHOD_LETTERS + 1])
    space = head.find(b" ")
    if space < 0:
        if len(head) <= MAX_METHOD_LETTERS and (not head or (head.isalpha() and head.isupper())):
            return NEED_DATA
        return False
    method = head[:space]
    return space >= MIN_METHOD_LETTERS and method.isalpha() and method.isupper()


def parse_request_head(buf: Buffer) -> HttpHead | NeedData:
    """Parse the request line and fields up to the blank line; find the Host."""
    region = buf[:MAX_HTTP_HEAD_BYTES]
    end_match = _END_OF_HEAD.search(region)
    if end_match is None:
        if len(buf) >= MAX_HTTP_HEAD_BYTES:
            raise HttpHeadTooLarge(
                f"request head exceeds cap {MAX_HTTP_HEAD_BYTES} bytes without a blank line"
            )
        first_newline = bytes(region).find(b"\n")
        if first_newline >= 0:  # reject a bad request line without waiting for the rest
            _parse_request_line(_strip_cr(bytes(region[:first_newline])))
        return NEED_DATA
    lines = bytes(region[: end_match.start()]).split(b"\n")
    method, target, version = _parse_request_line(_strip_cr(lines[0]))
    host_fields: list[bytes] = []
    for raw_line in lines[1:]:
        line = _strip_cr(raw_line)
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise MalformedHttpHead(_field_problem(line))
        if match[1].lower() == b"host":
            host_fields.append(match[2].rstrip(b" \t"))
    if len(host_fields) > 1:
        raise MalformedHttpHead(
            f"request has {len(host_fields)} Host fields, expected at most one (RFC 9112 §3.2)"
        )
    host = _host_from_target(method, target)
    if host is None and host_fields and host_fields[0]:
        host = _parse_host(host_fields[0].decode("latin-1"), "Host field")
    return HttpHead(
        method=method, target=target, version=version, host=host, length=end_match.end()
    )


def _strip_cr(line: bytes) -> bytes:
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\r" in line:
        raise MalformedHttpHead(f"bare CR in line {_show(line)} (RFC 9112 §2.2)")
    return line


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise MalformedHttpHead(
            f"request line {_show(line)}, expected 'METHOD SP target SP HTTP/x.y'"
        )
    method, target, version = match.groups()
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def _field_problem(line: bytes) -> str:
    if line[:1] in (b" ", b"\t"):
        return f"obsolete line folding in {_show(line)} (RFC 9112 §5.2)"
    name, colon, _ = line.partition(b":")
    if colon and name.rstrip(b" \t") != name:
        return f"whitespace before ':' in field {_show(line)} (RFC 9112 §5.1)"
    return f"header field {_show(line)}, expected 'name: value' with a token name"


def _host_from_target(method: str, target: str) -> str | None:
    """RFC 9112 §3.2.2: an absolute-form target's authority overrides Host; §3.2.3:
    CONNECT's authority-form target names the host."""
    if method == "CONNECT":
        return _parse_host(target, "CONNECT target")
    match = _ABSOLUTE_FORM.match(target.encode("ascii"))
    if match is None:
        return None
    authority = match[1].decode("ascii").rpartition("@")[2]
    return _parse_host(authority, "absolute-form target")


def _parse_host(value: str, where: str) -> str:
    try:
        host = strip_port(value)
    except ValueError as exc:
        raise MalformedHttpHead(f"{where}: {exc}") from None
    syntax = _IP_LITERAL if value.startswith("[") else _REG_NAME
    if syntax.fullmatch(host) is None:
        raise MalformedHttpHead(f"{where} {value!r}, expected host[:port] (RFC 3986 §3.2.2)")
    return normalize_host(host)


def _show(line: bytes) -> str:
    """A line for an error message: repr, cut to a readable length."""
    shown = repr(line[:80])
    return shown + "..." if len(line) > 80 else shown


def encode_response(status: int, reason: str, body: str = "") -> bytes:
    """A complete ``Connection: close`` plain-text response (for 400/421/502 answers)."""
    if not 100 <= status <= 599:
        raise LocalProtocolError(f"HTTP status {status} outside 100-599")
    if not (reason.isascii() and reason.isprintable()):
        raise LocalProtocolError(f"HTTP reason {reason!r}, expected printable ASCII")
    data = body.encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + data
