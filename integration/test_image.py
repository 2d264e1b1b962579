"""The sidecar image end to end, on a real Docker engine.

The image is built from the repository's Dockerfile on the offline base
(``image/build-base-image.sh``, cached) with the host's wheelhouse
(``image/build-wheels.sh``), once per session. It then runs as users run it: the Docker
socket mounted read-only, a config file mounted and ``DISCOPROXY_*`` variables set, its
port published on 127.0.0.1. A labelled container started on its network afterwards is
reached through that port with a Minecraft login handshake (the backend answers with its
own name, then echoes). The process must run as an unprivileged user holding the socket's
group, and the image's HEALTHCHECK (``discoproxy health``) must report healthy. The sidecar
and the one-off commands are testcontainers containers; the sidecar counts as started once
discoproxy logs that it listens.

``compose.example.yml`` is brought up with docker-compose as written, plus
``integration/compose.ci.yml`` for what cannot work offline (the game servers' image, the
published port), and exercised the same way: every domain of its labels, and a server file
in its servers volume. That stays a ``docker-compose`` child process: testcontainers'
``DockerCompose`` drives only the ``docker compose`` plugin (v2) and takes no project
name, and Debian's ``docker-compose`` is v1.

Every container and network is named with a unique prefix (compose: a unique project) and
removed afterwards (a one-off by testcontainers when its ``with`` ends); the base image and
the built image stay for the next run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from integration.docker_support import (
    BACKEND_SCRIPT,
    DockerResources,
    build_sidecar_image,
    docker_resources,
    ensure_image,
    require_docker,
    unique_prefix,
)
from tests.proxy.helpers import handshake
from tests.support import REPO, require_program

pytestmark = pytest.mark.peer

SOCKET = "/var/run/docker.sock"
PROXY_PORT = "25565/tcp"
CONFIG_IN_CONTAINER = "/etc/discoproxy/config.toml"
SERVERS_IN_CONTAINER = "/etc/discoproxy/servers"
# set through DISCOPROXY_ADMIN__LISTEN: `discoproxy health` must find it the same way
ADMIN_LISTEN = "127.0.0.1:8405"
COMPOSE_FILE = REPO / "compose.example.yml"
COMPOSE_CI_FILE = REPO / "integration" / "compose.ci.yml"
# the image's own default; tests override only the interval
DEFAULT_HEALTH_INTERVAL_S = 30
TEST_HEALTH_INTERVAL_NS = 1_000_000_000
# the offline image is ~190 MB: the base plus a virtualenv, no compilers, no build stage
MAX_IMAGE_BYTES = 250 * 1024 * 1024
# Deadlines, not measurements.
LISTENING_WITHIN_S = 60
ONE_OFF_WITHIN_S = 60
HEALTHY_WITHIN_S = 60.0
ROUTED_WITHIN_S = 30.0
REPLY_TIMEOUT_S = 5.0
COMPOSE_TIMEOUT_S = 180.0
LOG_TAIL_LINES = 80


@pytest.fixture(scope="session")
def sidecar_image() -> str:
    """The image built from this tree (fails under CI=true when there is no engine)."""
    client = require_docker()
    try:
        return build_sidecar_image(client)
    finally:
        client.close()


# pytest's directories are 0700: the container's uid 10001 must read what is mounted.
def readable_directory(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    path.chmod(0o755)
    return path


def write_readable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o644)
    return path


def write_server(directory: Path, name: str, domain: str, address: str) -> None:
    write_readable(
        directory / f"{name}.toml", f'domains = ["{domain}"]\naddresses = ["{address}"]\n'
    )


def container_logs(container: Any) -> str:
    try:
        text = container.logs(tail=LOG_TAIL_LINES).decode(errors="replace")
    except docker.errors.DockerException as exc:
        text = f"(no logs: {exc})"
    return f"--- logs of {container.name}:\n{text}"


def first_reply(address: tuple[str, int], domain: str) -> bytes:
    """The first bytes answered to a login handshake for ``domain`` (b'' when none)."""
    try:
        with socket.create_connection(address, timeout=REPLY_TIMEOUT_S) as conn:
            conn.sendall(handshake(domain))
            return conn.recv(65536)
    except OSError:
        return b""


def wait_for_backend(
    address: tuple[str, int], domain: str, name: str, context: Any, within_s: float
) -> None:
    """Until a connection for ``domain`` reaches the backend called ``name``, then echoes."""
    deadline = time.monotonic() + within_s
    while (last := first_reply(address, domain)) != name.encode():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{domain} via {address} did not reach {name} within {within_s} s "
                f"(last reply {last!r})\n{container_logs(context)}"
            )
        time.sleep(0.2)
    with socket.create_connection(address, timeout=REPLY_TIMEOUT_S) as conn:
        conn.sendall(handshake(domain))
        assert conn.recv(65536) == name.encode()
        conn.sendall(b"still open")
        assert conn.recv(65536) == b"still open"


def wait_until_healthy(container: Any, within_s: float = HEALTHY_WITHIN_S) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        container.reload()
        health = container.attrs["State"].get("Health") or {}
        if health.get("Status") == "healthy":
            return dict(health)
        if health.get("Status") == "unhealthy" or time.monotonic() > deadline:
            raise AssertionError(
                f"{container.name} is {health.get('Status')!r}, health log: "
                f"{health.get('Log')}\n{container_logs(container)}"
            )
        time.sleep(0.2)


def published_port(container: Any, port: str = PROXY_PORT) -> tuple[str, int]:
    container.reload()
    binding = container.attrs["NetworkSettings"]["Ports"][port][0]
    return binding["HostIp"], int(binding["HostPort"])


def process_status(container: Any) -> dict[str, str]:
    """PID 1's /proc status fields (discoproxy itself: the entry point execs it)."""
    result = container.exec_run(["cat", "/proc/1/status"])
    assert result.exit_code == 0, result.output
    fields = (line.partition(":") for line in result.output.decode().splitlines())
    return {key: value.strip() for key, _, value in fields}


# -- the image ----------------------------------------------------------------------------


def test_the_image_runs_discoproxy_serve_with_a_health_check(
    engine: docker.DockerClient, sidecar_image: str
) -> None:
    image = engine.images.get(sidecar_image)
    config = image.attrs["Config"]
    assert config["Entrypoint"] == ["discoproxy-entrypoint"]
    assert config["Cmd"] == ["serve"]
    assert config["Healthcheck"]["Test"] == ["CMD", "discoproxy", "health"]
    assert config["Healthcheck"]["Interval"] == DEFAULT_HEALTH_INTERVAL_S * 1_000_000_000
    assert "25565/tcp" in config["ExposedPorts"]
    assert f"DISCOPROXY_SERVERS_DIR={SERVERS_IN_CONTAINER}" in config["Env"]
    assert image.attrs["Size"] < MAX_IMAGE_BYTES, f"{image.attrs['Size'] / 2**20:.0f} MiB"


@pytest.mark.parametrize("user", [None, "10001:10001"], ids=["as-root", "as-user"])
def test_a_one_off_command_runs_started_as_root_or_as_a_user(
    engine: docker.DockerClient, sidecar_image: str, user: str | None
) -> None:
    """Started as root the entry point drops privileges; started as a user it just execs."""
    with DockerContainer(sidecar_image).with_command(["labels"]).with_kwargs(user=user) as one_off:
        exited = one_off.get_wrapped_container().wait(timeout=ONE_OFF_WITHIN_S)
        output, errors = one_off.get_logs()
    assert exited["StatusCode"] == 0, errors
    assert b"domains" in output


# -- the sidecar, run as users run it ------------------------------------------------------


@dataclass
class Sidecar:
    container: Any  # the docker SDK's, as the tests inspect and exec into it
    resources: DockerResources
    network: Network
    address: tuple[str, int]
    servers: Path

    def domain(self, name: str) -> str:
        return f"{name}.{self.resources.prefix}.test"


@pytest.fixture(scope="module")
def sidecar(
    engine: docker.DockerClient, sidecar_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sidecar]:
    """The image with the socket (read-only), a mounted config and env, on its own network.

    The mounted config gives the Docker provider this run's own label prefix, so only the
    containers of this module are routed; the servers directory is mounted for the file
    provider.
    """
    with docker_resources(engine, "dpi") as resources:
        network = resources.network("net")
        directory = readable_directory(tmp_path_factory.mktemp("sidecar"))
        config = write_readable(
            directory / "config.toml",
            f'[providers.docker]\nlabel_prefix = "{resources.prefix}"\n',
        )
        servers = readable_directory(directory / "servers")
        sidecar = (
            DockerContainer(sidecar_image)
            .with_env("DISCOPROXY_CONFIG", CONFIG_IN_CONTAINER)
            .with_env("DISCOPROXY_ADMIN__LISTEN", ADMIN_LISTEN)
            .with_env("DISCOPROXY_LOG_LEVEL", "DEBUG")
            .with_volume_mapping(SOCKET, SOCKET, "ro")
            .with_volume_mapping(config, CONFIG_IN_CONTAINER, "ro")
            .with_volume_mapping(servers, SERVERS_IN_CONTAINER, "ro")
            .with_network(network)
            .with_kwargs(healthcheck={"interval": TEST_HEALTH_INTERVAL_NS})
            # discoproxy's own line once its listener is bound (and PID 1 is discoproxy)
            .waiting_for(
                LogMessageWaitStrategy("listening on ").with_startup_timeout(LISTENING_WITHIN_S)
            )
        )
        # Published on loopback only, at a port the engine picks: with_bind_ports takes no
        # host address, docker-py takes (address, None).
        sidecar.ports[PROXY_PORT] = ("127.0.0.1", None)  # type: ignore[assignment]
        container = resources.start("sidecar", sidecar).get_wrapped_container()
        yield Sidecar(container, resources, network, published_port(container), servers)


def test_the_sidecar_runs_unprivileged_with_the_socket_group(sidecar: Sidecar) -> None:
    status = process_status(sidecar.container)
    socket_gid = sidecar.container.exec_run(["stat", "-c", "%g", SOCKET]).output.decode().strip()
    cmdline = sidecar.container.exec_run(["cat", "/proc/1/cmdline"]).output.split(b"\0")
    assert b"serve" in cmdline and any(part.endswith(b"discoproxy") for part in cmdline)
    assert status["Uid"].split() == ["10001"] * 4, status["Uid"]
    assert status["Gid"].split() == ["10001"] * 4, status["Gid"]
    assert socket_gid in status["Groups"].split(), (socket_gid, status["Groups"])
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"] == "1"


def test_the_sidecar_becomes_healthy_through_discoproxy_health(sidecar: Sidecar) -> None:
    health = wait_until_healthy(sidecar.container)
    # the check found the admin listener where DISCOPROXY_ADMIN__LISTEN moved it
    assert any(f"{ADMIN_LISTEN}/healthz" in entry["Output"] for entry in health["Log"]), health


def test_discoproxy_health_fails_when_nothing_answers(sidecar: Sidecar) -> None:
    result = sidecar.container.exec_run(["discoproxy", "health", "--admin", "127.0.0.1:1"])
    assert result.exit_code != 0, result.output
    assert b"unhealthy" in result.output


def test_a_container_labelled_after_start_routes_through_the_published_port(
    sidecar: Sidecar,
) -> None:
    wait_until_healthy(sidecar.container)
    domain = sidecar.domain("survival")
    labels = sidecar.resources.labels(domains=domain, port="25565")
    backend = sidecar.resources.run("survival", labels, networks=(sidecar.network,))
    wait_for_backend(sidecar.address, domain, backend.name, sidecar.container, ROUTED_WITHIN_S)


def test_a_server_file_in_the_mounted_directory_routes(sidecar: Sidecar) -> None:
    backend = sidecar.resources.run("lobby", {}, networks=(sidecar.network,))
    domain = sidecar.domain("lobby")
    # the container's name resolves on the user network (Docker's DNS)
    write_server(sidecar.servers, "lobby", domain, f"{backend.name}:25565")
    wait_for_backend(sidecar.address, domain, backend.name, sidecar.container, ROUTED_WITHIN_S)


# -- compose.example.yml ---------------------------------------------------------------------


def _compose(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMPOSE_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def test_compose_example_routes_every_labelled_domain_and_its_server_files(
    engine: docker.DockerClient, sidecar_image: str, tmp_path: Path
) -> None:
    compose = require_program("docker-compose", "apt-get install docker-compose")
    project = unique_prefix("dpc")
    servers = readable_directory(tmp_path / "servers")
    # a server file routing to a compose service by its DNS name on the project network
    write_server(servers, "lobby", "lobby.example.com", "survival:25565")
    env = {
        **os.environ,
        "PROXY_PUBLISH": "127.0.0.1:",  # an ephemeral loopback port
        "DPT_SIDECAR_IMAGE": sidecar_image,
        "DPT_SERVERS_DIR": str(servers),
        "DPT_BACKEND_IMAGE": ensure_image(engine),
        "DPT_BACKEND_SCRIPT": BACKEND_SCRIPT,
    }
    base = [compose, "-p", project, "-f", str(COMPOSE_FILE), "-f", str(COMPOSE_CI_FILE)]
    try:
        up = _compose([*base, "up", "-d", "--no-build"], env)
        assert up.returncode == 0, up.stderr
        ps = _compose([*base, "ps", "-q", "discoproxy"], env)
        sidecar = engine.containers.get(ps.stdout.strip())
        address = published_port(sidecar)
        assert address[0] == "127.0.0.1"
        for domain, name in [
            ("survival.example.com", "survival"),
            ("play.example.com", "survival"),
            ("a.creative.example.com", "creative"),
            ("lobby.example.com", "survival"),
        ]:
            wait_for_backend(address, domain, name, sidecar, ROUTED_WITHIN_S)
        wait_until_healthy(sidecar)
        assert process_status(sidecar)["Uid"].split()[0] == "10001"
    finally:
        try:
            down = _compose([*base, "down", "-v", "--remove-orphans", "-t", "5"], env)
        except subprocess.TimeoutExpired as exc:
            down = subprocess.CompletedProcess(exc.cmd, -1, "", f"timed out: {exc}")
        left = engine.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={project}"}
        )
        for container in left:
            container.remove(force=True)
        left_networks = engine.networks.list(
            filters={"label": f"com.docker.compose.project={project}"}
        )
        for network in left_networks:
            network.remove()
    assert down.returncode == 0, down.stderr
    assert not left and not left_networks, "docker-compose down left resources"
