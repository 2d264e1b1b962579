"""Zero-downtime restart (``takeover_socket``, ``serve --take-over``): a real ``discoproxy
serve`` taken over by a second one on the same port while clients keep connecting. No
connection is refused or lost, the old process's open connection carries on until it
ends, then the old process exits; the new one serves on the same sockets (the same admin
port too) and listens on the takeover socket for the next restart."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.proxy.test_workers import ON, SOURCES, _Echo, dial, echoes, mc
from tests.support import running_proxy, serving


def _free_port() -> int:
    """A port free for TCP and UDP on every address, below the ephemeral range (a port
    picked by the kernel is free now but may be any client socket's a moment later)."""
    for _ in range(1000):
        port = random.randrange(20000, 32000)
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as sock:
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port in 20000-32000")


class _Clients(threading.Thread):
    """New connections one after another, each echoing a login (bounded)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for n in range(4000):
            if self.stop.is_set():
                return
            source = SOURCES[n % len(SOURCES)]
            try:
                with socket.socket() as sock:
                    sock.settimeout(5)
                    sock.bind((source, 0))
                    sock.connect(("127.0.0.1", self.port))
                    if echoes(sock):
                        self.ok += 1
                    else:
                        self.failed.append(f"{source}: no echo")
            except OSError as exc:
                self.failed.append(f"{source}: {exc}")
            time.sleep(0.002)


def _listening(port: int, udp: bool = False) -> set[int]:
    """Inodes of the sockets listening on ``port`` (TCP LISTEN, or UDP bound), from
    /proc/net: the same set before and after means the very same kernel sockets."""
    inodes = set()
    for table in ("udp", "udp6") if udp else ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if int(local.rsplit(":", 1)[1], 16) == port and state == ("07" if udp else "0A"):
                inodes.add(inode)
    return inodes


def _config(tmp_path: Path, workers: int) -> str:
    return (
        f'workers = {workers}\ntakeover_socket = "{tmp_path / "takeover.sock"}"\n'
        "shutdown_timeout = 20\n"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_takeover_restarts_without_refusing_or_cutting_a_connection(
    tmp_path: Path, workers: int
) -> None:
    port, tcp_port, udp_port = _free_port(), _free_port(), _free_port()
    config = _config(tmp_path, workers)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with serving(_Echo) as backend:
        servers = mc(backend)
        ports = f'["{tcp_port}:{backend}/tcp", "{udp_port}:9/udp"]'
        servers["ports.toml"] = f'addresses = ["127.0.0.1"]\nports = {ports}\n'
        bind = f"127.0.0.1:{port}"
        with running_proxy(tmp_path / "old", servers, config, bind=bind) as old:
            old.wait_for_line("takeover socket on", 15)
            old.wait_for_line(f"port {udp_port}/udp open", 15)
            old.wait_for_line(f"port {tcp_port}/tcp open", 15)
            admin = old.admin_url()
            sockets = {p: _listening(p) for p in (port, tcp_port)}
            sockets[udp_port] = _listening(udp_port, udp=True)
            assert all(len(inodes) == workers for inodes in sockets.values()), sockets
            held = [dial(old, ON[w][0]) for w in range(workers)]  # one on each data plane
            assert all(echoes(sock) for sock in held)
            clients = _Clients(port)
            clients.start()
            try:
                with running_proxy(
                    tmp_path / "new", servers, config, bind=bind, args=["--take-over"]
                ) as new:
                    old.wait_for_line("taken over by pid", 30)
                    new.wait_for_line("takeover socket on", 15)  # for the next restart
                    assert new.admin_url() == admin  # the same admin socket
                    assert all(echoes(sock, b"still here") for sock in held)  # not cut
                    assert old.process.poll() is None  # draining them
                    for sock in held:
                        sock.close()
                    assert old.process.wait(20) == 0
                    served_before = clients.ok
                    deadline = time.monotonic() + 10
                    while clients.ok < served_before + 20 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert clients.ok >= served_before + 20  # by the new one alone now
                    assert sockets == {  # the very same kernel sockets, not new ones
                        port: _listening(port),
                        tcp_port: _listening(tcp_port),
                        udp_port: _listening(udp_port, udp=True),
                    }
                    with socket.create_connection(("127.0.0.1", tcp_port), 5) as routed:
                        assert echoes(routed)  # the port route, through the new one
                    clients.stop.set()  # before the new one stops
                    clients.join(10)
                    assert "listening on 127.0.0.1:" in new.output()
            finally:
                clients.stop.set()
                clients.join(10)
            assert clients.failed[:5] == []
            assert clients.ok > 20


def test_a_takeover_with_another_worker_count_is_refused_and_the_old_one_serves_on(
    tmp_path: Path,
) -> None:
    port = _free_port()
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with serving(_Echo) as backend:
        servers = mc(backend)
        bind = f"127.0.0.1:{port}"
        with running_proxy(tmp_path / "old", servers, _config(tmp_path, 2), bind=bind) as old:
            old.wait_for_line("takeover socket on", 15)
            with pytest.raises(AssertionError, match="has 2 data planes and this one would"):
                with running_proxy(
                    tmp_path / "new", servers, _config(tmp_path, 1), bind=bind, args=["--take-over"]
                ):
                    pass
            with dial(old, SOURCES[0]) as sock:
                assert echoes(sock)
            assert old.process.poll() is None
            # the same with the right count takes it over
            with running_proxy(
                tmp_path / "new", servers, _config(tmp_path, 2), bind=bind, args=["--take-over"]
            ) as new:
                assert old.process.wait(20) == 0
                with dial(new, SOURCES[0]) as sock:
                    assert echoes(sock)


def test_a_new_process_that_dies_while_taking_over_leaves_the_old_one_serving(
    tmp_path: Path,
) -> None:
    port = _free_port()
    config = _config(tmp_path, 2)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with serving(_Echo) as backend:
        servers = mc(backend)
        bind = f"127.0.0.1:{port}"
        with running_proxy(tmp_path / "old", servers, config, bind=bind) as old:
            old.wait_for_line("takeover socket on", 15)
            before = _listening(port)
            new = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "discoproxy",
                    "serve",
                    "--config",
                    str(tmp_path / "old" / "discoproxy.toml"),
                    "--take-over",
                ],
                cwd=tmp_path / "new",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "DISCOPROXY_ADMIN__LISTEN": "127.0.0.1:0"},
            )
            try:
                old.wait_for_line("listening sockets handed over", 15)
                new.kill()  # before its workers are up: it never said ready
            finally:
                new.wait(10)
            old.wait_for_line("takeover abandoned, still serving", 15)
            assert old.process.poll() is None
            assert _listening(port) == before
            for source in SOURCES[:4]:
                with dial(old, source) as sock:
                    assert echoes(sock)
            assert "taken over by pid" not in old.output()
