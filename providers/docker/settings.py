"""``[providers.docker]``: where the engine is and how containers are reached."""

from __future__ import annotations

import ipaddress
import os
import re

from pydantic import Field, field_validator

from discoproxy.model import BackendAddress
from discoproxy.provider import ProviderSettings

DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"
DEFAULT_LABEL_PREFIX = "infrarust"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?$")


def _default_endpoint() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_ENDPOINT


class DockerSettings(ProviderSettings):
    """``[providers.docker]``; ``enabled = "auto"`` is on when the engine answers."""

    endpoint: str = Field(
        default_factory=_default_endpoint,
        description="Docker engine API: `unix:///path`, `tcp://host:port` (TLS from "
        "`DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`) or `ssh://`.",
        json_schema_extra={"doc_default": f"`$DOCKER_HOST`, else `{DEFAULT_ENDPOINT}`"},
    )
    label_prefix: str = Field(
        default=DEFAULT_LABEL_PREFIX,
        description="Labels are `<prefix>.domains`, `<prefix>.port`, …",
    )
    network: str | None = Field(
        default=None,
        description="Network to reach containers on when they are attached to it, unless "
        "their `network` label says otherwise.",
    )
    host_address: str = Field(
        default="127.0.0.1",
        description="Address of the Docker host as seen from discoproxy: used for "
        "`network_mode: host` containers and for published ports.",
    )
    use_published_ports: bool = Field(
        default=False,
        description="Connect to the host port each container publishes for its `port` "
        "(at `host_address`, or the binding's own IP) instead of the container's IP.",
    )
    api_timeout: int = Field(
        default=10,
        ge=1,
        description="Seconds for each API call (listing, version); the event stream has none.",
    )

    @field_validator("label_prefix")
    @classmethod
    def _label_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value):
            raise ValueError(
                f"invalid label prefix {value!r}; expected letters, digits, '.', '-' or '_', "
                "not ending with '.', e.g. 'infrarust'"
            )
        return value

    @field_validator("host_address")
    @classmethod
    def _host_address(cls, value: str) -> str:
        host = value.strip().removeprefix("[").removesuffix("]")
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return BackendAddress.parse(host).host


class SwarmSettings(DockerSettings):
    """``[providers.swarm]``: a Swarm manager's services; ``enabled = "auto"`` is on when
    the engine answers and is a manager of an active swarm."""

    poll_interval: float = Field(
        default=1.0,
        ge=0.2,
        le=60,
        description="Seconds between two listings of the swarm's services and tasks when "
        "no service or node event comes (tasks on other nodes raise none here): a task that "
        "starts or stops anywhere is routed within this, plus one listing.",
    )

    @field_validator("use_published_ports")
    @classmethod
    def _no_published_ports(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "use_published_ports = true cannot work for Swarm services: their published "
                "ports go through the routing mesh's VIP; tasks are reached on their own IP "
                "on the service's network (set `network`)"
            )
        return value
