"""``discoproxy serve`` as a real process: startup, close log lines, graceful shutdown."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from discoproxy.cli import EXIT_START
from discoproxy.protocol import minecraft
from discoproxy.proxy.listener import ListenError
from tests.support import running_proxy, serving, write_servers


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@contextmanager
def echo_server() -> Iterator[int]:
    with serving(_Echo) as port:
        yield port


def mc_server(port: int) -> dict[str, str]:
    return {"mc.toml": f'domains = ["mc.example.com"]\naddresses = ["127.0.0.1:{port}"]\n'}


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_close_line_tells_what_happened(tmp_path: Path) -> None:
    with echo_server() as port, running_proxy(tmp_path, mc_server(port)) as proxy:
        sock = connect(proxy.port)
        hello = minecraft.encode_handshake(
            765, "mc.example.com", 25565, 2
        ) + minecraft.encode_login_start("tester")
        assert roundtrip(sock, hello + b"x" * 100) == hello + b"x" * 100
        client_port = sock.getsockname()[1]
        sock.close()
        line = proxy.wait_for_line(r"conn #1 closed")
    assert f"client=127.0.0.1:{client_port}" in line
    assert "route=mc@file" in line
    assert f"backend=127.0.0.1:{port}" in line
    assert f"up={len(hello) + 100}B down={len(hello) + 100}B" in line
    assert "reason=" in line


def test_json_log_format_carries_the_fields(tmp_path: Path) -> None:
    with (
        echo_server() as port,
        running_proxy(tmp_path, mc_server(port), config='log_format = "json"\n') as proxy,
    ):
        sock = connect(proxy.port)
        hello = minecraft.encode_handshake(
            765, "mc.example.com", 25565, 2
        ) + minecraft.encode_login_start("tester")
        roundtrip(sock, hello)
        sock.close()
        line = proxy.wait_for_line(r'"conn #1 closed')
    extra = json.loads(line)["record"]["extra"]
    assert extra["route"] == "mc@file"
    assert extra["bytes_up"] == len(hello)
    assert extra["backend"] == f"127.0.0.1:{port}"


def test_sigterm_stops_accepting_and_lets_open_connections_finish(tmp_path: Path) -> None:
    with (
        echo_server() as port,
        running_proxy(tmp_path, mc_server(port), config="shutdown_timeout = 10\n") as proxy,
    ):
        sock = connect(proxy.port)
        hello = minecraft.encode_handshake(
            765, "mc.example.com", 25565, 2
        ) + minecraft.encode_login_start("tester")
        assert roundtrip(sock, hello) == hello
        proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_line("SIGTERM received")
        proxy.wait_for_line("waiting up to 10.0s for 1 open connections")
        with pytest.raises(OSError):
            connect(proxy.port).recv(1)  # refused, or reset at once
        assert roundtrip(sock, b"still forwarding") == b"still forwarding"
        sock.close()
        assert proxy.process.wait(10) == 0


def test_shutdown_timeout_aborts_connections_left_open(tmp_path: Path) -> None:
    with (
        echo_server() as port,
        running_proxy(tmp_path, mc_server(port), config="shutdown_timeout = 0.5\n") as proxy,
    ):
        sock = connect(proxy.port)
        hello = minecraft.encode_handshake(
            765, "mc.example.com", 25565, 2
        ) + minecraft.encode_login_start("tester")
        roundtrip(sock, hello)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(10) == 0
        proxy.wait_for_line("aborted 1 connections still open at shutdown_timeout")
        sock.settimeout(5)
        with suppress(ConnectionResetError):
            assert sock.recv(1) == b""


def serve_until_it_exits(tmp_path: Path, bind: str, admin_listen: str) -> tuple[int, str]:
    """Run ``discoproxy serve`` that cannot start to its end: its exit code and stderr."""
    servers_dir = write_servers(tmp_path / "servers", {})
    config = tmp_path / "discoproxy.toml"
    config.write_text(
        f'bind = ["{bind}"]\nservers_dir = "{servers_dir}"\n[admin]\nlisten = "{admin_listen}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOPROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "discoproxy", "serve", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "NO_COLOR": "1"},
    )
    return result.returncode, result.stderr


def assert_one_error_line(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    assert "ExceptionGroup" not in stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr
    assert errors[0].split(" ERROR ", 1)[1].strip() == message


def test_game_port_in_use_is_one_line_and_the_start_failure_code(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the user's own server already on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = serve_until_it_exits(tmp_path, f"127.0.0.1:{port}", "127.0.0.1:0")
    assert code == EXIT_START == 3
    assert_one_error_line(
        stderr,
        f"cannot listen on 127.0.0.1:{port}: address already in use — is a server already "
        'running there? set bind = ["host:port"] (or serve --bind host:port) to listen '
        "elsewhere",
    )


def test_admin_port_in_use_is_one_line_and_the_start_failure_code(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = serve_until_it_exits(tmp_path, "127.0.0.1:0", f"127.0.0.1:{port}")
    assert code == EXIT_START
    assert_one_error_line(
        stderr,
        f"cannot listen on 127.0.0.1:{port} (admin): address already in use — is a server "
        'already running there? set admin.listen = "host:port" to listen elsewhere, or "" '
        "to turn the admin listener off",
    )


@pytest.mark.parametrize(
    ("error", "port", "said"),
    [
        (
            errno.EACCES,
            80,
            "permission denied — ports below 1024 need root or CAP_NET_BIND_SERVICE;",
        ),
        (
            errno.EADDRNOTAVAIL,
            25565,
            "cannot assign requested address — is that an address of this machine?",
        ),
        (errno.EACCES, 25565, "permission denied;"),
    ],
)
def test_listen_error_says_what_is_likely_behind_it(error: int, port: int, said: str) -> None:
    cause = OSError(error, os.strerror(error))
    where = f"10.0.0.1:{port}"
    failure = ListenError(where, port, 'bind = ["host:port"]', cause)
    assert str(failure) == f'cannot listen on {where}: {said} set bind = ["host:port"]'


def test_port_routes_follow_server_files_and_open_connections_survive(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = 'port_routes_bind = "127.0.0.1"\n'
    with echo_server() as backend, running_proxy(tmp_path, {}, config) as proxy:
        server_file = tmp_path / "servers" / "smtp.toml"
        server_file.write_text(f'addresses = ["127.0.0.1"]\nports = ["{port}:{backend}/tcp"]\n')
        proxy.wait_for_line(rf"port {port}/tcp open for smtp@file")
        with connect(port) as sock:
            assert roundtrip(sock, b"through the port route") == b"through the port route"
            server_file.unlink()
            proxy.wait_for_line(rf"port {port}/tcp closed: no route claims it")
            deadline = time.monotonic() + 5  # the reactor closes it a moment after the log
            while True:
                try:
                    connect(port).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, "the port still accepts"
                time.sleep(0.02)
            assert roundtrip(sock, b"still open") == b"still open"
        server_file.write_text(f'addresses = ["127.0.0.1"]\nports = ["{port}:{backend}/tcp"]\n')
        deadline = time.monotonic() + 5
        while True:  # open again
            try:
                sock = connect(port)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, proxy.output()
                time.sleep(0.02)
        with sock:
            assert roundtrip(sock, b"back") == b"back"
