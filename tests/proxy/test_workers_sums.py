"""The control plane's sums over workers (``WorkerSet.snapshot``/``totals``) with
scripted channels: a worker that does not answer in time adds its last answer's
counters, a dead worker's last counters stay in its slot after its replacement starts
from zero; the gauges are only the answering workers'."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from discoproxy.config import ProxyConfig
from discoproxy.proxy import workers as workers_module
from discoproxy.proxy.server import ProxyContext
from discoproxy.proxy.stats import RouteStats, Snapshot
from discoproxy.proxy.workers import WorkerSet, merge_snapshots
from discoproxy.routing import Registry
from tests.proxy.helpers import server

pytestmark = pytest.mark.anyio
LISTENER = "127.0.0.1:25565"


def numbers(closed: int, open_: int, accepted: int) -> Snapshot:
    """A worker's snapshot: ``closed`` connections of 10 bytes up, ``open_`` of 5 so far."""
    snap = merge_snapshots(())
    stats = RouteStats()
    stats.closed, stats.bytes_up, stats.players = closed, 10 * closed, open_
    snap.routes["mc@test"] = stats
    snap.accepted[LISTENER] = accepted
    snap.open_tcp[(LISTENER, "mc@test")] = [open_, 5 * open_, 0]
    return snap


class Scripted:
    """A worker's channel whose answers the test sets (None: it never answers)."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}

    async def request(self, kind: str, payload: Any = None) -> Any:
        answer = self.answers.get(kind)
        if answer is None:
            await anyio.sleep_forever()
        return answer


def worker_set() -> tuple[WorkerSet, list[Scripted]]:
    registry = Registry()
    registry.apply_snapshot("test", [server("mc", "mc.example.com", addresses=["x:1"])])
    config = ProxyConfig.model_validate({"bind": ["127.0.0.1:0"]})
    workers = WorkerSet(ProxyContext(config, registry), 2)
    channels = [Scripted(), Scripted()]
    for worker, channel in zip(workers.workers, channels, strict=True):
        worker.channel = channel  # type: ignore[assignment]
        worker.ready = True
    return workers, channels


def answer(channel: Scripted, snap: Snapshot | None) -> None:
    channel.answers["snapshot"] = snap
    channel.answers["totals"] = snap.totals() if snap is not None else None


def seen(snap: Snapshot) -> tuple[int, int, int, int, int]:
    """(accepted, connections total, bytes up, open, players) as /metrics sums them."""
    totals = snap.totals()
    return (
        snap.accepted.get(LISTENER, 0),
        totals["connections_total"],
        totals["bytes_up"],
        totals["active"],
        snap.routes["mc@test"].players,
    )


async def test_a_silent_worker_adds_its_last_counters_and_no_gauge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers_module, "WORKER_ANSWER_TIMEOUT_S", 0.05)
    workers, (first, second) = worker_set()
    answer(first, numbers(closed=3, open_=1, accepted=4))
    answer(second, numbers(closed=5, open_=2, accepted=7))
    assert seen(await workers.snapshot()) == (11, 11, 95, 3, 3)
    assert (await workers.totals())["connections_total"] == 11
    answer(second, None)  # busy: no answer in time
    # its 2 open connections count as connections and bytes still, not as open
    assert seen(await workers.snapshot()) == (11, 11, 95, 1, 1)
    assert await workers.totals() == {
        "active": 1,
        "connections_total": 11,
        "bytes_up": 95,
        "bytes_down": 0,
    }


async def test_a_replaced_workers_counters_stay_in_its_slot() -> None:
    workers, (first, second) = worker_set()
    answer(first, numbers(closed=3, open_=0, accepted=3))
    answer(second, numbers(closed=5, open_=2, accepted=7))
    assert seen(await workers.snapshot()) == (10, 10, 90, 2, 2)
    await workers.totals()
    dead = workers.workers[1]
    dead.channel = None  # its process ended: what _run_once does then
    dead.ready = False
    workers._retire(dead)
    assert seen(await workers.snapshot()) == (10, 10, 90, 0, 0)  # away: its last counters
    assert (await workers.totals())["connections_total"] == 10
    replacement = Scripted()
    dead.channel = replacement  # type: ignore[assignment]
    dead.ready = True
    answer(replacement, numbers(closed=0, open_=0, accepted=0))  # starts from zero
    assert seen(await workers.snapshot()) == (10, 10, 90, 0, 0)
    answer(replacement, numbers(closed=1, open_=0, accepted=1))  # and counts on top
    assert seen(await workers.snapshot()) == (11, 11, 100, 0, 0)
    assert (await workers.totals())["connections_total"] == 11


def test_healthz_fails_once_no_worker_has_been_ready_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker being replaced keeps /healthz up (no restart of the whole proxy for
    it); every worker dying as it starts for NO_WORKER_READY_S does not."""
    clock = [1000.0]
    monkeypatch.setattr(workers_module.time, "monotonic", lambda: clock[0])
    workers = WorkerSet(ProxyContext(ProxyConfig(), Registry()), 2)
    workers._running = True
    workers._seen_ready = clock[0]
    workers.workers[0].ready = True
    assert workers.alive
    workers.workers[0].ready = False  # both down now: restarting, or crash-looping
    clock[0] += workers_module.NO_WORKER_READY_S - 1
    assert workers.alive
    clock[0] += 2
    assert not workers.alive
    workers.workers[1].ready = True  # one came back
    assert workers.alive


async def test_a_ban_list_reaches_a_worker_that_is_still_starting() -> None:
    """A starting worker's init carried the list in force then; a newer one posted while
    it starts is queued for it (asked of the ready ones only, it would miss it)."""
    import pickle

    from discoproxy.guard import BanList

    workers, (first, _) = worker_set()
    first.answers["bans"] = 0
    starting = workers.workers[1]
    starting.ready = False
    bans = BanList()
    await workers.apply_bans(bans)
    queued = [pickle.loads(message)[0] for message, _ in list(starting.outbox._queue)]  # type: ignore[attr-defined]
    assert queued == ["bans"] and workers.bans is bans
