"""The file provider: one server per ``servers_dir/*.toml|*.yaml|*.yml`` file.

Rules for this file:
- The server id is the file stem; Infrarust server files load unchanged.
- A file that fails to read, parse or validate is reported with its path, line/field and
  reason; the other files still load.
- Editors' temporary and hidden files (``.name``, ``name~``, ``#name#``) are ignored.
"""

from __future__ import annotations

from pathlib import Path

from discoproxy.config import CONFIG_SUFFIXES, ConfigError, read_document, validate_document
from discoproxy.model import ServerDefinition

PROVIDER_NAME = "file"


def is_server_file(path: Path) -> bool:
    name = path.name
    if name.startswith((".", "#")) or name.endswith("~"):
        return False
    return path.suffix.lower() in CONFIG_SUFFIXES


def load_server_file(path: Path) -> ServerDefinition:
    """Parse and validate one server file; raises :class:`ConfigError` naming the file."""
    data = read_document(path)
    data.setdefault("id", path.stem)
    return validate_document(ServerDefinition, data, path)


def load_servers_dir(directory: Path) -> tuple[list[ServerDefinition], list[ConfigError]]:
    """Every valid server in ``directory`` (sorted by file name) and the errors of the rest."""
    servers: list[ServerDefinition] = []
    errors: list[ConfigError] = []
    if not directory.is_dir():
        return servers, errors
    seen: dict[str, Path] = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and is_server_file(p)):
        try:
            server = load_server_file(path)
        except ConfigError as exc:
            errors.append(exc)
            continue
        if server.id in seen:
            errors.append(
                ConfigError(
                    f"{path}: id: {server.id!r} is already used by {seen[server.id]}; "
                    "ids must be unique within servers_dir",
                    str(path),
                )
            )
            continue
        seen[server.id] = path
        servers.append(server)
    return servers, errors
