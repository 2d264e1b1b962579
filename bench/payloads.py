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
BULK_NAME = "bulk.bench.example.com"
ECHO_NAME = "echo.bench.example.com"
STATUS_NAME = "status.bench.example.com"

PROTOCOL_VERSION = 765  # Minecraft 1.20.4
LOGIN = 2
STATUS = 1

# What the reply backend answers to the first bytes of any connection: a realistic
# server-list status response (about 150 bytes), for SNI and Minecraft alike.
REPLY = minecraft.encode_status_response(
    minecraft.status_json("benchmark backend", version_name="1.20.4", protocol=PROTOCOL_VERSION)
)
# Bulk: after the stream, the sink answers with the byte count it received.
BYTE_COUNT = struct.Struct("!Q")


def login_handshake(name: str) -> bytes:
    """A Minecraft handshake asking to log in to ``name``: routes, then forwards."""
    return minecraft.encode_handshake(PROTOCOL_VERSION, name, 25565, LOGIN)


def status_request(name: str) -> bytes:
    """Handshake (next state: status) plus the Status Request packet, as a client pings."""
    return minecraft.encode_handshake(
        PROTOCOL_VERSION, name, 25565, STATUS
    ) + minecraft.encode_packet(0x00, b"")


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
