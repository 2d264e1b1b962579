"""Replicas of one Compose service behind one name, against a real engine: logins spread
over them, a replica that dies leaves the pool and new ones join it, scaling changes
nothing but the backends.

The replicas carry the labels ``docker compose up --scale`` gives them
(``com.docker.compose.project`` and ``.service``; the project is this test's own prefix),
and answer the forwarded handshake with their container name — or, in the last test,
are real Minecraft servers (npm minecraft-protocol): 30 real clients log in one after
another (``node/mc_logins.js``: a connection each, one node process), spread over the
three; with three players held on, one replica is killed (its player's connection
ends, the others stay, every login right after it gets in without waiting
connect_timeout); then the service scales to one and back to three.
"""

from __future__ import annotations

import collections
import json
import subprocess
from collections.abc import Callable

import anyio
import anyio.abc
import pytest

from discoproxy.config import ProxyConfig
from discoproxy.routing import RoutingTable
from integration.docker_support import PYTHON, DockerResources, unavailable
from integration.test_docker_provider import LiveProxy, docker_proxy
from tests.proxy.helpers import handshake
from tests.support import REPO, require_program

NODE_DIR = REPO / "integration" / "node"

pytestmark = [pytest.mark.peer, pytest.mark.anyio]

LOGINS = 30
# a deadline, not a measurement: a login that waited on a dead replica would miss it
LOGIN_WITHIN_S = 5.0
# the death test's connect_timeout: twice the deadline, so a login that waited for a
# dial to the dead replica to time out misses LOGIN_WITHIN_S
CONNECT_TIMEOUT_S = 2 * LOGIN_WITHIN_S


def _labels(resources: DockerResources, domain: str) -> dict[str, str]:
    return {
        "com.docker.compose.project": resources.prefix,
        "com.docker.compose.service": "survival",
        **resources.labels(domains=domain),
    }


def _pool_size(live: LiveProxy, size: int) -> Callable[[RoutingTable], bool]:
    pool_id = f"{live.resources.prefix}-survival@docker"

    def check(table: RoutingTable) -> bool:
        route = table.by_id.get(pool_id)
        return route is not None and len(route.addresses) == size

    return check


async def _logins(live: LiveProxy, domain: str, count: int = LOGINS) -> collections.Counter[bytes]:
    answers: collections.Counter[bytes] = collections.Counter()
    for _ in range(count):
        with anyio.fail_after(LOGIN_WITHIN_S):
            answers[await live.reply(domain)] += 1
    return answers


async def _player_on(live: LiveProxy, domain: str, name: bytes) -> anyio.abc.SocketStream:
    """A connection through the proxy that reached replica ``name``, left open."""
    with anyio.fail_after(LOGIN_WITHIN_S * 3):
        while True:
            stream = await live.connect()
            await stream.send(handshake(domain))
            if await stream.receive() == name:
                return stream
            await stream.aclose()


async def test_logins_spread_over_three_replicas_and_follow_scaling_and_death(
    resources: DockerResources,
) -> None:
    config = ProxyConfig(bind=("127.0.0.1:0",), connect_timeout=CONNECT_TIMEOUT_S)
    async with docker_proxy(resources, config) as live:
        domain = live.domain("survival")
        names = [resources.name(f"survival-{n}").encode() for n in (1, 2, 3)]
        replicas = [
            await live.docker(resources.run, f"survival-{n}", _labels(resources, domain))
            for n in (1, 2, 3)
        ]
        await live.wait_until(_pool_size(live, 3))
        assert await _logins(live, domain) == dict.fromkeys(names, LOGINS // 3)

        # a player on replica 1 when it is killed: that player's connection ends; the
        # logins right after the kill (the engine's event maybe not in yet) all get in,
        # none waiting connect_timeout on the dead replica
        held = await _player_on(live, domain, names[0])
        async with held:
            await live.docker(replicas[0].kill)
            during = await _logins(live, domain, 6)
            assert set(during) <= {names[1], names[2]} and sum(during.values()) == 6
            with anyio.fail_after(CONNECT_TIMEOUT_S):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    while True:  # echoes until the backend is gone
                        await held.send(b"ping")
                        await held.receive()
        await live.wait_until(_pool_size(live, 2))
        after = await _logins(live, domain)
        assert after == {names[1]: LOGINS // 2, names[2]: LOGINS // 2}

        # scale to 1 and back to 3: the route's id stays, its backends follow
        await live.docker(replicas[1].stop, timeout=1)
        await live.wait_until(_pool_size(live, 1))
        assert await _logins(live, domain, 6) == {names[2]: 6}
        await live.docker(replicas[0].start)
        await live.docker(replicas[1].start)
        await live.wait_until(_pool_size(live, 3))
        for name in (names[0], names[1]):  # restarted: wait until each answers
            with anyio.fail_after(10):
                while name not in await _logins(live, domain, 3):
                    await anyio.sleep(0.05)
        assert set(await _logins(live, domain)) == set(names)


# healthy while /healthy exists in the container (the test creates and removes it)
HEALTHCHECK = {
    "test": [
        "CMD",
        PYTHON,
        "-c",
        "import os, sys; sys.exit(not os.path.exists('/healthy'))",
    ],
    "interval": 200_000_000,  # ns
    "timeout": 2_000_000_000,
    "retries": 1,
}
HEALTH_WITHIN_S = 15.0


async def test_a_replica_takes_connections_only_while_its_healthcheck_passes(
    resources: DockerResources,
) -> None:
    async with docker_proxy(resources) as live:
        domain = live.domain("survival")
        names = [resources.name(f"survival-{n}").encode() for n in (1, 2)]
        await live.docker(resources.run, "survival-1", _labels(resources, domain))
        checked = await live.docker(
            resources.run, "survival-2", _labels(resources, domain), healthcheck=HEALTHCHECK
        )
        await live.wait_until(_pool_size(live, 1))  # starting: not in the pool yet
        assert await _logins(live, domain, 6) == {names[0]: 6}

        await live.docker(checked.exec_run, [PYTHON, "-c", "open('/healthy', 'w')"])
        await live.wait_until(_pool_size(live, 2), HEALTH_WITHIN_S)  # healthy: it joins
        assert await _logins(live, domain, 6) == {names[0]: 3, names[1]: 3}

        await live.docker(
            checked.exec_run, ["/usr/bin/python3", "-c", "import os; os.remove('/healthy')"]
        )
        await live.wait_until(_pool_size(live, 1), HEALTH_WITHIN_S)  # unhealthy: it leaves
        assert await _logins(live, domain, 6) == {names[0]: 6}

        await live.docker(checked.exec_run, [PYTHON, "-c", "open('/healthy', 'w')"])
        await live.wait_until(_pool_size(live, 2), HEALTH_WITHIN_S)  # recovered: back in
        assert await _logins(live, domain, 6) == {names[0]: 3, names[1]: 3}


# a real Minecraft server (npm minecraft-protocol, integration/node/mc_server.js) in each
# replica: the host's node and the project's node_modules, mounted read-only
MC_VERSION = "1.20.4"
MC_SERVER = (
    "import os\n"
    "os.execv('/usr/bin/node', ['node', '/node/mc_server.js', os.environ['NAME'], "
    f"'{MC_VERSION}'])\n"
)
MC_READY = '"event":"listening"'
REAL_LOGINS = 30


def _login(node: str, port: int, domain: str, username: str) -> list[dict[str, object]]:
    result = subprocess.run(
        [node, "mc_client.js", str(port), domain, username, MC_VERSION],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _login_each(
    node: str, port: int, domain: str, usernames: list[str]
) -> dict[str, list[dict[str, object]]]:
    """Each of ``usernames`` logs in, one after another, with a real client of its own
    (``mc_logins.js``: one node process for them all, which saves the ~0.6 s of CPU a
    node start and minecraft-protocol's loading cost per login); username → its events
    (what the process wrote on stderr, if anything, as an ``stderr`` event of each)."""
    result = subprocess.run(
        [node, "mc_logins.js", str(port), domain, MC_VERSION, *usernames],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=30 + 10 * len(usernames),  # mc_logins.js gives each login up to 10 s
        check=False,
    )
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    errors = [{"event": "stderr", "text": result.stderr[-2000:]}] if result.stderr else []
    return {name: [e for e in events if e.get("username") == name] + errors for name in usernames}


async def test_real_minecraft_replicas_spread_logins_survive_a_kill_and_follow_scaling(
    resources: DockerResources,
) -> None:
    node = require_program("node", "apt-get install nodejs npm")
    if not (NODE_DIR / "node_modules" / "minecraft-protocol").is_dir():
        unavailable("npm ci --prefix integration/node (minecraft-protocol)")
    config = ProxyConfig(bind=("127.0.0.1:0",), connect_timeout=CONNECT_TIMEOUT_S)
    async with docker_proxy(resources, config) as live:
        domain = live.domain("survival")
        replicas = [
            await live.docker(
                resources.run,
                f"survival-{n}",
                _labels(resources, domain),
                script=MC_SERVER,
                ready=MC_READY,
                env={"MC_HOST": "0.0.0.0", "MC_PORT": "25565"},
                mounts={str(NODE_DIR): "/node"},
            )
            for n in (1, 2, 3)
        ]
        await live.wait_until(_pool_size(live, 3))
        port = live.address[1]
        players = [f"player{i}" for i in range(REAL_LOGINS)]
        each = await anyio.to_thread.run_sync(_login_each, node, port, domain, players)
        for player, events in each.items():
            assert any(e.get("event") == "play" for e in events), (player, events)
        logins = collections.Counter()
        for replica in replicas:
            for event in await _events(live, replica):
                if event.get("event") == "login":
                    logins[event["server"]] += 1
        assert sorted(logins.values()) == [REAL_LOGINS // 3] * 3, logins

        # three players stay on, one per replica; the first replica is killed: its
        # player's connection ends, the others' do not, and every login right after it
        # gets in on the two left, none waiting connect_timeout on the dead one
        held = [_hold(node, port, domain, f"held{n}") for n in range(3)]
        try:
            with anyio.fail_after(LOGIN_WITHIN_S * 3):
                while len(on := await _players_on(live, replicas, "held")) < 3:
                    await anyio.sleep(0.1)
            victim = on["held0"]
            await live.docker(replicas[victim].kill)
            afters = [f"after{i}" for i in range(6)]
            each = await anyio.to_thread.run_sync(_login_each, node, port, domain, afters)
            for player, events in each.items():
                played = [e for e in events if e.get("event") == "play"]
                assert played, (player, events)
                # each within LOGIN_WITHIN_S of its client's start: none waited for a dial
                # to the dead replica to time out (connect_timeout)
                assert played[0]["ms"] < LOGIN_WITHIN_S * 1000, (player, events)
            with anyio.fail_after(CONNECT_TIMEOUT_S):
                while held[0].poll() is None:  # its player's connection ended
                    await anyio.sleep(0.1)
            assert held[1].poll() is None and held[2].poll() is None  # the others stay
        finally:
            for process in held:
                process.kill()
                process.wait()
        after = await _players_on(live, replicas, "after")
        assert len(after) == 6 and victim not in after.values(), after

        # scale to 1 and back to 3: logins follow the replicas
        await live.wait_until(_pool_size(live, 2))
        left = [n for n in range(3) if n != victim]
        await live.docker(replicas[left[0]].stop, timeout=1)
        await live.wait_until(_pool_size(live, 1))
        ones = [f"one{i}" for i in range(3)]
        each = await anyio.to_thread.run_sync(_login_each, node, port, domain, ones)
        for player, events in each.items():
            assert any(e.get("event") == "play" for e in events), (player, events)
        assert set((await _players_on(live, replicas, "one")).values()) == {left[1]}
        for n in (victim, left[0]):
            await live.docker(replicas[n].start)
        await live.wait_until(_pool_size(live, 3))
        tries = 0
        with anyio.fail_after(30):  # restarted servers listen a moment after they start
            while len(set((await _players_on(live, replicas, "back")).values())) < 3:
                tries += 1
                await anyio.to_thread.run_sync(_login, node, port, domain, f"back{tries}")


async def _events(live: LiveProxy, replica: object) -> list[dict[str, object]]:
    logs = await live.docker(replica.logs)  # type: ignore[attr-defined]
    return [json.loads(line) for line in logs.decode().splitlines() if line.startswith("{")]


async def _players_on(live: LiveProxy, replicas: list[object], prefix: str) -> dict[str, int]:
    """Which replica (index) each player whose name starts with ``prefix`` logged in to."""
    on: dict[str, int] = {}
    for n, replica in enumerate(replicas):
        for event in await _events(live, replica):
            name = str(event.get("username", ""))
            if event.get("event") == "login" and name.startswith(prefix):
                on[name] = n
    return on


def _hold(node: str, port: int, domain: str, username: str) -> subprocess.Popen[str]:
    """A real client that logs in and stays in play until its server ends it."""
    return subprocess.Popen(
        [node, "mc_client.js", str(port), domain, username, MC_VERSION, "hold"],
        cwd=NODE_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
