"""State shared across table swaps, workers and processes, as a review found it going
wrong (each docstring says how it went wrong before its fix): pools that share backends
after a swap (a list that comes back, an old table's pool), the health checker's replay
to a worker started again (a flapping backend, a list that changed), a UDP port route
that comes back while workers still serve its sessions, and sockets received over a
channel (not inherited by a worker spawned then)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from discoproxy.model import Balance
from discoproxy.proxy.balance import Pools
from discoproxy.routing import build_table
from tests.proxy.helpers import server
from tests.support import running_proxy

A, B, C = "10.0.0.1:25565", "10.0.0.2:25565", "10.0.0.3:25565"
AA = ("10.0.0.1", 25565)


def _route(addresses: list[Any], **extra: Any) -> Any:
    """The route of one server, in a table of its own (a table swap: a new Route)."""
    table = build_table(
        {"test": [server("pool", "pool.example.com", addresses=addresses, **extra)]}
    )
    return table.by_id["pool@test"]


# -- 1. a pool reused after a table swap back keeps stale caches ----------------------------


@pytest.mark.parametrize("strategy", [Balance.ROUND_ROBIN, Balance.FAILOVER])
def test_a_pool_reused_when_its_address_list_comes_back_knows_a_backend_went_down(
    strategy: Balance,
) -> None:
    """Table (A, B) → pool P1, a connection keeps P1 alive (Pools.prune keeps it); the
    table becomes (A, B, C) → P2 shares A's Backend and becomes its ``newest``; A fails
    its checks (``_apply`` reaches P2, the current pool: P2 recounts, and A.newest is
    P2, so P1 does not); the table goes back to (A, B): ``Pools._get`` finds P1 by key
    and returns it as is. P1's ``_down`` is still 0, its ``_status_up`` still lists A:
    every new connection dials the down A first, every status ping asks it, for as long
    as A stays down (its failed dials there change nothing: it is down already).
    ``status_order`` is a regression (it was computed from the backends each call)."""
    pools = Pools()
    first = pools.get(_route([A, B], balance=strategy.value))
    first.dialing(AA)  # a long-lived connection on P1
    second = pools.get(_route([A, B, C], balance=strategy.value))
    assert second is not first
    second.checked(AA, False, 1, 1, 1, "connection refused")  # health._apply, current pool
    assert second.by_address[AA].down
    again = pools.get(_route([A, B], balance=strategy.value))
    assert again is not second  # (a fresh pool for the list, or the old one: either way)
    assert again.by_address[AA].down  # the shared Backend says so...
    assert AA not in again.status_order()  # ...but the reused pool's caches do not
    orders = [tuple(again.order(None, 100.0)) for _ in range(4)]
    assert all(AA not in order for order in orders), orders


def test_a_pool_reused_when_its_address_list_comes_back_restores_its_weights() -> None:
    """The same reuse: P2 drained A (weight 0) and mutated the shared Backend's weight;
    P1, reused for (A:1, B:1), keeps A's weight 0 in its Backend (states() shows it
    "draining") while its precomputed schedule still sends A half the connections."""
    pools = Pools()
    first = pools.get(_route([A, B], balance="round_robin"))
    first.dialing(AA)
    pools.get(_route([{"address": A, "weight": 0}, B, C], balance="round_robin"))
    again = pools.get(_route([A, B], balance="round_robin"))
    assert again.by_address[AA] is first.by_address[AA]
    state = {s.address: s for s in again.states()}[AA]
    firsts = {again.order(None, 0.0)[0] for _ in range(4)}
    # either it takes connections and says "up", or it is drained and takes none
    assert (state.state == "up") == (AA in firsts), (state, firsts)


@pytest.mark.parametrize(
    ("strategy", "sticky"), [(Balance.RANDOM, 0.0), (Balance.ROUND_ROBIN, 600.0)]
)
def test_a_reused_pool_does_not_raise_for_a_backend_that_came_back_meanwhile(
    strategy: Balance, sticky: float
) -> None:
    """The same reuse, the other way round: A went down through P1 (P1's ``_up_some`` is
    [B], ``_down`` 1), the table became (A, B, C) → P2, A came back through P2 (P2
    recounts, P1 does not), the table is (A, B) again → P1, still on its slow path. Its
    pick reads the live Backend (random's ``not backends[index].down``, a sticky
    client's remembered backend) and gets A, which is not in the stale ``_some_at``:
    ``order`` raises KeyError, an internal error for that connection (random: about
    half the connections; sticky: every connection of a client remembered on A). The
    old code scanned the backends on that path and never raised."""
    pools = Pools()
    route = _route([A, B], balance=strategy.value, sticky_ttl=sticky)
    first = pools.get(route)
    first.dialing(AA)  # a long-lived connection on P1
    if sticky:
        first.connected(AA, "192.0.2.7", 0.0)  # the client is remembered on A
    for _ in range(3):
        first.failed(AA, 1.0)  # A down through P1
    second = pools.get(_route([A, B, C], balance=strategy.value, sticky_ttl=sticky))
    assert second.by_address[AA].down
    second.connected(AA, None, 10.0)  # a probe through P2 reached it: up
    assert not second.by_address[AA].down
    again = pools.get(_route([A, B], balance=strategy.value, sticky_ttl=sticky))
    assert again.by_address[AA] is first.by_address[AA]
    for n in range(40):
        again.order("192.0.2.7", 20.0 + n)  # KeyError on HEAD


def test_an_old_tables_pool_does_not_raise_for_a_backend_that_came_back_meanwhile() -> None:
    """No swap back needed: a connection routed on the previous table (a Login Start
    that comes a moment after its handshake) orders from that table's pool, P1
    (``Pools.get`` of its Route, cached in ``_by_route``). A went down through P1 (an
    old connection's failed dials: P1 and P2 recount), then came back through P2 (P2
    only, ``newest``): P1's slow path picks the live-up A that its stale ``_some_at``
    lacks, KeyError (random here; a sticky client remembered on A the same)."""
    pools = Pools()
    old_route = _route([A, B], balance="random")
    first = pools.get(old_route)
    second = pools.get(_route([A, B, C], balance="random"))  # the table swapped
    for _ in range(3):
        first.failed(AA, 1.0)  # an old connection's dials: A down (both recount)
    assert second.by_address[AA].down
    second.connected(AA, None, 10.0)  # up again through the current pool only
    assert pools.get(old_route) is first
    for n in range(40):
        first.order(None, 20.0 + n)  # KeyError


# -- 2. health: a late pool hears a flapping backend as up ----------------------------------


class _Probe:
    """``health.probe`` replaced: passes or fails as told."""

    def __init__(self) -> None:
        self.ok = True

    async def __call__(self, *args: Any) -> None:
        if not self.ok:
            raise ConnectionRefusedError(111, "Connection refused")


def _checker(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, _Probe, list[tuple[Any, ...]]]:
    from discoproxy import health
    from discoproxy.health import HealthChecker

    fake = _Probe()
    monkeypatch.setattr(health, "probe", fake)
    told: list[tuple[Any, ...]] = []
    planes = SimpleNamespace(call=lambda fn, *verdict: told.append(verdict))
    checker = HealthChecker(SimpleNamespace(status=None, planes=planes))  # type: ignore[arg-type]
    return checker, fake, told


def _down_in(verdicts: list[tuple[Any, ...]], route: Any) -> bool:
    """What a pool that heard ``verdicts`` (in order, as restore_verdicts or _apply
    give them) holds for 10.0.0.1:25565 of ``route``'s pool."""
    from discoproxy.proxy.workers import restore_verdicts

    pools = Pools()
    restore_verdicts(SimpleNamespace(pools=pools), verdicts)  # type: ignore[arg-type]
    return pools.get(route).by_address[AA].down


@pytest.mark.anyio
async def test_a_late_pool_hears_a_backend_that_failed_again_before_rise_as_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rise = 3, fall = 2: two failures take A down; one pass (short of rise), then one
    failure: every running pool still holds A down (a failed streak of 1 < fall changes
    nothing there). ``verdicts()`` replays the failed streak only when the last check
    passed (``t.down and t.last_ok``), so a worker started now is told (fail, streak 1)
    and its fresh pool takes A as up: that worker sends its clients to a down backend."""
    checker, fake, told = _checker(monkeypatch)
    check = {"type": "tcp", "interval": 1.0, "timeout": 1.0, "rise": 3, "fall": 2}
    route = _route([A, B], health_check=check)
    checker.table_changed(build_table({"test": [route.server]}))
    key, target = next((k, t) for k, t in checker._targets.items() if t.address == AA)
    limiter = asyncio.Semaphore(1)
    for ok in (False, False, True, False):
        fake.ok = ok
        await checker._check(key, target, limiter)
    route = target.route
    assert _down_in(told, route) is True  # a running pool, which heard each verdict
    assert _down_in(checker.verdicts(), route) is True  # a worker started now


@pytest.mark.anyio
async def test_a_late_pool_hears_a_backend_down_before_its_list_changed_as_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fails (fall = 1) while the route is (A, B); a replica is added: (A, B, C). The
    running pools' new pool shares A's Backend (checked down); the checker makes a new
    target for A (keyed by the address list too) with ``down = False``. A passes once,
    short of rise = 2: the running pools hold it down, ``verdicts()`` tells a worker
    started now (ok, streak 1) and its pool has A up."""
    checker, fake, told = _checker(monkeypatch)
    check = {"type": "tcp", "interval": 1.0, "timeout": 1.0, "rise": 2, "fall": 1}
    before = _route([A, B], health_check=check)
    checker.table_changed(build_table({"test": [before.server]}))
    key, target = next((k, t) for k, t in checker._targets.items() if t.address == AA)
    limiter = asyncio.Semaphore(1)
    fake.ok = False
    await checker._check(key, target, limiter)
    after = _route([A, B, C], health_check=check)
    checker.table_changed(build_table({"test": [after.server]}))
    key, target = next((k, t) for k, t in checker._targets.items() if t.address == AA)
    fake.ok = True
    await checker._check(key, target, limiter)

    from discoproxy.proxy.workers import restore_verdicts

    running = Pools()  # a running worker: the old list's pool first, then the new one's
    ctx = SimpleNamespace(pools=running)
    running.get(before)
    restore_verdicts(ctx, told)  # type: ignore[arg-type]
    assert running.get(target.route).by_address[AA].down is True
    assert _down_in(checker.verdicts(), target.route) is True  # a worker started now


# -- 3. workers: a UDP port route that comes back is refused its own port --------------------


class _UdpEcho(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            self.sock.sendto(data, peer)


def _echoed(client: socket.socket, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.sendto(b"ping", ("127.0.0.1", port))
        try:
            if client.recv(64) == b"ping":
                return True
        except OSError:
            pass
    return False


def test_a_udp_port_route_that_comes_back_while_a_worker_still_has_sessions_listens_again(
    tmp_path: Path,
) -> None:
    """workers = 2, a UDP port route with a session open. The route leaves the table:
    the control plane closes its copies of the group, each worker *retires* its UDP
    listener (still bound, serving its sessions until they end: ports.py sync). The
    route comes back: ``WorkerSet._open_port`` → ``open_group``, whose new probe binds
    the port without SO_REUSEPORT/SO_REUSEADDR and hits the workers' retired sockets:
    EADDRINUSE, "cannot listen on …/udp", the route stays unserved (until some later
    table change retries after the sessions ended). Before the probe the new group
    joined, and ports.py's "a worker's port came back with a new socket" path ran."""
    echo = _UdpEcho()
    echo.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        listen = probe.getsockname()[1]
    route = f'addresses = ["127.0.0.1"]\nports = ["{listen}:{echo.port}/udp"]\n'
    config = 'workers = 2\nport_routes_bind = "127.0.0.1"\nudp_session_timeout = 600\n'
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(0.2)
    client.bind(("127.0.0.2", 0))
    try:
        with running_proxy(tmp_path, {"udp.toml": route}, config) as proxy:
            proxy.wait_for_line("worker 1 ready")
            assert _echoed(client, listen, 10), proxy.output()  # a session, kept open
            servers = next(p for p in tmp_path.rglob("udp.toml"))
            servers.write_text('domains = ["other.example.com"]\naddresses = ["127.0.0.1"]\n')
            proxy.wait_for_line(rf"port {listen}/udp closed", timeout=10)
            servers.write_text(route)
            time.sleep(3)  # the file provider's rebuild, the control plane's open
            assert "cannot listen on" not in proxy.output(), proxy.output()
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other.settimeout(0.2)
            other.bind(("127.0.0.3", 0))
            with other:
                assert _echoed(other, listen, 5), proxy.output()  # a new client is served
    finally:
        client.close()
        echo.sock.close()


def test_a_tcp_port_route_reopened_before_the_workers_closed_the_old_group_listens() -> None:
    """The TCP side of the same probe: a port route leaves the table and comes back
    before the workers applied the table without it (a worker decodes a 10,000-route
    table in ~0.6 s; a container restart is a stop and a start). The control plane's
    ``open_group`` probe meets the workers' copies, still listening: EADDRINUSE, and the
    port stays closed until some later table change. Before the probe the new group
    joined the old one (same uid, SO_REUSEPORT) and the old copies closed moments later."""
    from discoproxy.config import ProxyConfig
    from discoproxy.proxy.ports import port_socket
    from discoproxy.proxy.workers import open_group

    config = ProxyConfig.model_validate({"port_routes_bind": "127.0.0.1"})
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    key = ("tcp", port)
    old = open_group(lambda: port_socket(config, key), ("127.0.0.1", port), 2, True)
    try:  # the workers' copies of the old group: still open, still listening
        new = open_group(lambda: port_socket(config, key), ("127.0.0.1", port), 2, True)
        for sock in new:
            sock.close()
    finally:
        for sock in old:
            sock.close()


# -- 4. the control plane's received hand-off sockets are inheritable -------------------------


@pytest.mark.anyio
async def test_a_socket_received_over_a_channel_is_not_inherited_by_a_worker_spawned_then() -> None:
    """The commit that starts workers one at a time says uvloop's spawn passes every
    inheritable fd to the child. A handed client's socket reaches the control plane by
    SCM_RIGHTS (``Channel.run`` → ``received_fds``), and Python's recvmsg does not set
    O_CLOEXEC on what it receives: until ``WorkerSet._forward`` runs (a task, a loop
    turn later) that fd is inheritable, so a worker restarted in that turn keeps the
    client's socket open for its whole life (the client never sees its close)."""
    from discoproxy.proxy.channel import Channel, socket_pair

    got: list[bool] = []

    async def handler(kind: str, payload: Any, fds: list[int]) -> None:
        got.extend(os.get_inheritable(fd) for fd in fds)
        for fd in fds:
            os.close(fd)

    ours, theirs = socket_pair()
    theirs.set_inheritable(False)
    receiver = Channel(ours, handler)
    sender = Channel(theirs, handler)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(receiver.run()), loop.create_task(sender.run())]
    client, peer = socket.socketpair()
    try:
        async with asyncio.timeout(5):
            await sender.request("handoff", None, [client.fileno()])
    finally:
        client.close()
        peer.close()
        sender.close()
        receiver.close()
        await asyncio.wait(tasks, timeout=1)
    assert got == [False]


# -- 5. a port route's port another process holds ---------------------------------------------

_HOLD = """
import socket, sys, time
kind = socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM
sock = socket.socket(socket.AF_INET, kind)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("127.0.0.1", int(sys.argv[2])))
if kind == socket.SOCK_STREAM:
    sock.listen(8)
print("held", flush=True)
time.sleep(60)
"""


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_a_port_another_process_holds_is_refused_though_our_binds_would_share_it(
    protocol: str,
) -> None:
    """A UDP socket binds beside another's with SO_REUSEADDR, and a worker group's with
    SO_REUSEPORT joins another process's group: a second discoproxy (an old container
    on the host network, say) shared a port route's traffic with the first, silently.
    Our own sockets on the port (a retired UDP listener, a worker's copy) are let be."""
    import subprocess
    import sys

    from discoproxy.config import ProxyConfig
    from discoproxy.proxy.ports import claim_port, port_socket
    from discoproxy.proxy.workers import open_group

    config = ProxyConfig.model_validate({"port_routes_bind": "127.0.0.1"})
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    port = _free_port(kind)
    key = (protocol, port)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, protocol, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OSError, match="held by another process"):
            claim_port(config, key, [os.getpid()])
        claim_port(config, key, [os.getpid(), holder.pid])  # were it ours: let be
    finally:
        holder.kill()
        holder.wait()
    ours = open_group(lambda: port_socket(config, key), ("127.0.0.1", port), 2, protocol == "tcp")
    try:
        claim_port(config, key, [os.getpid()])  # our own group on it: not another's
    finally:
        for sock in ours:
            sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_udp_port_route_on_a_port_another_process_holds_is_not_served_and_says_why(
    tmp_path: Path, workers: int
) -> None:
    import subprocess
    import sys

    port = _free_port(socket.SOCK_DGRAM)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, "udp", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        route = f'addresses = ["127.0.0.1"]\nports = ["{port}:9/udp"]\n'
        config = f'workers = {workers}\nport_routes_bind = "127.0.0.1"\n'
        with running_proxy(tmp_path, {"udp.toml": route}, config) as proxy:
            proxy.wait_for_line(
                rf"cannot listen on {port}/udp for udp@file: held by another process", timeout=10
            )
    finally:
        holder.kill()
        holder.wait()


def test_a_udp_port_route_that_comes_back_after_another_process_took_its_port_is_refused(
    tmp_path: Path,
) -> None:
    """One process: a UDP port route that leaves keeps its listener retired, shut once no
    session is left. Coming back, it was revived, binding again with SO_REUSEADDR,
    beside whatever took the port meanwhile, without the check a new bind gets."""
    import subprocess
    import sys

    port = _free_port(socket.SOCK_DGRAM)
    route = f'addresses = ["127.0.0.1"]\nports = ["{port}:9/udp"]\n'
    config = 'workers = 1\nport_routes_bind = "127.0.0.1"\n'
    with running_proxy(tmp_path, {"udp.toml": route}, config) as proxy:
        proxy.wait_for_line(rf"port {port}/udp open for udp@file")
        servers = next(p for p in tmp_path.rglob("udp.toml"))
        servers.write_text('domains = ["other.example.com"]\naddresses = ["127.0.0.1"]\n')
        proxy.wait_for_line(rf"port {port}/udp closed", timeout=10)
        holder = None
        deadline = time.monotonic() + 10
        while holder is None:  # once the retired socket is shut (no session: next sweep)
            attempt = subprocess.Popen(
                [sys.executable, "-c", _HOLD, "udp", str(port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert attempt.stdout is not None
            if attempt.stdout.readline().strip() == "held":
                holder = attempt
                break
            attempt.wait()
            assert time.monotonic() < deadline, "the retired socket was never shut"
            time.sleep(0.2)
        try:
            servers.write_text(route)
            proxy.wait_for_line(
                rf"cannot listen on {port}/udp for udp@file: held by another process", timeout=10
            )
        finally:
            holder.kill()
            holder.wait()
