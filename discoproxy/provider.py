"""The provider plugin API: how a source of servers plugs into discoproxy.

Rules for this file:
- A provider is a class registered in the ``discoproxy.providers`` entry-point group
  (ours are registered in ``pyproject.toml`` exactly as a third-party one would be).
- It publishes **complete snapshots**: every time anything it sees changes, it calls
  ``publish`` with all of its current servers. Snapshots, not diffs: a provider that
  reconnects just publishes again, and nothing can drift. ``publish`` never blocks.
- A provider never sees other providers or the routing table. When it fails, it raises;
  the supervisor here logs it, keeps its last snapshot published, and runs it again with
  backoff. It never stops the proxy or the other providers.
- Providers import :mod:`discoproxy.model` and this module only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import anyio
from loguru import logger
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from discoproxy.config import ConfigError, ProxyConfig, describe_validation_error
from discoproxy.model import ServerDefinition

ENTRY_POINT_GROUP = "discoproxy.providers"
# Backoff after a provider fails: doubles from the first value up to the cap, and resets
# once the provider has run this long without failing.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
RETRY_RESET_AFTER_S = 60.0

Publish = Callable[[Iterable[ServerDefinition]], None]


class ProviderStatus:
    """How one provider is doing, for the admin API and /metrics (asyncio side only).

    ``starting`` until its first snapshot; ``running`` while it publishes; ``failed``
    (with ``error``) between a failure and its next snapshot; ``off`` when ``auto`` found
    no source (``error`` says why); ``disabled`` in the config.
    """

    __slots__ = ("error", "name", "state")

    def __init__(self, name: str, state: str = "starting", error: str | None = None) -> None:
        self.name = name
        self.state = state
        self.error = error


class Enabled(enum.StrEnum):
    """``auto``: on when the provider's source is there (directory exists, engine answers)."""

    AUTO = "auto"
    TRUE = "true"
    FALSE = "false"


class ProviderSettings(BaseModel):
    """Base of every provider's ``[providers.<name>]`` table; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: Enabled = Enabled.AUTO

    @field_validator("enabled", mode="before")
    @classmethod
    def _enabled(cls, value: Any) -> Any:
        """TOML/YAML booleans (``enabled = false``) mean what their strings mean."""
        return str(value).lower() if isinstance(value, bool) else value


@runtime_checkable
class Provider(Protocol):
    """What the proxy runs for each enabled provider."""

    #: pydantic model validating the provider's ``[providers.<name>]`` table
    Settings: ClassVar[type[ProviderSettings]]

    def __init__(self, name: str, settings: Any, config: ProxyConfig) -> None: ...

    @property
    def name(self) -> str: ...

    async def available(self) -> bool:
        """In ``auto`` mode: is the source there? Called once at start."""
        ...

    def unavailable_reason(self) -> str:
        """Why :meth:`available` said no, for the log line."""
        ...

    async def run(self, publish: Publish) -> None:
        """Publish snapshots until cancelled; raise on failure (the supervisor retries)."""
        ...


def discover() -> dict[str, type[Provider]]:
    """Every provider class registered in the entry-point group, by name."""
    found: dict[str, type[Provider]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found[entry.name] = entry.load()
    return found


def load_providers(
    config: ProxyConfig, registered: Mapping[str, type[Provider]] | None = None
) -> list[tuple[Provider, Enabled]]:
    """Instantiate every registered provider with its validated settings.

    Raises :class:`ConfigError` for a ``[providers.X]`` table that names no registered
    provider or does not validate; the message names the field and accepted values.
    """
    registered = discover() if registered is None else registered
    unknown = sorted(set(config.providers) - set(registered))
    if unknown:
        raise ConfigError(
            f"providers.{unknown[0]}: unknown provider; registered: {', '.join(sorted(registered))}"
        )
    loaded: list[tuple[Provider, Enabled]] = []
    for name in sorted(registered):
        cls = registered[name]
        try:
            settings = cls.Settings.model_validate(config.providers.get(name, {}))
        except ValidationError as exc:
            raise ConfigError(
                describe_validation_error(
                    exc,
                    "config",
                    prefix=f"providers.{name}.",
                    known_keys=list(cls.Settings.model_fields),
                )
            ) from exc
        loaded.append((cls(name, settings, config), settings.enabled))
    return loaded


async def supervise(
    name: str, provider: Provider, publish: Publish, status: ProviderStatus | None = None
) -> None:
    """Run ``provider`` forever: log failures, keep its last snapshot, retry with backoff."""
    delay = RETRY_FIRST_S
    log = logger.bind(provider=name)
    status = status or ProviderStatus(name)

    def publish_running(servers: Iterable[ServerDefinition]) -> None:
        status.state = "running"
        status.error = None
        publish(servers)

    while True:
        started = anyio.current_time()
        try:
            await provider.run(publish_running)
        except Exception as exc:  # a provider's failure must never reach the proxy
            failure = f"{type(exc).__name__}: {exc}"
        else:
            failure = "stopped unexpectedly"
        status.state = "failed"
        status.error = failure
        if anyio.current_time() - started > RETRY_RESET_AFTER_S:
            delay = RETRY_FIRST_S
        log.error(
            "provider {} failed: {}; keeping its last routes, retrying in {:.1f}s",
            name,
            failure,
            delay,
        )
        await anyio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)
