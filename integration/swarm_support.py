"""A second Docker engine on this machine, in a network namespace of its own
(:func:`namespaced_engine`: several engines for one proxy), and a real two-node Docker
Swarm made of it and this host's engine (:func:`two_node_swarm`: the host's engine as the
manager, the namespaced one as the worker; the recipe in ``../shared/DESIGN.md``).

Rules for this file:
- The worker runs in a network namespace of its own, joined to the host by a veth pair
  with a private /24 (host side ``.1``, the namespace ``.2``). It is started with
  ``nsenter --net=`` (``ip netns exec`` remounts /sys, and dockerd then fails with
  "Devices cgroup isn't mounted"), with its own data root, exec root, socket and pid
  file, and no bridge or iptables of its own.
- The swarm takes a private address pool of its own (:data:`ADDRESS_POOL`), not the
  10.0.0.0/8 default. Both nodes report this machine's hostname: tasks are placed by node
  id or role, never by hostname. No registry: images are copied into the worker with
  ``docker save | load`` and services are created without resolving images.
- Everything is undone in ``finally``, also when a test fails: the swarm left on both
  engines, the worker stopped by its pid file, the namespace (and with it the veth pair)
  deleted, the worker's directories removed. What a run killed before its ``finally``
  left behind (its pid is in every name) is swept by the next run.
- Needs root, ``ip``, ``nsenter`` and ``dockerd``; a host engine already in a swarm that
  is not ours is never touched. Anything missing fails under ``CI=true`` and skips
  elsewhere (:func:`~integration.docker_support.unavailable`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from integration.docker_support import unavailable
from tests.support import require_program

# The swarm's address pool (overlay subnets are /24s of it), and the /16 the veth pairs
# take their /24 from: private, and apart from the one-node swarm test's 10.123.0.0/17.
ADDRESS_POOL = "10.126.0.0/16"
VETH_RANGE = "10.124"
NAME_PREFIX = "dpw"
WORKER_READY_WITHIN_S = 60.0
NODE_READY_WITHIN_S = 60.0
WORKER_STOP_WITHIN_S = 30.0
COMMAND_TIMEOUT_S = 60.0


@dataclass
class TwoNodes:
    manager: docker.DockerClient
    worker: docker.DockerClient
    manager_id: str  # node ids: both nodes share one hostname
    worker_id: str
    manager_address: str  # on the veth pair: where the worker reaches the manager


def run(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def _paths(namespace: str) -> dict[str, Path]:
    return {
        "data": Path(f"/var/lib/docker-{namespace}"),
        "exec": Path(f"/run/docker-{namespace}"),
        "socket": Path(f"/run/docker-{namespace}.sock"),
        "pid": Path(f"/run/docker-{namespace}.pid"),
        "log": Path(f"/tmp/dockerd-{namespace}.log"),
    }


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone within ``seconds``. The worker's dockerd is our
    child (``nsenter`` execs it), so it is reaped here as it exits: until it is,
    ``kill(pid, 0)`` finds its zombie and a stopped engine would look alive until the
    deadline. A sweep's engine is not our child; init reaps it."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _stop_worker(namespace: str) -> None:
    """Stop the worker engine of ``namespace`` (if it runs), delete the namespace and the
    worker's directories. Idempotent."""
    paths = _paths(namespace)
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(paths["pid"].read_text().strip())
        os.kill(pid, signal.SIGTERM)
        if not _gone_within(pid, WORKER_STOP_WITHIN_S):
            os.kill(pid, signal.SIGKILL)
            _gone_within(pid, WORKER_STOP_WITHIN_S)
    run(["ip", "netns", "delete", namespace], check=False)
    # its containers' mounts go with the engine; what stays is plain files
    for key in ("data", "exec"):
        shutil.rmtree(paths[key], ignore_errors=True)
    for key in ("socket", "pid"):
        paths[key].unlink(missing_ok=True)


def sweep_leftovers() -> None:
    """Remove what killed runs left: namespaces whose creating process is gone."""
    netns = Path("/run/netns")
    for entry in sorted(netns.iterdir()) if netns.is_dir() else ():
        parts = entry.name.split("-")
        if parts[0] != NAME_PREFIX or len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            _stop_worker(entry.name)
        except PermissionError:
            pass  # alive, someone else's


def _wait_engine(socket: Path, log: Path) -> docker.DockerClient:
    deadline = time.monotonic() + WORKER_READY_WITHIN_S
    while True:
        try:
            client = docker.DockerClient(base_url=f"unix://{socket}", timeout=30)
            client.ping()
            return client
        except (docker.errors.DockerException, OSError):
            if time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log.exists() else "(no log)"
                raise AssertionError(f"the worker engine did not answer:\n{tail}") from None
            time.sleep(0.2)


def copy_image(source: docker.DockerClient, target: docker.DockerClient, image: str) -> None:
    """``docker save | docker load`` between two engines (there is no registry)."""
    data = b"".join(source.images.get(image).save(named=True))
    target.images.load(data)


def _wait_nodes_ready(manager: docker.DockerClient, count: int) -> None:
    deadline = time.monotonic() + NODE_READY_WITHIN_S
    while True:
        nodes = manager.nodes.list()
        ready = [n for n in nodes if n.attrs.get("Status", {}).get("State") == "ready"]
        if len(ready) >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"swarm nodes not ready: {[n.attrs['Status'] for n in nodes]}")
        time.sleep(0.2)


@dataclass
class NamespacedEngine:
    client: docker.DockerClient  # over its unix socket
    host_ip: str  # the host's end of the veth pair
    ip: str  # the engine's namespace's end: where its host-network containers listen
    socket: Path


def require_namespaces() -> None:
    if os.geteuid() != 0:
        unavailable("a second Docker engine needs root (a network namespace, a dockerd)")
    for program, package in (
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("dockerd", "docker.io"),
    ):
        require_program(program, f"apt-get install {package}")


@contextlib.contextmanager
def namespaced_engine(
    extra_args: Callable[[str], Sequence[str]] | None = None,
) -> Iterator[NamespacedEngine]:
    """A new Docker engine in a network namespace of its own, joined to the host by a
    veth pair; ``extra_args(its ip)`` go to its dockerd (another ``-H``, TLS, made for
    that address). Undone afterwards."""
    require_namespaces()
    sweep_leftovers()
    token = secrets.token_hex(2)
    namespace = f"{NAME_PREFIX}-{os.getpid()}-{token}"
    host_if, ns_if = f"dph{token}{os.getpid() % 1000:03d}", f"dpn{token}{os.getpid() % 1000:03d}"
    octet = secrets.randbelow(250) + 2
    host_ip, ns_ip = f"{VETH_RANGE}.{octet}.1", f"{VETH_RANGE}.{octet}.2"
    paths = _paths(namespace)
    client: docker.DockerClient | None = None
    try:
        run(["ip", "netns", "add", namespace])
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if])
        run(["ip", "link", "set", ns_if, "netns", namespace])
        run(["ip", "addr", "add", f"{host_ip}/24", "dev", host_if])
        run(["ip", "link", "set", host_if, "up"])
        inside = ["nsenter", f"--net=/run/netns/{namespace}"]
        run([*inside, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if])
        run([*inside, "ip", "link", "set", ns_if, "up"])
        run([*inside, "ip", "link", "set", "lo", "up"])
        args = [
            *inside,
            "dockerd",
            "--data-root",
            str(paths["data"]),
            "--exec-root",
            str(paths["exec"]),
            "-H",
            f"unix://{paths['socket']}",
            "--pidfile",
            str(paths["pid"]),
            "--bridge=none",
            "--iptables=false",
            *(extra_args(ns_ip) if extra_args else ()),
        ]
        with paths["log"].open("w") as log:
            subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = _wait_engine(paths["socket"], paths["log"])
        yield NamespacedEngine(client, host_ip, ns_ip, paths["socket"])
    finally:
        if client is not None:
            client.close()
        _stop_worker(namespace)
        run(["ip", "link", "delete", host_if], check=False)  # gone with the namespace, mostly


def stop_engine(engine: NamespacedEngine) -> None:
    """Stop the engine now (its namespace stays until the context ends)."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(_paths_of_socket(engine.socket)["pid"].read_text().strip())
        os.kill(pid, signal.SIGTERM)
        _gone_within(pid, WORKER_STOP_WITHIN_S)


def _paths_of_socket(socket: Path) -> dict[str, Path]:
    return _paths(socket.name.removeprefix("docker-").removesuffix(".sock"))


@contextlib.contextmanager
def two_node_swarm(manager: docker.DockerClient, images: Sequence[str]) -> Iterator[TwoNodes]:
    """The host engine as a swarm manager and a new worker engine in a namespace, with
    ``images`` copied into the worker; all of it undone afterwards."""
    require_namespaces()
    state = manager.info().get("Swarm", {})
    if state.get("LocalNodeState") not in ("inactive", None):
        unavailable(
            "the Docker engine is already part of a swarm "
            f"({state.get('LocalNodeState')}); the two-node test makes its own"
        )
    with namespaced_engine() as engine:
        worker = engine.client
        initialised = False
        try:
            for image in images:
                copy_image(manager, worker, image)
            initialised = True  # from here on, leaving is ours to do
            manager.swarm.init(
                advertise_addr=engine.host_ip, default_addr_pool=[ADDRESS_POOL], subnet_size=24
            )
            manager.swarm.reload()
            worker_token = manager.swarm.attrs["JoinTokens"]["Worker"]
            worker.swarm.join(
                remote_addrs=[f"{engine.host_ip}:2377"],
                join_token=worker_token,
                advertise_addr=engine.ip,
            )
            _wait_nodes_ready(manager, 2)
            manager_id = manager.info()["Swarm"]["NodeID"]
            worker_id = worker.info()["Swarm"]["NodeID"]
            yield TwoNodes(manager, worker, manager_id, worker_id, engine.host_ip)
        finally:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                worker.swarm.leave(force=True)
            if initialised:
                with contextlib.suppress(docker.errors.DockerException):
                    manager.swarm.leave(force=True)
