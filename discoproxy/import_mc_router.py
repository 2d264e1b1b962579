"""``discoproxy import mc-router``: itzg/mc-router's settings (its environment variables,
or the flags of its command line) turned into discoproxy's config and server files.

mc-router has no config file: an operator runs its container with ``MAPPING``,
``DEFAULT``, ``IN_DOCKER`` … in ``environment:`` (or ``-in-docker -mapping=…`` as its
``command:``). The import reads them from a Compose file (the service running the
``itzg/mc-router`` image, or ``--service``) or from an env file (``KEY=VALUE`` lines, as
``docker run --env-file`` takes them). Its routes file and its container labels need no
import: the ``mc_router_routes`` provider and the Docker provider read them as they are.

Rules for this file: as ``importers.py`` (pure; every output validated with the models
``serve`` uses; every setting carried over or named in ``not_carried`` with why).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from discoproxy.config import ProxyConfig
from discoproxy.importers import Imported, first_error, refusal
from discoproxy.model import ServerDefinition, peer_duration_s

# mc-router's boolean flags: on the command line they take no value (``-in-docker``).
BOOL_FLAGS = frozenset(
    {
        "AUTO_SCALE_DOWN", "AUTO_SCALE_UP", "DEBUG", "IN_DOCKER", "IN_DOCKER_SWARM",
        "IN_KUBE_CLUSTER", "RECEIVE_PROXY_PROTOCOL", "RECORD_LOGINS", "ROUTES_CONFIG_WATCH",
        "SIMPLIFY_SRV", "TRACE", "USE_PROXY_PROTOCOL", "VERSION", "WEBHOOK_REQUIRE_USER",
    }
)  # fmt: skip
# Settings with nothing to carry, and why (the others are handled in import_mc_router).
NOT_CARRIED = {
    "CONNECTION_RATE_LIMIT": "mc-router's is one budget for every client together; "
    "discoproxy's [rate_limit] budgets are per client IP (connections and status pings)",
    "AUTO_SCALE_UP": "it applies to discovered containers, and IN_DOCKER is not set",
    "AUTO_SCALE_DOWN": "it applies to discovered containers, and IN_DOCKER is not set",
    "AUTO_SCALE_DOWN_AFTER": "it applies to discovered containers, and IN_DOCKER is not set",
    "AUTO_SCALE_ALLOW_DENY": "its allow/deny file is not read; per server, "
    "infrarust.wake.allow (who may wake it) and infrarust.players.allow/deny",
    "AUTO_SCALE_WEBHOOK_URL": "scaling by webhook is not supported; the Docker provider "
    "starts and stops containers itself (auto_start)",
    "AUTO_SCALE_WEBHOOK_HEADERS": "scaling by webhook is not supported",
    "AUTO_SCALE_WEBHOOK_TIMEOUT": "scaling by webhook is not supported",
    "AUTO_SCALE_WEBHOOK_WAKE_TIMEOUT": "scaling by webhook is not supported; "
    "auto_start_wait bounds how long a login waits for a woken server",
    "NGROK_TOKEN": "no ngrok agent: publish discoproxy's port yourself",
    "NGROK_REMOTE_ADDR": "no ngrok agent",
    "IN_KUBE_CLUSTER": "no Kubernetes provider (Docker, Swarm, files, the API)",
    "KUBE_CONFIG": "no Kubernetes provider",
    "KUBE_NAMESPACE": "no Kubernetes provider",
    "CPU_PROFILE": "a profiling switch: nothing to carry",
    "VERSION": "prints the version: nothing to carry",
    "DOCKER_API_VERSION": "the Docker SDK negotiates the API version",
    "RECORD_LOGINS": "every login's close line names the player (INFO), and "
    "discoproxy_players counts them on /metrics",
    "ROUTES_CONFIG_WATCH": "the routes file is always watched",
}
_METRICS = "METRICS_BACKEND"
_LOG_LEVELS = {
    "trace": "TRACE", "debug": "DEBUG", "info": "INFO", "warn": "WARNING",
    "warning": "WARNING", "error": "ERROR", "fatal": "ERROR", "panic": "ERROR",
}  # fmt: skip
_TRUE = {"1", "t", "true"}  # strconv.ParseBool, in any case here
_FALSE = {"0", "f", "false"}
_SLUG = re.compile(r"[^a-z0-9]+")


def settings_from_compose(document: Any, service: str | None = None) -> dict[str, str]:
    """The mc-router settings of a Compose file: its ``environment:`` (map or list) and
    its ``command:`` flags (which win, as they do in mc-router), of ``service`` or else
    the one service running an ``itzg/mc-router`` image. Raises ValueError naming why."""
    services = document.get("services") if isinstance(document, Mapping) else None
    if not isinstance(services, Mapping):
        raise ValueError("services: expected a Compose file with a services: table")
    if service is None:
        found = [
            name
            for name, spec in services.items()
            if isinstance(spec, Mapping) and "mc-router" in str(spec.get("image", ""))
        ]
        if len(found) != 1:
            which = f"several ({', '.join(map(str, found))})" if found else "none"
            raise ValueError(
                f"services: {which} run an itzg/mc-router image; name one with --service"
            )
        service = str(found[0])
    spec = services.get(service)
    if not isinstance(spec, Mapping):
        raise ValueError(f"services.{service}: no such service")
    settings = _environment(spec.get("environment"), f"services.{service}.environment")
    command = spec.get("command")
    if command is not None:
        tokens = shlex.split(command) if isinstance(command, str) else [str(t) for t in command]
        settings.update(settings_from_flags(tokens, f"services.{service}.command"))
    return settings


def _environment(value: Any, where: str) -> dict[str, str]:
    """Compose's ``environment:``, a map or a list of ``KEY=VALUE`` (a bare ``KEY``
    passes the host's value on, which the import cannot know: refused)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): "" if v is None else _compose_text(v) for k, v in value.items()}
    if isinstance(value, list):
        settings: dict[str, str] = {}
        for item in value:
            key, sep, text = str(item).partition("=")
            if not sep:
                raise ValueError(
                    f"{where}: {key} takes its value from the host's environment; write "
                    f"{key}=VALUE for the import"
                )
            settings[key] = text
        return settings
    raise ValueError(f"{where}: expected a map or a list of KEY=VALUE")


def _compose_text(value: object) -> str:
    """A YAML scalar as Compose passes it on: booleans as ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def settings_from_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines, optional quotes), as
    ``docker run --env-file`` and Compose's ``env_file`` take them."""
    settings: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise ValueError(f"line {number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        settings[key.strip()] = value
    return settings


def settings_from_flags(tokens: Sequence[str], where: str = "command") -> dict[str, str]:
    """mc-router's command line (Go's flag package: ``-name=value``, ``-name value``,
    ``--name``; a boolean flag takes no separate value) as its environment names;
    ``-mapping`` may repeat (its values add up)."""
    settings: dict[str, str] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("-") or token in ("-", "--"):
            raise ValueError(f"{where}: {token!r} is not a flag (mc-router takes no arguments)")
        name, has_value, value = token.lstrip("-").partition("=")
        key = name.upper().replace("-", "_")
        if not has_value:
            if key in BOOL_FLAGS:
                value = "true"
            elif index < len(tokens):
                value = tokens[index]
                index += 1
            else:
                raise ValueError(f"{where}: {token} needs a value")
        if key == "MAPPING" and key in settings:
            value = settings[key] + "\n" + value
        settings[key] = value
    return settings


def import_mc_router(settings: Mapping[str, str]) -> Imported:
    """mc-router's settings (environment names) as discoproxy's global config and
    server files (one per backend of ``MAPPING``, one for ``DEFAULT``)."""
    imported = Imported()
    notes = imported.not_carried
    out: dict[str, Any] = {}
    left = dict(settings)

    def take(key: str) -> str | None:
        value = left.pop(key, None)
        return value.strip() if value is not None else None

    def flag(key: str) -> bool:
        value = take(key)
        if value is None or value == "":
            return False
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(f"{key}: expected true or false, got {value!r}")

    port = take("PORT")
    if port:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"PORT: expected 1-65535, got {port!r}")
        out["bind"] = [f"0.0.0.0:{int(port)}"]
    else:
        out["bind"] = ["0.0.0.0:25565"]  # mc-router's default port (ours too)
    proxy_protocol = flag("USE_PROXY_PROTOCOL")
    simplify_srv = flag("SIMPLIFY_SRV")
    servers: dict[str, dict[str, Any]] = {}
    by_backend: dict[str, list[str]] = {}
    for entry in re.split(r"[,\n]", take("MAPPING") or ""):
        entry = entry.strip()
        if not entry:
            continue
        host, sep, backend = entry.partition("=")
        if not sep or not host.strip() or not backend.strip():
            raise ValueError(f"MAPPING: expected externalHostname=host:port, got {entry!r}")
        by_backend.setdefault(backend.strip(), []).append(host.strip().lower())
    for backend, hosts in by_backend.items():
        server: dict[str, Any] = {"domains": list(hosts), "addresses": [backend]}
        if simplify_srv:  # mc-router drops what precedes "_tcp." (SRV names)
            server["domains"] += [f"*._tcp.{host}" for host in hosts]
        servers[_stem(hosts[0], servers)] = server
    default = take("DEFAULT")
    if default:
        servers[_stem("default", servers)] = {"default": True, "addresses": [default]}
    for server in servers.values():
        if proxy_protocol:
            server["send_proxy_protocol"] = True
    if proxy_protocol:
        notes.append(
            "USE_PROXY_PROTOCOL: carried to the imported servers; a discovered container "
            "gets it from its infrarust.send_proxy_protocol=true label"
        )
    if simplify_srv:
        notes.append(
            "SIMPLIFY_SRV: carried to the imported servers (each also answers *._tcp.HOST); "
            "a discovered container lists such names in its labels"
        )
    routes = take("ROUTES_CONFIG")
    if routes:
        out.setdefault("providers", {})["mc_router_routes"] = {"enabled": True, "path": routes}
    _docker(out, notes, flag("IN_DOCKER"), flag("IN_DOCKER_SWARM"), take)
    allow = _as_list(take("CLIENTS_TO_ALLOW"))
    deny = _as_list(take("CLIENTS_TO_DENY"))
    if allow:
        out["ip_filter"] = {"allow": allow}
        if deny:  # as mc-router: an allow list makes the deny list moot
            notes.append("CLIENTS_TO_DENY: mc-router ignores it when CLIENTS_TO_ALLOW is set")
    elif deny:
        out["ip_filter"] = {"deny": deny}
    receive = flag("RECEIVE_PROXY_PROTOCOL")
    trusted = _as_list(take("TRUSTED_PROXIES"))
    if receive and trusted:
        out["receive_proxy_protocol"] = True
        out["trusted_proxies"] = trusted
    elif receive:
        notes.append(
            "RECEIVE_PROXY_PROTOCOL without TRUSTED_PROXIES: mc-router then trusts every "
            "header, which lets any client forge its address past filters and bans; set "
            "receive_proxy_protocol = true with trusted_proxies (your balancers) yourself"
        )
    elif trusted:
        notes.append("TRUSTED_PROXIES: without RECEIVE_PROXY_PROTOCOL it has no effect")
    motds: dict[str, Any] = {}
    asleep = take("AUTO_SCALE_ASLEEP_MOTD")
    if asleep:
        motds["sleeping"] = {"text": asleep}
    loading = take("AUTO_SCALE_LOADING_MOTD")
    if loading:
        motds["starting"] = {"text": loading}
    if motds:
        out["motds"] = motds
    _webhook(out, notes, take, flag)
    _logging(out, flag("DEBUG"), flag("TRACE"), take("LOG_LEVEL"))
    _admin(out, notes, take("API_BINDING"), take(_METRICS))
    for key in sorted(left):
        if key.startswith("METRICS_BACKEND_CONFIG_"):
            notes.append(f"{key}: only Prometheus metrics (/metrics on the admin listener)")
        elif key in NOT_CARRIED:
            notes.append(f"{key}: {NOT_CARRIED[key]}")
        else:
            notes.append(f"{key}: not an mc-router setting known to this import")
    for stem, server in servers.items():
        try:
            ServerDefinition.model_validate({"id": stem, **server})  # what is written loads
        except ValidationError as exc:
            setting = "DEFAULT" if server.get("default") else "MAPPING"
            raise ValueError(f"{setting} ({stem}): {first_error(exc)[1]}") from None
    try:
        ProxyConfig.model_validate(out)
    except ValidationError as exc:
        raise refusal(exc) from None
    imported.config = out
    imported.servers = servers
    return imported


def _stem(name: str, taken: Mapping[str, object]) -> str:
    stem = _SLUG.sub("-", name.lower()).strip("-") or "route"
    unique, n = stem, 2
    while unique in taken:
        unique, n = f"{stem}-{n}", n + 1
    return unique


def _as_list(value: str | None) -> list[str]:
    return [part.strip() for part in re.split(r"[,\n]", value or "") if part.strip()]


def _docker(out: dict[str, Any], notes: list[str], docker: bool, swarm: bool, take: Any) -> None:
    socket, timeout = take("DOCKER_SOCKET"), take("DOCKER_TIMEOUT")
    refresh = take("DOCKER_REFRESH_INTERVAL")
    table: dict[str, Any] = {"enabled": True}
    if socket:
        table["endpoint"] = socket
    if timeout and timeout != "0":
        if not timeout.isdigit():
            raise ValueError(f"DOCKER_TIMEOUT: expected whole seconds, got {timeout!r}")
        table["api_timeout"] = int(timeout)
    providers = out.setdefault("providers", {})
    if docker or swarm:  # mc-router's global auto-scale flags: for discovered containers
        for flag_name in ("AUTO_SCALE_UP", "AUTO_SCALE_DOWN"):
            value = take(flag_name)
            if value:
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError(f"{flag_name}: expected true or false, got {value!r}")
                table[f"mc_router_{flag_name.lower()}"] = value.lower() in _TRUE
        after = take("AUTO_SCALE_DOWN_AFTER")
        if after:
            table["mc_router_auto_scale_down_after"] = peer_duration_s(
                after, "AUTO_SCALE_DOWN_AFTER"
            )
    if docker:
        providers["docker"] = dict(table)
    if swarm:
        providers["swarm"] = dict(table)
        if refresh:
            providers["swarm"]["poll_interval"] = peer_duration_s(
                refresh, "DOCKER_REFRESH_INTERVAL"
            )
    elif refresh:
        notes.append("DOCKER_REFRESH_INTERVAL: only used with IN_DOCKER_SWARM")
    if not docker and not swarm:
        providers["docker"] = {"enabled": False}  # mc-router discovers nothing unless told
        if socket or timeout:
            notes.append("DOCKER_SOCKET/DOCKER_TIMEOUT: without IN_DOCKER they have no effect")


def _webhook(out: dict[str, Any], notes: list[str], take: Any, flag: Any) -> None:
    url = take("WEBHOOK_URL")
    timeout = take("WEBHOOK_TIMEOUT")
    require_user = flag("WEBHOOK_REQUIRE_USER")
    if not url:
        return
    hook: dict[str, Any] = {"url": url, "events": ["player_connected", "player_disconnected"]}
    if timeout:
        hook["timeout"] = peer_duration_s(timeout, "WEBHOOK_TIMEOUT")
    out["webhooks"] = [hook]
    notes.append(
        "WEBHOOK_URL: carried as a webhook for player_connected and player_disconnected; "
        "the JSON body is discoproxy's (README, Webhooks), not mc-router's"
        + ("" if require_user else ", and server-list pings send no event")
    )


def _logging(out: dict[str, Any], debug: bool, trace: bool, level: str | None) -> None:
    if trace:
        out["log_level"] = "TRACE"
    elif debug:
        out["log_level"] = "DEBUG"
    elif level:
        ours = _LOG_LEVELS.get(level.lower())
        if ours is None:
            raise ValueError(f"LOG_LEVEL: expected one of {', '.join(_LOG_LEVELS)}, got {level!r}")
        out["log_level"] = ours


def _admin(out: dict[str, Any], notes: list[str], binding: str | None, metrics: str | None) -> None:
    if binding:
        host, _, port = binding.rpartition(":")
        out["admin"] = {"listen": f"{host or '0.0.0.0'}:{port}"}
        notes.append(
            "API_BINDING: carried as the admin listener; its API is discoproxy's "
            "(/api/routes, /api/servers with a token), not mc-router's /routes"
        )
    if metrics and metrics.lower() not in ("discard", "prometheus"):
        notes.append(f"{_METRICS} = {metrics}: only Prometheus (/metrics on the admin listener)")
