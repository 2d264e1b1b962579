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
- The reactor thread counts players per server (it is the only writer of ``players`` and
  ``idle_since``); this module reads them on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import anyio
from loguru import logger

from discoproxy.routing import Registry, Route

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


class Waker:
    """Starts sleeping servers on demand and stops idle ones."""

    def __init__(self, registry: Registry, controls: Mapping[str, ServerControl]) -> None:
        self.registry = registry
        self.controls = dict(controls)
        self._starting: dict[str, float] = {}  # qualified id -> until (monotonic)
        self._started_at: dict[str, float] = {}
        self._starts: dict[str, asyncio.Task[None]] = {}
        # reactor thread: players per qualified id, and since when a server has none
        self.players: dict[str, int] = {}
        self.idle_since: dict[str, float] = {}
        self.starts = 0
        self.stops = 0

    def is_starting(self, qualified_id: str) -> bool:
        until = self._starting.get(qualified_id)
        return until is not None and time.monotonic() < until

    def answered(self, qualified_id: str) -> None:
        """Its backend answered: it is no longer starting."""
        self._starting.pop(qualified_id, None)

    # -- reactor thread -----------------------------------------------------------------

    def player_joined(self, qualified_id: str) -> None:
        self.players[qualified_id] = self.players.get(qualified_id, 0) + 1
        self._starting.pop(qualified_id, None)

    def player_left(self, qualified_id: str) -> None:
        left = self.players.get(qualified_id, 1) - 1
        self.players[qualified_id] = left
        if left <= 0:
            self.idle_since[qualified_id] = time.monotonic()

    # -- asyncio loop -------------------------------------------------------------------

    def route(self, qualified_id: str) -> Route | None:
        return self.registry.table.by_id.get(qualified_id)

    async def wake(self, route: Route) -> None:
        """Start ``route``'s server unless a start is already under way."""
        qid = route.qualified_id
        task = self._starts.get(qid)
        now = time.monotonic()
        if task is None and now - self._started_at.get(qid, -math.inf) < RESTART_AFTER_S:
            return  # started moments ago: its start event is on its way
        if task is None:
            self._started_at[qid] = now
            self._starting[qid] = now + STARTING_FOR_S
            task = asyncio.ensure_future(self._start(route))
            self._starts[qid] = task
            task.add_done_callback(lambda _: self._starts.pop(qid, None))
        await asyncio.shield(task)

    async def _start(self, route: Route) -> None:
        qid = route.qualified_id
        control = self.controls.get(route.provider)
        if control is None:
            self._starting.pop(qid, None)
            logger.warning("cannot start {}: provider {} cannot start servers", qid, route.provider)
            return
        logger.info("starting {} for a player (auto_start)", qid)
        self.starts += 1
        self.idle_since[qid] = time.monotonic()
        try:
            await control.start_server(route.server.id)
        except Exception as exc:
            self._starting.pop(qid, None)
            logger.error("cannot start {}: {}", qid, exc)

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
        now = time.monotonic()
        for route in self.registry.table.routes:
            server = route.server
            after = server.auto_stop_after
            qid = route.qualified_id
            if not after or server.sleeping or route.provider not in self.controls:
                continue
            if self.players.get(qid, 0) > 0 or qid in self._starts:
                continue
            since = self.idle_since.setdefault(qid, now)
            if now - since < after:
                continue
            logger.info("stopping {}: no player for {:.0f}s (auto_stop_after)", qid, now - since)
            self.idle_since[qid] = now  # not again before another full period
            self.stops += 1
            try:
                await self.controls[route.provider].stop_server(server.id)
            except Exception as exc:
                logger.error("cannot stop {}: {}", qid, exc)
