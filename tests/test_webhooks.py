"""Webhooks against a real HTTP receiver (a small h11 server here): each event POSTed as
documented, in order, signed; a receiver that is down, slow or answers 500 costs the
data plane nothing, is retried with backoff, and what it never takes is dropped and
counted, with memory bounded by the queue."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import h11
import pytest
from anyio.abc import SocketStream

from discoproxy.config import ProxyConfig
from discoproxy.webhooks import BACKOFF_S
from tests.proxy.helpers import (
    backend,
    handshake,
    keep_open,
    running_proxy,
    server,
    until_closed,
)

pytestmark = pytest.mark.anyio


@dataclass
class Receiver:
    port: int
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    answer: Callable[[int], int] = lambda n: 200  # status for the n-th request (from 0)
    delay: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?x=1"

    def events(self) -> list[str]:
        return [body["event"] for _, body in self.requests]


@contextlib.asynccontextmanager
async def receiver(**options: Any) -> AsyncIterator[Receiver]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    got = Receiver(port, **options)
    seen = 0

    async def handle(stream: SocketStream) -> None:
        nonlocal seen
        async with stream:
            conn = h11.Connection(h11.SERVER)
            headers: dict[str, str] = {}
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive())
                elif isinstance(event, h11.Request):
                    assert event.method == b"POST" and event.target == b"/hook?x=1"
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            n, seen = seen, seen + 1
            await anyio.sleep(got.delay)
            status = got.answer(n)
            if status < 400:
                got.requests.append((headers, json.loads(body)))
            await stream.send(conn.send(h11.Response(status_code=status, headers=[])))
            await stream.send(conn.send(h11.EndOfMessage()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield got
        tg.cancel_scope.cancel()


async def wait_for(condition: Callable[[], bool], within: float = 10) -> None:
    with anyio.fail_after(within):
        while not condition():
            await anyio.sleep(0.02)


async def test_a_players_session_and_the_routes_reach_the_receiver_in_order_signed() -> None:
    async with receiver() as hook, backend(keep_open) as info:
        hooks = [{"url": hook.url, "secret": "k3y"}]
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, webhooks=hooks) as proxy:
            stream = await proxy.connect()
            async with stream:
                await stream.send(handshake("a.example.com", username="Steve"))
                assert await stream.receive() == b"in"
                await wait_for(lambda: "player_connected" in hook.events())
            await wait_for(lambda: "player_disconnected" in hook.events())
            b = server("b", "b.example.com", addresses=["127.0.0.1:9"])
            proxy.registry.apply_snapshot("test", [*routes, b])
            await wait_for(lambda: "route_added" in hook.events())
            proxy.registry.apply_snapshot("test", routes)
            await wait_for(lambda: "route_removed" in hook.events())
    assert hook.events() == [
        "player_connected",
        "player_disconnected",
        "route_added",
        "route_removed",
    ]
    (headers, joined), (_, left), (_, added), (_, removed) = hook.requests
    assert headers["x-discoproxy-event"] == "player_connected"
    raw = json.dumps(joined, separators=(",", ":")).encode()
    expected = "sha256=" + hmac.new(b"k3y", raw, hashlib.sha256).hexdigest()
    assert headers["x-discoproxy-signature"] == expected
    assert joined["player"] == "Steve" and joined["route"] == "a@test"
    assert joined["uuid"] == "5627dd98-e6be-3c21-b8a8-e92344183641"  # offline UUID of Steve
    assert joined["backend"] == info.address and joined["time"].endswith("Z")
    assert left["player"] == "Steve" and left["bytes_down"] == 2 and "reason" in left
    assert added == {**added, "route": "b@test", "domains": ["b.example.com"]}
    assert removed["route"] == "b@test"


async def test_events_a_receiver_did_not_ask_for_are_not_sent() -> None:
    async with receiver() as hook, backend(keep_open) as info:
        hooks = [{"url": hook.url, "events": ["route_added"]}]
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, webhooks=hooks) as proxy:
            assert "player_connected" not in proxy.ctx.events.wanted
            stream = await proxy.connect()
            async with stream:
                await stream.send(handshake("a.example.com", username="Steve"))
                assert await stream.receive() == b"in"
            proxy.registry.apply_snapshot("test", [*routes, server("b", "b.x", addresses=["a:1"])])
            await wait_for(lambda: hook.events() == ["route_added"])


async def test_a_receiver_answering_500_is_retried_until_it_takes_the_event() -> None:
    async with receiver(answer=lambda n: 500 if n < 2 else 200) as hook:
        hooks = [{"url": hook.url, "events": ["route_added"]}]
        async with running_proxy([], webhooks=hooks) as proxy:
            proxy.registry.apply_snapshot("test", [server("b", "b.x", addresses=["a:1"])])
            await wait_for(lambda: hook.events() == ["route_added"])
            stats = proxy.ctx.webhooks.stats[f"127.0.0.1:{hook.port}"]  # type: ignore[union-attr]
            assert (stats.delivered, stats.failed, stats.dropped) == (1, 2, 0)


async def test_a_down_receiver_costs_the_data_plane_nothing_and_drops_are_counted() -> None:
    async with receiver() as hook:
        dead = hook.port
    hooks = [{"url": f"http://127.0.0.1:{dead}/hook", "retries": 1, "queue": 3}]
    async with backend(keep_open) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes, webhooks=hooks) as proxy:
            for n in range(12):  # players keep getting in while every delivery fails
                stream = await proxy.connect()
                async with stream:
                    await stream.send(handshake("a.example.com", username=f"p{n}"))
                    with anyio.fail_after(2):
                        assert await stream.receive() == b"in"
            webhooks = proxy.ctx.webhooks
            assert webhooks is not None
            (receiver_,) = webhooks.receivers
            assert len(receiver_.queue) <= 3  # bounded: the rest was dropped
            # every event accounted for: the queue's overflow and each failed delivery
            await wait_for(lambda: receiver_.stats.dropped == 24, within=20)
            assert receiver_.stats.delivered == 0 and receiver_.stats.failed >= 2


async def test_a_slow_receiver_times_out_and_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    async with receiver(delay=1.0) as hook:
        hooks = [{"url": hook.url, "events": ["route_added"], "timeout": 0.3, "retries": 1}]
        async with running_proxy([], webhooks=hooks) as proxy:
            proxy.registry.apply_snapshot("test", [server("b", "b.x", addresses=["a:1"])])
            webhooks = proxy.ctx.webhooks
            assert webhooks is not None
            (slow,) = webhooks.receivers
            await wait_for(lambda: slow.stats.dropped == 1, within=5 + BACKOFF_S)
            assert slow.stats.failed == 2 and slow.stats.delivered == 0


def test_webhook_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown event 'player_joined'"):
        ProxyConfig.model_validate(
            {"webhooks": [{"url": "http://h/", "events": ["player_joined"]}]}
        )
    with pytest.raises(ValueError, match="http:// or https://"):
        ProxyConfig.model_validate({"webhooks": [{"url": "h:80"}]})


async def test_backend_down_and_server_woken_reach_the_receiver() -> None:
    from tests.proxy.test_front_door import waking_proxy

    async with receiver() as hook, backend(keep_open) as info:
        async with running_proxy([], webhooks=[{"url": hook.url}]) as proxy:
            dead = "127.0.0.1:9"  # refuses: passive checks mark it down after FALL dials
            routes = [server("a", "a.example.com", addresses=[dead, info.address])]
            proxy.registry.apply_snapshot("test", routes)
            for _ in range(3):
                stream = await proxy.connect()
                async with stream:
                    await stream.send(handshake("a.example.com", username="Steve"))
                    assert await stream.receive() == b"in"
            await wait_for(lambda: "backend_down" in hook.events())
            (down,) = [body for _, body in hook.requests if body["event"] == "backend_down"]
            assert down["route"] == "a@test" and down["backend"] == dead
            assert "dials failed in a row" in down["reason"]
        async with waking_proxy(info.address, webhooks=[{"url": hook.url}]) as (proxy, _control):
            stream = await proxy.connect()
            async with stream:
                await stream.send(handshake("a.example.com", username="Steve"))
                await until_closed(stream)  # told it is starting
            await wait_for(lambda: "server_woken" in hook.events())
    (woken,) = [body for _, body in hook.requests if body["event"] == "server_woken"]
    assert woken["route"] == "a@test" and woken["server"] == "a"


async def test_a_reload_adds_keeps_and_removes_receivers() -> None:
    from discoproxy.proxy.server import reconfigure

    async def session(proxy: Any, name: str) -> None:
        stream = await proxy.connect()
        async with stream:
            await stream.send(handshake("a.example.com", username=name))
            assert await stream.receive() == b"in"

    async with receiver() as first, receiver() as second, backend(keep_open) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes) as proxy:
            base = proxy.ctx.config.model_dump()
            assert proxy.ctx.webhooks is not None and proxy.ctx.webhooks.receivers == []
            one = {"url": first.url, "events": ["player_connected"]}
            config = ProxyConfig.model_validate({**base, "webhooks": [one]})
            assert await reconfigure(proxy.ctx, config) == []
            await session(proxy, "Alex")
            await wait_for(lambda: len(first.requests) == 1)
            kept = proxy.ctx.webhooks.receivers[0]
            two = {"url": second.url, "events": ["player_connected"]}
            config = ProxyConfig.model_validate({**base, "webhooks": [one, two]})
            await reconfigure(proxy.ctx, config)
            assert proxy.ctx.webhooks.receivers[0] is kept  # its queue and counters stay
            await session(proxy, "Steve")
            await wait_for(lambda: len(first.requests) == 2 and len(second.requests) == 1)
            assert kept.stats.delivered == 2
            await reconfigure(proxy.ctx, ProxyConfig.model_validate({**base, "webhooks": []}))
            assert proxy.ctx.events.wanted == frozenset()
            await session(proxy, "Notch")
            await anyio.sleep(0.5)
    assert [body["player"] for _, body in first.requests] == ["Alex", "Steve"]
    assert [body["player"] for _, body in second.requests] == ["Steve"]
