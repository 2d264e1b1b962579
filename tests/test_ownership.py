"""Every function marked with an owner (discoproxy/owners.py) runs on that owner's thread.

The proxy runs in-process under a profiler (``sys.setprofile`` + ``threading.setprofile``)
while it does a bit of everything that crosses the two planes: name and port routes,
a host name resolved on the loop, a status ping fetched by the loop and then served from
the cache by the reactor, a TLS-terminated connection, a reload, a ban list, a table
swap that opens and closes a port listener, admin scrapes. Each call of a marked function
is recorded with its thread; a reactor-owned one on the loop's thread, or a loop-owned
one on the reactor's, fails the test, naming the function.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import anyio
import pytest

import discoproxy.admin.server
import discoproxy.guard
import discoproxy.proxy.access_log
import discoproxy.proxy.connection
import discoproxy.proxy.names
import discoproxy.proxy.planes
import discoproxy.proxy.ports
import discoproxy.proxy.reactor
import discoproxy.proxy.relay
import discoproxy.proxy.server
import discoproxy.proxy.stats
import discoproxy.proxy.tls_termination
import discoproxy.routing
import discoproxy.status
import discoproxy.wake  # noqa: F401  # every module with marks is imported: OWNED is full
from discoproxy.admin.server import Admin, serve_admin
from discoproxy.guard import Ban, BanList, save_bans
from discoproxy.owners import ANY, LOOP, OWNED, REACTOR, owner_of
from discoproxy.protocol import minecraft
from discoproxy.proxy.reactor import Reactor
from discoproxy.proxy.server import reconfigure
from tests.proxy.helpers import backend, echo, handshake, receive_all, running_proxy, server
from tests.proxy.test_tls_termination import make_cert, talk, tls_server

pytestmark = pytest.mark.anyio

REACTOR_THREAD = "discoproxy-reactor"


def _marked_code() -> dict[CodeType, tuple[str, str]]:
    """code object → (owner, qualified name) for every marked function."""
    marked: dict[CodeType, tuple[str, str]] = {}
    for cls in OWNED:
        for klass in cls.__mro__:
            for value in vars(klass).values():
                fn = value.fget if isinstance(value, property) else value
                fn = getattr(fn, "__func__", fn)
                owner = owner_of(fn)
                code = getattr(fn, "__code__", None)
                if owner is not None and owner != ANY and code is not None:
                    marked[code] = (owner, fn.__qualname__)
    return marked


@asynccontextmanager
async def _recording(reactor: Reactor, loop_thread: str) -> AsyncIterator[list[str]]:
    marked = _marked_code()
    wrong: list[str] = []
    seen: set[tuple[CodeType, str]] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        mark = marked.get(frame.f_code)
        if mark is None:
            return
        thread = threading.current_thread().name
        key = (frame.f_code, thread)
        if key in seen:
            return
        seen.add(key)
        owner, name = mark
        if owner == REACTOR and thread != REACTOR_THREAD:
            wrong.append(f"{name} (reactor-owned) ran on {thread}")
        elif owner == LOOP and thread != loop_thread:
            wrong.append(f"{name} (loop-owned) ran on {thread}")

    # Python 3.11 has no setprofile_all_threads: each running thread installs its own
    threading.setprofile(profile)  # threads started from now on (to_thread workers)
    sys.setprofile(profile)  # this one: the loop
    await reactor.run(lambda: sys.setprofile(profile))
    try:
        yield wrong
    finally:
        await reactor.run(lambda: sys.setprofile(None))
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    assert {code for code, _ in seen}, "the profiler saw no marked call"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


STATUS = json.dumps({"version": {"name": "1.21", "protocol": 767}, "players": {"max": 1}})


async def _status_backend(stream: Any, info: Any) -> None:
    await stream.receive()
    await stream.send(minecraft.encode_status_response(STATUS))


async def test_marked_functions_run_on_their_owners_thread(tmp_path: Path) -> None:
    assert any(owner_of(cls) == REACTOR for cls in OWNED)
    assert any(owner_of(cls) == LOOP for cls in OWNED)
    cert, key = make_cert(tmp_path, "tls.example.com")
    bans = tmp_path / "bans.json"
    port = _free_port()
    async with (
        backend(echo) as echo_backend,
        backend(_status_backend) as status_backend,
    ):
        servers = [
            server("name", "name.example.com", addresses=[echo_backend.address]),
            server("host", "host.example.com", addresses=[f"localhost:{echo_backend.port}"]),
            server(
                "status", "status.example.com", addresses=[status_backend.address],
                status_cache_ttl=30,
            ),
            tls_server("tls", "tls.example.com", echo_backend.address, cert, key),
        ]  # fmt: skip
        async with running_proxy(servers, bans_file=str(bans), idle_timeout=30) as proxy:
            admin = Admin(
                proxy.ctx, proxy.registry, token="", read_only=True, reload=None,
                providers=None, inbox=None,
            )  # fmt: skip
            url_addr = await proxy.tg.start(serve_admin, admin, "127.0.0.1:0")
            loop_thread = threading.current_thread().name
            async with _recording(proxy.ctx.reactor, loop_thread) as wrong:

                async def exchange(payload: bytes) -> bytes:
                    async with await proxy.connect() as stream:
                        await stream.send(payload)
                        with anyio.fail_after(5):
                            return await stream.receive()

                # name route, forwarded both ways; a host name resolved on the loop
                assert await exchange(handshake("name.example.com")) == handshake(
                    "name.example.com"
                )
                assert await exchange(handshake("host.example.com")) == handshake(
                    "host.example.com"
                )
                # a status ping: a miss fetched by the loop, then a hit on the reactor
                for _ in range(2):
                    ping = handshake("status.example.com", next_state=1) + b"\x01\x00"
                    assert await exchange(ping)
                # an unknown name, answered by the reactor itself
                async with await proxy.connect() as stream:
                    await stream.send(handshake("nobody.example.com") + b"\x02\x00")
                    await receive_all(stream)
                # TLS termination: the client fd goes to the loop and comes back
                _, answer = await anyio.to_thread.run_sync(
                    talk, proxy.port, "tls.example.com", b"hi"
                )
                assert answer == b"hi"
                # a port route opened, used and closed by table swaps
                ported = server(
                    "port", addresses=[echo_backend.address], ports=[f"{port}:{echo_backend.port}"]
                )
                proxy.registry.apply_snapshot("test", [*servers, ported])
                with anyio.fail_after(5):
                    while True:
                        try:
                            stream = await anyio.connect_tcp("127.0.0.1", port)
                            break
                        except OSError:
                            await anyio.sleep(0.02)
                async with stream:
                    await stream.send(b"ping")
                    with anyio.fail_after(5):
                        assert await stream.receive() == b"ping"
                proxy.registry.apply_snapshot("test", servers)
                # a ban list, a reload, admin scrapes
                save_bans(bans, BanList([Ban("test", time.time(), username="griefer")]))
                with anyio.fail_after(5):
                    while not await proxy.ctx.reactor.run(
                        lambda: proxy.ctx.guard.bans.has_usernames
                    ):
                        await anyio.sleep(0.02)
                new = proxy.ctx.config.model_copy(update={"max_connections": 500})
                assert await reconfigure(proxy.ctx, new) == []
                for path in ("/metrics", "/api/routes", "/api/connections"):
                    status, _ = await anyio.to_thread.run_sync(
                        _get, f"http://127.0.0.1:{url_addr[1]}{path}"
                    )
                    assert status == 200
                with anyio.fail_after(5):
                    while await proxy.ctx.reactor.run(lambda: len(proxy.ctx.connections)):
                        await anyio.sleep(0.02)
            assert wrong == []


def _get(url: str) -> tuple[int, bytes]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()
