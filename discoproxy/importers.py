"""``discoproxy import``: a peer's config turned into discoproxy's, with a list of what
could not be carried over (issue 18). Gate Lite's ``config.lite.routes`` today.

Rules for this file:
- Pure: a parsed document in, an :class:`Imported` out (the global config, one server
  document per route, and the notes); the command writes them. Every output document
  is validated with the same models ``serve`` loads them with, so what is written loads.
- Nothing is dropped silently: every key of the input is carried over, or named in
  ``not_carried`` with why. A key that would change who gets in or where they go and
  cannot be carried is also in ``not_carried`` (the command exits 1 when it is not empty
  and ``--strict`` is given).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from discoproxy.config import ProxyConfig
from discoproxy.model import ServerDefinition
from discoproxy.model import peer_duration_s as peer_duration_s

# Gate Lite's strategy names → ours.
GATE_STRATEGIES = {
    "sequential": "failover",
    "random": "random",
    "round-robin": "round_robin",
    "least-connections": "least_connections",
    "lowest-latency": "lowest_latency",
}
_SLUG = re.compile(r"[^a-z0-9]+")

# Gate Lite's route keys and what the import makes of each: the importer handles exactly
# these (any other key is reported) and the README's table is generated from them.
GATE_ROUTE_KEYS: tuple[tuple[str, str], ...] = (
    ("host", "`domains` (a string or a list; `*` makes the default route)"),
    ("backend", "`addresses` (a string or a list)"),
    ("strategy", "`balance`: sequential → failover, random, round-robin, least-connections, "
     "lowest-latency (with a tcp health_check); several backends default to random"),
    ("proxyProtocol", "`send_proxy_protocol`"),
    ("modifyVirtualHost", '`domain_rewrite = "backend"`'),
    ("cachePingTTL", "`status_cache_ttl` (-1, no caching, is 0)"),
    ("fallback", "the `unreachable` MOTD (motd, version, players, favicon)"),
    ("blacklist", "`ip_filter.deny`"),
    ("tcpShieldRealIP", "`tcpshield_real_ip` (the backend reads the player's address from "
     "the handshake)"),
    ("max-connections", "not carried (reported): max_connections and max_connections_per_ip "
     "are global"),
)  # fmt: skip
GATE_README_START = "<!-- gate-lite-route-keys: generated from discoproxy/importers.py -->"
GATE_README_END = "<!-- /gate-lite-route-keys -->"


def gate_markdown() -> str:
    """The README's table of Gate Lite route keys: ``python -m discoproxy.importers``."""
    rows = [f"| `{key}` | {what} |" for key, what in GATE_ROUTE_KEYS]
    return "\n".join(
        [GATE_README_START, "| Gate Lite route key | discoproxy |", "| --- | --- |", *rows,
         "| any other key | reported, not carried |", GATE_README_END]
    )  # fmt: skip


@dataclass
class Imported:
    config: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # file stem → document
    not_carried: list[str] = field(default_factory=list)


def _as_list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [str(item).strip() for item in items if item is not None and str(item).strip()]


def import_gate_lite(document: Mapping[str, Any], servers_dir: str) -> Imported:
    """Gate Lite's ``config.yml`` (``config.bind``, ``config.lite.routes``, …) as
    discoproxy's global config and server files. Raises ValueError naming the key for an
    input that is not a Gate Lite config."""
    imported = Imported()
    config = document.get("config")
    if not isinstance(config, Mapping):
        raise ValueError("config: expected Gate's top-level `config:` table")
    lite = config.get("lite")
    if not isinstance(lite, Mapping) or not isinstance(lite.get("routes"), list):
        raise ValueError("config.lite.routes: expected Gate Lite's list of routes")
    if lite.get("enabled") is False:
        imported.not_carried.append(
            "config.lite.enabled = false: Gate runs as a full proxy then; only its lite "
            "routes are imported"
        )
    out: dict[str, Any] = {"servers_dir": servers_dir}
    if "bind" in config:
        out["bind"] = [str(config["bind"])]
    if "connectionTimeout" in config:
        out["connect_timeout"] = peer_duration_s(
            config["connectionTimeout"], "config.connectionTimeout"
        )
    if config.get("proxyProtocol"):
        imported.not_carried.append(
            "config.proxyProtocol = true: set receive_proxy_protocol = true together with "
            "trusted_proxies (your load balancer's addresses): discoproxy reads PROXY "
            "headers only from those"
        )
    handled = {"bind", "lite", "connectionTimeout", "proxyProtocol"}
    for key in sorted(set(config) - handled):
        reason = {
            "readTimeout": "per-read timeouts are not supported; idle_timeout applies",
            "debug": "use log_level = DEBUG",
            "quota": "set rate_limit (per-IP connections and status budgets) instead",
        }.get(key, "a full-proxy (non-lite) setting")
        imported.not_carried.append(f"config.{key}: {reason}")
    for key in sorted(set(document) - {"config"}):
        imported.not_carried.append(f"{key}: not a lite-routing setting (Connect, API, …)")
    for index, route in enumerate(lite["routes"]):
        where = f"config.lite.routes[{index}]"
        if not isinstance(route, Mapping):
            raise ValueError(f"{where}: expected a route with host and backend")
        stem, server = _gate_route(route, where, imported.not_carried)
        stem = f"{index + 1:02d}-{stem}"
        try:
            ServerDefinition.model_validate({"id": stem, **server})  # what is written loads
        except ValidationError as exc:
            raise _gate_refusal(where, exc) from None
        imported.servers[stem] = server
    try:
        ProxyConfig.model_validate(out)
    except ValidationError as exc:
        raise _gate_refusal("", exc) from None
    imported.config = out
    return imported


def _gate_route(
    route: Mapping[str, Any], where: str, not_carried: list[str]
) -> tuple[str, dict[str, Any]]:
    hosts = _as_list(route.get("host"))
    backends = _as_list(route.get("backend"))
    if not hosts or not backends:
        raise ValueError(f"{where}: host and backend are both required")
    server: dict[str, Any] = {"addresses": backends}
    domains = [h for h in hosts if h != "*"]
    if domains:
        server["domains"] = domains
    if "*" in hosts:
        server["default"] = True  # Gate's catch-all route
    strategy = route.get("strategy")
    if strategy is not None:
        ours = GATE_STRATEGIES.get(str(strategy))
        if ours is None:
            raise ValueError(
                f"{where}.strategy: {strategy!r}; expected one of {', '.join(GATE_STRATEGIES)}"
            )
        server["balance"] = ours
        if ours == "lowest_latency":
            server["health_check"] = {"type": "tcp"}  # ours measures latency by checks
    elif len(backends) > 1:
        server["balance"] = "random"  # Gate Lite's default over several backends
    if route.get("proxyProtocol"):
        server["send_proxy_protocol"] = True
    if route.get("modifyVirtualHost"):
        server["domain_rewrite"] = "backend"
    if "cachePingTTL" in route:
        ttl = peer_duration_s(route["cachePingTTL"], f"{where}.cachePingTTL")
        server["status_cache_ttl"] = max(ttl, 0.0)  # -1 (no caching) is 0 here
    fallback = route.get("fallback")
    if isinstance(fallback, Mapping):
        motd: dict[str, Any] = {}
        if "motd" in fallback:
            motd["text"] = str(fallback["motd"]).rstrip("\n")
        version = fallback.get("version")
        if isinstance(version, Mapping):
            if "name" in version:
                motd["version_name"] = str(version["name"])
            if isinstance(version.get("protocol"), int):
                motd["protocol_version"] = version["protocol"]
        if "favicon" in fallback:
            motd["favicon"] = str(fallback["favicon"])
        players = fallback.get("players")
        if isinstance(players, Mapping):
            if isinstance(players.get("max"), int):
                motd["max_players"] = players["max"]
            if isinstance(players.get("online"), int):
                motd["online_players"] = players["online"]
        server["motds"] = {"unreachable": motd}  # shown while every backend is down
    blacklist = route.get("blacklist")
    if blacklist:
        server["ip_filter"] = {"deny": _as_list(blacklist)}
    if route.get("tcpShieldRealIP"):
        server["tcpshield_real_ip"] = True
    if route.get("max-connections"):
        not_carried.append(
            f"{where}.max-connections = {route['max-connections']}: per-route connection "
            "caps are not supported; max_connections (global) and max_connections_per_ip"
        )
    known = {key for key, _ in GATE_ROUTE_KEYS}
    for key in sorted(set(route) - known):
        not_carried.append(f"{where}.{key}: not known to this import")
    stem = _SLUG.sub("-", (domains[0] if domains else "default").lower()).strip("-")
    return stem or "route", server


# infrarust.toml keys with nothing to carry, and why (the others are handled below).
_INFRARUST_NOT_CARRIED = {
    "worker_threads": "one reactor thread per process here (see issue 20, workers)",
    "connect_max_attempts": "every address of a pool is tried, each within connect_timeout",
    "active_health": "set health_check per server (tcp, minecraft, tls, http)",
    "plugins_dir": "discoproxy has no WASM plugins",
    "announce_proxy_commands": "discoproxy adds no commands (it forwards bytes)",
    "so_reuseport": "not needed by one process",
    "keepalive": "the OS's TCP keepalive defaults apply",
    "telemetry": "scrape /metrics (Prometheus) on the admin listener instead",
    "events": "plugin event timeouts; no plugins here",
    "auth": "client_only mode is not supported (the backend authenticates)",
    "web": "set [admin] listen and token; its API differs",
    "permissions": "no proxy commands, so no permissions",
    "plugin_messaging": "no plugin messaging in passthrough",
}


def _whole(value: Any, key: str) -> int:
    """An integer key of the peer's file, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected a whole number, got {value!r}")
    return value


# Our fields a Gate Lite route or config key becomes: a refusal names the Gate key.
_GATE_NAMES = {
    "addresses": "backend",
    "domains": "host",
    "default": "host",
    "status_cache_ttl": "cachePingTTL",
    "motds": "fallback",
    "ip_filter": "blacklist",
    "bind": "config.bind",
    "connect_timeout": "config.connectionTimeout",
}


def _gate_refusal(where: str, exc: ValidationError) -> ValueError:
    """A model's refusal of what a Gate Lite key became, naming that key."""
    error = exc.errors(include_url=False)[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    key = _GATE_NAMES.get(field, field)
    message = str(error["msg"]).removeprefix("Value error, ")
    return ValueError(f"{where}{'.' + key if where and key else key}: {message}")


def import_infrarust(document: Mapping[str, Any]) -> Imported:
    """Infrarust's ``infrarust.toml`` as discoproxy's global config. Its server files
    load as they are (``servers_dir`` is kept), so only the global keys are mapped."""
    imported = Imported()
    notes = imported.not_carried
    out: dict[str, Any] = {}
    if "bind" in document:
        out["bind"] = [str(document["bind"])]
    if "servers_dir" in document:
        out["servers_dir"] = str(document["servers_dir"])
    if "max_connections" in document:
        out["max_connections"] = _whole(document["max_connections"], "max_connections")
        if out["max_connections"]:
            notes.append(
                "max_connections: carried, but past it discoproxy closes new connections "
                "at once where Infrarust leaves them waiting in the backlog"
            )
    if "connect_timeout" in document:
        out["connect_timeout"] = peer_duration_s(document["connect_timeout"], "connect_timeout")
    if document.get("receive_proxy_protocol"):
        notes.append(
            "receive_proxy_protocol = true: set it together with trusted_proxies (your load "
            "balancer's addresses): discoproxy reads PROXY headers only from those"
        )
    behaviour = document.get("unknown_domain_behavior")
    if behaviour not in (None, "default_motd"):
        notes.append(
            f"unknown_domain_behavior = {behaviour}: discoproxy always answers an unknown "
            "name (unknown_server_message, motds.unknown_domain); it does not drop silently"
        )
    rate = document.get("rate_limit")
    if isinstance(rate, Mapping) and rate.get("enabled"):
        window = peer_duration_s(rate.get("window", "10s"), "rate_limit.window")
        out["rate_limit"] = {
            "connections": _whole(rate.get("max_connections", 3), "rate_limit.max_connections"),
            "status": _whole(rate.get("status_max", 300), "rate_limit.status_max"),
            "window": window,
        }
        status_window = peer_duration_s(
            rate.get("status_window", "10s"), "rate_limit.status_window"
        )
        if status_window != window:
            notes.append(
                f"rate_limit.status_window ({status_window:g}s): one window for both budgets "
                f"here; rate_limit.window ({window:g}s) is used"
            )
    cache = document.get("status_cache")
    if isinstance(cache, Mapping):
        if "ttl" in cache:
            out["status_cache_ttl"] = peer_duration_s(cache["ttl"], "status_cache.ttl")
        if "max_entries" in cache:
            notes.append("status_cache.max_entries: the cache's bound is fixed here")
    ban = document.get("ban")
    if isinstance(ban, Mapping):
        if ban.get("provider", "builtin") != "builtin":
            notes.append(f"ban.provider = {ban['provider']}: only the bans file is supported")
        if "file" in ban:
            notes.append(
                f"ban.file ({ban['file']}): Infrarust's bans file format differs; re-add "
                "its bans with discoproxy ban add (bans_file is discoproxy's own)"
            )
    ip_filter = document.get("ip_filter")
    if isinstance(ip_filter, Mapping):
        out["ip_filter"] = {
            "allow": list(ip_filter.get("whitelist", [])),
            "deny": list(ip_filter.get("blacklist", [])),  # blacklist wins, as ours
        }
    docker = document.get("docker")
    if isinstance(docker, Mapping):
        table: dict[str, Any] = {"enabled": True}
        if "endpoint" in docker:
            table["endpoint"] = str(docker["endpoint"])
        if "network" in docker:
            table["network"] = str(docker["network"])
        out["providers"] = {"docker": table}
        for key in sorted(set(docker) - {"endpoint", "network"}):
            notes.append(f"docker.{key}: discoproxy follows the event stream and resyncs itself")
    motd = document.get("default_motd")
    if isinstance(motd, Mapping):
        online = motd.get("online")
        motds: dict[str, Any] = {}
        if isinstance(online, Mapping):
            motds["unknown_domain"] = dict(online)
        if isinstance(motd.get("unreachable"), Mapping):
            motds["unreachable"] = dict(motd["unreachable"])
        if motds:
            out["motds"] = motds
        for state in sorted(set(motd) - {"online", "unreachable"}):
            notes.append(f"default_motd.{state}: not used for unknown names (as in Infrarust)")
    forwarding = document.get("forwarding")
    if isinstance(forwarding, Mapping) and forwarding.get("mode", "none") != "none":
        notes.append(
            f"forwarding.mode = {forwarding['mode']}: the proxy does not take part in the "
            "login, so the backend would reject every player; not carried"
        )
    handled = {
        "bind", "servers_dir", "max_connections", "connect_timeout", "receive_proxy_protocol",
        "unknown_domain_behavior", "rate_limit", "status_cache", "ban", "ip_filter", "docker",
        "default_motd", "forwarding",
    }  # fmt: skip
    for key in sorted(set(document) - handled):
        reason = _INFRARUST_NOT_CARRIED.get(key, "not known to this import")
        notes.append(f"{key}: {reason}")
    ProxyConfig.model_validate(out)  # what is written loads
    imported.config = out
    return imported


# Infrarust 1.x config.yaml keys with nothing to carry, and why.
_INFRARUST_V1_NOT_CARRIED = {
    "keepalive_timeout": "the OS's TCP keepalive defaults apply; idle_timeout closes "
    "connections silent both ways",
    "keepAliveTimeout": "the OS's TCP keepalive defaults apply; idle_timeout closes "
    "connections silent both ways",
    "telemetry": "scrape /metrics (Prometheus) on the admin listener instead",
    "logging": "log lines are discoproxy's (log_format = text or json, log_level)",
    "managers_config": "no server manager: Docker containers wake with auto_start",
}
# Infrarust 1.x MOTD keys → ours.
_V1_MOTD_KEYS = {
    "description": "text",
    "version": "version_name",
    "max_players": "max_players",
    "online_players": "online_players",
    "favicon": "favicon",
    "protocol_version": "protocol_version",
}


def import_infrarust_v1(document: Mapping[str, Any]) -> Imported:
    """Infrarust 1.x's ``config.yaml`` as discoproxy's global config, and its top-level
    ``domains``/``addresses`` (a route of the global file) as a server file. Its
    ``proxies/*.yml`` server files load as they are (``servers_dir`` is kept)."""
    imported = Imported()
    notes = imported.not_carried
    out: dict[str, Any] = {}
    handled = {"bind", "domains", "addresses", "file_provider", "docker_provider", "cache",
               "motds", "filters", "proxy_protocol", "receive_proxy_protocol"}  # fmt: skip
    if "bind" in document:
        out["bind"] = [str(document["bind"])]
    domains, addresses = _as_list(document.get("domains")), _as_list(document.get("addresses"))
    if addresses:
        route: dict[str, Any] = {"addresses": addresses}
        if domains:
            route["domains"] = domains
        else:
            route["default"] = True  # no name: Infrarust sends every unknown name there
        try:
            ServerDefinition.model_validate({"id": "config", **route})
        except ValidationError as exc:
            raise refusal(exc) from None
        imported.servers["config"] = route
    elif domains:
        notes.append("domains: without addresses they route nowhere; not carried")
    files = document.get("file_provider")
    if isinstance(files, Mapping):
        paths = _as_list(files.get("proxies_path"))
        if paths:
            out["servers_dir"] = paths[0]
        if len(paths) > 1:
            notes.append(
                f"file_provider.proxies_path: one servers_dir here; {paths[0]} is used, "
                f"not {', '.join(paths[1:])} (move their files into it)"
            )
        if paths and imported.servers:
            notes.append(
                f"domains/addresses: written as servers/config.yaml beside the config; move "
                f"it into {paths[0]} (the servers_dir), or it is not loaded"
            )
        if files.get("file_type", "yaml") not in ("yaml", "yml"):
            notes.append(f"file_provider.file_type = {files['file_type']}: YAML and TOML only")
        for key in sorted(set(files) - {"proxies_path", "file_type", "watch"}):
            notes.append(f"file_provider.{key}: not known to this import")
    docker = document.get("docker_provider")
    if isinstance(docker, Mapping):
        table: dict[str, Any] = {"enabled": True}
        if docker.get("docker_host"):
            table["endpoint"] = str(docker["docker_host"])
        if docker.get("label_prefix"):
            table["label_prefix"] = str(docker["label_prefix"])
        if docker.get("network"):
            table["network"] = str(docker["network"])
        out["providers"] = {"docker": table}
        if _as_list(docker.get("default_domains")):
            notes.append(
                "docker_provider.default_domains: each container names its domains "
                "(infrarust.domains); a container without them is not routed"
            )
        for key in ("polling_interval", "watch"):
            if key in docker:
                notes.append(
                    f"docker_provider.{key}: discoproxy follows the event stream (no polling)"
                )
        known = {"docker_host", "label_prefix", "network", "default_domains",
                 "polling_interval", "watch"}  # fmt: skip
        for key in sorted(set(docker) - known):
            notes.append(f"docker_provider.{key}: not known to this import")
    cache = document.get("cache")
    if isinstance(cache, Mapping):
        if "status_ttl_seconds" in cache:
            out["status_cache_ttl"] = peer_duration_s(
                cache["status_ttl_seconds"], "cache.status_ttl_seconds"
            )
        if "max_status_entries" in cache:
            notes.append("cache.max_status_entries: the cache's bound is fixed here")
    motds = document.get("motds")
    if isinstance(motds, Mapping):
        ours: dict[str, Any] = {}
        for theirs, state in (("unknown", "unknown_domain"), ("unreachable", "unreachable")):
            motd = motds.get(theirs)
            if isinstance(motd, Mapping):
                ours[state] = {_V1_MOTD_KEYS[k]: v for k, v in motd.items() if k in _V1_MOTD_KEYS}
                for key in sorted(set(motd) - set(_V1_MOTD_KEYS)):
                    notes.append(f"motds.{theirs}.{key}: not known to this import")
        if ours:
            out["motds"] = ours
        for state in sorted(set(motds) - {"unknown", "unreachable"}):
            notes.append(f"motds.{state}: not known to this import")
    _v1_filters(document.get("filters"), out, notes)
    if document.get("proxy_protocol") or document.get("receive_proxy_protocol"):
        notes.append(
            "receive_proxy_protocol: set it together with trusted_proxies (your load "
            "balancer's addresses): discoproxy reads PROXY headers only from those"
        )
    for key in sorted(set(document) - handled):
        notes.append(f"{key}: {_INFRARUST_V1_NOT_CARRIED.get(key, 'not known to this import')}")
    try:
        ProxyConfig.model_validate(out)  # what is written loads
    except ValidationError as exc:
        raise refusal(exc) from None
    imported.config = out
    return imported


def _v1_filters(filters: Any, out: dict[str, Any], notes: list[str]) -> None:
    if not isinstance(filters, Mapping):
        return
    limiter = filters.get("rate_limiter")
    if isinstance(limiter, Mapping):
        count = _whole(limiter.get("requestLimit", 10), "filters.rate_limiter.requestLimit")
        window = peer_duration_s(
            limiter.get("windowLength", "1s"), "filters.rate_limiter.windowLength"
        )
        out["rate_limit"] = {"connections": count, "window": window}
        notes.append(
            "filters.rate_limiter: carried as [rate_limit] connections; server-list pings "
            "have a budget of their own here ([rate_limit] status)"
        )
    ip_filter = filters.get("ip_filter")
    if isinstance(ip_filter, Mapping) and ip_filter.get("enabled", True):
        out["ip_filter"] = {
            "allow": _as_list(ip_filter.get("whitelist")),
            "deny": _as_list(ip_filter.get("blacklist")),  # blacklist wins, as ours
        }
    names = {"id_filter": "UUIDs", "name_filter": "usernames"}
    for key, what in names.items():
        players = filters.get(key)
        if isinstance(players, Mapping) and players.get("enabled", True):
            listed = {
                "allow": _as_list(players.get("whitelist")),
                "deny": _as_list(players.get("blacklist")),
            }
            merged = out.setdefault("players", {"allow": [], "deny": []})
            for side, values in listed.items():
                merged[side] += [v for v in values if v not in merged[side]]
            if not any(listed.values()):
                notes.append(f"filters.{key}: enabled with no {what}")
    if isinstance(filters.get("ban"), Mapping):
        notes.append(
            "filters.ban: Infrarust's bans file format differs; re-add its bans with "
            "discoproxy ban add (bans_file is discoproxy's own)"
        )
    for key in sorted(set(filters) - {"rate_limiter", "ip_filter", *names, "ban"}):
        notes.append(f"filters.{key}: not known to this import")


def first_error(exc: ValidationError) -> tuple[str, str]:
    """Where (dotted) and what of a validation's first error, as an import reports it."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return where, first["msg"].removeprefix("Value error, ")


def refusal(exc: ValidationError) -> ValueError:
    """An output that does not validate, refused naming its key (``where: what``)."""
    return ValueError("{}: {}".format(*first_error(exc)))


if __name__ == "__main__":
    print(gate_markdown())
