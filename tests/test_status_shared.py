"""The status cache shared by workers (workers = N): a worker caches the control plane's
answer for what is left of its TTL, not a whole TTL from when it got it."""

from __future__ import annotations

from typing import Any

import pytest

from discoproxy.config import ProxyConfig
from discoproxy.proxy.worker import SharedStatus
from discoproxy.routing import build_table
from discoproxy.status import StatusService
from tests.proxy.helpers import server

pytestmark = pytest.mark.anyio

DOCUMENT = {"version": {"name": "x", "protocol": 765}, "players": {"max": 20, "online": 3}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def route() -> Any:
    table = build_table(
        {"test": [server("a", "a.example.com", addresses=["10.0.0.1"], status_cache_ttl=10)]}
    )
    return table.by_id["a@test"]


async def test_the_control_planes_answer_says_how_old_it_is() -> None:
    clock = Clock()
    control = StatusService(ProxyConfig(), clock=clock)
    r = route()
    control.offer(r, 765, "a.example.com", DOCUMENT)  # a check's answer, at 1000
    clock.now += 7
    document, age = await control.shared_document(r, 765, "a.example.com", 25565, None, ())
    assert document == DOCUMENT and age == 7


async def test_a_worker_keeps_the_shared_answer_only_for_the_rest_of_its_ttl() -> None:
    class Channel:
        async def request(self, kind: str, payload: Any) -> Any:
            assert kind == "status"
            return DOCUMENT, 7.0  # 7 s old at the control plane

    clock = Clock()
    worker = SharedStatus(ProxyConfig(), clock=clock)
    worker.channel = Channel()  # type: ignore[assignment]
    r = route()
    text, _ = await worker.answer(r, 765, "a.example.com", 25565, None, (("10.0.0.1", 25565),))
    assert '"online": 3' in text or '"online":3' in text
    clock.now += 2.5
    assert worker.cached(r, 765, "a.example.com") is not None  # 9.5 s old: still fresh
    clock.now += 1
    assert worker.cached(r, 765, "a.example.com") is None  # 10.5 s: as old as upstream's
