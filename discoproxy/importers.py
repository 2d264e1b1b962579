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

from discoproxy.config import ProxyConfig
from discoproxy.model import ServerDefinition

# Gate Lite's strategy names → ours.
GATE_STRATEGIES = {
    "sequential": "failover",
    "random": "random",
    "round-robin": "round_robin",
    "least-connections": "least_connections",
    "lowest-latency": "lowest_latency",
}
_SLUG = re.compile(r"[^a-z0-9]+")


@dataclass
class Imported:
    config: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # file stem → document
    not_carried: list[str] = field(default_factory=list)


def _duration_s(value: Any, where: str) -> float:
    """Gate's durations: ``10s``, ``1m``, ``500ms``, or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not match:
        raise ValueError(f"{where}: expected a duration such as 10s or 1m, got {value!r}")
    number, unit = float(match[1]), match[2] or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


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
        out["connect_timeout"] = _duration_s(
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
        ServerDefinition.model_validate({"id": stem, **server})  # what is written loads
        imported.servers[stem] = server
    ProxyConfig.model_validate(out)
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
        ttl = _duration_s(route["cachePingTTL"], f"{where}.cachePingTTL")
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
        not_carried.append(
            f"{where}.tcpShieldRealIP: TCPShield's real-IP handshake is not read; put "
            "TCPShield's addresses in trusted_proxies and use its PROXY protocol instead"
        )
    if route.get("max-connections"):
        not_carried.append(
            f"{where}.max-connections = {route['max-connections']}: per-route connection "
            "caps are not supported; max_connections (global) and max_connections_per_ip"
        )
    known = {
        "host", "backend", "strategy", "proxyProtocol", "modifyVirtualHost", "cachePingTTL",
        "fallback", "blacklist", "tcpShieldRealIP", "max-connections",
    }  # fmt: skip
    for key in sorted(set(route) - known):
        not_carried.append(f"{where}.{key}: not known to this import")
    stem = _SLUG.sub("-", (domains[0] if domains else "default").lower()).strip("-")
    return stem or "route", server
