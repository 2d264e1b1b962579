"""The routing table and the registry that builds it from provider snapshots.

Rules for this file:
- A :class:`RoutingTable` is immutable. The registry builds a new one and swaps a single
  reference; a connection reads that reference once, at routing time, so a swap never
  touches a connection already routed. No locks on the hot path.
- Matching is deterministic: an exact name beats any wildcard; among wildcards the longest
  literal suffix wins (``*.eu.example.com`` over ``*.example.com``). ``*.example.com``
  matches any name with at least one more label (``a.example.com``, ``a.b.example.com``),
  never ``example.com`` itself. Two servers claiming the same name is a conflict: the
  winner is the one whose qualified id (``id@provider``) sorts first, and the conflict is
  reported when the table is built — never "whichever loaded first".
- Lookups cost one dict probe per label of the name: flat in the number of routes.
  So does :meth:`RoutingTable.domains_of`: each route's names are collected once, when
  the table is built (``/api/routes`` asks for every route, every 2 s from the dashboard).
- This module alone writes the current table.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from loguru import logger

from discoproxy.model import IpFilterSettings, ServerDefinition
from discoproxy.owners import LOOP, any_thread, owned_by


@dataclass(frozen=True, slots=True)
class Route:
    """What a connection needs to reach a server: hot-path form of a ServerDefinition."""

    qualified_id: str
    provider: str
    addresses: tuple[tuple[str, int], ...]
    send_proxy_protocol: bool
    server: ServerDefinition = field(compare=False, repr=False)
    # the server's own ip_filter, None when it sets none: the guard checks it from the
    # route itself, so a connection meets the filter of the very table that routed it
    ip_filter: IpFilterSettings | None = field(init=False, compare=False, repr=False)
    # each address's weight, one per address in the same order (the pool's:
    # proxy/balance.py); 1 for an address the server does not list (a test's own route)
    weights: tuple[int, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip_filter", self.server.ip_filter or None)
        listed = [a.weight for a in self.server.addresses][: len(self.addresses)]
        padded = listed + [1] * (len(self.addresses) - len(listed))
        object.__setattr__(self, "weights", tuple(padded))


@dataclass(frozen=True, slots=True)
class Conflict:
    """Several servers claimed one name; ``winner`` got it, ``losers`` did not."""

    name: str
    winner: str
    losers: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"{self.name!r} is claimed by {self.winner} and {', '.join(self.losers)}; "
            f"{self.winner} wins (first qualified id in sort order)"
        )


PortKey = tuple[str, int]  # ("tcp" | "udp", port)


def format_port(key: PortKey) -> str:
    return f"{key[1]}/{key[0]}"


def qualify(server_id: str, provider: str) -> str:
    return f"{server_id}@{provider}"


class RoutingTable:
    """Frozen name → route lookups, plus the catch-all."""

    __slots__ = (
        "_exact",
        "_names",
        "_wildcard",
        "by_id",
        "conflicts",
        "default",
        "ports",
        "routes",
    )

    def __init__(
        self,
        exact: Mapping[str, Route],
        wildcard: Mapping[str, Route],
        default: Route | None,
        routes: Sequence[Route],
        conflicts: Sequence[Conflict] = (),
        ports: Mapping[PortKey, Route] | None = None,
    ) -> None:
        self._exact = dict(exact)
        # keyed by the suffix including its leading dot: "*.example.com" → ".example.com"
        self._wildcard = dict(wildcard)
        self.default = default
        self.routes = tuple(routes)
        self.by_id = {route.qualified_id: route for route in self.routes}
        self.conflicts = tuple(conflicts)
        # (protocol, listen port) → the server's route with that port's backend addresses
        self.ports: dict[PortKey, Route] = dict(ports or {})
        # id(route) → the names it won, exact ones first, in claim order. Keyed by
        # identity, as the scan this replaces compared: the routes are this table's own
        # and live as long as it does; a port route (a copy) or another table's has none.
        names: dict[int, list[str]] = {}
        for name, route in self._exact.items():
            names.setdefault(id(route), []).append(name)
        for suffix, route in self._wildcard.items():
            names.setdefault(id(route), []).append("*" + suffix)
        self._names = {key: tuple(found) for key, found in names.items()}

    @classmethod
    def empty(cls) -> RoutingTable:
        return cls({}, {}, None, ())

    def __len__(self) -> int:
        return len(self.routes)

    def lookup_host(self, name: str) -> Route | None:
        """The route for a normalised name, else ``None`` (the caller may use ``default``)."""
        route = self._exact.get(name)
        if route is not None or not self._wildcard:
            return route
        return self._lookup_wildcard(name)

    def lookup_or_default(self, name: str | None) -> Route | None:
        """The route for a normalised name (or None), else ``default``.

        Hot (once per connection): lookup_host is inlined, which saves a call.
        """
        if name:
            route = self._exact.get(name)
            if route is not None:
                return route
            if self._wildcard:
                route = self._lookup_wildcard(name)
                if route is not None:
                    return route
        return self.default

    def _lookup_wildcard(self, name: str) -> Route | None:
        """The longest wildcard suffix of *name*: one probe per label, longest first."""
        wildcard = self._wildcard
        dot = name.find(".")
        while dot >= 0:
            route = wildcard.get(name[dot:])
            if route is not None:
                return route
            dot = name.find(".", dot + 1)
        return None

    def domains_of(self, route: Route) -> tuple[str, ...]:
        """The names ``route`` won (a conflict's losers have none): one dict probe."""
        return self._names.get(id(route), ())


def missing_fallbacks(fallbacks: Mapping[str, str], table: RoutingTable) -> dict[str, str]:
    """Each listener catch-all (``fallbacks``: bind entry → qualified id) whose server
    the table lacks, as a sentence: its connections fall through to the default then.
    Not an error (the server may come with a container later), but never silent."""
    return {
        bind: f"fallbacks: {bind!r} names {qid!r}, which no provider serves now: "
        "connections there that match no name go to the default server"
        for bind, qid in sorted(fallbacks.items())
        if qid not in table.by_id
    }


def build_table(servers_by_provider: Mapping[str, Iterable[ServerDefinition]]) -> RoutingTable:
    """Merge every provider's servers into one table, resolving conflicts deterministically."""
    routes: list[Route] = []
    for provider in sorted(servers_by_provider):
        for server in servers_by_provider[provider]:
            routes.append(
                Route(
                    qualified_id=qualify(server.id, provider),
                    provider=provider,
                    addresses=tuple((a.host, a.port) for a in server.addresses),
                    send_proxy_protocol=server.send_proxy_protocol,
                    server=server,
                )
            )
    routes.sort(key=lambda r: r.qualified_id)

    claims: dict[str, list[Route]] = {}
    defaults: list[Route] = []
    for route in routes:
        for domain in route.server.domains:
            claims.setdefault(domain, []).append(route)
        if route.server.default:
            defaults.append(route)

    exact: dict[str, Route] = {}
    wildcard: dict[str, Route] = {}
    conflicts: list[Conflict] = []
    for name, claimants in claims.items():
        winner = claimants[0]
        if len(claimants) > 1:
            conflicts.append(
                Conflict(name, winner.qualified_id, tuple(c.qualified_id for c in claimants[1:]))
            )
        if name.startswith("*."):
            wildcard[name[1:]] = winner
        else:
            exact[name] = winner
    if len(defaults) > 1:
        conflicts.append(
            Conflict(
                "(default)", defaults[0].qualified_id, tuple(d.qualified_id for d in defaults[1:])
            )
        )
    ports = _port_routes(routes, conflicts)
    conflicts.sort(key=lambda c: c.name)
    return RoutingTable(
        exact, wildcard, defaults[0] if defaults else None, routes, conflicts, ports
    )


def _port_routes(routes: Sequence[Route], conflicts: list[Conflict]) -> dict[PortKey, Route]:
    """Every claimed (protocol, port): the first claimant in qualified-id order wins, with
    its backend addresses on the mapped port."""
    claims: dict[PortKey, list[tuple[Route, int]]] = {}
    for route in routes:  # sorted by qualified id
        for mapping in route.server.ports:
            for listen, target in mapping.pairs():
                claims.setdefault((mapping.protocol, listen), []).append((route, target))
    ports: dict[PortKey, Route] = {}
    for key, claimants in sorted(claims.items()):
        route, target = claimants[0]
        others = tuple(dict.fromkeys(r.qualified_id for r, _ in claimants[1:] if r is not route))
        if others:
            conflicts.append(Conflict(format_port(key), route.qualified_id, others))
        ports[key] = dataclasses.replace(
            route, addresses=tuple((host, target) for host, _ in route.addresses)
        )
    return ports


TableListener = Callable[[RoutingTable], None]


@owned_by(LOOP)
class Registry:
    """Keeps the latest snapshot per provider and swaps in a rebuilt table on each change."""

    def __init__(self) -> None:
        self._snapshots: dict[str, tuple[ServerDefinition, ...]] = {}
        self._table = RoutingTable.empty()
        self._listeners: list[TableListener] = []
        self.listener_errors = 0  # table listeners that raised (discoproxy_internal_errors)

    @property
    @any_thread
    def table(self) -> RoutingTable:
        return self._table

    @property
    def snapshots(self) -> Mapping[str, tuple[ServerDefinition, ...]]:
        return dict(self._snapshots)

    def add_listener(self, listener: TableListener) -> None:
        """Call ``listener`` with each new table, in the order added. One that raises is
        logged and counted; it does not stop the swap or the listeners after it."""
        self._listeners.append(listener)

    def apply_snapshot(self, provider: str, servers: Iterable[ServerDefinition]) -> bool:
        """Replace ``provider``'s servers; rebuild and swap. False if nothing changed.

        An empty snapshot is applied: it means "this provider has no servers now".
        """
        return self.apply_snapshots({provider: tuple(servers)})

    def apply_snapshots(self, snapshots: Mapping[str, Iterable[ServerDefinition]]) -> bool:
        """Replace several providers' servers with one rebuild; False if nothing changed."""
        changed = {}
        for provider, servers in snapshots.items():
            snapshot = tuple(servers)
            if self._snapshots.get(provider) != snapshot:
                changed[provider] = snapshot
        if not changed:
            return False
        self._snapshots.update(changed)
        table = build_table(self._snapshots)
        previous = {c.name: c for c in self._table.conflicts}
        for conflict in table.conflicts:
            if previous.get(conflict.name) != conflict:
                logger.warning("route conflict: {}", conflict)
        logger.info(
            "routing table updated by {}: {} routes ({})",
            ", ".join(sorted(changed)),
            len(table),
            ", ".join(f"{len(servers)} from {name}" for name, servers in sorted(changed.items())),
        )
        self.install(table)
        return True

    def install(self, table: RoutingTable) -> None:
        """Swap in ``table`` built elsewhere (a worker's copy of the control plane's),
        then call the listeners as :meth:`apply_snapshots` does."""
        self._table = table
        for listener in self._listeners:
            try:
                listener(table)
            except Exception as exc:  # one listener's bug: it keeps its last good state
                self.listener_errors += 1
                logger.opt(exception=exc).error(
                    "internal error applying the routing table in {}: {!r}; it keeps its "
                    "previous state, the others carry on",
                    getattr(listener, "__qualname__", repr(listener)),
                    exc,
                )


@owned_by(LOOP)
class SnapshotInbox:
    """Where providers publish: the newest snapshot per provider, never blocking the writer.

    Like Traefik's ring channel, a snapshot that arrives while another from the same
    provider is pending replaces it. :meth:`run` applies what is pending in one rebuild,
    then waits ``throttle_s`` so a burst of events costs a few rebuilds, not one each.
    """

    def __init__(self, throttle_s: float = 0.02) -> None:
        self._pending: dict[str, tuple[ServerDefinition, ...]] = {}
        self._wake = anyio.Event()
        self._published: set[str] = set()
        self._first = anyio.Event()
        self._expected: set[str] = set()
        self.throttle_s = throttle_s
        # provider → (snapshots applied, time.time() of the last): for /metrics and the API
        self.applied: dict[str, tuple[int, float]] = {}

    def publisher(self, provider: str) -> Callable[[Iterable[ServerDefinition]], None]:
        self._expected.add(provider)

        def publish(servers: Iterable[ServerDefinition]) -> None:
            self._pending[provider] = tuple(servers)
            self._wake.set()

        return publish

    @property
    def publishing(self) -> frozenset[str]:
        """The providers that asked for a publisher (the ones running)."""
        return frozenset(self._expected)

    async def wait_first_snapshots(self) -> None:
        """Until every provider that asked for a publisher has had a snapshot applied."""
        if self._expected - self._published:
            await self._first.wait()

    async def run(self, registry: Registry) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            pending, self._pending = self._pending, {}
            try:
                registry.apply_snapshots(pending)
            except Exception as exc:  # a bug building this table: keep serving the last
                registry.listener_errors += 1
                logger.opt(exception=exc).error(
                    "internal error building the routing table from {}: {!r}; the previous "
                    "table stays in force",
                    ", ".join(sorted(pending)),
                    exc,
                )
                continue
            now = time.time()
            for provider in pending:
                self.applied[provider] = (self.applied.get(provider, (0, 0.0))[0] + 1, now)
            self._published.update(pending)
            if not self._expected - self._published:
                self._first.set()
            await anyio.sleep(self.throttle_s)
