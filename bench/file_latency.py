"""File provider: time from a server file's write to its route being live.

    uv run python -m bench.file_latency

Writes a new server file (write to temp + rename, as editors and config tools do) 30
times into a watched directory and measures until the routing table holds the new
domain. Prints the distribution. The target is < 500 ms; no assertion here.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from loguru import logger

from discoproxy.config import ProxyConfig
from discoproxy.provider import supervise
from discoproxy.routing import Registry, RoutingTable, SnapshotInbox
from providers.file import FileProvider, FileSettings

ROUNDS = 30


async def measure(directory: Path) -> list[float]:
    config = ProxyConfig(servers_dir=directory)
    registry = Registry()
    inbox = SnapshotInbox()
    provider = FileProvider("file", FileSettings(), config)
    latencies: list[float] = []
    live = anyio.Event()
    wanted = ""

    def on_table(table: RoutingTable) -> None:
        if wanted and table.lookup_host(wanted) is not None:
            live.set()

    registry.add_listener(on_table)
    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run, registry)
        tg.start_soon(supervise, "file", provider, inbox.publisher("file"))
        await inbox.wait_first_snapshots()
        await anyio.sleep(0.3)
        for round_ in range(ROUNDS):
            wanted = f"r{round_}.example.com"
            live = anyio.Event()
            temp = directory / ".next.tmp"
            temp.write_text(f'domains = ["{wanted}"]\naddresses = ["127.0.0.1:1"]\n')
            started = time.perf_counter()
            os.replace(temp, directory / f"r{round_}.toml")
            with anyio.fail_after(10):
                await live.wait()
            latencies.append(time.perf_counter() - started)
            await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    return latencies


def main() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        latencies = sorted(anyio.run(measure, Path(tmp)))
    ms = [value * 1000 for value in latencies]
    p = statistics.quantiles(ms, n=100)
    print(f"file write → route live, {ROUNDS} rounds (ms)")
    print(f"  p50 {p[49]:.1f}   p90 {p[89]:.1f}   p99 {p[98]:.1f}   max {ms[-1]:.1f}")


if __name__ == "__main__":
    main()
