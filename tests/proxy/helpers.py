"""In-process proxy and scripted backends for component tests (loopback only)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
from anyio.abc import SocketStream, TaskGroup

from discoproxy.config import ProxyConfig
from discoproxy.model import ServerDefinition
from discoproxy.protocol import minecraft
from discoproxy.provider import Provider, supervise
from discoproxy.proxy.connection import ClientConnection
from discoproxy.proxy.server import ProxyContext, run_proxy
from discoproxy.routing import Registry, RoutingTable, SnapshotInbox
from discoproxy.wake import ServerControl

Handler = Callable[[SocketStream], Awaitable[None]]
T = TypeVar("T")


@dataclass
class RunningProxy:
    address: tuple[str, int]
    registry: Registry
    tg: TaskGroup
    ctx: ProxyContext
    bound: list[tuple[str, int]] = field(default_factory=list)  # every listener, in order

    @property
    def port(self) -> int:
        return self.address[1]

    async def connect(self) -> SocketStream:
        return await anyio.connect_tcp(*self.address)

    async def on_reactor(self, read: Callable[[ProxyContext], T]) -> T:
        """``read(ctx)``, run on the reactor thread. The data plane's state (connections
        and their flows, the handshaking and dialing sets, UDP listeners and sessions,
        the guard's counts and bans, the stats) belongs to that thread: a test reading
        it from the loop races the reactor (a set can change size mid-iteration)."""
        ctx = self.ctx
        return await ctx.reactor.run(lambda: read(ctx))

    async def connections(self) -> list[ClientConnection]:
        """The open connections, listed on the reactor thread (read them there too)."""
        return await self.on_reactor(lambda ctx: list(ctx.connections))

    async def wait_on_reactor(
        self, condition: Callable[[ProxyContext], object], within_s: float = 5.0
    ) -> None:
        """Poll ``condition(ctx)`` on the reactor thread until it holds (its truth is
        taken there too: a set returned as is would be read here)."""
        with anyio.fail_after(within_s):
            while not await self.on_reactor(lambda ctx: bool(condition(ctx))):
                await anyio.sleep(0.01)


@asynccontextmanager
async def running_proxy(
    servers: Sequence[ServerDefinition] = (), **settings: Any
) -> AsyncIterator[RunningProxy]:
    registry = Registry()
    registry.apply_snapshot("test", servers)
    config = ProxyConfig.model_validate({"bind": ["127.0.0.1:0"], **settings})
    ctx = ProxyContext(config, registry)
    async with anyio.create_task_group() as tg:
        bound = await tg.start(partial(run_proxy, config, registry, context=ctx))
        yield RunningProxy(bound[0], registry, tg, ctx, bound)
        tg.cancel_scope.cancel()


@dataclass
class Backend:
    port: int
    received: list[bytes] = field(default_factory=list)
    connections: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def backend(
    handler: Callable[[SocketStream, Backend], Awaitable[None]],
) -> AsyncIterator[Backend]:
    """A loopback TCP server running ``handler(stream, backend)`` per connection."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    info = Backend(listener.extra(anyio.abc.SocketAttribute.local_port))

    async def serve(stream: SocketStream) -> None:
        info.connections += 1
        async with stream:
            with suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                await handler(stream, info)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield info
        tg.cancel_scope.cancel()
    await listener.aclose()


def named(name: bytes) -> Callable[[SocketStream, Backend], Awaitable[None]]:
    """Backend that records the first chunk and answers with its name."""

    async def handler(stream: SocketStream, info: Backend) -> None:
        info.received.append(await stream.receive())
        await stream.send(name)

    return handler


async def echo(stream: SocketStream, info: Backend) -> None:
    async for chunk in stream:
        await stream.send(chunk)


def server(sid: str, *domains: str, addresses: Sequence[str], **extra: Any) -> ServerDefinition:
    return ServerDefinition.model_validate(
        {"id": sid, "domains": list(domains), "addresses": list(addresses), **extra}
    )


def handshake(
    domain: str, next_state: int = 2, port: int = 25565, username: str | None = "tester"
) -> bytes:
    """A client's first bytes: the handshake, and for a login (state 2 or 3) its Login
    Start right behind it, as every client sends them (``username=None``: handshake only)."""
    packet = minecraft.encode_handshake(765, domain, port, next_state)
    if next_state != minecraft.NEXT_STATE_STATUS and username is not None:
        packet += minecraft.encode_login_start(username)
    return packet


def client_hello(server_name: str) -> bytes:
    """A real ClientHello from Python's ssl module, as the first bytes on the wire."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def receive_all(stream: SocketStream, limit: float = 5.0) -> bytes:
    chunks = []
    with anyio.fail_after(limit):
        try:
            async for chunk in stream:
                chunks.append(chunk)
        except anyio.BrokenResourceError:
            pass
    return b"".join(chunks)


def read_string(payload: bytes) -> str:
    """A Minecraft String field (VarInt length + UTF-8) at the start of ``payload``."""
    result = minecraft.read_varint(payload)
    assert isinstance(result, tuple)
    length, offset = result
    return payload[offset : offset + length].decode()


@dataclass
class ProviderProxy:
    """A proxy fed by one real provider through the SnapshotInbox, as ``serve`` wires it."""

    registry: Registry
    address: tuple[str, int]
    tables: list[RoutingTable] = field(default_factory=list)


@asynccontextmanager
async def provider_proxy(
    provider: Provider, config: ProxyConfig, first_snapshot_within_s: float = 10
) -> AsyncIterator[ProviderProxy]:
    registry = Registry()
    inbox = SnapshotInbox()
    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run, registry)
        tg.start_soon(supervise, provider.name, provider, inbox.publisher(provider.name))
        with anyio.fail_after(first_snapshot_within_s):
            await inbox.wait_first_snapshots()
        controls = {provider.name: provider} if isinstance(provider, ServerControl) else None
        ctx = ProxyContext(config, registry, controls)
        bound = await tg.start(partial(run_proxy, config, registry, context=ctx))
        live = ProviderProxy(registry, bound[0])
        registry.add_listener(live.tables.append)
        yield live
        tg.cancel_scope.cancel()


def routed(domain: str, qualified_id: str | None) -> Callable[[RoutingTable], bool]:
    """A table predicate: ``domain`` routes to ``qualified_id`` (``None``: to nothing)."""

    def check(table: RoutingTable) -> bool:
        route = table.lookup_host(domain)
        return (route.qualified_id if route else None) == qualified_id

    return check


async def until_closed(stream: Any) -> None:
    """Read until the other side (through the proxy) closes."""
    with suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.receive()


async def keep_open(stream: Any, info: Any) -> None:
    """A backend that says ``in`` and holds the connection until the client goes."""
    await stream.send(b"in")
    await until_closed(stream)


def record_handshakes(addresses: list[str], reply: bytes = b"ok") -> Any:
    """A backend handler that keeps the address of each Minecraft handshake it receives
    (what the backend sees after rewrites) and answers ``reply``."""

    async def record(stream: Any, info: Backend) -> None:
        buffer = b""
        while (hs := minecraft.parse_handshake(buffer)) is minecraft.NEED_DATA:
            buffer += await stream.receive()
        assert isinstance(hs, minecraft.Handshake)
        addresses.append(hs.raw_address)
        await stream.send(reply)

    return record
