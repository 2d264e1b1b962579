"""Swarm services → servers (providers/docker/swarm.py), from records shaped as the
engine's /services and /tasks answers: one pooled server per labelled service, a backend
per running task on its overlay IP, ingress never, problems naming the service."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from discoproxy.model import Balance
from providers.docker.settings import SwarmSettings
from providers.docker.swarm import servers_from_services


def service(
    name: str, labels: dict[str, str], sid: str | None = None, replicas: int | None = 1
) -> dict[str, Any]:
    """A replicated service (``replicas=None``: a global one)."""
    mode = {"Global": {}} if replicas is None else {"Replicated": {"Replicas": replicas}}
    return {"ID": sid or f"svc-{name}", "Spec": {"Name": name, "Labels": labels, "Mode": mode}}


def task(
    service_id: str,
    tid: str,
    networks: dict[str, str],
    state: str = "running",
    desired: str = "running",
) -> dict[str, Any]:
    attachments = [
        {
            "Network": {"ID": f"net-{net}", "Spec": {"Name": net, "Ingress": net == "ingress"}},
            "Addresses": [f"{ip}/24"],
        }
        for net, ip in networks.items()
    ]
    return {
        "ID": tid,
        "ServiceID": service_id,
        "Status": {"State": state},
        "DesiredState": desired,
        "NetworksAttachments": attachments,
    }


def scan(services: list[dict[str, Any]], tasks: list[dict[str, Any]], **settings: Any) -> Any:
    return servers_from_services(services, tasks, SwarmSettings(**settings))


LOBBY = {"infrarust.domains": "lobby.example.com", "infrarust.port": "25577"}


def test_each_running_task_is_a_backend_of_the_services_pool_on_its_overlay_ip() -> None:
    tasks = [
        task("svc-lobby", "t2", {"ingress": "10.255.0.7", "games": "10.20.0.5"}),
        task("svc-lobby", "t1", {"ingress": "10.255.0.6", "games": "10.20.0.4"}),
        task("svc-lobby", "t3", {"games": "10.20.0.6"}, state="starting"),  # not yet
        task("svc-lobby", "t4", {"games": "10.20.0.9"}, desired="shutdown"),  # going away
    ]
    result = scan([service("lobby", LOBBY)], tasks)
    assert result.problems == ()
    (pool,) = result.servers
    assert pool.id == "lobby" and pool.domains == ("lobby.example.com",)
    assert [str(a) for a in pool.addresses] == ["10.20.0.4:25577", "10.20.0.5:25577"]
    assert pool.balance is Balance.ROUND_ROBIN  # replicas spread


def test_services_without_our_labels_are_not_routed_and_unrelated_tasks_ignored() -> None:
    services = [service("db", {"com.example.role": "db"}), service("lobby", LOBBY)]
    tasks = [task("svc-db", "d1", {"games": "10.20.0.8"})]
    result = scan(services, tasks)
    # a labelled service with no running task has no backend: not routed
    assert result.servers == ()
    assert [str(p) for p in result.problems] == []


def test_a_service_on_two_overlays_needs_the_network_setting_or_label() -> None:
    tasks = [task("svc-lobby", "t1", {"games": "10.20.0.4", "other": "10.30.0.4"})]
    result = scan([service("lobby", LOBBY)], tasks)
    assert result.servers == ()
    (problem,) = result.problems
    assert str(problem).startswith("service lobby ")
    assert "games" in str(problem) and "other" in str(problem)
    chosen = scan([service("lobby", LOBBY)], tasks, network="other")
    assert [str(a) for a in chosen.servers[0].addresses] == ["10.30.0.4:25577"]


def test_a_bad_service_label_names_the_service_and_the_label() -> None:
    labels = {**LOBBY, "infrarust.balance": "leastconn"}
    result = scan([service("lobby", labels)], [task("svc-lobby", "t1", {"games": "10.20.0.4"})])
    assert result.servers == ()
    (problem,) = result.problems
    assert str(problem).startswith("service lobby, label infrarust.balance: ")
    assert "round_robin" in str(problem)  # the accepted values


WAKES = {**LOBBY, "infrarust.auto_start": "true", "infrarust.auto_stop_after": "10m"}


def test_an_auto_start_service_without_a_running_task_sleeps_and_its_pool_names_it() -> None:
    result = scan([service("lobby", WAKES, replicas=0)], [])
    (pool,) = result.servers
    assert pool.id == "lobby" and pool.sleeping and pool.addresses == ()
    assert pool.auto_stop_after == 600
    assert result.members == {"lobby": ("lobby",)}  # what start_server scales up
    awake = scan([service("lobby", WAKES)], [task("svc-lobby", "t1", {"games": "10.20.0.4"})])
    (pool,) = awake.servers
    assert not pool.sleeping and [str(a) for a in pool.addresses] == ["10.20.0.4:25577"]


def test_a_service_without_auto_start_and_no_task_is_not_routed() -> None:
    assert scan([service("lobby", LOBBY, replicas=0)], []).servers == ()


@pytest.mark.parametrize("key", ["auto_start", "auto_stop_after"])
def test_wake_labels_on_a_global_service_are_refused_not_ignored(key: str) -> None:
    labels = {**LOBBY, f"infrarust.{key}": "true" if key == "auto_start" else "10m"}
    tasks = [task("svc-lobby", "t1", {"games": "10.20.0.4"})]
    result = scan([service("lobby", labels, replicas=None)], tasks)
    assert result.servers == ()
    (problem,) = result.problems
    assert str(problem).startswith(f"service lobby, label infrarust.{key}: ")
    assert "global service" in str(problem) and problem.dropped
    # the same labels on a replicated service are honoured
    assert scan([service("lobby", labels)], tasks).servers[0].domains == ("lobby.example.com",)


def test_published_ports_are_refused_for_swarm() -> None:
    with pytest.raises(ValidationError, match="routing mesh"):
        SwarmSettings(use_published_ports=True)
