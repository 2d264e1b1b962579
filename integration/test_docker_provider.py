"""The Docker provider against a real engine: containers come and go, routes follow.

discoproxy runs in-process (registry, snapshot inbox, supervised provider, proxy on
127.0.0.1:0). Each backend is a container running the host's Python that answers the
forwarded handshake with its own name, then echoes; a connection through the proxy by
domain proves the bytes reached that container. Every container, network and label
prefix is unique to the test (``integration/docker_support.py``) and removed afterwards.
The dockerd restart test restarts the engine itself, so it runs last in this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.config import ProxyConfig
from discoproxy.routing import Registry, RoutingTable
from integration.docker_support import (
    DockerResources,
    docker_client,
    engine_answers,
    find_dockerd,
    start_dockerd,
    stop_dockerd,
)
from integration.peers import free_port
from providers.docker import DockerProvider, DockerSettings, EngineUnavailable
from tests.proxy.helpers import handshake, provider_proxy, read_string, routed

pytestmark = [pytest.mark.peer, pytest.mark.anyio]

# Deadlines, not measurements (bench/docker_latency.py measures).
LIVE_WITHIN_S = 5.0
# A fresh container's Python needs a moment to bind after the start event.
BACKEND_READY_S = 10.0
REPLY_TIMEOUT_S = 5.0
# After a dockerd restart: engine up, containers restarted, provider's backoff elapsed.
ENGINE_BACK_WITHIN_S = 60.0


@dataclass
class LiveProxy:
    resources: DockerResources
    registry: Registry
    address: tuple[str, int]
    tables: list[RoutingTable] = field(default_factory=list)

    def qualified(self, suffix: str) -> str:
        return f"{self.resources.name(suffix)}@docker"

    def domain(self, name: str) -> str:
        return f"{name}.{self.resources.prefix}.test"

    async def docker(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A blocking docker SDK call, off the event loop the proxy runs on."""
        return await anyio.to_thread.run_sync(partial(func, *args, **kwargs))

    async def wait_until(
        self, condition: Callable[[RoutingTable], bool], within_s: float = LIVE_WITHIN_S
    ) -> None:
        with anyio.fail_after(within_s):
            while not condition(self.registry.table):
                await anyio.sleep(0.01)

    async def connect(self) -> SocketStream:
        return await anyio.connect_tcp(*self.address)

    async def reply(self, domain: str) -> bytes:
        """First bytes answered to a login handshake for ``domain`` (b'' if closed)."""
        async with await self.connect() as stream:
            await stream.send(handshake(domain))
            with anyio.fail_after(REPLY_TIMEOUT_S):
                try:
                    return await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return b""

    async def wait_for_backend(
        self, domain: str, suffix: str, within_s: float = BACKEND_READY_S
    ) -> bytes:
        """Until a connection for ``domain`` reaches container ``suffix`` (it answers its name)."""
        expected = self.resources.name(suffix).encode()
        last = b""
        with anyio.fail_after(within_s):
            while (last := await self.reply(domain)) != expected:
                await anyio.sleep(0.05)
        return last

    async def unknown(self, domain: str) -> bool:
        reply = await self.reply(domain)
        return f"Unknown server: {domain}" in read_string(reply[2:])


@asynccontextmanager
async def docker_proxy(
    resources: DockerResources, config: ProxyConfig | None = None, **settings: Any
) -> AsyncIterator[LiveProxy]:
    config = config or ProxyConfig(bind=("127.0.0.1:0",))
    provider = DockerProvider(
        "docker", DockerSettings(label_prefix=resources.prefix, **settings), config
    )
    async with provider_proxy(provider, config) as proxy:
        yield LiveProxy(resources, proxy.registry, proxy.address, proxy.tables)


async def wait_for_log(logs: list[str], text: str, within_s: float = LIVE_WITHIN_S) -> str:
    with anyio.fail_after(within_s):
        while not (found := [line for line in logs if text in line]):
            await anyio.sleep(0.01)
    return found[0]


async def test_a_labelled_container_routes_until_it_stops(resources: DockerResources) -> None:
    async with docker_proxy(resources) as live:
        domain = live.domain("survival")
        container = await live.docker(resources.run, "a", resources.labels(domains=domain))
        await live.wait_until(routed(domain, live.qualified("a")))
        await live.wait_for_backend(domain, "a")
        await live.docker(container.stop, timeout=5)
        await live.wait_until(routed(domain, None))
        assert await live.unknown(domain)


async def test_a_ports_label_opens_the_port_while_the_container_runs(
    resources: DockerResources,
) -> None:
    port = free_port()
    config = ProxyConfig(bind=("127.0.0.1:0",), port_routes_bind="127.0.0.1")
    provider = DockerProvider("docker", DockerSettings(label_prefix=resources.prefix), config)
    key = ("tcp", port)
    async with provider_proxy(provider, config) as proxy:
        labels = resources.labels(ports=f"{port}:25565/tcp")
        container = await anyio.to_thread.run_sync(partial(resources.run, "p", labels))
        expected = resources.name("p").encode()
        with anyio.fail_after(BACKEND_READY_S):  # no handshake: the port forwards as it is
            while (reply := await _first_reply(port)) != expected:
                await anyio.sleep(0.05)
        assert reply == expected
        await anyio.to_thread.run_sync(partial(container.stop, timeout=5))
        with anyio.fail_after(LIVE_WITHIN_S):
            while key in proxy.registry.table.ports:
                await anyio.sleep(0.01)
        with anyio.fail_after(LIVE_WITHIN_S):  # closed: refused, not accepted and dropped
            while True:
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", port)
                except OSError:
                    break
                await stream.aclose()
                await anyio.sleep(0.02)


async def _first_reply(port: int) -> bytes:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return b""
    async with stream:
        await stream.send(b"hello")
        with anyio.move_on_after(REPLY_TIMEOUT_S):
            try:
                return await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return b""
    return b""


async def test_a_paused_container_is_not_routed_until_unpaused(
    resources: DockerResources,
) -> None:
    async with docker_proxy(resources) as live:
        domain = live.domain("paused")
        container = await live.docker(resources.run, "a", resources.labels(domains=domain))
        await live.wait_until(routed(domain, live.qualified("a")))
        await live.docker(container.pause)
        await live.wait_until(routed(domain, None))
        await live.docker(container.unpause)
        await live.wait_until(routed(domain, live.qualified("a")))


async def test_recreating_a_container_with_new_labels_routes_the_new_domains(
    resources: DockerResources,
) -> None:
    async with docker_proxy(resources) as live:
        old, new = live.domain("old"), live.domain("new")
        await live.docker(resources.run, "a", resources.labels(domains=old))
        await live.wait_until(routed(old, live.qualified("a")))
        await live.docker(resources.remove_container, "a")
        await live.docker(resources.run, "a", resources.labels(domains=f"{new}, *.{new}"))
        await live.wait_until(routed(new, live.qualified("a")))
        assert routed(old, None)(live.registry.table)
        await live.wait_for_backend(f"eu.{new}", "a")
        assert await live.unknown(old)


async def test_two_containers_claiming_one_domain_route_to_the_first_id(
    resources: DockerResources, logs: list[str]
) -> None:
    async with docker_proxy(resources) as live:
        domain = live.domain("shared")
        await live.docker(resources.run, "b", resources.labels(domains=domain))
        await live.wait_until(routed(domain, live.qualified("b")))
        await live.docker(resources.run, "a", resources.labels(domains=domain))
        await live.wait_until(routed(domain, live.qualified("a")))
        conflict = await wait_for_log(logs, "route conflict")
        assert conflict == (
            f"route conflict: {domain!r} is claimed by {live.qualified('a')} and "
            f"{live.qualified('b')}; {live.qualified('a')} wins (first qualified id in sort order)"
        )
        await live.wait_for_backend(domain, "a")


async def test_a_bad_label_drops_only_that_container(
    resources: DockerResources, logs: list[str]
) -> None:
    async with docker_proxy(resources) as live:
        good, bad = live.domain("good"), live.domain("bad")
        labels = resources.labels(domains=bad, port="25565a")
        await live.docker(resources.run, "bad", labels)
        await live.docker(resources.run, "good", resources.labels(domains=good))
        await live.wait_until(routed(good, live.qualified("good")))
        line = await wait_for_log(logs, "25565a")
        assert line == (
            f"container {resources.name('bad')}, label {resources.label('port')}: "
            "expected 1-65535, got '25565a'; not routed"
        )
        assert routed(bad, None)(live.registry.table)
        await live.wait_for_backend(good, "good")
        # reported once, not again on every resync
        await live.docker(resources.run, "other", resources.labels(domains=live.domain("o")))
        await live.wait_until(routed(live.domain("o"), live.qualified("other")))
        assert sum("25565a" in line for line in logs) == 1


async def test_a_container_on_two_networks_needs_the_network_label(
    resources: DockerResources, logs: list[str]
) -> None:
    front = await anyio.to_thread.run_sync(resources.network, "front")
    back = await anyio.to_thread.run_sync(resources.network, "back")
    async with docker_proxy(resources) as live:
        unsure, chosen = live.domain("unsure"), live.domain("chosen")
        networks = (front, back)
        await live.docker(
            resources.run, "unsure", resources.labels(domains=unsure), networks=networks
        )
        line = await wait_for_log(logs, resources.name("unsure"))
        assert line == (
            f"container {resources.name('unsure')} is on networks {back.name}, {front.name}: "
            f"set label {resources.label('docker_network')} to choose; not routed"
        )
        labels = resources.labels(domains=chosen, docker_network=back.name)
        container = await live.docker(resources.run, "chosen", labels, networks=networks)
        await live.wait_until(routed(chosen, live.qualified("chosen")))
        await live.docker(container.reload)
        back_ip = container.attrs["NetworkSettings"]["Networks"][back.name]["IPAddress"]
        route = live.registry.table.lookup_host(chosen)
        assert route is not None and route.addresses == ((back_ip, 25565),)
        await live.wait_for_backend(chosen, "chosen")
        assert routed(unsure, None)(live.registry.table)


async def test_an_open_connection_survives_other_containers_coming_and_going(
    resources: DockerResources,
) -> None:
    async with docker_proxy(resources) as live:
        domain = live.domain("steady")
        await live.docker(resources.run, "steady", resources.labels(domains=domain))
        await live.wait_until(routed(domain, live.qualified("steady")))
        await live.wait_for_backend(domain, "steady")
        async with await live.connect() as stream:
            await stream.send(handshake(domain))
            with anyio.fail_after(REPLY_TIMEOUT_S):
                assert await stream.receive() == resources.name("steady").encode()
            other = live.domain("other")
            container = await live.docker(resources.run, "other", resources.labels(domains=other))
            await live.wait_until(routed(other, live.qualified("other")))
            await live.docker(container.stop, timeout=5)
            await live.wait_until(routed(other, None))
            for round_trip in (b"still here", b"and here"):
                await stream.send(round_trip)
                with anyio.fail_after(REPLY_TIMEOUT_S):
                    assert await stream.receive() == round_trip


async def test_no_engine_at_the_endpoint_is_unavailable_with_the_reason(tmp_path: Any) -> None:
    endpoint = f"unix://{tmp_path}/missing.sock"
    provider = DockerProvider("docker", DockerSettings(endpoint=endpoint), ProxyConfig())
    assert not await provider.available()
    assert provider.unavailable_reason().startswith(f"no Docker engine answers at {endpoint}: ")
    with anyio.fail_after(10), pytest.raises(EngineUnavailable, match=f"at {endpoint}"):
        await provider.run(lambda servers: None)


# Keep last: it restarts the engine every other test in this module uses.
async def test_routes_come_back_by_resync_after_dockerd_restarts(
    resources: DockerResources, logs: list[str]
) -> None:
    dockerd = find_dockerd()
    async with docker_proxy(resources) as live:
        domain = live.domain("survivor")
        labels = resources.labels(domains=domain)
        await live.docker(resources.run, "survivor", labels, restart=True)
        await live.wait_until(routed(domain, live.qualified("survivor")))
        await live.wait_for_backend(domain, "survivor")
        try:
            await anyio.to_thread.run_sync(stop_dockerd, dockerd)
            await wait_for_log(logs, "provider docker failed")
        finally:
            if not await anyio.to_thread.run_sync(engine_answers):
                await anyio.to_thread.run_sync(start_dockerd, dockerd)
        fresh = await anyio.to_thread.run_sync(docker_client)
        assert fresh is not None
        resources.client = fresh
        # the restart policy brings the container back; the provider reconnects and resyncs
        await live.wait_for_backend(domain, "survivor", within_s=ENGINE_BACK_WITHIN_S)
        # it follows events again (after its backoff): a container started now is routed
        late = live.domain("late")
        await live.docker(resources.run, "late", resources.labels(domains=late))
        await live.wait_until(routed(late, live.qualified("late")), ENGINE_BACK_WITHIN_S)
        await live.wait_for_backend(late, "late")
        # and the survivor's route is the resynced one: its address now
        survivor = await live.docker(resources.client.containers.get, resources.name("survivor"))
        ip = survivor.attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
        route = live.registry.table.lookup_host(domain)
        assert route is not None and route.addresses == ((ip, 25565),)


async def test_a_container_labelled_for_mc_router_routes_next_to_ours(
    resources: DockerResources,
) -> None:
    """mc-router's own labels on a real container (providers/docker/mc_router.py): it
    is routed by its mc-router.host, beside a container with this run's labels."""
    async with docker_proxy(resources) as live:
        theirs, ours = live.domain("vanilla"), live.domain("survival")
        await live.docker(resources.run, "vanilla", {"mc-router.host": f"{theirs},x.{theirs}"})
        await live.docker(resources.run, "survival", resources.labels(domains=ours))
        await live.wait_until(routed(theirs, live.qualified("vanilla")))
        await live.wait_until(routed(f"x.{theirs}", live.qualified("vanilla")))
        await live.wait_for_backend(theirs, "vanilla")
        await live.wait_for_backend(ours, "survival")
