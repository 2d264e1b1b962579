"""Swarm provider latency on a real two-node swarm: from a task's state change to the route.

    uv run python -m bench.swarm_latency [--cycles 5] [--max-replicas 5] [--poll 1.0]

The swarm is ``integration/swarm_support.py``'s (the host's engine as the manager, a
second engine in a network namespace as the worker; needs root). One labelled service is
scaled up one replica at a time to ``--max-replicas`` and back down to one, ``--cycles``
times; its tasks spread over both nodes. Then, at two replicas, each task's container is
killed on its own node's engine, as a crash would, ``--cycles`` times: the swarm
replaces it without any service or node event (an unlabelled global service keeps a
task on each node's network, so no node event either), so the poll alone finds it. For
a task that starts, the latency is the first table swap that routes its IP minus the
task's own ``running`` timestamp (reported by its node's agent; same machine, same
clock); for one that stops, the swap that drops it minus the moment the scale-down was
accepted or the container killed. The Swarm provider runs in this process at ``--poll``
(default: the provider's own). Prints p50/p99/max per kind and node. Everything it made
is removed, also when interrupted. No assertion: numbers only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import docker
import docker.errors
import docker.types
from loguru import logger

from bench.docker_latency import percentile
from discoproxy.config import ProxyConfig
from discoproxy.provider import supervise
from discoproxy.routing import Registry, RoutingTable, SnapshotInbox
from integration.docker_support import (
    IMAGE,
    PYTHON,
    ensure_image,
    service_mounts,
    unique_prefix,
)
from integration.swarm_support import TwoNodes, two_node_swarm
from providers.docker import SwarmProvider, SwarmSettings
from providers.docker.engine import SWARM_EVENT_FOLLOW_FOR_S

SCRIPT = (
    "import os, signal, time; "
    "signal.signal(signal.SIGTERM, lambda *_: os._exit(0)); time.sleep(3600)"
)
STEP_WITHIN_S = 60.0


def task_time(stamp: str) -> float:
    """An engine timestamp (RFC 3339, nanoseconds) as a Unix time."""
    head, _, rest = stamp.rstrip("Z").partition(".")
    fraction = f".{rest[:6]}" if rest else ""
    moment = datetime.datetime.fromisoformat(head + fraction).replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def running_tasks(service: Any, network: str) -> dict[str, tuple[str, float]]:
    """Task IP on ``network`` → (node id, when it started running)."""
    found = {}
    for task in service.tasks(filters={"desired-state": "running"}):
        status = task.get("Status", {})
        if status.get("State") != "running":
            continue
        for attachment in task.get("NetworksAttachments") or ():
            if attachment["Network"]["Spec"]["Name"] == network:
                ip = attachment["Addresses"][0].split("/")[0]
                found[ip] = (task["NodeID"], task_time(status["Timestamp"]))
    return found


def scale(service: Any, replicas: int) -> float:
    service.reload()  # an update names the spec version it changes
    service.scale(replicas)
    return time.time()


def create(manager: docker.DockerClient, prefix: str) -> tuple[list[Any], Any, str]:
    network = manager.networks.create(f"{prefix}-net", driver="overlay", attachable=True)
    domain = f"bench.{prefix}.test"
    mounts = service_mounts()
    service = manager.services.create(
        IMAGE,
        command=[PYTHON, "-c", SCRIPT],
        name=f"{prefix}-bench",
        labels={f"{prefix}.domains": domain, f"{prefix}.port": "25565"},
        networks=[network.name],
        mounts=mounts,
        mode=docker.types.ServiceMode("replicated", replicas=1),
        stop_grace_period=1_000_000_000,
    )
    # An unlabelled global service on the same network keeps a task on every node, as
    # other services usually do: without it, a node's last task on the network leaving
    # or arriving raises a node event, and the crashes below would not be poll-bound.
    anchor = manager.services.create(
        IMAGE,
        command=[PYTHON, "-c", SCRIPT],
        name=f"{prefix}-anchor",
        networks=[network.name],
        mounts=mounts,
        mode=docker.types.ServiceMode("global"),
        stop_grace_period=1_000_000_000,
    )
    return [service, anchor], network, domain


def remove(services: list[Any], network: Any) -> None:
    for service in services:
        with contextlib.suppress(docker.errors.DockerException):
            service.remove()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the network goes once its tasks are gone
        try:
            network.remove()
            return
        except docker.errors.APIError:
            time.sleep(0.5)


def kill_task(nodes: TwoNodes, service: Any, ip: str, network: str) -> tuple[str, float]:
    """Kill the container of the task at ``ip`` on its own node's engine, as a crash
    would: no service event, the swarm replaces the task. Its node, and when."""
    for task in service.tasks(filters={"desired-state": "running"}):
        for attachment in task.get("NetworksAttachments") or ():
            if attachment["Network"]["Spec"]["Name"] == network and (
                attachment["Addresses"][0].split("/")[0] == ip
            ):
                engine = nodes.worker if task["NodeID"] == nodes.worker_id else nodes.manager
                container_id = task["Status"]["ContainerStatus"]["ContainerID"]
                engine.api.kill(container_id)
                return task["NodeID"], time.time()
    raise AssertionError(f"no running task at {ip}")


async def measure(
    nodes: TwoNodes, service: Any, network: str, domain: str, args: argparse.Namespace
) -> dict[str, list[float]]:
    prefix = domain.split(".")[1]
    settings = SwarmSettings(label_prefix=prefix, poll_interval=args.poll)
    provider = SwarmProvider("swarm", settings, ProxyConfig())
    registry = Registry()
    inbox = SnapshotInbox()
    seen: dict[str, float] = {}  # task IP → first swap that routed it
    gone: dict[str, float] = {}  # task IP → first swap without it, after it was routed

    def on_table(table: RoutingTable) -> None:
        now = time.time()
        route = table.lookup_host(domain)
        live = {host for host, _ in route.addresses} if route else set()
        for ip in live:
            seen.setdefault(ip, now)
        for ip in set(seen) - live:
            gone.setdefault(ip, now)

    def node_kind(node: str) -> str:
        return "worker" if node == nodes.worker_id else "manager"

    registry.add_listener(on_table)
    results: dict[str, list[float]] = {}

    async def until(check: Any) -> None:
        with anyio.fail_after(STEP_WITHIN_S):
            while True:
                if check():
                    return
                await anyio.sleep(0.02)

    async def listing() -> dict[str, tuple[str, float]]:
        return await anyio.to_thread.run_sync(running_tasks, service, network)

    async def settle(
        before: dict[str, tuple[str, float]], replicas: int, kind: str, at: float
    ) -> None:
        """Until ``replicas`` tasks run; record each start and each stop since ``before``."""
        while True:
            now_running = await listing()
            if len(now_running) == replicas and set(now_running) != set(before):
                break
            await anyio.sleep(0.05)
        for ip in set(now_running) - set(before):  # started
            node, started = now_running[ip]
            await until(lambda ip=ip: ip in seen)
            results.setdefault(f"{kind}: start on the {node_kind(node)}", []).append(
                seen[ip] - started
            )
        for ip in set(before) - set(now_running):  # stopped
            await until(lambda ip=ip: ip in gone)
            results.setdefault(f"{kind}: stop on the {node_kind(before[ip][0])}", []).append(
                gone[ip] - at
            )
            del seen[ip], gone[ip]  # a later task may get the same IP

    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run, registry)
        tg.start_soon(supervise, provider.name, provider, inbox.publisher(provider.name))
        await settle({}, 1, "created", time.time())  # the first task, not reported
        results.clear()
        for _ in range(args.cycles):
            up = range(2, args.max_replicas + 1)
            down = range(args.max_replicas - 1, 0, -1)
            for replicas in [*up, *down]:
                before = await listing()
                accepted = await anyio.to_thread.run_sync(scale, service, replicas)
                await settle(before, replicas, "scaled", accepted)
        # crashes: no service event, the poll alone finds the replacement task
        await anyio.to_thread.run_sync(scale, service, 2)
        await settle({}, 2, "scaled", time.time())
        await anyio.sleep(SWARM_EVENT_FOLLOW_FOR_S + 1)  # past the scale's fast listings
        for _ in range(args.cycles):
            for ip in list(await listing()):
                before = await listing()
                _, killed = await anyio.to_thread.run_sync(kill_task, nodes, service, ip, network)
                await settle(before, 2, "crashed", killed)
        tg.cancel_scope.cancel()
    return results


def report(results: dict[str, list[float]], poll: float) -> None:
    print(f"Swarm provider, two nodes, poll_interval {poll} s: task state change → route (ms)")
    print(f"{'':32} {'n':>4} {'p50':>8} {'p99':>8} {'max':>8}")
    every: list[float] = []
    for kind, values in sorted(results.items()):
        every += values
        row = [percentile(values, q) * 1000 for q in (0.5, 0.99)] + [max(values) * 1000]
        print(f"{kind:32} {len(values):>4} " + " ".join(f"{v:>8.0f}" for v in row))
    if every:
        row = [percentile(every, q) * 1000 for q in (0.5, 0.99)] + [max(every) * 1000]
        print(f"{'all':32} {len(every):>4} " + " ".join(f"{v:>8.0f}" for v in row))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swarm_latency")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--max-replicas", type=int, default=5)
    parser.add_argument("--poll", type=float, default=SwarmSettings().poll_interval)
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    manager = docker.from_env(timeout=60)
    ensure_image(manager)
    with two_node_swarm(manager, [IMAGE]) as nodes:
        services, network, domain = create(manager, unique_prefix("dpb"))
        try:
            results = anyio.run(measure, nodes, services[0], network.name, domain, args)
        finally:
            remove(services, network)
    report(results, args.poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
