"""The bytes the benchmark's clients and backends exchange, built once per run.

Names: every scenario routes by a name under ``bench.example.com`` so discoproxy does
the same sniff → lookup → dial work as in production; HAProxy gets the same bytes.
"""

from __future__ import annotations

import contextlib
import ssl
import struct

from discoproxy.protocol import minecraft

SNI_NAME = "bench.example.com"
# 3-backend pools (issue 16): round robin and least connections, with health checks
POOL_RR_NAME = "pool-rr.example.com"
POOL_LC_NAME = "pool-lc.example.com"
BULK_NAME = "bulk.bench.example.com"
ECHO_NAME = "echo.bench.example.com"
STATUS_NAME = "status.bench.example.com"
# status pings scenario: one server file each, both on the mcstatus backend
PING_CACHED_NAME = "cached.ping.bench.example.com"  # status_cache_ttl = PING_CACHED_TTL
PING_UNCACHED_NAME = "ttl0.ping.bench.example.com"  # status_cache_ttl = 0
PING_CACHED_TTL = 3600
# TLS termination scenario: the certificate's name (CN and SAN), and what the client sends
# once the handshake is done; the reply backend answers it with REPLY
TLS_NAME = "tls.bench.example.com"
TLS_REQUEST = b"tls termination bench: one request\n"

PROTOCOL_VERSION = 765  # Minecraft 1.20.4
LOGIN = 2
STATUS = 1

# What the reply backend answers to the first bytes of any connection: a realistic
# server-list status response (about 150 bytes), for SNI and Minecraft alike.
REPLY = minecraft.encode_status_response(
    minecraft.status_json("benchmark backend", version_name="1.20.4", protocol=PROTOCOL_VERSION)
)
# What the mcstatus backend answers to a status request: a status response like REPLY
# whose description ends in a serial number, fixed width so the frame's length prefixes
# never change. Clients count distinct serials: how many answers came from the backend.
SERIAL_MARKER = b"answer #"
SERIAL_DIGITS = 10
_SERIAL_TEMPLATE = minecraft.encode_status_response(
    minecraft.status_json(
        f"benchmark backend, {SERIAL_MARKER.decode()}{'0' * SERIAL_DIGITS}",
        version_name="1.20.4",
        protocol=PROTOCOL_VERSION,
    )
)
_SERIAL_AT = _SERIAL_TEMPLATE.index(SERIAL_MARKER) + len(SERIAL_MARKER)
SERIAL_HEAD = _SERIAL_TEMPLATE[:_SERIAL_AT]
SERIAL_TAIL = _SERIAL_TEMPLATE[_SERIAL_AT + SERIAL_DIGITS :]
# The client's Ping Request (8-byte payload); the Pong Response is the same bytes.
PING = minecraft.encode_packet(0x01, b"discopng")
# Bulk: after the stream, the sink answers with the byte count it received.
BYTE_COUNT = struct.Struct("!Q")


def login_handshake(name: str) -> bytes:
    """A Minecraft handshake asking to log in to ``name``, and its Login Start (as every
    client sends them together): routes, then forwards."""
    return minecraft.encode_handshake(
        PROTOCOL_VERSION, name, 25565, LOGIN
    ) + minecraft.encode_login_start("bench")


def status_request(name: str, protocol: int = PROTOCOL_VERSION) -> bytes:
    """Handshake (next state: status) plus the Status Request packet, as a client pings."""
    return minecraft.encode_handshake(protocol, name, 25565, STATUS) + minecraft.encode_packet(
        0x00, b""
    )


def client_hello(name: str = SNI_NAME) -> bytes:
    """A real TLS ClientHello with SNI ``name``, as Python's ``ssl`` sends it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the ServerHello
        tls.do_handshake()
    hello = outgoing.read()
    if not hello.startswith(b"\x16\x03"):
        raise RuntimeError(f"captured bytes are not a TLS handshake record: {hello[:8]!r}")
    return hello
