"""A server's own ip_filter holds from the instant its route is in the table: it travels
with the route, so no table listener (the guard's, or any other) has to run first."""

from __future__ import annotations

import socket
from functools import partial

import anyio
import pytest

from discoproxy.config import ProxyConfig
from discoproxy.protocol import minecraft
from discoproxy.proxy.server import ProxyContext, run_proxy
from discoproxy.routing import Registry, RoutingTable
from tests.proxy.helpers import backend, handshake, named, server

pytestmark = pytest.mark.anyio


def _login_from_inside_the_swap(address: tuple[str, int]) -> bytes:
    """A blocking login through the proxy (the reactor serves it on its own thread),
    made while the loop is still inside the registry's table swap."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.settimeout(2)
        sock.sendall(handshake("mc.example.com") + minecraft.encode_login_start("tester"))
        try:
            return sock.recv(65536)
        except TimeoutError:  # forwarded: the backend cannot answer, the loop is held here
            return b""


async def test_server_filter_applies_to_a_connection_routed_mid_swap() -> None:
    async with backend(named(b"survival")) as b:
        registry = Registry()
        seen: list[bytes] = []
        address: list[tuple[str, int]] = []

        def probe(table: RoutingTable) -> None:  # registered before every proxy listener
            if "mc@test" in table.by_id:
                seen.append(_login_from_inside_the_swap(address[0]))

        registry.add_listener(probe)
        config = ProxyConfig.model_validate({"bind": ["127.0.0.1:0"]})  # the guard is idle
        ctx = ProxyContext(config, registry)
        async with anyio.create_task_group() as tg:
            address.extend(await tg.start(partial(run_proxy, config, registry, context=ctx)))
            denied = server(
                "mc",
                "mc.example.com",
                addresses=[b.address],
                ip_filter={"deny": ["127.0.0.0/8"]},
            )
            registry.apply_snapshot("test", [denied])
            tg.cancel_scope.cancel()
        assert len(seen) == 1
        packet = minecraft.parse_packet(seen[0])
        assert isinstance(packet, minecraft.Packet), seen[0]  # a Disconnect, not forwarded
        assert packet.packet_id == 0
        assert b.connections == 0
