"""The ``mc_router_routes`` provider: itzg/mc-router's routes file (its
``-routes-config`` JSON), followed live, as mc-router reads it (issue 18).

    {"default-server": "lobby:25565",
     "mappings": {"survival.example.com": "survival:25565", ...}}

Rules for this file:
- Each mapping is one server: its key the domain, its value the backend (``host:port``;
  the port defaults to 25565); ``default-server`` is a catch-all server named
  ``default``. Server ids are the mapping keys, so routes read ``<key>@mc_router_routes``.
- A file that does not parse, or a mapping that does not validate, is reported naming
  the file and the key, and the file's **last good version stays published**, as server
  files do (a bad mapping drops that mapping only).
- A missing file is no routes (mc-router skips it too); it is followed until it appears.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import anyio
import watchfiles
from loguru import logger
from pydantic import ValidationError

from discoproxy.model import ServerDefinition
from discoproxy.provider import LoadResult, ProviderSettings, ProxyConfig, Publish

WATCH_STEP_MS = 50
WATCH_DEBOUNCE_MS = 300
MISSING_DIR_POLL_S = 0.5
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class McRouterRoutesSettings(ProviderSettings):
    """``[providers.mc_router_routes]``: ``enabled`` (auto = on when ``path`` is set and
    exists), ``path`` of the routes file."""

    path: Path | None = None


def servers_from_routes(text: str, where: str) -> tuple[list[ServerDefinition], list[str]]:
    """The servers of a routes file, and the errors (each naming the file and key).
    Raises ValueError when the file as a whole cannot be read."""
    try:
        document = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(document, Mapping):
        raise ValueError(f'{where}: expected {{"default-server": …, "mappings": {{…}}}}')
    unknown = sorted(set(document) - {"default-server", "mappings"})
    if unknown:
        raise ValueError(
            f"{where}: {unknown[0]}: unknown key; mc-router's routes file has "
            "default-server and mappings"
        )
    mappings = document.get("mappings") or {}
    if not isinstance(mappings, Mapping):
        raise ValueError(f"{where}: mappings: expected an object of domain → backend")
    servers: list[ServerDefinition] = []
    errors: list[str] = []
    entries: list[tuple[str, Any, dict[str, Any]]] = [
        (str(domain), backend, {"domains": [str(domain)]}) for domain, backend in mappings.items()
    ]
    default = document.get("default-server")
    if default:
        entries.append(("default-server", default, {"default": True}))
    for key, backend, fields in entries:
        if not isinstance(backend, str) or not backend.strip():
            errors.append(f"{where}: {key}: expected a backend 'host:port', got {backend!r}")
            continue
        server_id = "default" if key == "default-server" else _ID_UNSAFE.sub("_", key.lower())
        try:
            servers.append(
                ServerDefinition.model_validate(
                    {"id": server_id, "addresses": [backend.strip()], **fields}
                )
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            errors.append(f"{where}: {key}: {field}: {first['msg']}")
    return servers, errors


class McRouterRoutesProvider:
    """Publishes the servers of one mc-router routes file, live."""

    Settings: ClassVar[type[ProviderSettings]] = McRouterRoutesSettings

    def __init__(self, name: str, settings: McRouterRoutesSettings, config: ProxyConfig) -> None:
        self._name = name
        self.path = settings.path
        self._log = logger.bind(provider=name)
        self._good: list[ServerDefinition] = []
        self._reported: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self._name

    async def available(self) -> bool:
        return self.path is not None and self.path.is_file()

    def unavailable_reason(self) -> str:
        if self.path is None:
            return "no path set ([providers.mc_router_routes] path = …)"
        return f"{self.path} does not exist"

    def _read(self) -> tuple[list[ServerDefinition], list[str]]:
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        return servers_from_routes(text, str(self.path))

    async def load_once(self) -> LoadResult:
        if self.path is None:
            return LoadResult((), errors=(f"provider {self._name}: {self.unavailable_reason()}",))
        try:
            servers, errors = self._read()
        except ValueError as exc:
            return LoadResult((), errors=(str(exc),), source=str(self.path))
        return LoadResult(tuple(servers), tuple(errors), source=str(self.path))

    async def run(self, publish: Publish) -> None:
        if self.path is None:
            raise ValueError(f"provider {self._name}: {self.unavailable_reason()}")
        path = self.path.absolute()
        self._reload(publish)
        while True:
            if not path.parent.is_dir():
                await anyio.sleep(MISSING_DIR_POLL_S)
                continue
            async for changes in watchfiles.awatch(
                path.parent,
                watch_filter=lambda _change, changed: Path(changed).name == path.name,
                step=WATCH_STEP_MS,
                debounce=WATCH_DEBOUNCE_MS,
                recursive=False,
                rust_timeout=1000,
                yield_on_timeout=True,
            ):
                if not path.parent.is_dir():
                    break
                if changes:
                    self._reload(publish)

    def _reload(self, publish: Publish) -> None:
        try:
            servers, errors = self._read()
        except ValueError as exc:
            self._log.error("routes file rejected (keeping its last good version): {}", exc)
            return
        for error in errors:
            if error not in self._reported:
                self._log.error("routes file entry not routed: {}", error)
        self._reported = tuple(errors)
        if servers != self._good or not self._good:
            self._good = servers
            self._log.info("routes file {}: {} routes", self.path, len(servers))
            publish(servers)
