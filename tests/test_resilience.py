"""``discoproxy serve`` when things go wrong around it (issue 7): a SIGTERM with hundreds
of connections open, running out of file descriptors, and backends that misbehave.

Every test runs the real process (``tests/support.py: running_proxy``) on loopback, and
every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from discoproxy.protocol import minecraft
from tests.support import ProxyProcess, running_proxy

PROTOCOL = 765
_RST = struct.pack("ii", 1, 0)
TIMEOUT_S = 5.0


def raise_nofile() -> None:
    """Hundreds of connections need more than a default soft limit of 1,024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def bad_lines(proxy: ProxyProcess) -> list[str]:
    return [line for line in proxy.lines if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]


def lines_matching(proxy: ProxyProcess, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [line for line in proxy.lines if regex.search(line)]


def reset(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    sock.close()


class Backend:
    """A loopback TCP server in one thread (a selector, not a thread per connection):
    ``on_data(conn, data)`` answers, by default an echo."""

    def __init__(self, on_data: Callable[[socket.socket, bytes], None] | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.on_data = on_data or (lambda conn, data: conn.sendall(data))
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="backend", daemon=True)

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    if key.fileobj is self.listener:
                        with suppress(BlockingIOError):
                            while True:
                                conn, _ = self.listener.accept()
                                conn.setblocking(True)
                                conn.settimeout(TIMEOUT_S)
                                self.accepted += 1
                                selector.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        with suppress(OSError):
                            self.on_data(conn, data)
                    if not data or conn.fileno() < 0:
                        with suppress(KeyError, ValueError):
                            selector.unregister(conn)
                        conn.close()
        finally:
            for key in list(selector.get_map().values()):
                if key.fileobj is not self.listener:
                    key.fileobj.close()  # type: ignore[union-attr]
            selector.close()

    def __enter__(self) -> Backend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT_S)
        self.listener.close()


def server_file(name: str, port: int) -> dict[str, str]:
    return {f"{name}.toml": f'domains = ["{name}.example.com"]\naddresses = ["127.0.0.1:{port}"]\n'}


def login(port: int, name: str = "mc", timeout: float = TIMEOUT_S) -> socket.socket:
    """A client whose Minecraft login handshake routes it to ``name``.example.com."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(
        minecraft.encode_handshake(PROTOCOL, f"{name}.example.com", 25565, 2)
        + minecraft.encode_login_start("tester")
    )
    return sock


def read_exactly(sock: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return received


def echo_login(port: int, name: str = "mc", timeout: float = TIMEOUT_S) -> socket.socket:
    """A login through the proxy to an echo backend, checked by one round trip."""
    sock = login(port, name, timeout)
    hello = minecraft.encode_handshake(
        PROTOCOL, f"{name}.example.com", 25565, 2
    ) + minecraft.encode_login_start("tester")
    assert read_exactly(sock, len(hello)) == hello
    assert roundtrip(sock, b"hello") == b"hello"
    return sock


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return read_exactly(sock, len(data))


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the other side closed (EOF or RST) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, OSError):
        return False
    return True


# -- SIGTERM with 500 connections open ---------------------------------------------------

OPEN = 500
FINISHING = 150  # closed by their clients during the grace period
SHUTDOWN_TIMEOUT_S = 3


def test_sigterm_with_500_connections_drains_then_closes_the_rest(tmp_path: Path) -> None:
    raise_nofile()  # 500 clients + 500 backend ends here, 1,000 fds in the proxy
    config = f"shutdown_timeout = {SHUTDOWN_TIMEOUT_S}\n"
    clients: list[socket.socket] = []
    with (
        Backend() as backend,
        running_proxy(tmp_path, server_file("mc", backend.port), config) as proxy,
    ):
        try:
            for _ in range(OPEN):
                clients.append(echo_login(proxy.port))
            finishing, staying = clients[:FINISHING], clients[FINISHING:]

            started = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            proxy.wait_for_line(rf"waiting up to {SHUTDOWN_TIMEOUT_S}\.0s for {OPEN} open")
            with pytest.raises(OSError):  # no new connections: refused, or reset at once
                login(proxy.port, timeout=1).recv(1)
            for sock in finishing:  # still forwarding during the grace, then done
                assert roundtrip(sock, b"bye") == b"bye"
                sock.close()
            assert roundtrip(staying[0], b"still here") == b"still here"

            code = proxy.process.wait(SHUTDOWN_TIMEOUT_S + 5)
            elapsed = time.monotonic() - started
            print(f"SIGTERM → exit {code} in {elapsed:.2f} s with {OPEN - FINISHING} still open")
            assert code == 0
            assert SHUTDOWN_TIMEOUT_S - 0.5 <= elapsed <= SHUTDOWN_TIMEOUT_S + 3, elapsed
            still_open = [sock for sock in staying if not closed_by_peer(sock, 2.0)]
            assert still_open == [], f"{len(still_open)} clients not closed by the proxy"
        finally:
            for sock in clients:
                reset(sock)
        proxy.wait_for_line("stopped")
        aborted = OPEN - FINISHING
        proxy.wait_for_line(rf"aborted {aborted} connections still open at shutdown_timeout")
        assert len(lines_matching(proxy, r"closed: .* reason=shutdown timeout$")) == aborted
        finished = lines_matching(proxy, r"closed: .* reason=(both sides closed|client closed)$")
        assert len(finished) == FINISHING, proxy.output()[-3000:]
        assert bad_lines(proxy) == []


# -- out of file descriptors --------------------------------------------------------------

FD_LIMIT = 64
FULL_WATCH_S = 2.0
FULL_CPU_LIMIT_S = 0.5


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the IPv4 listener on ``port`` (for a
    listening socket, /proc/net/tcp's rx_queue is the accept queue's length)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return int(queues.split(":")[1], 16)
    raise AssertionError(f"no listener on port {port}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_out_of_fds_backs_off_without_spinning_and_recovers(tmp_path: Path) -> None:
    """With every fd in use, accept fails (EMFILE) while connections wait in the kernel's
    backlog: each listener (a name listener and a port route's) rests
    ``ACCEPT_BACKOFF_S`` between tries instead of spinning on a socket that stays
    readable, says so in one rate-limited line, the connections already forwarded keep
    going, and both accept again once fds are free."""
    raise_nofile()
    routed = free_port()
    # held connections stay in the handshake phase for the whole test
    # one process (workers = 1): the fd limit set below is the pid's, who accepts
    config = 'workers = 1\nhandshake_timeout = 60\nport_routes_bind = "127.0.0.1"\n'
    held: list[socket.socket] = []
    with Backend() as backend:
        servers = {
            **server_file("mc", backend.port),
            "tcp.toml": f'addresses = ["127.0.0.1"]\nports = ["{routed}:{backend.port}/tcp"]\n',
        }
        with running_proxy(tmp_path, servers, config) as proxy:
            pid = proxy.process.pid
            proxy.wait_for_line(rf"port {routed}/tcp open for tcp@file")
            survivor = echo_login(proxy.port)  # established before the fds run out
            port_survivor = socket.create_connection(("127.0.0.1", routed), timeout=TIMEOUT_S)
            assert roundtrip(port_survivor, b"hello") == b"hello"
            baseline = open_fds(pid)
            assert baseline + 10 < FD_LIMIT, baseline
            # soft and hard: a proxy that raises its soft limit to the hard one stays at 64
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
            try:
                for _ in range(FD_LIMIT + 20):  # one fd each in the proxy; the rest wait
                    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT_S)
                    sock.sendall(b"\x10")  # a handshake's length: held until handshake_timeout
                    held.append(sock)
                line = proxy.wait_for_line(r"rejected .*accept failed on ")
                assert "Too many open files" in line
                assert open_fds(pid) == FD_LIMIT
                for _ in range(5):  # the port route's listener meets the same
                    held.append(socket.create_connection(("127.0.0.1", routed), timeout=TIMEOUT_S))
                deadline = time.monotonic() + TIMEOUT_S
                while accept_queue(routed) < 5 or accept_queue(proxy.port) < 10:
                    assert time.monotonic() < deadline, (accept_queue(routed), open_fds(pid))
                    time.sleep(0.05)

                before = cpu_seconds(pid)
                time.sleep(FULL_WATCH_S)
                busy = cpu_seconds(pid) - before
                print(f"out of fds: {busy:.3f} s of proxy CPU in {FULL_WATCH_S} s while full")
                assert busy < FULL_CPU_LIMIT_S, f"{busy:.2f} s of CPU in {FULL_WATCH_S} s, full"
                assert proxy.process.poll() is None
                # forwarded connections keep going (no new fd: a pooled pipe, or a copy)
                assert roundtrip(survivor, b"while full") == b"while full"
                assert roundtrip(port_survivor, b"while full") == b"while full"
                # both listeners still have connections waiting: neither accepted a thing
                assert accept_queue(routed) == 5 and accept_queue(proxy.port) >= 10
                # ~40 failed accepts by now, at most one line per listener (cause) per
                # REJECTION_LOG_INTERVAL_S (5 s)
                accept_lines = lines_matching(proxy, r"accept failed on ")
                assert 1 <= len(accept_lines) <= 2, accept_lines
            finally:
                for sock in held:
                    reset(sock)
            # recovery: the held connections go, new ones are routed as before
            deadline = time.monotonic() + 10
            while True:
                try:
                    fresh = echo_login(proxy.port, timeout=1)
                    break
                except (OSError, AssertionError):
                    assert time.monotonic() < deadline, proxy.output()[-3000:]
                    time.sleep(0.1)
            with fresh:
                assert roundtrip(fresh, b"routed again") == b"routed again"
            with socket.create_connection(("127.0.0.1", routed), timeout=TIMEOUT_S) as fresh:
                assert roundtrip(fresh, b"port route again") == b"port route again"
            with survivor, port_survivor:
                assert roundtrip(survivor, b"after") == b"after"
                assert roundtrip(port_survivor, b"after") == b"after"
            assert proxy.process.poll() is None
            assert bad_lines(proxy) == []
        assert proxy.process.returncode == 0


# -- backends that misbehave ------------------------------------------------------------

CONNECT_TIMEOUT_S = 1
IDLE_TIMEOUT_S = 2


@contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A port whose accept queue is full: further SYNs are dropped, a connect hangs."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers: list[socket.socket] = []
    port = listener.getsockname()[1]
    try:
        for _ in range(3):  # backlog 0 queues one; the rest stay in SYN_SENT
            filler = socket.socket()
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.2)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def resetting_backend() -> Backend:
    """Answers the first bytes, then dies with an RST (SO_LINGER 0)."""

    def on_data(conn: socket.socket, data: bytes) -> None:
        conn.sendall(b"partial answer")
        time.sleep(0.2)  # the proxy forwards it before the RST
        reset(conn)

    return Backend(on_data)


def silent_backend() -> Backend:
    """Accepts and reads, never answers."""
    return Backend(lambda conn, data: None)


class Watchdog:
    """A forwarded connection used all along: each round trip must work, one by one."""

    def __init__(self, port: int) -> None:
        self.sock = echo_login(port, "good")
        self.count = 0

    def check(self) -> None:
        self.count += 1
        data = f"round trip {self.count}".encode()
        assert roundtrip(self.sock, data) == data


def close_line(proxy: ProxyProcess, route: str) -> str:
    return proxy.wait_for_line(rf"closed: client=\S+ route={re.escape(route)} ", timeout=10)


def test_a_misbehaving_backend_costs_its_connection_only(tmp_path: Path) -> None:
    config = f"connect_timeout = {CONNECT_TIMEOUT_S}\nidle_timeout = {IDLE_TIMEOUT_S}\n"
    with (
        Backend() as good,
        silent_backend() as silent,
        resetting_backend() as dying,
        unaccepting_listener() as blackhole,
    ):
        servers = {
            **server_file("good", good.port),
            **server_file("silent", silent.port),
            **server_file("dying", dying.port),
            **server_file("blackhole", blackhole),
        }
        with running_proxy(tmp_path, servers, config) as proxy:
            watchdog = Watchdog(proxy.port)

            # never accepts: the dial times out, the player is told, nothing else notices
            started = time.monotonic()
            with login(proxy.port, "blackhole") as sock:
                watchdog.check()  # while that dial is pending
                answer = sock.recv(65536)
                elapsed = time.monotonic() - started
                assert closed_by_peer(sock, TIMEOUT_S)
            assert b"Server blackhole is unreachable" in answer
            assert CONNECT_TIMEOUT_S * 0.9 <= elapsed <= CONNECT_TIMEOUT_S * 1.25 + 1, elapsed
            line = proxy.wait_for_line(r"backend unreachable for blackhole@file")
            assert f"127.0.0.1:{blackhole}: timed out after {CONNECT_TIMEOUT_S}.0s" in line
            assert "reason=backend unreachable" in close_line(proxy, "blackhole@file")

            # dies mid-stream: what it sent arrives, then the client sees the close
            with login(proxy.port, "dying") as sock:
                hello = minecraft.encode_handshake(
                    PROTOCOL, "dying.example.com", 25565, 2
                ) + minecraft.encode_login_start("tester")
                assert read_exactly(sock, len(b"partial answer")) == b"partial answer"
                assert closed_by_peer(sock, TIMEOUT_S)
            assert dying.accepted == 1
            line = close_line(proxy, "dying@file")
            assert "reason=backend reset: Connection reset by peer" in line, line
            assert f"up={len(hello)}B down={len(b'partial answer')}B" in line, line
            watchdog.check()

            # accepts and never answers: only idle_timeout ends it; others keep going
            started = time.monotonic()
            with login(proxy.port, "silent") as sock:
                while time.monotonic() - started < IDLE_TIMEOUT_S - 0.5:
                    watchdog.check()  # keeps the watchdog itself from going idle
                    time.sleep(0.25)
                assert closed_by_peer(sock, IDLE_TIMEOUT_S * 1.25 + 2)
                elapsed = time.monotonic() - started
            assert IDLE_TIMEOUT_S <= elapsed <= IDLE_TIMEOUT_S * 1.25 + 1, elapsed
            assert silent.accepted == 1
            assert "reason=idle timeout" in close_line(proxy, "silent@file")

            watchdog.check()
            with echo_login(proxy.port, "good") as fresh:
                assert roundtrip(fresh, b"fresh") == b"fresh"
            watchdog.sock.close()
            close_line(proxy, "good@file")
            # exactly one close line per misbehaving connection
            for route in ("blackhole@file", "dying@file", "silent@file"):
                assert len(lines_matching(proxy, rf"route={re.escape(route)} ")) == 1
            assert bad_lines(proxy) == []
