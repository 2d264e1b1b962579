"""compose.example.yml is valid for docker-compose and its labels are valid for discoproxy."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from providers.docker import DockerSettings, servers_from_containers
from tests.support import REPO, require_program

COMPOSE = REPO / "compose.example.yml"


def load() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_docker_compose_accepts_it() -> None:
    compose = require_program("docker-compose", "apt-get install docker-compose")
    result = subprocess.run(
        [compose, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(COMPOSE).parent,
    )
    assert result.returncode == 0, result.stderr


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
