"""Infrarust v2 server files as they are: each Infrarust key that discoproxy's own
server-file format does not spell the same way is translated, loaded with a warning, or
refused with the reason (issue 18).

Rules for this file:
- :data:`SERVER_KEYS` is the one table: the loader (:func:`translate_server`) and the
  README's migration table read it, so what the docs say is what loading does.
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

Document = MutableMapping[str, Any]


@dataclass(frozen=True)
class KeyRule:
    key: str
    what: str  # what discoproxy does with it, for the migration table
    apply: Callable[[Document, Any], str | None]  # a warning, or None; raises to refuse


# The MOTD states both have; Infrarust's others are display-only.
_SAME_MOTD_STATES = ("online", "sleeping", "starting", "unreachable")
_DISPLAY_ONLY_STATES = ("offline", "crashed", "stopping")
_FORWARDING_MODES = {"passthrough", "zero_copy", "server_only"}
_INTERCEPTED_MODES = {"client_only", "offline"}


def _motd(data: Document, value: Any) -> str | None:
    if not isinstance(value, dict):
        raise ValueError("motd: expected a table of states, e.g. [motd.online]")
    if "motds" in data:
        raise ValueError("motd and motds: both given; keep one (motd is Infrarust's spelling)")
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
    if value in _FORWARDING_MODES:
        data["proxy_mode"] = "passthrough"  # all three forward the bytes as they are
        return None
    if value in _INTERCEPTED_MODES:
        raise ValueError(
            f"proxy_mode = {value}: the proxy would have to take part in the login "
            "(authenticate players or rewrite packets); discoproxy forwards the bytes as they "
            "are. Use passthrough (the backend authenticates) or remove it"
        )
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
    if value:  # shown as the server list's maximum unless motd.online sets its own
        motds = data.setdefault("motds", {})
        online = motds.setdefault("online", {})
        if isinstance(online, dict):
            online.setdefault("max_players", value)
        return (
            f"max_players = {value}: shown as the server list's maximum; the backend's "
            "own max-players setting is what turns players away"
        )
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
    return (
        "timeouts: per-server timeouts are not supported; the global connect_timeout and "
        "idle timeouts apply; ignored"
    )


def _bungeecord_channel(data: Document, value: Any) -> str | None:
    if not value:
        return None
    raise ValueError(
        "bungeecord_channel = true: needs a proxy that reads the backend's packets "
        "(client_only/offline); discoproxy forwards bytes; remove it"
    )


def _server_manager(data: Document, value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    raise ValueError(
        f"server_manager (type {kind!r}): discoproxy starts and stops servers through its "
        "Docker provider (labels auto_start, auto_stop_after) and Swarm services, not "
        "local processes or panels; remove it, or run the server in Docker"
    )


SERVER_KEYS: tuple[KeyRule, ...] = (
    KeyRule("motd", "the same as `motds`; `offline`, `crashed`, `stopping` warned", _motd),
    KeyRule(
        "ip_filter", "`whitelist` → `allow`, `blacklist` → `deny` (blacklist wins)", _ip_filter
    ),
    KeyRule(
        "proxy_mode",
        "`passthrough`, `zero_copy`, `server_only` forward bytes; `client_only`, `offline` refused",
        _proxy_mode,
    ),
    KeyRule("forwarding_mode", "`none` accepted; any other refused", _forwarding_mode),
    KeyRule("max_players", "the server list's maximum (warned)", _max_players),
    KeyRule("disconnect_message", "`unreachable_message` of the server", _disconnect_message),
    KeyRule("network", "warned: no server switching", _network),
    KeyRule("limbo_handlers", "warned: no limbo", _limbo_handlers),
    KeyRule("timeouts", "warned: the global timeouts apply", _timeouts),
    KeyRule("bungeecord_channel", "`false` accepted; `true` refused", _bungeecord_channel),
    KeyRule("server_manager", "refused: Docker `auto_start` instead", _server_manager),
)


def translate_server(data: Document) -> list[str]:
    """Turn the Infrarust keys of a server document into discoproxy's, in place; the
    warnings, each naming its key. Raises ValueError for a key that is refused."""
    warnings = []
    for rule in SERVER_KEYS:  # table order: motd before max_players fills it in
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
        README_END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(migration_markdown())
