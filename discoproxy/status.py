"""Server-list status: a cache per server and client protocol, MOTDs per state.

Rules for this file:
- discoproxy answers every status ping for a routed server itself. A fresh cache entry
  is served by the reactor thread without leaving it (:meth:`StatusService.cached`); a
  miss goes to the asyncio loop (:meth:`StatusService.answer`), where at most one ping per
  key (server, client protocol) is asked of the backend and every other ping waits for
  it; pings for one server's different protocols go to it one after the other.
- Entries are immutable and only the asyncio side writes the dict; the reactor thread
  only reads it (a dict get or set is atomic under the GIL).
- A failed refresh serves the last answer, marked stale, for ``status_stale_for`` past
  its TTL; after that the server is ``unreachable``. A stopped ``auto_start`` server is
  ``sleeping``, one being woken is ``starting`` (see :mod:`discoproxy.wake`).
- Keys are bounded (:data:`MAX_PROTOCOLS_PER_SERVER`, :data:`MAX_ENTRIES`): the client
  picks the protocol number, and must not be able to turn pings into backend pings.
- Per-server state follows the routing table (:meth:`StatusService.table_changed`, a
  registry listener on the loop): a route that leaves takes its entries and maps with it,
  and a ping still in flight for it stores nothing, so container churn does not grow them.
- MOTD text and version names may carry ``{server}`` (display name) and ``{domain}``
  (the name the player used).
- A backend's document is checked once, when it arrives (:func:`parse_status_document`:
  strict JSON, an object, at most :data:`MAX_DOCUMENT_DEPTH` deep) and rendered inside
  the fetch: a document refused or not renderable is a failed fetch (:class:`StatusError`),
  so the stale answer or the unreachable MOTD is served, never an internal error.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from loguru import logger

from discoproxy.model import DOMAIN_REWRITE_BACKEND, ServerDefinition
from discoproxy.motd import Motd, render_status
from discoproxy.owners import LOOP, any_thread, on_reactor, owned_by
from discoproxy.protocol import minecraft
from discoproxy.protocol.errors import NeedData, ProtocolError
from discoproxy.proxy.addresses import proxy_v2_header
from discoproxy.singleflight import SingleFlight

if TYPE_CHECKING:
    from discoproxy.config import ProxyConfig
    from discoproxy.proxy.addresses import Proxied
    from discoproxy.routing import Route, RoutingTable
    from discoproxy.wake import Waker

# The protocol a minecraft health check (and auto_stop's count) announces (1.20.4);
# servers answer any.
CHECK_PROTOCOL = 765
# The protocol announced when pinging a backend for a pre-1.7 (legacy) client: 1.8's,
# which every server since answers (mcstatus uses it by default).
LEGACY_PING_PROTOCOL = 47
# A status answer larger than this is refused (favicon included: ~6 KiB base64 for a
# 64x64 PNG; modded servers list mods in it, still far below).
MAX_STATUS_BYTES = 256 * 1024
READ_BYTES = 16 * 1024
# The client chooses the protocol number it announces, so the keys are bounded: a client
# cycling through numbers must not turn each ping into a backend ping (amplification) or
# grow the cache. Past this many protocols for one server, a new one is answered from
# that server's newest entry, rendered for it, without asking the backend.
MAX_PROTOCOLS_PER_SERVER = 32
# Entries overall; the oldest goes first.
MAX_ENTRIES = 4096
# Nesting of a backend's document (the top object is level 1; a vanilla answer's
# players.sample entries are level 4). Text components nest through "extra" and "with",
# two levels per step (a list, then an object), and a MOTD uses a few. Every walk of a
# document (rendering, colour downgrades, legacy flattening) recurses once per level, so
# an answer of nested brackets (256 KiB of them fit the cap) is refused here rather
# than reach the recursion limit in one of them.
MAX_DOCUMENT_DEPTH = 64


class StatusState(enum.StrEnum):
    """What a status answer says about its server (logged with each ping)."""

    ONLINE = "online"
    STALE = "stale"
    UNREACHABLE = "unreachable"
    STARTING = "starting"
    SLEEPING = "sleeping"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class _Entry:
    server: ServerDefinition  # the definition it was rendered for (a new one re-renders)
    document: dict[str, Any]  # the backend's own answer
    fetched: float  # StatusService.clock()
    rendered: str  # document patched with the server's online MOTD, as JSON
    packet: bytes  # rendered, framed as a Status Response
    per_domain: bool  # the online MOTD names {domain}: rendered again for each ping
    protocol: int  # the client protocol it was asked for


class StatusError(Exception):
    """Raised when a backend's status answer cannot be had (refused, timed out, garbage)."""


def display_name(server: ServerDefinition) -> str:
    return server.name or server.id


def fill(motd: Motd, server: str, domain: str) -> Motd:
    """``motd`` with ``{server}`` and ``{domain}`` replaced in its texts."""
    updates: dict[str, str] = {}
    for field in ("text", "version_name"):
        value = getattr(motd, field)
        if value and "{" in value:
            if field == "text" and value.lstrip()[:1] in ("{", "["):  # JSON: escape
                server_text, domain_text = json.dumps(server)[1:-1], json.dumps(domain)[1:-1]
            else:
                server_text, domain_text = server, domain
            updates[field] = value.replace("{server}", server_text).replace("{domain}", domain_text)
    return motd.model_copy(update=updates) if updates else motd


def merge(base: Motd, override: Motd | None) -> Motd:
    """``base`` with every field ``override`` sets."""
    if override is None:
        return base
    values = override.model_dump(exclude_none=True)
    return base.model_copy(update=values) if values else base


def render_online(
    server: ServerDefinition, document: Mapping[str, Any], protocol: int, domain: str
) -> str:
    """The backend's status ``document`` patched with the server's ``[motds.online]``."""
    online = server.motds.online
    patch = fill(online, display_name(server), domain) if online else None
    return render_status(document, patch, protocol)


def rewritten_host(server: ServerDefinition, dialed_host: str, sent: str) -> str:
    """The host the backend sees in the handshake (``domain_rewrite``)."""
    rewrite = server.domain_rewrite
    if rewrite is None:
        return sent
    return dialed_host if rewrite == DOMAIN_REWRITE_BACKEND else rewrite


@owned_by(LOOP)
class StatusService:
    """The status cache and the backend pings that fill it."""

    def __init__(
        self,
        config: ProxyConfig,
        waker: Waker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.waker = waker
        self.clock = clock  # TTLs and staleness; tests pass a fake one
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._inflight: SingleFlight[tuple[str, int], _Entry | None] = SingleFlight()
        self._pinging: dict[str, asyncio.Lock] = {}  # per server: its backend ping
        self._protocols: dict[str, set[int]] = {}  # per server, the protocols in _entries
        self._newest: dict[str, _Entry] = {}  # per server, its newest entry
        self._gone: frozenset[str] = frozenset()  # left at the last table change
        self.hits = 0  # answered from the cache on the loop (answer)
        self.reactor_hits = 0  # written on the reactor thread only (cached)
        self.misses = 0
        self.stale = 0

    @any_thread
    def ttl(self, server: ServerDefinition) -> float:
        ttl = server.status_cache_ttl
        return self.config.status_cache_ttl if ttl is None else ttl

    # -- reactor thread -----------------------------------------------------------------

    @on_reactor
    def cached(self, route: Route, protocol: int, domain: str) -> bytes | None:
        """A fresh answer's Status Response packet, or None (then call :meth:`answer`)."""
        entry = self._entries.get((route.qualified_id, protocol))
        if entry is None:
            return None
        server = route.server
        if entry.server is not server and entry.server != server:
            return None
        if server.sleeping or self.clock() - entry.fetched >= self.ttl(server):
            return None
        self.reactor_hits += 1  # its own counter: hits is the loop's
        if entry.per_domain:
            return minecraft.encode_status_response(self._render(entry, protocol, domain))
        return entry.packet

    @any_thread
    @staticmethod
    def _render(entry: _Entry, protocol: int, domain: str) -> str:
        """The entry's answer for a ping that used ``domain`` (one too long to send
        with that domain in it, as the protocol's strings are capped: the answer as it
        was fetched, with the domain it was asked for)."""
        if not entry.per_domain:
            return entry.rendered
        text = render_online(entry.server, entry.document, protocol, domain)
        return text if len(text) <= minecraft.MAX_STRING_CHARS else entry.rendered

    # -- asyncio loop -------------------------------------------------------------------

    def table_changed(self, table: RoutingTable) -> None:
        """Forget the servers gone from ``table``; a ping in flight for one stores nothing
        and drops its server's lock when it ends."""
        live = table.by_id
        held = {qid for qid, _ in (*self._entries, *self._inflight.keys())}
        held.update(self._protocols, self._newest, self._pinging)
        gone = self._gone = frozenset(qid for qid in held if qid not in live)
        if not gone:
            return
        # a new dict, swapped in: the reactor thread reads the old one meanwhile
        self._entries = {key: e for key, e in self._entries.items() if key[0] not in gone}
        for qid in gone:
            self._protocols.pop(qid, None)
            self._newest.pop(qid, None)
            lock = self._pinging.get(qid)
            if lock is not None and not lock.locked():
                del self._pinging[qid]

    async def answer(
        self,
        route: Route,
        protocol: int,
        domain: str,
        port: int,
        client: Proxied | None,
        order: tuple[tuple[str, int], ...] | None = None,
    ) -> tuple[str, StatusState]:
        """The status document (JSON) to show for ``route`` and why. ``order``: the
        backends to ask, as the route's pool orders them (empty: all down, ask none)."""
        server = route.server
        name = display_name(server)
        waker = self.waker
        starting = waker is not None and waker.is_starting(route.qualified_id)
        if server.sleeping:
            state = StatusState.STARTING if starting else StatusState.SLEEPING
            return self.synthesized(server, state, protocol, domain), state
        key = (route.qualified_id, protocol)
        entry = self._entries.get(key)
        ttl = self.ttl(server)
        now = self.clock()
        fresh_entry = entry is not None and now - entry.fetched < ttl
        if fresh_entry and entry is not None and (entry.server is server or entry.server == server):
            self.hits += 1
            return self._render(entry, protocol, domain), StatusState.ONLINE
        known = self._protocols.get(route.qualified_id, ())
        newest = self._newest.get(route.qualified_id)
        if (
            protocol not in known
            and len(known) >= MAX_PROTOCOLS_PER_SERVER
            and newest is not None
            and (newest.server is server or newest.server == server)
            and now - newest.fetched < ttl
        ):
            self.hits += 1
            text = render_online(server, newest.document, protocol, domain)
            if len(text) > minecraft.MAX_STRING_CHARS:  # (see _render)
                text = newest.rendered
            return text, StatusState.ONLINE
        self.misses += 1
        addresses = route.addresses if order is None else order
        fresh = (
            await self._inflight.run(
                key, lambda: self._refresh(key, route, protocol, domain, port, client, addresses)
            )
            if addresses
            else None
        )
        if fresh is not None:
            if waker is not None:
                waker.answered(route.qualified_id)
            return self._render(fresh, protocol, domain), StatusState.ONLINE
        entry = self._entries.get(key)
        if (
            entry is not None
            and (entry.server is server or entry.server == server)
            and self.clock() - entry.fetched < ttl + self.config.status_stale_for
        ):
            self.stale += 1
            logger.bind(route=route.qualified_id).info(
                "status of {} served stale ({:.0f}s old): its backend does not answer",
                name,
                self.clock() - entry.fetched,
            )
            return self._render(entry, protocol, domain), StatusState.STALE
        state = StatusState.STARTING if starting else StatusState.UNREACHABLE
        return self.synthesized(server, state, protocol, domain), state

    async def shared_document(
        self,
        route: Route,
        protocol: int,
        domain: str,
        port: int,
        client: Proxied | None,
        addresses: tuple[tuple[str, int], ...],
    ) -> tuple[dict[str, Any], float]:
        """A worker's cache miss (workers = N): this cache's answer while fresh, else one
        ping for every worker that asks meanwhile (the same single flight); with its age
        in seconds, so the worker's cache keeps it fresh only as long as this one does.
        Raises :class:`StatusError` when the backend does not answer."""
        key = (route.qualified_id, protocol)
        entry = self._entries.get(key)
        server = route.server
        fresh_for = self.ttl(server)
        if (
            entry is not None
            and entry.server == server
            and self.clock() - entry.fetched < fresh_for
        ):
            return entry.document, self.clock() - entry.fetched
        fresh = await self._inflight.run(
            key, lambda: self._refresh(key, route, protocol, domain, port, client, addresses)
        )
        if fresh is None:
            raise StatusError("the backend did not answer (see the control plane's log)")
        return fresh.document, max(0.0, self.clock() - fresh.fetched)

    @any_thread
    def synthesized(
        self, server: ServerDefinition | None, state: StatusState, protocol: int, domain: str
    ) -> str:
        """An answer discoproxy makes up: unknown domain, unreachable, starting, sleeping."""
        motds = self.config.motds
        if server is None or state is StatusState.UNKNOWN:
            motd = motds.unknown_domain
            if motd.text is None:
                motd = motd.model_copy(update={"text": self.config.unknown_server_message})
            return render_status(None, fill(motd, "", domain or "(none)"), protocol)
        overrides = server.motds
        if state is StatusState.SLEEPING:
            motd = merge(motds.sleeping, overrides.sleeping)
        elif state is StatusState.STARTING:
            motd = merge(motds.starting, overrides.starting)
        else:
            motd = merge(motds.unreachable, overrides.unreachable)
        return render_status(None, fill(motd, display_name(server), domain), protocol)

    async def _refresh(
        self,
        key: tuple[str, int],
        route: Route,
        protocol: int,
        domain: str,
        port: int,
        client: Proxied | None,
        addresses: tuple[tuple[str, int], ...],
    ) -> _Entry | None:
        server = route.server
        qid = route.qualified_id
        lock = self._pinging.setdefault(qid, asyncio.Lock())
        try:
            async with lock:  # one ping per server at a time, whatever the protocol
                with anyio.fail_after(self.config.status_timeout):
                    document, age = await self._fetch(
                        route, protocol, domain, port, client, addresses
                    )
            # StatusError: a failed fetch
            entry = self._entry(server, document, protocol, domain, age)
        except (StatusError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self.config.status_timeout}s"
            logger.bind(route=route.qualified_id).info(
                "status ping to {} failed: {}", route.qualified_id, why
            )
            return None
        finally:
            if qid in self._gone:  # its route left meanwhile: keep nothing for it
                self._pinging.pop(qid, None)
        self._store(key, entry)
        return entry

    def _entry(
        self,
        server: ServerDefinition,
        document: dict[str, Any],
        protocol: int,
        domain: str,
        age: float = 0.0,
    ) -> _Entry:
        """The cache entry for a backend's ``document``; :class:`StatusError` when it
        cannot be rendered (or framed): then it is a failed fetch, not an answer."""
        online = server.motds.online
        try:
            rendered = render_online(server, document, protocol, domain)
            packet = minecraft.encode_status_response(rendered)
        except Exception as exc:  # motd.py renders whatever parses; this is the backstop
            raise StatusError(f"its status document cannot be rendered: {exc!r:.200}") from exc
        per_domain = online is not None and "{domain}" in f"{online.text}{online.version_name}"
        fetched = self.clock() - age  # age: how old the answer already was (workers)
        return _Entry(server, document, fetched, rendered, packet, per_domain, protocol)

    async def online_players(self, route: Route) -> int | None:
        """Players on ``route``'s backends by their own status answers, asked now (not
        the cache) and summed over a pool's backends: the players of every discoproxy
        instance in front of them. None when no backend answered."""
        total: int | None = None
        protocol = self.check_protocol(route, CHECK_PROTOCOL)
        for host, port in route.addresses:
            try:
                with anyio.fail_after(self.config.status_timeout):
                    document = await self._ping_one(
                        route, host, port, protocol, check_name(route, host), port, None
                    )
            except (OSError, TimeoutError, StatusError, ProtocolError, anyio.EndOfStream):
                continue
            online = online_players(document)
            if online is not None:
                total = (total or 0) + online
        return total

    def check_protocol(self, route: Route, default: int) -> int:
        """The protocol a minecraft health check of ``route`` should announce: that of
        the newest answer its players asked for, so the check refreshes what they see."""
        newest = self._newest.get(route.qualified_id)
        return default if newest is None else newest.protocol

    def offer(self, route: Route, protocol: int, domain: str, document: dict[str, Any]) -> None:
        """A minecraft health check's answer for ``route`` (asked with ``protocol`` and
        ``domain``): it becomes the cached answer for that protocol, so while checks run
        more often than the cache's TTL, pings never wait for the backend. Raises
        :class:`StatusError` for a document that cannot be rendered (nothing stored)."""
        if route.server.sleeping:
            return
        entry = self._entry(route.server, document, protocol, domain)
        self._store((route.qualified_id, protocol), entry)

    def _store(self, key: tuple[str, int], entry: _Entry) -> None:
        entries = self._entries
        qid, protocol = key
        if qid in self._gone:
            return  # its route left while the backend was asked
        if key not in entries:
            while len(entries) >= MAX_ENTRIES:
                old_qid, old_protocol = old = next(iter(entries))
                del entries[old]
                known = self._protocols.get(old_qid)
                if known is not None:
                    known.discard(old_protocol)
                    if not known:
                        del self._protocols[old_qid]
            known = self._protocols.setdefault(qid, set())
            if len(known) >= MAX_PROTOCOLS_PER_SERVER:
                self._newest[qid] = entry
                return
            known.add(protocol)
        else:
            del entries[key]  # re-inserted last: eviction order is age
        entries[key] = entry
        self._newest[qid] = entry

    async def _fetch(
        self,
        route: Route,
        protocol: int,
        domain: str,
        port: int,
        client: Proxied | None,
        addresses: tuple[tuple[str, int], ...],
    ) -> tuple[dict[str, Any], float]:
        """A status document for a cache miss and its age (0: asked just now); a worker
        asks the control plane's cache instead (``worker.SharedStatus``)."""
        return await self._ping_backend(route, protocol, domain, port, client, addresses), 0.0

    async def _ping_backend(
        self,
        route: Route,
        protocol: int,
        domain: str,
        port: int,
        client: Proxied | None,
        addresses: tuple[tuple[str, int], ...],
    ) -> dict[str, Any]:
        """Ask each address in turn for its status document; raise if none answers."""
        errors = []
        for host, backend_port in addresses:
            try:
                return await self._ping_one(
                    route, host, backend_port, protocol, domain, port, client
                )
            except (OSError, StatusError, ProtocolError, anyio.EndOfStream) as exc:
                errors.append(f"{host}:{backend_port}: {failure_reason(exc)}")
        raise StatusError("; ".join(errors) or "no address")

    async def _ping_one(
        self,
        route: Route,
        host: str,
        backend_port: int,
        protocol: int,
        domain: str,
        port: int,
        client: Proxied | None,
    ) -> dict[str, Any]:
        stream = await anyio.connect_tcp(host, backend_port)
        async with stream:
            header = b""
            if route.send_proxy_protocol:  # the pinging client's addresses, else our own
                if client is None:
                    local = stream.extra(anyio.abc.SocketAttribute.local_address)
                    client = ((str(local[0]), int(local[1])), (str(local[0]), int(local[1])))
                header = proxy_v2_header(client)
            name = rewritten_host(route.server, host, domain)
            status = minecraft.NEXT_STATE_STATUS
            handshake = minecraft.encode_handshake(protocol, name, port, status)
            await stream.send(header + handshake + minecraft.encode_packet(0x00, b""))
            return await read_status_document(stream)


def online_players(document: dict[str, Any] | None) -> int | None:
    """The online player count a status document gives, if it gives one."""
    players = document.get("players") if document is not None else None
    online = players.get("online") if isinstance(players, dict) else None
    return online if isinstance(online, int) and not isinstance(online, bool) else None


def check_name(route: Route, host: str) -> str:
    """The name a check presents: the route's first exact domain, else the host."""
    return next((d for d in route.server.domains if not d.startswith("*")), host)


async def read_status_document(stream: anyio.abc.ByteReceiveStream) -> dict[str, Any]:
    """Read a Status Response from ``stream`` (after a status request) and its JSON
    document; ``StatusError`` for any other packet."""
    buffer = bytearray()
    while True:
        packet = minecraft.parse_packet(buffer, max_bytes=MAX_STATUS_BYTES)
        if not isinstance(packet, NeedData):
            break
        buffer += await stream.receive(READ_BYTES)
    if packet.packet_id != minecraft.STATUS_RESPONSE_PACKET_ID:
        raise StatusError(f"answered packet 0x{packet.packet_id:02x}, not a status response")
    return parse_status_document(packet.payload)


def failure_reason(exc: BaseException) -> str:
    """Readable cause: anyio's connect_tcp hides each attempt's error in its cause."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        exc = cause.exceptions[0]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def parse_status_document(payload: bytes) -> dict[str, Any]:
    """The JSON document of a Status Response payload (a protocol String).

    Raises :class:`StatusError` for anything else: a bad string length, not UTF-8, not
    strict JSON (RFC 8259: no ``NaN``, ``Infinity`` or numbers a float cannot hold),
    not an object, or nested deeper than :data:`MAX_DOCUMENT_DEPTH`.
    """
    try:
        size = minecraft.read_varint(payload)
    except ProtocolError as exc:
        raise StatusError(f"status response string length: {exc}") from None
    if isinstance(size, NeedData):
        raise StatusError("empty status response")
    length, start = size
    if length < 0 or start + length != len(payload):
        raise StatusError("status response string length does not match the packet")
    try:
        document = json.loads(
            payload[start:].decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except RecursionError:  # json's own limit, far past ours
        raise StatusError(
            f"status response nests deeper than {MAX_DOCUMENT_DEPTH} levels"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, int digit limit, ours
        raise StatusError(f"status response is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise StatusError("status response is not a JSON object")
    if _deeper_than(document, MAX_DOCUMENT_DEPTH):
        raise StatusError(f"status response nests deeper than {MAX_DOCUMENT_DEPTH} levels")
    return document


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number (RFC 8259 §6)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _deeper_than(document: dict[str, Any], limit: int) -> bool:
    """Whether objects and arrays in ``document`` nest more than ``limit`` levels (the
    document itself is level 1). A loop, not recursion: the point is to stop those."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
