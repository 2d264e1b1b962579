"""Pools: which backend of a route a new connection dials first, and which after it.

Rules for this file:
- A :class:`Pool` is the reactor's state for one route's backends: its strategy's cursor,
  the open connections per backend, the passive health (consecutive dial failures) and
  the sticky table. Only the reactor thread touches it (``ProxyContext.pools``); the
  loop never does.
- :meth:`Pool.order` answers one connection: the backend the strategy picks, then every
  other healthy one (HAProxy's ``redispatch``: a failed dial moves on within the same
  client connection). Backends marked down are left out until their retry is due; then
  exactly one connection probes one (half-open), first.
- Costs are on the connection's path and flat in pool size, whether or not backends
  are down (a sticky client's remembered backend is one dict probe):
  ``round_robin`` walks a precomputed weighted schedule, ``random`` bisects cumulative
  weights, ``least_connections`` takes the first backend of the lowest load's group
  (backends grouped by load, each group in the order its members were last touched; a
  dial or a close moves one backend between groups: a few dict operations, and a bisect
  of the sorted loads when a group appears or empties; ties rotate, as HAProxy's
  ``leastconn``: a backend just used goes behind its equals), ``fewest_players`` the
  same with the load counted from the last check's players (a check moves its backend
  between groups too), and ``lowest_latency`` rotates over the best set, recomputed
  only when a check changes a number. A transition (a backend down or up, rare) makes
  what the orders read while some are down: the backends up (down ones leave the
  groups), round robin's schedule without the down ones, each pick's order (when first
  picked), and when a probe is next due; one scan of the pool happens per transition
  and per probe, not per connection. An order holds at most :data:`MAX_DIALS`
  backends (``failover``: all it lists); weight 0 (drained) is in it only when nothing
  else is up. Status pings use :meth:`Pool.status_order`: no cursor, no probe.
- Backends are keyed by their configured ``(host, port)``: a table swap that keeps an
  address keeps its counts, one that drops it forgets them once nothing uses it.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from discoproxy.model import Balance
from discoproxy.owners import REACTOR, owned_by

if TYPE_CHECKING:
    from discoproxy.routing import Route

Address = tuple[str, int]

# Consecutive failed dials that mark a backend down (no connection waits on it then).
FALL = 3
# First wait before a down backend is probed again; doubled per failed probe, capped.
RETRY_FIRST_S = 2.0
RETRY_MAX_S = 30.0
# A weighted round-robin cycle longer than this is scaled down (weights divided).
MAX_SCHEDULE = 4096
# Clients remembered per sticky pool (least recently seen forgotten first).
MAX_STICKY = 65_536
# Backends one connection may dial (HAProxy's default `retries 3`: the pick and three
# more): a connection's wait stays bounded however many backends are unreachable before
# passive or active checks take them out. `failover` tries every address it lists.
MAX_DIALS = 4


def _schedule(weights: list[int]) -> tuple[int, ...]:
    """One cycle of smooth weighted round robin (nginx's): indices spread, not bunched."""
    if sum(weights) > MAX_SCHEDULE:
        scale = sum(weights) / MAX_SCHEDULE
        weights = [max(1, int(w / scale)) if w else 0 for w in weights]
    divisor = math.gcd(*weights) if any(weights) else 1
    weights = [w // divisor for w in weights]
    total = sum(weights)
    current = [0] * len(weights)
    out: list[int] = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        out.append(best)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class BackendState:
    """A backend of a pool at one instant: what ``/api/routes`` and ``/metrics`` show."""

    address: Address
    weight: int
    # "up" | "down" | "draining" (weight 0, or gone from the route with connections
    # still open); the API adds "starting" for replicas a provider holds back
    state: str
    active: int  # connections dialing or forwarding to it
    failures: int  # failed dials in a row
    dial_failures: int  # failed dials in all
    last_error: str
    last_check: str = ""  # "ok", why the last active check failed, or "" (no checks)
    rtt: float | None = None  # the last passed check's round trip, seconds
    players: int | None = None  # online players at the last minecraft check
    went_down: int = 0  # transitions to down, checks' and failed dials' (counters)
    went_up: int = 0


@owned_by(REACTOR)
class Backend:
    """One backend of a pool: its weight, open connections and health."""

    __slots__ = (
        "active",
        "active_at_check",
        "address",
        "base",
        "checked_down",
        "failed_total",
        "failures",
        "holders",
        "index",
        "last_check",
        "last_error",
        "load",
        "owner",
        "players",
        "retry_at",
        "retry_s",
        "rtt",
        "weight",
        "went_down",
        "went_up",
    )

    def __init__(self, address: Address, weight: int) -> None:
        self.address = address
        self.weight = weight
        self.active = 0  # connections dialing or forwarding to it
        self.failures = 0  # consecutive failed dials
        self.retry_at = 0.0  # down until then (monotonic); 0: up
        self.retry_s = RETRY_FIRST_S
        self.failed_total = 0  # every failed dial, for /metrics
        # transitions, for /metrics: passive ones counted here, the checks' by whoever
        # speaks for every worker (health._apply: each worker applies every verdict)
        self.went_down = 0
        self.went_up = 0
        self.last_error = ""  # the last failed dial's reason ("" after a success)
        # active health checks (discoproxy/health.py), when the route has them
        self.checked_down = False  # failed `fall` checks in a row (until `rise` pass)
        self.last_check = ""  # "ok" or why the last check failed
        self.rtt: float | None = None  # the last passed check's round trip, seconds
        self.players: int | None = None  # online players, from a minecraft check
        self.active_at_check = 0  # fewest_players: our connections the count included
        # the newest pool that holds it (a table swap that keeps the address shares the
        # backend with the old pool; the old one's connections still count here), its
        # place there, and its least_connections load group there (active / weight)
        self.owner: Pool | None = None
        # every live pool that holds it (a transition recounts each: their kept orders)
        self.holders: weakref.WeakSet[Pool] = weakref.WeakSet()
        self.index = 0
        self.load = 0.0
        self.base = 0.0  # what its load adds to active / weight (fewest_players: the check's)

    @property
    def down(self) -> bool:
        return self.retry_at > 0 or self.checked_down


def _load(backend: Backend) -> float:
    """least_connections: open connections per unit of weight."""
    return backend.active / max(backend.weight, 1)


def _latency(backend: Backend) -> float:
    """lowest_latency: the last passed check's round trip (none yet: last)."""
    return math.inf if backend.rtt is None else backend.rtt


def _players(backend: Backend) -> float:
    """fewest_players: online at the last minecraft check, plus the change in this
    proxy's connections to it since (logins between two checks do not all herd onto
    the emptiest backend), per unit of weight; unknown: last."""
    return _base(backend) + backend.active / max(backend.weight, 1)


def _base(backend: Backend) -> float:
    """fewest_players: what a backend's load adds to its connections per weight."""
    if backend.players is None:
        return math.inf
    return backend.players - backend.active_at_check / max(backend.weight, 1)


@owned_by(REACTOR)
class Pool:
    """One route's backends, balanced by ``strategy``."""

    __slots__ = (
        "__weakref__",
        "_best",
        "_cum",
        "_cursor",
        "_down",
        "_fast_pick",
        "_levels",
        "_limit",
        "_loads",
        "_positions",
        "_probe_at",
        "_random",
        "_rotations",
        "_schedule",
        "_some_at",
        "_some_rotations",
        "_some_schedule",
        "_status_up",
        "_up_all",
        "_up_some",
        "_weighted_up",
        "backends",
        "by_address",
        "own_weights",
        "sticky",
        "sticky_ttl",
        "strategy",
        "weights",
    )

    def __init__(
        self,
        addresses: Iterable[tuple[str, int, int]],
        strategy: Balance,
        sticky_ttl: float = 0.0,
        old: Pool | None = None,
    ) -> None:
        self.strategy = strategy
        self.sticky_ttl = sticky_ttl
        self.backends: list[Backend] = []
        self.by_address: dict[Address, Backend] = {}
        addresses_list = list(addresses)
        for host, port, weight in addresses_list:
            address = (host, port)
            if address in self.by_address:
                continue
            kept = old.by_address.get(address) if old is not None else None
            backend = kept if kept is not None else Backend(address, weight)
            backend.weight = weight
            self.backends.append(backend)
            self.by_address[address] = backend
        weights = [b.weight for b in self.backends]
        self.own_weights = tuple(weights)  # each backend's, as this pool set it
        self.weights = tuple(weight for _, _, weight in addresses_list)
        self._schedule = _schedule(weights) if any(weights) else ()
        total = 0
        self._cum: list[int] = []
        for w in weights:
            total += w
            self._cum.append(total)
        self._cursor: int = old._cursor if old is not None else 0
        self._random = random.Random()
        self.sticky: OrderedDict[str, tuple[Address, float]] = (
            old.sticky if old is not None and sticky_ttl > 0 else OrderedDict()
        )
        # the fast path, while no backend is down: the takers (weight 0 takes nothing
        # while another is up), and each one's order: it, then the takers after it
        self._up_all = [i for i, b in enumerate(self.backends) if b.weight]
        self._positions = {b.address: i for i, b in enumerate(self.backends)}
        self._limit = len(self.backends) if strategy is Balance.FAILOVER else MAX_DIALS
        takers = [self.backends[i].address for i in self._up_all]
        self._rotations: list[tuple[Address, ...]] = [()] * len(self.backends)
        for n, i in enumerate(self._up_all):
            self._rotations[i] = tuple(takers[n:] + takers[:n])[: self._limit]
        # least_connections: the backends (weight > 0) grouped by load, each group a
        # dict in the order its members were last touched, and the loads present,
        # sorted; the backends' dials and closes move them here, whichever pool
        # counted them (a backend reports to its newest pool, its owner)
        least = strategy is Balance.LEAST_CONNECTIONS or strategy is Balance.FEWEST_PLAYERS
        for index, backend in enumerate(self.backends):
            backend.owner, backend.index = (self if least else None), index
            backend.holders.add(self)
        self._levels: dict[float, dict[Backend, None]] = {}
        self._loads: list[float] = []
        # the pick while every backend is up (order's fast path), one per strategy
        self._fast_pick: Callable[[], int] = {
            Balance.FAILOVER: self._first,
            Balance.ROUND_ROBIN: self._next_scheduled,
            Balance.LEAST_CONNECTIONS: self._least_loaded,
            Balance.FEWEST_PLAYERS: self._least_loaded,
        }.get(strategy, self._pick_all_up)
        self._best: list[int] | None = None  # lowest_latency / fewest_players: the best
        # while some backend is down (order's other path), each kept from one transition
        # to the next: the backends up (the drained ones when nothing else is), each
        # one's place among them and its order (made when first picked), and when the
        # first passive-down backend is due a probe
        self._down = 0
        self._up_some: list[int] = []
        self._weighted_up = True  # _up_some holds backends of weight > 0
        self._some_at: dict[int, int] = {}
        self._some_rotations: dict[int, tuple[Address, ...]] = {}
        self._some_schedule: list[int] = []  # round_robin: the schedule's backends up
        self._status_up: tuple[Address, ...] = ()
        self._probe_at = math.inf
        self._recount()

    def _recount(self) -> None:
        """What a transition changes (rare), read on every order: the backends down,
        those up, and the least_connections groups (which leave the down ones out)."""
        backends = self.backends
        self._down = sum(1 for b in backends if b.down)
        self._best = None
        up = [i for i, b in enumerate(backends) if not b.down and b.weight]
        self._weighted_up = bool(up)
        if not up:  # every backend down or drained (weight 0): the drained still serve
            up = [i for i, b in enumerate(backends) if not b.down]
        self._up_some = up
        self._some_at = {index: n for n, index in enumerate(up)}
        self._some_rotations = {}
        if self.strategy is Balance.ROUND_ROBIN and self._down:
            live = set(up) if self._weighted_up else set()
            self._some_schedule = [i for i in self._schedule if i in live]
        self._status_up = tuple(backends[i].address for i in up)
        self._next_probe()
        if self.strategy is Balance.LEAST_CONNECTIONS or self.strategy is Balance.FEWEST_PLAYERS:
            self._rebuild_levels()

    def _transition(self, backend: Backend) -> None:
        """``backend`` went up or down: every live pool that holds it recounts (this one,
        the newest, an old table's still used by its connections: a table swap shares
        the backend), so no pool's kept orders hold a backend down or miss one up."""
        self._recount()
        for pool in list(backend.holders):
            if pool is not self:
                pool._recount()

    def _next_probe(self) -> None:
        """When the first backend that failed dials (not checks) is due a probe."""
        self._probe_at = min(
            (b.retry_at for b in self.backends if b.retry_at > 0 and not b.checked_down),
            default=math.inf,
        )

    def _first(self) -> int:
        return self._up_all[0]

    def _next_scheduled(self) -> int:
        """round_robin, every backend up: the schedule's next (weight 0 is not in it)."""
        cursor = self._cursor
        self._cursor = cursor + 1
        schedule = self._schedule
        return schedule[cursor % len(schedule)]

    def _pick_all_up(self) -> int:
        return self._pick(self._up_all, None, 0.0)

    def _rebuild_levels(self) -> None:
        self._levels = {}
        self._loads = []
        players = self.strategy is Balance.FEWEST_PLAYERS
        for backend in self.backends:
            if backend.owner is self:
                backend.base = _base(backend) if players else 0.0
                if backend.weight and not backend.down:
                    self._enter(backend, backend.base + backend.active / backend.weight)
                else:  # in no group (NaN is no key): its dials and closes pass
                    backend.load = math.nan

    def _enter(self, backend: Backend, load: float) -> None:
        """least_connections: ``backend`` joins the end of its load's group."""
        level = self._levels.get(load)
        if level is None:
            level = self._levels[load] = {}
            bisect.insort(self._loads, load)
        level[backend] = None
        backend.load = load

    def _rekey(self, backend: Backend) -> None:
        """least_connections: ``backend``'s load changed; it goes behind the backends of
        equal load (a dial or a close touches it: ties rotate, as in HAProxy)."""
        weight = backend.weight
        if weight:
            levels = self._levels
            load = backend.load
            left = levels.get(load)
            if left is None:  # down: in no group until it is up again
                return
            del left[backend]
            if not left:
                del levels[load]
                loads = self._loads
                del loads[bisect.bisect_left(loads, load)]
            load = backend.load = backend.base + backend.active / weight
            joined = levels.get(load)  # _enter, inline: twice per connection
            if joined is None:
                joined = levels[load] = {}
                bisect.insort(self._loads, load)
            joined[backend] = None

    def _least_loaded(self) -> int:
        """The first of the lowest load's group: least load, and among equals the
        longest untouched."""
        loads = self._loads
        if loads:
            for backend in self._levels[loads[0]]:
                if backend.owner is self:
                    return backend.index
                break
        # only drained ones up, or backends taken over by a newer pool
        key = _players if self.strategy is Balance.FEWEST_PLAYERS else _load
        return self._least(self._up_some, key)

    # -- choosing ---------------------------------------------------------------------

    def order(self, client_ip: str | None, now: float) -> Sequence[Address]:
        """The backends to dial, in order, for one new connection (empty: all down)."""
        if not self._down and self._up_all:
            # all up: the pick, then the others after it, precomputed
            if self.sticky_ttl and client_ip is not None:
                remembered = self.sticky.get(client_ip)
                if remembered is not None and remembered[1] > now:
                    at = self._positions.get(remembered[0])
                    if at is not None and self.backends[at].weight:
                        return self._rotations[at]
            return self._rotations[self._fast_pick()]
        # some backend down: the backends up and their orders are kept from the last
        # transition; a probe is looked for only when one is due
        probe = self._due_probe(now) if now >= self._probe_at else None
        up = self._up_some
        if not up:
            return (probe.address,) if probe is not None else ()
        first = self._pick(up, client_ip, now)
        rotation = self._some_rotations.get(first)
        if rotation is None:
            start = self._some_at.get(first)
            if start is None:  # a pick from live state the kept orders lag (a backend's
                self._recount()  # weight set by a newer pool): made again, then the first
                up = self._up_some
                if not up:
                    return (probe.address,) if probe is not None else ()
                first = first if first in self._some_at else up[0]
                start = self._some_at[first]
            backends = self.backends
            rotation = tuple(backends[i].address for i in up[start:] + up[:start])
            rotation = self._some_rotations[first] = rotation[: self._limit]
        if probe is not None:
            return (probe.address, *rotation)[: self._limit]
        return rotation

    def _due_probe(self, now: float) -> Backend | None:
        """The first backend down by failed dials whose retry is due: one connection
        probes it (the checks, when there are any, decide: no probe then)."""
        probe = None
        for backend in self.backends:
            if backend.retry_at > 0 and not backend.checked_down and now >= backend.retry_at:
                probe = backend
                self._probe(probe, now)
                break
        self._next_probe()
        return probe

    def status_order(self) -> tuple[Address, ...]:
        """The backends a status ping may ask, in the configured order: the ones up (the
        drained when nothing else is). Unlike :meth:`order` it moves no cursor and
        spends no probe: pings must not skew the spread of logins, nor use up the one
        connection that may try a down backend (its result would not reach the pool)."""
        return self._status_up  # kept from the last transition

    def _pick(self, up: list[int], client_ip: str | None, now: float) -> int:
        if self.sticky_ttl > 0 and client_ip is not None:
            remembered = self.sticky.get(client_ip)
            if remembered is not None and remembered[1] > now:
                at = self._positions.get(remembered[0])
                if at is not None and not self.backends[at].down and self.backends[at].weight:
                    return at
        strategy = self.strategy
        if strategy is Balance.FAILOVER:
            return up[0]
        if strategy is Balance.ROUND_ROBIN:  # some backend down (all up: _next_scheduled)
            schedule = self._some_schedule
            cursor = self._cursor
            self._cursor = cursor + 1
            if schedule:
                return schedule[cursor % len(schedule)]
            return up[cursor % len(up)]  # only drained ones left (every weight 0): they rotate
        if strategy is Balance.RANDOM:
            total = self._cum[-1]
            if total:
                index = bisect.bisect_right(self._cum, self._random.randrange(total))
                if not self.backends[index].down:
                    return index
            return up[self._random.randrange(len(up))]
        if strategy is Balance.LEAST_CONNECTIONS or strategy is Balance.FEWEST_PLAYERS:
            return self._least_loaded()  # its groups hold the backends up
        key = _latency
        best = self._best
        if best is None:  # a check changed a number, or a backend went up or down
            values = [key(self.backends[i]) for i in up]
            low = min(values)
            best = self._best = [i for i, v in zip(up, values, strict=True) if v == low]
        self._cursor += 1
        return best[self._cursor % len(best)]

    def _least(self, up: list[int], key: Callable[[Backend], float]) -> int:
        """The backend of ``up`` with the lowest ``key``, scanned from a rotating start
        so that ties rotate (as HAProxy's leastconn)."""
        backends = self.backends
        count = len(up)
        start = self._cursor % count
        self._cursor += 1
        best, best_key = up[start], math.inf
        for step in range(count):
            index = up[(start + step) % count]
            value = key(backends[index])
            if value < best_key:
                best, best_key = index, value
        return best

    def checked(
        self,
        address: Address,
        ok: bool,
        rise: int,
        fall: int,
        streak: int,
        detail: str,
        rtt: float | None = None,
        players: int | None = None,
    ) -> bool | None:
        """An active check's verdict (``streak``: results in a row like this one);
        True: the backend just went up, False: just went down, None: no change."""
        backend = self.by_address.get(address)
        if backend is None:
            return None
        backend.last_check = "ok" if ok else detail
        if ok:
            if rtt != backend.rtt or (players is not None and players != backend.players):
                self._best = None  # lowest_latency / fewest_players: rank again
            backend.rtt = rtt
            if players is not None:
                backend.players = players
                backend.active_at_check = backend.active
                owner = backend.owner
                if owner is not None and owner.strategy is Balance.FEWEST_PLAYERS:
                    backend.base = _base(backend)
                    owner._rekey(backend)  # its new count: its group changes
            if backend.checked_down and streak >= rise:
                backend.checked_down = False
                backend.failures = 0
                backend.retry_at = 0.0
                backend.retry_s = RETRY_FIRST_S
                self._transition(backend)
                return True
            return None
        if not backend.checked_down and streak >= fall:
            backend.checked_down = True
            self._transition(backend)
            return False
        return None

    def _probe(self, backend: Backend, now: float) -> None:
        # one connection probes a down backend; the next waits for this one's answer
        backend.retry_at = now + backend.retry_s

    # -- what happened ----------------------------------------------------------------

    def dialing(self, address: Address) -> None:
        backend = self.by_address.get(address)
        if backend is not None:
            backend.active += 1
            owner = backend.owner  # least_connections: this pool or the newer one
            if owner is not None:
                owner._rekey(backend)

    def done(self, address: Address) -> None:
        """A connection counted by :meth:`dialing` ended (or moved to the next backend)."""
        backend = self.by_address.get(address)
        if backend is not None and backend.active > 0:
            backend.active -= 1
            owner = backend.owner
            if owner is not None:
                owner._rekey(backend)

    def left(self, address: Address, client_ip: str, now: float) -> None:
        """A sticky pool's connection from ``client_ip`` to ``address`` ended: the client
        is remembered ``sticky_ttl`` from now (from when it left, not when it came: a
        player back a minute after an hour's session lands where it played)."""
        remembered = self.sticky.get(client_ip)
        if remembered is None or remembered[0] == address:  # (expired while it played)
            self._remember(client_ip, address, now)

    def _remember(self, client_ip: str, address: Address, now: float) -> None:
        sticky = self.sticky
        sticky[client_ip] = (address, now + self.sticky_ttl)
        sticky.move_to_end(client_ip)
        while len(sticky) > MAX_STICKY:
            sticky.popitem(last=False)

    def connected(self, address: Address, client_ip: str | None, now: float) -> bool:
        """A dial reached ``address``; True when that brought it back up."""
        backend = self.by_address.get(address)
        if self.sticky_ttl > 0 and client_ip is not None:
            self._remember(client_ip, address, now)
        if backend is None:
            return False
        was_down = backend.retry_at > 0
        backend.last_error = ""
        backend.failures = 0
        if was_down:
            backend.retry_at = 0.0
            backend.retry_s = RETRY_FIRST_S
            backend.went_up += 1
            self._transition(backend)
        return was_down

    def failed(self, address: Address, now: float, error: str = "") -> bool:
        """A dial to ``address`` failed; True when that marked it down."""
        backend = self.by_address.get(address)
        if backend is None:
            return False
        backend.failures += 1
        backend.failed_total += 1
        backend.last_error = error or "failed"
        if backend.down:  # a probe failed: wait longer before the next
            backend.retry_s = min(backend.retry_s * 2, RETRY_MAX_S)
            backend.retry_at = now + backend.retry_s
            return False
        if backend.failures >= FALL:
            backend.retry_at = now + backend.retry_s
            backend.went_down += 1
            self._transition(backend)
            return True
        return False

    def leaving(self, newer: Pool) -> list[BackendState]:
        """This older pool's backends that ``newer`` dropped but connections still use."""
        return [
            dataclasses.replace(state, state="draining")
            for state in self.states()
            if state.active and state.address not in newer.by_address
        ]

    def states(self) -> list[BackendState]:
        """Each backend as the API and /metrics show it (a copy, taken on the reactor)."""
        return [
            BackendState(
                address=b.address,
                weight=b.weight,
                state="down" if b.down else ("draining" if b.weight == 0 else "up"),
                last_check=b.last_check,
                rtt=b.rtt,
                players=b.players,
                went_down=b.went_down,
                went_up=b.went_up,
                active=b.active,
                failures=b.failures,
                dial_failures=b.failed_total,
                last_error=b.last_error,
            )
            for b in self.backends
        ]

    def expire_sticky(self, now: float) -> None:
        """Forget clients whose stickiness ran out (called by a sweep)."""
        sticky = self.sticky
        while sticky:
            _, (_, until) = next(iter(sticky.items()))
            if until > now:
                break
            sticky.popitem(last=False)


@owned_by(REACTOR)
class Pools:
    """Every route's :class:`Pool`, by route and backend list (a port route's pool is
    the server's backends on that port); the reactor's, as the connections are."""

    __slots__ = ("_by_key", "_by_route", "_latest")

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, tuple[Address, ...]], Pool] = {}
        self._latest: dict[str, Pool] = {}  # by route id: the counts a new list keeps
        # by the Route object itself (id, and the route to check it is that one): the
        # hot path's one dict lookup on an int; the table's routes live as long as it
        self._by_route: dict[int, tuple[Route, Pool]] = {}

    def get(self, route: Route) -> Pool:
        cached = self._by_route.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        pool = self._get(route)
        if len(self._by_route) > 4 * len(self._by_key) + 1024:
            self._by_route.clear()  # tables come and go: forget old routes' entries
        self._by_route[id(route)] = (route, pool)
        return pool

    def _get(self, route: Route) -> Pool:
        key = (route.qualified_id, route.addresses)
        pool = self._by_key.get(key)
        server = route.server
        if (
            pool is None
            # a list that comes back after a newer one shared its backends and set their
            # weights its way: a fresh pool sets them again
            or any(b.weight != w for b, w in zip(pool.backends, pool.own_weights, strict=True))
            or pool.strategy is not server.balance
            or pool.weights != route.weights
            or pool.sticky_ttl != server.sticky_ttl
        ):
            old = pool or self._latest.get(route.qualified_id)
            pool = Pool(
                (
                    (host, port, weight)
                    for (host, port), weight in zip(route.addresses, route.weights, strict=True)
                ),
                server.balance,
                server.sticky_ttl,
                old,
            )
            self._by_key[key] = pool
            self._latest[route.qualified_id] = pool
        return pool

    def peek(self, route: Route) -> Pool | None:
        """The route's pool if a connection made one (no new pool: nothing to show)."""
        return self._by_key.get((route.qualified_id, route.addresses))

    def prune(self, keep: set[tuple[str, tuple[Address, ...]]]) -> None:
        """Forget the pools of backend lists gone from the table and from every open
        connection (``keep``: the ones still in use)."""
        for key in [k for k in self._by_key if k not in keep]:
            pool = self._by_key.pop(key)
            if self._latest.get(key[0]) is pool:
                del self._latest[key[0]]
        live = set(map(id, self._by_key.values()))
        self._by_route = {k: v for k, v in self._by_route.items() if id(v[1]) in live}

    def expire_sticky(self, now: float) -> None:
        for pool in self._by_key.values():
            if pool.sticky:
                pool.expire_sticky(now)

    def keyed(self) -> list[tuple[tuple[str, tuple[Address, ...]], Pool]]:
        """Every pool with its key (route id, the backend list it was made for)."""
        return list(self._by_key.items())

    def __iter__(self) -> Iterator[tuple[str, Pool]]:
        for (route_id, _), pool in self._by_key.items():
            yield route_id, pool
