"""A failing peer test shows what discoproxy and each peer printed.

Peers and proxies are module-scoped and only their own output tells why a connection was
reset or refused, so every ``ProxyProcess`` and ``PeerProcess`` reachable from a failed
test's fixtures (directly, or inside a dataclass or dict) is added to its report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterator

import docker
import pytest
from loguru import logger

from integration.docker_support import (
    DockerResources,
    docker_resources,
    ensure_image,
    require_docker,
)
from integration.peers import PeerProcess
from tests.support import ProxyProcess

# Enough to see the failing connection's close line and any traceback, not a whole run.
REPORT_TAIL_LINES = 200


def _processes(value: object, depth: int = 0) -> Iterator[tuple[str, list[str]]]:
    if isinstance(value, ProxyProcess):
        yield "discoproxy", value.lines
    elif isinstance(value, PeerProcess):
        yield value.name, value.lines
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _processes(item, depth + 1)
    elif depth < 2 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from _processes(getattr(value, item.name), depth + 1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when == "call":
        seen: set[str] = set()
        for name, lines in _processes(getattr(item, "funcargs", {})):
            if name not in seen:
                seen.add(name)
                report.sections.append((f"output of {name}", "\n".join(lines[-REPORT_TAIL_LINES:])))
    return report


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    """A Docker engine with the test image (fails under CI=true when there is none)."""
    client = require_docker()
    ensure_image(client)
    yield client
    client.close()


@pytest.fixture
def resources(engine: docker.DockerClient) -> Iterator[DockerResources]:
    """Containers and networks under one unique prefix, removed after the test."""
    with docker_resources(engine) as created:
        yield created


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """What loguru logs in this process while the test runs, one message per line."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message).rstrip("\n")), format="{message}")
    yield lines
    logger.remove(sink)
