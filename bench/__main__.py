"""Data-plane benchmark: discoproxy against HAProxy (and nginx for port routes) in the
same run (issues 4, 6 and 8).

    uv run python -m bench                          # full run, under 10 minutes
    uv run python -m bench --quick                  # fewer repetitions, smaller sizes, ~2 min
    uv run --with matplotlib python -m bench        # also draw the PNG chart
    uv run python -m bench soak --minutes 30        # everything at once: leaks, failures
    uv run python -m bench workers                  # workers = 1/2 vs HAProxy nbthread 1/2

The load generator and the backends run on one core, the proxy under test on another;
every proxy is started once and measured in turn, repetition after repetition. Prints a
table of medians with the ratio discoproxy / HAProxy-best against issue 4's targets,
and writes it with the raw samples (JSON) and a chart (PNG) to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import platform
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import report
from bench.loadgen import make_source_file
from bench.procs import (
    REPO,
    Child,
    Cores,
    background_busy,
    pick_cores,
    pin_self,
    raise_nofile_limit,
)
from bench.scenarios import SCENARIOS, Bench, Results, Settings
from bench.targets import (
    BackendPorts,
    Certificate,
    Discoproxy,
    HAProxy,
    Nginx,
    Target,
    haproxy_available,
    make_certificate,
    nginx_stream,
)

# fds a proxy needs besides two per proxied connection: listeners, epoll, logs, and
# HAProxy's splice pipes (maxpipes 64, two fds each)
FD_RESERVE = 200
IDLE_CONNECTIONS = 10_000
# busy % of a benchmark core, with the benchmark paused, above which the run is flagged
BACKGROUND_BUSY_MAX = 5.0
HAPROXY_MAXCONN = 30_000
# the scenarios nginx is measured in: port routes (TCP, UDP)
NGINX_SCENARIOS = ("portbulk", "udp")
# the HAProxy variant that terminates TLS (scenario tlsterm): splice cannot apply to a
# TLS connection and a 256 KiB buffer does nothing for one small reply (bench/README.md)
HAPROXY_TLS_VARIANT = "default"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs, 256 MiB, 5,000 conns")
    parser.add_argument("--runs", type=int, help="repetitions (default: 5, quick: 3)")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="output dir")
    args = parser.parse_args()
    if unknown := set(args.only.split(",")) - set(SCENARIOS):
        parser.error(f"--only: unknown scenario {', '.join(sorted(unknown))}")
    return args


def _output(argv: list[str]) -> str:
    """What a command prints on stdout (on stderr if nothing: ``nginx -v``), or "" when
    it cannot run."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    return (result.stdout or result.stderr).strip()


def describe_run(cores: Cores, nofile: int, settings: Settings) -> dict[str, object]:
    """What the figures were measured on: code, versions, placement, sizes."""
    git = ["git", "-C", str(REPO)]
    haproxy_openssl = [
        line.split(":", 1)[1].strip()
        for line in _output(["haproxy", "-vv"]).splitlines()
        if line.startswith("Running on OpenSSL version")
    ]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _output([*git, "rev-parse", "--short", "HEAD"]),
        "uncommitted_changes": bool(_output([*git, "status", "--porcelain"])),
        "python": platform.python_version(),
        "uvloop": importlib.metadata.version("uvloop"),
        "haproxy": _output(["haproxy", "-v"]).split("\n")[0],
        "nginx": _output(["nginx", "-v"]).split("\n")[0],
        # TLS termination: the library each side's handshakes run in
        "python_openssl": ssl.OPENSSL_VERSION,
        "haproxy_openssl": haproxy_openssl[0] if haproxy_openssl else "",
        "cores": {"load": cores.load, "proxy": cores.proxy},
        "nofile": nofile,
        "settings": settings.__dict__,
    }


def start_backends(workdir: Path, cpu: int | None) -> tuple[Child, BackendPorts]:
    child = Child("backends", [sys.executable, "-m", "bench.backends"], workdir / "b.log", cpu=cpu)
    fields = dict(item.split("=") for item in child.wait_for_line("ports ").split()[1:])
    return child, BackendPorts(**{name: int(port) for name, port in fields.items()})


def run(args: argparse.Namespace, settings: Settings, cores: Cores, maxconn: int) -> Results:
    results = Results()
    wanted = [name for name in SCENARIOS if name in args.only.split(",")]  # in plan order
    with tempfile.TemporaryDirectory(prefix="discoproxy-bench-") as tmp:
        workdir = Path(tmp)
        backends, ports = start_backends(workdir, cores.load)
        certificate: Certificate | None = None
        if "tlsterm" in wanted:
            made = make_certificate(workdir)
            if isinstance(made, str):
                results.notes.append(made)
            else:
                certificate = made
        haproxies: list[Target] = []
        if haproxy_available():
            haproxies = [
                HAProxy(
                    ports,
                    workdir,
                    cores.proxy,
                    variant,
                    maxconn,
                    certificate if variant == HAPROXY_TLS_VARIANT else None,
                )
                for variant in ("default", "splice", "bigbuf")
            ]
        else:
            results.notes.append("haproxy not installed: apt-get install haproxy")
        nginx: Target | None = None
        if any(name in NGINX_SCENARIOS for name in wanted):
            found = nginx_stream()
            if isinstance(found, str):
                results.notes.append(found)
            else:
                nginx = Nginx(ports, workdir, cores.proxy, *found)
        bench = Bench(
            settings=settings,
            results=results,
            cores=cores,
            source=make_source_file(workdir),
            direct=Target(ports),
            discoproxy=Discoproxy(ports, workdir, cores.proxy, "WARNING", certificate),
            discoproxy_info=Discoproxy(ports, workdir, cores.proxy, "INFO", certificate),
            haproxies=haproxies,
            nginx=nginx,
            certificate=certificate,
        )
        proxies = [bench.discoproxy_info, *bench.proxies, *([nginx] if nginx else [])]
        try:
            for proxy in proxies:
                proxy.start()
            for name in wanted:
                started = time.monotonic()
                print(f"· {name} …", end="", file=sys.stderr, flush=True)
                try:
                    SCENARIOS[name](bench)
                except (OSError, RuntimeError, TimeoutError) as exc:
                    # one failing scenario (a proxy dropping connections) must not cost
                    # the figures of the others; it is reported with the table
                    traceback.print_exc()
                    results.notes.append(f"{name} failed: {exc!r}"[:500])
                print(f" {time.monotonic() - started:.0f} s", file=sys.stderr)
        finally:
            for proxy in proxies:
                proxy.stop()
            backends.stop()
            bench.source.unlink(missing_ok=True)
    return results


def placement_notes(cores: Cores, nofile: int, idle: int, busy: list[float]) -> list[str]:
    """What about this machine makes the figures less than they should be."""
    notes = []
    if max(busy, default=0) > BACKGROUND_BUSY_MAX:
        notes.append(
            f"machine not idle: up to {max(busy):.0f} % CPU busy with the benchmark paused; "
            "other processes skew these figures"
        )
    if idle < IDLE_CONNECTIONS:
        notes.append(
            f"idle connections: {idle:,}, not {IDLE_CONNECTIONS:,}: RLIMIT_NOFILE hard limit is "
            f"{nofile} and a proxy needs two fds per connection"
        )
    if not cores.pinned:
        notes.append("single CPU: load generator and proxy share it (no pinning)")
    return notes


def write_outputs(out: Path, lines: list[str], results: Results, columns: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    report.write_json(results, out / "results.json")
    if report.write_chart(results, columns, out / "results.png"):
        print(f"\nwritten: {out}/results.md, results.json, results.png")
    else:
        print(f"\nwritten: {out}/results.md, results.json (no chart: matplotlib missing;")
        print("  run `uv run --with matplotlib python -m bench` to draw it)")


def main() -> None:
    args = parse_args()
    cores = pick_cores()
    pin_self(cores.load)
    nofile = raise_nofile_limit()
    fitting = (nofile - FD_RESERVE) // 2
    idle = min(IDLE_CONNECTIONS, fitting)
    settings = Settings.quick(idle) if args.quick else Settings.full(idle)
    if args.runs:
        settings = dataclasses.replace(settings, runs=args.runs)
    busy_before = background_busy(cores)
    started = time.monotonic()
    results = run(args, settings, cores, min(HAPROXY_MAXCONN, fitting))
    busy_after = background_busy(cores)
    results.meta = describe_run(cores, nofile, settings)
    results.meta["background_busy_percent"] = {"before": busy_before, "after": busy_after}
    busy = [*busy_before.values(), *busy_after.values()]
    results.notes += placement_notes(cores, nofile, idle, busy)
    columns = [c for c in report.COLUMNS if any(c in t for t in results.samples.values())]
    lines = [
        f"medians of {settings.runs} runs ({settings.memory_runs} for memory); "
        f"load generator on CPU {cores.load}, proxy on CPU {cores.proxy}; "
        f"{time.monotonic() - started:.0f} s",
        "",
        report.table(results, columns, idle),
        "",
        *report.own_comparisons(results),
        *(f"note: {note}" for note in results.notes),
    ]
    print("\n".join(lines))
    write_outputs(args.out, lines, results, columns)


if __name__ == "__main__":
    if sys.argv[1:2] == ["workers"]:  # python -m bench workers: bench/workers.py
        from bench.workers import main as workers

        sys.exit(workers(sys.argv[2:]))
    if sys.argv[1:2] == ["soak"]:  # python -m bench soak --minutes N: bench/soak.py
        from bench.soak import main as soak

        sys.exit(soak(sys.argv[2:]))
    main()
