"""From the engine's container records to servers: label values, networks and the one
backend address, plus what an event means and discoproxy's own container id. Pure: it
takes the records (``/containers/json``, or an inspection in that shape) and does no I/O
but reading ``/proc/self`` for the own id; no SDK."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from discoproxy.model import (
    DEFAULT_BACKEND_PORT,
    BackendAddress,
    Balance,
    HeldBack,
    ServerDefinition,
)
from providers.docker import mc_router
from providers.docker.labels import (
    LABELS,
    LABELS_BY_KEY,
    SPEC_BY_FIELD,
    LabelProblem,
    nest,
    parse_bool,
    parse_group,
    unknown_label,
)
from providers.docker.settings import DEFAULT_LABEL_PREFIX, DockerSettings

ContainerRecord = Mapping[str, object]
# Container states an auto_start container is routed in, as sleeping (a login starts it).
SLEEPING_STATES = frozenset({"exited", "created"})
_CONTAINER_ID_RE = re.compile(r"[0-9a-f]{64}")
_SHORT_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_HEALTH_RE = re.compile(r"\((?:health: (starting)|(healthy|unhealthy))\)")
# Docker HEALTHCHECK states in which a container takes no new connections.
UNREADY_HEALTH = frozenset({"starting", "unhealthy"})


@dataclass(frozen=True, slots=True)
class ContainerScan:
    """What a list of containers yields: servers sorted by id, and the problems."""

    servers: tuple[ServerDefinition, ...]
    problems: tuple[LabelProblem, ...]
    # a pool's id → its replicas' container names (auto_start starts and stops them all)
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def as_mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def as_text(value: object) -> str:
    return value if isinstance(value, str) else ""


def container_name(record: ContainerRecord) -> str:
    """The container's name without the leading ``/`` (legacy link aliases skipped)."""
    names = record.get("Names")
    candidates = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    for name in candidates:
        bare = name.removeprefix("/")
        if bare and "/" not in bare:
            return bare
    return as_text(record.get("Id"))[:12] or "(unnamed)"


@dataclass(frozen=True, slots=True)
class _Context:
    """What address resolution needs besides the container itself."""

    prefix: str
    mc_router: mc_router.McRouterDefaults  # its global flags, for mc-router containers
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
    networks = as_mapping(as_mapping(record.get("NetworkSettings")).get("Networks"))
    found = {}
    for name, settings in networks.items():
        info = as_mapping(settings)
        found[name] = as_text(info.get("IPAddress")) or as_text(info.get("GlobalIPv6Address"))
    return found


def _network_mode(record: ContainerRecord) -> str:
    return as_text(as_mapping(record.get("HostConfig")).get("NetworkMode")) or "default"


def _published_address(record: ContainerRecord, port: int, ctx: _Context) -> BackendAddress | None:
    """The host address a container's ``port``/tcp is published on, if it is."""
    ports = record.get("Ports")
    bindings = []
    for item in ports if isinstance(ports, list) else []:
        entry = as_mapping(item)
        if entry.get("PrivatePort") == port and entry.get("Type", "tcp") == "tcp":
            public = entry.get("PublicPort")
            if isinstance(public, int):
                ip = as_text(entry.get("IP"))
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
        # the listing holds stopped containers too: their network went with them
        if other is None or other.get("State", "running") != "running":
            return LabelProblem(
                name, None, f"uses the network of container {target}, which is not running"
            )
        networks = _networks(other)
    chosen = _choose_network(name, networks, network_label, ctx)
    if isinstance(chosen, LabelProblem):
        return chosen
    return BackendAddress(host=chosen[1], port=port)


def _server_from_container(
    record: ContainerRecord, ctx: _Context, *, sleeping: bool = False
) -> tuple[ServerDefinition | None, list[LabelProblem]]:
    labels = as_mapping(record.get("Labels"))
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
            problems.append(unknown_label(name, ctx.prefix, key))
            continue
        try:
            values[key] = spec.parse(as_text(raw))
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
        weight = values.get("weight", 1)
        assert isinstance(weight, int)
        if weight != 1:
            address = BackendAddress(host=address.host, port=address.port, weight=weight)
        addresses.append(address)
    fields = {spec.field: values[spec.key] for spec in LABELS if spec.field and spec.key in values}
    try:
        server = ServerDefinition.model_validate(
            {"id": name, "addresses": addresses, "sleeping": sleeping, **nest(fields)}
        )
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = [str(part) for part in error["loc"]]
            spec = None
            for end in range(len(loc), 0, -1):  # the longest path a label maps to
                spec = SPEC_BY_FIELD.get(".".join(loc[:end]))
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
    by_id = {as_text(r.get("Id")): r for r in containers}
    by_name = {container_name(r): r for r in containers}
    own = None
    if own_container_id:
        own = next((r for i, r in sorted(by_id.items()) if i.startswith(own_container_id)), None)
    own_networks = None
    if own is not None and _network_mode(own) != "host":
        own_networks = frozenset(_networks(own))
    ctx = _Context(
        prefix=settings.label_prefix,
        mc_router=mc_router.defaults_of(settings),
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
    groups: dict[str, list[tuple[ContainerRecord, ServerDefinition]]] = {}
    held: dict[str, list[HeldBack]] = {}  # per pool: replicas its HEALTHCHECK holds back
    unready_members: dict[str, list[tuple[ContainerRecord, ServerDefinition]]] = {}
    for listed in containers:
        state = listed.get("State", "running")
        if state != "running" and state not in SLEEPING_STATES:
            continue  # paused, restarting, dead: not routed, whatever its labels say
        # mc-router's labels read as ours (providers/docker/mc_router.py)
        translated, found = mc_router.translate(
            listed, container_name(listed), ctx.prefix, ctx.mc_router
        )
        if translated is None:
            # a stopped container that would not sleep is not routed anyway: no report
            if (
                state == "running"
                or _wants_auto_start(listed, ctx.prefix)
                or mc_router.wants_auto_start(listed, ctx.mc_router)
            ):
                problems += found
            continue
        record = translated
        sleeping = False
        if state != "running":
            if not _wants_auto_start(record, ctx.prefix):
                continue
            sleeping = True
        problems += found
        # Docker's HEALTHCHECK says not yet, or no more: no new connections, but the
        # route stays (shown starting or down; status pings get the unreachable MOTD and
        # logins unreachable_message, not the unknown-domain answers, and a server
        # woken by auto_start keeps its route while its health check starts)
        unready = not sleeping and _unready(record, ctx.prefix)
        server, found = _server_from_container(record, ctx, sleeping=sleeping)
        problems += mc_router.as_written(found, ctx.prefix) if record is not listed else found
        if server is None:
            continue
        group = _group_of(record, ctx.prefix)
        if unready:
            health = health_of(record) or "starting"
            held_back = [HeldBack(address=str(a), health=health) for a in server.addresses]
            if group is None:
                servers.append(_held(server, held_back))
                continue
            held.setdefault(group, []).extend(held_back)
            unready_members.setdefault(group, []).append((record, server))
        elif group is None:
            servers.append(server)
        else:
            groups.setdefault(group, []).append((record, server))
    members: dict[str, tuple[str, ...]] = {}
    for group in sorted(groups.keys() | unready_members.keys()):
        ready = group in groups
        pool, kept, found = _pool(group, groups.get(group) or unready_members[group], ctx.prefix)
        if group in held:
            pool = pool.model_copy(update={"held_back": tuple(held[group])})
        if not ready:  # every replica held back: the route stays, with nothing to dial
            pool = _held(pool, list(pool.held_back))
        problems += found
        if pool.auto_start:
            members[group] = kept
        # one id, one route (the registry's by_id, wakes, counters): a container named
        # like a pool is left out, as the file provider leaves out a second file
        for lone in [s for s in servers if s.id == group]:
            servers.remove(lone)
            problems.append(
                LabelProblem(
                    lone.id,
                    None,
                    f"has the name of pool {group} (replicas: {', '.join(kept)}): rename the "
                    f"container, or give the pool another label {ctx.prefix}.group",
                )
            )
        servers.append(pool)
    servers.sort(key=lambda s: s.id)
    return ContainerScan(tuple(servers), tuple(sorted(set(problems))), members)


def _held(server: ServerDefinition, held_back: list[HeldBack]) -> ServerDefinition:
    """``server`` with every backend held back: routed, nothing dialed (all down)."""
    return server.model_copy(update={"addresses": (), "held_back": tuple(held_back)})


# Labels each replica sets for itself; every other label of the prefix must agree.
PER_REPLICA_LABELS = frozenset({"weight", "port", "docker_network", "use_healthcheck"})
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"


def _group_of(record: ContainerRecord, prefix: str) -> str | None:
    """The pool a container belongs to: its group label, else its Compose service."""
    labels = as_mapping(record.get("Labels"))
    explicit = labels.get(f"{prefix}.group")
    if isinstance(explicit, str):
        try:
            return parse_group(explicit)
        except ValueError:  # as written: the labels' own parse reports it, drops the container
            return explicit
    project, service = labels.get(COMPOSE_PROJECT), labels.get(COMPOSE_SERVICE)
    if isinstance(project, str) and isinstance(service, str) and project and service:
        return f"{project}-{service}"[:200]
    return None


def _routing_labels(record: ContainerRecord, prefix: str) -> dict[str, str]:
    dotted = prefix + "."
    return {
        key[len(dotted) :]: as_text(value)
        for key, value in as_mapping(record.get("Labels")).items()
        if key.startswith(dotted) and key[len(dotted) :] not in PER_REPLICA_LABELS
    }


def _pool(
    group: str, members: list[tuple[ContainerRecord, ServerDefinition]], prefix: str
) -> tuple[ServerDefinition, tuple[str, ...], list[LabelProblem]]:
    """One server for a group's replicas, the names of the replicas kept, and the
    problems: the first (by name) sets the routing labels, a replica that disagrees is
    reported and left out; one backend per running replica. An ``auto_start`` pool with
    no replica running sleeps: a login starts them all (``DockerProvider.start_server``)."""
    members.sort(key=lambda member: member[1].id)
    first_record, first = members[0]
    reference = _routing_labels(first_record, prefix)
    kept = [first]
    problems = []
    for record, server in members[1:]:
        labels = _routing_labels(record, prefix)
        differs = sorted(
            k for k in reference.keys() | labels.keys() if reference.get(k) != labels.get(k)
        )
        if differs:
            key = differs[0]
            here, there = labels.get(key, "(unset)"), reference.get(key, "(unset)")
            problems.append(
                LabelProblem(
                    server.id,
                    f"{prefix}.{key}",
                    f"is {here!r} here but {there!r} on {first.id}, the first replica of "
                    f"pool {group}: left out of the pool (replicas must agree on routing)",
                )
            )
            continue
        kept.append(server)
    running = [server for server in kept if not server.sleeping]
    update: dict[str, object] = {
        "id": group,
        "addresses": tuple(address for server in running for address in server.addresses),
        "sleeping": not running,  # only stopped auto_start replicas: the pool sleeps
    }
    if "balance" not in reference:
        update["balance"] = Balance.ROUND_ROBIN  # replicas spread, not fail over
    names = tuple(server.id for server in kept)
    return first.model_copy(update=update), names, problems


def _unready(record: ContainerRecord, prefix: str) -> bool:
    return health_of(record) in UNREADY_HEALTH and _bool_label(
        record, prefix, "use_healthcheck", default=True
    )


def _wants_auto_start(record: ContainerRecord, prefix: str) -> bool:
    return _bool_label(record, prefix, "auto_start", default=False)


def _bool_label(record: ContainerRecord, prefix: str, key: str, *, default: bool) -> bool:
    """A bool label read before the container's labels are parsed: ``default`` when it
    is unset or bad (a bad value is reported when the container's labels are parsed, once
    it is routed)."""
    value = as_mapping(record.get("Labels")).get(f"{prefix}.{key}")
    if not isinstance(value, str):
        return default
    try:
        return parse_bool(value)
    except ValueError:
        return default


def is_relevant_event(event: Mapping[str, object], prefix: str) -> bool:
    """Could this event change the routes? Container events carry the container's labels
    as attributes, so unlabelled containers are ignored; network events name only the
    network and the container's id, so they always count."""
    if event.get("Type") != "container":
        return True
    attributes = as_mapping(as_mapping(event.get("Actor")).get("Attributes"))
    dotted = prefix + "."
    return any(key.startswith((dotted, mc_router.PREFIX)) for key in attributes)


def is_labelled(record: ContainerRecord, prefix: str) -> bool:
    """Does the container carry labels of ours (or mc-router's)?"""
    dotted = prefix + "."
    return any(
        isinstance(key, str) and key.startswith((dotted, mc_router.PREFIX))
        for key in as_mapping(record.get("Labels"))
    )


def inspection_target(event: Mapping[str, object]) -> str | None:
    """The container to inspect after ``event``: that of a container event (a network
    event's is :func:`network_event_container`)."""
    if event.get("Type") != "container":
        return None
    return as_text(as_mapping(event.get("Actor")).get("ID")) or None


def network_event_container(event: Mapping[str, object]) -> str | None:
    """The container a network ``connect``/``disconnect`` event is about. It is inspected
    too: dockerd sends these events before its container list shows the change (it
    checkpoints the container after), and nothing else may follow them."""
    if event.get("Type") != "network":
        return None
    attributes = as_mapping(as_mapping(event.get("Actor")).get("Attributes"))
    return as_text(attributes.get("container")) or None


def record_from_inspect(info: Mapping[str, object]) -> dict[str, object]:
    """``/containers/{id}/json`` in the shape of a ``/containers/json`` record."""
    config = as_mapping(info.get("Config"))
    state = as_mapping(info.get("State"))
    network = as_mapping(info.get("NetworkSettings"))
    ports: list[dict[str, object]] = []
    for spec, bindings in as_mapping(network.get("Ports")).items():
        private, _, kind = spec.partition("/")
        for binding in bindings if isinstance(bindings, list) else []:
            host_port = as_text(as_mapping(binding).get("HostPort"))
            if private.isdigit() and host_port.isdigit():
                ports.append(
                    {
                        "IP": as_text(as_mapping(binding).get("HostIp")),
                        "PrivatePort": int(private),
                        "PublicPort": int(host_port),
                        "Type": kind or "tcp",
                    }
                )
    return {
        "Id": as_text(info.get("Id")),
        "Names": [as_text(info.get("Name"))],
        "State": as_text(state.get("Status")),
        # the listing says it in its Status text ("Up 5 seconds (health: starting)")
        "Status": _status_text(
            as_text(as_mapping(as_mapping(info.get("State")).get("Health")).get("Status"))
        ),
        "Labels": dict(as_mapping(config.get("Labels"))),
        "HostConfig": {
            "NetworkMode": as_text(as_mapping(info.get("HostConfig")).get("NetworkMode"))
        },
        "Ports": ports,
        "NetworkSettings": {"Networks": dict(as_mapping(network.get("Networks")))},
    }


def merge_inspected(
    records: Sequence[ContainerRecord], inspected: Mapping[str, ContainerRecord | None]
) -> list[ContainerRecord]:
    """The listing with each inspected container's record replaced by its inspection
    (in listing form; ``None``: it is gone)."""
    merged = [r for r in records if as_text(r.get("Id")) not in inspected]
    merged += [record for record in inspected.values() if record is not None]
    return merged


def routing_view(
    record: ContainerRecord | None,
    prefix: str,
    defaults: mc_router.McRouterDefaults = mc_router.NO_DEFAULTS,
) -> tuple[object, ...] | None:
    """What of a container its routes follow: running or paused, with its name, health
    and address on each network; sleeping (stopped, ``auto_start``) with its name; or
    None: not routed in any form (stopped, or gone)."""
    if record is None:
        return None
    state = record.get("State")
    if state in ("running", "paused"):
        networks = tuple(sorted(_networks(record).items()))
        return state, container_name(record), health_of(record), networks
    if state in SLEEPING_STATES and (
        _wants_auto_start(record, prefix) or mc_router.wants_auto_start(record, defaults)
    ):
        return "sleeping", container_name(record)
    return None


def same_state(
    listed: ContainerRecord | None,
    inspected: ContainerRecord | None,
    prefix: str = DEFAULT_LABEL_PREFIX,
    defaults: mc_router.McRouterDefaults = mc_router.NO_DEFAULTS,
) -> bool:
    """Does the listing already show what the inspection saw, as far as routes go
    (:func:`routing_view`)?"""
    return routing_view(listed, prefix, defaults) == routing_view(inspected, prefix, defaults)


def health_of(record: ContainerRecord) -> str | None:
    """Docker's HEALTHCHECK verdict: "starting", "healthy", "unhealthy", or None for a
    container without one. The listing has it only in its Status text."""
    match = _HEALTH_RE.search(as_text(record.get("Status")))
    if match is None:
        return None
    return match.group(1) or match.group(2)


def _status_text(health: str) -> str:
    if health == "starting":
        return "Up (health: starting)"
    return f"Up ({health})" if health in ("healthy", "unhealthy") else "Up"


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
