"""The ``api`` provider: servers put and deleted through the admin API
(``PUT``/``DELETE /api/servers/{id}``, ``discoproxy server put FILE``), kept in a state
file so a restart keeps them.

Rules for this file:
- A document is validated exactly as a server file is (:func:`providers.file.validate_server`:
  the same Infrarust translation, the same messages), before anything is written: a bad
  one is refused with that message and changes nothing.
- The state file (``[providers.api] state_file``) is the truth: written atomically
  (temp file in the same directory, fsync, rename) before the new snapshot is published,
  read at start (writes wait for that reading: until then they are refused, changing
  nothing). A document in it that no longer validates (an upgrade changed the schema) is
  reported naming the file and the id and not routed, but kept in the file until it is
  put again or deleted; the others load.
- ``auto``: on when the admin API takes writes (``admin.token`` and ``read_only =
  false``) or the state file exists (its servers stay routed).
- Writes are one at a time (a lock): two PUTs never lose each other's server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
from loguru import logger

from discoproxy.model import ServerDefinition
from discoproxy.provider import (
    ConfigError,
    LoadResult,
    ProviderSettings,
    ProxyConfig,
    Publish,
    StoreUnavailable,
    write_atomically,
)
from providers.file import validate_server

STATE_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class ApiSettings(ProviderSettings):
    """``[providers.api]``: ``enabled``, ``state_file``."""

    state_file: Path = Path("api-servers.json")


def check_id(server_id: str) -> str:
    if not _ID_RE.match(server_id):
        raise ConfigError(
            f"api servers/{server_id}: id: expected letters, digits, '.', '_' or '-' (at most "
            "200, starting with a letter or digit), e.g. 'survival'",
            "api",
        )
    return server_id


class ApiProvider:
    """Publishes the servers the admin API stores."""

    Settings: ClassVar[type[ProviderSettings]] = ApiSettings

    def __init__(self, name: str, settings: ApiSettings, config: ProxyConfig) -> None:
        self.name = name
        self.path = settings.state_file
        admin = config.admin
        has_token = bool(admin.token or admin.token_file)
        self._writable = bool(admin.listen) and has_token and not admin.read_only
        self._documents: dict[str, dict[str, Any]] = {}
        self._invalid: dict[str, Any] = {}  # stored documents that no longer validate: kept
        self._servers: dict[str, ServerDefinition] = {}
        self._loaded = False  # writes wait for the state file's first reading
        self._publish: Publish | None = None
        self._lock = anyio.Lock()
        self._log = logger.bind(provider=name)

    async def available(self) -> bool:
        return self._writable or self.path.exists()

    def unavailable_reason(self) -> str:
        return (
            f"the admin API takes no writes (needs admin.token and admin.read_only = false) "
            f"and {self.path} does not exist"
        )

    def _where(self, server_id: str) -> Path:
        return Path(f"{self.path}#{server_id}")

    def _read_state(
        self,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, ServerDefinition], dict[str, Any], list[str]]:
        """(valid documents, their servers, invalid documents, errors) of the state file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, {}, {}, []
        try:
            state = json.loads(text)
            documents = state["servers"]
            if state.get("version") != STATE_VERSION or not isinstance(documents, dict):
                raise ValueError(f"expected version {STATE_VERSION} and a servers object")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path}: not an api state file: {exc}", str(self.path)) from exc
        servers: dict[str, ServerDefinition] = {}
        kept: dict[str, dict[str, Any]] = {}
        invalid: dict[str, Any] = {}
        errors: list[str] = []
        for server_id, document in documents.items():
            try:
                if not isinstance(document, dict):
                    raise ConfigError(f"{self._where(server_id)}: expected an object", "api")
                server, _ = validate_server({**document, "id": server_id}, self._where(server_id))
            except ConfigError as exc:
                errors.append(str(exc))
                invalid[server_id] = document  # written back as it was, until replaced
                continue
            servers[server_id] = server
            kept[server_id] = document
        return kept, servers, invalid, errors

    async def load_once(self) -> LoadResult:
        _, servers, _, errors = self._read_state()
        return LoadResult(tuple(servers.values()), tuple(errors), source=str(self.path))

    async def run(self, publish: Publish) -> None:
        async with self._lock:
            self._documents, self._servers, self._invalid, errors = self._read_state()
            self._loaded = True
        for error in errors:
            self._log.error("api server not routed (kept in the file): {}", error)
        self._publish = publish
        publish(list(self._servers.values()))
        await anyio.sleep_forever()

    def _ready(self) -> None:
        if not self._loaded:
            raise StoreUnavailable(
                f"{self.path} is not loaded (see the provider's error); nothing was changed"
            )

    def server_documents(self) -> dict[str, dict[str, Any]]:
        return dict(self._documents)

    async def put_server(
        self, server_id: str, document: dict[str, Any]
    ) -> tuple[ServerDefinition, list[str]]:
        check_id(server_id)
        given = document.get("id", server_id)
        if given != server_id:
            raise ConfigError(
                f"api servers/{server_id}: id: {given!r} in the body, {server_id!r} in the "
                "path; they must be the same (or leave id out)",
                "api",
            )
        stored = {k: v for k, v in document.items() if k != "id"}
        server, warnings = validate_server(
            {**json.loads(json.dumps(stored)), "id": server_id}, Path(f"api servers/{server_id}")
        )
        async with self._lock:
            self._ready()
            documents = {**self._documents, server_id: stored}
            invalid = {k: v for k, v in self._invalid.items() if k != server_id}
            await anyio.to_thread.run_sync(self._write, {**invalid, **documents})
            self._documents, self._invalid = documents, invalid
            self._servers = {**self._servers, server_id: server}
            self._published()
        self._log.info("api server {} put: {}", server_id, ", ".join(server.domains) or "-")
        return server, warnings

    async def delete_server(self, server_id: str) -> bool:
        async with self._lock:
            self._ready()
            if server_id not in self._documents and server_id not in self._invalid:
                return False
            documents = {k: v for k, v in self._documents.items() if k != server_id}
            invalid = {k: v for k, v in self._invalid.items() if k != server_id}
            await anyio.to_thread.run_sync(self._write, {**invalid, **documents})
            self._documents, self._invalid = documents, invalid
            self._servers = {k: v for k, v in self._servers.items() if k != server_id}
            self._published()
        self._log.info("api server {} deleted", server_id)
        return True

    def _published(self) -> None:
        if self._publish is not None:
            self._publish(list(self._servers.values()))

    def _write(self, documents: dict[str, Any]) -> None:
        body = json.dumps({"version": STATE_VERSION, "servers": documents}, indent=2) + "\n"
        write_atomically(self.path, body)
