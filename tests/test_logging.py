"""Logging never blocks the proxy: a stalled stderr costs log lines, not connections."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from discoproxy.logwriter import LogWriter
from discoproxy.protocol import minecraft
from tests.proxy.helpers import handshake
from tests.test_serve import connect, roundtrip

# Close lines are about 150 bytes: this many fill a 64 KiB pipe several times over.
CONNECTIONS = 1500


class _StalledStream(io.StringIO):
    """A stream whose write blocks until released, as a pipe nobody reads does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_put_never_blocks_and_counts_what_a_stalled_stream_drops() -> None:
    stream = _StalledStream()
    out = LogWriter(lambda: stream, max_queued=100)
    started = time.monotonic()
    for i in range(1000):
        out.put(f"line {i}\n")
    assert time.monotonic() - started < 5  # a generous bound: blocking would be 10 s a write
    # the writer thread took at most one batch before stalling; the queue held 100
    assert 1000 - 100 - 256 <= out.dropped <= 1000 - 100
    stream.release.set()
    assert out.close(timeout=5)
    written = stream.getvalue().splitlines()
    assert len(written) == 1000 - out.dropped
    assert written[0] == "line 0"


def test_close_writes_what_is_queued() -> None:
    stream = io.StringIO()
    out = LogWriter(lambda: stream)
    for i in range(10):
        out.put(f"{i}\n")
    assert out.close()
    assert stream.getvalue() == "".join(f"{i}\n" for i in range(10))
    out.put("again\n")  # a writer closed at exit still takes lines (a new thread)
    assert out.close()
    assert stream.getvalue().endswith("again\n")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _echo_backend() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _round_trip(port: int, payload: bytes) -> bytes:
    with connect(port) as sock:
        return roundtrip(sock, payload)


def _status_ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(handshake("nobody.example.com", next_state=1) + b"\x01\x00")
        return sock.recv(65536)


def test_serve_with_a_stderr_nobody_reads_still_forwards_and_answers(tmp_path: Path) -> None:
    port, admin = _free_port(), _free_port()
    with _echo_backend() as backend:
        servers = tmp_path / "servers"
        servers.mkdir()
        (servers / "echo.toml").write_text(
            f'domains = ["echo.test"]\naddresses = ["127.0.0.1:{backend}"]\n'
        )
        config = tmp_path / "discoproxy.toml"
        config.write_text(
            textwrap.dedent(f"""\
                bind = ["127.0.0.1:{port}"]
                servers_dir = "{servers}"
                log_level = "DEBUG"
                [admin]
                listen = "127.0.0.1:{admin}"
                """)
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "discoproxy", "serve", "--config", str(config)],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,  # neither pipe is ever read: both fill up and stall
            stderr=subprocess.PIPE,
            env={**os.environ, "NO_COLOR": "1"},
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert process.poll() is None, "discoproxy exited"
                    assert time.monotonic() < deadline, "discoproxy did not start listening"
                    time.sleep(0.05)
            request = b"GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n"
            for i in range(CONNECTIONS):
                assert _round_trip(port, request) == request, f"connection {i}"
                if i % 100 == 0:  # the reactor answers unknown-name pings itself
                    packet = minecraft.parse_packet(_status_ping(port))
                    assert isinstance(packet, minecraft.Packet), f"ping after {i}"
                    assert packet.packet_id == 0, f"ping after {i}"
            # the loop serves the admin API although its log lines cannot be written either
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=5) as r:
                assert r.status == 200
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)  # the shutdown itself must not hang on the stalled pipe
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError("discoproxy did not exit on SIGTERM") from None
