"""discoproxy on a real two-node swarm (``integration/swarm_support.py``): the host's engine
as the manager, a second engine in a network namespace as the worker.

discoproxy runs as users would run it there: the sidecar image in a container on the
manager, attached to an attachable overlay network, with the manager's socket, its
Swarm provider on and its port published on 127.0.0.1. A real Minecraft server (npm
minecraft-protocol, ``integration/node/mc_server.js``, on the host's node mounted
read-only) runs as a labelled service; a real client (``mc_client.js``) logs in through
the published port. Each server names itself after its node (``{{.Node.ID}}``), so its
log tells which node a login reached.

The service's task starts on the worker (reached across the overlay by its task IP), is
moved to the manager, scaled to two replicas spread over both nodes, and the worker is
drained while clients keep logging in: with a replica left, no login fails. A global
service is one pool of a task per node, and logins reach both.
"""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import docker.types
import pytest

from integration.docker_support import (
    IMAGE,
    PYTHON,
    build_sidecar_image,
    ensure_image,
    require_docker,
    service_mounts,
    unavailable,
    unique_prefix,
)
from integration.swarm_support import TwoNodes, two_node_swarm
from tests.support import REPO, require_program

pytestmark = pytest.mark.peer

NODE_DIR = REPO / "integration" / "node"
MC_VERSION = "1.20.4"
MC_SERVER = (
    "import os\n"
    "os.execv('/usr/bin/node', ['node', '/node/mc_server.js', os.environ['NAME'], "
    f"'{MC_VERSION}'])\n"
)
SOCKET = "/var/run/docker.sock"
PROXY_PORT = "25565/tcp"
CONFIG_IN_CONTAINER = "/etc/discoproxy/config.toml"
POLL_S = 0.5
# Deadlines, not measurements: a task is scheduled, its container started and node loads
# minecraft-data in a few seconds; the machine is shared.
LISTENING_WITHIN_S = 60.0
SETTLED_WITHIN_S = 90.0
LOGIN_TIMEOUT_S = 30.0
LOGINS_WHILE_DRAINING = 12


@dataclass
class Swarm:
    nodes: TwoNodes
    prefix: str
    network: Any
    sidecar: Any
    port: int
    services: list[Any]

    @property
    def domain(self) -> str:
        return f"survival.{self.prefix}.test"


def sidecar_logs(sidecar: Any) -> str:
    try:
        return sidecar.logs(tail=60).decode(errors="replace")
    except docker.errors.DockerException as exc:
        return f"(no logs: {exc})"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    require_program("node", "apt-get install nodejs npm")
    if not (NODE_DIR / "node_modules" / "minecraft-protocol").is_dir():
        unavailable("npm ci --prefix integration/node (minecraft-protocol)")
    manager = require_docker()
    ensure_image(manager)
    sidecar_image = build_sidecar_image(manager)
    prefix = unique_prefix("dpw")
    directory = tmp_path_factory.mktemp("swarm")
    directory.chmod(0o755)
    with two_node_swarm(manager, [IMAGE]) as nodes:
        network = manager.networks.create(f"{prefix}-mc", driver="overlay", attachable=True)
        services: list[Any] = []
        sidecar = None
        try:
            config = directory / "config.toml"
            config.write_text(
                "[providers.docker]\nenabled = false\n\n"
                f'[providers.swarm]\nenabled = true\nlabel_prefix = "{prefix}"\n'
                f'network = "{network.name}"\npoll_interval = {POLL_S}\n'
            )
            config.chmod(0o644)
            sidecar = manager.containers.run(
                sidecar_image,
                name=f"{prefix}-discoproxy",
                detach=True,
                network=network.name,
                environment={"DISCOPROXY_CONFIG": CONFIG_IN_CONTAINER},
                volumes={
                    SOCKET: {"bind": SOCKET, "mode": "ro"},
                    str(config): {"bind": CONFIG_IN_CONTAINER, "mode": "ro"},
                },
                ports={PROXY_PORT: ("127.0.0.1", None)},
            )
            deadline = time.monotonic() + LISTENING_WITHIN_S
            while b"listening on " not in sidecar.logs():
                sidecar.reload()
                if sidecar.status == "exited" or time.monotonic() > deadline:
                    raise AssertionError(f"discoproxy did not start:\n{sidecar_logs(sidecar)}")
                time.sleep(0.2)
            sidecar.reload()
            port = int(sidecar.attrs["NetworkSettings"]["Ports"][PROXY_PORT][0]["HostPort"])
            yield Swarm(nodes, prefix, network, sidecar, port, services)
        finally:
            for service in services:
                with contextlib.suppress(docker.errors.NotFound):
                    service.remove()
            if sidecar is not None:
                with contextlib.suppress(docker.errors.DockerException):
                    sidecar.remove(force=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the network goes once its tasks are gone
                try:
                    network.remove()
                    break
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError:
                    time.sleep(0.5)


def create_minecraft_service(
    swarm: Swarm, constraints: list[str], name: str = "survival", mode: Any = None
) -> Any:
    """A labelled Minecraft server service for ``<name>.<prefix>.test`` (replicated, one
    replica, unless ``mode`` says otherwise)."""
    domain = f"{name}.{swarm.prefix}.test"
    labels = {f"{swarm.prefix}.domains": domain, f"{swarm.prefix}.port": "25565"}
    service = swarm.nodes.manager.services.create(
        IMAGE,
        command=[PYTHON, "-c", MC_SERVER],
        name=f"{swarm.prefix}-{name}",
        labels=labels,
        env=["NAME={{.Node.ID}}", "MC_HOST=0.0.0.0", "MC_PORT=25565"],
        networks=[swarm.network.name],
        mounts=service_mounts({str(NODE_DIR): "/node"}),
        constraints=constraints,
        mode=mode or docker.types.ServiceMode("replicated", replicas=1),
        stop_grace_period=1_000_000_000,  # 1 s, in ns
    )
    swarm.services.append(service)
    return service


def login(swarm: Swarm, username: str, domain: str | None = None) -> bool:
    """A real client's login through discoproxy; True when it reached the play state."""
    result = subprocess.run(
        ["node", "mc_client.js", str(swarm.port), domain or swarm.domain, username, MC_VERSION],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=LOGIN_TIMEOUT_S,
        check=False,
    )
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return any(event.get("event") == "play" for event in events)


def logins_by_node(swarm: Swarm, service: str = "survival") -> dict[str, set[str]]:
    """Node id → usernames the servers of ``service`` on it saw log in (both engines)."""
    seen: dict[str, set[str]] = collections.defaultdict(set)
    name = f"{swarm.prefix}-{service}"
    for engine in (swarm.nodes.manager, swarm.nodes.worker):
        for container in engine.containers.list(
            all=True, filters={"label": f"com.docker.swarm.service.name={name}"}
        ):
            with contextlib.suppress(docker.errors.DockerException):
                for line in container.logs().decode(errors="replace").splitlines():
                    if line.startswith("{") and '"event":"login"' in line:
                        record = json.loads(line)
                        seen[record["server"]].add(record["username"])
    return seen


def running_nodes(service: Any) -> collections.Counter[str]:
    service.reload()
    return collections.Counter(
        task["NodeID"]
        for task in service.tasks(filters={"desired-state": "running"})
        if task.get("Status", {}).get("State") == "running"
    )


def settle(swarm: Swarm, service: Any, expected: dict[str, int], username: str) -> None:
    """Until the service runs ``expected`` tasks per node and a login reaches one of
    them (discoproxy followed the move). Each try logs in under a name of its own
    (``username``, then ``username1`` …), so an early try that reached a task on its way
    out does not count."""
    deadline = time.monotonic() + SETTLED_WITHIN_S
    attempt = 0
    while True:
        name = username if attempt == 0 else f"{username}{attempt}"
        attempt += 1
        if running_nodes(service) == collections.Counter(expected) and login(swarm, name):
            reached = {node for node, names in logins_by_node(swarm).items() if name in names}
            if reached and reached <= set(expected):
                return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"tasks {dict(running_nodes(service))}, expected {expected}; logins "
                f"{dict(logins_by_node(swarm))}\n{sidecar_logs(swarm.sidecar)}"
            )
        time.sleep(0.5)


def update_service(service: Any, **changes: Any) -> None:
    service.reload()  # an update names the spec version it changes
    service.update(**changes)


def set_availability(manager: docker.DockerClient, node_id: str, availability: str) -> None:
    node = manager.nodes.get(node_id)
    spec = dict(node.attrs["Spec"])
    spec["Availability"] = availability
    node.update(spec)


def test_a_real_client_reaches_a_task_on_the_worker_and_follows_it_across_nodes(
    swarm: Swarm,
) -> None:
    nodes = swarm.nodes
    service = create_minecraft_service(swarm, [f"node.id=={nodes.worker_id}"])
    settle(swarm, service, {nodes.worker_id: 1}, "on_worker")  # across the overlay

    update_service(service, constraints=[f"node.id=={nodes.manager_id}"])  # moved
    settle(swarm, service, {nodes.manager_id: 1}, "moved")

    update_service(service, constraints=[], mode=docker.types.ServiceMode("replicated", 2))
    settle(swarm, service, {nodes.manager_id: 1, nodes.worker_id: 1}, "spread")
    # round robin over both: a handful of logins reaches each node
    for i in range(6):
        assert login(swarm, f"spread{i}")
    seen = logins_by_node(swarm)
    assert {f"spread{i}" for i in range(6)} <= seen[nodes.manager_id] | seen[nodes.worker_id]
    assert seen[nodes.manager_id] & {f"spread{i}" for i in range(6)}
    assert seen[nodes.worker_id] & {f"spread{i}" for i in range(6)}

    # the worker drained while clients log in: its task stops and starts again on the
    # manager; the replica that stays serves every login meanwhile
    set_availability(nodes.manager, nodes.worker_id, "drain")
    try:
        failed = [i for i in range(LOGINS_WHILE_DRAINING) if not login(swarm, f"drain{i}")]
        assert failed == [], (
            f"logins failed while draining: {failed}\n{sidecar_logs(swarm.sidecar)}"
        )
        settle(swarm, service, {nodes.manager_id: 2}, "drained")
    finally:
        set_availability(nodes.manager, nodes.worker_id, "active")


def test_a_global_service_is_a_pool_of_one_task_per_node(swarm: Swarm) -> None:
    nodes = swarm.nodes
    lobby = create_minecraft_service(swarm, [], "lobby", docker.types.ServiceMode("global"))
    domain = f"lobby.{swarm.prefix}.test"
    deadline = time.monotonic() + SETTLED_WITHIN_S
    while running_nodes(lobby) != collections.Counter({nodes.manager_id: 1, nodes.worker_id: 1}):
        assert time.monotonic() < deadline, dict(running_nodes(lobby))
        time.sleep(0.5)
    reached: set[str] = set()
    for i in range(40):  # round robin over both tasks, once both are routed
        if login(swarm, f"lobby{i}", domain):
            seen = logins_by_node(swarm, "lobby")
            reached = {node for node, names in seen.items() if names}
            if reached == {nodes.manager_id, nodes.worker_id}:
                break
        assert time.monotonic() < deadline, f"{reached}\n{sidecar_logs(swarm.sidecar)}"
    assert reached == {nodes.manager_id, nodes.worker_id}
