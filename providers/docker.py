"""The Docker provider: one server per labelled running container, followed live.

Rules for this file:
- Label parsing is pure: :func:`servers_from_containers` takes the engine's
  ``/containers/json`` records (one API call lists them all) and returns the servers and
  the problems, with no I/O, so it is table-tested without an engine. One spec,
  :data:`LABELS`, drives both the parser and the generated ``labels.md``.
- The docker SDK blocks, so every call runs in a worker thread under this provider's own
  :class:`anyio.CapacityLimiter`; the event stream holds one thread for its whole life and
  pokes the loop through a size-1 memory stream: events that arrive while a resync is
  pending only leave it pending (a burst costs one or two resyncs, not one each).
- Every relevant event triggers a full resync and a complete snapshot, as Traefik's
  ``pkg/provider/docker`` does: no diffs, nothing to drift. Events are subscribed to
  *before* the first listing, so nothing that happens in between is lost.
- The event thread also inspects the container of each container event and the loop
  publishes at once (last listing + that inspection: still a complete snapshot), so a
  route does not wait for a listing that a busy engine answers in hundreds of ms. The
  inspection also outranks a listing that lags the event (see FRESH_OVERRIDE_S).
- The SDK's event stream ends silently when the engine stops (its iterator turns socket
  errors into ``StopIteration``); :meth:`DockerProvider.run` then raises and the
  supervisor retries with backoff. A reconnect is a full resync.
- A container is routed only when exactly one backend address follows from its labels and
  networks. Infrarust and mc-router take "the first network" of an unordered map; here the
  choice is deterministic or the container is reported with the reason and dropped.
- A bad label drops that container only. Each distinct problem is logged once, when it
  first appears, not on every resync.
- ``load_once`` (``check``, ``routes --offline``) needs an engine that answers: it lists
  the containers once, as a resync does, and returns the problems instead of logging them
  (a dropped container is an error, a remark a warning); no event stream.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import anyio
import docker
import docker.errors
import docker.utils
from loguru import logger
from pydantic import Field, ValidationError, field_validator

from discoproxy.model import (
    DEFAULT_BACKEND_PORT,
    BackendAddress,
    Motd,
    ProxyMode,
    ServerDefinition,
    ServerMotds,
)
from discoproxy.provider import LoadResult, ProviderSettings, ProxyConfig, Publish

DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"
DEFAULT_LABEL_PREFIX = "infrarust"
# ``available()`` decides at start whether the provider runs in ``auto`` mode: an engine
# that has not answered /version and /_ping within this is treated as absent.
AVAILABLE_TIMEOUT_S = 3
# One thread follows the event stream for the provider's lifetime; one more runs API
# calls (resyncs are sequential). A private limiter keeps the long-lived thread from
# holding a token of anyio's shared default limiter.
WORKER_THREADS = 2
# How long an inspection made for an event outranks the container list. The list is a
# separate in-memory view that the engine updates after it announces some changes: right
# after ``die`` or ``pause`` it still says "running" (5-60 ms on dockerd 20.10, measured).
# Inspect waits for the container's lock, so it returns the settled state.
FRESH_OVERRIDE_S = 2.0

# Container actions that can change what is routable. ``die`` covers crashes and kills,
# ``stop`` a clean stop; ``rename`` changes the server id; ``create`` adds a stopped
# container (routed as sleeping with ``auto_start``). ``connect``/``disconnect`` are
# network events (a container joined or left a network, which may change its address).
CONTAINER_ACTIONS = ("create", "start", "die", "stop", "destroy", "pause", "unpause", "rename")
NETWORK_ACTIONS = ("connect", "disconnect")
EVENT_FILTERS: dict[str, list[str]] = {
    "type": ["container", "network"],
    "event": [*CONTAINER_ACTIONS, *NETWORK_ACTIONS],
}

# Container states an auto_start container is routed in, as sleeping (a login starts it).
SLEEPING_STATES = frozenset({"exited", "created"})
# Seconds a container gets to stop before it is killed (auto_stop_after).
STOP_TIMEOUT_S = 30

_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
_CONTAINER_ID_RE = re.compile(r"[0-9a-f]{64}")
_SHORT_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?$")

T = TypeVar("T")
ContainerRecord = Mapping[str, object]


class DockerProviderError(Exception):
    """Root of the Docker provider's failures; the supervisor logs them and retries."""


class EngineUnavailable(DockerProviderError):
    """Raised when the engine cannot be reached or an API call to it fails."""


class EventStreamEnded(DockerProviderError):
    """Raised when the engine's event stream ends (the engine stopped or restarted)."""


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


def parse_int(text: str) -> int:
    value = text.strip()
    if value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(f"expected a whole number >= 0, got {text!r}")


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
    ("max_players", "integer", "`100`", "0 or more", parse_int),
    ("online_players", "integer", "`0`", "0 or more", parse_int),
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
        key="tls.cert",
        type="path",
        default="none",
        example="`/certs/shop.pem`",
        accepted="a PEM file inside discoproxy's container",
        maps_to="`tls.cert`",
        description="Terminate TLS for this container with this certificate chain (with "
        "`tls.key`); TLS passes through untouched without it.",
        parse=lambda text: text,
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
        parse=lambda text: text,
        field="tls.key",
    ),
    LabelSpec(
        key="tls.backend_tls",
        type="bool",
        default="none",
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
        default="none",
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
        parse=lambda text: text,
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
_SPEC_BY_FIELD = {
    name: spec
    for spec in LABELS
    if spec.field is not None
    for name in (
        (spec.field,)
        if "." in spec.field
        else (spec.field, ServerDefinition.model_fields[spec.field].alias or spec.field)
    )
}


def _nest(values: Mapping[str, object]) -> dict[str, object]:
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


@dataclass(frozen=True, slots=True, order=True)
class LabelProblem:
    """Why a container is not routed (``dropped``), or a warning about its labels."""

    container: str
    label: str | None
    message: str
    dropped: bool = True

    def __str__(self) -> str:
        # container-level messages read as a sentence: "container mc-1 is on networks …"
        if self.label is None:
            return f"container {self.container} {self.message}"
        return f"container {self.container}, label {self.label}: {self.message}"


@dataclass(frozen=True, slots=True)
class ContainerScan:
    """What a list of containers yields: servers sorted by id, and the problems."""

    servers: tuple[ServerDefinition, ...]
    problems: tuple[LabelProblem, ...]


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def container_name(record: ContainerRecord) -> str:
    """The container's name without the leading ``/`` (legacy link aliases skipped)."""
    names = record.get("Names")
    candidates = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    for name in candidates:
        bare = name.removeprefix("/")
        if bare and "/" not in bare:
            return bare
    return _text(record.get("Id"))[:12] or "(unnamed)"


@dataclass(frozen=True, slots=True)
class _Context:
    """What address resolution needs besides the container itself."""

    prefix: str
    network: str | None
    host_address: str
    use_published_ports: bool
    by_id: Mapping[str, ContainerRecord]
    by_name: Mapping[str, ContainerRecord]
    # networks of discoproxy's own container; None when not in a (bridged) container
    own_networks: frozenset[str] | None
    own_name: str | None


def _networks(record: ContainerRecord) -> dict[str, str]:
    """Network name → the container's IP on it (IPv4, else global IPv6; '' if none)."""
    networks = _mapping(_mapping(record.get("NetworkSettings")).get("Networks"))
    found = {}
    for name, settings in networks.items():
        info = _mapping(settings)
        found[name] = _text(info.get("IPAddress")) or _text(info.get("GlobalIPv6Address"))
    return found


def _network_mode(record: ContainerRecord) -> str:
    return _text(_mapping(record.get("HostConfig")).get("NetworkMode")) or "default"


def _published_address(record: ContainerRecord, port: int, ctx: _Context) -> BackendAddress | None:
    """The host address a container's ``port``/tcp is published on, if it is."""
    ports = record.get("Ports")
    bindings = []
    for item in ports if isinstance(ports, list) else []:
        entry = _mapping(item)
        if entry.get("PrivatePort") == port and entry.get("Type", "tcp") == "tcp":
            public = entry.get("PublicPort")
            if isinstance(public, int):
                ip = _text(entry.get("IP"))
                # IPv4 bindings first, then by address: deterministic across resyncs
                bindings.append((":" in ip, ip, public))
    if not bindings:
        return None
    _, ip, public = min(bindings)
    host = ctx.host_address if ip in ("", "0.0.0.0", "::") else ip
    return BackendAddress(host=host, port=public)


def _choose_network(
    name: str, networks: Mapping[str, str], label: str | None, ctx: _Context
) -> tuple[str, str] | LabelProblem:
    """(network, ip) to reach the container on, or why there is no single good one."""
    label_key = f"{ctx.prefix}.docker_network"
    listed = ", ".join(sorted(networks)) or "none"
    if label is not None:
        if label not in networks:
            return LabelProblem(
                name, label_key, f"the container is not on network {label!r}; it is on {listed}"
            )
        chosen = label
    elif ctx.network is not None and ctx.network in networks:
        chosen = ctx.network
    elif ctx.own_networks is not None:
        shared = sorted(set(networks) & ctx.own_networks)
        own = f"discoproxy's container {ctx.own_name}"
        if not shared:
            return LabelProblem(
                name,
                None,
                f"shares no network with {own} (the container is on {listed}, discoproxy on "
                f"{', '.join(sorted(ctx.own_networks)) or 'none'}): connect them to a common "
                f"network, or set label {label_key}",
            )
        if len(shared) > 1:
            return LabelProblem(
                name,
                None,
                f"is on networks {', '.join(shared)}, all shared with {own}: set label "
                f"{label_key} to choose",
            )
        chosen = shared[0]
    elif len(networks) == 1:
        chosen = next(iter(networks))
    elif not networks:
        return LabelProblem(name, None, "is attached to no network: nothing to connect to")
    else:
        return LabelProblem(name, None, f"is on networks {listed}: set label {label_key} to choose")
    ip = networks[chosen]
    if not ip:
        return LabelProblem(name, None, f"has no IP address on network {chosen!r}")
    return chosen, ip


def _backend(
    record: ContainerRecord, name: str, port: int, network_label: str | None, ctx: _Context
) -> BackendAddress | LabelProblem:
    mode = _network_mode(record)
    if mode == "host":
        return BackendAddress(host=ctx.host_address, port=port)
    if ctx.use_published_ports:
        published = _published_address(record, port, ctx)
        if published is None:
            return LabelProblem(
                name,
                f"{ctx.prefix}.port",
                f"container port {port}/tcp is not published (use_published_ports is on): "
                f"publish it (docker run -p …:{port}) or turn use_published_ports off",
            )
        return published
    if mode == "none":
        return LabelProblem(name, None, "has network_mode none: nothing to connect to")
    networks = _networks(record)
    if mode.startswith("container:"):
        target = mode.removeprefix("container:")
        other = ctx.by_id.get(target) or ctx.by_name.get(target)
        if other is None:
            other = next((r for i, r in ctx.by_id.items() if i.startswith(target)), None)
        if other is None:
            return LabelProblem(
                name, None, f"uses the network of container {target}, which is not running"
            )
        networks = _networks(other)
    chosen = _choose_network(name, networks, network_label, ctx)
    if isinstance(chosen, LabelProblem):
        return chosen
    return BackendAddress(host=chosen[1], port=port)


def _unknown_label(name: str, prefix: str, key: str) -> LabelProblem:
    close = difflib.get_close_matches(key, list(LABELS_BY_KEY), n=1)
    hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
    return LabelProblem(
        name,
        f"{prefix}.{key}",
        f"unknown label, ignored{hint}; known: {_KNOWN_LABELS}",
        dropped=False,
    )


def _server_from_container(
    record: ContainerRecord, ctx: _Context, *, sleeping: bool = False
) -> tuple[ServerDefinition | None, list[LabelProblem]]:
    labels = _mapping(record.get("Labels"))
    dotted = ctx.prefix + "."
    ours = {k[len(dotted) :]: v for k, v in labels.items() if k.startswith(dotted)}
    if not ours:
        return None, []
    name = container_name(record)
    problems: list[LabelProblem] = []
    values: dict[str, object] = {}
    for key, raw in sorted(ours.items()):
        spec = LABELS_BY_KEY.get(key)
        if spec is None:
            problems.append(_unknown_label(name, ctx.prefix, key))
            continue
        try:
            values[key] = spec.parse(_text(raw))
        except ValueError as exc:
            problems.append(LabelProblem(name, dotted + key, str(exc)))
    enable = values.get("enable")
    if enable is False:
        return None, []  # excluded on purpose: its other labels do not matter
    if "enable" not in ours and "domains" not in ours and "ports" not in ours:
        hint = (
            f"has {ctx.prefix}.* labels but none of {ctx.prefix}.domains, {ctx.prefix}.ports "
            f"or {ctx.prefix}.enable=true: not routed"
        )
        return None, [LabelProblem(name, None, hint, dropped=False)]
    if any(p.dropped for p in problems):
        return None, problems
    port = values.get("port", DEFAULT_BACKEND_PORT)
    network = values.get("docker_network")
    assert isinstance(port, int) and (network is None or isinstance(network, str))
    addresses: list[BackendAddress] = []
    if not sleeping:  # a stopped container has no address until it runs
        address = _backend(record, name, port, network, ctx)
        if isinstance(address, LabelProblem):
            return None, [*problems, address]
        addresses.append(address)
    fields = {spec.field: values[spec.key] for spec in LABELS if spec.field and spec.key in values}
    try:
        server = ServerDefinition.model_validate(
            {"id": name, "addresses": addresses, "sleeping": sleeping, **_nest(fields)}
        )
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = [str(part) for part in error["loc"]]
            spec = None
            for end in range(len(loc), 0, -1):  # the longest path a label maps to
                spec = _SPEC_BY_FIELD.get(".".join(loc[:end]))
                if spec is not None:
                    break
            # the model-level rule ("needs domains or default") is about the domains label
            label = dotted + (spec.key if spec else "domains")
            message = error["msg"].removeprefix("Value error, ")
            problems.append(LabelProblem(name, label, message))
        return None, problems
    return server, problems


def servers_from_containers(
    containers: Sequence[ContainerRecord],
    settings: DockerSettings,
    own_container_id: str | None = None,
) -> ContainerScan:
    """The servers and problems of a ``/containers/json`` listing.

    Running containers count, and stopped (exited or created) ones labelled
    ``auto_start``, as sleeping servers; paused ones are not routed. ``own_container_id`` is
    discoproxy's own container, when it runs in one: a container on several networks is
    then reached on the one network it shares with discoproxy.
    """
    by_id = {_text(r.get("Id")): r for r in containers}
    by_name = {container_name(r): r for r in containers}
    own = None
    if own_container_id:
        own = next((r for i, r in sorted(by_id.items()) if i.startswith(own_container_id)), None)
    own_networks = None
    if own is not None and _network_mode(own) != "host":
        own_networks = frozenset(_networks(own))
    ctx = _Context(
        prefix=settings.label_prefix,
        network=settings.network,
        host_address=settings.host_address,
        use_published_ports=settings.use_published_ports,
        by_id=by_id,
        by_name=by_name,
        own_networks=own_networks,
        own_name=container_name(own) if own is not None else None,
    )
    servers: list[ServerDefinition] = []
    problems: list[LabelProblem] = []
    for record in containers:
        state = record.get("State", "running")
        sleeping = False
        if state != "running":
            if state not in SLEEPING_STATES or not _wants_auto_start(record, ctx.prefix):
                continue
            sleeping = True
        server, found = _server_from_container(record, ctx, sleeping=sleeping)
        problems += found
        if server is not None:
            servers.append(server)
    servers.sort(key=lambda s: s.id)
    return ContainerScan(tuple(servers), tuple(sorted(set(problems))))


def _wants_auto_start(record: ContainerRecord, prefix: str) -> bool:
    value = _mapping(record.get("Labels")).get(f"{prefix}.auto_start")
    try:
        return isinstance(value, str) and parse_bool(value)
    except ValueError:
        return False


def is_relevant_event(event: Mapping[str, object], prefix: str) -> bool:
    """Could this event change the routes? Container events carry the container's labels
    as attributes, so unlabelled containers are ignored; network events name only the
    network and the container's id, so they always count."""
    if event.get("Type") != "container":
        return True
    attributes = _mapping(_mapping(event.get("Actor")).get("Attributes"))
    dotted = prefix + "."
    return any(key.startswith(dotted) for key in attributes)


def inspection_target(event: Mapping[str, object]) -> str | None:
    """The container to inspect after ``event``: that of a container event. Network
    events are not followed by one: a network change alone never makes an inspection
    outrank a listing (see :func:`same_state`), so the next listing shows it."""
    if event.get("Type") != "container":
        return None
    return _text(_mapping(event.get("Actor")).get("ID")) or None


def record_from_inspect(info: Mapping[str, object]) -> dict[str, object]:
    """``/containers/{id}/json`` in the shape of a ``/containers/json`` record."""
    config = _mapping(info.get("Config"))
    network = _mapping(info.get("NetworkSettings"))
    ports: list[dict[str, object]] = []
    for spec, bindings in _mapping(network.get("Ports")).items():
        private, _, kind = spec.partition("/")
        for binding in bindings if isinstance(bindings, list) else []:
            host_port = _text(_mapping(binding).get("HostPort"))
            if private.isdigit() and host_port.isdigit():
                ports.append(
                    {
                        "IP": _text(_mapping(binding).get("HostIp")),
                        "PrivatePort": int(private),
                        "PublicPort": int(host_port),
                        "Type": kind or "tcp",
                    }
                )
    return {
        "Id": _text(info.get("Id")),
        "Names": [_text(info.get("Name"))],
        "State": _text(_mapping(info.get("State")).get("Status")),
        "Labels": dict(_mapping(config.get("Labels"))),
        "HostConfig": {"NetworkMode": _text(_mapping(info.get("HostConfig")).get("NetworkMode"))},
        "Ports": ports,
        "NetworkSettings": {"Networks": dict(_mapping(network.get("Networks")))},
    }


def merge_inspected(
    records: Sequence[ContainerRecord], inspected: Mapping[str, ContainerRecord | None]
) -> list[ContainerRecord]:
    """The listing with each inspected container's record replaced by its inspection
    (in listing form; ``None``: it is gone)."""
    merged = [r for r in records if _text(r.get("Id")) not in inspected]
    merged += [record for record in inspected.values() if record is not None]
    return merged


def same_state(listed: ContainerRecord | None, inspected: ContainerRecord | None) -> bool:
    """Does the listing already show what the inspection saw? The listing holds running
    and paused containers only: for it, a stopped container and a removed one look alike."""

    def seen(record: ContainerRecord | None) -> tuple[object, str] | None:
        if record is None or record.get("State") not in ("running", "paused"):
            return None
        return record.get("State"), container_name(record)

    return seen(listed) == seen(inspected)


# -- discoproxy's own container -----------------------------------------------------------


def own_id_from_mountinfo(text: str) -> str | None:
    """The container id behind ``/etc/hostname``, which Docker bind-mounts from
    ``…/containers/<id>/hostname``. Works with cgroup v1 and v2 alike."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/etc/hostname":
            match = _CONTAINER_ID_RE.search(fields[3])
            if match and "/containers/" in fields[3]:
                return match.group()
    return None


def own_id_from_cgroup(text: str) -> str | None:
    """cgroup v1 paths such as ``/docker/<id>`` or ``/system.slice/docker-<id>.scope``."""
    for line in text.splitlines():
        path = line.rpartition(":")[2]
        if "docker" in path:
            match = _CONTAINER_ID_RE.search(path)
            if match:
                return match.group()
    return None


def detect_own_container_id() -> str | None:
    """discoproxy's own container id, if it runs in a Docker container, else None."""
    for path, parse in (
        ("/proc/self/mountinfo", own_id_from_mountinfo),
        ("/proc/self/cgroup", own_id_from_cgroup),
    ):
        with suppress(OSError):
            found = parse(Path(path).read_text(encoding="utf-8", errors="replace"))
            if found:
                return found
    # Docker's default hostname is the short id; only trusted in that exact shape.
    hostname = socket.gethostname()
    return hostname if _SHORT_ID_RE.match(hostname) else None


# -- settings and the provider ------------------------------------------------------------


def _default_endpoint() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_ENDPOINT


class DockerSettings(ProviderSettings):
    """``[providers.docker]``; ``enabled = "auto"`` is on when the engine answers."""

    endpoint: str = Field(
        default_factory=_default_endpoint,
        description="Docker engine API: `unix:///path`, `tcp://host:port` (TLS from "
        "`DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`) or `ssh://`.",
        json_schema_extra={"doc_default": f"`$DOCKER_HOST`, else `{DEFAULT_ENDPOINT}`"},
    )
    label_prefix: str = Field(
        default=DEFAULT_LABEL_PREFIX,
        description="Labels are `<prefix>.domains`, `<prefix>.port`, …",
    )
    network: str | None = Field(
        default=None,
        description="Network to reach containers on when they are attached to it, unless "
        "their `network` label says otherwise.",
    )
    host_address: str = Field(
        default="127.0.0.1",
        description="Address of the Docker host as seen from discoproxy: used for "
        "`network_mode: host` containers and for published ports.",
    )
    use_published_ports: bool = Field(
        default=False,
        description="Connect to the host port each container publishes for its `port` "
        "(at `host_address`, or the binding's own IP) instead of the container's IP.",
    )
    api_timeout: int = Field(
        default=10,
        ge=1,
        description="Seconds for each API call (listing, version); the event stream has none.",
    )

    @field_validator("label_prefix")
    @classmethod
    def _label_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value):
            raise ValueError(
                f"invalid label prefix {value!r}; expected letters, digits, '.', '-' or '_', "
                "not ending with '.', e.g. 'infrarust'"
            )
        return value

    @field_validator("host_address")
    @classmethod
    def _host_address(cls, value: str) -> str:
        host = value.strip().removeprefix("[").removesuffix("]")
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return BackendAddress.parse(host).host


@contextmanager
def _engine_errors(endpoint: str) -> Iterator[None]:
    """The SDK raises ``DockerException`` and ``requests`` errors (``OSError``s); the
    supervisor gets one type that names the endpoint."""
    try:
        yield
    except (docker.errors.DockerException, OSError) as exc:
        raise EngineUnavailable(f"Docker engine at {endpoint}: {exc}") from exc


def _inspect(client: Any, container_id: str) -> ContainerRecord | None:
    """The container in listing form, or None when it is gone."""
    try:
        info = client.inspect_container(container_id)
    except docker.errors.NotFound:
        return None
    return record_from_inspect(info) if isinstance(info, Mapping) else None


def _close_stream(events: Any) -> None:
    # The stream may already be closed by the engine, or be an SSH channel the SDK
    # cannot cancel; either way nothing is left to release here.
    with suppress(docker.errors.DockerException, OSError, AttributeError, ValueError):
        events.close()


class DockerProvider:
    """Publishes one server per labelled running container, resynced on every event."""

    Settings: ClassVar[type[ProviderSettings]] = DockerSettings

    def __init__(self, name: str, settings: DockerSettings, config: ProxyConfig) -> None:
        self.name = name
        self.settings = settings
        self._log = logger.bind(provider=name)
        self._limiter = anyio.CapacityLimiter(WORKER_THREADS)
        self._control_limiter = anyio.CapacityLimiter(WORKER_THREADS)
        self._unavailable = f"no Docker engine answers at {settings.endpoint}"
        self._own_id: str | None = None
        self._own_id_known = False
        self._reported: frozenset[LabelProblem] = frozenset()
        self._routed: tuple[str, ...] | None = None
        # Touched only on the event loop's thread: the last full listing, and per
        # container the newest inspection made for an event, with its loop time.
        self._listing: list[ContainerRecord] | None = None
        self._fresh: dict[str, tuple[float, ContainerRecord | None]] = {}

    async def available(self) -> bool:
        try:
            with anyio.fail_after(AVAILABLE_TIMEOUT_S + 1):
                client = await self._call(partial(self._connect, AVAILABLE_TIMEOUT_S))
                try:
                    await self._call(client.ping)
                finally:
                    client.close()
        except (EngineUnavailable, TimeoutError) as exc:
            reason = str(exc.__cause__ or exc) or f"no answer within {AVAILABLE_TIMEOUT_S}s"
            self._unavailable = f"no Docker engine answers at {self.settings.endpoint}: {reason}"
            return False
        return True

    def unavailable_reason(self) -> str:
        return self._unavailable

    async def load_once(self) -> LoadResult:
        """The servers of one container listing, as the first resync of :meth:`run`
        publishes them. Raises :class:`EngineUnavailable` when the engine does not answer."""
        await self._detect_own_id()
        client = await self._call(partial(self._connect, self.settings.api_timeout))
        try:
            listing = await self._list(client)
        finally:
            client.close()
        scan = servers_from_containers(listing, self.settings, self._own_id)
        return LoadResult(
            scan.servers,
            errors=tuple(f"{problem}; not routed" for problem in scan.problems if problem.dropped),
            warnings=tuple(str(problem) for problem in scan.problems if not problem.dropped),
            source=self.settings.endpoint,
        )

    async def _detect_own_id(self) -> None:
        if not self._own_id_known:
            self._own_id = await anyio.to_thread.run_sync(detect_own_container_id)
            self._own_id_known = True

    async def run(self, publish: Publish) -> None:
        await self._detect_own_id()
        self._listing = None  # a new connection starts from a full listing
        self._fresh.clear()
        client = await self._call(partial(self._connect, self.settings.api_timeout))
        # the event thread inspects with a client of its own (same API version, no call)
        inspector = self._connect(self.settings.api_timeout, client.api_version)
        try:
            events = await self._call(partial(client.events, decode=True, filters=EVENT_FILTERS))
            try:
                await self._follow(client, inspector, events, publish)
            finally:
                _close_stream(events)
        finally:
            inspector.close()
            client.close()

    async def _follow(
        self, client: Any, inspector: Any, events: Iterable[Any], publish: Publish
    ) -> None:
        """Resync now and after every relevant event, until the stream ends (then raise)."""
        send, receive = anyio.create_memory_object_stream[None](1)
        why: list[BaseException] = []
        following = True

        def on_event(inspection: tuple[str, ContainerRecord | None] | None) -> None:
            """On the loop, for each relevant event: apply the event thread's inspection
            at once, then ask for a full resync (one already pending covers this event)."""
            if not following:
                return  # an abandoned event thread's last word
            if inspection is not None:
                container_id, record = inspection
                self._fresh[container_id] = (anyio.current_time(), record)
                if self._listing is not None:
                    self._publish(self._listing, publish, prune=False)
            with suppress(anyio.WouldBlock):
                send.send_nowait(None)

        async def pump() -> None:
            nonlocal following
            with send:
                try:
                    await anyio.to_thread.run_sync(
                        self._pump_events,
                        events,
                        inspector,
                        on_event,
                        abandon_on_cancel=True,
                        limiter=self._limiter,
                    )
                except Exception as exc:
                    why.append(exc)
                finally:
                    following = False

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                await self.resync(client, publish)
                with receive:
                    async for _ in receive:
                        await self.resync(client, publish)
        except ExceptionGroup as group:
            # pump() never raises: a lone error is a resync's, give the supervisor that one
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        raise EventStreamEnded(
            f"event stream from {self.settings.endpoint} ended (engine stopped or restarted)"
            + (f": {why[0]}" if why else "")
        )

    def _pump_events(
        self,
        events: Iterable[Any],
        inspector: Any,
        on_event: Callable[[tuple[str, ContainerRecord | None] | None], None],
    ) -> None:
        """Worker thread: read events until the stream ends or is closed. A labelled
        container's event is followed by an inspection of it, here, so the route changes
        without waiting for a full listing (which is slow on a busy engine)."""
        prefix = self.settings.label_prefix
        for event in events:
            if not isinstance(event, Mapping) or not is_relevant_event(event, prefix):
                continue
            container_id = inspection_target(event)
            inspection = None
            if container_id is not None:
                # on failure, the full resync this event triggers will tell
                with suppress(docker.errors.DockerException, OSError):
                    inspection = (container_id, _inspect(inspector, container_id))
            try:
                anyio.from_thread.run_sync(on_event, inspection)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError):
                return  # the provider is gone (cancelled, or its loop closed)

    async def start_server(self, server_id: str) -> None:
        """Start the container ``server_id`` (a stopped ``auto_start`` server)."""
        await self._control(server_id, "started", lambda client: client.start(server_id))

    async def stop_server(self, server_id: str) -> None:
        """Stop the container ``server_id`` (``auto_stop_after``)."""
        await self._control(
            server_id, "stopped", lambda client: client.stop(server_id, timeout=STOP_TIMEOUT_S)
        )

    async def _control(self, server_id: str, done: str, action: Callable[[Any], object]) -> None:
        """Start or stop a container, in threads of its own: a stop may take
        ``STOP_TIMEOUT_S``, and resyncs must not wait behind it."""

        def call() -> None:
            client = self._connect(self.settings.api_timeout + STOP_TIMEOUT_S)
            try:
                action(client)
            finally:
                client.close()

        with _engine_errors(self.settings.endpoint):
            await anyio.to_thread.run_sync(call, limiter=self._control_limiter)
        self._log.info("container {} {}", server_id, done)

    async def resync(self, client: Any, publish: Publish) -> ContainerScan:
        """List containers once and publish the complete snapshot."""
        self._listing = await self._list(client)
        return self._publish(self._listing, publish, prune=True)

    async def _list(self, client: Any) -> list[ContainerRecord]:
        """Every container, stopped ones too (``auto_start`` servers sleep in them)."""
        listed = await self._call(partial(client.containers, all=True))
        return [r for r in listed if isinstance(r, Mapping)]

    def _publish(
        self, listing: list[ContainerRecord], publish: Publish, *, prune: bool
    ) -> ContainerScan:
        """Publish ``listing`` as corrected by recent inspections. With ``prune`` (a new
        listing), inspections it already shows, or too old to trust, are forgotten."""
        now = anyio.current_time()
        by_id = {_text(r.get("Id")): r for r in listing}
        overrides: dict[str, ContainerRecord | None] = {}
        for container_id, (seen_at, record) in list(self._fresh.items()):
            if now - seen_at > FRESH_OVERRIDE_S or same_state(by_id.get(container_id), record):
                if prune:
                    del self._fresh[container_id]
                continue
            overrides[container_id] = record
        records = merge_inspected(listing, overrides) if overrides else listing
        scan = servers_from_containers(records, self.settings, self._own_id)
        self._report(scan)
        publish(scan.servers)
        return scan

    def _report(self, scan: ContainerScan) -> None:
        for problem in sorted(set(scan.problems) - self._reported):
            if problem.dropped:
                self._log.error("{}; not routed", problem)
            else:
                self._log.warning("{}", problem)
        self._reported = frozenset(scan.problems)
        routed = tuple(server.id for server in scan.servers)
        if routed != self._routed:
            before = set(self._routed or ())
            changes = [f"+{i}" for i in routed if i not in before]
            changes += [f"-{i}" for i in sorted(before - set(routed))]
            self._log.info(
                "routed containers: {}{}", len(routed), f" ({' '.join(changes)})" if changes else ""
            )
            self._routed = routed

    def _connect(self, timeout: int, version: str = "auto") -> Any:
        """A low-level API client; ``version="auto"`` asks the engine (one /version call)."""
        endpoint = self.settings.endpoint
        tls = None
        if endpoint.startswith(("tcp://", "https://")):
            tls = docker.utils.kwargs_from_env().get("tls")
        return docker.APIClient(
            base_url=endpoint, version=version, timeout=timeout, tls=tls or False
        )

    async def _call(self, func: Callable[[], T]) -> T:
        with _engine_errors(self.settings.endpoint):
            return await anyio.to_thread.run_sync(
                func, abandon_on_cancel=True, limiter=self._limiter
            )


# -- docs ---------------------------------------------------------------------------------


def _settings_rows() -> list[str]:
    rows = []
    for key, info in DockerSettings.model_fields.items():
        if key == "enabled":
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


def labels_markdown(prefix: str = DEFAULT_LABEL_PREFIX) -> str:
    """``labels.md``: every label, its type, default, example, accepted values and field."""
    p = prefix
    lines = [
        "# Docker labels",
        "",
        "<!-- Generated from providers/docker.py by `discoproxy labels`; do not",
        "     edit by hand: run `uv run discoproxy labels > labels.md`. -->",
        "",
        "The Docker provider turns every labelled, running container into one server, as if",
        "it had a file in `servers_dir`: each label maps to a field of the server-file",
        "format, and the server's `id` is the container name (shown as `<name>@docker` in",
        "logs and `discoproxy routes`). Routes follow the engine's events: a container that",
        "starts is routable at once, one that stops, dies, pauses or is removed is not. When",
        "the engine goes away, the last routes stay until it answers again; then every",
        "container is listed afresh.",
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
        "The server's `addresses` is the single address `<host>:<port>` worked out below.",
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
        f"Unknown `{p}.*` labels are warned about (with the closest known label) and ignored.",
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
