"""The admin listener: ``/metrics``, ``/api/*``, ``/healthz``, ``/readyz`` and the dashboard.

Rules for this file:
- It runs on the asyncio loop, apart from the data plane: HTTP/1.1 through h11 (sans-IO)
  over anyio streams, one request per connection, heads capped at 16 KiB, bodies at
  64 KiB, ``REQUEST_TIMEOUT_S`` per request and ``MAX_CLIENTS`` at once. A slow or broken
  admin client costs the proxy nothing.
- Numbers come from the reactor thread through ``Reactor.run`` (``metrics.take_snapshot``),
  never by reading its structures from this thread.
- With ``admin.token`` set, every endpoint but ``/healthz``, ``/readyz`` and the
  dashboard page itself (static; its API calls carry the token) wants
  ``Authorization: Bearer <token>``. Writes (``POST /api/reload``) also need
  ``admin.read_only = false``; the players' writes (``POST /api/bans``, ``/api/kick``)
  and the ``api`` provider's (``/api/servers``) need a token set as well.
- ``/healthz``: the process and its data plane are alive. ``/readyz``: listening, with
  every provider's first routes applied, and not shutting down.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.to_thread
import h11
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.stapled import MultiListener
from loguru import logger

from discoproxy.config import parse_bind
from discoproxy.guard import Ban, ban_target, edit_bans
from discoproxy.metrics import ProviderInfo, render
from discoproxy.owners import LOOP, owned_by
from discoproxy.provider import ConfigError, ProviderStatus, ServerStore, StoreUnavailable
from discoproxy.proxy.addresses import format_addr
from discoproxy.proxy.balance import BackendState
from discoproxy.proxy.listener import ListenError
from discoproxy.proxy.stats import Snapshot
from discoproxy.proxy.workers import process_usage
from discoproxy.status import display_name

if TYPE_CHECKING:
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.routing import Registry, Route, RoutingTable, SnapshotInbox

REQUEST_TIMEOUT_S = 10.0
MAX_CLIENTS = 64
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
# The dashboard's charts: one sample every HISTORY_INTERVAL_S, the last 10 minutes.
HISTORY_INTERVAL_S = 2.0
HISTORY_SAMPLES = 300
# /api/connections lists at most this many unless ?limit= asks for fewer (or more, ≤ max).
DEFAULT_CONNECTIONS = 500
MAX_CONNECTIONS_LISTED = 10_000
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/dashboard"})

Reload = Callable[[], Awaitable[str]]


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode() + b"\n")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


@owned_by(LOOP)
class Admin:
    """Everything the admin endpoints read, and the request router."""

    def __init__(
        self,
        ctx: ProxyContext,
        registry: Registry,
        *,
        token: str = "",
        read_only: bool = True,
        providers: Mapping[str, ProviderStatus] | None = None,
        inbox: SnapshotInbox | None = None,
        reload: Reload | None = None,
        store: ServerStore | None = None,
    ) -> None:
        self.ctx = ctx
        self.store = store  # the api provider, when it runs
        self.registry = registry
        self.token = token
        self.read_only = read_only
        self.providers = providers if providers is not None else {}
        self.inbox = inbox
        self.reload = reload
        self.ready = False  # set once listening with the first routes applied
        self.history: collections.deque[dict[str, float]] = collections.deque(
            maxlen=HISTORY_SAMPLES
        )
        self._dashboard: bytes | None = None

    # -- the numbers --------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self.ready and not self.ctx.closing and self.ctx.planes.ready

    async def snapshot(self, connections: int = 0) -> Snapshot:
        """The data plane's numbers: the one reactor's, or the sum over the workers."""
        return await self.ctx.planes.snapshot(connections)

    def provider_infos(self) -> list[ProviderInfo]:
        applied = self.inbox.applied if self.inbox is not None else {}
        snapshots = self.registry.snapshots
        infos = []
        for name, status in sorted(self.providers.items()):
            updates, last = applied.get(name, (0, None))
            infos.append(
                ProviderInfo(
                    name, status.state, len(snapshots.get(name, ())), updates, last, status.error
                )
            )
        return infos

    def route_rows(self, snap: Snapshot) -> list[dict[str, Any]]:
        table = self.registry.table
        totals = snap.route_totals()
        waker = self.ctx.waker
        empty = {"active": 0, "connections_total": 0, "bytes_up": 0, "bytes_down": 0}
        return [
            {
                **route_row(
                    table,
                    route,
                    waker.is_starting(route.qualified_id),
                    self._with_checks(route, snap.backends.get(route.qualified_id)),
                ),
                **totals.get(route.qualified_id, empty),
            }
            for route in table.routes
        ]

    def _with_checks(
        self, route: Route, backends: list[BackendState] | None
    ) -> list[BackendState] | None:
        """The pool's backends with the health checker's newest results: the pool hears
        of a check only when it changes something, the checker keeps every one."""
        latest = self.ctx.health.latest(route) if route.server.health_check else {}
        if not backends or not latest:
            return backends
        out = []
        for b in backends:
            found = latest.get(b.address)
            if found is not None:
                detail, rtt, players = found
                b = dataclasses.replace(b, last_check=detail, rtt=rtt, players=players)
            out.append(b)
        return out

    async def sample_history(self) -> None:
        """Append the totals every ``HISTORY_INTERVAL_S`` (the dashboard's charts)."""
        ctx = self.ctx
        while True:
            if ctx.planes.alive and not ctx.closing:
                totals = await ctx.planes.totals()
                self.history.append({"t": round(time.time(), 3), **totals})
            await anyio.sleep(HISTORY_INTERVAL_S)

    # -- requests -----------------------------------------------------------------------

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        if not self.token:
            return True
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        )

    def _write_refusal(self, method: str) -> Response | None:
        """Why a write is refused: it takes POST/PUT/DELETE, a token and read_only = false."""
        if method not in ("POST", "PUT", "DELETE"):
            return _error(405, f"{method} not allowed here; this endpoint is written to")
        if not self.token:
            return _error(403, "writes need admin.token set (a bearer token)")
        if self.read_only:
            return _error(403, "the admin API is read-only (admin.read_only = true)")
        return None

    async def _ban(self, body: bytes) -> Response:
        """``POST /api/bans {"target", "reason", "duration"}``: write the bans file (under
        its lock, as ``discoproxy ban add``) and apply it at once, ending what it matches."""
        try:
            request = json.loads(body or b"{}")
            target = str(request["target"])
            network, username = ban_target(target)
            duration = request.get("duration")
            if duration is not None and (not isinstance(duration, int | float) or duration <= 0):
                raise ValueError(f"duration: expected seconds > 0 or null, got {duration!r}")
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"expected {{'target': IP, CIDR or username, 'reason', "
                          f"'duration': seconds}}: {exc}")  # fmt: skip
        now = time.time()
        expires = now + duration if duration is not None else None
        ban = Ban(str(request.get("reason") or ""), now, expires, network, username)
        path = self.ctx.config.bans_file.absolute()
        try:
            written = await anyio.to_thread.run_sync(
                edit_bans, path, lambda kept, _removed: [*kept, ban], network, username
            )
        except (OSError, ValueError) as exc:
            return _error(409, f"bans not written: {exc}")
        ctx = self.ctx
        ended = await ctx.planes.apply_bans(written)
        logger.info("ban {} added through the admin API; ended {} connections", ban.target, ended)
        return _json({"target": ban.target, "expires": expires, "ended": ended})

    async def _kick(self, body: bytes) -> Response:
        try:
            target = str(json.loads(body or b"{}")["target"]).strip()
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"expected {{'target': a username or a connection id}}: {exc}")
        if not target:
            return _error(400, "target: empty")
        ctx = self.ctx
        ended = await ctx.planes.kick(target)
        logger.info("kick {} through the admin API: ended {} connections", target, ended)
        return _json({"target": target, "ended": ended})

    async def _servers(self, method: str, server_id: str, body: bytes) -> Response:
        """``/api/servers``: GET lists the api provider's servers; ``PUT``/``DELETE
        /api/servers/{id}`` write them (a token and read_only = false)."""
        store = self.store
        if store is None:
            return _error(404, "the api provider is off ([providers.api] enabled)")
        if method in ("GET", "HEAD"):
            documents = store.server_documents()
            if server_id:
                if server_id not in documents:
                    return _error(404, f"no api server {server_id!r}")
                return _json({"id": server_id, "server": documents[server_id]})
            return _json(
                {"servers": [{"id": k, "server": v} for k, v in sorted(documents.items())]}
            )
        refusal = self._write_refusal(method)
        if refusal is not None:
            return refusal
        if not server_id:
            return _error(405, "PUT or DELETE /api/servers/{id}")
        if method == "DELETE":
            try:
                deleted = await store.delete_server(server_id)
            except StoreUnavailable as exc:
                return _error(503, str(exc))
            if not deleted:
                return _error(404, f"no api server {server_id!r}")
            return _json({"deleted": server_id})
        if method != "PUT":
            return _error(405, "use PUT to store a server, DELETE to remove it")
        try:
            document = json.loads(body or b"")
        except ValueError as exc:
            return _error(400, f"api servers/{server_id}: the body is not JSON: {exc}")
        if not isinstance(document, dict):
            return _error(
                400, f"api servers/{server_id}: expected a JSON object (a server file's keys)"
            )
        try:
            server, warnings = await store.put_server(server_id, document)
        except ConfigError as exc:
            return _error(400, str(exc))
        except StoreUnavailable as exc:
            return _error(503, str(exc))
        return _json({"id": server.id, "domains": list(server.domains), "warnings": warnings})

    async def respond(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Response:
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        if path not in OPEN_PATHS and not self._authorized(headers):
            return Response(
                401,
                b'{"error":"missing or wrong bearer token"}\n',
                headers=(("www-authenticate", 'Bearer realm="discoproxy"'),),
            )
        if path == "/api/reload":
            if method != "POST":
                return _error(405, "use POST")
            if self.read_only or self.reload is None:
                return _error(403, "the admin API is read-only (admin.read_only = true)")
            return _json({"result": await self.reload()})
        if path == "/api/servers" or path.startswith("/api/servers/"):
            return await self._servers(method, path[len("/api/servers/") :], body)
        if path in ("/api/bans", "/api/kick"):
            refusal = self._write_refusal(method)
            if refusal is not None:
                return refusal
            return await (self._ban(body) if path == "/api/bans" else self._kick(body))
        if method not in ("GET", "HEAD"):
            return _error(405, f"{method} not allowed; the API is read with GET")
        if path == "/healthz":
            alive = self.ctx.planes.alive
            return Response(
                200 if alive else 503,
                b"ok\n" if alive else b"data plane stopped or stuck\n",
                "text/plain",
            )
        if path == "/readyz":
            ready = self.is_ready
            return Response(
                200 if ready else 503, b"ready\n" if ready else b"not ready\n", "text/plain"
            )
        if path in ("/", "/dashboard"):
            return Response(200, self.dashboard(), "text/html; charset=utf-8")
        if path == "/metrics":
            snap = await self.snapshot()
            snap.table_listener_errors = self.registry.listener_errors
            table, providers = self.registry.table, self.provider_infos()
            checks = self.ctx.health.durations  # the loop's, read on the loop
            hooks = self.ctx.webhooks.stats if self.ctx.webhooks is not None else None
            dropped = self.ctx.events.dropped
            states = self.ctx.workers.states() if self.ctx.workers is not None else ()
            body = render(snap, table, providers, self.is_ready, checks, hooks, dropped, states)
            return Response(200, body, "text/plain; version=0.0.4; charset=utf-8")
        if path == "/api/routes":
            snap = await self.snapshot()
            conflicts = [str(c) for c in self.registry.table.conflicts]
            return _json({"routes": self.route_rows(snap), "conflicts": conflicts})
        if path == "/api/connections":
            limit = _int_param(query, "limit", DEFAULT_CONNECTIONS, MAX_CONNECTIONS_LISTED)
            if limit is None:
                return _error(400, f"limit: expected an integer 1-{MAX_CONNECTIONS_LISTED}")
            snap = await self.snapshot(connections=limit + 1)
            listed = [asdict(c) for c in snap.connections]
            total = snap.totals()["active"]
            return _json(
                {"connections": listed[:limit], "total": total, "truncated": len(listed) > limit}
            )
        if path == "/api/workers":
            workers = self.ctx.workers
            if workers is None:  # this process is the one data plane
                alive, pid = self.ctx.planes.alive, os.getpid()
                rss, cpu = process_usage(pid)
                listed = [
                    {
                        "index": 0,
                        "pid": pid,
                        "ready": alive,
                        "restarts": 0,
                        "rss_bytes": rss,
                        "cpu_s": cpu,
                    }
                ]
            else:
                listed = workers.states()
            return _json({"workers": listed})
        if path == "/api/providers":
            return _json({"providers": [asdict(info) for info in self.provider_infos()]})
        if path == "/api/history":
            return _json({"interval_s": HISTORY_INTERVAL_S, "samples": list(self.history)})
        return _error(404, f"no such endpoint: {path}")

    def dashboard(self) -> bytes:
        if self._dashboard is None:
            self._dashboard = files("discoproxy.admin").joinpath("dashboard.html").read_bytes()
        return self._dashboard

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            response: Response | None = None
            with anyio.move_on_after(REQUEST_TIMEOUT_S):
                try:
                    received = await _read_request(conn, stream)
                    if received is None:
                        return
                    request, body = received
                    headers = {
                        name.decode("latin-1").lower(): value.decode("latin-1")
                        for name, value in request.headers
                    }
                    method = request.method.decode("ascii", "replace")
                    target = request.target.decode("ascii", "replace")
                    response = await self.respond(method, target, headers, body)
                    if method == "HEAD":
                        response.body, length = b"", len(response.body)
                    else:
                        length = len(response.body)
                except h11.RemoteProtocolError as exc:  # h11 still lets us answer it
                    response = _error(exc.error_status_hint, f"bad request: {exc}")
                    length = len(response.body)
                except anyio.EndOfStream:
                    return
                except Exception as exc:  # an endpoint's bug answers 500, not a dead listener
                    logger.exception("admin request failed: {!r}", exc)
                    response = _error(500, "internal error (see the proxy's log)")
                    length = len(response.body)
                await _send(conn, stream, response, length)


async def _read_request(
    conn: h11.Connection, stream: SocketStream
) -> tuple[h11.Request, bytes] | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError("request body too large", 413)
        elif isinstance(event, h11.EndOfMessage):
            return (request, bytes(body)) if request is not None else None
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(
    conn: h11.Connection, stream: SocketStream, response: Response, length: int
) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(length)),
        ("cache-control", "no-store"),
        ("connection", "close"),
        *response.headers,
    ]
    try:
        await stream.send(conn.send(h11.Response(status_code=response.status, headers=headers)))
        if response.body:
            await stream.send(conn.send(h11.Data(data=response.body)))
        await stream.send(conn.send(h11.EndOfMessage()))
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, h11.LocalProtocolError):
        pass


def _int_param(query: Mapping[str, list[str]], name: str, default: int, most: int) -> int | None:
    values = query.get(name)
    if not values:
        return default
    text = values[-1]
    if not text.isdigit() or not 1 <= int(text) <= most:
        return None
    return int(text)


def route_row(
    table: RoutingTable,
    route: Route,
    starting: bool = False,
    backends: list[BackendState] | None = None,
    *,
    live: bool = True,
) -> dict[str, Any]:
    """One route as ``/api/routes`` (and ``routes --offline``) shows it, live numbers
    aside. ``backends``: its pool's live state; None: no connection used it yet (every
    backend "up", nothing known against it) or offline ("unknown")."""
    sleeping = "sleeping" if route.server.sleeping else "running"
    state = "starting" if starting else sleeping
    pool = [
        {
            "address": format_addr(b.address),
            "weight": b.weight,
            "state": b.state,
            "active": b.active,
            "failures": b.failures,
            "dial_failures": b.dial_failures,
            "last_error": b.last_error,
            "last_check": b.last_check,
            "check_rtt_ms": None if b.rtt is None else round(b.rtt * 1000, 3),
            "players": b.players,
        }
        for b in backends or ()
    ] or [
        {
            "address": format_addr(address),
            "weight": weight,
            "state": "up" if live else "unknown",
            "active": 0,
            "failures": 0,
            "dial_failures": 0,
            "last_error": "",
            "last_check": "",
            "check_rtt_ms": None,
            "players": None,
        }
        for address, weight in zip(route.addresses, route.weights, strict=True)
    ]
    listed = {b["address"] for b in pool}
    for held in route.server.held_back:  # replicas the provider keeps out for now
        if held.address in listed:  # still draining its connections: listed so
            continue
        pool.append(
            {
                "address": held.address,
                "weight": 0,
                "state": "starting" if held.health == "starting" else "down",
                "active": 0,
                "failures": 0,
                "dial_failures": 0,
                "last_error": "",
                "last_check": f"Docker HEALTHCHECK: {held.health}",
                "check_rtt_ms": None,
                "players": None,
            }
        )
    if state == "running" and pool:
        # draining and starting backends take no new connection: they do not count
        down = sum(1 for b in pool if b["state"] == "down")
        # up, or drained (weight 0) while nothing else is up: those still serve
        up = sum(1 for b in pool if b["state"] == "up") or sum(
            1 for b in pool if b["state"] == "draining" and b["weight"] == 0
        )
        if not up and not down and any(b["state"] == "starting" for b in pool):
            state = "starting"  # every replica's HEALTHCHECK still starting
        else:
            state = "down" if down and not up else ("degraded" if down else state)
    return {
        "id": route.qualified_id,
        "provider": route.provider,
        "name": display_name(route.server),
        "domains": list(table.domains_of(route)),
        "default": table.default is route,
        "ports": [str(mapping) for mapping in route.server.ports],
        "backends": [format_addr(address) for address in route.addresses],
        "balance": route.server.balance.value,
        "pool": pool,
        "send_proxy_protocol": route.send_proxy_protocol,
        "state": state,
    }


async def serve_admin(
    admin: Admin,
    listen: str,
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoints on ``listen`` until cancelled; report the bound address.
    Raises :class:`ListenError` when ``listen`` cannot be opened."""
    host, port = parse_bind(listen)
    ctx = admin.ctx
    inherited = ctx.inherited.take("admin", listen) if ctx.inherited is not None else None
    listener: anyio.abc.Listener[SocketStream]
    try:
        if inherited is not None:  # a takeover: the old process's sockets
            listeners = [await anyio.abc.SocketListener.from_socket(g[0]) for g in inherited]
            listener = listeners[0] if len(listeners) == 1 else MultiListener(listeners)
        else:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        setting = (
            'admin.listen = "host:port" to listen elsewhere, or "" to turn the admin listener off'
        )
        raise ListenError(f"{listen} (admin)", port, setting, exc) from exc
    limiter = anyio.CapacityLimiter(MAX_CLIENTS)

    async def handle(stream: SocketStream) -> None:
        async with limiter:
            await admin.handle(stream)

    parts = listener.listeners if isinstance(listener, MultiListener) else [listener]
    ctx.admin_sockets = [part.extra(anyio.abc.SocketAttribute.raw_socket) for part in parts]
    bound = listener.extra(anyio.abc.SocketAttribute.local_address)
    address = (str(bound[0]), int(bound[1]))
    logger.info(
        "admin on http://{}:{}/ (metrics, API, dashboard){}",
        address[0] if ":" not in address[0] else f"[{address[0]}]",
        address[1],
        "" if admin.token else "; no token set",
    )
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(admin.sample_history)
        task_status.started(address)
        await listener.serve(handle)
