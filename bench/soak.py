"""Soak: everything at once for a long while, then did anything leak, break or corrupt?

    uv run python -m bench soak --minutes 30     # the real one (not in CI)
    uv run python -m bench soak --minutes 2      # what CI runs (integration/test_soak.py)

One ``discoproxy serve`` (the bench's own target: bench/targets.py) with the bench
backends, driven by bounded load loops that each stop at the deadline: Minecraft logins
(handshake + Login Start, then bytes echoed back and compared) and status pings (cached
and uncached), TLS routed by SNI and TLS terminated here, HTTP routed by Host, UDP
datagrams through a port route, and bulk transfers checked by SHA-256 — while a server
file is written and removed every second (churn), containers labelled for a name start
and stop in turn (each must be routed, serve logins, then be unrouted: the Docker
provider's churn, when an engine answers), and the proxy gets a SIGHUP every 10 s.

Every minute (every 10 s when the run is short) it samples the proxy's RSS and open fds
from /proc and prints them; at the end, their slope after warm-up (the first third),
connections served and failed by cause, and bytes verified. It passes (exit 0) when
nothing failed or came back corrupted and RSS and fds are flat after warm-up (their
slope times the minutes measured within ``RSS_GROWTH_MAX_KIB`` and ``FD_GROWTH_MAX``,
what in-flight connections explain: over 30 minutes that is about 200 KiB and 1.2 fds a
minute), else exit 1 with the reasons.

The proxy runs ``workers = 2`` (issue 20): the numbers above are per process (the
control plane and each worker) and summed, and halfway through one worker is killed
(SIGKILL). The connections it had fail, and so may the new ones its clients open
before its replacement accepts: failures within ``KILL_WINDOW_S`` of the kill are
counted apart, as explained by it; the run then checks that the worker came back.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import status_ping, tls_check
from bench.payloads import (
    ECHO_NAME,
    PING_CACHED_NAME,
    PING_UNCACHED_NAME,
    REPLY,
    SNI_NAME,
    TLS_NAME,
    TLS_REQUEST,
    client_hello,
    status_request,
)
from bench.targets import Discoproxy, make_certificate
from discoproxy.protocol import minecraft
from discoproxy.proxy.steering import steer_index

HTTP_NAME = "http.soak.example.com"
CHURN_NAME = "churn.soak.example.com"
# Flat after warm-up: the slope times the minutes measured (the growth it stands for)
# within what in-flight connections explain. About ten loops each hold a connection or
# two (two fds each through the proxy), and the allocator keeps a few MiB in play.
FD_GROWTH_MAX = 24
RSS_GROWTH_MAX_KIB = 4096.0
SOCKET_TIMEOUT_S = 10.0
BULK_BYTES = 1 << 20
PAUSE_S = 0.005  # between one loop's connections: a steady load, not a flood
WORKERS = int(os.environ.get("SOAK_WORKERS", "2"))
# failures this soon after the worker was killed are its (a restart takes ~0.5 s, and a
# connection in flight then may wait out a socket timeout)
KILL_WINDOW_S = SOCKET_TIMEOUT_S + 2


@dataclass
class Tally:
    served: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    explained: collections.Counter[str] = field(default_factory=collections.Counter)
    verified_bytes: int = 0
    killed_at: float | None = None
    # the killed worker's index (None: unknown, every failure in the window is its)
    killed_index: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str, verified: int = 0) -> None:
        with self.lock:
            self.served[kind] += 1
            self.verified_bytes += verified

    def fail(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            cause = f"{kind}: {type(exc).__name__}: {str(exc)[:80]}"
            killed = self.killed_at
            source = getattr(_turn, "source", None)  # this thread's last client address
            its = (
                self.killed_index is None
                or source is None
                or steer_index(source, WORKERS) == self.killed_index
            )
            if killed is not None and time.monotonic() - killed < KILL_WINDOW_S and its:
                self.explained[cause] += 1
            else:
                self.failed[cause] += 1


def _exchange(port: int, data: bytes, expect: int) -> bytes:
    """Send ``data``, read ``expect`` bytes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(data)
        got = bytearray()
        while len(got) < expect:
            chunk = sock.recv(min(65536, expect - len(got)))
            if not chunk:
                break
            got += chunk
        return bytes(got)


def _login(port: int) -> int:
    """A Minecraft login to the echo backend: the same bytes must come back."""
    name = f"p{random.randrange(10_000)}"
    hello = minecraft.encode_handshake(765, ECHO_NAME, 25565, 2)
    hello += minecraft.encode_login_start(name) + os.urandom(200)
    if _exchange(port, hello, len(hello)) != hello:
        raise RuntimeError("login bytes came back changed")
    return len(hello)


def _sni(port: int) -> int:
    if _exchange(port, client_hello(SNI_NAME), len(REPLY)) != REPLY:
        raise RuntimeError("SNI reply differs")
    return len(REPLY)


def _http(port: int) -> int:
    request = f"GET /{random.randrange(10**6)} HTTP/1.1\r\nHost: {HTTP_NAME}\r\n\r\n".encode()
    if _exchange(port, request, len(request)) != request:
        raise RuntimeError("HTTP request came back changed")
    return len(request)


def _bulk(port: int) -> int:
    """1 MiB through the echo route, compared by SHA-256."""
    payload = os.urandom(BULK_BYTES)
    prefix = minecraft.encode_handshake(765, ECHO_NAME, 25565, 2)
    prefix += minecraft.encode_login_start("bulk")
    sent = prefix + payload
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        reader_digest = hashlib.sha256()
        received = 0

        def read() -> None:
            nonlocal received
            while received < len(sent):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reader_digest.update(chunk)
                received += len(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(sent)
        reader.join(SOCKET_TIMEOUT_S * 3)
    if received != len(sent) or reader_digest.digest() != hashlib.sha256(sent).digest():
        raise RuntimeError(f"bulk: {received} of {len(sent)} bytes, or their checksum differs")
    return len(payload)


UDP_CLIENTS = 8  # client sockets taken in turn: 8 sessions, as 8 players would keep


def _udp_factory(port: int) -> Callable[[int], int]:
    clients = []
    for n in range(UDP_CLIENTS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(2)
        sock.bind((SOURCES[n % len(SOURCES)], 0))  # sessions on every worker
        _turn.source = SOURCES[n % len(SOURCES)]
        sock.connect(("127.0.0.1", port))
        clients.append(sock)
    turn = iter(range(1 << 62))

    def udp(_: int) -> int:
        sock = clients[next(turn) % UDP_CLIENTS]
        payload = os.urandom(64)
        sock.send(payload)
        while (got := sock.recv(256)) != payload:  # a late answer to a timed-out one
            if len(got) != len(payload):
                raise RuntimeError("UDP datagram came back changed")
        return len(payload)

    return udp


def _ping_factory(name: str) -> Callable[[int], int]:
    request = status_request(name)

    def ping(port: int) -> int:
        status_ping(port, request)
        return 0

    return ping


# Client addresses, taken in turn by each connection (workers = N steers a client IP to
# one worker: from 127.0.0.1 alone one worker would serve everything).
SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 10))
_turn = threading.local()
_create_connection = socket.create_connection


def _from_sources(address: Any, timeout: Any = None, source_address: Any = None, **kw: Any) -> Any:
    """``socket.create_connection`` from the next of ``SOURCES`` (this process only)."""
    if source_address is None and address[0] == "127.0.0.1":
        n = getattr(_turn, "n", 0)
        _turn.n = n + 1
        source_address = (SOURCES[n % len(SOURCES)], 0)
        _turn.source = source_address[0]  # whose worker a failure blames (Tally.fail)
    return _create_connection(address, timeout, source_address, **kw)


def _loop(kind: str, work: Callable[[int], int], port: int, until: float, tally: Tally) -> None:
    _turn.n = hash(kind) % len(SOURCES)  # loops start on different addresses
    while time.monotonic() < until:
        try:
            tally.ok(kind, work(port))
        except (OSError, RuntimeError, ValueError) as exc:
            tally.fail(kind, exc)
        time.sleep(PAUSE_S)


def _churn(servers: Path, backend: int, port: int, until: float, tally: Tally) -> None:
    """A server file written and removed every second, the file provider's churn: while
    it is there its name must route (a login echoes), once removed it must not."""
    path = servers / "churn.toml"
    while time.monotonic() < until:
        path.write_text(f'domains = ["{CHURN_NAME}"]\naddresses = ["127.0.0.1:{backend}"]\n')
        if not _churn_routed_within(port, True):
            tally.failed["file churn: a written server file was not routed in time"] += 1
        path.unlink(missing_ok=True)
        if not _churn_routed_within(port, False):
            tally.failed["file churn: a removed server file was still routed"] += 1
        else:
            tally.ok("churn")


CHURN_WAIT_S = 5.0  # the file provider applies a change well within this


def _churn_routed_within(port: int, routed: bool) -> bool:
    """Whether a login to ``CHURN_NAME`` echoes (``routed``) or is refused within
    ``CHURN_WAIT_S``."""
    deadline = time.monotonic() + CHURN_WAIT_S
    while True:
        hello = minecraft.encode_handshake(765, CHURN_NAME, 25565, 2)
        hello += minecraft.encode_login_start("churn") + b"churn-check"
        try:
            answer = _exchange(port, hello, len(hello))
        except OSError:
            answer = b""
        if (answer == hello) is routed:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


DOCKER_NAME = "docker.soak.example.com"
CONTAINER_UP_S = 3.0  # logins to a started container for this long, then it stops
CONTAINER_WAIT_S = 20.0  # a started container must be routed within this (stopped: gone)


def _docker_login(port: int) -> bytes:
    """A login to the churned container: it answers its name (then echoes)."""
    hello = minecraft.encode_handshake(765, DOCKER_NAME, 25565, 2)
    hello += minecraft.encode_login_start("churner")
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(hello)
        return sock.recv(256)


def _container_churn(port: int, until: float, tally: Tally) -> None:
    """Containers started and stopped in turn (the Docker provider's churn): each must
    be routed by its label within CONTAINER_WAIT_S, serve logins while it runs, and be
    unrouted once stopped. Needs a Docker engine; without one it says so and does
    nothing (the CI soak has one, and its test checks this loop served)."""
    from integration.docker_support import (
        BACKEND_SCRIPT,
        HOST_MOUNTS,
        PYTHON,
        docker_client,
        ensure_image,
    )

    client = docker_client()
    if client is None:
        print("container churn: no Docker engine answers; not churning containers")
        return
    image = ensure_image(client)
    turn = 0
    while time.monotonic() < until - CONTAINER_WAIT_S:
        turn += 1
        name = f"discoproxy-soak-{os.getpid()}-{turn}"
        container = client.containers.run(
            image,
            [PYTHON, "-c", BACKEND_SCRIPT],
            name=name,
            environment={"NAME": name},
            labels={"infrarust.domains": DOCKER_NAME},
            volumes=HOST_MOUNTS,
            detach=True,
        )
        try:
            if not _routed_within(port, name, True):
                tally.failed[f"container churn: {name} not routed in time"] += 1
            else:
                tally.ok("container up")
                serving_until = time.monotonic() + CONTAINER_UP_S
                while time.monotonic() < serving_until:
                    try:
                        if not _docker_login(port).startswith(name.encode()):
                            raise RuntimeError("a login reached another backend")
                        tally.ok("container login")
                    except (OSError, RuntimeError) as exc:
                        tally.fail("container login", exc)
                    time.sleep(0.05)
        finally:
            container.remove(force=True)
        if not _routed_within(port, name, False):  # gone once the provider hears it stop
            tally.failed[f"container churn: {name} still routed after it stopped"] += 1
        else:
            tally.ok("container churn")


def _routed_within(port: int, name: str, routed: bool) -> bool:
    """Whether logins reach (``routed``) or stop reaching container ``name`` within
    ``CONTAINER_WAIT_S``."""
    deadline = time.monotonic() + CONTAINER_WAIT_S
    while True:
        try:
            answers = _docker_login(port).startswith(name.encode())
        except OSError:
            answers = False
        if answers is routed:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _sighup(pid: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        time.sleep(10)
        if time.monotonic() < until:
            os.kill(pid, signal.SIGHUP)
            tally.ok("sighup")


def _children(pid: int) -> list[int]:
    """The control plane's child processes: its workers."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _kill_worker(pid: int, at: float, tally: Tally) -> None:
    """SIGKILL the last worker at ``at`` (monotonic), once."""
    time.sleep(max(0.0, at - time.monotonic()))
    workers = _children(pid)
    if not workers:
        tally.failed["kill worker: no worker process found"] += 1
        return
    with tally.lock:
        tally.killed_at = time.monotonic()
        # children are listed in the order they were started: with none restarted yet,
        # the last is the worker of index N - 1 (its clients are the ones it may fail)
        tally.killed_index = WORKERS - 1 if len(workers) == WORKERS else None
    os.kill(workers[-1], signal.SIGKILL)
    print(f"killed worker pid {workers[-1]}", flush=True)


def _sample_all(pid: int) -> list[tuple[int, float, int]]:
    """(pid, RSS KiB, open fds) of the control plane and each worker."""
    out = []
    for each in [pid, *_children(pid)]:
        try:
            out.append((each, *_sample(each)))
        except OSError:  # a worker that just died
            continue
    return out


def _sample(pid: int) -> tuple[float, int]:
    """(RSS KiB, open fds) of ``pid`` from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = float(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _growth(per_pid: dict[int, list[tuple[float, float, int]]]) -> list[str]:
    """Each process's RSS and fd slopes after its own warm-up (the first third of the
    time it was sampled: a worker started halfway warms up then); what grows too much."""
    problems = []
    print()
    for pid, samples in per_pid.items():
        first, last = samples[0][0], samples[-1][0]
        warm = [s for s in samples if s[0] >= first + (last - first) / 3]
        if len(warm) < 3:
            print(f"pid {pid}: {len(samples)} samples, too few to judge its slope")
            continue
        rss_slope = _slope([(t, r) for t, r, _ in warm])
        fd_slope = _slope([(t, f) for t, _, f in warm])
        measured = (warm[-1][0] - warm[0][0]) / 60
        print(
            f"pid {pid} after warm-up: RSS {rss_slope:+.1f} KiB/min, fds {fd_slope:+.2f}/min "
            f"over {measured:.1f} min"
        )
        if rss_slope * measured > RSS_GROWTH_MAX_KIB:
            problems.append(
                f"pid {pid}: RSS grows {rss_slope:.0f} KiB/min over {measured:.1f} min "
                f"(at most {RSS_GROWTH_MAX_KIB:g} KiB in all)"
            )
        if fd_slope * measured > FD_GROWTH_MAX:
            problems.append(
                f"pid {pid}: fds grow {fd_slope:.2f}/min over {measured:.1f} min "
                f"(at most {FD_GROWTH_MAX} in all)"
            )
    return problems


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per minute) of (seconds, value) points."""
    if len(points) < 2:
        return 0.0
    xs = [x / 60 for x, _ in points]
    ys = [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def run(minutes: float) -> int:
    from bench.__main__ import start_backends  # the bench's own wiring

    socket.create_connection = _from_sources
    duration = minutes * 60
    every = 60.0 if minutes >= 5 else 10.0
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="discoproxy-soak-") as tmp:
        workdir = Path(tmp)
        backends, ports = start_backends(workdir, None)
        try:
            made = make_certificate(workdir)
            certificate = None if isinstance(made, str) else made
            proxy = Discoproxy(ports, workdir, None, "WARNING", certificate)
            config = proxy.workdir / "discoproxy.toml"
            config.write_text(f"workers = {WORKERS}\n" + config.read_text())
            servers = proxy.workdir / "servers"
            (servers / "http.toml").write_text(
                f'domains = ["{HTTP_NAME}"]\naddresses = ["127.0.0.1:{ports.echo}"]\n'
            )
            proxy.start()
            try:
                return _drive(proxy, ports.echo, servers, duration, every, tally, certificate)
            finally:
                proxy.stop()
        finally:
            backends.stop()


def _drive(
    proxy: Discoproxy,
    echo_port: int,
    servers: Path,
    duration: float,
    every: float,
    tally: Tally,
    certificate: object,
) -> int:
    pid = proxy.pid
    assert pid is not None
    port = proxy.ports.sni
    until = time.monotonic() + duration
    loops: list[tuple[str, Callable[[int], int], int]] = [
        ("login", lambda p: _login(p), port),
        ("sni", lambda p: _sni(p), port),
        ("http", lambda p: _http(p), port),
        ("bulk", lambda p: _bulk(p), port),
        ("ping cached", _ping_factory(PING_CACHED_NAME), port),
        ("ping uncached", _ping_factory(PING_UNCACHED_NAME), port),
    ]
    if proxy.ports.udp is not None:
        loops.append(("udp", _udp_factory(proxy.ports.udp), 0))
    if certificate is not None:
        cafile = certificate.cert  # type: ignore[attr-defined]
        loops.append(
            (
                "tls terminated",
                lambda p: len(tls_check(p, cafile, TLS_NAME, TLS_REQUEST, REPLY)),
                port,
            )
        )
    threads = [
        threading.Thread(target=_loop, args=(kind, work, p, until, tally), daemon=True)
        for kind, work, p in loops
    ]
    threads.append(threading.Thread(target=_churn, args=(servers, echo_port, port, until, tally)))
    threads.append(threading.Thread(target=_sighup, args=(pid, until, tally)))
    threads.append(threading.Thread(target=_container_churn, args=(port, until, tally)))
    started = time.monotonic()
    threads.append(threading.Thread(target=_kill_worker, args=(pid, started + duration / 2, tally)))
    for thread in threads:
        thread.start()
    samples: list[tuple[float, float, int]] = []
    per_pid: dict[int, list[tuple[float, float, int]]] = collections.defaultdict(list)
    print(f"soak: {duration / 60:g} min, proxy pid {pid}; sampling every {every:g} s")
    print("| t (s) | RSS (MiB) | fds | per process: pid RSS (MiB)/fds | served | failed |")
    print("| --- | --- | --- | --- | --- | --- |")
    while time.monotonic() < until:
        time.sleep(min(every, max(0.0, until - time.monotonic())))
        proxy.child.check_alive()  # type: ignore[union-attr]
        each = _sample_all(pid)
        rss, fds = sum(e[1] for e in each), sum(e[2] for e in each)
        at = time.monotonic() - started
        samples.append((at, rss, fds))
        for p, r, f in each:
            per_pid[p].append((at, r, f))
        served, failed = sum(tally.served.values()), sum(tally.failed.values())
        per = ", ".join(f"{p} {r / 1024:.1f}/{f}" for p, r, f in each)
        print(f"| {at:.0f} | {rss / 1024:.1f} | {fds} | {per} | {served} | {failed} |", flush=True)
    for thread in threads:
        thread.join(SOCKET_TIMEOUT_S * 4)
    growth = _growth(per_pid)
    print(f"bytes verified: {tally.verified_bytes:,}")
    for kind, count in sorted(tally.served.items()):
        print(f"served {kind}: {count}")
    for cause, count in sorted(tally.failed.items()):
        print(f"failed {cause}: {count}")
    for cause, count in sorted(tally.explained.items()):
        print(f"failed while the killed worker was replaced (explained) {cause}: {count}")
    problems = []
    workers_now = _children(pid)
    if len(workers_now) != WORKERS:
        problems.append(f"{len(workers_now)} workers at the end, expected {WORKERS}")
    if tally.killed_at is None:
        problems.append("no worker was killed")
    if tally.failed:
        problems.append(f"{sum(tally.failed.values())} failures (above)")
    problems.extend(growth)
    if not all(tally.served[kind] for kind, _, _ in loops):
        problems.append("a load loop served nothing")
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 0 if not problems else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    args = parser.parse_args(argv)
    return run(args.minutes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
