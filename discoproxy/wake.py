"""Wake-on-connect: start a stopped ``auto_start`` server when a player logs in, and stop
it again after ``auto_stop_after`` seconds without players.

Rules for this file:
- Providers that can start and stop their servers implement :class:`ServerControl`
  (the Docker provider does); a server's provider is the one named in its route.
- A start is single-flight per server: concurrent logins during a start share it, so a
  burst of players triggers exactly one start.
- A server is ``starting`` from the start request until its backend answers a status
  ping or a login reaches it (or :data:`STARTING_FOR_S` passes): pings show the
  ``starting`` MOTD meanwhile.
- The reactor thread counts players per server and notes when the last one left: it is
  the only writer of ``players`` (a server without players has no entry) and ``left_at``,
  and writes nothing else here; the loop reads them (a login that reached a server ends
  its ``starting``), and keeps its own times (first seen, started, stopped) apart.
- Idle means idle everywhere: before ``auto_stop_after`` stops a server, its backends
  are asked for their own online count (status answers, :attr:`Waker.backend_players`),
  so players who reach it through another discoproxy instance keep it running. A
  worker of ``workers = N`` sees its own players only: there a backend that does not
  answer its count is not stopped (``sees_every_player``).
- Per-server state follows the routing table: a route that leaves is forgotten, on the
  loop by :meth:`Waker.table_changed` (a registry listener) and on the reactor thread by
  :meth:`Waker.forget_gone`, so container churn does not grow the maps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Container, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio
from loguru import logger

from discoproxy.owners import LOOP, on_reactor, owned_by
from discoproxy.routing import Registry, Route
from discoproxy.singleflight import SingleFlight

if TYPE_CHECKING:
    from discoproxy.proxy.planes import EventOutbox
    from discoproxy.routing import RoutingTable

# How long a started server shows as "starting" at most if it never answers.
STARTING_FOR_S = 300.0
# A login within this long of a start does not start the server again (the start event
# may not have reached the routing table yet); after it, a sleeping server is restarted.
RESTART_AFTER_S = 30.0
# How often auto_stop_after is checked.
AUTO_STOP_CHECK_S = 5.0
# How often a held login checks whether its woken server answers yet.
READY_POLL_S = 0.25
READY_CONNECT_TIMEOUT_S = 1.0


@runtime_checkable
class ServerControl(Protocol):
    """A provider that can start and stop the servers it publishes."""

    async def start_server(self, server_id: str) -> None:
        """Start ``server_id``; raise with a readable message if it cannot."""
        ...

    async def stop_server(self, server_id: str) -> None:
        """Stop ``server_id``; raise with a readable message if it cannot."""
        ...


@owned_by(LOOP)
class Waker:
    """Starts sleeping servers on demand and stops idle ones."""

    def __init__(
        self,
        registry: Registry,
        controls: Mapping[str, ServerControl],
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.registry = registry
        self.controls = dict(controls)
        self._clock = clock or time.monotonic
        # asyncio loop, by qualified id
        self._starting: dict[str, float] = {}  # until
        self._started_at: dict[str, float] = {}
        self._starts: SingleFlight[str, None] = SingleFlight()
        self._idle_since: dict[str, float] = {}  # first seen idle, started or stopped
        # reactor thread, by qualified id: players on it, and when the last one left
        self.players: dict[str, int] = {}
        self.left_at: dict[str, float] = {}
        # Players on a route's backends by their own count (set by the proxy to the
        # status service's): those of other discoproxy instances count as much as ours.
        self.backend_players: Callable[[Route], Awaitable[int | None]] | None = None
        # False in a worker of `workers = N`: ``players`` are this worker's only, so a
        # backend that does not answer its count may have players elsewhere: not stopped
        self.sees_every_player = True
        self.events: EventOutbox | None = None  # server_woken / server_stopped (webhooks)

    def is_starting(self, qualified_id: str) -> bool:
        """Started and not yet answering (either thread: it only reads)."""
        until = self._starting.get(qualified_id)
        if until is None or self._clock() >= until:
            return False
        # a login reached it since the start: it runs (the reactor's counts say so)
        if qualified_id in self.players:
            return False
        started = self._started_at.get(qualified_id, math.inf)
        return self.left_at.get(qualified_id, -math.inf) < started

    def answered(self, qualified_id: str) -> None:
        """Its backend answered: it is no longer starting."""
        self._starting.pop(qualified_id, None)

    # -- reactor thread -----------------------------------------------------------------

    @on_reactor
    def player_joined(self, qualified_id: str) -> None:
        self.players[qualified_id] = self.players.get(qualified_id, 0) + 1

    @on_reactor
    def player_left(self, qualified_id: str) -> None:
        left = self.players.get(qualified_id, 1) - 1
        if left > 0:
            self.players[qualified_id] = left
            return
        self.players.pop(qualified_id, None)
        if qualified_id in self.registry.table.by_id:
            self.left_at[qualified_id] = self._clock()
        else:  # its route left meanwhile: nothing to stop
            self.left_at.pop(qualified_id, None)

    @on_reactor
    def forget_gone(self, live: Container[str]) -> None:
        """Forget when the last player left the servers whose routes are not ``live``
        (servers with players keep their count: it falls to nothing as they leave)."""
        left_at = self.left_at
        for qid in [qid for qid in left_at if qid not in live]:
            del left_at[qid]

    # -- asyncio loop -------------------------------------------------------------------

    def table_changed(self, table: RoutingTable) -> None:
        """Forget the loop's times of servers gone from ``table`` (a start under way
        forgets itself when it ends)."""
        live = table.by_id
        for per_server in (self._starting, self._started_at, self._idle_since):
            for qid in [qid for qid in per_server if qid not in live]:
                del per_server[qid]

    def route(self, qualified_id: str) -> Route | None:
        return self.registry.table.by_id.get(qualified_id)

    async def wake(self, route: Route) -> None:
        """Start ``route``'s server unless a start is already under way."""
        qid = route.qualified_id
        under_way = qid in self._starts
        now = self._clock()
        if not under_way and now - self._started_at.get(qid, -math.inf) < RESTART_AFTER_S:
            return  # started moments ago: its start event is on its way
        if not under_way:
            self._started_at[qid] = now
            self._starting[qid] = now + STARTING_FOR_S
        await self._starts.run(qid, lambda: self._start(route))

    async def _start(self, route: Route) -> None:
        qid = route.qualified_id
        control = self.controls.get(route.provider)
        if control is None:
            self._starting.pop(qid, None)
            logger.warning("cannot start {}: provider {} cannot start servers", qid, route.provider)
            return
        logger.info("starting {} for a player (auto_start)", qid)
        self._idle_since[qid] = self._clock()
        try:
            await control.start_server(route.server.id)
        except Exception as exc:
            self._starting.pop(qid, None)
            logger.error("cannot start {}: {}", qid, exc)
            return
        if self.events is not None:
            self.events.put("server_woken", {"route": qid, "server": route.server.id})

    async def wait_ready(self, qualified_id: str, wait: float) -> Route | None:
        """The route once its server runs and accepts connections, or None after
        ``wait`` seconds."""
        with anyio.move_on_after(wait):
            while True:
                route = self.route(qualified_id)
                if route is not None and not route.server.sleeping and route.addresses:
                    host, port = route.addresses[0]
                    try:
                        with anyio.fail_after(READY_CONNECT_TIMEOUT_S):
                            stream = await anyio.connect_tcp(host, port)
                    except (OSError, TimeoutError):
                        pass
                    else:
                        await stream.aclose()
                        return route
                await anyio.sleep(READY_POLL_S)
        return None

    async def run(self) -> None:
        """Stop servers idle longer than their ``auto_stop_after``, forever."""
        while True:
            await anyio.sleep(AUTO_STOP_CHECK_S)
            await self.stop_idle()

    async def stop_idle(self) -> None:
        now = self._clock()
        for route in self.registry.table.routes:
            server = route.server
            after = server.auto_stop_after
            qid = route.qualified_id
            if not after or server.sleeping or route.provider not in self.controls:
                continue
            if self.players.get(qid, 0) > 0 or qid in self._starts:
                continue
            # idle since the latest of: first seen, started, stopped, last player left
            since = max(self._idle_since.setdefault(qid, now), self.left_at.get(qid, -math.inf))
            if now - since < after:
                continue
            if self.backend_players is not None:
                # no address (every replica held back by its HEALTHCHECK): no answer
                online = await self.backend_players(route) if route.addresses else None
                if online is None and not self.sees_every_player:
                    logger.info(
                        "not stopping {}: no player on this worker for {:.0f}s, but its "
                        "backend did not answer its player count (another worker's "
                        "players may be on it)",
                        qid,
                        now - since,
                    )
                    self._idle_since[qid] = now  # looked at again after another period
                    continue
                if online:  # players who came through another instance
                    logger.info(
                        "not stopping {}: no player here for {:.0f}s, but its backend "
                        "counts {} online (through other instances?)",
                        qid,
                        now - since,
                        online,
                    )
                    self._idle_since[qid] = now  # looked at again after another period
                    continue
            logger.info("stopping {}: no player for {:.0f}s (auto_stop_after)", qid, now - since)
            self._idle_since[qid] = now  # not again before another full period
            try:
                await self.controls[route.provider].stop_server(server.id)
            except Exception as exc:
                logger.error("cannot stop {}: {}", qid, exc)
                continue
            if self.events is not None:
                idle = round(now - since, 1)
                self.events.put(
                    "server_stopped", {"route": qid, "server": server.id, "idle_s": idle}
                )
