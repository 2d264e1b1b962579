"""The Swarm provider's loop against a scripted manager (no Docker needed): a service
event lists at once, without one the poll does, a manager that goes away (its event
stream ends) fails the run and the supervisor's next run resyncs from a full listing,
and waking scales a replicated service (retrying an update out of sequence)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import docker.errors
import pytest

from discoproxy.config import ProxyConfig
from discoproxy.model import ServerDefinition
from discoproxy.provider import supervise
from providers.docker import EventStreamEnded, SwarmProvider, SwarmSettings
from providers.docker.engine import scale_service
from tests.providers.test_docker_events import ScriptedStream

pytestmark = pytest.mark.anyio

WITHIN_S = 5.0
LABELS = {"infrarust.domains": "lobby.example.com"}


def service(replicas: int = 1) -> dict[str, Any]:
    return {
        "ID": "s1",
        "Version": {"Index": 7},
        "Spec": {"Name": "lobby", "Labels": LABELS, "Mode": {"Replicated": {"Replicas": replicas}}},
    }


def task(tid: str, ip: str) -> dict[str, Any]:
    return {
        "ID": tid,
        "ServiceID": "s1",
        "DesiredState": "running",
        "Status": {"State": "running"},
        "NetworksAttachments": [{"Network": {"Spec": {"Name": "mc"}}, "Addresses": [f"{ip}/24"]}],
    }


@dataclass
class Manager:
    services_: list[dict[str, Any]] = field(default_factory=lambda: [service()])
    tasks_: list[dict[str, Any]] = field(default_factory=list)
    streams: list[ScriptedStream] = field(default_factory=list)
    listings: int = 0
    updates: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    out_of_sequence: int = 0  # updates to refuse as a concurrent change would
    ended: bool = False  # streams end at once (a manager going away)
    api_version: str = "1.41"

    def events(self, **_: Any) -> ScriptedStream:
        self.streams.append(ScriptedStream())
        if self.ended:
            self.streams[-1].close()
        return self.streams[-1]

    def services(self) -> list[dict[str, Any]]:
        self.listings += 1
        return list(self.services_)

    def tasks(self, filters: dict[str, str]) -> list[dict[str, Any]]:
        assert filters == {"desired-state": "running"}
        return list(self.tasks_)

    def inspect_service(self, name: str) -> dict[str, Any]:
        return self.services_[0]

    def update_service(self, name: str, version: int, mode: dict[str, Any], **_: Any) -> None:
        if self.out_of_sequence:
            self.out_of_sequence -= 1
            raise docker.errors.APIError("rpc error: update out of sequence")
        self.updates.append((name, version, mode))

    def close(self) -> None:
        pass


class Published:
    def __init__(self) -> None:
        self.snapshots: list[list[ServerDefinition]] = []

    def __call__(self, servers: Any) -> None:
        self.snapshots.append(list(servers))

    def addresses(self) -> list[str]:
        if not self.snapshots or not self.snapshots[-1]:
            return []
        return [str(a) for a in self.snapshots[-1][0].addresses]

    async def until(self, check: Any) -> None:
        with anyio.fail_after(WITHIN_S):
            while not check():
                await anyio.sleep(0.01)


def provider_for(manager: Manager, poll: float) -> SwarmProvider:
    provider = SwarmProvider("swarm", SwarmSettings(poll_interval=poll), ProxyConfig())
    provider._connect = lambda timeout, version="auto": manager  # type: ignore[method-assign]
    return provider


async def test_a_service_event_lists_at_once_and_the_poll_finds_tasks_without_one() -> None:
    manager = Manager(tasks_=[task("t1", "10.9.0.4")])
    published = Published()
    async with anyio.create_task_group() as tg:
        tg.start_soon(provider_for(manager, poll=60).run, published)  # the poll: never
        await published.until(lambda: published.addresses() == ["10.9.0.4:25565"])
        manager.tasks_.append(task("t2", "10.9.0.5"))
        manager.streams[-1].queue.put({"Type": "service", "Action": "update"})
        await published.until(lambda: len(published.addresses()) == 2)
        tg.cancel_scope.cancel()

    manager = Manager(tasks_=[task("t1", "10.9.0.4")])
    published = Published()
    async with anyio.create_task_group() as tg:
        tg.start_soon(provider_for(manager, poll=0.2).run, published)
        await published.until(lambda: published.addresses() == ["10.9.0.4:25565"])
        manager.tasks_ = [task("t2", "10.9.0.5")]  # a task replaced on a node: no event
        await published.until(lambda: published.addresses() == ["10.9.0.5:25565"])
        before = len(published.snapshots)
        await anyio.sleep(0.6)  # unchanged listings publish nothing
        assert len(published.snapshots) == before
        tg.cancel_scope.cancel()


async def test_a_manager_that_goes_away_is_resynced_on_reconnect() -> None:
    manager = Manager(tasks_=[task("t1", "10.9.0.4")])
    provider = provider_for(manager, poll=60)
    published = Published()
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervise, "swarm", provider, published)
        await published.until(lambda: published.addresses() == ["10.9.0.4:25565"])
        first_run = len(published.snapshots)
        manager.tasks_ = [task("t2", "10.9.0.6")]  # changed while it was away
        manager.streams[-1].close()  # the manager went away: the stream ends
        await published.until(lambda: len(manager.streams) == 2)
        await published.until(lambda: published.addresses() == ["10.9.0.6:25565"])
        assert len(published.snapshots) == first_run + 1  # one full publish on reconnect
        tg.cancel_scope.cancel()
    ended = Manager(ended=True)  # and on its own, a run whose stream ends raises
    with anyio.fail_after(WITHIN_S), pytest.raises(EventStreamEnded, match="ended"):
        await provider_for(ended, poll=60).run(Published())


def test_scaling_a_service_up_and_down_retries_an_update_out_of_sequence() -> None:
    asleep = Manager(services_=[service(replicas=0)], out_of_sequence=1)
    scale_service(asleep, "lobby", up=True)
    assert asleep.updates == [("lobby", 7, {"Replicated": {"Replicas": 1}})]
    up = Manager(services_=[service(replicas=3)])
    scale_service(up, "lobby", up=True)  # already running: left as it is
    assert up.updates == []
    scale_service(up, "lobby", up=False)
    assert up.updates == [("lobby", 7, {"Replicated": {"Replicas": 0}})]
    stuck = Manager(services_=[service(replicas=0)], out_of_sequence=5)
    with pytest.raises(docker.errors.APIError, match="out of sequence"):
        scale_service(stuck, "lobby", up=True)
    global_service = Manager(
        services_=[{**service(), "Spec": {"Name": "g", "Mode": {"Global": {}}}}]
    )
    with pytest.raises(Exception, match="not replicated"):
        scale_service(global_service, "g", up=True)
