"""Docker provider latency: from the engine's ``start`` event to the route being live.

    uv run python -m bench.docker_latency [--background 200] [--measured 50] [--burst 20]

With ``--background`` labelled containers already running (each resync lists them all),
``--measured`` more containers are started one at a time, then ``--burst`` at once. For
each, the latency is the registry's table swap that first routes its domain minus the
``timeNano`` of the engine's ``start`` event for it (same host, same clock). Prints
p50/p90/p99/max per scenario. Needs a local engine; removes every container it made,
also when interrupted. No assertion: numbers only, as every benchmark here.
"""

from __future__ import annotations

import argparse
import math
import operator
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import anyio
import docker
from loguru import logger

from discoproxy.config import ProxyConfig
from discoproxy.provider import supervise
from discoproxy.routing import Registry, RoutingTable, SnapshotInbox
from integration.docker_support import (
    HOST_MOUNTS,
    IMAGE,
    DockerResources,
    docker_client,
    docker_resources,
    ensure_image,
)
from providers.docker import DockerProvider, DockerSettings

# Each container must only exist: coreutils' sleep from the bind-mounted /usr costs ~1 MB.
SLEEP = ["/usr/bin/sleep", "1000000"]
# Docker API calls in parallel while creating and removing containers.
API_WORKERS = 8
ROUTE_WITHIN_S = 10.0
# Creating and removing hundreds of containers keeps the engine busy: give each call time.
CLEANUP_API_TIMEOUT_S = 120
# The background containers are on the host network: the provider's cost per resync is
# the same (one listing of every container, parsed), and the engine starts and removes
# them in a tenth of the time a bridge container takes (no veth, no iptables rules), so
# 200 of them fit in a short run. The measured ones are on the default bridge.
BACKGROUND_NETWORK = "host"
# Spacing between the measured one-at-a-time starts, so each is measured on its own.
SEQUENTIAL_GAP_S = 0.05


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def create(resources: DockerResources, suffix: str, network_mode: str) -> Any:
    name = resources.name(suffix)
    return resources.client.containers.create(
        IMAGE,
        SLEEP,
        name=name,
        labels=resources.labels(domains=f"{suffix}.{resources.prefix}.test"),
        volumes=HOST_MOUNTS,
        network_mode=network_mode,
    )


def in_parallel(func: Callable[[str], Any], items: Iterable[str]) -> list[Any]:
    with ThreadPoolExecutor(API_WORKERS) as pool:
        return list(pool.map(func, items))


class StartEvents:
    """``timeNano`` of each container's ``start`` event, from a stream of our own."""

    def __init__(self, client: docker.DockerClient, prefix: str) -> None:
        self.started_ns: dict[str, int] = {}
        self._seen = threading.Condition()
        self._stream = client.api.events(
            decode=True, filters={"type": ["container"], "event": ["start"]}
        )
        self._prefix = prefix
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for event in self._stream:
            name = event.get("Actor", {}).get("Attributes", {}).get("name", "")
            if name.startswith(self._prefix):
                with self._seen:
                    self.started_ns[name] = int(event["timeNano"])
                    self._seen.notify_all()

    def wait_for(self, names: Sequence[str], timeout: float) -> None:
        with self._seen:
            if not self._seen.wait_for(lambda: all(n in self.started_ns for n in names), timeout):
                raise TimeoutError(f"no start event within {timeout}s for some of {names}")

    def close(self) -> None:
        self._stream.close()
        self._thread.join(5)


class RouteTimes:
    """Wall-clock ns at which each awaited domain first appears in a table (a registry
    listener: it runs on the event loop, in the swap itself)."""

    def __init__(self) -> None:
        self.awaited: dict[str, str] = {}  # domain → container name
        self.live_ns: dict[str, int] = {}
        self.routes = 0
        self.changed = anyio.Event()

    def on_table(self, table: RoutingTable) -> None:
        now = time.time_ns()
        for domain, name in list(self.awaited.items()):
            if table.lookup_host(domain) is not None:
                self.live_ns[name] = now
                del self.awaited[domain]
        self.routes = len(table)
        self.changed.set()

    async def wait(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.changed.wait()
            self.changed = anyio.Event()


async def measure(args: argparse.Namespace, resources: DockerResources) -> dict[str, list[float]]:
    client = resources.client
    background = [f"bg{i}" for i in range(args.background)]
    sequential = [f"seq{i}" for i in range(args.measured)]
    burst = [f"burst{i}" for i in range(args.burst)]
    print(f"creating {len(background)} background containers …", flush=True)
    started = await anyio.to_thread.run_sync(
        in_parallel, lambda s: create(resources, s, BACKGROUND_NETWORK).start(), background
    )
    assert len(started) == len(background)
    measured = await anyio.to_thread.run_sync(
        in_parallel, lambda s: create(resources, s, "bridge"), sequential + burst
    )
    by_suffix = dict(zip(sequential + burst, measured, strict=True))

    registry = Registry()
    inbox = SnapshotInbox()
    routes = RouteTimes()
    registry.add_listener(routes.on_table)
    settings = DockerSettings(label_prefix=resources.prefix)
    provider = DockerProvider("docker", settings, ProxyConfig())
    events = await anyio.to_thread.run_sync(StartEvents, client, resources.prefix)
    results: dict[str, list[float]] = {}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbox.run, registry)
            tg.start_soon(supervise, "docker", provider, inbox.publisher("docker"))
            with anyio.fail_after(30):
                await inbox.wait_first_snapshots()
                await routes.wait(lambda: routes.routes >= len(background))
            print(f"{routes.routes} routes live; measuring …", flush=True)

            async def run(scenario: str, suffixes: list[str], together: bool) -> None:
                names = [resources.name(s) for s in suffixes]
                for suffix, name in zip(suffixes, names, strict=True):
                    routes.awaited[f"{suffix}.{resources.prefix}.test"] = name
                with anyio.fail_after(ROUTE_WITHIN_S + len(suffixes)):
                    if together:
                        await anyio.to_thread.run_sync(
                            in_parallel, lambda s: by_suffix[s].start(), suffixes
                        )
                    for suffix, name in zip(suffixes, names, strict=True):
                        if not together:
                            await anyio.to_thread.run_sync(by_suffix[suffix].start)
                            await anyio.sleep(SEQUENTIAL_GAP_S)
                        await routes.wait(partial(operator.contains, routes.live_ns, name))
                    await anyio.to_thread.run_sync(events.wait_for, names, ROUTE_WITHIN_S)
                results[scenario] = [
                    (routes.live_ns[n] - events.started_ns[n]) / 1e6 for n in names
                ]

            if sequential:
                await run(f"one at a time ({len(sequential)})", sequential, together=False)
            if burst:
                await run(f"burst of {len(burst)}", burst, together=True)
            tg.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(events.close)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--background", type=int, default=200)
    parser.add_argument("--measured", type=int, default=30)
    parser.add_argument("--burst", type=int, default=20)
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    client = docker_client(timeout=CLEANUP_API_TIMEOUT_S)
    if client is None:
        print("no Docker engine answers (DOCKER_HOST or /var/run/docker.sock)", file=sys.stderr)
        return 1
    ensure_image(client)
    with docker_resources(client, "dpb") as resources:
        try:
            results = anyio.run(
                measure, args, resources, backend="asyncio", backend_options={"use_uvloop": True}
            )
            report(results, args.background)
        finally:
            print("removing containers …", flush=True)
    return 0


def report(results: dict[str, list[float]], background: int) -> None:
    print(f"\nstart event → route live, with {background} labelled containers running (ms)")
    print(f"{'scenario':<22} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
    for scenario, values in results.items():
        row = [percentile(values, q) for q in (0.5, 0.9, 0.99)] + [max(values)]
        print(f"{scenario:<22} " + " ".join(f"{v:>7.1f}" for v in row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
