"""The Swarm provider against a real swarm: this engine made a one-node swarm manager for
the module (left again afterwards), an attachable overlay network, labelled services of the
host's Python (the empty test image with the host's /usr and /lib mounted read-only).

Services become pooled routes with a backend per running task on its overlay IP, scaling
is followed within the poll interval, service events (create, remove) route at once, an
``auto_start`` service scaled to 0 sleeps and is scaled up and down by the provider, a
bad label is reported naming the service. The two-node swarm, with discoproxy in a
container on the overlay and a real client, is ``test_swarm_two_nodes.py``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import anyio
import docker
import docker.errors
import docker.types
import pytest

from discoproxy.config import ProxyConfig
from discoproxy.provider import supervise
from discoproxy.routing import Registry, RoutingTable, SnapshotInbox
from integration.docker_support import (
    BACKEND_SCRIPT,
    IMAGE,
    PYTHON,
    build_sidecar_image,
    ensure_image,
    service_mounts,
    unique_prefix,
)
from integration.peers import free_port
from providers.docker import SwarmProvider, SwarmSettings
from tests.proxy.helpers import handshake
from tests.support import REPO, require_program

pytestmark = [pytest.mark.peer, pytest.mark.anyio]

POOL = "10.123.0.0/17"  # the swarm's address pool: private, not the 10.0.0.0/8 default
POLL_S = 0.5
# A task scaled up or down is routed within one poll plus one listing: the deadline
# allows for the engine scheduling and starting the task (seconds on a loaded machine).
FOLLOWED_WITHIN_S = 30.0
SCRIPT = (
    "import os, signal, time; "
    "signal.signal(signal.SIGTERM, lambda *_: os._exit(0)); time.sleep(3600)"
)


@pytest.fixture(scope="module")
def swarm(engine: docker.DockerClient) -> Iterator[docker.DockerClient]:
    """This engine as a one-node swarm manager for the module's tests (each has its own
    prefix, network and services: a swarm's init and leave per test cost two seconds and
    tested nothing); left afterwards unless it was one."""
    state = engine.info().get("Swarm", {}).get("LocalNodeState")
    joined_here = state != "active"
    if joined_here:
        engine.swarm.init(advertise_addr="127.0.0.1", default_addr_pool=[POOL], subnet_size=24)
    try:
        yield engine
    finally:
        if joined_here:
            engine.swarm.leave(force=True)


@pytest.fixture
def overlay(swarm: docker.DockerClient) -> Iterator[tuple[str, Any]]:
    prefix = unique_prefix("dps")
    network = swarm.networks.create(f"{prefix}-games", driver="overlay", attachable=True)
    services: list[Any] = []
    try:
        yield prefix, (network, services)
    finally:
        for service in services:
            with contextlib.suppress(docker.errors.NotFound):
                service.remove()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the network goes once its tasks are gone
            try:
                network.remove()
                break
            except docker.errors.APIError:
                time.sleep(0.5)


def create_service(
    client: docker.DockerClient, network: Any, name: str, labels: dict[str, str], replicas: int
) -> Any:
    return client.services.create(
        IMAGE,
        command=[PYTHON, "-c", SCRIPT],
        name=name,
        labels=labels,
        networks=[network.name],
        mounts=service_mounts(),
        mode=docker.types.ServiceMode("replicated", replicas=replicas),
        stop_grace_period=1_000_000_000,  # 1 s, in ns
    )


def scale(service: Any, replicas: int) -> None:
    service.reload()  # an update names the spec version it changes
    service.scale(replicas)


def task_ips(client: docker.DockerClient, service: Any, network: str) -> set[str]:
    ips = set()
    for task in service.tasks(filters={"desired-state": "running"}):
        if task.get("Status", {}).get("State") != "running":
            continue
        for attachment in task.get("NetworksAttachments") or ():
            if attachment["Network"]["Spec"]["Name"] == network:
                ips.add(attachment["Addresses"][0].split("/")[0])
    return ips


async def test_services_are_pooled_routes_of_their_tasks_and_scaling_is_followed(
    swarm: docker.DockerClient, overlay: tuple[str, Any]
) -> None:
    prefix, (network, services) = overlay
    domain = f"lobby.{prefix}.test"
    labels = {f"{prefix}.domains": domain, f"{prefix}.port": "25577"}
    lobby = create_service(swarm, network, f"{prefix}-lobby", labels, replicas=2)
    services.append(lobby)
    bad = {f"{prefix}.domains": f"bad.{prefix}.test", f"{prefix}.balance": "leastconn"}
    services.append(create_service(swarm, network, f"{prefix}-bad", bad, replicas=1))

    settings = SwarmSettings(label_prefix=prefix, poll_interval=POLL_S)
    provider = SwarmProvider("swarm", settings, ProxyConfig())
    assert await provider.available()
    registry = Registry()
    inbox = SnapshotInbox()
    tables: list[RoutingTable] = []
    registry.add_listener(tables.append)

    def addresses() -> set[str]:
        route = registry.table.lookup_host(domain)
        return {host for host, _ in route.addresses} if route else set()

    async def follow(replicas: int) -> float:
        """Scale to ``replicas`` (None: as created); seconds until the route shows them."""
        started = time.monotonic()
        with anyio.fail_after(FOLLOWED_WITHIN_S):
            while True:
                expected = await anyio.to_thread.run_sync(task_ips, swarm, lobby, network.name)
                if len(expected) == replicas and addresses() == expected:
                    return time.monotonic() - started
                await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run, registry)
        tg.start_soon(supervise, provider.name, provider, inbox.publisher(provider.name))
        await follow(2)
        route = registry.table.lookup_host(domain)
        assert route is not None and route.qualified_id == f"{prefix}-lobby@swarm"
        subnet = ipaddress.ip_network(POOL)
        assert all(ipaddress.ip_address(h) in subnet for h, _ in route.addresses)
        assert {port for _, port in route.addresses} == {25577}
        assert registry.table.lookup_host(f"bad.{prefix}.test") is None  # reported, not routed
        await anyio.to_thread.run_sync(scale, lobby, 3)
        await follow(3)
        await anyio.to_thread.run_sync(scale, lobby, 1)
        await follow(1)
        tg.cancel_scope.cancel()
    problems = [str(p) for p in provider._reported]
    assert any(p.startswith(f"service {prefix}-bad, label {prefix}.balance: ") for p in problems), (
        problems
    )


async def test_service_events_route_at_once_and_an_auto_start_service_sleeps_and_wakes(
    swarm: docker.DockerClient, overlay: tuple[str, Any]
) -> None:
    """With a poll far longer than the deadlines, only the manager's service events can
    route a new service in time; a login's start scales the sleeping service to one
    replica, auto_stop's stop scales it back to zero."""
    prefix, (network, services) = overlay
    settings = SwarmSettings(label_prefix=prefix, poll_interval=60)
    provider = SwarmProvider("swarm", settings, ProxyConfig())
    registry = Registry()
    inbox = SnapshotInbox()

    async def until(check: Any, what: str) -> None:
        deadline = time.monotonic() + FOLLOWED_WITHIN_S
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {FOLLOWED_WITHIN_S}s")
            await anyio.sleep(0.05)

    def route(domain: str) -> Any:
        return registry.table.lookup_host(domain)

    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run, registry)
        tg.start_soon(supervise, provider.name, provider, inbox.publisher(provider.name))
        await until(lambda: provider._published is not None, "listed")
        lobby_domain = f"lobby.{prefix}.test"
        labels = {f"{prefix}.domains": lobby_domain, f"{prefix}.port": "25577"}
        services.append(
            await anyio.to_thread.run_sync(
                create_service, swarm, network, f"{prefix}-lobby", labels, 1
            )
        )
        await until(lambda: bool(route(lobby_domain) and route(lobby_domain).addresses), "created")

        domain = f"sleepy.{prefix}.test"
        wakes = {
            f"{prefix}.domains": domain,
            f"{prefix}.port": "25577",
            f"{prefix}.auto_start": "true",
            f"{prefix}.auto_stop_after": "30s",
        }
        sleepy = await anyio.to_thread.run_sync(
            create_service, swarm, network, f"{prefix}-sleepy", wakes, 0
        )
        services.append(sleepy)
        await until(lambda: bool(route(domain) and route(domain).server.sleeping), "sleeping")
        assert route(domain).addresses == ()
        await provider.start_server(f"{prefix}-sleepy")
        await until(lambda: bool(route(domain) and route(domain).addresses), "woken")
        assert not route(domain).server.sleeping
        (task_ip,) = await anyio.to_thread.run_sync(task_ips, swarm, sleepy, network.name)
        assert {h for h, _ in route(domain).addresses} == {task_ip}
        await provider.start_server(f"{prefix}-sleepy")  # already up: left as it is
        sleepy.reload()
        assert sleepy.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 1
        await provider.stop_server(f"{prefix}-sleepy")
        await until(lambda: bool(route(domain) and route(domain).server.sleeping), "stopped")
        sleepy.reload()
        assert sleepy.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 0

        await anyio.to_thread.run_sync(services.pop(0).remove)  # lobby: a remove event
        await until(lambda: route(lobby_domain) is None, "removed")
        tg.cancel_scope.cancel()


STACK_FILE = REPO / "stack.example.yml"
STACK_CI_FILE = REPO / "integration" / "stack.ci.yml"
STACK_TIMEOUT_S = 120.0
STACK_ROUTED_WITHIN_S = 90.0  # the sidecar's task starts, lists, the backends start


def first_reply(port: int, domain: str) -> bytes:
    """The first bytes a login (handshake + Login Start) for ``domain`` is answered with
    through 127.0.0.1:``port`` (b'' when none)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(handshake(domain, username="Steve"))
            return conn.recv(65536)
    except OSError:
        return b""


def test_stack_example_deploys_and_routes_its_services_and_wakes_the_sleeping_one(
    swarm: docker.DockerClient,
) -> None:
    """``stack.example.yml`` as written, plus ``integration/stack.ci.yml`` for what cannot
    work offline (images, the published port), deployed with ``docker stack deploy``:
    discoproxy's task on the manager routes survival to its two tasks, and a login for
    the creative service (scaled to 0, auto_start) scales it to 1 and reaches it."""
    docker_cli = require_program("docker", "apt-get install docker.io")
    ensure_image(swarm)
    stack = unique_prefix("dps")
    port = free_port()
    env = {
        **os.environ,
        "PROXY_PORT": str(port),
        "DPT_SIDECAR_IMAGE": build_sidecar_image(swarm),
        "DPT_BACKEND_IMAGE": IMAGE,
        "DPT_BACKEND_SCRIPT": BACKEND_SCRIPT,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [docker_cli, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=STACK_TIMEOUT_S,
            check=False,
        )

    def logs() -> str:
        return cli("service", "logs", "--tail", "40", f"{stack}_discoproxy").stdout

    try:
        deployed = cli(
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "-c",
            str(STACK_FILE),
            "-c",
            str(STACK_CI_FILE),
            stack,
        )
        assert deployed.returncode == 0, deployed.stderr
        for domain, name in (
            ("survival.example.com", b"survival"),
            ("play.example.com", b"survival"),
            ("eu.creative.example.com", b"creative"),  # asleep: this login wakes it
        ):
            deadline = time.monotonic() + STACK_ROUTED_WITHIN_S
            while (reply := first_reply(port, domain)) != name:
                assert time.monotonic() < deadline, (
                    f"{domain} answered {reply!r}, not {name!r}\n{logs()}"
                )
                time.sleep(0.5)
        creative = swarm.services.get(f"{stack}_creative")
        assert creative.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 1
        survival = swarm.services.get(f"{stack}_survival")
        assert len(task_ips(swarm, survival, f"{stack}_minecraft")) == 2
    finally:
        cli("stack", "rm", stack)
        deadline = time.monotonic() + 60  # stack rm returns before its network is gone
        while time.monotonic() < deadline and swarm.networks.list(names=[f"{stack}_minecraft"]):
            time.sleep(0.5)
