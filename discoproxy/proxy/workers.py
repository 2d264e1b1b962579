"""``workers = N``: N data planes, each a reactor in its own process, fed by this one
control plane (the process that runs the providers, the registry, the admin listener,
status refreshes, health checks and wakes).

Rules for this file:
- The control plane opens every listening socket itself, ``SO_REUSEPORT``, N to an
  address (one per worker, in worker order), attaches the steering program
  (``steering.py``: every connection and datagram of one client IP reaches the same
  worker, so per-IP limits, budgets and UDP sessions stay whole in one worker) and
  keeps its copies open: a worker that dies leaves its socket in the group, so the
  group's order and every client's worker stay as they were, and connections that
  arrive meanwhile wait in that socket's backlog for the replacement. When the drain
  starts, the workers get SIGTERM and these copies close at once: a new client is
  refused, as with one process (a takeover handed them to the new process before).
- A worker gets its sockets, the config, the routing table and the ban list as
  immutable values over its :class:`~discoproxy.proxy.channel.Channel`, in order (one
  outbox per worker). It never talks to Docker or reads a file; what it needs from the
  control plane it asks: a status answer (one backend ping per server for all workers,
  through the control plane's cache), a server start or stop (the providers), and it
  hands its webhook events over.
- Reads of live numbers ask every worker and sum (:func:`merge_snapshots`), counters
  monotonic: a worker that does not answer adds its last answer's, each slot those of
  its earlier processes (:func:`counters_of`); bans and kicks reach every worker; a
  worker that dies is logged and started again (with a back-off when it keeps dying,
  told the health checks' verdicts in force), and ``/readyz`` says not ready until it
  is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Process, TaskStatus
from loguru import logger

from discoproxy.config import ProxyConfig, parse_bind
from discoproxy.guard import BanList
from discoproxy.owners import LOOP, on_reactor, owned_by
from discoproxy.proxy import steering
from discoproxy.proxy.addresses import format_addr
from discoproxy.proxy.balance import BackendState
from discoproxy.proxy.channel import (
    Channel,
    ChannelError,
    TableEncoder,
    one_way,
    socket_pair,
)
from discoproxy.proxy.planes import WATCHDOG_INTERVAL_S, WATCHDOG_LATE_S
from discoproxy.proxy.player_counts import PlayerSlots
from discoproxy.proxy.stats import (
    REMOVED,
    UNROUTED,
    Histogram,
    RouteStats,
    Snapshot,
    grand_totals,
)
from discoproxy.proxy.takeover import Handed, port_name
from discoproxy.proxy.tls_termination import read_files
from discoproxy.routing import PortKey, RoutingTable

if TYPE_CHECKING:
    from discoproxy.model import HealthCheck
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.routing import Route

    # HealthChecker.verdicts' items: route, address, check, ok, streak, reason, rtt, players
    Verdict = tuple[Route, tuple[str, int], HealthCheck, bool, int, str, float | None, int | None]

# A worker that dies is started again after this long, doubling while it keeps dying
# within RESTART_WINDOW_S of its start, up to RESTART_BACKOFF_MAX_S.
RESTART_BACKOFF_S = 0.2
RESTART_BACKOFF_MAX_S = 10.0
RESTART_WINDOW_S = 30.0
# A worker has this long to take its sockets and say it is ready.
WORKER_START_TIMEOUT_S = 30.0
# A read of live numbers (metrics, API) waits this long for each worker's answer.
WORKER_ANSWER_TIMEOUT_S = 5.0
# /healthz fails once no worker has been ready for this long (every one crash-looping:
# the proxy serves nothing, and an orchestrator's restart may well help).
NO_WORKER_READY_S = 60.0


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity, as a container's cpuset sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_count(config: ProxyConfig) -> int:
    return config.workers or cpu_count()


@dataclass(frozen=True)
class WorkerInit:
    """What a new worker gets first (its bind sockets ride along as fds, in order, then
    the shared player counts' memfd, player_counts.py)."""

    index: int
    count: int
    generation: int  # how many times this index was started before: keeps ids unique
    config: ProxyConfig
    binds: tuple[tuple[str, str], ...]  # (bind entry, listener label) per fd
    controls: tuple[str, ...]  # providers that start and stop servers (asked of us)
    events: frozenset[str]  # the webhook events wanted
    log_level: str
    log_format: str


@dataclass
class _BindGroup:
    bind: str
    label: str
    address: tuple[str, int]
    sockets: list[socket.socket]


@dataclass
class _Worker:
    index: int
    generation: int = 0
    process: Process | None = None
    channel: Channel | None = None
    # one-way messages, encoded, with the fds they carry (ours to close once sent)
    outbox: asyncio.Queue[tuple[bytes, list[int]]] = field(default_factory=asyncio.Queue)
    ready: bool = False
    started: float = 0.0
    restarts: int = 0
    announced: anyio.Event = field(default_factory=anyio.Event)  # set at its first "ready"
    terminated: Process | None = None  # the process sent SIGTERM (once each)
    # this process's newest answer to "snapshot" and "totals", by the request's number (a
    # slow answer never replaces a newer one): what it adds while it does not answer
    answered: dict[str, tuple[int, Any]] = field(default_factory=dict)
    # the counters of this slot's earlier processes (``counters_of`` their last answers):
    # a restarted worker starts from zero, the sums never go down
    retired: Snapshot = field(default_factory=lambda: merge_snapshots(()))
    retired_totals: dict[str, int] = field(default_factory=dict)
    # connections handed to this process and not taken yet, by number: each answer is
    # awaited by the handing worker's request (None: taken; else why not)
    handing: dict[int, asyncio.Future[str | None]] = field(default_factory=dict)


def open_group(
    make: Callable[[], socket.socket],
    address: tuple[str, int],
    count: int,
    listen: bool,
    exclusive: bool = False,
) -> list[socket.socket]:
    """``count`` sockets from ``make`` bound to ``address`` as one SO_REUSEPORT group
    (a port 0 becomes the port the first one got), steered by client IP. ``exclusive``
    (``bind`` listeners): a port some other socket holds is refused (EADDRINUSE) as one
    process's plain bind is, even when that is another process's SO_REUSEPORT group (a
    second discoproxy with workers), which the group's binds alone would join, silently
    sharing the port. Port routes are probed before (``ports.claim_port``), where a UDP
    one that comes back must join the sockets its workers still serve sessions on."""
    if exclusive and address[1]:
        probe = make()  # without SO_REUSEPORT (nor, for UDP, SO_REUSEADDR): it must be free
        try:
            if probe.type == socket.SOCK_DGRAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            probe.bind(address)
        finally:
            probe.close()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = make()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            bound = (address[0], socks[0].getsockname()[1] if len(socks) > 1 else address[1])
            sock.bind(bound)
            if listen:
                from discoproxy.proxy.server import LISTEN_BACKLOG

                sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        if count > 1:
            steering.attach(socks[0], count)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


@owned_by(LOOP)
class WorkerSet:
    """The worker processes and the socket groups they accept on (the loop's)."""

    def __init__(self, ctx: ProxyContext, count: int) -> None:
        self.ctx = ctx
        self.count = count
        self.workers = [_Worker(i) for i in range(count)]
        self._binds: dict[str, list[_BindGroup]] = {}
        self._ports: dict[PortKey, list[socket.socket]] = {}
        self._port_failed: dict[PortKey, tuple[str, float]] = {}  # why, when to try again
        self._stopping = False
        self._running = False
        self._seen_ready = 0.0  # when a worker was last seen ready (alive)
        self.bans = BanList()  # the list in force, for a worker that (re)starts
        self._tables = TableEncoder()  # each server crosses once
        self._tls: tuple[RoutingTable | None, set[Path]] = (None, set())  # files workers may ask
        self.players = PlayerSlots(count)  # max_players over every worker
        self._asked = 0  # requests of live numbers so far (orders their answers)
        self._handoffs = 0  # connections handed between workers so far (numbers them)
        # one worker started at a time, its end of the channel inheritable only then:
        # uvloop's spawn passes every inheritable fd on (close_fds or not), and a
        # worker holding another's end keeps that one's unread messages alive after it
        # died (handed clients' sockets among them, never closed)
        self._spawning = anyio.Lock()

    # -- state -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The workers are kept running (``/healthz``): one being replaced still counts,
        so an orchestrator does not restart the whole proxy for it; none ready for
        :data:`NO_WORKER_READY_S` (all of them dying as they start) does not."""
        if not self._running or self._stopping:
            return False
        now = time.monotonic()
        if any(w.ready for w in self.workers):
            self._seen_ready = now
            return True
        return now - self._seen_ready < NO_WORKER_READY_S

    @property
    def ready(self) -> bool:
        """Every worker runs and said it is ready (``/readyz``)."""
        return all(w.ready and w.channel is not None for w in self.workers)

    def states(self) -> list[dict[str, Any]]:
        """Each worker: index, pid, ready, restarts, RSS and CPU (``/api/workers``,
        ``/metrics``), read from /proc."""
        out = []
        for w in self.workers:
            pid = w.process.pid if w.process is not None and w.channel is not None else None
            rss, cpu = process_usage(pid) if pid is not None else (None, None)
            out.append(
                {
                    "index": w.index,
                    "pid": pid,
                    "ready": w.ready,
                    "restarts": w.restarts,
                    "rss_bytes": rss,
                    "cpu_s": cpu,
                }
            )
        return out

    # -- listening sockets -------------------------------------------------------------

    async def open(self, bind: str) -> list[tuple[str, int]]:
        """Listen on ``bind`` with a group per address; each worker gets its socket."""
        from discoproxy.proxy.server import listening_socket, open_bind

        def open_address(
            family: int, type_: int, proto: int, sockaddr: tuple[Any, ...]
        ) -> list[socket.socket]:
            make = partial(listening_socket, family, type_, proto)
            address = (str(sockaddr[0]), int(sockaddr[1]))
            return open_group(make, address, self.count, listen=True, exclusive=True)

        # a takeover's groups for this bind, as the old process had them, or new ones
        opened = self.ctx.inherited.take("bind", bind) if self.ctx.inherited else None
        if opened is None:
            opened = await open_bind(bind, open_address)
        port = parse_bind(bind)[1]
        groups: list[_BindGroup] = []
        for socks in opened:
            address = socks[0].getsockname()[:2]
            label = bind if port else format_addr(address)
            groups.append(_BindGroup(bind, label, address, socks))
        self._binds[bind] = groups
        for worker in self.workers:
            self._post(worker, "bind", *self._bind_payload(groups, worker.index))
        bound = [group.address for group in groups]
        logger.info(
            "listening on {} ({} workers)", ", ".join(format_addr(a) for a in bound), self.count
        )
        return bound

    @staticmethod
    def _bind_payload(
        groups: Sequence[_BindGroup], index: int
    ) -> tuple[list[tuple[str, str]], list[int]]:
        return [(g.bind, g.label) for g in groups], [g.sockets[index].fileno() for g in groups]

    def find(self, bind: str) -> str | None:
        from discoproxy.proxy.server import find_bind

        return find_bind(bind, self._binds)

    @property
    def binds(self) -> list[str]:
        return list(self._binds)

    def rename(self, old: str, new: str) -> None:
        groups = self._binds.pop(old)
        self._binds[new] = [replace(g, bind=new) for g in groups]
        self._post_all("rename", (old, new))

    def close(self, bind: str) -> None:
        groups = self._binds.pop(bind, [])
        self._post_all("unbind", bind)
        for group in groups:
            for sock in group.sockets:
                sock.close()
        if groups:
            where = ", ".join(format_addr(group.address) for group in groups)
            logger.info("stopped listening on {}", where)

    def close_all(self) -> None:
        """The drain's start (``run`` ending), or shutdown: the control plane's copies of
        every listening socket, so the kernel refuses new clients once the workers
        closed theirs. Nothing reopens after it."""
        self._stopping = True
        for groups in self._binds.values():
            for group in groups:
                for sock in group.sockets:
                    sock.close()
        self._binds.clear()
        for socks in self._ports.values():
            for sock in socks:
                sock.close()
        self._ports.clear()

    def table_changed(self, table: RoutingTable) -> None:
        """A registry listener: open the port groups ``table`` claims, then hand every
        worker the table (after the sockets, in order), then close the ports gone."""
        if self._stopping:
            return
        from discoproxy.proxy.ports import note_port_failure

        wanted = set(table.ports)
        now = time.monotonic()
        for key in sorted(wanted - set(self._ports)):
            if self._port_failed.get(key, ("", 0.0))[1] > now:
                continue  # another process held it a moment ago (PORT_RETRY_S)
            try:
                self._ports[key] = self._open_port(key)
            except OSError as exc:
                note_port_failure(self._port_failed, key, table, exc, now)
                continue
            self._port_failed.pop(key, None)
            for worker in self.workers:
                self._post(worker, "port", key, [self._ports[key][worker.index].fileno()])
        slots = self.players.update(_capped(table))
        if slots is not None:  # before the table: a worker knows a route's slot first
            self._post_all("players", slots)
        skeleton, new = self._tables.encode(table)
        self._post_all("table", (skeleton, new))
        for key in sorted(set(self._ports) - wanted):
            for sock in self._ports.pop(key):
                sock.close()
        for key in set(self._port_failed) - wanted:
            del self._port_failed[key]

    def _open_port(self, key: PortKey) -> list[socket.socket]:
        from discoproxy.proxy.ports import claim_port, port_socket

        host = self.ctx.config.port_routes_bind
        taken = self.ctx.inherited
        handed = taken.take("port", port_name(key, host)) if taken is not None else None
        if handed is not None:
            return handed[0]
        claim_port(self.ctx.config, key, self._pids())
        return open_group(
            lambda: port_socket(self.ctx.config, key), (host, key[1]), self.count, key[0] == "tcp"
        )

    def _pids(self) -> list[int]:
        """This process and its workers (what holds our own sockets)."""
        pids = [os.getpid()]
        pids += [w.process.pid for w in self.workers if w.process is not None]
        return pids

    def handover(self) -> Iterator[tuple[Handed, socket.socket]]:
        """Every socket of every group, in worker order, for a takeover."""
        for bind, groups in self._binds.items():
            for n, group in enumerate(groups):
                for index, sock in enumerate(group.sockets):
                    yield Handed("bind", bind, n, index), sock
        for key, socks in self._ports.items():
            name = port_name(key, str(socks[0].getsockname()[0]))
            for index, sock in enumerate(socks):
                yield Handed("port", name, 0, index), sock

    # -- fan-out -----------------------------------------------------------------------

    def _post(
        self, worker: _Worker, kind: str, payload: Any = None, fds: Sequence[int] = ()
    ) -> None:
        """Queue a one-way message for ``worker`` (its fds duplicated now: the sockets
        may close before the sender gets to it). A worker not running gets everything
        again when it starts."""
        if worker.channel is None:
            return
        worker.outbox.put_nowait((one_way(kind, payload), [os.dup(fd) for fd in fds]))

    def _post_all(self, kind: str, payload: Any = None) -> None:
        """The same message to every worker, encoded once (a table of 10,000 routes
        costs its pickling once per swap, whatever N is)."""
        message = one_way(kind, payload)
        for worker in self.workers:
            if worker.channel is not None:
                worker.outbox.put_nowait((message, []))

    def configure(self, config: ProxyConfig) -> None:
        self._post_all("config", config)

    def post_bans(self, bans: BanList) -> None:
        self.bans = bans  # what a worker started later gets
        self._post_all("bans", bans)

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        """``fn(ctx, *args)`` on every worker's reactor (``fn`` a module-level function)."""
        self._post_all("call", (fn, args))

    async def ask(self, kind: str, payload: Any = None) -> list[Any]:
        """Every running worker's answer to ``kind`` (a worker that does not answer in
        time, or is being restarted, is left out)."""
        return [a for a in await self._answers(kind, payload) if a is not None]

    async def _answers(self, kind: str, payload: Any = None, keep: bool = False) -> list[Any]:
        """Each worker's answer to ``kind``, in worker order: None for one that did not
        answer in time or is being restarted. ``keep`` (live numbers): the newest answer
        of each process is kept in ``answered``, and one whose process ended meanwhile
        is None (its slot has retired its last kept answer: it would count twice)."""
        asked: list[tuple[Channel, int, Any] | None] = [None] * self.count

        async def one(worker: _Worker) -> None:
            channel = worker.channel
            if channel is None or not worker.ready:
                return
            self._asked += 1
            number = self._asked
            with contextlib.suppress(ChannelError, TimeoutError):
                with anyio.fail_after(WORKER_ANSWER_TIMEOUT_S):
                    answer = await channel.request(kind, payload)
                asked[worker.index] = (channel, number, answer)

        async with anyio.create_task_group() as tg:
            for worker in self.workers:
                tg.start_soon(one, worker)
        answers: list[Any] = [None] * self.count
        for worker, item in zip(self.workers, asked, strict=True):
            if item is None or (keep and item[0] is not worker.channel):
                continue
            _, number, answer = item
            answers[worker.index] = answer
            if keep and number > worker.answered.get(kind, (0, None))[0]:
                worker.answered[kind] = (number, answer)
        return answers

    async def snapshot(self, connections: int = 0) -> Snapshot:
        """The sum over workers. One that does not answer adds the counters of its last
        answer, and every slot those of its earlier processes, so no counter goes down
        when a worker is slow, dies or is replaced; gauges are the answering ones'."""
        answers = await self._answers("snapshot", connections, keep=True)
        live: list[Snapshot] = []
        gone: list[Snapshot] = []
        for worker, answer in zip(self.workers, answers, strict=True):
            if answer is not None:
                live.append(answer)
            elif (last := worker.answered.get("snapshot")) is not None:
                gone.append(counters_of(last[1]))
        # routes gone from the table (and from every worker) take their counters along,
        # as a worker's own stats do: label values stay bounded
        keep = {UNROUTED, *self.ctx.registry.table.by_id}
        for snap in (*live, *gone):
            keep.update(snap.routes)
        for worker in self.workers:
            _forget_routes(worker.retired, keep)
            gone.append(worker.retired)
        return merge_snapshots(live, connections, gone)

    async def totals(self) -> dict[str, int]:
        """:meth:`snapshot`'s grand totals (the dashboard's history), as monotonic."""
        out = grand_totals({})
        answers = await self._answers("totals", keep=True)
        for worker, answer in zip(self.workers, answers, strict=True):
            _add_counts(out, worker.retired_totals)
            if answer is not None:
                _add_counts(out, answer)
            elif (last := worker.answered.get("totals")) is not None:
                _add_counts(out, _counted_totals(last[1]))
        return out

    def _retire(self, worker: _Worker) -> None:
        """``worker``'s process ended: what it last said it counted stays counted (its
        open connections as ended), under its slot, for good."""
        snapshot = worker.answered.pop("snapshot", None)
        totals = _counted_totals(worker.answered.pop("totals", (0, {}))[1])
        if snapshot is not None:
            counted = counters_of(snapshot[1])
            worker.retired = merge_snapshots((worker.retired, counted))  # backends kept
            # the newer of its two answers, key by key (both only grow in one process)
            for key, value in _counted_totals(counted.totals()).items():
                totals[key] = max(totals.get(key, 0), value)
        _add_counts(worker.retired_totals, totals)

    async def apply_bans(self, bans: BanList) -> int:
        self.bans = bans
        for worker in self.workers:  # starting: its init held the list before this one
            if worker.channel is not None and not worker.ready:
                self._post(worker, "bans", bans)
        return sum(await self.ask("bans", bans))

    async def kick(self, target: str) -> int:
        return sum(await self.ask("kick", target))

    # -- the workers' requests ---------------------------------------------------------

    async def _handle(self, worker: _Worker, kind: str, payload: Any, fds: list[int]) -> Any:
        if kind == "handoff":  # a connection for the worker that owns its real client
            return await self._forward(payload, fds)
        if kind == "adopted":  # that worker took it: the one that handed it hears so
            answered = worker.handing.pop(payload, None)
            if answered is not None and not answered.done():
                answered.set_result(None)
            return None
        for fd in fds:
            os.close(fd)
        ctx = self.ctx
        if kind == "ready":
            worker.ready = True
            worker.announced.set()
            logger.info("worker {} ready (pid {})", worker.index, payload)
            return None
        if kind == "status":
            return await ctx.status.shared_document(*payload)
        if kind == "control":
            provider, action, server_id = payload
            control = ctx.waker.controls.get(provider)
            if control is None:
                raise LookupError(f"provider {provider} cannot start or stop servers")
            if action == "start":
                await control.start_server(server_id)
            else:
                await control.stop_server(server_id)
            return None
        if kind == "files":  # a worker's certificate or CA files: it reads none itself
            paths, known = payload
            table = ctx.registry.table
            if self._tls[0] is not table:  # once per table, not once per request
                self._tls = (table, _tls_files(table))
            if not set(paths) <= self._tls[1]:
                raise LookupError(f"{', '.join(map(str, paths))}: no route's tls files")
            try:
                return await read_files(paths, known)
            except OSError as exc:
                return exc  # the worker raises it, as reading the file itself would
        if kind == "events":
            for event, _when, data in payload:
                ctx.events.put(event, data)
            return None
        raise ValueError(f"unknown request from worker {worker.index}: {kind}")

    async def _forward(self, payload: Any, fds: list[int]) -> str | None:
        """A worker hands a connection to the worker that owns its client (its PROXY
        header's address; ``ClientConnection._hand_off``): queued for that one, in
        order with the table it routes by, numbered. The answer (to the handing
        worker's request, which keeps the connection's close line until then): None
        once that one says it took it (``adopted``), else why it could not: it is not
        running now (being restarted: its own clients wait in its backlog, this one was
        accepted already), or its process ended before it took it (``_fail_handoffs``).
        The client's socket is closed by whoever holds it last (here, the outbox, or
        the kernel with a dead worker's unread messages)."""
        try:
            target, handed = payload
            worker = self.workers[target] if 0 <= target < len(self.workers) else None
            if worker is None or worker.channel is None:
                why = "restarting" if worker is not None and not self._stopping else "not running"
                return f"worker {target} {why}"
            self._handoffs += 1
            number = self._handoffs
            answered: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            worker.handing[number] = answered
            self._post(worker, "adopt", (number, handed), fds)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            return await answered
        finally:
            worker.handing.pop(number, None)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every worker, wait until each is ready, then keep them running until
        cancelled (then drain them: each finishes its connections, as one process does)."""
        try:
            async with anyio.create_task_group() as tg:
                try:
                    started = [anyio.Event() for _ in self.workers]
                    for worker in self.workers:
                        tg.start_soon(self._keep, worker, started[worker.index])
                    with anyio.fail_after(WORKER_START_TIMEOUT_S):
                        for event in started:
                            await event.wait()
                    self._running = True
                    self._seen_ready = time.monotonic()
                    task_status.started()
                    await anyio.sleep_forever()
                finally:
                    # the drain starts: every worker stops accepting, and so does the
                    # kernel once our copies are gone too (a new client is refused, as
                    # with one process, instead of waiting in a backlog nobody accepts
                    # from while the workers drain; a takeover handed them over before)
                    for worker in self.workers:
                        _terminate(worker)
                    self.close_all()
        finally:
            self._stopping = True  # table_changed posts nothing from now on
            self.players.close()  # every _keep has returned: no worker starts again

    def _init_messages(self, worker: _Worker) -> list[tuple[bytes, list[int]]]:
        ctx = self.ctx
        groups = [g for groups in self._binds.values() for g in groups]
        binds, fds = self._bind_payload(groups, worker.index)
        init = WorkerInit(
            worker.index,
            self.count,
            worker.generation,
            ctx.config,
            tuple(binds),
            tuple(ctx.waker.controls),
            ctx.events.wanted,
            ctx.config.log_level,
            ctx.config.log_format,
        )
        fds = [*fds, self.players.fd]
        out = [(one_way("init", init), [os.dup(fd) for fd in fds])]
        for key, socks in self._ports.items():
            out.append((one_way("port", key), [os.dup(socks[worker.index].fileno())]))
        out.append((one_way("players", dict(self.players.slots)), []))
        # the health checks' verdicts in force (the others' pools heard them as they
        # changed): before the table, whose first one starts the accepting, and the
        # clients waiting in this worker's backlog are taken at once
        verdicts = ctx.health.verdicts()
        if verdicts:
            out.append((one_way("call", (restore_verdicts, (verdicts,))), []))
        skeleton, _ = self._tables.encode(ctx.registry.table)
        out.append((one_way("table", (skeleton, self._tables.everything())), []))
        out.append((one_way("bans", self.bans), []))
        return out

    async def _keep(self, worker: _Worker, first: anyio.Event) -> None:
        backoff = RESTART_BACKOFF_S
        while True:
            code = await self._run_once(worker, first)
            self.players.clear_row(worker.index)  # its players went with it
            if self._stopping:
                return
            lived = time.monotonic() - worker.started
            logger.error(
                "worker {} (pid {}) exited with {}; starting it again{}",
                worker.index,
                worker.process.pid if worker.process is not None else "-",
                _exit_text(code),
                f" in {backoff:g}s" if lived < RESTART_WINDOW_S else "",
            )
            if lived < RESTART_WINDOW_S:
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            else:
                backoff = RESTART_BACKOFF_S
            worker.generation += 1
            worker.restarts += 1

    async def _run_once(self, worker: _Worker, first: anyio.Event) -> int | None:
        worker.ready = False
        worker.outbox = asyncio.Queue()
        worker.announced = first
        async with self._spawning:
            ours, theirs = socket_pair()
            command = [sys.executable, "-m", "discoproxy.proxy.worker", str(theirs.fileno())]
            try:
                process = await anyio.open_process(
                    command, stdin=None, stdout=None, stderr=None, pass_fds=(theirs.fileno(),)
                )
            finally:
                theirs.close()
        worker.process = process
        worker.started = time.monotonic()
        channel = Channel(ours, lambda kind, payload, fds: self._handle(worker, kind, payload, fds))
        worker.channel = channel
        for message in self._init_messages(worker):
            worker.outbox.put_nowait(message)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(channel.run)
                tg.start_soon(self._send, worker, channel)
                tg.start_soon(self._watch, worker, channel, process)
                code = await process.wait()
                tg.cancel_scope.cancel()
        except BaseException:
            _drop_outbox(worker)  # now: a socket's dup there would keep it accepting
            with anyio.CancelScope(shield=True):
                await self._stop(worker, process, channel)
            raise
        finally:
            worker.channel = None
            worker.ready = False
            self._retire(worker)
            channel.close()
            _drop_outbox(worker)
            _fail_handoffs(worker)
        return code

    async def _watch(self, worker: _Worker, channel: Channel, process: Process) -> None:
        """Kill a worker that stops answering (a loop or reactor stuck): the kernel keeps
        steering its clients' IPs to it, so they would wait on it for good; killed, it
        is started again as a crashed one is. The check goes through its reactor, so a
        busy worker answers (the GIL changes hands every few ms) and a stuck one does
        not; one not ready yet (decoding its first table) is not asked. A deadline this
        loop noticed late (it was paused itself, the answer maybe unread) kills none."""
        while not self._stopping:
            await anyio.sleep(WATCHDOG_INTERVAL_S)
            stall = self.ctx.config.stall_timeout
            if not worker.ready or stall <= 0 or self._stopping:
                continue
            asked = anyio.current_time()
            try:
                with anyio.fail_after(stall):
                    await channel.request("alive")
            except ChannelError:
                if channel.closed:
                    return  # it ended: _keep says how
                continue  # it answered with an error: alive
            except TimeoutError:
                if anyio.current_time() - asked - stall > WATCHDOG_LATE_S:
                    continue  # this loop was held up (a paused container): ask again
                if not self._stopping:  # (draining: _stop gives it shutdown_timeout)
                    logger.error(
                        "worker {} (pid {}) stalled: no answer in {:g}s; killing it",
                        worker.index,
                        process.pid,
                        stall,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                return

    async def _send(self, worker: _Worker, channel: Channel) -> None:
        while True:
            message, fds = await worker.outbox.get()
            try:
                await channel.send_encoded(message, fds)
            except ChannelError:
                return
            finally:
                for fd in fds:
                    os.close(fd)

    async def _stop(self, worker: _Worker, process: Process, channel: Channel) -> None:
        """Shutdown: the worker drains (``shutdown_timeout``) and exits; one that does
        not is killed."""
        grace = self.ctx.config.shutdown_timeout
        _terminate(worker)
        with anyio.move_on_after(grace + 5):
            await process.wait()
        logger.debug("worker {} stopped: {}", worker.index, _exit_text(process.returncode))
        if process.returncode is None:
            logger.warning("worker {} did not stop in time: killed", worker.index)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


@on_reactor
def restore_verdicts(ctx: ProxyContext, verdicts: Sequence[Verdict]) -> None:
    """(a new worker's reactor) The health checks' verdicts in force, from
    ``HealthChecker.verdicts``, taken by its pools as the checks' own; no line is logged
    and no event put: the transitions were told when they happened."""
    for route, address, check, ok, streak, detail, rtt, players in verdicts:
        pool = ctx.pools.get(route)
        pool.checked(address, ok, check.rise, check.fall, streak, detail, rtt, players)


def _drop_outbox(worker: _Worker) -> None:
    """What was never sent to ``worker``: its fds (dups) are ours to close."""
    while not worker.outbox.empty():
        _, fds = worker.outbox.get_nowait()
        for fd in fds:
            os.close(fd)


def _fail_handoffs(worker: _Worker) -> None:
    """``worker``'s process ended: the connections handed to it that it never said it
    took (queued in its outbox, or sent and unread) are the handing workers' to end."""
    handing, worker.handing = worker.handing, {}
    for answered in handing.values():
        if not answered.done():
            answered.set_result(f"worker {worker.index} exited")


def _terminate(worker: _Worker) -> None:
    """SIGTERM to ``worker``'s process, once: it closes its listeners and drains."""
    process = worker.process
    if process is None or process.returncode is not None or worker.terminated is process:
        return
    worker.terminated = process
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)


_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def process_usage(pid: int) -> tuple[int | None, float | None]:
    """(RSS bytes, user + system CPU seconds) of ``pid``, or Nones if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            rss = int(statm.read().split()[1]) * _PAGE
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return rss, (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None, None


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


# -- summing the workers' numbers --------------------------------------------------------


def _add_histogram(into: Histogram, other: Histogram) -> None:
    into.counts = [a + b for a, b in zip(into.counts, other.counts, strict=True)]
    into.count += other.count
    into.total += other.total


def _add_route(into: RouteStats, other: RouteStats) -> None:
    for name in RouteStats.__slots__:
        value = getattr(other, name)
        if isinstance(value, Histogram):
            _add_histogram(getattr(into, name), value)
        else:
            setattr(into, name, getattr(into, name) + value)


def _add_backends(into: list[BackendState], other: list[BackendState]) -> list[BackendState]:
    by_address = {b.address: b for b in into}
    for b in other:
        have = by_address.get(b.address)
        if have is None:
            by_address[b.address] = b
            continue
        by_address[b.address] = replace(
            have,
            state="up" if "up" in (have.state, b.state) else have.state,
            active=have.active + b.active,
            failures=max(have.failures, b.failures),
            dial_failures=have.dial_failures + b.dial_failures,
            went_down=have.went_down + b.went_down,
            went_up=have.went_up + b.went_up,
            last_error=have.last_error or b.last_error,
        )
    return list(by_address.values())


def _add_counts(into: dict[Any, int], other: Mapping[Any, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


def _add_lists(into: dict[Any, list[int]], other: Mapping[Any, list[int]]) -> None:
    for key, item in other.items():
        have = into.get(key)
        if have is None:
            into[key] = list(item)
        else:
            for n, value in enumerate(item):
                have[n] += value


def counters_of(snap: Snapshot) -> Snapshot:
    """What ``snap`` still adds once its worker is gone or silent: its counters only, its
    open connections and UDP sessions counted as ended (their bytes so far included, so
    no total goes down), no gauge (open counts, players, live connections, backends'
    states: see ``gone`` in :func:`merge_snapshots`)."""
    routes = {route_id: stats.copy() for route_id, stats in snap.routes.items()}

    def route(route_id: str) -> RouteStats:
        stats = routes.get(route_id)
        if stats is None:
            stats = routes[route_id] = RouteStats()
        return stats

    for (_, route_id), (count, up, down) in snap.open_tcp.items():
        stats = route(route_id)
        stats.closed += count
        stats.bytes_up += up
        stats.bytes_down += down
    for route_id, (count, up, down) in snap.open_udp.items():
        stats = route(route_id)
        stats.udp_sessions += count
        stats.udp_bytes_up += up
        stats.udp_bytes_down += down
    for stats in routes.values():
        stats.players = 0
    return Snapshot(
        taken=snap.taken,
        routes=routes,
        accepted=dict(snap.accepted),
        rejected=dict(snap.rejected),
        handshake={name: histogram.copy() for name, histogram in snap.handshake.items()},
        open_tcp={},
        open_udp={},
        udp_drops=dict(snap.udp_drops),
        udp_datagrams=snap.udp_datagrams,
        status=snap.status,
        internal_errors=snap.internal_errors,
        log_lines_dropped=snap.log_lines_dropped,
        backends={
            route_id: [replace(b, active=0) for b in backends]
            for route_id, backends in snap.backends.items()
        },
    )


def _counted_totals(totals: Mapping[str, int]) -> dict[str, int]:
    """A worker's grand totals without the gauge (``active``)."""
    return {key: value for key, value in totals.items() if key != "active"}


def _forget_routes(snap: Snapshot, keep: set[str]) -> None:
    """A retired slot's routes gone from the table: their counters are added to
    :data:`REMOVED`'s, as a worker's own prune does (no sum goes down)."""
    gone = [r for r in snap.routes if r not in keep and r != REMOVED]
    if gone:
        removed = snap.routes.setdefault(REMOVED, RouteStats())
        for route_id in gone:
            removed.fold(snap.routes.pop(route_id))
    for route_id in [r for r in snap.backends if r not in keep]:
        del snap.backends[route_id]


def _add_failed_dials(into: list[BackendState], other: Sequence[BackendState]) -> None:
    """A gone worker's failed dials, to the backends an answering worker lists (a backend
    only it knew is not shown: its state would be a dead process's)."""
    index = {b.address: n for n, b in enumerate(into)}
    for b in other:
        n = index.get(b.address)
        if n is not None and (b.dial_failures or b.went_down or b.went_up):
            have = into[n]
            into[n] = replace(
                have,
                dial_failures=have.dial_failures + b.dial_failures,
                went_down=have.went_down + b.went_down,
                went_up=have.went_up + b.went_up,
            )


def merge_snapshots(
    snaps: Sequence[Snapshot], connections: int = 0, gone: Sequence[Snapshot] = ()
) -> Snapshot:
    """The sum over workers: counters add up, open connections are listed together
    (oldest first, at most ``connections``), a backend is up if any worker has it up.
    ``gone``: counters of workers that did not answer or ended (:func:`counters_of`),
    added to the counters only. The inputs are left as they were (copied)."""
    merged = Snapshot(
        taken=time.time(),
        routes={},
        accepted={},
        rejected={},
        handshake={},
        open_tcp={},
        open_udp={},
        udp_drops={},
        udp_datagrams=(0, 0),
        status=(0, 0, 0),
    )
    for n, snap in enumerate((*snaps, *gone)):
        answered = n < len(snaps)
        for route_id, stats in snap.routes.items():
            have = merged.routes.get(route_id)
            if have is None:
                merged.routes[route_id] = stats.copy()
            else:
                _add_route(have, stats)
        _add_counts(merged.accepted, snap.accepted)
        _add_counts(merged.rejected, snap.rejected)
        _add_counts(merged.udp_drops, snap.udp_drops)
        for name, histogram in snap.handshake.items():
            if name in merged.handshake:
                _add_histogram(merged.handshake[name], histogram)
            else:
                merged.handshake[name] = histogram.copy()
        _add_lists(merged.open_tcp, snap.open_tcp)
        _add_lists(merged.open_udp, snap.open_udp)
        merged.udp_datagrams = (
            merged.udp_datagrams[0] + snap.udp_datagrams[0],
            merged.udp_datagrams[1] + snap.udp_datagrams[1],
        )
        merged.status = (
            merged.status[0] + snap.status[0],
            merged.status[1] + snap.status[1],
            merged.status[2] + snap.status[2],
        )
        merged.internal_errors += snap.internal_errors
        merged.log_lines_dropped += snap.log_lines_dropped
        merged.connections.extend(snap.connections)
        for route_id, backends in snap.backends.items():
            have_backends = merged.backends.get(route_id)
            if not answered:
                if have_backends is not None:  # an answering worker's list: its states
                    _add_failed_dials(have_backends, backends)
                continue
            merged.backends[route_id] = (
                list(backends) if have_backends is None else _add_backends(have_backends, backends)
            )
    merged.connections.sort(key=lambda c: -c.age_s)
    del merged.connections[connections:]
    return merged


def _capped(table: RoutingTable) -> list[str]:
    """The routes whose players are limited (``max_players``): they get shared counts."""
    return [qid for qid, route in table.by_id.items() if route.server.max_players]


def _tls_files(table: RoutingTable) -> set[Path]:
    """The files a worker may have the control plane read: the table's certificates,
    keys and backend CA bundles."""
    files: set[Path] = set()
    for route in table.routes:
        tls = route.server.tls
        if tls is not None:
            files.update((tls.cert, tls.key))
            if tls.backend_ca is not None:
                files.add(tls.backend_ca)
    return files
