"""Wake-on-connect against a real engine: sleeping containers, starts, auto-stop.

discoproxy runs in-process, fed by a real :class:`DockerProvider` that is also the
proxy's server control (``provider_proxy``), so a login for a stopped ``auto_start``
container starts it through the engine, and ``auto_stop_after`` stops it again. Each
backend is a container running the host's Python with a small Minecraft server
(:data:`MC_BACKEND_SCRIPT`): it sleeps :data:`BIND_DELAY_S` before it binds (so the
``starting`` state is visible), answers status pings with ``backend-<container name>``
and logins with a Login Disconnect ``hello from <container name>``. Every container and
label prefix is unique to the test (``integration/docker_support.py``) and removed
afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import docker
import pytest

import discoproxy.wake
from discoproxy.config import ProxyConfig
from discoproxy.motd import component_to_legacy, strip_codes
from discoproxy.protocol import minecraft
from discoproxy.protocol.errors import NEED_DATA
from discoproxy.routing import RoutingTable
from discoproxy.status import parse_status_document
from integration.docker_support import (
    DockerResources,
    docker_resources,
)
from integration.test_docker_provider import LiveProxy
from providers.docker import DockerProvider, DockerSettings
from tests.proxy.helpers import handshake, provider_proxy, receive_all

pytestmark = [pytest.mark.peer, pytest.mark.anyio]

# The backend's Python sleeps this long before it binds: the window in which the
# container runs but the server does not answer yet (``starting``).
BIND_DELAY_S = 1.5
# For a test that needs the window to last whatever the engine's pace.
LATE_BIND_DELAY_S = 4.0
# A small Minecraft server: handshake, then Status (response + pong) or Login (a Login
# Disconnect naming the container, then close). SIGTERM exits at once (as PID 1 it would
# otherwise be ignored, and every `docker stop` would wait its full timeout).
MC_BACKEND_SCRIPT = """
import io, json, os, signal, socketserver, time
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
name = os.environ["NAME"]
time.sleep(float(os.environ.get("BIND_DELAY", "0")))

def varint(n):
    n &= 0xFFFFFFFF
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([byte])
        out += bytes([byte | 0x80])

def read_varint(read):
    value = shift = 0
    while True:
        byte = read(1)
        if not byte:
            raise EOFError
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7

def string(text):
    data = text.encode()
    return varint(len(data)) + data

def packet(packet_id, payload):
    body = varint(packet_id) + payload
    return varint(len(body)) + body

class Handler(socketserver.StreamRequestHandler):
    def packet(self):
        length = read_varint(self.rfile.read)
        data = self.rfile.read(length)
        if len(data) < length:
            raise EOFError
        body = io.BytesIO(data)
        return read_varint(body.read), body

    def handle(self):
        try:
            _, body = self.packet()  # handshake
            read_varint(body.read)  # protocol
            body.read(read_varint(body.read))  # address
            body.read(2)  # port
            next_state = read_varint(body.read)
            if next_state == 1:
                self.packet()  # status request
                document = {
                    "version": {"name": "test", "protocol": 765},
                    "players": {"max": 20, "online": 0},
                    "description": {"text": "backend-" + name},
                }
                self.wfile.write(packet(0x00, string(json.dumps(document))))
                _, ping = self.packet()
                self.wfile.write(packet(0x01, ping.read()))
            else:
                reason = json.dumps({"text": "hello from " + name})
                self.wfile.write(packet(0x00, string(reason)))
        except (EOFError, OSError):
            pass

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

Server(("0.0.0.0", int(os.environ.get("PORT", "25565"))), Handler).serve_forever()
"""
BACKEND_PORT = 25577

# Deadlines, not measurements.
REPLY_TIMEOUT_S = 5.0
RUNNING_WITHIN_S = 10.0
# Start (<1 s) + bind delay + status pings in between.
BACKEND_ANSWERS_WITHIN_S = 15.0
HELD_LOGIN_WAIT_S = 15.0
AUTO_STOP_AFTER_S = 2.0
AUTO_STOP_CHECK_S = 0.2
STOPPED_WITHIN_S = 15.0
PING_INTERVAL_S = 0.1
CONCURRENT_LOGINS = 5
# Other events are routed within ms (see test_docker_provider.py): seconds is plenty.
CREATED_ROUTED_WITHIN_S = 3.0
# After the burst: time for a second (wrong) start to reach the engine's event log.
SECOND_START_GRACE_S = 1.0


@pytest.fixture
def resources(engine: docker.DockerClient) -> Iterator[DockerResources]:
    with docker_resources(engine, "dpw") as created:
        yield created


@dataclass(frozen=True)
class Status:
    """What a status ping through the proxy showed."""

    text: str  # the description, flattened, formatting codes stripped
    version: str
    document: dict[str, Any]


@dataclass
class WakeProxy(LiveProxy):
    # server ids the provider was asked to start / stop, in order
    starts: list[str] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)

    async def container_state(self, container: Any) -> str:
        await self.docker(container.reload)
        return str(container.attrs["State"]["Status"])

    async def wait_for_state(self, container: Any, state: str, within_s: float) -> None:
        with anyio.fail_after(within_s):
            while await self.container_state(container) != state:
                await anyio.sleep(0.05)

    async def status(self, domain: str) -> Status:
        """A full server-list ping (handshake, status request, ping/pong) through the proxy."""
        with anyio.fail_after(REPLY_TIMEOUT_S):
            async with await anyio.connect_tcp(*self.address) as stream:
                request = minecraft.encode_packet(0x00, b"")
                await stream.send(handshake(domain, next_state=1) + request)
                buffer = bytearray()
                response = await _read_packet(stream, buffer)
                assert response.packet_id == minecraft.STATUS_RESPONSE_PACKET_ID
                document = parse_status_document(response.payload)
                token = b"wake\x00ok!"
                await stream.send(minecraft.encode_packet(0x01, token))
                pong = await _read_packet(stream, buffer)
                assert (pong.packet_id, pong.payload) == (0x01, token)
        text = strip_codes(component_to_legacy(document.get("description")))
        return Status(text, str(document.get("version", {}).get("name")), document)

    async def login(self, domain: str) -> str:
        """The text of the Login Disconnect a login for ``domain`` gets (from discoproxy
        or from the backend), read until the connection closes."""
        async with await anyio.connect_tcp(*self.address) as stream:
            await stream.send(handshake(domain, next_state=2, username="Steve"))
            reply = await receive_all(stream, REPLY_TIMEOUT_S + HELD_LOGIN_WAIT_S)
        packet = minecraft.parse_packet(reply)
        assert packet is not NEED_DATA, f"no complete packet in the reply: {reply!r}"
        assert packet.packet_id == minecraft.LOGIN_DISCONNECT_PACKET_ID, reply
        document = json.loads(read_string(packet.payload))
        return strip_codes(component_to_legacy(document))


async def _read_packet(stream: Any, buffer: bytearray) -> minecraft.Packet:
    while (packet := minecraft.parse_packet(buffer)) is NEED_DATA:
        buffer += await stream.receive()
    del buffer[: packet.length]
    return packet


def read_string(payload: bytes) -> str:
    result = minecraft.read_varint(payload)
    assert isinstance(result, tuple)
    length, offset = result
    return payload[offset : offset + length].decode()


@asynccontextmanager
async def wake_proxy(resources: DockerResources, **config: Any) -> AsyncIterator[WakeProxy]:
    """discoproxy in-process, its Docker provider also its server control; every
    start/stop it asks of the provider is recorded (and then carried out)."""
    proxy_config = ProxyConfig.model_validate({"bind": ["127.0.0.1:0"], **config})
    provider = DockerProvider("docker", DockerSettings(label_prefix=resources.prefix), proxy_config)
    starts: list[str] = []
    stops: list[str] = []
    start_server, stop_server = provider.start_server, provider.stop_server

    async def recorded_start(server_id: str) -> None:
        starts.append(server_id)
        await start_server(server_id)

    async def recorded_stop(server_id: str) -> None:
        stops.append(server_id)
        await stop_server(server_id)

    provider.start_server = recorded_start  # type: ignore[method-assign]
    provider.stop_server = recorded_stop  # type: ignore[method-assign]
    async with provider_proxy(provider, proxy_config) as proxy:
        yield WakeProxy(resources, proxy.registry, proxy.address, starts=starts, stops=stops)


def sleeping(domain: str, qualified_id: str, asleep: bool = True) -> Callable[[RoutingTable], bool]:
    """A table predicate: ``domain`` routes to ``qualified_id``, which is (not) sleeping."""

    def check(table: RoutingTable) -> bool:
        route = table.lookup_host(domain)
        return (
            route is not None
            and route.qualified_id == qualified_id
            and route.server.sleeping is asleep
            and bool(route.addresses) is not asleep
        )

    return check


def wake_labels(resources: DockerResources, domain: str, **extra: str) -> dict[str, str]:
    return resources.labels(
        domains=domain, auto_start="true", name="Wakey", port=str(BACKEND_PORT), **extra
    )


def run_backend(
    resources: DockerResources,
    suffix: str,
    labels: dict[str, str],
    bind_delay: float = BIND_DELAY_S,
    **kw: Any,
) -> Any:
    env = {"PORT": str(BACKEND_PORT), "BIND_DELAY": str(bind_delay)}
    # No readiness wait: these tests watch the window before the bind through the proxy
    # (starting, held logins), and auto_stop_after counts from the route, not the bind.
    return resources.run(suffix, labels, script=MC_BACKEND_SCRIPT, ready=None, env=env, **kw)


def count_start_events(
    client: docker.DockerClient, container_id: str, since: float, until: float
) -> int:
    """``start`` events the engine logged for the container in [since, until]."""
    events = client.events(
        filters={"container": container_id, "event": "start"},
        since=since,
        until=until,
        decode=True,
    )
    return sum(1 for event in events if (event.get("Action") or event.get("status")) == "start")


async def test_a_login_wakes_a_sleeping_container_and_the_next_login_reaches_it(
    resources: DockerResources,
) -> None:
    async with wake_proxy(resources, auto_start_wait=0) as live:
        domain = live.domain("wake")
        labels = wake_labels(resources, domain)
        container = await live.docker(run_backend, resources, "wakey", labels)
        await live.wait_until(sleeping(domain, live.qualified("wakey"), asleep=False))
        await live.docker(container.stop, timeout=5)
        await live.wait_until(sleeping(domain, live.qualified("wakey")))

        asleep = await live.status(domain)
        assert "Wakey is sleeping" in asleep.text
        assert asleep.version == "sleeping"
        assert live.starts == []  # a ping does not wake it

        text = await live.login(domain)
        assert text == "Server Wakey is starting, try again in a few seconds"
        first = await live.status(domain)
        assert "Wakey is starting" in first.text, first.document
        assert first.version == "starting"
        await live.wait_for_state(container, "running", RUNNING_WITHIN_S)

        seen: list[str] = [first.text]
        with anyio.fail_after(BACKEND_ANSWERS_WITHIN_S):
            while "backend-" not in (answer := await live.status(domain)).text:
                seen.append(answer.text)
                await anyio.sleep(PING_INTERVAL_S)
        assert answer.text == f"backend-{resources.name('wakey')}"
        assert answer.version == "test"
        # until the backend answered, every ping said "starting" (never sleeping/unreachable)
        assert all("Wakey is starting" in text for text in seen), seen

        assert await live.login(domain) == f"hello from {resources.name('wakey')}"
        assert live.starts == [resources.name("wakey")]


async def test_concurrent_logins_during_a_start_start_the_container_once(
    resources: DockerResources, engine: docker.DockerClient
) -> None:
    domain = f"burst.{resources.prefix}.test"
    labels = wake_labels(resources, domain)
    since = time.time()
    # created, never started: the first listing publishes it as sleeping
    container = await anyio.to_thread.run_sync(
        partial(run_backend, resources, "burst", labels, start=False)
    )
    async with wake_proxy(resources, auto_start_wait=0) as live:
        await live.wait_until(sleeping(domain, live.qualified("burst")))

        replies: list[str] = []

        async def login() -> None:
            replies.append(await live.login(domain))

        with anyio.fail_after(REPLY_TIMEOUT_S * 2):
            async with anyio.create_task_group() as tg:
                for _ in range(CONCURRENT_LOGINS):
                    tg.start_soon(login)
        assert replies == ["Server Wakey is starting, try again in a few seconds"] * len(replies)
        assert len(replies) == CONCURRENT_LOGINS
        await live.wait_for_state(container, "running", RUNNING_WITHIN_S)
        await anyio.sleep(SECOND_START_GRACE_S)
        until = time.time()
        starts = await live.docker(count_start_events, engine, container.id, since, until)
        assert starts == 1
        assert live.starts == [resources.name("burst")]


async def test_a_held_login_is_forwarded_once_the_woken_backend_answers(
    resources: DockerResources,
) -> None:
    domain = f"held.{resources.prefix}.test"
    labels = wake_labels(resources, domain)
    # created, never started: the first listing publishes it as sleeping
    container = await anyio.to_thread.run_sync(
        partial(run_backend, resources, "held", labels, start=False)
    )
    async with wake_proxy(resources, auto_start_wait=HELD_LOGIN_WAIT_S) as live:
        await live.wait_until(sleeping(domain, live.qualified("held")))
        assert await live.container_state(container) == "created"
        began = time.monotonic()
        text = await live.login(domain)
        assert text == f"hello from {resources.name('held')}"
        # it was held at least as long as the backend took to bind
        assert time.monotonic() - began >= BIND_DELAY_S
        assert await live.container_state(container) == "running"
        assert live.starts == [resources.name("held")]


async def test_an_idle_container_is_stopped_after_auto_stop_after_and_sleeps(
    resources: DockerResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discoproxy.wake, "AUTO_STOP_CHECK_S", AUTO_STOP_CHECK_S)
    async with wake_proxy(resources) as live:
        domain = live.domain("idle")
        labels = wake_labels(resources, domain, auto_stop_after=f"{AUTO_STOP_AFTER_S:g}s")
        container = await live.docker(run_backend, resources, "idle", labels)
        await live.wait_until(sleeping(domain, live.qualified("idle"), asleep=False))
        routed_at = time.monotonic()
        await live.wait_for_state(container, "exited", STOPPED_WITHIN_S)
        assert time.monotonic() - routed_at >= AUTO_STOP_AFTER_S - AUTO_STOP_CHECK_S
        assert live.stops == [resources.name("idle")]
        # still routed, as a sleeping server
        await live.wait_until(sleeping(domain, live.qualified("idle")))
        status = await live.status(domain)
        assert "Wakey is sleeping" in status.text
        # and not stopped again while it sleeps
        await anyio.sleep(AUTO_STOP_CHECK_S * 3)
        assert live.stops == [resources.name("idle")]
        # a login wakes it again
        text = await live.login(domain)
        assert text == "Server Wakey is starting, try again in a few seconds"
        await live.wait_for_state(container, "running", RUNNING_WITHIN_S)
        assert live.starts == [resources.name("idle")]


async def test_a_container_created_while_discoproxy_runs_is_routed_as_sleeping(
    resources: DockerResources,
) -> None:
    async with wake_proxy(resources) as live:
        domain = live.domain("created")
        labels = wake_labels(resources, domain)
        await live.docker(run_backend, resources, "created", labels, start=False)
        routed = sleeping(domain, live.qualified("created"))
        with anyio.move_on_after(CREATED_ROUTED_WITHIN_S):
            while not routed(live.registry.table):
                await anyio.sleep(0.01)
        in_time = routed(live.registry.table)
    assert in_time, f"not routed as sleeping within {CREATED_ROUTED_WITHIN_S}s"


async def test_a_login_arriving_while_the_woken_server_binds_is_held_too(
    resources: DockerResources,
) -> None:
    domain = f"late.{resources.prefix}.test"
    labels = wake_labels(resources, domain)
    # a long bind delay: the second login surely comes while the server is not up yet
    await anyio.to_thread.run_sync(
        partial(run_backend, resources, "late", labels, start=False, bind_delay=LATE_BIND_DELAY_S)
    )
    async with wake_proxy(resources, auto_start_wait=HELD_LOGIN_WAIT_S) as live:
        await live.wait_until(sleeping(domain, live.qualified("late")))
        replies: dict[str, str] = {}

        async def login(who: str) -> None:
            replies[who] = await live.login(domain)

        async with anyio.create_task_group() as tg:
            tg.start_soon(login, "waker")
            # the container runs (its route has an address), its server sleeps still
            await live.wait_until(sleeping(domain, live.qualified("late"), asleep=False))
            await login("late")
    # asserted outside the proxy's task group (see above)
    hello = f"hello from {resources.name('late')}"
    assert replies["waker"] == hello
    assert replies["late"] == hello


async def test_a_pool_of_auto_start_replicas_sleeps_wakes_and_stops_as_one(
    resources: DockerResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discoproxy.wake, "AUTO_STOP_CHECK_S", AUTO_STOP_CHECK_S)
    async with wake_proxy(resources, auto_start_wait=0) as live:
        domain = live.domain("pool")
        group = f"{resources.prefix}-lobby"
        # long enough for the woken pool to be logged into before it is idle again
        labels = wake_labels(resources, domain, group=group, auto_stop_after="5s")
        replicas = [
            await live.docker(run_backend, resources, f"lobby-{n}", labels, bind_delay=0)
            for n in (1, 2)
        ]
        qualified = f"{group}@docker"

        def pooled(running: int) -> Callable[[RoutingTable], bool]:
            def check(table: RoutingTable) -> bool:
                route = table.lookup_host(domain)
                return (
                    route is not None
                    and route.qualified_id == qualified
                    and len(route.addresses) == running
                    and route.server.sleeping is (running == 0)
                )

            return check

        await live.wait_until(pooled(2))  # one route, a backend per running replica
        # idle: auto_stop_after stops every replica, and the pool sleeps as one server
        for container in replicas:
            await live.wait_for_state(container, "exited", STOPPED_WITHIN_S)
        assert live.stops == [group]
        await live.wait_until(pooled(0))
        assert "Wakey is sleeping" in (await live.status(domain)).text
        # one login starts them all
        text = await live.login(domain)
        assert text == "Server Wakey is starting, try again in a few seconds"
        for container in replicas:
            await live.wait_for_state(container, "running", RUNNING_WITHIN_S)
        assert live.starts == [group]
        await live.wait_until(pooled(2))
        with anyio.fail_after(BACKEND_ANSWERS_WITHIN_S):
            while "backend-" not in (await live.status(domain)).text:
                await anyio.sleep(PING_INTERVAL_S)
        # round_robin over both, once the second has bound too (until then a login that
        # picked it is redispatched to the first)
        everyone = {f"hello from {resources.name(f'lobby-{n}')}" for n in (1, 2)}
        greeted: set[str] = set()
        with anyio.fail_after(BACKEND_ANSWERS_WITHIN_S):
            while greeted != everyone:
                greeted.add(await live.login(domain))
