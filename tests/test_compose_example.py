"""compose.example.yml is valid for docker-compose and its labels are valid for discoproxy;
integration/compose.ci.yml (used by integration/test_image.py) changes only what cannot
work offline."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from providers.docker import DockerSettings, servers_from_containers
from tests.support import REPO, require_program

COMPOSE = REPO / "compose.example.yml"
COMPOSE_CI = REPO / "integration" / "compose.ci.yml"
# what integration/test_image.py sets for compose.ci.yml
CI_VARIABLES = {
    "PROXY_PUBLISH": "127.0.0.1:",
    "DPT_SIDECAR_IMAGE": "discoproxy-test/sidecar:latest",
    "DPT_SERVERS_DIR": "/tmp/servers",
    "DPT_BACKEND_IMAGE": "discoproxy-test/scratch:latest",
    "DPT_BACKEND_SCRIPT": "print()",
}


def load() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The configuration docker-compose resolves from ``files`` (merged, interpolated)."""
    compose = require_program("docker-compose", "apt-get install docker-compose")
    argv = [compose]
    for file in files:
        argv += ["-f", str(file)]
    result = subprocess.run(
        [*argv, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(COMPOSE).parent,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def test_docker_compose_accepts_it() -> None:
    sidecar = compose_config(COMPOSE)["services"]["discoproxy"]
    # as written: built from this repository, players on the host's port 25565
    assert sidecar["build"]["context"] == str(REPO)
    assert [(p["published"], p["target"]) for p in sidecar["ports"]] == [(25565, 25565)]


def test_the_ci_override_replaces_only_what_cannot_work_offline() -> None:
    example = compose_config(COMPOSE)
    ci = compose_config(COMPOSE, COMPOSE_CI, env=CI_VARIABLES)
    assert ci["networks"] == example["networks"]
    assert set(ci["services"]) == set(example["services"])
    for name, service in example["services"].items():
        merged = ci["services"][name]
        assert merged.get("labels") == service.get("labels"), name
        assert set(merged["networks"]) == set(service["networks"]), name
        environment = service.get("environment", {})
        assert environment.items() <= merged.get("environment", {}).items(), name
    sidecar, example_sidecar = ci["services"]["discoproxy"], example["services"]["discoproxy"]
    for key in ("command", "environment", "restart"):
        assert sidecar[key] == example_sidecar[key], key
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in sidecar["volumes"]
    # the published port moves to an ephemeral one on loopback, never 25565 on the host
    assert sidecar["ports"] == ["127.0.0.1::25565/tcp"]


def test_the_sidecar_mounts_the_socket_read_only_and_a_servers_volume() -> None:
    sidecar = load()["services"]["discoproxy"]
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in sidecar["volumes"]
    assert any(v.endswith("/etc/discoproxy/servers:ro") for v in sidecar["volumes"])
    assert sidecar["command"][:1] == ["serve"]


def test_two_labelled_game_servers_share_a_network_with_the_sidecar() -> None:
    services = load()["services"]
    labelled = {
        n: s
        for n, s in services.items()
        if any(k.startswith("infrarust.") for k in s.get("labels", {}))
    }
    assert len(labelled) == 2
    for service in labelled.values():
        assert set(service["networks"]) & set(services["discoproxy"]["networks"])


def test_its_labels_give_valid_servers() -> None:
    services = load()["services"]
    records = [
        {
            "Id": f"{index:064x}",
            "Names": [f"/{name}"],
            "State": "running",
            "Labels": service.get("labels", {}),
            "HostConfig": {"NetworkMode": "minecraft"},
            "NetworkSettings": {"Networks": {"minecraft": {"IPAddress": f"172.20.0.{index + 2}"}}},
            "Ports": [],
        }
        for index, (name, service) in enumerate(sorted(services.items()))
    ]
    result = servers_from_containers(records, DockerSettings())
    assert [p for p in result.problems if p.dropped] == []
    domains = {s.id: s.domains for s in result.servers}
    assert domains == {
        "creative": ("*.creative.example.com",),
        "survival": ("survival.example.com", "play.example.com"),
    }
