"""Replicas become one pooled server: the same Compose service, or the same group label;
their routing labels must agree; each brings its own address and weight."""

from __future__ import annotations

from typing import Any

import pytest

from discoproxy.admin.server import route_row
from discoproxy.model import Balance
from discoproxy.routing import build_table
from providers.docker.containers import servers_from_containers
from providers.docker.settings import DockerSettings
from tests.providers.test_docker_labels import container, one, scan

COMPOSE = {"com.docker.compose.project": "mc", "com.docker.compose.service": "survival"}


def replica(n: int, extra: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    labels = {**COMPOSE, "infrarust.domains": "survival.example.com", **(extra or {})}
    kwargs.setdefault("networks", {"bridge": f"172.17.0.{n + 1}"})
    return container(f"mc-survival-{n}", labels, **kwargs)


def test_three_replicas_of_a_compose_service_are_one_round_robin_pool() -> None:
    servers, problems = scan(replica(3), replica(1), replica(2))
    assert problems == []
    (pool,) = servers
    assert pool.id == "mc-survival"
    assert pool.domains == ("survival.example.com",)
    assert [str(a) for a in pool.addresses] == [
        "172.17.0.2:25565",
        "172.17.0.3:25565",
        "172.17.0.4:25565",
    ]
    assert pool.balance is Balance.ROUND_ROBIN


def test_one_replica_keeps_the_pool_id_so_scaling_does_not_rename_the_route() -> None:
    assert one(replica(1)).id == "mc-survival"


def test_an_explicit_group_label_pools_unrelated_containers() -> None:
    labels = {"infrarust.domains": "lobby.example.com", "infrarust.group": "lobby"}
    a = container("lobby-a", {**labels, "infrarust.weight": "3"}, {"bridge": "172.17.0.5"})
    b = container("lobby-b", labels, {"bridge": "172.17.0.6"})
    pool = scan(a, b)[0][0]
    assert pool.id == "lobby"
    assert [(str(x), x.weight) for x in pool.addresses] == [
        ("172.17.0.5:25565", 3),
        ("172.17.0.6:25565", 1),
    ]


def test_a_balance_label_overrides_the_pools_default() -> None:
    extra = {"infrarust.balance": "least_connections", "infrarust.sticky_ttl": "10m"}
    pool = scan(replica(1, extra), replica(2, extra))[0][0]
    assert pool.balance is Balance.LEAST_CONNECTIONS and pool.sticky_ttl == 600


def test_a_replica_whose_routing_labels_disagree_is_reported_and_left_out() -> None:
    odd = replica(2, {"infrarust.send_proxy_protocol": "true"})
    servers, problems = scan(replica(1), odd, replica(3))
    (pool,) = servers
    assert [str(a) for a in pool.addresses] == ["172.17.0.2:25565", "172.17.0.4:25565"]
    assert problems == [
        "container mc-survival-2, label infrarust.send_proxy_protocol: is 'true' here but "
        "'(unset)' on mc-survival-1, the first replica of pool mc-survival: left out of the "
        "pool (replicas must agree on routing)"
    ]


def test_per_replica_labels_may_differ() -> None:
    a = replica(1, {"infrarust.weight": "2", "infrarust.port": "25566"})
    b = replica(2, {"infrarust.weight": "1"})
    pool = scan(a, b)[0][0]
    assert [(str(x), x.weight) for x in pool.addresses] == [
        ("172.17.0.2:25566", 2),
        ("172.17.0.3:25565", 1),
    ]


WAKE = {"infrarust.auto_start": "true"}


def test_auto_start_replicas_all_stopped_are_one_sleeping_pool() -> None:
    records = [replica(n, WAKE, state="exited", networks={"bridge": ""}) for n in (1, 2, 3)]
    result = servers_from_containers(records, DockerSettings())
    assert [str(p) for p in result.problems] == []
    (pool,) = result.servers
    assert (pool.id, pool.sleeping, pool.addresses) == ("mc-survival", True, ())
    # a login wakes the pool: the provider starts every replica it was built from
    assert result.members == {"mc-survival": ("mc-survival-1", "mc-survival-2", "mc-survival-3")}


def test_an_auto_start_pool_routes_to_its_running_replicas_only() -> None:
    stopped = replica(2, WAKE, state="exited", networks={"bridge": ""})
    servers, problems = scan(replica(1, WAKE), stopped, replica(3, WAKE))
    assert problems == []
    (pool,) = servers
    assert not pool.sleeping and pool.auto_start
    assert [str(a) for a in pool.addresses] == ["172.17.0.2:25565", "172.17.0.4:25565"]


def test_a_replica_that_alone_says_auto_start_is_left_out_of_the_pool() -> None:
    servers, problems = scan(replica(1), replica(2, WAKE))
    assert [s.id for s in servers] == ["mc-survival"]
    assert problems == [
        "container mc-survival-2, label infrarust.auto_start: is 'true' here but '(unset)' on "
        "mc-survival-1, the first replica of pool mc-survival: left out of the pool (replicas "
        "must agree on routing)"
    ]


@pytest.mark.anyio
async def test_starting_a_pool_starts_each_replica_and_tries_them_all() -> None:
    from discoproxy.config import ProxyConfig
    from providers.docker.engine import DockerProvider

    calls: list[tuple[str, str]] = []

    class Client:
        def start(self, name: str) -> None:
            calls.append(("start", name))
            if name == "mc-survival-2":
                raise OSError("no such container")

        def stop(self, name: str, timeout: float) -> None:
            calls.append(("stop", name))

        def close(self) -> None:
            pass

    provider = DockerProvider("docker", DockerSettings(), ProxyConfig())
    provider._connect = lambda timeout: Client()  # type: ignore[method-assign]
    provider._members = {"mc-survival": ("mc-survival-1", "mc-survival-2", "mc-survival-3")}
    with pytest.raises(Exception, match="no such container"):
        await provider.start_server("mc-survival")
    await provider.stop_server("mc-survival")
    await provider.start_server("lone")  # not a pool: the container of that name
    assert calls == [
        ("start", "mc-survival-1"),
        ("start", "mc-survival-2"),
        ("start", "mc-survival-3"),
        ("stop", "mc-survival-1"),
        ("stop", "mc-survival-2"),
        ("stop", "mc-survival-3"),
        ("start", "lone"),
    ]


def test_bad_pool_labels_name_the_label_and_the_accepted_values() -> None:
    servers, problems = scan(
        replica(1, {"infrarust.weight": "300"}),
        container("x", {"infrarust.domains": "x.example.com", "infrarust.group": "no spaces"}),
        container("y", {"infrarust.domains": "y.example.com", "infrarust.balance": "leastconn"}),
    )
    assert servers == []
    assert problems == [
        "container mc-survival-1, label infrarust.weight: invalid weight '300'; expected an "
        "integer from 0 to 256",
        "container x, label infrarust.group: invalid group 'no spaces'; expected letters, "
        "digits, '.', '_' or '-' (at most 200, starting with a letter or digit), e.g. 'survival'",
        "container y, label infrarust.balance: unknown balance 'leastconn'; accepted: "
        "'failover', 'round_robin', 'random', 'least_connections', 'lowest_latency', "
        "'fewest_players'",
    ]


def test_a_replica_whose_healthcheck_is_starting_or_unhealthy_takes_no_new_connections() -> None:
    healthy = {**replica(1), "Status": "Up 2 minutes (healthy)"}
    starting = {**replica(2), "Status": "Up 3 seconds (health: starting)"}
    unhealthy = {**replica(3), "Status": "Up 5 minutes (unhealthy)"}
    servers, problems = scan(healthy, starting, unhealthy)
    assert problems == []
    assert [str(a) for a in servers[0].addresses] == ["172.17.0.2:25565"]
    # held back, not forgotten: the API shows them (starting, down), nothing dials them
    assert [(h.address, h.health) for h in servers[0].held_back] == [
        ("172.17.0.3:25565", "starting"),
        ("172.17.0.4:25565", "unhealthy"),
    ]
    table = build_table({"docker": servers})
    rows = route_row(table, table.by_id["mc-survival@docker"])
    assert [(b["address"], b["state"]) for b in rows["pool"]] == [
        ("172.17.0.2:25565", "up"),
        ("172.17.0.3:25565", "starting"),
        ("172.17.0.4:25565", "down"),
    ]
    assert rows["state"] == "degraded"


@pytest.mark.parametrize(
    ("health", "route_state"), [("health: starting", "starting"), ("unhealthy", "down")]
)
def test_a_pool_whose_every_replica_is_held_back_keeps_its_route(
    health: str, route_state: str
) -> None:
    """Routed with nothing to dial: its players get the unreachable answers (not the
    unknown domain's), the API shows why, and a server woken by auto_start keeps its
    route while its HEALTHCHECK starts."""
    lone = {"infrarust.domains": "lone.example.com"}
    replicas = [{**replica(n), "Status": f"Up 3 seconds ({health})"} for n in (1, 2)]
    alone = {**container("lone", lone, {"bridge": "172.17.0.9"}), "Status": f"Up ({health})"}
    servers, problems = scan(*replicas, alone)
    assert problems == []
    by_id = {s.id: s for s in servers}
    assert sorted(by_id) == ["lone", "mc-survival"]
    want = "starting" if "starting" in health else "unhealthy"
    assert [(h.address, h.health) for h in by_id["mc-survival"].held_back] == [
        ("172.17.0.2:25565", want),
        ("172.17.0.3:25565", want),
    ]
    assert [(h.address, h.health) for h in by_id["lone"].held_back] == [("172.17.0.9:25565", want)]
    assert all(s.addresses == () for s in servers)
    table = build_table({"docker": servers})
    for route_id in ("mc-survival@docker", "lone@docker"):
        row = route_row(table, table.by_id[route_id])
        assert row["state"] == route_state
        assert row["backends"] == []


def test_an_unready_container_with_a_bad_group_label_harms_no_other() -> None:
    """Its group is read before its labels are checked (a held-back replica joins its
    pool's list): a bad one must not fail the whole scan, which would stop every
    container's routing."""
    bad = {
        **container("x", {"infrarust.domains": "x.example.com", "infrarust.group": "no spaces"}),
        "Status": "Up 3 seconds (health: starting)",
    }
    servers, problems = scan(replica(1), bad)
    assert [s.id for s in servers] == ["mc-survival"]
    assert problems == [
        "container x, label infrarust.group: invalid group 'no spaces'; expected letters, "
        "digits, '.', '_' or '-' (at most 200, starting with a letter or digit), e.g. 'survival'"
    ]


def test_use_healthcheck_false_routes_whatever_the_health() -> None:
    record = {**replica(1, {"infrarust.use_healthcheck": "false"}), "Status": "Up (unhealthy)"}
    assert [str(a) for a in one(record).addresses] == ["172.17.0.2:25565"]


def test_an_inspection_carries_the_health_and_outranks_a_listing_that_lags() -> None:
    from providers.docker import record_from_inspect, same_state

    info = {
        "Id": "a" * 64,
        "Name": "/mc-1",
        "State": {"Status": "running", "Health": {"Status": "unhealthy"}},
        "Config": {"Labels": {}},
    }
    inspected = record_from_inspect(info)
    listed = {**inspected, "Status": "Up 5 minutes (healthy)"}
    assert not same_state(listed, inspected)
    assert same_state({**listed, "Status": "Up 1 minute (unhealthy)"}, inspected)
