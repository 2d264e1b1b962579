"""The Docker provider's event handling against a scripted engine (no Docker needed).

The scripted engine lets a test do what a real one does only by chance of timing: keep
its container listing behind the events it has announced (dockerd's list view lags
``die`` and ``pause`` by tens of ms), or end the event stream.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import docker.errors
import pytest
from loguru import logger

from discoproxy.config import ProxyConfig
from discoproxy.model import ServerDefinition
from providers.docker import DockerProvider, DockerSettings, EngineUnavailable, EventStreamEnded

pytestmark = pytest.mark.anyio

WITHIN_S = 5.0
_END = object()


def inspection(cid: str, name: str, status: str, domains: str) -> dict[str, Any]:
    return {
        "Id": cid,
        "Name": f"/{name}",
        "State": {"Status": status},
        "Config": {"Labels": {"infrarust.domains": domains}},
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {"Ports": {}, "Networks": {"bridge": {"IPAddress": "172.17.0.9"}}},
    }


def listed(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "Id": info["Id"],
        "Names": [info["Name"]],
        "State": info["State"]["Status"],
        "Labels": info["Config"]["Labels"],
        "HostConfig": info["HostConfig"],
        "NetworkSettings": {"Networks": info["NetworkSettings"]["Networks"]},
        "Ports": [],
    }


class ScriptedStream:
    def __init__(self) -> None:
        self.queue: queue.Queue[object] = queue.Queue()

    def __iter__(self) -> Iterator[object]:
        while (item := self.queue.get()) is not _END:
            yield item

    def close(self) -> None:
        self.queue.put(_END)


@dataclass
class ScriptedEngine:
    """``truth`` is what inspect sees; ``listing`` what the container list shows."""

    truth: dict[str, dict[str, Any]] = field(default_factory=dict)
    listing: list[dict[str, Any]] = field(default_factory=list)
    stream: ScriptedStream = field(default_factory=ScriptedStream)
    api_version: str = "1.41"

    def events(self, **_: Any) -> ScriptedStream:
        return self.stream

    def containers(self, all: bool = False) -> list[dict[str, Any]]:
        assert all, "the provider lists stopped containers too (auto_start)"
        return list(self.listing)

    def inspect_container(self, cid: str) -> dict[str, Any]:
        if cid not in self.truth:
            raise docker.errors.NotFound(f"No such container: {cid}")
        return self.truth[cid]

    def close(self) -> None:
        pass

    def announce(self, action: str, cid: str) -> None:
        labels = {"infrarust.domains": "x"}
        self.stream.queue.put(
            {"Type": "container", "Action": action, "Actor": {"ID": cid, "Attributes": labels}}
        )


@dataclass
class Published:
    snapshots: list[tuple[ServerDefinition, ...]] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def __call__(self, servers: Iterable[ServerDefinition]) -> None:
        self.snapshots.append(tuple(servers))
        self.changed.set()

    def ids(self, index: int = -1) -> list[str]:
        return [s.id for s in self.snapshots[index]] if self.snapshots else []

    async def wait(self, condition: Callable[[list[str]], bool]) -> None:
        with anyio.fail_after(WITHIN_S):
            while not condition(self.ids()):
                await self.changed.wait()
                self.changed = anyio.Event()


@asynccontextmanager
async def running(engine: ScriptedEngine) -> AsyncIterator[Published]:
    provider = DockerProvider("docker", DockerSettings(), ProxyConfig())
    provider._connect = lambda timeout, version="auto": engine  # type: ignore[method-assign]
    published = Published()
    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.run, published)
        await published.wait(lambda ids: bool(published.snapshots))  # the first listing
        yield published
        tg.cancel_scope.cancel()


async def test_a_die_routes_away_although_the_listing_still_says_running() -> None:
    mc = inspection("c1", "mc", "running", "mc.example.com")
    engine = ScriptedEngine({"c1": mc}, [listed(mc)])
    async with running(engine) as published:
        assert published.ids() == ["mc"]
        engine.truth["c1"] = inspection("c1", "mc", "exited", "mc.example.com")
        engine.announce("die", "c1")  # the listing lags: still "running"
        await published.wait(lambda ids: ids == [])
        count = len(published.snapshots)
        engine.announce("stop", "c1")  # more resyncs on the stale listing
        await published.wait(lambda ids, n=count: len(published.snapshots) >= n + 2)
        assert all(ids == [] for ids in map(published.ids, range(count, len(published.snapshots))))


async def test_a_start_routes_before_the_listing_shows_it_and_never_flaps() -> None:
    engine = ScriptedEngine()
    async with running(engine) as published:
        engine.truth["c1"] = inspection("c1", "mc", "running", "mc.example.com")
        engine.announce("start", "c1")  # the listing has not caught up yet
        await published.wait(lambda ids: ids == ["mc"])
        first = next(i for i, s in enumerate(published.snapshots) if s)
        engine.listing = [listed(engine.truth["c1"])]
        engine.announce("start", "c1")
        await published.wait(lambda ids: len(published.snapshots) >= first + 3)
        assert all(published.ids(i) == ["mc"] for i in range(first, len(published.snapshots)))


async def test_a_removed_container_is_gone_even_from_a_stale_listing() -> None:
    mc = inspection("c1", "mc", "running", "mc.example.com")
    engine = ScriptedEngine({"c1": mc}, [listed(mc)])
    async with running(engine) as published:
        del engine.truth["c1"]
        engine.announce("destroy", "c1")
        await published.wait(lambda ids: ids == [])


async def test_the_event_stream_ending_fails_the_run() -> None:
    engine = ScriptedEngine()
    provider = DockerProvider("docker", DockerSettings(), ProxyConfig())
    provider._connect = lambda timeout, version="auto": engine  # type: ignore[method-assign]
    engine.stream.close()
    with anyio.fail_after(WITHIN_S), pytest.raises(EventStreamEnded, match="ended"):
        await provider.run(Published())


async def test_a_label_problem_is_logged_once_not_on_every_resync() -> None:
    bad = inspection("c1", "mc", "running", "bad domain")
    engine = ScriptedEngine({"c1": bad}, [listed(bad)])
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip()), format="{message}", level="ERROR")
    try:
        async with running(engine) as published:
            for _ in range(3):
                count = len(published.snapshots)
                engine.announce("start", "c1")
                await published.wait(lambda ids, n=count: len(published.snapshots) >= n + 2)
    finally:
        logger.remove(sink)
    assert lines == [
        "container mc, label infrarust.domains: invalid domain 'bad domain'; expected a "
        "hostname such as 'mc.example.com' or a wildcard such as '*.example.com' (the '*' "
        "only as the whole first label); not routed"
    ]


async def test_load_once_lists_once_and_returns_the_problems_instead_of_logging() -> None:
    mc, bad = (
        inspection("c1", "mc", "running", "mc.example.com"),
        inspection("c2", "bad", "running", "bad domain"),
    )
    engine = ScriptedEngine({"c1": mc, "c2": bad}, [listed(mc), listed(bad)])
    engine.events = None  # type: ignore[assignment,method-assign]  # no event stream offline
    provider = DockerProvider("docker", DockerSettings(endpoint="tcp://engine:2375"), ProxyConfig())
    provider._connect = lambda timeout, version="auto": engine  # type: ignore[method-assign]
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    try:
        with anyio.fail_after(WITHIN_S):
            result = await provider.load_once()
    finally:
        logger.remove(sink)
    assert lines == []
    assert [s.id for s in result.servers] == ["mc"]
    assert result.errors == (
        "container bad, label infrarust.domains: invalid domain 'bad domain'; expected a "
        "hostname such as 'mc.example.com' or a wildcard such as '*.example.com' (the '*' "
        "only as the whole first label); not routed",
    )
    assert result.source == "tcp://engine:2375"


async def test_load_once_raises_when_no_engine_answers() -> None:
    settings = DockerSettings(endpoint="unix:///nonexistent/docker.sock", api_timeout=1)
    provider = DockerProvider("docker", settings, ProxyConfig())
    with anyio.fail_after(WITHIN_S), pytest.raises(EngineUnavailable):
        await provider.load_once()


async def test_a_burst_of_starts_is_published_together_not_parsed_once_per_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each publish parses every container: one per event made a burst of N starts cost
    N whole-listing parses (O(N²); 300 at once kept the loop busy 4.5 s). Parses get a
    budget per second (``PARSE_BUDGET_S``); past it the events go together."""
    import time

    import providers.docker.engine as engine_module

    spent = 0.0
    real = engine_module.servers_from_containers

    def timed(*args: Any, **kwargs: Any) -> Any:
        nonlocal spent
        began = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent += time.perf_counter() - began

    monkeypatch.setattr(engine_module, "servers_from_containers", timed)
    count = 300
    engine = ScriptedEngine()
    async with running(engine) as published:
        spent = 0.0
        began = time.perf_counter()
        for i in range(count):
            engine.truth[f"c{i}"] = inspection(f"c{i}", f"mc{i}", "running", f"mc{i}.example.com")
            engine.announce("start", f"c{i}")  # the listing has not caught up yet
        await published.wait(lambda ids: len(ids) == count)
        took = time.perf_counter() - began
    budget = engine_module.PARSE_BUDGET_S * (took / engine_module.PARSE_WINDOW_S + 1)
    assert spent <= budget + 0.05, f"{spent:.2f}s parsing in {took:.2f}s"


async def test_a_lone_event_after_a_burst_is_still_published_at_once() -> None:
    """The budget refills within PARSE_WINDOW_S: a container that starts once the burst is
    over is routed by its own event's publish, not the next resync's."""
    from providers.docker.engine import PARSE_WINDOW_S

    engine = ScriptedEngine()
    async with running(engine) as published:
        for i in range(50):
            engine.truth[f"c{i}"] = inspection(f"c{i}", f"mc{i}", "running", f"mc{i}.example.com")
            engine.announce("start", f"c{i}")
        await published.wait(lambda ids: len(ids) == 50)
        await anyio.sleep(PARSE_WINDOW_S + 0.2)  # quiet: the budget is whole again
        engine.containers = lambda all=False: (_ for _ in ()).throw(  # type: ignore[method-assign]
            AssertionError("no resync may run before the event's publish")
        )
        engine.truth["late"] = inspection("late", "late", "running", "late.example.com")
        engine.announce("start", "late")
        await published.wait(lambda ids: "late" in ids)
