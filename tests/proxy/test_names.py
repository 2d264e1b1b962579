"""The backend name cache: how long answers and failures are kept, and its bound."""

from __future__ import annotations

import socket

import pytest

from discoproxy.proxy import names
from discoproxy.proxy.names import NameCache

ADDRESS = ((socket.AF_INET, "10.0.0.5", 25565, "mc"),)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(names.time, "monotonic", lambda: now[0])
    return now


def test_an_answer_is_kept_for_its_ttl(clock: list[float]) -> None:
    cache = NameCache()
    cache.put("mc", 25565, ADDRESS, "")
    clock[0] += names.NAME_TTL_S - 0.1
    cached = cache.get("mc", 25565)
    assert cached is not None and cached.addresses == ADDRESS
    clock[0] += 0.2
    assert cache.get("mc", 25565) is None


def test_a_failure_is_kept_briefly(clock: list[float]) -> None:
    cache = NameCache()
    cache.put("mc", 25565, (), "mc:25565: Name or service not known")
    cached = cache.get("mc", 25565)
    assert cached is not None and cached.error and not cached.addresses
    clock[0] += names.NAME_FAILURE_TTL_S + 0.1
    assert cache.get("mc", 25565) is None


def test_names_are_per_port_and_can_be_forgotten(clock: list[float]) -> None:
    cache = NameCache()
    cache.put("mc", 25565, ADDRESS, "")
    assert cache.get("mc", 25566) is None
    cache.forget("mc", 25565)
    assert cache.get("mc", 25565) is None


def test_the_cache_is_bounded(clock: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "MAX_NAMES", 3)
    cache = NameCache()
    for index in range(10):
        cache.put(f"host{index}", 1, ADDRESS, "")
    assert len(cache._entries) <= 3
    assert cache.get("host9", 1) is not None
