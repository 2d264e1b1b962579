"""SIGHUP (and ``POST /api/reload``) reload the global config of a running ``discoproxy
serve`` (issue 9): listeners open and close live, other settings apply to new
connections, open connections carry on, and a bad file changes nothing."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from contextlib import suppress
from pathlib import Path

import pytest

from discoproxy.protocol import minecraft
from tests.support import running_proxy
from tests.test_serve import echo_server, mc_server, roundtrip

RELOAD_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def joined(port: int) -> socket.socket:
    """A connection routed to the echo server (its handshake echoed back)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    handshake = minecraft.encode_handshake(
        765, "mc.example.com", port, 2
    ) + minecraft.encode_login_start("tester")
    assert roundtrip(sock, handshake) == handshake
    return sock


def rewrite(tmp_path: Path, text: str) -> None:
    servers = tmp_path / "servers"
    (tmp_path / "discoproxy.toml").write_text(f'servers_dir = "{servers}"\n{text}')


def test_sighup_opens_and_closes_listeners_and_applies_settings(tmp_path: Path) -> None:
    with echo_server() as echo, running_proxy(tmp_path, mc_server(echo)) as proxy:
        old_port = proxy.port
        before = joined(old_port)
        new_port = free_port()
        rewrite(tmp_path, f'bind = ["127.0.0.1:{new_port}"]\nidle_timeout = 300\n')
        proxy.process.send_signal(signal.SIGHUP)
        line = proxy.wait_for_line(r"config reloaded: ", RELOAD_TIMEOUT_S)
        assert "1 listeners (1 opened, 1 closed)" in line
        proxy.wait_for_line(rf"listening on 127\.0\.0\.1:{new_port}")
        proxy.wait_for_line(rf"stopped listening on 127\.0\.0\.1:{old_port}")

        with joined(new_port) as after:
            assert roundtrip(after, b"new") == b"new"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old_port), timeout=5).close()
        with before:  # accepted by the closed listener: still forwarding
            assert roundtrip(before, b"still here") == b"still here"

        # a guard setting applies to new connections at once; open ones are not touched
        rewrite(
            tmp_path,
            f'bind = ["127.0.0.1:{new_port}"]\n[ip_filter]\ndeny = ["127.0.0.0/8"]\n',
        )
        with joined(new_port) as open_one:
            proxy.process.send_signal(signal.SIGHUP)
            proxy.wait_for_line(r"0 opened, 0 closed", RELOAD_TIMEOUT_S)
            refused = socket.create_connection(("127.0.0.1", new_port), timeout=5)
            with refused:
                refused.sendall(
                    minecraft.encode_handshake(765, "mc.example.com", new_port, 2)
                    + minecraft.encode_login_start("tester")
                )
                # denied: closed without a reply (a reset: its handshake was unread)
                with suppress(ConnectionResetError):
                    assert refused.recv(100) == b""
            assert roundtrip(open_one, b"ok") == b"ok"
        proxy.wait_for_line(r"rejected 127\.0\.0\.1:\d+: denied by ip_filter")


def test_a_bad_reload_keeps_everything_and_restart_only_keys_are_named(tmp_path: Path) -> None:
    config = "[admin]\nread_only = false\n"
    with echo_server() as echo, running_proxy(tmp_path, mc_server(echo), config) as proxy:
        port = proxy.port
        rewrite(tmp_path, f'bind = ["127.0.0.1:{port}"]\nmax_conections = 3\n')
        proxy.process.send_signal(signal.SIGHUP)
        line = proxy.wait_for_line(r"config reload failed", RELOAD_TIMEOUT_S)
        assert "max_conections: unknown key (did you mean 'max_connections'?)" in line
        with joined(port) as sock:
            assert roundtrip(sock, b"x") == b"x"

        # through the API (admin.read_only = false), and a key that needs a restart
        rewrite(
            tmp_path,
            f'bind = ["127.0.0.1:{port}"]\nbans_file = "other.json"\n[admin]\nread_only = false\n',
        )
        request = urllib.request.Request(proxy.admin_url() + "/api/reload", method="POST")
        with urllib.request.urlopen(request, data=b"", timeout=RELOAD_TIMEOUT_S) as response:
            result = json.loads(response.read())["result"]
        assert result == (
            "reloaded; not applied: bans_file changed: it takes effect at the next restart"
        )
        proxy.wait_for_line(r"config reload: bans_file changed")
        with joined(port) as sock:
            assert roundtrip(sock, b"y") == b"y"


def test_a_rotated_token_file_is_named_as_needing_a_restart(tmp_path: Path) -> None:
    """The admin listener keeps the token it started with; a reload that finds the file
    rotated says so instead of passing for applied."""
    token_file = tmp_path / "token"
    token_file.write_text("old-token\n")
    config = f'[admin]\nread_only = false\ntoken_file = "{token_file}"\n'
    with echo_server() as echo, running_proxy(tmp_path, mc_server(echo), config) as proxy:
        url = proxy.admin_url()
        token_file.write_text("new-token\n")
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_line(
            r"config reload: admin.token_file changed: the new token takes effect at the next "
            r"restart",
            RELOAD_TIMEOUT_S,
        )
        request = urllib.request.Request(
            url + "/api/routes", headers={"Authorization": "Bearer old-token"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # still the one in force
            assert response.status == 200


def test_a_reload_whose_provider_table_would_not_start_fails_whole(tmp_path: Path) -> None:
    """A reload applies no provider table (they need a restart), but a file that
    `serve` and `check` refuse for one is refused by a reload too, not reported as
    reloaded with the change merely not applied."""
    with echo_server() as echo, running_proxy(tmp_path, mc_server(echo)) as proxy:
        port = proxy.port
        rewrite(tmp_path, f'bind = ["127.0.0.1:{port}"]\n[providers.api]\nbogus = 1\n')
        proxy.process.send_signal(signal.SIGHUP)
        line = proxy.wait_for_line(r"config reload failed", RELOAD_TIMEOUT_S)
        assert "providers.api.bogus: unknown key" in line
        assert "takes effect at the next restart" not in proxy.output()
        with joined(port) as sock:
            assert roundtrip(sock, b"x") == b"x"
