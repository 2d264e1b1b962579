"""Pools (proxy/balance.py): strategies, weights, rotating ties, passive health with a
half-open probe, stickiness; and the same through a running proxy with real backends."""

from __future__ import annotations

import collections
import re
import socket
from contextlib import AsyncExitStack

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from discoproxy.model import Balance, ServerDefinition
from discoproxy.proxy.balance import (
    FALL,
    MAX_DIALS,
    MAX_STICKY,
    RETRY_FIRST_S,
    Pool,
    _schedule,
)
from tests.proxy.helpers import backend, named, running_proxy, server

A, B, C = ("10.0.0.1", 25565), ("10.0.0.2", 25565), ("10.0.0.3", 25565)


def pool(strategy: Balance, *weights: int, sticky_ttl: float = 0.0) -> Pool:
    addresses = [A, B, C][: len(weights)]
    return Pool(
        [(h, p, w) for (h, p), w in zip(addresses, weights, strict=True)], strategy, sticky_ttl
    )


def firsts(p: Pool, n: int, now: float = 100.0, client: str | None = None) -> list[tuple[str, int]]:
    return [p.order(client, now)[0] for _ in range(n)]


# -- strategies ---------------------------------------------------------------------------


def test_failover_takes_the_first_and_then_the_rest_in_order() -> None:
    p = pool(Balance.FAILOVER, 1, 1, 1)
    assert list(p.order(None, 0)) == [A, B, C]
    assert list(p.order(None, 0)) == [A, B, C]


def test_round_robin_rotates_and_every_order_holds_every_backend() -> None:
    p = pool(Balance.ROUND_ROBIN, 1, 1, 1)
    orders = [p.order(None, 0) for _ in range(6)]
    assert [o[0] for o in orders] == [A, B, C, A, B, C]
    assert all(sorted(o) == [A, B, C] for o in orders)  # redispatch: the others follow


def test_round_robin_follows_the_weights_smoothly() -> None:
    p = pool(Balance.ROUND_ROBIN, 3, 1, 0)
    picks = firsts(p, 8)
    assert collections.Counter(picks) == {A: 6, B: 2}  # weight 0 takes none while others are up
    assert picks[:4] != [A, A, A, B]  # spread, not bunched: A B A A or A A B A
    assert _schedule([3, 1]) in ((0, 0, 1, 0), (0, 1, 0, 0))


def test_a_schedule_with_huge_weights_stays_bounded() -> None:
    assert len(_schedule([256, 255, 1])) <= 4096
    assert len(_schedule([200, 200])) == 2  # divided by their gcd


def test_random_follows_the_weights() -> None:
    p = pool(Balance.RANDOM, 8, 1, 1)
    counts = collections.Counter(firsts(p, 3000))
    assert counts[A] > counts[B] + counts[C]
    assert counts[B] > 100 and counts[C] > 100


def test_least_connections_picks_the_least_loaded_and_ties_rotate() -> None:
    p = pool(Balance.LEAST_CONNECTIONS, 1, 1, 1)
    spread = []
    for _ in range(3):  # short connections, one after the other: all idle at each pick
        first = p.order(None, 0)[0]
        p.dialing(first)
        p.done(first)
        spread.append(first)
    assert spread == [A, B, C]  # spread, not the first every time
    p.dialing(A)
    p.dialing(A)
    p.dialing(B)
    assert firsts(p, 3) == [C, C, C]
    p.done(A)
    p.done(A)
    assert firsts(p, 4).count(B) == 0  # A and C idle, B busy


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(0, 5), min_size=1, max_size=12),
    steps=st.lists(st.tuples(st.sampled_from(["pick", "close"]), st.integers(0, 11)), max_size=80),
)
def test_least_connections_always_picks_a_least_loaded_backend(
    weights: list[int], steps: list[tuple[str, int]]
) -> None:
    """The load groups agree with a scan of the pool, whatever the picks and closes, and
    hold no empty group (one group per load present: bounded by the pool's size)."""
    addresses = [(f"10.0.1.{i}", 25565) for i in range(len(weights))]
    p = Pool(
        [(h, port, w) for (h, port), w in zip(addresses, weights, strict=True)],
        Balance.LEAST_CONNECTIONS,
    )
    open_on: list[tuple[str, int]] = []
    for action, n in steps:
        if action == "pick":
            first = p.order(None, 0)[0]
            takers = [b for b in p.backends if b.weight] or p.backends
            lowest = min(b.active / max(b.weight, 1) for b in takers)
            chosen = p.by_address[first]
            assert chosen in takers and chosen.active / max(chosen.weight, 1) == lowest
            p.dialing(first)
            open_on.append(first)
        elif open_on:
            p.done(open_on.pop(n % len(open_on)))
        assert sorted(p._levels) == p._loads and all(p._levels.values())
        assert sum(map(len, p._levels.values())) == sum(1 for b in p.backends if b.weight)


def test_least_connections_hears_of_closes_counted_by_the_pool_a_reload_replaced() -> None:
    old = pool(Balance.LEAST_CONNECTIONS, 1, 1)
    for _ in range(5):
        old.dialing(A)  # long sessions on A, opened before the reload
    new = Pool([(*A, 1), (*B, 1)], Balance.LEAST_CONNECTIONS, old=old)  # keeps A's counts
    assert firsts(new, 2) == [B, B]
    for _ in range(5):
        old.done(A)  # they end through the pool they were opened with
    new.dialing(B)
    assert new.order(None, 0)[0] == A  # the new pool saw A empty out


def test_lowest_latency_ties_rotate_and_a_new_number_ranks_again() -> None:
    p = pool(Balance.LOWEST_LATENCY, 1, 1, 1)
    for address in (A, B, C):
        p.checked(address, True, 1, 1, 1, "ok", rtt=0.002)
    assert set(firsts(p, 3)) == {A, B, C}
    p.checked(B, True, 1, 1, 1, "ok", rtt=0.001)
    assert firsts(p, 3) == [B, B, B]


def test_least_connections_counts_per_unit_of_weight() -> None:
    p = pool(Balance.LEAST_CONNECTIONS, 4, 1)
    for _ in range(3):
        p.dialing(A)
    assert p.order(None, 0)[0] == B  # 0/1 < 3/4
    p.dialing(B)
    assert p.order(None, 0)[0] == A  # 3/4 < 1/1


# -- passive health -----------------------------------------------------------------------


def test_consecutive_failures_mark_a_backend_down_then_one_probe_is_let_through() -> None:
    p = pool(Balance.ROUND_ROBIN, 1, 1)
    for _ in range(FALL - 1):
        assert not p.failed(A, 0.0)
    assert p.failed(A, 0.0)  # the FALL-th failure in a row: down
    assert all(list(p.order(None, 1.0)) == [B] for _ in range(4))  # no client waits on A
    due = RETRY_FIRST_S + 0.1
    assert list(p.order(None, due)) == [A, B]  # one probe, first; the other follows
    assert list(p.order(None, due)) == [B]  # the next client does not probe too
    assert p.connected(A, None, due)  # the probe went through: A is up again
    assert A in p.order(None, due) and A in p.order(None, due)


def test_a_failed_probe_backs_off_longer() -> None:
    p = pool(Balance.FAILOVER, 1, 1)
    for _ in range(FALL):
        p.failed(A, 0.0)
    first_due = RETRY_FIRST_S + 0.1
    assert p.order(None, first_due)[0] == A
    p.failed(A, first_due)
    assert list(p.order(None, first_due + RETRY_FIRST_S + 0.1)) == [B]  # doubled: not yet
    assert p.order(None, first_due + 2 * RETRY_FIRST_S + 0.1)[0] == A


def test_a_success_resets_the_count() -> None:
    p = pool(Balance.FAILOVER, 1)
    for _ in range(FALL - 1):
        p.failed(A, 0.0)
    p.connected(A, None, 0.0)
    assert not p.failed(A, 0.0)
    assert list(p.order(None, 0.0)) == [A]


def test_every_backend_down_means_an_empty_order_until_a_probe_is_due() -> None:
    p = pool(Balance.FAILOVER, 1)
    for _ in range(FALL):
        p.failed(A, 0.0)
    assert list(p.order(None, 0.5)) == []
    assert list(p.order(None, RETRY_FIRST_S + 0.1)) == [A]


def test_drained_backends_serve_when_nothing_else_is_up() -> None:
    p = pool(Balance.ROUND_ROBIN, 1, 0)
    for _ in range(FALL):
        p.failed(A, 0.0)
    assert list(p.order(None, 0.5)) == [B]


def test_a_drained_backend_is_not_redispatched_to_while_another_is_up() -> None:
    """Weight 0 takes no new connection while a weighted backend is up: not as the pick,
    and not as a connection's next try either (the same whether or not one is down)."""
    p = pool(Balance.ROUND_ROBIN, 1, 0, 1)
    assert all(B not in p.order(None, 0) for _ in range(6))
    for _ in range(FALL):
        p.failed(A, 0.0)
    assert all(list(p.order(None, 0.5)) == [C] for _ in range(3))


def test_only_drained_backends_left_still_rotate() -> None:
    p = pool(Balance.ROUND_ROBIN, 0, 0, 0)
    assert {p.order(None, 0)[0] for _ in range(6)} == {A, B, C}


def test_a_connection_dials_at_most_max_dials_backends_but_failover_tries_its_list() -> None:
    addresses = [(f"10.0.1.{n}", 25565, 1) for n in range(1, 9)]
    for strategy in (Balance.ROUND_ROBIN, Balance.LEAST_CONNECTIONS, Balance.RANDOM):
        spread = Pool(addresses, strategy)
        assert len(spread.order(None, 0)) == MAX_DIALS
        spread.failed(("10.0.1.1", 25565), 0.0)  # (the slow path bounds it as well)
        for _ in range(FALL):
            spread.failed(("10.0.1.2", 25565), 0.0)
        assert len(spread.order(None, 0.5)) == MAX_DIALS
    assert len(Pool(addresses, Balance.FAILOVER).order(None, 0)) == len(addresses)


def test_status_pings_spend_no_probe_and_move_no_cursor() -> None:
    """A ping's result never reaches the pool: were it the probe of a down backend, the
    login after it would find no probe left and be refused; were it a pick, uncached
    pings would skew the round robin of logins."""
    p = pool(Balance.ROUND_ROBIN, 1, 1)
    for _ in range(5):
        assert p.status_order() == (A, B)
    assert firsts(p, 4) == [A, B, A, B]
    for address in (A, B):
        for _ in range(FALL):
            p.failed(address, 0.0)
    assert p.status_order() == ()  # all down: the stale cache or the unreachable MOTD
    later = RETRY_FIRST_S + 0.1
    assert p.status_order() == ()
    assert list(p.order(None, later)) == [A]  # the login still gets its probe


def test_fewest_players_counts_its_own_logins_between_checks() -> None:
    """Counts come from checks seconds apart: the logins routed since the last check
    count too, or every login of a burst lands on the one emptiest backend."""
    p = pool(Balance.FEWEST_PLAYERS, 1, 1)
    p.checked(A, True, 1, 1, 1, "ok", 0.01, 5)
    p.checked(B, True, 1, 1, 1, "ok", 0.01, 7)
    picks = []
    for _ in range(6):
        first = p.order(None, 0)[0]
        p.dialing(first)
        picks.append(first)
    assert picks[:2] == [A, A]  # 5, 6: then A is at 7 as B is, and they share
    assert collections.Counter(picks) == {A: 4, B: 2}
    # the next check counts them (A: 11 with two from elsewhere); B still counts its 2
    p.checked(A, True, 1, 1, 1, "ok", 0.01, 11)
    assert p.order(None, 0)[0] == B


# -- stickiness ---------------------------------------------------------------------------


def test_a_sticky_client_is_remembered_from_when_it_left_not_from_when_it_came() -> None:
    p = pool(Balance.ROUND_ROBIN, 1, 1, 1, sticky_ttl=60)
    first = p.order("192.0.2.7", 0)[0]
    p.dialing(first)
    p.connected(first, "192.0.2.7", 0)
    p.expire_sticky(3600)  # an hour's session: the entry made at connect ran out
    p.done(first)
    p.left(first, "192.0.2.7", 3600)
    assert firsts(p, 3, now=3601, client="192.0.2.7") == [first] * 3
    p.expire_sticky(3661)
    assert "192.0.2.7" not in p.sticky


def test_sticky_clients_return_to_their_backend_until_it_expires_or_goes_down() -> None:
    p = pool(Balance.ROUND_ROBIN, 1, 1, 1, sticky_ttl=60)
    first = p.order("192.0.2.7", 0)[0]
    p.connected(first, "192.0.2.7", 0)
    assert firsts(p, 5, now=10, client="192.0.2.7") == [first] * 5
    assert len(set(firsts(p, 3, now=10, client="192.0.2.8"))) == 3  # others still rotate
    p.expire_sticky(61)
    assert "192.0.2.7" not in p.sticky
    p.connected(first, "192.0.2.7", 70)
    for _ in range(FALL):
        p.failed(first, 71)
    assert p.order("192.0.2.7", 72)[0] != first


def test_the_sticky_table_is_bounded() -> None:
    p = pool(Balance.ROUND_ROBIN, 1, 1, sticky_ttl=60)
    for i in range(MAX_STICKY + 10):
        p.connected(A, f"ip{i}", 0)
    assert len(p.sticky) == MAX_STICKY
    assert "ip0" not in p.sticky


def test_a_new_address_list_keeps_the_counts_of_the_addresses_it_keeps() -> None:
    old = pool(Balance.LEAST_CONNECTIONS, 1, 1)
    old.dialing(B)
    new = Pool([(*B, 1), (*C, 1)], Balance.LEAST_CONNECTIONS, 0.0, old)
    assert new.by_address[B].active == 1 and new.order(None, 0)[0] == C


# -- the model ----------------------------------------------------------------------------


def test_balance_weights_and_stickiness_parse_from_a_server_file() -> None:
    s = ServerDefinition.model_validate(
        {
            "id": "pool",
            "domains": ["mc.example.com"],
            "addresses": [{"address": "10.0.0.1:25565", "weight": 3}, "10.0.0.2"],
            "balance": "round-robin",
            "sticky_ttl": 600,
        }
    )
    assert s.balance is Balance.ROUND_ROBIN and s.sticky_ttl == 600
    assert [(a.host, a.port, a.weight) for a in s.addresses] == [
        ("10.0.0.1", 25565, 3),
        ("10.0.0.2", 25565, 1),
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"balance": "leastconn"}, "unknown balance 'leastconn'; accepted: 'failover'"),
        ({"balance": "fewest_players"}, "needs health_check = { type = 'minecraft' }"),
        ({"balance": "lowest_latency"}, "balance 'lowest_latency' needs health_check"),
        ({"health_check": {"type": "ping"}}, "Input should be 'tcp', 'minecraft', 'tls' or 'http'"),
        ({"health_check": {"type": "tcp", "interval": 0.01}}, "greater than or equal to 0.2"),
        ({"health_check": {"type": "http", "http_path": "health"}}, "invalid http_path"),
        ({"addresses": [{"address": "10.0.0.1", "weight": 999}]}, "invalid weight 999"),
        ({"addresses": [{"address": "10.0.0.1", "weight": True}]}, "invalid weight True"),
        ({"addresses": [{"host": "10.0.0.1"}]}, "invalid address entry"),
        ({"sticky_ttl": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_pool_settings_are_refused_with_the_reason(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        ServerDefinition.model_validate(
            {"id": "x", "domains": ["a.example.com"], "addresses": ["10.0.0.1"], **fields}
        )


# -- through the proxy --------------------------------------------------------------------


async def _ask(port: int) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET / HTTP/1.1\r\nHost: pool.example.com\r\n\r\n")
        with anyio.fail_after(5):
            return await stream.receive()


@pytest.mark.anyio
async def test_round_robin_spreads_real_connections_over_three_backends() -> None:
    async with AsyncExitStack() as stack:
        backends = [await stack.enter_async_context(backend(named(n))) for n in (b"a", b"b", b"c")]
        pool_server = server(
            "pool",
            "pool.example.com",
            addresses=[b.address for b in backends],
            balance="round_robin",
        )
        async with running_proxy([pool_server]) as proxy:
            answers = [await _ask(proxy.port) for _ in range(9)]
    assert collections.Counter(answers) == {b"a": 3, b"b": 3, b"c": 3}


@pytest.mark.anyio
async def test_a_dead_backend_is_skipped_after_fall_failures_and_no_client_sees_it() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    try:
        async with backend(named(b"alive")) as alive:
            pool_server = server(
                "pool",
                "pool.example.com",
                addresses=[dead_address, alive.address],
                balance="round_robin",
            )
            async with running_proxy([pool_server]) as proxy:
                answers = [await _ask(proxy.port) for _ in range(12)]

                def state(ctx: object) -> tuple[bool, int]:
                    pools = dict(proxy.ctx.pools)
                    b = pools["pool@test"].by_address[("127.0.0.1", dead.getsockname()[1])]
                    return b.down, b.failures

                down, failures = await proxy.on_reactor(state)
        assert answers == [b"alive"] * 12  # redispatch: every client reached the live one
        assert down and failures == FALL  # then it was left out: no more dials to it
    finally:
        dead.close()


# -- what operators see -------------------------------------------------------------------


def test_a_route_with_a_down_backend_is_degraded_and_with_all_down_is_down() -> None:
    from discoproxy.admin.server import route_row
    from discoproxy.routing import build_table

    table = build_table(
        {"test": [server("pool", "pool.example.com", addresses=["10.0.0.1", "10.0.0.2"])]}
    )
    route = table.by_id["pool@test"]
    p = Pool([(*A, 1), (*B, 1)], Balance.FAILOVER)
    p.failed(A, 0, "10.0.0.1:25565: Connection refused")
    for _ in range(FALL - 1):
        p.failed(A, 0, "10.0.0.1:25565: Connection refused")
    row = route_row(table, route, backends=p.states())
    assert row["state"] == "degraded"
    assert row["pool"][0] == {
        "address": "10.0.0.1:25565",
        "weight": 1,
        "state": "down",
        "active": 0,
        "failures": FALL,
        "dial_failures": FALL,
        "last_error": "10.0.0.1:25565: Connection refused",
        "last_check": "",
        "check_rtt_ms": None,
        "players": None,
    }
    for _ in range(FALL):
        p.failed(B, 0, "timed out")
    assert route_row(table, route, backends=p.states())["state"] == "down"
    assert route_row(table, route)["state"] == "running"  # nothing known against it
    offline = route_row(table, route, live=False)
    assert [b["state"] for b in offline["pool"]] == ["unknown", "unknown"]


def test_a_route_whose_weighted_backends_are_down_but_a_drained_one_serves_is_degraded() -> None:
    from discoproxy.admin.server import route_row
    from discoproxy.routing import build_table

    addresses = ["10.0.0.1", {"address": "10.0.0.2", "weight": 0}]
    table = build_table({"test": [server("pool", "pool.example.com", addresses=addresses)]})
    p = Pool([(*A, 1), (*B, 0)], Balance.ROUND_ROBIN)
    for _ in range(FALL):
        p.failed(A, 0)
    assert list(p.order(None, 0.5)) == [B]  # the drained one takes the connections now
    assert route_row(table, table.by_id["pool@test"], backends=p.states())["state"] == "degraded"


def test_backend_metrics_say_which_backend_is_down() -> None:
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from discoproxy.metrics import render
    from discoproxy.proxy.stats import Snapshot
    from discoproxy.routing import build_table

    p = Pool([(*A, 1), (*B, 2)], Balance.ROUND_ROBIN)
    for _ in range(FALL):
        p.failed(A, 0)
    p.dialing(B)
    snap = Snapshot(time.time(), {}, {}, {}, {}, {}, {}, {}, (0, 0), (0, 0, 0))
    snap.backends = {"pool@test": p.states()}
    text = render(snap, build_table({}), [], True).decode()
    samples = {
        (s.name, s.labels.get("backend")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("route") == "pool@test"
    }
    assert samples[("discoproxy_backend_up", "10.0.0.1:25565")] == 0
    assert samples[("discoproxy_backend_up", "10.0.0.2:25565")] == 1
    assert samples[("discoproxy_backend_active_connections", "10.0.0.2:25565")] == 1
    assert samples[("discoproxy_backend_failed_dials_total", "10.0.0.1:25565")] == FALL
    transitions = {
        (s.labels["backend"], s.labels["to"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "discoproxy_backend_transitions_total"
    }
    assert transitions[("10.0.0.1:25565", "down")] == 1  # counted once, not per failure
    assert transitions[("10.0.0.1:25565", "up")] == 0
    p.connected(A, None, RETRY_FIRST_S + 1)  # the probe went through
    assert [b.went_up for b in p.states()] == [1, 0]


def test_replicas_a_provider_holds_back_are_down_in_the_metrics() -> None:
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from discoproxy.metrics import render
    from discoproxy.model import HeldBack
    from discoproxy.proxy.stats import Snapshot
    from discoproxy.routing import build_table

    held = server("pool", "pool.example.com", addresses=["10.0.0.1"]).model_copy(
        update={"held_back": (HeldBack(address="10.0.0.2:25565", health="unhealthy"),)}
    )
    snap = Snapshot(time.time(), {}, {}, {}, {}, {}, {}, {}, (0, 0), (0, 0, 0))
    text = render(snap, build_table({"test": [held]}), [], True).decode()
    ups = {
        s.labels["backend"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "discoproxy_backend_up"
    }
    assert ups == {"10.0.0.1:25565": 1, "10.0.0.2:25565": 0}  # (no pool yet: up)


async def _motd(port: int) -> str:
    """The status answer a server-list ping to pool.example.com gets (its JSON)."""
    from discoproxy.protocol import minecraft
    from tests.proxy.helpers import handshake, read_string

    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(handshake("pool.example.com", 1) + b"\x01\x00")
        with anyio.fail_after(5):
            reply = await stream.receive()
    packet = minecraft.parse_packet(bytearray(reply))
    assert isinstance(packet, minecraft.Packet) and packet.packet_id == 0x00
    return read_string(packet.payload)


@pytest.mark.anyio
async def test_a_route_whose_backends_are_all_down_answers_at_once() -> None:

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # refuses
    address = f"127.0.0.1:{dead.getsockname()[1]}"
    try:
        down = server("pool", "pool.example.com", addresses=[address])
        async with running_proxy([down]) as proxy:
            answers = [await _ask(proxy.port) for _ in range(FALL + 1)]
            assert all(a.startswith(b"HTTP/1.1 502") for a in answers[:FALL])
            assert answers[FALL].startswith(b"HTTP/1.1 503")  # marked down: no dial at all

            assert "unreachable" in (await _motd(proxy.port)).lower()

            def failures(ctx: object) -> int:
                pools = dict(proxy.ctx.pools)
                return (
                    pools["pool@test"].by_address[("127.0.0.1", dead.getsockname()[1])].failed_total
                )

            assert await proxy.on_reactor(failures) == FALL  # the ping dialed nothing either
    finally:
        dead.close()


@pytest.mark.anyio
async def test_a_route_whose_every_backend_is_held_back_answers_at_once() -> None:
    """A provider that holds every replica back (Docker HEALTHCHECK starting or
    unhealthy) keeps the route with nothing to dial: HTTP 503, the unreachable MOTD and
    unreachable_message, and no dial."""
    from discoproxy.model import HeldBack
    from tests.proxy.helpers import handshake

    held = ServerDefinition.model_validate(
        {
            "id": "pool",
            "domains": ["pool.example.com"],
            "addresses": [],
            "held_back": [HeldBack(address="10.0.0.1:25565", health="starting")],
        }
    )
    async with running_proxy([held], unreachable_message="{server} is not ready") as proxy:
        assert (await _ask(proxy.port)).startswith(b"HTTP/1.1 503")
        assert "unreachable" in (await _motd(proxy.port)).lower()
        async with await anyio.connect_tcp("127.0.0.1", proxy.port) as stream:
            await stream.send(handshake("pool.example.com", 2))
            with anyio.fail_after(5):
                kick = await stream.receive()
        assert b"is not ready" in kick


def test_a_server_with_no_address_needs_a_provider_holding_its_backends_back() -> None:
    with pytest.raises(ValidationError, match="at least one address is required"):
        ServerDefinition.model_validate({"id": "x", "domains": ["x.example.com"], "addresses": []})


def test_a_new_table_that_changes_a_pools_settings_gets_them() -> None:
    from discoproxy.proxy.balance import Pools
    from discoproxy.routing import build_table

    def route(**extra: object) -> object:
        pooled = server("pool", "pool.example.com", addresses=["10.0.0.1", "10.0.0.2"], **extra)
        return build_table({"test": [pooled]}).by_id["pool@test"]

    pools = Pools()
    first = pools.get(route())  # type: ignore[arg-type]
    first.dialing(A)
    sticky = pools.get(route(sticky_ttl=60))  # type: ignore[arg-type]
    assert sticky.sticky_ttl == 60  # a reload that only turns stickiness on is honoured
    assert sticky.by_address[A].active == 1  # and the counts carry over
    assert pools.get(route(balance="round_robin")).strategy is Balance.ROUND_ROBIN  # type: ignore[arg-type]


def test_a_held_back_replica_still_draining_is_one_series_and_down() -> None:
    """A replica its HEALTHCHECK holds back while players are still on it: listed once
    (draining), and down (it takes no new connection), in /metrics and the API."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from discoproxy.admin.server import route_row
    from discoproxy.metrics import render
    from discoproxy.model import HeldBack
    from discoproxy.proxy.balance import BackendState
    from discoproxy.proxy.stats import Snapshot
    from discoproxy.routing import build_table

    held = server("pool", "pool.example.com", addresses=["10.0.0.1"]).model_copy(
        update={"held_back": (HeldBack(address="10.0.0.2:25565", health="unhealthy"),)}
    )
    states = [
        BackendState(A, 1, "up", 0, 0, 0, ""),
        BackendState(B, 1, "draining", 3, 0, 0, ""),  # left the pool, 3 players still on
    ]
    snap = Snapshot(time.time(), {}, {}, {}, {}, {}, {}, {}, (0, 0), (0, 0, 0))
    snap.backends["pool@test"] = states
    table = build_table({"test": [held]})
    samples = [
        (s.name, s.labels["backend"], s.value)
        for family in text_string_to_metric_families(render(snap, table, [], True).decode())
        for s in family.samples
        if s.name in ("discoproxy_backend_up", "discoproxy_backend_active_connections")
    ]
    assert sorted(samples) == [
        ("discoproxy_backend_active_connections", "10.0.0.1:25565", 0),
        ("discoproxy_backend_active_connections", "10.0.0.2:25565", 3),
        ("discoproxy_backend_up", "10.0.0.1:25565", 1),
        ("discoproxy_backend_up", "10.0.0.2:25565", 0),
    ]
    row = route_row(table, table.by_id["pool@test"], backends=states)
    assert [b["address"] for b in row["pool"]] == ["10.0.0.1:25565", "10.0.0.2:25565"]


def test_one_outage_seen_by_dials_then_checks_counts_one_down() -> None:
    from discoproxy.health import _apply
    from discoproxy.model import HealthCheck
    from discoproxy.proxy.balance import Pools
    from discoproxy.routing import build_table

    table = build_table({"test": [server("pool", "pool.example.com", addresses=["10.0.0.1"])]})
    route = table.by_id["pool@test"]

    class Ctx:
        pools = Pools()
        speaks_for_all = True

        class events:
            @staticmethod
            def put(event: str, data: object) -> None:
                pass

    ctx = Ctx()
    pool = ctx.pools.get(route)
    a = ("10.0.0.1", 25565)
    for _ in range(FALL):
        pool.failed(a, 0.0, "refused")  # the dials see it first: one down
    check = HealthCheck(type="tcp", rise=2, fall=3)
    for streak in (1, 2, 3):  # then the checks' fall: the same outage
        _apply(ctx, route, a, check, False, streak, "refused", None, None)  # type: ignore[arg-type]
    for streak in (1, 2):
        _apply(ctx, route, a, check, True, streak, "ok", 0.001, None)  # type: ignore[arg-type]
    backend = pool.by_address[a]
    assert (backend.went_down, backend.went_up) == (1, 1)


# -- with backends down: the same rules, at a cost flat in pool size ----------------------

SPREAD = (
    Balance.FAILOVER,
    Balance.ROUND_ROBIN,
    Balance.LEAST_CONNECTIONS,
    Balance.LOWEST_LATENCY,
    Balance.FEWEST_PLAYERS,
)


@settings(max_examples=300, deadline=None)
@given(
    strategy=st.sampled_from(SPREAD),
    weights=st.lists(st.integers(0, 3), min_size=1, max_size=7),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["fail", "ok", "check_down", "check_up", "order"]), st.integers(0, 6)
        ),
        max_size=60,
    ),
)
def test_with_backends_down_every_order_keeps_the_rules(
    strategy: Balance, weights: list[int], steps: list[tuple[str, int]]
) -> None:
    """Whatever went down or up, by dials or checks: an order is the due probe (at most
    one), then backends up only, each once, a rotation of those up from the strategy's
    pick (drained ones only when nothing weighted is up), bounded."""
    addresses = [(f"10.0.2.{n}", 25565) for n in range(len(weights))]
    p = Pool([(*a, w) for a, w in zip(addresses, weights, strict=True)], strategy)
    for n, address in enumerate(addresses):
        p.checked(address, True, 1, 1, 1, "ok", 0.001 * (n % 3 + 1), n % 4)
    now = 0.0
    for op, which in steps:
        now += 0.7
        address = addresses[which % len(addresses)]
        if op == "fail":
            p.failed(address, now)
        elif op == "ok":
            p.connected(address, None, now)
        elif op == "check_up":
            p.checked(address, True, 1, 1, 1, "ok", 0.001 * (which % 3 + 1), which % 5)
        elif op == "check_down":
            p.checked(address, False, 1, 1, 1, "refused")
        else:
            due = [
                b.address
                for b in p.backends
                if b.retry_at and not b.checked_down and now >= b.retry_at
            ]
            loads = {b.address: b.active / max(b.weight, 1) for b in p.backends}
            players = {  # fewest_players: the check's count, moved by our connections since
                b.address: (b.players or 0) + (b.active - b.active_at_check) / max(b.weight, 1)
                for b in p.backends
            }
            order = list(p.order(None, now))
            if order:  # its first dial is counted open, as a connection's is
                p.dialing(order[0])
            limit = len(addresses) if strategy is Balance.FAILOVER else MAX_DIALS
            assert len(order) == len(set(order)) <= limit
            probed = bool(due and order and order[0] == due[0])
            if probed:
                order = order[1:]  # the one probe, first
            assert all(not p.by_address[a].down for a in order), order
            weighted = [b.address for b in p.backends if not b.down and b.weight]
            up = weighted or [b.address for b in p.backends if not b.down]
            if not up:
                assert order == []
                continue
            start = up.index(order[0])
            assert order == (up[start:] + up[:start])[: limit - probed]
            if strategy is Balance.FAILOVER:
                assert order[0] == up[0]
            elif strategy is Balance.LEAST_CONNECTIONS and weighted:
                assert loads[order[0]] == min(loads[a] for a in up), (order, loads)
            elif strategy is Balance.FEWEST_PLAYERS and weighted:
                assert players[order[0]] == min(players[a] for a in up), (order, players)
            elif strategy is Balance.LOWEST_LATENCY:
                rtts = {a: p.by_address[a].rtt for a in up}
                assert rtts[order[0]] == min(rtts.values()), (order, rtts)


def test_round_robin_with_a_backend_down_spreads_over_the_others_by_weight() -> None:
    addresses = [(f"10.0.3.{n}", 25565, w) for n, w in enumerate((1, 2, 3, 1))]
    p = Pool(addresses, Balance.ROUND_ROBIN)
    p.checked(("10.0.3.0", 25565), False, 1, 1, 1, "refused")
    picks = collections.Counter(p.order(None, 0)[0] for _ in range(6 * 20))
    assert picks == {("10.0.3.1", 25565): 40, ("10.0.3.2", 25565): 60, ("10.0.3.3", 25565): 20}


POOL_SIZE = 400


def test_choosing_with_backends_down_does_not_scan_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool of 400 with half of it down: a connection's order reads no backend's
    state beyond the few it returns (the pool's backends up are kept from the last
    transition); a probe due is looked for once, not by every connection.

    400, not more: building the pool and taking half of it down cost the square of its
    size (2,000 took 9 s), while a scan by every connection reads 200 backends or more
    each time, 40,000+ for the 201 connections below against a bound of 602."""
    from discoproxy.proxy import balance

    reads = collections.Counter[str]()
    down = balance.Backend.down

    def counted(self: balance.Backend) -> bool:
        reads["down"] += 1
        return down.fget(self)  # type: ignore[no-any-return,misc]

    strategies = (
        Balance.ROUND_ROBIN,
        Balance.LEAST_CONNECTIONS,
        Balance.FAILOVER,
        Balance.FEWEST_PLAYERS,
        Balance.LOWEST_LATENCY,
    )
    for key in ("_players", "_load", "_latency"):  # a scan's per-backend measures
        measure = getattr(balance, key)
        monkeypatch.setattr(balance, key, lambda b, m=measure, k=key: reads.update([k]) or m(b))
    for strategy in strategies:
        addresses = [(f"10.1.{n // 250}.{n % 250}", 25565, 1) for n in range(POOL_SIZE)]
        p = Pool(addresses, strategy)
        for n, (host, port, _) in enumerate(addresses):
            p.checked((host, port), True, 1, 1, 1, "ok", 0.001 + n % 7 / 1000, n % 11)
        for host, port, _ in addresses[::2]:
            p.checked((host, port), False, 1, 1, 1, "refused")
        for _ in range(FALL):
            p.failed(("10.1.0.1", 25565), 0.0)  # one down by dials: probed when due
        monkeypatch.setattr(balance.Backend, "down", property(counted))
        reads.clear()
        orders = []
        for n in range(200):  # before the probe is due; each dialed, as a connection does
            orders.append(p.order(None, 1.0 + n * 0.004))
            p.dialing(orders[-1][0])
        orders.append(p.order(None, RETRY_FIRST_S + 1.0))  # the probe's turn
        monkeypatch.setattr(balance.Backend, "down", down)
        assert orders[-1][0] == ("10.1.0.1", 25565)
        assert all(("10.1.0.1", 25565) not in order for order in orders[:-1])
        # a scan reads POOL_SIZE each; lowest_latency ranks the half up once
        assert sum(reads.values()) <= POOL_SIZE // 2 + 201 * 2, (strategy, reads)
        reads.clear()
        p = Pool(addresses, strategy)  # and with every backend up
        for n, (host, port, _) in enumerate(addresses):
            p.checked((host, port), True, 1, 1, 1, "ok", 0.001 + n % 7 / 1000, n % 11)
        reads.clear()
        for _ in range(200):
            p.dialing(p.order(None, 1.0)[0])
        # lowest_latency: ranks once
        assert sum(reads.values()) <= POOL_SIZE + 200, (strategy, reads)


def test_every_routed_backend_has_its_series_before_any_connection() -> None:
    """A route nothing has dialed yet has no pool; its backends are up (nothing known
    against them, as /api/routes says) in /metrics too, so an alert on backend_up sees
    every backend from the start, not only those of routes in use."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from discoproxy.metrics import render
    from discoproxy.proxy.stats import Snapshot
    from discoproxy.routing import build_table

    fresh = server("fresh", "fresh.example.com", addresses=["10.0.0.1:25565", "10.0.0.2:25565"])
    used = server("used", "used.example.com", addresses=["10.0.0.3:25565"])
    snap = Snapshot(time.time(), {}, {}, {}, {}, {}, {}, {}, (0, 0), (0, 0, 0))
    p = Pool([("10.0.0.3", 25565, 1)], Balance.FAILOVER)
    for _ in range(FALL):
        p.failed(("10.0.0.3", 25565), 0)
    snap.backends = {"used@test": p.states()}
    text = render(snap, build_table({"test": [fresh, used]}), [], True).decode()
    up = {
        (s.labels["route"], s.labels["backend"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "discoproxy_backend_up"
    }
    assert up == {
        ("fresh@test", "10.0.0.1:25565"): 1,
        ("fresh@test", "10.0.0.2:25565"): 1,
        ("used@test", "10.0.0.3:25565"): 0,  # its pool's state
    }
