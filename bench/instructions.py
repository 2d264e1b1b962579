"""User-space instructions per connection, counted by callgrind: a figure that does not
move with the machine's load, for A/B comparisons of the data plane's Python cost.

    apt-get install valgrind
    uv run python -m bench.instructions                  # SNI, pools; 2,000 each, ~3 min
    uv run python -m bench.instructions --connections 500 --only sni

``discoproxy serve`` (``workers = 1``, the benchmark's servers) runs under ``valgrind
--tool=callgrind``; after a warm-up its counters are zeroed, each kind of connection
(the ClientHello routed by SNI to one backend, to a 3-backend round-robin pool, to a
least-connections pool) runs ``--connections`` times, and a dump is taken
(``callgrind_control``). Printed: instructions per connection for each, the whole process
(both threads: the loop's timers count too, which is why the figure is per thousands of
connections and not per one). Repeatable to ~0.5 % run to run on one machine; the kernel's
share (system calls) is not counted: `python -m bench` measures that, against HAProxy.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen
from bench.__main__ import start_backends
from bench.payloads import POOL_LC_NAME, POOL_RR_NAME, REPLY, SNI_NAME, client_hello
from bench.procs import STARTUP_TIMEOUT_S, Child, pick_cores, pin_self
from bench.targets import Discoproxy

KINDS = {"sni": SNI_NAME, "pool_rr": POOL_RR_NAME, "pool_lc": POOL_LC_NAME}
WARMUP_CONNECTIONS = 500
CONCURRENCY = 4  # under valgrind the proxy is ~50x slower: a few at a time suffice
DEADLINE_S = 900.0


def _wait_for_port(port: int, child: Child) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S * 10  # valgrind starts slowly
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("discoproxy under callgrind did not start")


def _summary(path: Path) -> int:
    match = re.search(r"^summary: (\d+)", path.read_text(errors="replace"), re.M)
    if match is None:
        raise RuntimeError(f"{path}: no summary line")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--only", default=",".join(KINDS), help="of " + ",".join(KINDS))
    args = parser.parse_args()
    for program in ("valgrind", "callgrind_control"):
        if shutil.which(program) is None:
            sys.exit(f"{program} not found: apt-get install valgrind")
    kinds = [k for k in args.only.split(",") if k in KINDS]
    cores = pick_cores()
    pin_self(cores.load)
    with tempfile.TemporaryDirectory(prefix="discoproxy-instructions-") as tmp:
        workdir = Path(tmp)
        backends, ports = start_backends(workdir, cores.load)
        target = Discoproxy(ports, workdir, cores.proxy, "WARNING")
        config = workdir / target.name / "discoproxy.toml"
        config.write_text("workers = 1\n" + config.read_text())  # before [admin]
        out = workdir / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        argv += [sys.executable, "-m", "discoproxy", "serve", "--config", str(config)]
        child = Child("discoproxy-callgrind", argv, workdir / "proxy.log", cpu=cores.proxy)
        try:
            _wait_for_port(target.ports.sni, child)
            for kind in kinds:  # every route's first connection (pools, caches) first
                hello = client_hello(KINDS[kind])
                loadgen.connect_loop(
                    target.ports.sni, hello, len(REPLY), WARMUP_CONNECTIONS, CONCURRENCY, DEADLINE_S
                )
            print(f"user-space instructions per connection ({args.connections:,} each)")
            for n, kind in enumerate(kinds, 1):
                hello = client_hello(KINDS[kind])
                control = ["callgrind_control", "-z", str(child.pid)]
                subprocess.run(control, check=True, capture_output=True)
                result = loadgen.connect_loop(
                    target.ports.sni, hello, len(REPLY), args.connections, CONCURRENCY, DEADLINE_S
                )
                control[1] = "-d"
                subprocess.run(control, check=True, capture_output=True)
                dumped = Path(f"{out}.{n}")
                per = _summary(dumped) / max(result.ok, 1)
                note = f" ({result.failed} failed)" if result.failed else ""
                print(f"  {kind:8} {per:>10,.0f}{note}")
        finally:
            child.stop()
            backends.stop()


if __name__ == "__main__":
    main()
