"""A real Docker engine for integration tests and benchmarks: images, containers, cleanup.

Rules for this file:
- The containers a test starts are testcontainers ``DockerContainer`` objects: their
  configuration, testcontainers' own labels, readiness through its wait strategies and
  removal through its ``stop()``. Ryuk, its reaper, is an image that would have to be
  pulled, so it is off (``TESTCONTAINERS_RYUK_DISABLED``, set below): cleanup is
  :meth:`DockerResources.remove_all`, in ``finally``.
- No image is pulled. :func:`ensure_image` imports an empty ``scratch`` image once (the one
  thing testcontainers cannot do); every :class:`HostPython` container runs the host's own
  Python with ``/usr``, ``/lib``, ``/lib64`` and ``/etc/alternatives`` bind-mounted
  read-only. (testcontainers logs "Pulling image" before every start; it pulls only an
  image the engine lacks, and every image used here is imported or built first.)
- Everything a test creates is named with one unique prefix (:class:`DockerResources`) and
  removed afterwards, also when the test fails; names and label prefixes never collide
  with another run on the same engine. Whatever a removal missed, or was created outside
  testcontainers (``bench/docker_latency.py``), is swept by that prefix and what still
  stays is named in the error.
- The docker SDK and testcontainers block: async code calls these helpers through
  ``anyio.to_thread``.
- A missing or unsuitable engine (none answers, a ``DOCKER_HOST`` that is not local where
  the engine must be restarted, no way to build the sidecar's base) fails the test under
  ``CI=true`` and skips it elsewhere, saying what to install (:func:`unavailable`).
- The sidecar image (:func:`build_sidecar_image`) is the one image built from a
  Dockerfile: on the debootstrap base, never pulled; it and its base are kept between runs.
"""

from __future__ import annotations

import io
import os
import secrets
import shlex
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Self, TypeVar

import docker
import docker.errors
import docker.types
import pytest
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from tests.support import IN_CI, REPO, require_program

# Ryuk off without any setting from the user: the variable is what testcontainers reads (at
# its first container); the assignment holds even if something read it before this line.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
testcontainers_config.ryuk_disabled = True

IMAGE = "discoproxy-test/scratch:latest"
HOST_MOUNTS = {
    path: {"bind": path, "mode": "ro"}
    for path in ("/usr", "/lib", "/lib64", "/etc/alternatives")
    if Path(path).exists()
}
PYTHON = "/usr/bin/python3"
# Answers the first chunk of every connection (the forwarded handshake) with $NAME, then
# echoes: the name proves which container a connection reached, the echo that it is
# still open. It prints BACKEND_READY once it is bound. SIGTERM exits at once (as PID 1 it
# would otherwise be ignored, and every `docker stop` would wait its full timeout).
BACKEND_SCRIPT = """
import os, signal, socketserver
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
name = os.environ["NAME"].encode()
port = int(os.environ.get("PORT", "25565"))
class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        if not self.request.recv(65536):
            return
        self.request.sendall(name)
        while data := self.request.recv(65536):
            self.request.sendall(data)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
server = Server(("0.0.0.0", port), Handler)
print("listening on", port, flush=True)
server.serve_forever()
"""
# What BACKEND_SCRIPT prints once it accepts connections (a regex, for LogMessageWaitStrategy).
BACKEND_READY = r"^listening on \d+$"
# Where a container without networks of its own goes, named so that testcontainers does not
# pick one (without DOCKER_HOST it looks for a network this host is on, for Docker-in-Docker).
DEFAULT_NETWORK = "bridge"
ENGINE_TIMEOUT_S = 5
# Deadlines, not measurements: the host's Python starts in well under a second, but the
# machine is shared.
READY_TIMEOUT_S = 60
READY_POLL_S = 0.05
# Benchmarks leave hundreds of containers; removing them one by one takes a minute.
REMOVE_WORKERS = 8
ENGINE_RESTART_TIMEOUT_S = 60.0
DOCKERD_FALLBACK_LOG = Path("/tmp/dockerd.log")
DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"
LOCAL_ENDPOINTS = (DEFAULT_ENDPOINT, "unix:///run/docker.sock")
INSTALL_ENGINE = "apt-get install docker.io; dockerd &"

ContainerT = TypeVar("ContainerT", bound=DockerContainer)


def unavailable(message: str) -> NoReturn:
    """A dependency is missing or unsuitable: fail under ``CI=true``, skip elsewhere.

    ``message`` says what is missing and what to install or change.
    """
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def docker_endpoint() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_ENDPOINT


def docker_client(timeout: int = ENGINE_TIMEOUT_S) -> docker.DockerClient | None:
    """A client for the engine ``DOCKER_HOST`` names (default socket), if one answers."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (docker.errors.DockerException, OSError):
        return None
    return client


def require_docker() -> docker.DockerClient:
    """A client for a live engine; fail under CI, skip elsewhere, when none answers."""
    client = docker_client()
    if client is None:
        unavailable(f"no Docker engine answers at {docker_endpoint()}: {INSTALL_ENGINE}")
    return client


def ensure_image(client: docker.DockerClient) -> str:
    """Import the empty base image unless it is there already (idempotent, offline).

    By hand: testcontainers pulls or builds images, it does not import them.
    """
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        empty = io.BytesIO()
        with tarfile.open(fileobj=empty, mode="w"):
            pass
        repository, tag = IMAGE.rsplit(":", 1)
        client.api.import_image_from_data(empty.getvalue(), repository=repository, tag=tag)
        client.images.get(IMAGE)
    return IMAGE


def service_mounts(extra: Mapping[str, str] | None = None) -> list[docker.types.Mount]:
    """The bind mounts a Swarm service of :data:`IMAGE` needs to run the host's Python
    (:data:`HOST_MOUNTS`), plus ``extra`` host path → container path, all read-only."""
    paths = {**{path: path for path in HOST_MOUNTS}, **(extra or {})}
    return [
        docker.types.Mount(target=target, source=source, type="bind", read_only=True)
        for source, target in paths.items()
    ]


def unique_prefix(kind: str = "dpt") -> str:
    """``dpt-<pid>-<random>``: valid as a container name, network name and label prefix."""
    return f"{kind}-{os.getpid()}-{secrets.token_hex(3)}"


class HostPython(DockerContainer):
    """A container of the empty image (:data:`IMAGE`) running ``script`` on the host's Python.

    Its ``$NAME`` is its container name. testcontainers' own ``start()`` creates and starts
    in one call; here a container joins all its ``networks`` before it starts (the
    provider's first look must see every one), and a sleeping server is created and never
    started by the test. So :meth:`create` creates (through testcontainers' client, which
    adds its labels) and :meth:`start` starts what was created, then waits for ``ready``
    (a regex the script prints, :class:`LogMessageWaitStrategy`) when one is given.
    """

    def __init__(
        self,
        name: str,
        script: str,
        labels: Mapping[str, str],
        *,
        networks: Sequence[Network] = (),
        restart: bool = False,
        env: Mapping[str, str] | None = None,
        ready: str | None = None,
        healthcheck: Mapping[str, Any] | None = None,
        mounts: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(IMAGE)
        self.with_name(name).with_command([PYTHON, "-c", script])
        self.with_envs(NAME=name, **(env or {}))
        for path in HOST_MOUNTS:
            self.with_volume_mapping(path, path, "ro")
        for host_path, container_path in (mounts or {}).items():  # read-only, as the rest
            self.with_volume_mapping(host_path, container_path, "ro")
        self.with_kwargs(
            labels=dict(labels),
            network=networks[0].name if networks else DEFAULT_NETWORK,
            restart_policy={"Name": "always"} if restart else None,
            **({"healthcheck": dict(healthcheck)} if healthcheck else {}),
        )
        if ready is not None:
            self.waiting_for(
                LogMessageWaitStrategy(ready)
                .with_startup_timeout(READY_TIMEOUT_S)
                .with_poll_interval(READY_POLL_S)
            )
        self._other_networks = tuple(networks[1:])

    def create(self) -> Self:
        """Create the container on all its networks, not started."""
        self._container = self.get_docker_client().create(
            self.image,
            command=self._command,
            environment=self.env,
            name=self._name,
            volumes={
                path: {"bind": mount["bind"], "mode": mount["mode"]}
                for path, mount in self.volumes.items()
            },
            **self._kwargs,
        )
        for network in self._other_networks:
            network.connect(self.get_container_id())
        return self

    def start(self) -> Self:
        if self._container is None:
            self.create()
        self.get_docker_client().start(self.get_wrapped_container())
        if self._wait_strategy is not None:
            self._wait_strategy.wait_until_ready(self)
        return self


@dataclass
class DockerResources:
    """Containers and networks created under one prefix; :meth:`remove_all` cleans up."""

    client: docker.DockerClient
    prefix: str = field(default_factory=unique_prefix)
    containers: dict[str, DockerContainer] = field(default_factory=dict)
    networks: list[Network] = field(default_factory=list)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def label(self, key: str) -> str:
        """A label with this run's own prefix, so other containers are never picked up."""
        return f"{self.prefix}.{key}"

    def labels(self, **values: str) -> dict[str, str]:
        return {self.label(key): value for key, value in values.items()}

    def network(self, suffix: str) -> Network:
        """A bridge network named ``<prefix>-<suffix>`` (testcontainers would pick a uuid)."""
        network = Network(docker_network_kw={"driver": "bridge"})
        network.name = self.name(suffix)
        self.networks.append(network.create())
        return network

    def start(self, suffix: str, container: ContainerT) -> ContainerT:
        """Name ``container`` ``<prefix>-<suffix>``, start it (testcontainers waits for its
        wait strategy) and remove it with the rest."""
        name = self.name(suffix)
        self.containers[name] = container.with_name(name)
        return container.start()

    def run(
        self,
        suffix: str,
        labels: Mapping[str, str],
        *,
        script: str = BACKEND_SCRIPT,
        ready: str | None = BACKEND_READY,
        networks: Sequence[Network] = (),
        restart: bool = False,
        env: Mapping[str, str] | None = None,
        start: bool = True,
        healthcheck: Mapping[str, Any] | None = None,
        mounts: Mapping[str, str] | None = None,
    ) -> Any:
        """A :class:`HostPython` container running ``script``, started (until it printed
        ``ready``; ``None``: as soon as it runs) or only created; its docker SDK container,
        which the tests stop, pause and inspect as users would.

        Its ``$NAME`` is its full container name. With several ``networks`` it is on all of
        them before it starts.
        """
        name = self.name(suffix)
        ensure_image(self.client)
        container = HostPython(
            name,
            script,
            labels,
            networks=networks,
            restart=restart,
            env=env,
            ready=ready,
            healthcheck=healthcheck,
            mounts=mounts,
        )
        self.containers[name] = container
        if start:
            container.start()
        else:
            container.create()
        return container.get_wrapped_container()

    def remove_container(self, suffix: str) -> None:
        """Remove one container now (testcontainers' ``stop()``: forced, with its volumes)."""
        container = self.containers.pop(self.name(suffix), None)
        if container is not None:
            with suppress(docker.errors.NotFound):
                container.stop()

    def remove_all(self) -> None:
        """Remove every container and network of this prefix, whatever state they are in.

        First each one testcontainers started (its ``stop()``), then, as Ryuk would have,
        whatever else carries the prefix: a container created outside testcontainers, or
        one whose removal failed (a busy engine can time out), tried twice. Whatever is
        still left after that is named in the error.
        """
        containers, self.containers = list(self.containers.values()), {}
        with ThreadPoolExecutor(REMOVE_WORKERS) as pool:
            list(pool.map(_stop_quietly, containers))
        networks, self.networks = self.networks, []
        for network in networks:
            with suppress(docker.errors.DockerException, OSError):
                network.remove()
        for _attempt in range(2):
            left = self.client.containers.list(all=True, filters={"name": self.prefix})
            with ThreadPoolExecutor(REMOVE_WORKERS) as pool:
                list(pool.map(_remove_container, left))
            for left_network in self.client.networks.list(filters={"name": self.prefix}):
                with suppress(docker.errors.DockerException, OSError):
                    left_network.remove()
        names = [
            str(c.name)
            for c in self.client.containers.list(all=True, filters={"name": self.prefix})
        ]
        names += [str(n.name) for n in self.client.networks.list(filters={"name": self.prefix})]
        if names:
            raise AssertionError(
                f"could not remove {len(names)} test resources: {', '.join(names)}"
            )


def _stop_quietly(container: DockerContainer) -> None:
    """testcontainers' removal; what it leaves, the sweep by prefix tries again."""
    try:
        container.stop()
    except (docker.errors.DockerException, OSError):
        container.get_docker_client().client.close()  # stop() closes it only on success


def _remove_container(container: Any) -> None:
    with suppress(docker.errors.DockerException, OSError):
        container.remove(force=True)


@contextmanager
def docker_resources(client: docker.DockerClient, kind: str = "dpt") -> Iterator[DockerResources]:
    resources = DockerResources(client, unique_prefix(kind))
    try:
        yield resources
    finally:
        resources.remove_all()


# -- restarting the engine ----------------------------------------------------------------


@dataclass(frozen=True)
class DockerdProcess:
    """How the running dockerd was started, to start it again the same way."""

    pid: int
    argv: tuple[str, ...]
    log: Path


def find_dockerd() -> DockerdProcess:
    """The local dockerd behind the default socket, to restart it.

    An engine elsewhere (``DOCKER_HOST``) or not exactly one local dockerd fails under CI
    (``.ci/run`` starts exactly one, on the default socket) and skips elsewhere.
    """
    endpoint = docker_endpoint()
    if endpoint not in LOCAL_ENDPOINTS:
        unavailable(
            f"DOCKER_HOST={endpoint}: restarting the engine needs a local dockerd on "
            f"{DEFAULT_ENDPOINT} ({INSTALL_ENGINE}; unset DOCKER_HOST)"
        )
    found = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    if len(pids) != 1:
        hint = INSTALL_ENGINE if not pids else "stop all but the one on the default socket"
        unavailable(f"need exactly one local dockerd process to restart, found {len(pids)}: {hint}")
    pid = pids[0]
    argv = tuple(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1])
    try:
        log = Path(os.readlink(f"/proc/{pid}/fd/1"))
    except OSError:
        log = DOCKERD_FALLBACK_LOG
    if not log.is_absolute() or not (log.is_file() or not log.exists()):
        log = DOCKERD_FALLBACK_LOG
    return DockerdProcess(pid, argv, log)


def _pid_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def engine_answers() -> bool:
    client = docker_client(timeout=2)
    if client is None:
        return False
    client.close()
    return True


def start_dockerd(process: DockerdProcess) -> None:
    """Start dockerd detached in a session of its own (as ``.ci/run`` does: it outlives
    the test run), appending to its log; wait for it."""
    command = f"setsid nohup {shlex.join(process.argv)} >>{shlex.quote(str(process.log))} 2>&1 &"
    subprocess.run(["sh", "-c", command], check=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + ENGINE_RESTART_TIMEOUT_S
    while not engine_answers():
        if time.monotonic() > deadline:
            tail = process.log.read_text(errors="replace").splitlines()[-30:]
            raise AssertionError("dockerd did not come back:\n" + "\n".join(tail))
        time.sleep(0.2)


def stop_dockerd(process: DockerdProcess) -> None:
    """SIGTERM, then wait for the process to be gone (it stops its containers first)."""
    os.kill(process.pid, 15)
    deadline = time.monotonic() + ENGINE_RESTART_TIMEOUT_S
    while _pid_alive(process.pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"dockerd (pid {process.pid}) did not stop after SIGTERM")
        time.sleep(0.1)


# -- the sidecar image ----------------------------------------------------------------------

# The offline base (image/build-base-image.sh) and the image built on it from this tree.
BASE_IMAGE = "discoproxy-base:bookworm"
SIDECAR_IMAGE = "discoproxy-test/sidecar:latest"
BASE_SCRIPT = REPO / "image" / "build-base-image.sh"
WHEELS_SCRIPT = REPO / "image" / "build-wheels.sh"
# build-base-image.sh's exit status when root or debootstrap is missing
PREREQUISITE_MISSING = 3
# debootstrap takes one to two minutes; a cached tarball imports in seconds
BASE_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 600
OUTPUT_TAIL_LINES = 40


def _run_step(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stdout + result.stderr).splitlines()
    return "\n".join(lines[-OUTPUT_TAIL_LINES:])


def build_sidecar_image(client: docker.DockerClient) -> str:
    """Build the Dockerfile on the cached offline base, from the host's wheelhouse.

    The engine's build containers cannot reach PyPI here (TLS through the egress proxy is
    trusted by the host only), so ``build-wheels.sh`` downloads on the host and the build
    installs with ``--no-index``. Each step is cached (base image and tarball, wheelhouse,
    image layers): with nothing changed this takes a few seconds. The image it replaces is
    removed. Missing root or debootstrap for a base that is not cached yet fails under CI
    and skips elsewhere.
    """
    docker_cli = require_program("docker", "apt-get install docker.io")
    base = _run_step([str(BASE_SCRIPT), BASE_IMAGE], BASE_TIMEOUT_S)
    if base.returncode == PREREQUISITE_MISSING:
        unavailable(f"cannot build the base image {BASE_IMAGE}: {base.stderr.strip()}")
    if base.returncode != 0:
        pytest.fail(f"{BASE_SCRIPT.name} failed ({base.returncode}):\n{_tail(base)}")
    wheels = _run_step([str(WHEELS_SCRIPT)], BUILD_TIMEOUT_S)
    if wheels.returncode != 0:
        pytest.fail(f"{WHEELS_SCRIPT.name} failed ({wheels.returncode}):\n{_tail(wheels)}")
    try:
        previous = client.images.get(SIDECAR_IMAGE).id
    except docker.errors.ImageNotFound:
        previous = None
    build = _run_step(
        [
            docker_cli,
            "build",
            "--force-rm",
            "--build-arg",
            f"BASE={BASE_IMAGE}",
            "-t",
            SIDECAR_IMAGE,
            ".",
        ],
        BUILD_TIMEOUT_S,
    )
    if build.returncode != 0:
        pytest.fail(f"docker build failed ({build.returncode}):\n{_tail(build)}")
    built = client.images.get(SIDECAR_IMAGE).id
    if previous not in (None, built):
        # the last build's image, untagged now: drop it and the layers only it used
        with suppress(docker.errors.DockerException):
            client.images.remove(previous)
    return SIDECAR_IMAGE
