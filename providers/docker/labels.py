"""Docker labels: one spec per label (:data:`LABELS`) drives the parser, the messages
and the generated ``labels.md`` (:func:`labels_markdown`). Pure: no engine, no SDK."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from discoproxy.model import (
    DEFAULT_BACKEND_PORT,
    MAX_WEIGHT,
    HealthCheck,
    Motd,
    ProxyMode,
    ServerDefinition,
    ServerMotds,
)
from providers.docker.settings import DEFAULT_LABEL_PREFIX, DockerSettings, SwarmSettings

_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


# -- labels -------------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    """``true``/``1``/``false``/``0`` in any case; anything else is an error."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected true, 1, false or 0, got {text!r}")


def parse_port(text: str) -> int:
    value = text.strip()
    if value.isascii() and value.isdigit() and 1 <= int(value) <= 65535:
        return int(value)
    raise ValueError(f"expected 1-65535, got {text!r}")


def parse_text(text: str) -> str | None:
    """A free-form value; blank means unset."""
    return text.strip() or None


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smh]?)$")


def parse_seconds(text: str) -> float:
    """A duration: seconds (``90``, ``2.5``) or with a unit (``90s``, ``10m``, ``1h``)."""
    match = _DURATION_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"expected a duration such as 30, 30s, 10m or 1h, got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


# Digits a whole-number label may have: more is out of every field's range anyway (and
# past 4,300 Python's int() refuses with a message about itself, not the label).
MAX_INT_DIGITS = 18


def parse_int(text: str) -> int:
    value = text.strip()
    if value.isascii() and value.isdigit() and len(value) <= MAX_INT_DIGITS:
        return int(value)
    raise ValueError(f"expected a whole number >= 0, got {text!r}")


_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def parse_group(text: str) -> str:
    value = text.strip()
    if not _GROUP_RE.match(value):
        raise ValueError(
            f"invalid group {text!r}; expected letters, digits, '.', '_' or '-' "
            "(at most 200, starting with a letter or digit), e.g. 'survival'"
        )
    return value


def parse_weight(text: str) -> int:
    value = parse_int(text)
    if value > MAX_WEIGHT:
        raise ValueError(f"invalid weight {text!r}; expected an integer from 0 to {MAX_WEIGHT}")
    return value


def parse_path(text: str) -> str:
    """A file path, trimmed (a label's stray space is never part of a file's name)."""
    value = text.strip()
    if not value:
        raise ValueError("expected a file path, got ''")
    return value


def parse_network(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("expected a Docker network name, got ''")
    return value


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """One label: how it parses, and what ``labels.md`` says about it."""

    key: str
    type: str
    default: str
    example: str
    accepted: str
    maps_to: str
    description: str
    parse: Callable[[str], object]
    #: the ServerDefinition field the parsed value is passed to, if any; dotted for a
    #: nested one (``motds.sleeping.text``)
    field: str | None = None


def _field_doc(field: str) -> str:
    return ServerDefinition.model_fields[field].description or ""


_MOTD_STATES = ("online", "unreachable", "starting", "sleeping")
_MOTD_FIELDS: tuple[tuple[str, str, str, str, Callable[[str], object]], ...] = (
    # key, type, example, accepted, parse
    (
        "text",
        "string",
        "`§aSurvival§r is up`",
        "legacy `§` text (`\\n` for the second line) or a JSON text component",
        lambda text: text.replace("\\n", "\n"),
    ),
    ("version_name", "string", "`Paper 1.21`", "any text", parse_text),
    ("max_players", "integer", "`100`", "0 to 2147483647", parse_int),
    ("online_players", "integer", "`0`", "0 to 2147483647", parse_int),
    (
        "favicon",
        "string",
        "`/icons/survival.png`",
        "path (inside discoproxy's container) of a 64x64 PNG, or a `data:image/png;base64,` URI",
        parse_text,
    ),
)


def _motd_labels() -> tuple[LabelSpec, ...]:
    specs = []
    for state in _MOTD_STATES:
        state_doc = ServerMotds.model_fields[state].description or ""
        for key, kind, example, accepted, parse in _MOTD_FIELDS:
            field_doc = Motd.model_fields[key].description or ""
            specs.append(
                LabelSpec(
                    key=f"motds.{state}.{key}",
                    type=kind,
                    default="the global `[motds." + state + "]`" if state != "online" else "none",
                    example=example,
                    accepted=accepted,
                    maps_to=f"`motds.{state}.{key}`",
                    description=f"{state_doc} {field_doc}",
                    parse=parse,
                    field=f"motds.{state}.{key}",
                )
            )
    return tuple(specs)


_HEALTH_CHECK_FIELDS: tuple[tuple[str, str, str, str, Callable[[str], object]], ...] = (
    ("type", "string", "`minecraft`", "`tcp`, `minecraft`, `tls`, `http`", parse_text),
    ("interval", "duration", "`5s`", "0.2 s to 1 h: `5`, `0.5`, `2s`, `1m`", parse_seconds),
    ("timeout", "duration", "`2s`", "more than 0, at most 60 s", parse_seconds),
    ("rise", "integer", "`2`", "1-100", parse_int),
    ("fall", "integer", "`3`", "1-100", parse_int),
    ("http_path", "string", "`/health`", "a path starting with `/`", parse_text),
    ("http_status", "integer", "`200`", "100-599", parse_int),
)


_CHECK_ON = " Setting it turns active checks on for every replica."


def _health_check_labels() -> tuple[LabelSpec, ...]:
    specs = []
    for key, kind, example, accepted, parse in _HEALTH_CHECK_FIELDS:
        info = HealthCheck.model_fields[key]
        default = "required for a check" if info.is_required() else f"`{info.default}`"
        specs.append(
            LabelSpec(
                key=f"health_check.{key}",
                type=kind,
                default=default,
                example=example,
                accepted=accepted,
                maps_to=f"`health_check.{key}`",
                description=(info.description or "") + (_CHECK_ON if key == "type" else ""),
                parse=parse,
                field=f"health_check.{key}",
            )
        )
    return tuple(specs)


LABELS: tuple[LabelSpec, ...] = (
    LabelSpec(
        key="enable",
        type="bool",
        default="`true` when `domains` is set",
        example="`true`",
        accepted="`true`, `1`, `false`, `0` (any case)",
        maps_to="(selection only)",
        description="Route this container. `false` excludes it whatever its other labels "
        "say; `true` is needed only for a container without `domains` (a catch-all with "
        "`default`).",
        parse=parse_bool,
    ),
    LabelSpec(
        key="domains",
        type="comma-separated list",
        default="none",
        example="`mc.example.com,*.mc.example.com`",
        accepted="host names, or `*.` followed by a host name (wildcard)",
        maps_to="`domains`",
        description=_field_doc("domains") + " Blanks around commas are ignored.",
        parse=lambda text: text,
        field="domains",
    ),
    LabelSpec(
        key="port",
        type="integer",
        default=f"`{DEFAULT_BACKEND_PORT}`",
        example="`25566`",
        accepted="1-65535",
        maps_to="the port of `addresses`",
        description="The port the server listens on inside the container. With "
        "`use_published_ports`, the container port whose published host port is used.",
        parse=parse_port,
    ),
    LabelSpec(
        key="docker_network",
        type="string",
        default="see *Backend address*",
        example="`minecraft`",
        accepted="the name of a network the container is attached to",
        maps_to="the host of `addresses` (the container's IP on that network)",
        description="The Docker network discoproxy reaches the container on. Needed when "
        "the container is on several networks and the choice is not otherwise clear.",
        parse=parse_network,
    ),
    LabelSpec(
        key="proxy_mode",
        type="string",
        default=f"`{ProxyMode.PASSTHROUGH.value}`",
        example=f"`{ProxyMode.PASSTHROUGH.value}`",
        accepted=", ".join(f"`{mode.value}`" for mode in ProxyMode),
        maps_to="`proxy_mode`",
        description=_field_doc("proxy_mode"),
        parse=lambda text: text,
        field="proxy_mode",
    ),
    LabelSpec(
        key="send_proxy_protocol",
        type="bool",
        default="`false`",
        example="`true`",
        accepted="`true`, `1`, `false`, `0` (any case)",
        maps_to="`send_proxy_protocol`",
        description=_field_doc("send_proxy_protocol"),
        parse=parse_bool,
        field="send_proxy_protocol",
    ),
    LabelSpec(
        key="name",
        type="string",
        default="none",
        example="`Survival`",
        accepted="any text",
        maps_to="`name`",
        description=_field_doc("name"),
        parse=parse_text,
        field="name",
    ),
    LabelSpec(
        key="default",
        type="bool",
        default="`false`",
        example="`true`",
        accepted="`true`, `1`, `false`, `0` (any case)",
        maps_to="`default`",
        description=_field_doc("default"),
        parse=parse_bool,
        field="default",
    ),
    LabelSpec(
        key="ports",
        type="comma-separated list",
        default="none",
        example="`25575/tcp,19132/udp,9000-9010:8000-8010/tcp`",
        accepted="`PORT[-END][:TARGET[-END]]/tcp` or `/udp` (`/tcp` when left out)",
        maps_to="`ports`",
        description=_field_doc("ports")
        + " The ports are opened on discoproxy's `port_routes_bind` address while the "
        "container is routed, and closed when it goes (open connections finish).",
        parse=lambda text: text,
        field="ports",
    ),
    LabelSpec(
        key="ip_filter.allow",
        type="comma-separated list",
        default="everyone not denied",
        example="`10.0.0.0/8,2001:db8::/32`",
        accepted="IPv4/IPv6 addresses and CIDRs",
        maps_to="`ip_filter.allow`",
        description="Only these client addresses (after PROXY protocol) may reach this "
        "server; applied after the global `[ip_filter]`, which it can narrow, never widen.",
        parse=lambda text: text,
        field="ip_filter.allow",
    ),
    LabelSpec(
        key="ip_filter.deny",
        type="comma-separated list",
        default="none",
        example="`203.0.113.0/24`",
        accepted="IPv4/IPv6 addresses and CIDRs",
        maps_to="`ip_filter.deny`",
        description="Client addresses refused by this server, whatever `ip_filter.allow` says.",
        parse=lambda text: text,
        field="ip_filter.deny",
    ),
    LabelSpec(
        key="players.allow",
        type="comma-separated list",
        default="every player not denied",
        example="`Steve,Alex`",
        accepted="usernames (1-16 letters, digits, `_`; any case) and UUIDs",
        maps_to="`players.allow`",
        description="Only these players may log in to this server (checked at Login Start; "
        "a UUID matches the player's offline-mode UUID); applied after the global "
        "`[players]`, which it can narrow, never widen.",
        parse=lambda text: text,
        field="players.allow",
    ),
    LabelSpec(
        key="players.deny",
        type="comma-separated list",
        default="none",
        example="`Griefer`",
        accepted="usernames and UUIDs",
        maps_to="`players.deny`",
        description="These players may not log in to this server, whatever `players.allow` says.",
        parse=lambda text: text,
        field="players.deny",
    ),
    LabelSpec(
        key="wake.allow",
        type="comma-separated list",
        default="anyone who may log in",
        example="`Steve,Alex`",
        accepted="usernames and UUIDs",
        maps_to="`wake.allow`",
        description="With `auto_start`: only these players' logins start the stopped "
        "container; others read `wake_not_allowed_message` and it stays stopped.",
        parse=lambda text: text,
        field="wake.allow",
    ),
    LabelSpec(
        key="max_players",
        type="int",
        default="`0` (no limit)",
        example="`20`",
        accepted="a whole number from 0 to 2147483647",
        maps_to="`max_players`",
        description=_field_doc("max_players"),
        parse=parse_int,
        field="max_players",
    ),
    LabelSpec(
        key="tls.cert",
        type="path",
        default="none",
        example="`/certs/shop.pem`",
        accepted="a PEM file inside discoproxy's container",
        maps_to="`tls.cert`",
        description="Terminate TLS for this container with this certificate chain (with "
        "`tls.key`); TLS passes through untouched without it.",
        parse=parse_path,
        field="tls.cert",
    ),
    LabelSpec(
        key="tls.key",
        type="path",
        default="none",
        example="`/certs/shop.key`",
        accepted="a PEM file inside discoproxy's container",
        maps_to="`tls.key`",
        description="The private key of `tls.cert`.",
        parse=parse_path,
        field="tls.key",
    ),
    LabelSpec(
        key="tls.backend_tls",
        type="bool",
        default="`false`",
        example="`true`",
        accepted="`true`, `1`, `false`, `0` (any case)",
        maps_to="`tls.backend_tls`",
        description="With `tls.cert`: speak TLS to the container too (re-encrypt).",
        parse=parse_bool,
        field="tls.backend_tls",
    ),
    LabelSpec(
        key="tls.backend_verify",
        type="bool",
        default="`true`",
        example="`false`",
        accepted="`true`, `1`, `false`, `0` (any case)",
        maps_to="`tls.backend_verify`",
        description="With `tls.backend_tls`: verify the container's certificate (default `true`).",
        parse=parse_bool,
        field="tls.backend_verify",
    ),
    LabelSpec(
        key="tls.backend_ca",
        type="path",
        default="none",
        example="`/certs/ca.pem`",
        accepted="a PEM file inside discoproxy's container",
        maps_to="`tls.backend_ca`",
        description="With `tls.backend_tls`: CA bundle to verify the container's certificate.",
        parse=parse_path,
        field="tls.backend_ca",
    ),
    LabelSpec(
        key="status_cache_ttl",
        type="duration",
        default="the global `status_cache_ttl`",
        example="`10s`",
        accepted="seconds (`30`, `2.5`) or with a unit: `30s`, `10m`, `1h`",
        maps_to="`status_cache_ttl`",
        description=_field_doc("status_cache_ttl"),
        parse=parse_seconds,
        field="status_cache_ttl",
    ),
    LabelSpec(
        key="domain_rewrite",
        type="string",
        default="none",
        example="`backend`",
        accepted="`backend`, or a host name",
        maps_to="`domain_rewrite`",
        description=_field_doc("domain_rewrite"),
        parse=parse_text,
        field="domain_rewrite",
    ),
    LabelSpec(
        key="tcpshield_real_ip",
        type="bool",
        default="`false`",
        example="`true`",
        accepted="`true`, `1`, `false`, `0` (any case)",
        maps_to="`tcpshield_real_ip`",
        description=_field_doc("tcpshield_real_ip"),
        parse=parse_bool,
        field="tcpshield_real_ip",
    ),
    LabelSpec(
        key="auto_start",
        type="bool",
        default="`false`",
        example="`true`",
        accepted="`true`, `1`, `false`, `0` (any case)",
        maps_to="`auto_start`",
        description=_field_doc("auto_start")
        + " A stopped (exited or created) container with this label stays routed: pings "
        "show the `sleeping` MOTD and a login starts it.",
        parse=parse_bool,
        field="auto_start",
    ),
    LabelSpec(
        key="auto_stop_after",
        type="duration",
        default="never",
        example="`10m`",
        accepted="seconds (`600`) or with a unit: `30s`, `10m`, `1h`",
        maps_to="`auto_stop_after`",
        description=_field_doc("auto_stop_after"),
        parse=parse_seconds,
        field="auto_stop_after",
    ),
    LabelSpec(
        key="use_healthcheck",
        type="bool",
        default="`true`",
        example="`false`",
        accepted="`true`, `false`, `1`, `0`",
        maps_to="none (this container's address)",
        description="Follow the container's Docker `HEALTHCHECK`: while it is `starting` "
        "or `unhealthy` the container takes no new connections: it is held back in its "
        "pool, shown `starting` or `down`; a route whose every container is held back "
        "stays, with nothing to dial (status pings get the `unreachable` MOTD, logins "
        "`unreachable_message`). `false`: route it whatever its health says.",
        parse=parse_bool,
    ),
    LabelSpec(
        key="group",
        type="string",
        default="the Compose service: `<project>-<service>`",
        example="`survival`",
        accepted="letters, digits, `.`, `_`, `-` (at most 200)",
        maps_to="the server `id` of the pool",
        description="Containers with the same group are one server with one backend "
        "each (a pool); their routing labels must agree. Without it, the replicas of one "
        "Compose service form the pool. An `auto_start` pool sleeps while no replica "
        "runs; a login starts them all.",
        parse=parse_group,
    ),
    LabelSpec(
        key="balance",
        type="string",
        default="`round_robin` for a pool of replicas, else `failover`",
        example="`least_connections`",
        accepted="`failover`, `round_robin`, `random`, `least_connections`, "
        "`lowest_latency` (with `health_check.type`), `fewest_players` (with "
        "`health_check.type=minecraft`)",
        maps_to="`balance`",
        description=_field_doc("balance"),
        parse=parse_text,
        field="balance",
    ),
    LabelSpec(
        key="weight",
        type="integer",
        default="`1`",
        example="`3`",
        accepted="0-256 (0: no new connections while another replica is up)",
        maps_to="the `weight` of this container's address",
        description="This replica's share of new connections in its pool.",
        parse=parse_weight,
    ),
    *_health_check_labels(),
    LabelSpec(
        key="sticky_ttl",
        type="duration",
        default="`0` (off)",
        example="`10m`",
        accepted="seconds (`600`) or with a unit: `30s`, `10m`, `1h`",
        maps_to="`sticky_ttl`",
        description=_field_doc("sticky_ttl"),
        parse=parse_seconds,
        field="sticky_ttl",
    ),
    *_motd_labels(),
)
LABELS_BY_KEY = {spec.key: spec for spec in LABELS}
# for messages: the MOTD labels as one pattern rather than twenty names
_KNOWN_LABELS = ", ".join(
    [spec.key for spec in LABELS if not spec.key.startswith("motds.")]
    + [f"motds.{{{','.join(_MOTD_STATES)}}}.{{{','.join(f[0] for f in _MOTD_FIELDS)}}}"]
)
# pydantic reports errors under a field's alias (``proxyMode``) or its name; nested
# fields under their dotted path
SPEC_BY_FIELD = {
    name: spec
    for spec in LABELS
    if spec.field is not None
    for name in (
        (spec.field,)
        if "." in spec.field
        else (spec.field, ServerDefinition.model_fields[spec.field].alias or spec.field)
    )
}


def nest(values: Mapping[str, object]) -> dict[str, object]:
    """``{"motds.sleeping.text": v}`` → ``{"motds": {"sleeping": {"text": v}}}``."""
    nested: dict[str, object] = {}
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = nested
        for part in parents:
            child = node.setdefault(part, {})
            assert isinstance(child, dict)
            node = child
        node[leaf] = value
    return nested


# A problem's message longer than this keeps its first and last PROBLEM_KEPT_CHARS.
MAX_PROBLEM_CHARS = 500
PROBLEM_KEPT_CHARS = 200


@dataclass(frozen=True, slots=True, order=True)
class LabelProblem:
    """Why a container is not routed (``dropped``), or a warning about its labels."""

    container: str
    label: str | None
    message: str
    dropped: bool = True
    kind: str = "container"  # or "service" (the Swarm provider)

    def __post_init__(self) -> None:
        # a message echoes the value: a label of kilobytes keeps its start and the
        # reason's end, not a log line of kilobytes
        if len(self.message) > MAX_PROBLEM_CHARS:
            cut = len(self.message) - 2 * PROBLEM_KEPT_CHARS
            shown = (
                f"{self.message[:PROBLEM_KEPT_CHARS]} … ({cut} characters left out) … "
                f"{self.message[-PROBLEM_KEPT_CHARS:]}"
            )
            object.__setattr__(self, "message", shown)

    def __str__(self) -> str:
        # container-level messages read as a sentence: "container mc-1 is on networks …"
        if self.label is None:
            return f"{self.kind} {self.container} {self.message}"
        return f"{self.kind} {self.container}, label {self.label}: {self.message}"


def unknown_label(name: str, prefix: str, key: str) -> LabelProblem:
    close = difflib.get_close_matches(key, list(LABELS_BY_KEY), n=1)
    hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
    # refused, not ignored: a mistyped rule (ip_filter.alow) would route the container
    # without the rule it meant
    return LabelProblem(name, f"{prefix}.{key}", f"unknown label{hint}; known: {_KNOWN_LABELS}")


# -- docs ---------------------------------------------------------------------------------


def _settings_rows(
    model: type[DockerSettings] = DockerSettings, skip: Collection[str] = ()
) -> list[str]:
    rows = []
    for key, info in model.model_fields.items():
        if key == "enabled" or key in skip:
            continue  # the base's, documented with its own row
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        doc_default = extra.get("doc_default")
        if isinstance(doc_default, str):
            default = doc_default
        elif info.default is None:
            default = "none"
        else:
            value = info.default
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            default = f"`{getattr(value, 'value', shown)}`"
        rows.append(f"| `{key}` | {default} | {info.description or ''} |")
    return rows


def _mc_router_section(p: str) -> list[str]:
    # imported here: mc_router builds on this module's LabelProblem and parsers
    from providers.docker import mc_router

    return [
        "## Coming from mc-router",
        "",
        "Containers labelled for itzg/mc-router are routed as mc-router routes them, next",
        f"to `{p}.*` ones: each `mc-router.*` label reads as the discoproxy label below. A",
        "container without `mc-router.host` is not routed (as in mc-router, even with",
        f"`mc-router.default`); one with both `mc-router.*` and `{p}.*` labels is reported",
        "and not routed. mc-router's global flags `-auto-scale-up`, `-auto-scale-down` and",
        "`-auto-scale-down-after` are the provider's `mc_router_auto_scale_up`,",
        "`mc_router_auto_scale_down` and `mc_router_auto_scale_down_after` (above): a",
        "container's own label wins, as in mc-router (`discoproxy import mc-router`",
        "carries them over). A `mc-router.*` label not in",
        "this table is refused (the container is not routed, the problem names it), where",
        f"mc-router ignores it: remove it, or move the container to `{p}.*` labels.",
        "",
        "| mc-router label | discoproxy |",
        "| --- | --- |",
        *mc_router.migration_rows(p),
        "",
    ]


def labels_markdown(prefix: str = DEFAULT_LABEL_PREFIX) -> str:
    """``labels.md``: every label, its type, default, example, accepted values and field."""
    p = prefix
    lines = [
        "# Docker labels",
        "",
        "<!-- Generated from providers/docker/labels.py by `discoproxy labels`; do not",
        "     edit by hand: run `uv run discoproxy labels > labels.md`. -->",
        "",
        "The Docker provider turns every labelled, running container into one server, as if",
        "it had a file in `servers_dir`: each label maps to a field of the server-file",
        "format, and the server's `id` is the container name (shown as `<name>@docker` in",
        "logs and `discoproxy routes`; the replicas of a Compose service or a group are one",
        "server, `<project>-<service>` or the group's name: see Replicas). Routes follow",
        "the engine's events: a container that starts is routable at once, one that stops,",
        "dies, pauses or is removed is not. When the engine goes away, the last routes stay",
        "until it answers again; then every container is listed afresh.",
        "",
        "## Which containers are routed",
        "",
        f"A running container is routed when it has the label `{p}.domains` or `{p}.ports`, or",
        f"`{p}.enable=true` (with `{p}.default=true`, for a catch-all without domains).",
        f"`{p}.enable=false` excludes a container whatever its other labels say. Paused",
        "containers are not routed. The prefix is the provider's `label_prefix` setting.",
        "",
        "A stopped container (exited, or created and never started) labelled",
        f"`{p}.auto_start=true` stays routed as a *sleeping* server: status pings show its",
        "`sleeping` MOTD, and a",
        "login starts it through the Docker API (one start however many players log in at",
        f"once). With `{p}.auto_stop_after`, discoproxy stops it again after that long",
        "without a player. discoproxy then needs the Docker socket with write access.",
        "",
        "## Replicas: one server, many containers",
        "",
        "The containers of one Compose service (`docker compose up --scale survival=3`) are",
        "one server, `<project>-<service>`, with one backend per running container, balanced",
        f"`round_robin` unless `{p}.balance` says otherwise; `{p}.group=<name>` pools any",
        "containers under that name instead. A replica that starts joins the pool at once,",
        "one that stops leaves it (its open connections finish). The replicas must agree on",
        "every label but `weight`, `port`, `docker_network` and `use_healthcheck`: one that",
        "disagrees is reported, naming the label and both values, and left out. A pool of",
        f"`{p}.auto_start` replicas routes to those running; while none runs it sleeps, a",
        "login starts every replica (as `docker compose start` would) and `auto_stop_after`",
        "stops them all.",
        "",
        "## Swarm services",
        "",
        "The Swarm provider (`[providers.swarm]`, pointed at a manager) reads the same labels",
        "from *services* (`deploy.labels` in a stack file; a task's container labels are the",
        "Docker provider's business). Each labelled service is one pooled server named after",
        "the service, with one backend per running task on any node, global or replicated,",
        "reached by the task's own IP on the service's network (chosen as for containers:",
        f"`{p}.docker_network`, the provider's `network`, the one network shared with",
        "discoproxy, or the service's only non-ingress network). Never the service's virtual",
        "IP: without IPVS in the kernel the VIP routes nowhere, and published ports go",
        "through the routing mesh, so `use_published_ports = true` is refused. Services and",
        "tasks are listed after every service or node event the manager raises (create,",
        "update, remove; then every 0.25 s for 10 s while the tasks move) and every",
        "`poll_interval`: a manager raises no event for a task that starts or stops on",
        "another node, so that is routed within `poll_interval` plus one listing.",
        "",
        f"A replicated service labelled `{p}.auto_start=true` with no task running (scaled",
        "to 0) stays routed as a *sleeping* server; a login scales it to 1 replica and waits",
        f"as for containers, and `{p}.auto_stop_after` scales it back to 0. A global service",
        "cannot be scaled, so these labels on one are refused. Problems name the service:",
        "",
        "```",
        f"service mc_survival, label {p}.port: expected 1-65535, got 'x'; not routed",
        "```",
        "",
        *_mc_router_section(p),
        "## Labels",
        "",
        "| label | type | default | example | accepted values | server-file field |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in LABELS:
        lines.append(
            f"| `{p}.{spec.key}` | {spec.type} | {spec.default} | {spec.example} "
            f"| {spec.accepted} | {spec.maps_to} |"
        )
    lines += [""]
    for spec in LABELS:
        lines.append(f"- `{p}.{spec.key}`: {spec.description}")
    lines += [
        "",
        "Each container gives its server (or its pool) one address, `<host>:<port>`, "
        "worked out below.",
        "",
        "## Backend address",
        "",
        f"The port is `{p}.port`. The host is chosen in this order:",
        "",
        "1. `network_mode: host`: the provider's `host_address` (the container shares the",
        "   Docker host's network).",
        "2. With `use_published_ports = true`: the host port published for `port`/tcp, at",
        "   `host_address` (or at the binding's own IP when it is not `0.0.0.0`/`::`).",
        "3. Otherwise the container's IP (IPv4, else global IPv6) on one network:",
        f"   - the network named by `{p}.docker_network`; the container must be on it;",
        "   - else the provider's `network` setting, if the container is on it;",
        "   - else, when discoproxy itself runs in a container: the one network the two",
        "     share (none or several shared is reported);",
        "   - else the container's only network.",
        "",
        "A container on several networks with none of these choosing one is reported, never",
        'routed on "the first" network: Docker lists networks in no particular order.',
        "`network_mode: none` and containers without an IP are reported too;",
        "`network_mode: container:<other>` uses the other container's networks.",
        "",
        "## Errors",
        "",
        "A bad label drops that container only; every other container is still routed.",
        "Each problem is logged once, when it first appears, naming the container, the label,",
        "the value and the accepted form:",
        "",
        "```",
        f"container mc-1, label {p}.port: expected 1-65535, got '25565a'; not routed",
        f"container mc-2, label {p}.send_proxy_protocol: expected true, 1, false or 0, "
        "got 'yes'; not routed",
        f"container mc-3 is on networks backend, frontend: set label {p}.docker_network to choose; "
        "not routed",
        "```",
        "",
        f"An unknown `{p}.*` label is refused like a bad value (the container is not routed,",
        "the problem names the closest known label): a mistyped rule such as",
        f"`{p}.ip_filter.alow` would otherwise route it without the rule it meant.",
        "Two containers claiming one domain are a conflict: the registry routes it to the",
        "first qualified id in sort order and logs the conflict.",
        "",
        "## Provider settings",
        "",
        "`[providers.docker]` in the global config:",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
        "| `enabled` | `auto` | `auto`: on when the engine answers at `endpoint`; `true`, "
        "`false` |",
        *_settings_rows(),
        "",
        "`[providers.swarm]` takes the same keys but `engines`, which it refuses (a swarm is",
        "read from one manager: its `endpoint`); `enabled = auto` is on when the engine at",
        "`endpoint` is a manager of an active swarm, and `use_published_ports` must stay",
        "false. It also takes:",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
        *_settings_rows(SwarmSettings, skip=DockerSettings.model_fields),
        "",
        "## Example",
        "",
        "```yaml",
        "services:",
        "  survival:",
        "    image: itzg/minecraft-server",
        "    labels:",
        f'      {p}.domains: "survival.example.com,*.survival.example.com"',
        f'      {p}.send_proxy_protocol: "true"',
        "```",
        "",
    ]
    return "\n".join(lines)
