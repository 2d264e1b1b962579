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
- ``check`` and ``routes --offline`` ask each enabled provider for its servers once
  (:func:`snapshot_once`): through its :meth:`LoadsOnce.load_once` when it has one (a
  read of its source with its own loading code, nothing watched, nothing logged), else by
  running it until its first ``publish``. Never a second reading of a provider's source
  elsewhere: the provider alone knows where its servers are.
- Providers import :mod:`discoproxy.model` and this module only (tests/test_boundaries.py
  checks it). What they need of the config — the proxy's settings they are built with,
  :class:`ConfigError`, the server-file readers (``read_document``,
  ``validate_document``, ``CONFIG_SUFFIXES``) and ``write_atomically`` — is re-exported
  here as part of the API.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import anyio
from loguru import logger
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from discoproxy.config import CONFIG_SUFFIXES as CONFIG_SUFFIXES
from discoproxy.config import ConfigError as ConfigError
from discoproxy.config import ProxyConfig as ProxyConfig
from discoproxy.config import describe_validation_error, environment_overrides, locate, source_text
from discoproxy.config import read_document as read_document
from discoproxy.config import validate_document as validate_document
from discoproxy.config import write_atomically as write_atomically
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

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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

    # Optional: a classmethod ``instances(name, settings) -> list[(name, settings)]`` for a
    # provider whose one table describes several sources (the Docker provider's
    # ``engines``): each is instantiated, supervised and named on its own.


class StoreUnavailable(Exception):
    """A :class:`ServerStore` cannot take writes now (its state is not loaded): try again."""


@runtime_checkable
class ServerStore(Protocol):
    """A provider whose servers are written through the admin API (``/api/servers``):
    the ``api`` provider. The admin listener holds it by this protocol only."""

    async def put_server(
        self, server_id: str, document: dict[str, Any]
    ) -> tuple[ServerDefinition, list[str]]:
        """Validate *document* as a server file, persist it, publish; the server and the
        warnings. Raises :class:`ConfigError` (the server file's message) or
        :class:`StoreUnavailable`, and changes nothing."""
        ...

    async def delete_server(self, server_id: str) -> bool:
        """Forget *server_id* (persisted, published); False when it was not there."""
        ...

    def server_documents(self) -> dict[str, dict[str, Any]]:
        """Each stored server's document, as it was put."""
        ...


@dataclass(frozen=True, slots=True)
class LoadResult:
    """A provider's servers read once, for ``check`` and ``routes --offline``.

    ``errors`` are the items it would not route, each a complete message naming its source
    (file and line, container and label), the field and the accepted form; ``warnings``
    the items routed with a remark, or a source that is not there yet. ``source`` says
    what was read (a directory, an engine endpoint), for the report.
    """

    servers: tuple[ServerDefinition, ...]
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    source: str = ""


@runtime_checkable
class LoadsOnce(Protocol):
    """A provider that can read its source once, offline (optional; ours both do)."""

    async def load_once(self) -> LoadResult:
        """What :meth:`Provider.run` would publish first, read once and without watching
        or logging. Raise when the source cannot be read at all (an engine that does not
        answer); a missing source that ``run`` would wait for is a warning."""
        ...


async def snapshot_once(provider: Provider, wait_s: float) -> LoadResult:
    """``provider``'s servers, once: its :meth:`LoadsOnce.load_once`, else its first
    ``publish`` from :meth:`Provider.run` (a warning if none comes within ``wait_s``).

    Raises what the provider raised (unwrapped from the task group).
    """
    if isinstance(provider, LoadsOnce):
        with anyio.move_on_after(wait_s):
            return await provider.load_once()
        raise TimeoutError(f"no answer within {wait_s:g}s")
    captured: list[tuple[ServerDefinition, ...]] = []
    try:
        with anyio.move_on_after(wait_s):
            async with anyio.create_task_group() as tg:

                def publish(servers: Iterable[ServerDefinition]) -> None:
                    captured.append(tuple(servers))
                    tg.cancel_scope.cancel()

                tg.start_soon(provider.run, publish)
    except ExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if not captured:
        return LoadResult((), warnings=(f"provider {provider.name}: no routes within {wait_s:g}s",))
    return LoadResult(captured[0])


def discover() -> dict[str, type[Provider]]:
    """Every provider class registered in the entry-point group, by name."""
    found: dict[str, type[Provider]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found[entry.name] = entry.load()
    return found


def load_providers(
    config: ProxyConfig,
    registered: Mapping[str, type[Provider]] | None = None,
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[tuple[Provider, Enabled]]:
    """Instantiate every registered provider with its validated settings.

    Raises :class:`ConfigError` for a ``[providers.X]`` table that names no registered
    provider or does not validate; the message names where the key was written (*path*,
    the file ``config`` was loaded from, and its line; ``environment`` for a key set by a
    ``DISCOPROXY_*`` variable of *environ*), the field and the accepted values.
    """
    loaded: list[tuple[Provider, Enabled]] = []
    for name, cls, settings in provider_settings(config, registered, path, environ):
        instances = getattr(cls, "instances", None)
        for instance, instance_settings in (
            instances(name, settings) if callable(instances) else [(name, settings)]
        ):
            loaded.append((cls(instance, instance_settings, config), instance_settings.enabled))
    return loaded


def provider_settings(
    config: ProxyConfig,
    registered: Mapping[str, type[Provider]] | None = None,
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[tuple[str, type[Provider], ProviderSettings]]:
    """Every registered provider's validated settings, nothing instantiated (a reload
    checks them so); raises :class:`ConfigError` as :func:`load_providers` says."""
    registered = discover() if registered is None else registered
    source = str(path) if path is not None else "environment" if environ else "config"
    text = source_text(path) if path is not None else None
    overrides = environment_overrides(environ) if environ and path is not None else None
    unknown = sorted(set(config.providers) - set(registered))
    if unknown:
        where = locate(source, text, ("providers", unknown[0]), overrides)
        raise ConfigError(
            f"{where}: providers.{unknown[0]}: unknown provider; registered: "
            f"{', '.join(sorted(registered))}",
            source,
        )
    validated = []
    for name in sorted(registered):
        cls = registered[name]
        try:
            settings = cls.Settings.model_validate(config.providers.get(name, {}))
        except ValidationError as exc:
            raise ConfigError(
                describe_validation_error(
                    exc,
                    source,
                    text,
                    at=("providers", name),
                    model=cls.Settings,
                    environment=overrides,
                ),
                source,
            ) from exc
        validated.append((name, cls, settings))
    return validated


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
