"""The one feed helper every parser test goes through (h11's ``tr()`` idea).

A parser here is any ``Callable[[Buffer], Result | NEED_DATA]`` that raises a
``ProtocolError`` subclass on bad input. :func:`feed` checks the three ways bytes
reach it in production: all at once, one byte more per read, and with the next
message already behind it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings

from discoproxy.protocol import NEED_DATA, ProtocolError
from discoproxy.protocol.errors import NeedData

T = TypeVar("T")

# Bytes that look like the start of another message of every kind we parse; a parser
# must stop at its own message's end and give the same result.
TRAILING = b"\x16\x03\x01\x02\x00\x01GET / HTTP/1.1\r\n\r\n\xfe\x01\xfa\r\n\r\n\x00\r\nQUIT\n\x00"

BUFFER_KINDS: tuple[Callable[[bytes], Any], ...] = (bytes, bytearray, memoryview)

# Property tests: enough examples to find length-handling bugs, few enough that the
# whole protocol suite stays well under 30 s.
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed(parser: Callable[[Any], T | NeedData], data: bytes) -> T:
    """Parse *data* every way; assert all agree; return the result.

    - every strict prefix gives NEED_DATA (no early result, no exception);
    - the whole message gives a result whose ``length`` (if any) is ``len(data)``;
    - bytes, bytearray and memoryview, with and without :data:`TRAILING`, give an
      equal result.
    """
    for cut in range(len(data)):
        assert parser(data[:cut]) is NEED_DATA, f"prefix of {cut} bytes did not give NEED_DATA"
    result = parser(data)
    assert not isinstance(result, NeedData)
    if hasattr(result, "length"):
        assert result.length == len(data)
    for kind in BUFFER_KINDS:
        assert parser(kind(data)) == result
        assert parser(kind(data + TRAILING)) == result
    return result


def feed_reads(parser: Callable[[Any], T | NeedData], reads: Iterable[bytes]) -> T:
    """Accumulate *reads* in a bytearray as a connection would, parsing after each.

    Every read but the last must leave the parser at NEED_DATA.
    """
    chunks = list(reads)
    buffer = bytearray()
    for chunk in chunks[:-1]:
        buffer += chunk
        assert parser(buffer) is NEED_DATA, f"decided after {len(buffer)} bytes"
    buffer += chunks[-1]
    result = parser(buffer)
    assert not isinstance(result, NeedData)
    return result


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """*data* cut at the given offsets (sorted, deduplicated, clamped) into reads."""
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in itertools.pairwise(points)] or [data]


def feed_error(
    parser: Callable[[Any], object],
    data: bytes,
    error: type[ProtocolError],
    match: str | None = None,
) -> int:
    """Assert *data* is rejected with *error*; return the shortest prefix that raises.

    Every shorter prefix must give NEED_DATA, and trailing data must not rescue it.
    """
    for kind in BUFFER_KINDS:
        with pytest.raises(error, match=match):
            parser(kind(data))
        with pytest.raises(error, match=match):
            parser(kind(data + TRAILING))
    for cut in range(len(data)):
        try:
            outcome = parser(data[:cut])
        except error:
            return cut
        assert outcome is NEED_DATA, f"prefix of {cut} bytes gave {outcome!r}"
    return len(data)


def survives(parser: Callable[[Any], object], data: bytes, error: type[ProtocolError]) -> object:
    """Parse arbitrary *data*: a result, NEED_DATA or *error*, nothing else."""
    try:
        return parser(data)
    except error:
        return None
