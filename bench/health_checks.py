"""Health checks at 1,000 backends (issue 16): CPU per second that checking costs.

    uv run python -m bench.health_checks            # 1,000 backends, 1 s interval, ~1 min
    uv run python -m bench.health_checks --backends 200 --seconds 5

The benchmark opens ``--backends`` loopback listeners (one process, its own core) that
accept and close, then runs discoproxy with ``--pools`` servers sharing them, each
address checked over TCP every ``--interval`` seconds (``health_check = { type = 'tcp'
}``), and HAProxy with the same servers (``check inter``). No connection is proxied:
what each proxy spends over ``--seconds`` is the check loop's cost. Prints CPU % of one
core and µs per check for each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.procs import (
    STARTUP_TIMEOUT_S,
    Child,
    cpu_seconds,
    free_port,
    pick_cores,
    pin_self,
    raise_nofile_limit,
)
from bench.targets import haproxy_available

WARMUP_S = 3.0


def serve_listeners(count: int, stop: threading.Event) -> list[int]:
    """``count`` loopback listeners that accept and close (a check's whole exchange)."""
    selector = selectors.DefaultSelector()
    ports = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        ports.append(sock.getsockname()[1])

    def loop() -> None:
        while not stop.is_set():
            for key, _ in selector.select(0.2):
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.close()
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]

    threading.Thread(target=loop, daemon=True).start()
    return ports


def measure(child: Child, seconds: float) -> float:
    """CPU seconds ``child`` used over ``seconds`` (after a warm-up)."""
    time.sleep(WARMUP_S)
    child.check_alive()
    before = cpu_seconds(child.pid)
    time.sleep(seconds)
    child.check_alive()
    return cpu_seconds(child.pid) - before


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.health_checks")
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--pools", type=int, default=10, help="servers sharing the backends")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    cores = pick_cores()
    pin_self(cores.load)
    raise_nofile_limit()
    stop = threading.Event()
    ports = serve_listeners(args.backends, stop)
    groups = [ports[i :: args.pools] for i in range(args.pools)]
    checks_per_s = args.backends / args.interval
    rows = []
    with tempfile.TemporaryDirectory(prefix="discoproxy-checks-") as tmp:
        workdir = Path(tmp)
        servers = workdir / "servers"
        servers.mkdir()
        for i, group in enumerate(groups):
            addresses = json.dumps([f"127.0.0.1:{port}" for port in group])
            (servers / f"pool{i}.toml").write_text(
                f'domains = ["pool{i}.example.com"]\naddresses = {addresses}\n'
                f"balance = 'round_robin'\n"
                f"health_check = {{ type = 'tcp', interval = {args.interval}, fall = 2 }}\n"
            )
        listen = free_port()
        config = workdir / "discoproxy.toml"
        config.write_text(
            f'bind = ["127.0.0.1:{listen}"]\nservers_dir = "{servers}"\nlog_level = "WARNING"\n'
            "[providers.docker]\nenabled = false\n"
        )
        argv = [sys.executable, "-m", "discoproxy", "serve", "--config", str(config)]
        proxy = Child("discoproxy", argv, workdir / "d.log", cpu=cores.proxy)
        try:
            proxy.wait_for_port(listen, STARTUP_TIMEOUT_S)
            used = measure(proxy, args.seconds)
            rows.append(("discoproxy", used))
        finally:
            proxy.stop()
        if haproxy_available():
            lines = [
                *("global", "    maxconn 4096", "defaults", "    mode tcp"),
                *("    timeout connect 2s", "    timeout client 10s", "    timeout server 10s"),
                *("frontend f", f"    bind 127.0.0.1:{listen}", "    default_backend pool0"),
            ]
            inter = f"{int(args.interval * 1000)}ms"
            for i, group in enumerate(groups):
                lines += [f"backend pool{i}", "    balance roundrobin"]
                lines += [
                    f"    server s{p} 127.0.0.1:{p} check inter {inter} fall 2" for p in group
                ]
            cfg = workdir / "haproxy.cfg"
            cfg.write_text("\n".join(lines) + "\n")
            haproxy = Child("haproxy", ["haproxy", "-db", "-f", str(cfg)], workdir / "h.log",
                            cpu=cores.proxy)  # fmt: skip
            try:
                haproxy.wait_for_port(listen, STARTUP_TIMEOUT_S)
                rows.append(("haproxy", measure(haproxy, args.seconds)))
            finally:
                haproxy.stop()
    stop.set()
    print(
        f"{args.backends} backends in {args.pools} pools, TCP check every {args.interval:g} s "
        f"({checks_per_s:,.0f} checks/s), measured over {args.seconds:g} s:"
    )
    for name, used in rows:
        share = used / args.seconds * 100
        per_check = used / (checks_per_s * args.seconds) * 1e6
        print(f"  {name:10s} {share:6.1f} % of a core, {per_check:7.1f} µs per check")
    if len(rows) == 2 and rows[1][1] > 0:
        print(f"  ratio discoproxy / haproxy: {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
