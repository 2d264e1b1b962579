"""Zero-downtime restart (``takeover_socket``, ``serve --take-over``): a real ``discoproxy
serve`` taken over by a second one on the same port while clients keep connecting. No
connection is refused or lost, the old process's open connection carries on until it
ends, then the old process exits; the new one serves on the same sockets (the same admin
port too) and listens on the takeover socket for the next restart."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.proxy.test_workers import ON, SOURCES, _Echo, dial, echoes, mc
from tests.support import running_proxy, serving


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def _config(tmp_path: Path, workers: int) -> str:
    return (
        f'workers = {workers}\ntakeover_socket = "{tmp_path / "takeover.sock"}"\n'
        "shutdown_timeout = 20\n"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_takeover_restarts_without_refusing_or_cutting_a_connection(
    tmp_path: Path, workers: int
) -> None:
    port = _free_port()
    config = _config(tmp_path, workers)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with serving(_Echo) as backend:
        servers = mc(backend)
        bind = f"127.0.0.1:{port}"
        with running_proxy(tmp_path / "old", servers, config, bind=bind) as old:
            old.wait_for_line("takeover socket on", 15)
            admin = old.admin_url()
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
