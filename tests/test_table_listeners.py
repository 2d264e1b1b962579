"""A bug in one routing-table listener (port-listener sync, pruning, …) is logged and
counted; the table still swaps, the other listeners still run, the process carries on."""

from __future__ import annotations

import socket

import anyio
import pytest

from discoproxy.model import ServerDefinition
from discoproxy.proxy.ports import PortListeners
from discoproxy.routing import Registry, RoutingTable, SnapshotInbox
from tests.proxy.helpers import backend, handshake, named, running_proxy, server


def _server(sid: str, domain: str) -> ServerDefinition:
    return ServerDefinition(id=sid, domains=[domain], addresses=["10.0.0.5:25565"])


def test_a_listener_that_raises_does_not_stop_the_swap_or_the_others() -> None:
    registry = Registry()
    seen: list[RoutingTable] = []

    def broken(table: RoutingTable) -> None:
        raise RuntimeError("listener bug")

    registry.add_listener(broken)
    registry.add_listener(seen.append)
    assert registry.apply_snapshot("test", [_server("a", "a.example.com")])
    assert registry.table.lookup_host("a.example.com") is not None
    assert seen == [registry.table]
    assert registry.listener_errors == 1


@pytest.mark.anyio
async def test_a_failing_port_sync_leaves_the_proxy_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_bind(self: PortListeners, key: object) -> None:
        raise RuntimeError("port sync bug")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async with backend(named(b"survival")) as b:
        async with running_proxy([]) as proxy:
            monkeypatch.setattr(PortListeners, "_bind", broken_bind)
            inbox = SnapshotInbox(throttle_s=0)
            publish = inbox.publisher("test")
            proxy.tg.start_soon(inbox.run, proxy.registry)
            ported = server("mc", "mc.example.com", addresses=[b.address], ports=[f"{port}"])
            publish([ported])
            with anyio.fail_after(5):
                await inbox.wait_first_snapshots()
            assert proxy.registry.listener_errors == 1
            # the inbox kept running (the next snapshot applies) and names route
            publish([server("mc", "mc.example.com", "mc2.example.com", addresses=[b.address])])
            with anyio.fail_after(5):
                while proxy.registry.table.lookup_host("mc2.example.com") is None:
                    await anyio.sleep(0.01)
            async with await proxy.connect() as stream:
                await stream.send(handshake("mc2.example.com"))
                with anyio.fail_after(5):
                    assert await stream.receive() == b"survival"
