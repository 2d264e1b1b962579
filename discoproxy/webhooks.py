"""Events out: each ``[[webhooks]]`` receiver gets the events it asks for as JSON POSTs,
in order, off the data plane.

Rules for this file:
- It runs on the asyncio loop. Events arrive through the one outbox
  (:class:`discoproxy.proxy.planes.EventOutbox`): the reactor's (players, backends) and
  the loop's own (routes from the registry's table changes, wakes from the waker).
- Delivery never touches the data plane's latency and never grows memory: each receiver
  has a bounded queue (``queue``); a full queue drops the new event and counts it
  (``discoproxy_webhook_dropped_total{webhook}``). One sender per receiver posts its
  events one at a time (so in order), each with ``timeout``, retrying ``retries`` times
  with backoff (0.5 s, doubling, at most 30 s) on a connection error, a timeout or a 5xx;
  an event still not delivered is dropped and counted. A 4xx is the receiver's answer:
  not retried, counted as failed.
- Bodies: ``{"event": …, "time": ISO 8601 UTC, …the event's fields}``; with ``secret``,
  ``X-Discoproxy-Signature: sha256=<hex HMAC-SHA256 of the body>`` (as GitHub signs).
  ``X-Discoproxy-Event`` names the event. README "Webhooks" shows each event's body.
- HTTP/1.1 through h11 (already the admin listener's), one connection per POST: a
  handful of events a second does not need a client library's pool.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import hmac
import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
from anyio.abc import TaskStatus
from loguru import logger

from discoproxy.config import WebhookSettings
from discoproxy.owners import LOOP, owned_by
from discoproxy.proxy.planes import EventOutbox
from discoproxy.routing import Registry, RoutingTable

DRAIN_S = 0.05  # how often the outbox is emptied into the receivers' queues
_ROUTE_EVENTS = frozenset({"route_added", "route_removed"})
BACKOFF_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_RESPONSE_BYTES = 64 * 1024


@dataclass
class HookStats:
    delivered: int = 0
    failed: int = 0  # attempts that did not deliver (retried or not)
    dropped: int = 0  # events never delivered: queue full, or every attempt failed


class _Receiver:
    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.events = frozenset(settings.events)
        self.queue: collections.deque[tuple[str, bytes]] = collections.deque()  # (event, body)
        self.ready = anyio.Event()
        self.stats = HookStats()
        self.sender = anyio.CancelScope()  # its sender's: cancelled when a reload drops it

    def offer(self, event: str, body: bytes) -> None:
        if len(self.queue) >= self.settings.queue:
            self.stats.dropped += 1
            return
        self.queue.append((event, body))
        self.ready.set()


def wanted_events(hooks: Sequence[WebhookSettings]) -> frozenset[str]:
    """The events some receiver asks for: the only ones an outbox keeps."""
    return frozenset(event for hook in hooks for event in hook.events)


def body_of(event: str, stamp: float, data: Mapping[str, Any]) -> bytes:
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    when = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"event": event, "time": when, **data}, separators=(",", ":")).encode()


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@owned_by(LOOP)
class Webhooks:
    """The receivers, their queues and senders; fed from the outbox."""

    def __init__(
        self, hooks: Sequence[WebhookSettings], outbox: EventOutbox, registry: Registry
    ) -> None:
        self.receivers = [_Receiver(hook) for hook in hooks]
        self.outbox = outbox
        outbox.wanted = wanted_events(hooks)
        self._routes: dict[str, Any] | None = None  # qualified id → its row, last table
        self._registry = registry
        self._tg: anyio.abc.TaskGroup | None = None
        registry.add_listener(self._table_changed)
        self._table_changed(registry.table, announce=False)

    def reconfigure(self, hooks: Sequence[WebhookSettings]) -> None:
        """A reload's ``[[webhooks]]``: a receiver whose settings did not change keeps its
        queue and counters; one removed stops (its queued events dropped, counted until
        it is gone from /metrics with it); one added starts with the next event."""
        kept: dict[WebhookSettings, list[_Receiver]] = {}
        for receiver in self.receivers:
            kept.setdefault(receiver.settings, []).append(receiver)
        receivers = []
        added = 0
        for hook in hooks:
            same = kept.get(hook)
            if same:
                receivers.append(same.pop(0))
                continue
            receiver = _Receiver(hook)
            receivers.append(receiver)
            self._start(receiver)
            added += 1
        removed = [r for left in kept.values() for r in left]
        for gone in removed:
            gone.sender.cancel()
        self.receivers = receivers
        self.outbox.wanted = wanted_events(hooks)
        self._table_changed(self._registry.table, announce=False)
        logger.info(
            "webhooks: {} receivers ({} added, {} removed)", len(receivers), added, len(removed)
        )

    @property
    def stats(self) -> dict[str, HookStats]:
        return {r.settings.label: r.stats for r in self.receivers}

    def _table_changed(self, table: RoutingTable, announce: bool = True) -> None:
        if not self.outbox.wanted & _ROUTE_EVENTS:
            self._routes = None  # nobody asks: no row per route at each change
            return
        routes = {
            qid: {
                "route": qid,
                "domains": list(route.server.domains),
                "backends": [f"{h}:{p}" for h, p in route.addresses],
            }
            for qid, route in table.by_id.items()
        }
        previous = self._routes
        self._routes = routes
        if previous is None or not announce:
            return
        for qid in sorted(set(routes) - set(previous)):
            self.outbox.put("route_added", routes[qid])
        for qid in sorted(set(previous) - set(routes)):
            self.outbox.put("route_removed", previous[qid])

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for receiver in self.receivers:
                self._start(receiver)
            task_status.started()
            while True:
                self.dispatch()
                await anyio.sleep(DRAIN_S)

    def dispatch(self) -> None:
        """Move what the outbox holds to the receivers that asked for it."""
        for event, stamp, data in self.outbox.drain():
            body = b""
            for receiver in self.receivers:
                if event in receiver.events:
                    body = body or body_of(event, stamp, data)
                    receiver.offer(event, body)

    def _start(self, receiver: _Receiver) -> None:
        if self._tg is not None:  # else run() starts it
            self._tg.start_soon(self._send_until_removed, receiver)

    async def _send_until_removed(self, receiver: _Receiver) -> None:
        with receiver.sender:
            await self._send_all(receiver)

    async def _send_all(self, receiver: _Receiver) -> None:
        settings = receiver.settings
        while True:
            if not receiver.queue:
                receiver.ready = anyio.Event()
                await receiver.ready.wait()
                continue
            event, body = receiver.queue.popleft()
            delay = BACKOFF_S
            for attempt in range(settings.retries + 1):
                error = await self._deliver(settings, event, body)
                if error is None:
                    receiver.stats.delivered += 1
                    break
                receiver.stats.failed += 1
                final = attempt == settings.retries or error.startswith("HTTP 4")
                log = logger.warning if final else logger.debug
                log(
                    "webhook {}: {} ({}){}",
                    settings.label,
                    error,
                    event,
                    "; event dropped" if final else f"; retrying in {delay:g}s",
                )
                if final:
                    receiver.stats.dropped += 1
                    break
                await anyio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _deliver(self, settings: WebhookSettings, event: str, body: bytes) -> str | None:
        """One POST: None when delivered (2xx or 3xx), else why not."""
        try:
            with anyio.fail_after(settings.timeout):
                status = await post(settings, event, body)
        except TimeoutError:
            return f"timed out after {settings.timeout:g}s"
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream, h11.ProtocolError) as exc:
            return f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug or an odd answer: one failed attempt, not a dead sender
            logger.opt(exception=exc).error("webhook {}: delivery failed", settings.label)
            return f"{type(exc).__name__}: {exc}"
        return None if status < 400 else f"HTTP {status}"


async def post(settings: WebhookSettings, event: str, body: bytes) -> int:
    """POST *body* (an *event*'s) to the receiver; its status code."""
    url = urlsplit(settings.url)
    https = url.scheme == "https"
    host = url.hostname or ""
    port = url.port or (443 if https else 80)
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = [
        ("host", url.netloc),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("user-agent", "discoproxy-webhook"),
        ("x-discoproxy-event", event),
        ("connection", "close"),
    ]
    if settings.secret:
        headers.append(("x-discoproxy-signature", signature(settings.secret, body)))
    stream: anyio.abc.ByteStream
    if https:
        stream = await anyio.connect_tcp(host, port, ssl_context=ssl.create_default_context())
    else:
        stream = await anyio.connect_tcp(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="POST", target=target, headers=headers)
        await stream.send(conn.send(request) + conn.send(h11.Data(data=body)))
        await stream.send(conn.send(h11.EndOfMessage()))
        received = 0
        while True:
            incoming = conn.next_event()
            if incoming is h11.NEED_DATA:
                data = await stream.receive(65536)
                received += len(data)
                if received > MAX_RESPONSE_BYTES:
                    raise h11.RemoteProtocolError("response too large")
                conn.receive_data(data)
                continue
            if isinstance(incoming, h11.Response):
                return int(incoming.status_code)
            if isinstance(incoming, h11.ConnectionClosed):
                raise anyio.EndOfStream
