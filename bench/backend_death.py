"""Backend death (issue 16): one of 3 pooled backends stops answering while connections
arrive at a steady rate; how many fail, and for how long, in discoproxy and in HAProxy.

    uv run python -m bench.backend_death                 # 200 conn/s, ~40 s
    uv run python -m bench.backend_death --rate 100 --seconds 6

Three loopback backends answer each connection's first bytes with ``ok``. The dying one
stops accepting and its listen backlog fills, so new connections to it are not refused
but hang (SYNs dropped), as a container whose host went away does, not one that answers
RST. discoproxy checks each backend over TCP every second (``fall = 2``), HAProxy with
``check inter 1s fall 2``; both have a 2 s connect timeout and redispatch (discoproxy
always; HAProxy ``option redispatch``, ``retries 1``). Clients send a ClientHello, wait
up to 5 s for the answer, and count a failure otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.payloads import client_hello
from bench.procs import STARTUP_TIMEOUT_S, Child, free_port, raise_nofile_limit
from bench.targets import haproxy_available

NAME = "pool.example.com"
KILL_AT_S = 2.0
CLIENT_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2
# an answer slower than this waited on the dead backend (a healthy one answers in ms)
SLOW_S = 0.5


class Backend:
    """Accepts and answers until :meth:`die`; then accepts nothing and lets its backlog
    fill, so connections to it hang."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.alive = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while True:
            if not self.alive:
                time.sleep(0.2)
                continue
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                if conn.recv(65536):
                    conn.sendall(b"ok")
            except OSError:
                pass

    def die(self) -> None:
        self.alive = False
        # a full backlog: SYNs beyond it are dropped (connects hang, as to a dead host)
        filler = []
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(OSError):
                s.connect_ex(("127.0.0.1", self.port))
            filler.append(s)
        self._filler = filler


def one_client(port: int, hello: bytes) -> tuple[bool, float]:
    """(answered, seconds until the answer or the failure)."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as sock:
            sock.settimeout(CLIENT_TIMEOUT_S)
            sock.sendall(hello)
            ok = sock.recv(16) == b"ok"
    except OSError:
        ok = False
    return ok, time.monotonic() - started


def run_load(
    port: int, rate: float, seconds: float, dying: Backend
) -> list[tuple[float, bool, float]]:
    hello = client_hello(NAME)
    results: list[tuple[float, bool, float]] = []
    start = time.monotonic()
    futures = []
    killed = False
    with ThreadPoolExecutor(max_workers=512) as pool:
        n = 0
        while (now := time.monotonic() - start) < seconds:
            if not killed and now >= KILL_AT_S:
                dying.die()
                killed = True
            due = n / rate
            if now < due:
                time.sleep(min(due - now, 0.01))
                continue
            futures.append((now, pool.submit(one_client, port, hello)))
            n += 1
        for sent, future in futures:
            results.append((sent, *future.result()))
    return results


def report(name: str, results: list[tuple[float, bool, float]]) -> str:
    failed = [sent for sent, ok, _ in results if not ok]
    slow = [sent for sent, ok, took in results if ok and took > SLOW_S]

    def after(times: list[float]) -> str:
        late = [t - KILL_AT_S for t in times if t >= KILL_AT_S]
        return f"{max(late):.2f} s" if late else "none"

    return (
        f"  {name:10s} {len(results):6,d} connections, {len(failed):4d} failed (last "
        f"{after(failed)} after the kill), {len(slow):4d} waited > {SLOW_S:g} s on the dead "
        f"backend (last {after(slow)} after)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backend_death")
    parser.add_argument("--rate", type=float, default=200.0, help="new connections per second")
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    raise_nofile_limit()
    lines = []
    with tempfile.TemporaryDirectory(prefix="discoproxy-death-") as tmp:
        workdir = Path(tmp)
        for name in ("discoproxy", "haproxy"):
            if name == "haproxy" and not haproxy_available():
                lines.append("  haproxy not installed: apt-get install haproxy")
                continue
            backends = [Backend() for _ in range(3)]
            listen = free_port()
            addresses = [f"127.0.0.1:{b.port}" for b in backends]
            if name == "discoproxy":
                servers = workdir / "servers"
                servers.mkdir(exist_ok=True)
                (servers / "pool.toml").write_text(
                    f"domains = [{json.dumps(NAME)}]\naddresses = {json.dumps(addresses)}\n"
                    "balance = 'round_robin'\n"
                    "health_check = { type = 'tcp', interval = 1, timeout = 1, fall = 2 }\n"
                )
                config = workdir / "discoproxy.toml"
                config.write_text(
                    f'bind = ["127.0.0.1:{listen}"]\nservers_dir = "{servers}"\n'
                    f'log_level = "WARNING"\nconnect_timeout = {CONNECT_TIMEOUT_S}\n'
                    "[providers.docker]\nenabled = false\n"
                )
                argv = [sys.executable, "-m", "discoproxy", "serve", "--config", str(config)]
            else:
                cfg = workdir / "haproxy.cfg"
                server_lines = [
                    f"    server s{i} {a} check inter 1s fall 2" for i, a in enumerate(addresses)
                ]
                cfg.write_text(
                    "\n".join(
                        [
                            "defaults",
                            "    mode tcp",
                            f"    timeout connect {CONNECT_TIMEOUT_S}s",
                            "    timeout client 10s",
                            "    timeout server 10s",
                            "    retries 1",
                            "    option redispatch",
                            "frontend f",
                            f"    bind 127.0.0.1:{listen}",
                            "    tcp-request inspect-delay 5s",
                            "    tcp-request content accept if { req_ssl_hello_type 1 }",
                            "    default_backend pool",
                            "backend pool",
                            "    balance roundrobin",
                            *server_lines,
                        ]
                    )
                    + "\n"
                )
                argv = ["haproxy", "-db", "-f", str(cfg)]
            child = Child(name, argv, workdir / f"{name}.log")
            try:
                child.wait_for_port(listen, STARTUP_TIMEOUT_S)
                time.sleep(1.5)  # first checks done
                results = run_load(listen, args.rate, args.seconds, backends[0])
            finally:
                child.stop()
            lines.append(report(name, results))
    print(
        f"3 backends, {args.rate:g} new connections/s for {args.seconds:g} s; one stops "
        f"answering (connects to it hang) {KILL_AT_S:g} s in:"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
