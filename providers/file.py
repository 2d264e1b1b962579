"""The file provider: one server per ``servers_dir/*.toml|*.yaml|*.yml`` file, hot-reloaded.

Rules for this file:
- The server id is the file stem unless the file sets ``id``; Infrarust server files load
  unchanged.
- A file that fails to read, parse or validate is reported with its path, line/field and
  reason, and its **last good version stays published**; fixing the file applies it.
  The other files are never affected.
- Editors' temporary and hidden files (``.name``, ``name~``, ``#name#``, ``.swp``) are
  ignored; a file is read only once its size and mtime hold still across the read, so a
  truncate-then-write is never published half-written (a rename is atomic anyway).
- ``load_once`` (``check``, ``routes --offline``) reads the directory with the same code
  as ``run``, from ``[providers.file] directory`` when set, else ``servers_dir``.
- watchfiles (inotify) is used, not polling; ``WATCHFILES_FORCE_POLLING=1`` switches to
  polling for bind mounts and network filesystems that do not deliver events.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import anyio
import watchfiles
from loguru import logger
from pydantic.alias_generators import to_camel

from discoproxy.model import PROVIDER_SET_FIELDS, ServerDefinition
from discoproxy.provider import (
    CONFIG_SUFFIXES,
    ConfigError,
    LoadResult,
    ProviderSettings,
    ProxyConfig,
    Publish,
    read_document,
    validate_document,
)
from providers.infrarust import translate_server

# watchfiles yields a batch once the directory has been quiet this long: long enough to
# group an editor's save (write temp, fsync, rename), short enough to be live in < 500 ms.
WATCH_STEP_MS = 50
WATCH_DEBOUNCE_MS = 300
# A file is read once it has not been modified for QUIET_S (a writer pausing between
# chunks for less than that is never caught half-way), and read again if its size or
# mtime changed during the read; after STABLE_WAIT_MAX_S of constant writing we read anyway.
QUIET_S = 0.12
STABLE_WAIT_MAX_S = 2.0
# While servers_dir is missing, look for it again this often.
MISSING_DIR_POLL_S = 0.5


def is_server_file(path: Path) -> bool:
    name = path.name
    if name.startswith((".", "#")) or name.endswith(("~", ".swp", ".tmp")):
        return False
    return path.suffix.lower() in CONFIG_SUFFIXES


def load_server_file(path: Path) -> ServerDefinition:
    """Parse and validate one server file; raises :class:`ConfigError` naming the file."""
    return load_server_file_warned(path)[0]


def load_server_file_warned(path: Path) -> tuple[ServerDefinition, list[str]]:
    """Parse and validate one server file, Infrarust's keys translated
    (:mod:`providers.infrarust`): the server and the warnings, each naming the file and
    the key; raises :class:`ConfigError` naming the file."""
    data = read_document(path)
    data.setdefault("id", path.stem)
    return validate_server(data, path)


def validate_server(data: dict[str, Any], path: Path) -> tuple[ServerDefinition, list[str]]:
    """A server document as a server file's (also the ``api`` provider's JSON): the
    provider's own fields refused, Infrarust's keys translated, validated; the server and
    the warnings, each naming *path* and the key; raises :class:`ConfigError`."""
    for field in PROVIDER_SET_FIELDS:
        for key in (field, to_camel(field)):  # every field takes its camelCase alias too
            if key in data:
                raise ConfigError(
                    f"{path}: {key}: set by the provider that follows the server (Docker), "
                    "not by a server file; remove it",
                    str(path),
                )
    try:
        warnings = translate_server(data)
    except (ValueError, TypeError) as exc:  # TypeError: a value of a type a rule did not expect
        raise ConfigError(f"{path}: {exc}", str(path)) from None
    server = validate_document(ServerDefinition, data, path)
    waking = [
        key
        for key, set_ in (
            ("auto_start", server.auto_start),
            ("auto_stop_after", bool(server.auto_stop_after)),
            ("wake.allow", bool(server.wake.allow)),
        )
        if set_
    ]
    if waking:  # only the docker provider starts and stops what it routes
        warnings.append(
            f"{', '.join(waking)}: has no effect here: discoproxy starts and stops only "
            "Docker containers and Swarm services (labels); this server is routed while its "
            "addresses answer"
        )
    return server, [f"{path}: {warning}" for warning in warnings]


def unique_by_id(
    loaded: Iterable[tuple[Path, ServerDefinition]],
) -> tuple[list[ServerDefinition], list[ConfigError]]:
    """Keep the first file (in the given order) of each server id; report the others."""
    servers: list[ServerDefinition] = []
    errors: list[ConfigError] = []
    seen: dict[str, Path] = {}
    for path, server in loaded:
        if server.id in seen:
            errors.append(_duplicate_id(path, server.id, seen[server.id]))
            continue
        seen[server.id] = path
        servers.append(server)
    return servers, errors


def _duplicate_id(path: Path, server_id: str, other: Path) -> ConfigError:
    return ConfigError(
        f"{path}: id: {server_id!r} is already used by {other}; ids must be unique in servers_dir",
        str(path),
    )


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns)


class FileSettings(ProviderSettings):
    """``[providers.file]``: ``enabled`` (auto = on when servers_dir exists), ``directory``."""

    directory: Path | None = None


class FileProvider:
    """Publishes one server per file in the servers directory, live."""

    Settings: ClassVar[type[ProviderSettings]] = FileSettings

    def __init__(self, name: str, settings: FileSettings, config: ProxyConfig) -> None:
        self.name = name
        self.directory = settings.directory or config.servers_dir
        # how messages name the directory: by the setting it comes from
        field = "servers_dir" if settings.directory is None else "providers.file.directory"
        self._where = f"{field} {self.directory}"
        self._good: dict[Path, ServerDefinition] = {}
        self._errors: dict[Path, str] = {}
        self._log = logger.bind(provider=name)

    async def available(self) -> bool:
        return self.directory.is_dir()

    def unavailable_reason(self) -> str:
        return f"{self._where} does not exist"

    async def load_once(self) -> LoadResult:
        """The servers :meth:`run` publishes first, read once with the same reading code
        (settled files, first file name wins a duplicate id); nothing kept or logged."""
        if not self.directory.is_dir():
            warning = f"{self._where} does not exist; serve waits for it"
            return LoadResult((), warnings=(warning,), source=self._where)
        loaded: list[tuple[Path, ServerDefinition]] = []
        errors: list[str] = []
        warnings: list[str] = []
        for path in sorted(self._server_files()):
            result, warned = await self._read_settled(path)
            if isinstance(result, ConfigError):
                errors.append(str(result))
            elif result is not None:
                loaded.append((path, result))
                warnings += warned
        servers, duplicates = unique_by_id(loaded)
        errors += (str(error) for error in duplicates)
        return LoadResult(tuple(servers), tuple(errors), tuple(warnings), source=self._where)

    async def run(self, publish: Publish) -> None:
        announced_missing = False
        while True:
            if not self.directory.is_dir():
                if not announced_missing:
                    self._log.warning(
                        "{} is missing; keeping its {} servers until it is back",
                        self._where,
                        len(self._good),
                    )
                    announced_missing = True
                await anyio.sleep(MISSING_DIR_POLL_S)
                continue
            announced_missing = False
            await self.reload_all(publish)
            await self._watch(publish)

    async def _watch(self, publish: Publish) -> None:
        """Follow changes until the directory itself goes away."""
        directory = self.directory
        async for changes in watchfiles.awatch(
            directory,
            watch_filter=lambda _change, path: is_server_file(Path(path)),
            step=WATCH_STEP_MS,
            debounce=WATCH_DEBOUNCE_MS,
            recursive=False,
            yield_on_timeout=True,
            rust_timeout=1000,
            force_polling=_force_polling(),
        ):
            if not directory.is_dir():
                return
            paths = {Path(path) for _change, path in changes}
            if paths:
                await self.reload(paths, publish)

    def _server_files(self) -> set[Path]:
        return {p for p in self.directory.iterdir() if p.is_file() and is_server_file(p)}

    async def reload_all(self, publish: Publish) -> None:
        present = self._server_files()
        await self.reload(present | set(self._good) | set(self._errors), publish)

    async def reload(self, paths: set[Path], publish: Publish) -> None:
        for path in sorted(paths):
            await self._reload_one(path)
        publish(self.snapshot())

    def snapshot(self) -> list[ServerDefinition]:
        """Last good version of every file, first file name wins a duplicate id."""
        servers, duplicates = unique_by_id((path, self._good[path]) for path in sorted(self._good))
        for error in duplicates:
            self._log.error("server file rejected: {}", error)
        return servers

    async def _read_settled(
        self, path: Path
    ) -> tuple[ServerDefinition | ConfigError | None, list[str]]:
        """``path`` read once its size and mtime hold still: its server (and the
        warnings it loaded with), why it is rejected, or ``None`` when it is gone."""
        give_up = anyio.current_time() + STABLE_WAIT_MAX_S
        while True:
            before = _stat_key(path)
            if before is None:
                return None, []
            age = time.time() - before[1] / 1e9
            if age < QUIET_S and anyio.current_time() < give_up:
                await anyio.sleep(QUIET_S - max(age, 0.0))
                continue
            warnings: list[str] = []
            try:
                result: ServerDefinition | ConfigError
                result, warnings = load_server_file_warned(path)
            except ConfigError as exc:
                result = exc
            except Exception as exc:  # a bug met this file: it alone is rejected, not the dir
                logger.opt(exception=exc).error("server file {}: internal error", path)
                result = ConfigError(f"{path}: internal error reading it: {exc!r}", str(path))
            if _stat_key(path) == before or anyio.current_time() >= give_up:
                return result, warnings

    async def _reload_one(self, path: Path) -> None:
        result, warnings = await self._read_settled(path)
        if result is None:
            if self._good.pop(path, None) is not None:
                self._log.info("server file removed: {}", path)
            self._errors.pop(path, None)
            return
        if isinstance(result, ConfigError):
            message = str(result)
            if self._errors.get(path) != message:
                kept = "keeping its last good version" if path in self._good else "not loaded"
                self._log.error("server file rejected ({}): {}", kept, message)
            self._errors[path] = message
            return
        if self._errors.pop(path, None) is not None:
            self._log.info("server file fixed: {}", path)
        previous = self._good.get(path)
        self._good[path] = result
        if previous != result:
            self._log.info("server file {}: {}", "changed" if previous else "loaded", path)
            for warning in warnings:  # once per version of the file
                self._log.warning("server file: {}", warning)


def _force_polling() -> bool | None:
    value = os.environ.get("WATCHFILES_FORCE_POLLING")
    return None if value is None else value.lower() not in ("", "0", "false", "no")
