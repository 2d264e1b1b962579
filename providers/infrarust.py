"""Infrarust server files as they are, v2 (TOML) and v1 (YAML, camelCase keys): each
Infrarust key that discoproxy's own server-file format does not spell the same way is
translated, loaded with a warning, or refused with the reason (issue 18).

Rules for this file:
- :data:`V1_KEYS` and :data:`SERVER_KEYS` are the one table: the loader
  (:func:`translate_server`) and the README's migration table read them, so what the
  docs say is what loading does. v1 keys run first and turn into v2's or ours, so a v1
  file then goes through the same v2 rules (``proxyMode`` → ``proxy_mode`` → checked).
- A key that can change where a player goes or who gets in is honoured with Infrarust's
  meaning or refused, naming the key and why. Only keys whose absence can never change
  routing or access (display-only MOTD states, ``limbo_handlers``, ``timeouts``) load
  with a warning naming them.
- Pure: a document (dict) in, the same dict changed and the warnings out; a refusal is
  a ``ValueError`` the loader turns into its usual file-and-key error.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from discoproxy.model import (
    FORWARDING_PROXY_MODES,
    INTERCEPTED_PROXY_MODES,
    INTERCEPTED_REASON,
    peer_duration_s,
)

Document = MutableMapping[str, Any]


@dataclass(frozen=True)
class KeyRule:
    key: str
    what: str  # what discoproxy does with it, for the migration table
    apply: Callable[[Document, Any], str | None]  # a warning, or None; raises to refuse


# The MOTD states both have; Infrarust's others are display-only.
_SAME_MOTD_STATES = ("online", "sleeping", "starting", "unreachable")
_DISPLAY_ONLY_STATES = ("offline", "crashed", "stopping")


# v1's single-answer `motd` (its English reference): the same fields, other names.
_V1_MOTD_FIELDS = {"version": "version_name", "description": "text"}
_MOTD_STATES = (*_SAME_MOTD_STATES, *_DISPLAY_ONLY_STATES, "shutting_down", "unable_status")


def _motd(data: Document, value: Any) -> str | None:
    if not isinstance(value, dict):
        raise ValueError("motd: expected a table of states, e.g. [motd.online]")
    if "motds" in data:
        raise ValueError("motd and motds: both given; keep one (motd is Infrarust's spelling)")
    if value and not set(value) & set(_MOTD_STATES):  # v1: one answer, shown while online
        data["motds"] = {"online": {_V1_MOTD_FIELDS.get(k, k): v for k, v in value.items()}}
        return None
    dropped = sorted(state for state in value if state in _DISPLAY_ONLY_STATES)
    data["motds"] = {k: v for k, v in value.items() if k not in _DISPLAY_ONLY_STATES}
    if dropped:
        states = ", ".join(f"motd.{s}" for s in dropped)
        return (
            f"{states}: states discoproxy does not show (it shows "
            f"{', '.join(_SAME_MOTD_STATES)}); ignored"
        )
    return None


def _ip_filter(data: Document, value: Any) -> str | None:
    if isinstance(value, dict) and ("whitelist" in value or "blacklist" in value):
        if {"allow", "deny"} & set(value):
            raise ValueError(
                "ip_filter: whitelist/blacklist (Infrarust's) and allow/deny (discoproxy's) "
                "mixed; use one pair"
            )
        translated = dict(value)
        if "whitelist" in translated:
            translated["allow"] = translated.pop("whitelist")
        if "blacklist" in translated:
            translated["deny"] = translated.pop("blacklist")
        data["ip_filter"] = translated  # deny wins inside allow, as Infrarust's blacklist
    else:
        data["ip_filter"] = value
    return None


def _proxy_mode(data: Document, value: Any) -> str | None:
    word = value if isinstance(value, str) else None  # a list or a table is not hashable
    if word in FORWARDING_PROXY_MODES:
        data["proxy_mode"] = "passthrough"  # all three forward the bytes as they are
        return None
    if word in INTERCEPTED_PROXY_MODES:
        raise ValueError(f"proxy_mode = {value}: {INTERCEPTED_REASON}")
    data["proxy_mode"] = value  # the model says what it accepts
    return None


def _forwarding_mode(data: Document, value: Any) -> str | None:
    if value in (None, "none"):
        return None
    raise ValueError(
        f"forwarding_mode = {value}: the proxy does not take part in the login, so it "
        "cannot add the player's forwarding data and the backend would reject every "
        "player; remove it (and send_proxy_protocol = true gives the backend the real "
        "address)"
    )


def _max_players(data: Document, value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"max_players: expected a whole number >= 0, got {value!r}")
    data["max_players"] = value  # ours: the same cap, also the server list's maximum
    return None


def _disconnect_message(data: Document, value: Any) -> str | None:
    data["unreachable_message"] = value
    return None


def _network(data: Document, value: Any) -> str | None:
    return (
        f"network = {value!r}: server switching groups need a proxy in the login; "
        "discoproxy routes by name only, so it has no effect here; ignored"
    )


def _limbo_handlers(data: Document, value: Any) -> str | None:
    if not value:
        return None
    return f"limbo_handlers = {value!r}: discoproxy runs no limbo handlers; ignored"


def _timeouts(data: Document, value: Any) -> str | None:
    if not isinstance(value, dict):
        raise ValueError('timeouts: expected a table, e.g. [timeouts] connect = "3s"')
    unknown = sorted(set(value) - {"connect", "read", "write"})
    if unknown:
        raise ValueError(f"timeouts.{unknown[0]}: unknown; expected connect, read or write")
    if "connect" in value:
        data["connect_timeout"] = peer_duration_s(value["connect"], "timeouts.connect")
    rest = [k for k in ("read", "write") if k in value]
    if rest:
        keys = ", ".join(f"timeouts.{k}" for k in rest)
        return f"{keys}: per server not supported; the global idle_timeout applies; ignored"
    return None


def _bungeecord_channel(data: Document, value: Any) -> str | None:
    if not value:
        return None
    raise ValueError(
        "bungeecord_channel = true: needs a proxy that reads the backend's packets "
        "(client_only/offline); discoproxy forwards bytes; remove it"
    )


def _server_manager(data: Document, value: Any) -> str | None:
    kind = (value.get("type") or value.get("provider_name")) if isinstance(value, dict) else None
    raise ValueError(
        f"server_manager (type {kind!r}): discoproxy starts and stops servers through its "
        "Docker provider (labels auto_start, auto_stop_after) and Swarm services, not "
        "local processes or panels; remove it, or run the server in Docker"
    )


# -- Infrarust v1 (YAML) ------------------------------------------------------------


def _renamed(ours: str) -> Callable[[Document, Any], str | None]:
    def apply(data: Document, value: Any) -> str | None:
        if ours in data:
            raise ValueError(f"{ours}: given twice, in v1's and v2's spelling; keep one")
        data[ours] = value
        return None

    return apply


def _proxy_protocol_version(data: Document, value: Any) -> str | None:
    if value == 2:
        return None
    if value == 1:
        return (
            "proxy_protocol_version = 1: discoproxy sends PROXY protocol v2, which backends "
            "that read the PROXY protocol (Velocity, Paper, BungeeCord, HAProxy) read too"
        )
    raise ValueError(f"proxy_protocol_version: expected 1 or 2, got {value!r}")


def _backend_domain(data: Document, value: Any) -> str | None:
    if "domain_rewrite" in data or data.get("rewriteDomain"):
        raise ValueError("backendDomain: with domain_rewrite or rewriteDomain; keep one")
    data["domain_rewrite"] = {"explicit": value}
    return None


def _rewrite_domain(data: Document, value: Any) -> str | None:
    if not isinstance(value, bool):
        raise ValueError(f"rewriteDomain: expected true or false, got {value!r}")
    if value:
        if "domain_rewrite" in data:
            raise ValueError("rewriteDomain: with domain_rewrite; keep one")
        data["domain_rewrite"] = "from_backend"  # v1: the first address's host, as v2's
    return None


def _motds(data: Document, value: Any) -> str | None:
    """v1's ``motds`` (and ours): states with ``enabled``; ``offline`` is v1's sleeping."""
    if not isinstance(value, dict):
        return None  # the model says what it expects
    states: dict[str, Any] = {}
    ignored: list[str] = []
    for state, motd in value.items():
        if isinstance(motd, dict):
            if motd.get("enabled") is False:
                continue  # a state switched off: Infrarust does not use it either
            motd = {k: v for k, v in motd.items() if k != "enabled"}
            if "samples" in motd:
                motd.pop("samples")
                ignored.append(f"motds.{state}.samples")
        if state == "offline":  # v1: "asleep or stopped: connect to wake it"
            if "sleeping" in value:
                ignored.append("motds.offline")
                continue
            state = "sleeping"
        if state in _SAME_MOTD_STATES:
            states[state] = motd
        elif state in _MOTD_STATES:
            ignored.append(f"motds.{state}")
        else:
            states[state] = motd  # the model names what it does not know
    data["motds"] = states
    if ignored:
        return f"{', '.join(ignored)}: not shown by discoproxy; ignored"
    return None


def _filters(data: Document, value: Any) -> str | None:
    if not isinstance(value, dict):
        raise ValueError("filters: expected a table (ip_filter, rate_limiter, ...)")
    on = {k: f for k, f in value.items() if not (isinstance(f, dict) and f.get("enabled") is False)}
    ip_filter = on.pop("ip_filter", None)
    if ip_filter is not None:
        if "ip_filter" in data:
            raise ValueError("filters.ip_filter: with ip_filter; keep one")
        if isinstance(ip_filter, dict):
            ip_filter = {k: v for k, v in ip_filter.items() if k != "enabled"}
        _ip_filter(data, ip_filter)
    lists: dict[str, list[Any]] = {"allow": [], "deny": []}
    for key in ("name_filter",):  # our players lists
        player_filter = on.pop(key, None)
        if player_filter is None:
            continue
        if not isinstance(player_filter, dict):
            raise ValueError(f"filters.{key}: expected a table (whitelist, blacklist)")
        unknown = sorted(set(player_filter) - {"enabled", "whitelist", "blacklist"})
        if unknown:
            raise ValueError(f"filters.{key}.{unknown[0]}: unknown; expected whitelist, blacklist")
        for side, their in (("allow", "whitelist"), ("deny", "blacklist")):
            names = player_filter.get(their) or []
            if not isinstance(names, list):
                raise ValueError(
                    f"filters.{key}.{their}: expected a list of player names, got {names!r}"
                )
            lists[side] += names
    if lists["allow"] or lists["deny"]:
        if "players" in data:
            raise ValueError("filters.name_filter/id_filter: with players; keep one")
        data["players"] = {k: v for k, v in lists.items() if v}
    why = {
        "rate_limiter": "per-server rate limits are not supported; the global [rate_limit] "
        "(per client IP) applies to every server",
        "id_filter": "Infrarust matches the account's UUID, which only a proxy taking part "
        "in the login knows (discoproxy's players lists match the offline UUID a name "
        "gives); list the names in name_filter (or players) instead",
        "ban": "discoproxy keeps one bans file for every server (bans_file, "
        "`discoproxy ban add`), not one per server",
    }
    for key in on:
        reason = why.get(key, "not known to discoproxy")
        raise ValueError(f"filters.{key}: {reason}; remove it or set enabled: false")
    return None


def _caches(data: Document, value: Any) -> str | None:
    if not isinstance(value, dict):
        raise ValueError("caches: expected a table (status_ttl_seconds, max_status_entries)")
    unknown = sorted(set(value) - {"status_ttl_seconds", "max_status_entries"})
    if unknown:
        raise ValueError(f"caches.{unknown[0]}: unknown; expected status_ttl_seconds")
    if "status_ttl_seconds" in value:
        if "status_cache_ttl" in data:
            raise ValueError("caches.status_ttl_seconds: with status_cache_ttl; keep one")
        data["status_cache_ttl"] = value["status_ttl_seconds"]
    if "max_status_entries" in value:
        return "caches.max_status_entries: the status cache holds one answer per server; ignored"
    return None


V1_KEYS: tuple[KeyRule, ...] = (
    KeyRule("sendProxyProtocol", "`send_proxy_protocol`", _renamed("send_proxy_protocol")),
    KeyRule("proxyMode", "`proxy_mode` (above)", _renamed("proxy_mode")),
    KeyRule(
        "proxy_protocol_version",
        "`2` the same; `1` warned (discoproxy sends v2, which PROXY readers read too)",
        _proxy_protocol_version,
    ),
    KeyRule("backendDomain", '`domain_rewrite = { explicit = "…" }`', _backend_domain),
    KeyRule("rewriteDomain", '`true`: `domain_rewrite = "from_backend"`', _rewrite_domain),
    KeyRule(
        "motds",
        "`online`, `starting`, `unreachable` the same; `offline` is `sleeping`; "
        "`enabled: false` drops a state; `stopping`, `shutting_down`, `crashed`, "
        "`unable_status`, `samples` warned",
        _motds,
    ),
    KeyRule(
        "filters",
        "`ip_filter` as above; `name_filter` → `players` (whitelist → allow, blacklist → "
        "deny); `id_filter` (account UUIDs), `rate_limiter`, `ban` refused (naming why and "
        "the setting to use) unless `enabled: false`",
        _filters,
    ),
    KeyRule(
        "caches",
        "`status_ttl_seconds` → `status_cache_ttl`; `max_status_entries` warned",
        _caches,
    ),
)


SERVER_KEYS: tuple[KeyRule, ...] = (
    KeyRule(
        "motd",
        "the same as `motds`; `offline`, `crashed`, `stopping` warned; v1's single answer "
        "(`version`, `description`, …) is `motds.online`",
        _motd,
    ),
    KeyRule(
        "ip_filter", "`whitelist` → `allow`, `blacklist` → `deny` (blacklist wins)", _ip_filter
    ),
    KeyRule(
        "proxy_mode",
        "`passthrough`, `zero_copy` (v1 `zerocopy`), `server_only` forward bytes; "
        "`client_only`, `offline`, v1 `full` refused",
        _proxy_mode,
    ),
    KeyRule("forwarding_mode", "`none` accepted; any other refused", _forwarding_mode),
    KeyRule(
        "max_players",
        "the same: logins past it are refused (0: no limit); also the server list's maximum",
        _max_players,
    ),
    KeyRule("disconnect_message", "`unreachable_message` of the server", _disconnect_message),
    KeyRule("network", "warned: no server switching", _network),
    KeyRule("limbo_handlers", "warned: no limbo", _limbo_handlers),
    KeyRule(
        "timeouts",
        "`connect` → the server's `connect_timeout`; `read`, `write` warned (the global "
        "idle_timeout applies)",
        _timeouts,
    ),
    KeyRule("bungeecord_channel", "`false` accepted; `true` refused", _bungeecord_channel),
    KeyRule("server_manager", "refused: Docker `auto_start` instead", _server_manager),
)


def translate_server(data: Document) -> list[str]:
    """Turn the Infrarust keys of a server document into discoproxy's, in place; the
    warnings, each naming its key. Raises ValueError for a key that is refused."""
    warnings = []
    for rule in (*V1_KEYS, *SERVER_KEYS):  # table order: motd before max_players fills it
        if rule.key in data:
            warning = rule.apply(data, data.pop(rule.key))
            if warning:
                warnings.append(warning)
    return warnings


README_START = "<!-- infrarust-server-keys: generated from providers/infrarust.py -->"
README_END = "<!-- /infrarust-server-keys -->"


def migration_markdown() -> str:
    """The README's table of Infrarust server-file keys (between its markers):
    ``uv run python -m providers.infrarust`` prints it."""
    lines = [
        README_START,
        "| Infrarust key | discoproxy |",
        "| --- | --- |",
        "| `domains`, `addresses`, `send_proxy_protocol`, `id` | the same |",
        '| `domain_rewrite` | the same: `none`, `from_backend`, `{ explicit = "…" }` |',
        *(f"| `{rule.key}` | {rule.what} |" for rule in SERVER_KEYS),
        "| any other key | refused, naming it |",
        "",
        "Infrarust 1.x YAML server files (`proxies/*.yml`) load too; their own keys:",
        "",
        "| Infrarust 1.x key | discoproxy |",
        "| --- | --- |",
        *(f"| `{rule.key}` | {rule.what} |" for rule in V1_KEYS),
        README_END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(migration_markdown())
