"""Audit of the Docker provider, without an engine: what a user hits at the edges of
container lifecycles and labels. The scripted engine (``test_docker_events``) keeps its
container listing behind the events it announces, as dockerd's list view does: network
``connect``/``disconnect`` events are sent before the container's new networks reach the
list view (``ConnectToNetwork`` logs the event, then checkpoints), and nothing follows them.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from providers.docker import DockerSettings, same_state, servers_from_containers
from tests.providers.test_docker_events import WITHIN_S, ScriptedEngine, listed, running
from tests.providers.test_docker_labels import container, scan

pytestmark = pytest.mark.anyio

# How long the provider trusts an inspection over a listing, shortened for these tests.
OVERRIDE_S = 0.3


def inspected(
    cid: str, name: str, networks: dict[str, str], status: str = "running", **labels: str
) -> dict[str, Any]:
    """``/containers/{id}/json`` of a container on ``networks`` (name → IPv4)."""
    return {
        "Id": cid,
        "Name": f"/{name}",
        "State": {"Status": status},
        "Config": {"Labels": {"infrarust.domains": f"{name}.example.com", **labels}},
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {
            "Ports": {},
            "Networks": {net: {"IPAddress": ip} for net, ip in networks.items()},
        },
    }


def network_event(action: str, cid: str, network: str) -> dict[str, Any]:
    """What dockerd sends for ``docker network connect|disconnect NETWORK CONTAINER``."""
    return {
        "Type": "network",
        "Action": action,
        "Actor": {"ID": "n" * 64, "Attributes": {"container": cid, "name": network}},
    }


def addresses(published: Any) -> list[list[str]]:
    return [[str(a) for a in server.addresses] for server in published.snapshots[-1]]


# -- network connect / disconnect ---------------------------------------------------------


async def test_a_network_connect_routes_the_container_although_the_listing_lags() -> None:
    """``docker network connect front mc`` on a running container attached to no network
    (or to another than its docker_network label names): routed once it is on it, not
    at the next unrelated event."""
    alone = inspected("c1", "mc", {})
    engine = ScriptedEngine({"c1": alone}, [listed(alone)])
    async with running(engine) as published:
        assert published.ids() == []
        engine.truth["c1"] = inspected("c1", "mc", {"front": "172.30.0.2"})
        engine.stream.queue.put(network_event("connect", "c1", "front"))  # listing lags
        await published.wait(lambda ids: ids == ["mc"])
        assert addresses(published) == [["172.30.0.2:25565"]]


async def test_a_network_disconnect_unroutes_the_container_although_the_listing_lags() -> None:
    """The container's only network (the one its docker_network label names) is taken
    away: nothing reaches it there any more, so it is not routed."""
    on_front = inspected(
        "c1", "mc", {"front": "172.30.0.2"}, **{"infrarust.docker_network": "front"}
    )
    engine = ScriptedEngine({"c1": on_front}, [listed(on_front)])
    async with running(engine) as published:
        assert published.ids() == ["mc"]
        engine.truth["c1"] = inspected("c1", "mc", {}, **{"infrarust.docker_network": "front"})
        engine.stream.queue.put(network_event("disconnect", "c1", "front"))
        await published.wait(lambda ids: ids == [])


async def test_a_reconnect_moves_the_route_to_the_new_address() -> None:
    """Disconnected and connected again, the container has a new IP on the network."""
    before = inspected("c1", "mc", {"front": "172.30.0.2"})
    engine = ScriptedEngine({"c1": before}, [listed(before)])
    async with running(engine) as published:
        assert addresses(published) == [["172.30.0.2:25565"]]
        engine.truth["c1"] = inspected("c1", "mc", {"front": "172.30.0.9"})
        engine.stream.queue.put(network_event("disconnect", "c1", "front"))
        engine.stream.queue.put(network_event("connect", "c1", "front"))
        with anyio.fail_after(WITHIN_S):
            while addresses(published) != [["172.30.0.9:25565"]]:
                await published.changed.wait()
                published.changed = anyio.Event()


async def test_an_old_listing_never_outranks_a_newer_inspection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A container dies while the listing still says running (the resync after ``die``
    lists before dockerd's list view caught up). Seconds later an unrelated container
    starts: that event's immediate publish must not route the dead container again from
    the listing taken before it died, however old the inspection that saw it die is."""
    monkeypatch.setattr("providers.docker.engine.FRESH_OVERRIDE_S", OVERRIDE_S)
    mc = inspected("c1", "mc", {"bridge": "172.17.0.2"})
    engine = ScriptedEngine({"c1": mc}, [listed(mc)])
    async with running(engine) as published:
        assert published.ids() == ["mc"]
        engine.truth["c1"] = inspected("c1", "mc", {"bridge": ""}, status="exited")
        engine.announce("die", "c1")  # the listing still says running
        await published.wait(lambda ids: ids == [])
        await anyio.sleep(OVERRIDE_S * 2)  # the inspection of the die is now "old"
        died_at = len(published.snapshots)
        other = inspected("c2", "other", {"bridge": "172.17.0.3"})
        engine.truth["c2"] = other
        engine.listing = [listed(engine.truth["c1"]), listed(other)]  # caught up now
        engine.announce("start", "c2")
        await published.wait(lambda ids: ids == ["other"])
        routed_again = [published.ids(i) for i in range(died_at, len(published.snapshots))]
        assert all("mc" not in ids for ids in routed_again), routed_again


# -- server ids ---------------------------------------------------------------------------


def compose(name: str, project: str, service: str, ip: str, **labels: str) -> dict[str, Any]:
    return container(
        name,
        {
            "com.docker.compose.project": project,
            "com.docker.compose.service": service,
            **labels,
        },
        networks={"bridge": ip},
    )


def test_a_container_named_like_a_compose_pool_does_not_share_its_id() -> None:
    """Compose project ``mc``, service ``survival``: the pool is server ``mc-survival``.
    A container of that very name (an old ``docker run --name mc-survival``) must not
    become a second server with the same id: the registry keeps one route per id
    (``by_id``), a wake of one would start the other, their counters would add up."""
    replica = compose(
        "mc-survival-1",
        "mc",
        "survival",
        "172.17.0.2",
        **{"infrarust.domains": "survival.example.com"},
    )
    lone = container(
        "mc-survival", {"infrarust.domains": "old.example.com"}, networks={"bridge": "172.17.0.3"}
    )
    servers, problems = scan(replica, lone)
    ids = [server.id for server in servers]
    assert ids == sorted(set(ids)), ids
    assert [s.domains for s in servers] == [("survival.example.com",)]
    assert problems == [
        "container mc-survival has the name of pool mc-survival (replicas: mc-survival-1): "
        "rename the container, or give the pool another label infrarust.group"
    ]


def test_a_group_label_naming_another_container_does_not_share_its_id() -> None:
    grouped = container(
        "a",
        {"infrarust.domains": "a.example.com", "infrarust.group": "b"},
        networks={"bridge": "172.17.0.2"},
    )
    named_b = container(
        "b", {"infrarust.domains": "b.example.com"}, networks={"bridge": "172.17.0.3"}
    )
    result = servers_from_containers([grouped, named_b], DockerSettings())
    assert [(s.id, s.domains) for s in result.servers] == [("b", ("a.example.com",))]
    assert [str(p) for p in result.problems] == [
        "container b has the name of pool b (replicas: a): rename the container, or give "
        "the pool another label infrarust.group"
    ]


# -- stopped containers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        {"mc-router.host": "mc.example.com", "mc-router.port": "x"},
        {"mc-router.host": "mc.example.com", "mc-router.colour": "blue"},
        {"mc-router.host": "mc.example.com", "infrarust.domains": "mc.example.com"},
    ],
    ids=["bad value", "unknown label", "both label sets"],
)
@pytest.mark.parametrize("state", ["exited", "created", "paused", "dead"])
def test_a_container_that_is_not_routed_anyway_is_not_reported(
    labels: dict[str, str], state: str
) -> None:
    """An old stopped container labelled for mc-router is not routed whatever its labels
    say (no ``auto-scale-up``): reporting it "not routed" on every start, and as an error
    of ``discoproxy check``, is noise about a container nobody runs. Ours are not
    reported either in that state."""
    assert scan(container(labels=labels, state=state)) == ([], [])
    assert scan(container(labels=labels))[1]  # running, it is reported


def test_a_stopped_mc_router_container_that_wants_to_sleep_is_still_reported() -> None:
    labels = {"mc-router.host": "mc.example.com", "mc-router.auto-scale-up": "true"}
    bad = {**labels, "mc-router.port": "x"}
    servers, problems = scan(container(labels=bad, state="exited"))
    assert servers == []
    assert problems == ["container mc-1, label mc-router.port: expected 1-65535, got 'x'"]
    assert [s.sleeping for s in scan(container(labels=labels, state="exited"))[0]] == [True]


# -- network_mode: container:<other> ------------------------------------------------------


def test_sharing_the_network_of_a_stopped_container_is_reported_as_such() -> None:
    """``network_mode: service:vpn``: the listing holds stopped containers too, so a
    stopped ``vpn`` is found; its network is gone with it."""
    vpn = container("vpn", networks={"bridge": ""}, state="exited", cid="v" * 64)
    mc = container(
        "mc", {"infrarust.domains": "mc.example.com"}, mode="container:" + "v" * 64, networks={}
    )
    servers, problems = scan(vpn, mc)
    assert servers == []
    assert problems == [
        f"container mc uses the network of container {'v' * 64}, which is not running"
    ]


# -- what a listing shows -----------------------------------------------------------------


def test_a_removed_sleeping_container_does_not_look_like_its_listing() -> None:
    """The listing holds stopped containers too (``all=True``): one labelled
    ``auto_start`` is routed, sleeping. An inspection that found it gone must outrank a
    listing that still shows it, as it does for a running one."""
    labels = {"infrarust.domains": "mc.example.com", "infrarust.auto_start": "true"}
    sleeping = container(labels=labels, state="exited")
    assert not same_state(sleeping, None)
    stopped = container(labels={"infrarust.domains": "x.example.com"}, state="exited")
    assert same_state(stopped, None)  # not routed either way
    moved = container(labels=labels, networks={"front": "10.0.0.2"})
    assert not same_state(container(labels=labels), moved)  # another address
