"""``[providers.docker]``: where the engine is and how containers are reached."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from discoproxy.model import BackendAddress, label_duration
from discoproxy.provider import ProviderSettings

DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"
DEFAULT_LABEL_PREFIX = "infrarust"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?$")
_ENGINE_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,30}[a-z0-9])?$")
TLS_KEYS = ("tls_ca", "tls_cert", "tls_key")
# What an engine of ``engines`` may set for itself; the rest is the table's.
ENGINE_OVERRIDES = ("label_prefix", "network", "host_address", "use_published_ports")


def _check_tls(owner: str, endpoint: str, values: dict[str, Any]) -> None:
    """TLS files go with a ``tcp://`` endpoint, a client certificate with its key."""
    given = [key for key in TLS_KEYS if values.get(key) is not None]
    if given and not endpoint.startswith(("tcp://", "https://")):
        raise ValueError(f"{owner}{given[0]}: TLS needs a tcp:// endpoint, not {endpoint!r}")
    if (values.get("tls_cert") is None) != (values.get("tls_key") is None):
        raise ValueError(
            f"{owner}tls_cert and tls_key: give both (the client certificate and its key)"
        )
    for key in given:
        path = Path(values[key])
        if not path.is_file():
            raise ValueError(f"{owner}{key}: no file at {str(path)!r}")


class EngineSettings(BaseModel):
    """One engine of ``[[providers.docker.engines]]``: its own endpoint and TLS, and the
    settings it overrides; its routes are those of provider ``docker.<name>``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="Short name: routes are `<id>@docker.<name>`.")
    endpoint: str
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_verify: bool = True
    label_prefix: str | None = None
    network: str | None = None
    host_address: str | None = None
    use_published_ports: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _ENGINE_NAME_RE.match(value):
            raise ValueError(
                f"invalid engine name {value!r}; expected 1-32 lowercase letters, digits, "
                "'-' or '_', e.g. 'eu-1'"
            )
        return value

    @model_validator(mode="after")
    def _tls(self) -> Self:
        _check_tls("", self.endpoint, self.__dict__)
        return self


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
    tls_ca: Path | None = Field(
        default=None,
        description="For a `tcp://` endpoint: the CA certificate (PEM) the engine's "
        "certificate must chain to. Without any `tls_*` key, TLS comes from "
        "`DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`, as for the docker CLI.",
    )
    tls_cert: Path | None = Field(
        default=None, description="For a `tcp://` endpoint: the client certificate (PEM)."
    )
    tls_key: Path | None = Field(
        default=None, description="For a `tcp://` endpoint: the client certificate's key (PEM)."
    )
    tls_verify: bool = Field(
        default=True,
        description="Check the engine's certificate against `tls_ca` (or the system CAs) "
        "and its host name.",
    )
    mc_router_auto_scale_up: bool = Field(
        default=False,
        description="mc-router's `-auto-scale-up`: every `mc-router.host` container "
        "without its own `mc-router.auto-scale-up` label is started by a login.",
    )
    mc_router_auto_scale_down: bool = Field(
        default=False,
        description="mc-router's `-auto-scale-down`: every `mc-router.host` container "
        "without its own `mc-router.auto-scale-down` label is stopped after "
        "`mc_router_auto_scale_down_after` with no player.",
    )
    mc_router_auto_scale_down_after: float = Field(
        default=600.0,
        gt=0,
        description="mc-router's `-auto-scale-down-after`: seconds (or `10m`, `1h`) an "
        "mc-router container scaled down by label or by default stays up with no player.",
    )
    engines: tuple[EngineSettings, ...] = Field(
        default=(),
        description="Several engines at once (`[[providers.docker.engines]]`, each with "
        "`name`, `endpoint`, optional `tls_*` and its own `label_prefix`, `network`, "
        "`host_address`, `use_published_ports`): each is followed on its own, as provider "
        "`docker.<name>`, so one engine down leaves the others' routes alone. Replaces "
        "`endpoint`.",
        json_schema_extra={"doc_default": "none"},
    )

    @model_validator(mode="after")
    def _engines(self) -> Self:
        _check_tls("", self.endpoint, self.__dict__)
        if not self.engines:
            return self
        explicit = sorted({"endpoint", *TLS_KEYS, "tls_verify"} & self.model_fields_set)
        if explicit:
            raise ValueError(
                f"{explicit[0]}: set it on each of `engines` instead (with `engines`, "
                "the table's own endpoint is not used)"
            )
        names = [engine.name for engine in self.engines]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"engines: the name {twice[0]!r} is used twice; names must differ")
        for index, engine in enumerate(self.engines):  # its overrides, checked here too
            try:
                self._for_engine(engine)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                message = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"engines.{index} ({engine.name}): {where}: {message}") from None
        return self

    def per_engine(self) -> list[tuple[str | None, Self]]:
        """``(engine name, its settings)`` for each engine; ``[(None, self)]`` without
        ``engines``."""
        if not self.engines:
            return [(None, self)]
        return [(engine.name, self._for_engine(engine)) for engine in self.engines]

    def _for_engine(self, engine: EngineSettings) -> Self:
        """This table with ``engine``'s endpoint, TLS and overrides, validated."""
        update: dict[str, Any] = {
            "endpoint": engine.endpoint,
            "tls_ca": engine.tls_ca,
            "tls_cert": engine.tls_cert,
            "tls_key": engine.tls_key,
            "tls_verify": engine.tls_verify,
            "engines": (),
        }
        for key in ENGINE_OVERRIDES:
            value = getattr(engine, key)
            if value is not None:
                update[key] = value
        return type(self).model_validate({**self.model_dump(exclude={"engines"}), **update})

    @field_validator("mc_router_auto_scale_down_after", mode="before")
    @classmethod
    def _down_after(cls, value: Any) -> Any:
        return label_duration(value, "seconds (600) or a duration such as 30s, 10m or 1h")

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

    @field_validator("engines")
    @classmethod
    def _no_engines(cls, value: tuple[EngineSettings, ...]) -> tuple[EngineSettings, ...]:
        if value:
            raise ValueError(
                "several engines are not supported for Swarm: a swarm is read from one "
                "manager; set `endpoint` to it (and a [providers.docker] engine list for "
                "standalone engines)"
            )
        return value

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
