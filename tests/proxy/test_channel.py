"""The control plane ↔ worker line: messages, requests, fds and tables (proxy/channel.py)."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import anyio
import pytest

from discoproxy.model import ServerDefinition
from discoproxy.proxy.channel import (
    CHUNK,
    Channel,
    ChannelError,
    TableDecoder,
    TableEncoder,
    socket_pair,
)
from discoproxy.routing import build_table


def server(sid: str, *domains: str) -> ServerDefinition:
    return ServerDefinition(id=sid, domains=domains, addresses=("127.0.0.1:1",))  # type: ignore[arg-type]


def test_a_table_crosses_with_each_server_once_and_unchanged_ones_keep_their_identity() -> None:
    encoder, decoder = TableEncoder(), TableDecoder()
    kept, moving = server("kept", "kept.example.com"), server("moved", "moved.example.com")
    skeleton, new = encoder.encode(build_table({"file": (kept, moving)}))
    assert {s.id for _, s in new} == {"kept", "moved"}
    first = decoder.decode(skeleton, pickle.loads(pickle.dumps(new)))
    moved = moving.model_copy(update={"domains": ("elsewhere.example.com",)})
    skeleton, new = encoder.encode(build_table({"file": (kept, moved)}))
    assert [s.id for _, s in new] == ["moved"]  # only what changed crosses
    assert len(skeleton) < len(pickle.dumps(new))  # the skeleton holds no server
    second = decoder.decode(skeleton, pickle.loads(pickle.dumps(new)))
    assert second.by_id["kept@file"].server is first.by_id["kept@file"].server
    assert second.by_id["moved@file"].server == moved
    assert second.lookup_host("elsewhere.example.com") is second.by_id["moved@file"]
    assert second.lookup_host("moved.example.com") is None
    # a worker that starts later gets the skeleton with every server in use
    late = TableDecoder()
    skeleton, _ = encoder.encode(build_table({"file": (kept, moved)}))
    third = late.decode(skeleton, encoder.everything())
    assert sorted(third.by_id) == ["kept@file", "moved@file"]


@pytest.mark.anyio
async def test_messages_requests_fds_and_big_payloads_cross_in_order() -> None:
    ours, theirs = socket_pair()
    got: list[tuple[str, object]] = []
    seen_fd: list[bytes] = []

    async def worker_side(kind: str, payload: object, fds: list[int]) -> object:
        if fds:
            with socket.socket(fileno=fds[0]) as sock:
                seen_fd.append(sock.recv(16))
        got.append((kind, payload if kind != "big" else len(payload)))  # type: ignore[arg-type]
        if kind == "fail":
            raise ValueError("as asked")
        return ("answer", payload) if kind == "ask" else None

    async def control_side(kind: str, payload: object, fds: list[int]) -> object:
        return None

    a, b = Channel(ours, control_side), Channel(theirs, worker_side)
    left, right = socket.socketpair()
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        tg.start_soon(b.run)
        right.sendall(b"through the fd")
        await a.send("first", 1, fds=[left.fileno()])
        await a.send("big", b"x" * (CHUNK * 3 + 5))
        await a.send("third", 3)
        assert await a.request("ask", 42) == ("answer", 42)
        with pytest.raises(ChannelError, match="ValueError: as asked"):
            await a.request("fail")
        assert got[:3] == [("first", 1), ("big", CHUNK * 3 + 5), ("third", 3)]
        assert seen_fd == [b"through the fd"]
        b.close()  # the worker hangs up: requests fail, run ends
        with pytest.raises(ChannelError):
            await a.request("ask", 1)
        tg.cancel_scope.cancel()
    left.close()
    right.close()


@pytest.mark.anyio
async def test_a_worker_may_have_only_the_tables_tls_files_read(tmp_path: Path) -> None:
    """The control plane reads a file for a worker only when some route's tls names it."""
    from discoproxy.config import ProxyConfig
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.proxy.tls_termination import FileContents
    from discoproxy.proxy.workers import WorkerSet
    from discoproxy.routing import Registry
    from tests.proxy.helpers import server as tls_server

    cert, key, other = (tmp_path / name for name in ("a.crt", "a.key", "secret"))
    for path in (cert, key, other):
        path.write_bytes(path.name.encode())
    registry = Registry()
    tls = {"cert": str(cert), "key": str(key)}
    registry.apply_snapshot("test", [tls_server("a", "a.example.com", addresses=["x:1"], tls=tls)])
    config = ProxyConfig.model_validate({"bind": ["127.0.0.1:0"]})
    workers = WorkerSet(ProxyContext(config, registry), 2)
    worker = workers.workers[0]
    read = await workers._handle(worker, "files", ((cert, key), None), [])
    assert isinstance(read, FileContents)
    assert read.contents == (b"a.crt", b"a.key")
    assert await workers._handle(worker, "files", ((cert, key), read.stamp), []) is None
    with pytest.raises(LookupError, match="no route's tls files"):
        await workers._handle(worker, "files", ((cert, other), None), [])
    key.unlink()
    missing = await workers._handle(worker, "files", ((cert, key), None), [])
    assert isinstance(missing, FileNotFoundError)  # raised by the worker as its own
