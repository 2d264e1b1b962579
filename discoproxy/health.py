"""Active health checks: each backend of a route with ``health_check`` is checked every
``interval`` on the control plane, and the verdicts reach the pools on the reactor.

Rules for this file:
- The checker is the loop's: its targets, their streaks and its schedule live here; a
  result crosses to the data plane only through ``Reactor.call`` (``_apply`` runs there
  and is the one place a pool hears of a check).
- One scheduler task and a heap of due times, not a task per backend: 10,000 backends
  cost one sleeping task and a bounded number of checks in flight
  (``MAX_CHECKS_IN_FLIGHT``). A new target's first check is spread over its interval by
  a hash of its address, so a table of many backends does not check them all at once.
- Every check has a deadline (``timeout``); whatever it raises is a failed check with a
  reason, never an error of the checker.
- Transitions are logged once, on the reactor, where they take effect: ``backend
  10.0.0.5:25565 of survival@docker down: 3 checks failed: connection refused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import heapq
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream
from loguru import logger

from discoproxy.model import Balance, CheckKind, HealthCheck
from discoproxy.owners import LOOP, on_reactor, owned_by
from discoproxy.protocol import minecraft
from discoproxy.protocol.errors import NeedData
from discoproxy.proxy.addresses import format_addr, literal_family, proxy_v2_header
from discoproxy.proxy.stats import FAST_BUCKETS, Histogram
from discoproxy.status import (
    CHECK_PROTOCOL,
    check_name,
    failure_reason,
    online_players,
    read_status_document,
    rewritten_host,
)

if TYPE_CHECKING:
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.routing import Route, RoutingTable

# The scheduler wakes at most this often: checks due within it start together.
TICK_S = 0.01
# Checks running at once, whatever the number of backends.
MAX_CHECKS_IN_FLIGHT = 64
# Bytes a check reads at most: a status answer with a favicon, or a status line.
MAX_ANSWER_BYTES = 256 * 1024

# strategies that read every check's numbers (the others hear only of changes)
NUMBER_STRATEGIES = frozenset({Balance.LOWEST_LATENCY, Balance.FEWEST_PLAYERS})

Key = tuple[str, tuple[tuple[str, int], ...], tuple[str, int]]  # route id, its list, one
# one check's verdict as the pools take it: route, address, check, ok, streak, reason, rtt,
# players (``_apply``, ``verdicts``)
Verdict = tuple["Route", tuple[str, int], HealthCheck, bool, int, str, float | None, int | None]


# A status exchange's ping and pong (serverbound and clientbound: the same id).
PING_PACKET_ID = 0x01


class CheckFailed(Exception):
    """A check that reached the backend and got the wrong answer."""


@dataclass(slots=True)
class _Target:
    route: Route
    address: tuple[str, int]
    check: HealthCheck
    last_ok: bool | None = None
    streak: int = 0
    # as the pools hold it by rise and fall (a new target starts up, as a pool's
    # backend does), and the last failure that took it down: a worker started again
    # must hear a backend passing again but short of ``rise`` as still down
    down: bool = False
    downed_by: str = ""
    running: bool = False
    reported: str = ""  # the last detail the pool was told ("ok" or why not)
    # the last check's result, for /api/routes (the pool hears of it only on a change,
    # unless its strategy reads the numbers): "ok" or why not, round trip, players
    detail: str = ""
    rtt: float | None = None
    players: int | None = None


def _spread(key: Key, interval: float) -> float:
    """A stable offset in [0, interval) for ``key``: first checks do not bunch."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * interval


@owned_by(LOOP)
class HealthChecker:
    """Checks every backend of every route that asks for it; tells the pools."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._targets: dict[Key, _Target] = {}
        self._heap: list[tuple[float, Key]] = []  # (due, target)
        self._wake: asyncio.Future[None] | None = None  # the scheduler's sleep
        self._sleep_until = 0.0  # when the scheduler wakes next (a sooner due wakes it)
        self.checks = 0  # checks done, for tests and the benchmark
        # check durations by (route, "passed" | "failed"): discoproxy_health_check_seconds
        self.durations: dict[tuple[str, str], Histogram] = {}

    def table_changed(self, table: RoutingTable) -> None:
        """Follow the table: new backends get a first check soon, gone ones none."""
        now = time.monotonic()
        wanted: dict[Key, _Target] = {}
        # a backend whose route's list changed (a replica came or went) is a new target
        # that keeps its results: the pools share its Backend, and its state with it
        known = {(key[0], key[2]): target for key, target in self._targets.items()}
        for route, check in _checked_routes(table):
            for address in dict.fromkeys(route.addresses):
                key = (route.qualified_id, route.addresses, address)
                target = self._targets.get(key)
                if target is None:
                    before = known.get((route.qualified_id, address))
                    target = (
                        _Target(route, address, check)
                        if before is None
                        else dataclasses.replace(before, route=route, check=check, running=False)
                    )
                    heapq.heappush(self._heap, (now + _spread(key, check.interval), key))
                else:
                    target.route, target.check = route, check
                wanted[key] = target
        self._targets = wanted
        if self.durations:  # routes gone take their histograms
            live = table.by_id
            self.durations = {k: h for k, h in self.durations.items() if k[0] in live}
        if len(self._heap) > 4 * len(wanted) + 64:  # drop what gone targets left behind
            self._heap = [item for item in self._heap if item[1] in wanted]
            heapq.heapify(self._heap)
        if self._wake is not None:
            _resolve(self._wake)

    async def run(self) -> None:
        # plain asyncio inside: per check, an anyio task, cancel scope and limiter cost
        # more than the check (bench/health_checks.py)
        loop = asyncio.get_running_loop()
        limiter = asyncio.Semaphore(MAX_CHECKS_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                now = time.monotonic()
                heap = self._heap
                while heap and heap[0][0] <= now + TICK_S / 2:
                    _, key = heapq.heappop(heap)
                    target = self._targets.get(key)
                    if target is None or target.running:
                        continue  # gone, or its last check is still out
                    target.running = True
                    task = loop.create_task(self._check(key, target, limiter))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                # sleep until the next due check, at least TICK_S: checks due meanwhile
                # go together (a check runs at most TICK_S late), one wake per tick
                self._sleep_until = max(heap[0][0] if heap else now + 3600.0, now + TICK_S)
                wake = self._wake = loop.create_future()
                timer = loop.call_at(loop.time() + (self._sleep_until - now), _resolve, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                with anyio.CancelScope(shield=True):
                    await asyncio.wait(tasks)

    async def _check(self, key: Key, target: _Target, limiter: asyncio.Semaphore) -> None:
        check, route = target.check, target.route
        status = self.ctx.status
        players: int | None
        protocol = (
            status.check_protocol(route, CHECK_PROTOCOL)
            if check.type is CheckKind.MINECRAFT
            else CHECK_PROTOCOL
        )
        async with limiter:
            started = time.monotonic()
            try:
                async with asyncio.timeout(check.timeout):
                    document = await probe(check, route, *target.address, protocol)
                players = online_players(document)
                if document is not None and key in self._targets:
                    # a minecraft check's answer is a status answer too: one the status
                    # service cannot use fails the check (never this loop)
                    status.offer(route, protocol, check_name(route, target.address[0]), document)
                ok, detail = True, "ok"
            except TimeoutError:
                ok, detail, players = False, f"no answer within {check.timeout:g}s", None
            except Exception as exc:  # any failure of a check is the backend's verdict
                ok, detail, players = False, _reason(exc), None
            rtt = time.monotonic() - started
        self.checks += 1
        self._observe(route.qualified_id, ok, rtt)
        target.running = False
        target.streak = target.streak + 1 if target.last_ok is ok else 1
        target.last_ok = ok
        if key not in self._targets:
            return
        target.detail = detail
        if ok and target.down and target.streak >= check.rise:
            target.down = False
        elif not ok and not target.down and target.streak >= check.fall:
            target.down, target.downed_by = True, detail
        if ok:
            target.rtt = rtt
            target.players = target.players if players is None else players
        due = started + check.interval
        heapq.heappush(self._heap, (due, key))
        if due < self._sleep_until:
            _resolve(self._wake)
        # the reactor hears what can change a pool: a new verdict or reason, a streak
        # reaching rise or fall, or the numbers lowest_latency and fewest_players use
        wants_numbers = target.route.server.balance in NUMBER_STRATEGIES
        if not (
            wants_numbers or detail != target.reported or target.streak in (check.rise, check.fall)
        ):
            return
        target.reported = detail
        verdict = (
            target.route,
            target.address,
            check,
            ok,
            target.streak,
            detail,
            rtt if ok else None,
            players,
        )
        with contextlib.suppress(RuntimeError):  # the reactor stopped
            self.ctx.planes.call(_apply, *verdict)  # every worker's pools, with workers

    def latest(self, route: Route) -> dict[tuple[str, int], tuple[str, float | None, int | None]]:
        """The last check of each backend of ``route``'s pool: (detail, rtt, players)."""
        out = {}
        for address in route.addresses:
            target = self._targets.get((route.qualified_id, route.addresses, address))
            if target is not None and target.detail:
                out[address] = (target.detail, target.rtt, target.players)
        return out

    def _observe(self, route_id: str, ok: bool, seconds: float) -> None:
        key = (route_id, "passed" if ok else "failed")
        histogram = self.durations.get(key)
        if histogram is None:
            histogram = self.durations[key] = Histogram(FAST_BUCKETS)
        histogram.observe(seconds)

    def verdicts(self) -> list[Verdict]:
        """Each checked backend's verdict in force, as ``_apply`` takes one (route,
        address, check, ok, streak, reason, rtt, players), in order: the pools hear of
        changes only, so a data plane that starts later (a worker started again) is told
        these. A pool takes a backend as down from a failed streak of ``fall`` or more and
        up again from a passing one of ``rise``: one held down and passing again, short of
        ``rise``, is told as the failed streak that took it down, then its passes."""
        verdicts: list[Verdict] = []
        for t in self._targets.values():
            if not t.detail:  # not checked since it became a target
                continue
            if t.down:  # passing again or failing anew, short of rise: still down
                verdict = (t.route, t.address, t.check, False, t.check.fall, t.downed_by)
                verdicts.append((*verdict, None, None))
            rtt, players = (t.rtt, t.players) if t.last_ok else (None, None)
            verdict = (t.route, t.address, t.check, bool(t.last_ok), t.streak, t.detail)
            verdicts.append((*verdict, rtt, players))
        return verdicts


def _checked_routes(table: RoutingTable) -> Iterator[tuple[Route, HealthCheck]]:
    """Each pool to check and how. A TCP port route to another port than the server's
    own is a pool of its own (proxy/balance.py keys pools by their addresses), checked by
    a tcp connect with the same timings: the server's minecraft, tls or http check speaks
    its main protocol, not whatever that port serves (RCON, a map's web page). UDP port
    routes have passive health only."""
    for route in table.by_id.values():
        check = route.server.health_check
        if check is not None and not route.server.sleeping:
            yield route, check
    for (protocol, _), port_route in table.ports.items():
        check = port_route.server.health_check
        if check is None or port_route.server.sleeping or protocol != "tcp":
            continue
        main = table.by_id.get(port_route.qualified_id)
        if main is not None and main.addresses == port_route.addresses:
            continue  # the server's own port: the same pool, checked above
        if check.type is not CheckKind.TCP:
            check = check.model_copy(update={"type": CheckKind.TCP})
        yield port_route, check


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


@on_reactor
def _apply(
    ctx: ProxyContext,
    route: Route,
    address: tuple[str, int],
    check: HealthCheck,
    ok: bool,
    streak: int,
    detail: str,
    rtt: float | None,
    players: int | None,
) -> None:
    """One check's verdict, on the reactor: the pool takes it; a transition is logged."""
    pool = ctx.pools.get(route)
    backend_state = pool.by_address.get(address)
    was_down = backend_state is not None and backend_state.down  # (failed dials may have said so)
    changed = pool.checked(address, ok, check.rise, check.fall, streak, detail, rtt, players)
    if changed is None or not ctx.speaks_for_all:  # workers: worker 0 logs it, once
        return
    if backend_state is not None and changed is was_down:  # counted once (every worker applies
        if changed:  # the verdict), and not again when the dials had it down already
            backend_state.went_up += 1
        else:
            backend_state.went_down += 1
    log = logger.bind(route=route.qualified_id)
    backend = format_addr(address)
    if changed:
        log.warning("backend {} of {} up: {} checks passed", backend, route.qualified_id, streak)
        reason = f"{streak} checks passed"
    else:
        log.warning(
            "backend {} of {} down: {} checks failed: {}",
            backend,
            route.qualified_id,
            streak,
            detail,
        )
        reason = f"{streak} checks failed: {detail}"
    event = {"route": route.qualified_id, "backend": backend, "reason": reason}
    ctx.events.put("backend_up" if changed else "backend_down", event)


async def probe(
    check: HealthCheck, route: Route, host: str, port: int, protocol: int = CHECK_PROTOCOL
) -> dict[str, Any] | None:
    """One check of ``host:port``; raises when it fails. A minecraft check announces
    ``protocol`` and returns the backend's status document."""
    kind = check.type
    if kind is CheckKind.TCP and not route.send_proxy_protocol:
        family = literal_family(host)
        if family is not None:  # the common check at scale: a bare non-blocking connect
            await _connect_only(family, host, port)
            return None
    name = check_name(route, host)
    sock = await anyio.connect_tcp(host, port)
    async with sock:
        header = b""
        if route.send_proxy_protocol:  # our own address as the client's, as status does
            local = sock.extra(anyio.abc.SocketAttribute.local_address)
            own = (str(local[0]), int(local[1]))
            header = proxy_v2_header((own, own))
        if kind is CheckKind.TCP:
            if header:  # a backend that wants the header may count a silent close
                await sock.send(header)
            return None
        if kind is CheckKind.TLS:  # the header first, as a player's connection has it
            if header:
                await sock.send(header)
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            tls = await TLSStream.wrap(sock, server_side=False, hostname=name, ssl_context=context)
            await tls.aclose()
            return None
        if kind is CheckKind.HTTP:
            request = (
                f"GET {check.http_path} HTTP/1.1\r\nHost: {name}\r\n"
                "User-Agent: discoproxy-check\r\nConnection: close\r\n\r\n"
            )
            await sock.send(header + request.encode())
            line = await _read_until(sock, b"\r\n")
            parts = line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise CheckFailed(f"not an HTTP answer: {line[:40]!r}")
            if int(parts[1]) != check.http_status:
                raise CheckFailed(f"HTTP {int(parts[1])}, expected {check.http_status}")
            return None
        sent = rewritten_host(route.server, host, name)  # what a player's ping sends
        handshake = minecraft.encode_handshake(protocol, sent, port, minecraft.NEXT_STATE_STATUS)
        await sock.send(header + handshake + minecraft.encode_packet(0x00, b""))
        document = await read_status_document(sock)
        # the whole server-list ping, as a client makes it: the ping, and its pong
        token = os.urandom(8)  # a Long, as a client sends its clock
        await sock.send(minecraft.encode_packet(PING_PACKET_ID, token))
        buffer = bytearray()
        while isinstance(pong := minecraft.parse_packet(buffer, max_bytes=64), NeedData):
            buffer += await sock.receive(64)
        if pong.packet_id != PING_PACKET_ID or pong.payload != token:
            raise CheckFailed(f"answered the ping with packet 0x{pong.packet_id:02x}, not its pong")
        return document


async def _connect_only(family: socket.AddressFamily, host: str, port: int) -> None:
    """Connect and close: anyio's connect_tcp resolves even a literal in a worker thread
    and races address families, several times the cost of the check itself."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
    finally:
        sock.close()


async def _read_until(stream: anyio.abc.ByteStream, end: bytes) -> bytes:
    buffer = b""
    while end not in buffer:
        if len(buffer) > MAX_ANSWER_BYTES:
            raise CheckFailed("answer too long")
        buffer += await stream.receive()
    return buffer.split(end, 1)[0]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, anyio.EndOfStream):
        return "closed without answering"
    if isinstance(exc, OSError) and not exc.errno and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # anyio's "all connection attempts failed": the last attempt's
    if isinstance(exc, OSError) and exc.errno:  # "connection refused", not asyncio's
        return os.strerror(exc.errno).lower()  # "connect call failed ('10.0.0.5', 25565)"
    return failure_reason(exc).lower()
