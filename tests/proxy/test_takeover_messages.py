"""Takeover messages that break the protocol (``proxy/takeover.py``), in-process over a
real unix socket: a running proxy's :class:`TakeoverServer` logs the bad peer and serves
on (its ``run`` is in serve's main task group: an exception out of it would end the
proxy), and a new process's :func:`take_over` raises :class:`TakeoverError` (``cli.py``
exits 3), never another exception, and keeps none of the fds it was sent."""

from __future__ import annotations

import array
import json
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from discoproxy.proxy.takeover import TakeoverError, TakeoverServer, take_over
from tests.support import captured_logs

pytestmark = pytest.mark.anyio

DEEP = b"[" * 200_000  # one packet: json.loads raises RecursionError on it


def seqpacket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def open_links() -> set[str]:
    """What each open fd of this process is ("socket:[inode]", a path …)."""
    links = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            links.add(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:  # closed meanwhile (the listing's own fd, too)
            continue
    return links


def fake_ctx(handover: Callable[[], list[Any]] = list) -> Any:
    """What ``_hand_over`` reads of a ProxyContext: one data plane (``workers = 1``
    here), no admin listener; ``handover`` lists its sockets."""
    return SimpleNamespace(workers=SimpleNamespace(count=1, handover=handover), admin_sockets=[])


@asynccontextmanager
async def running_server(
    tmp_path: Path, ctx: Any
) -> AsyncIterator[tuple[TakeoverServer, list[int]]]:
    stops: list[int] = []
    server = TakeoverServer(ctx, tmp_path / "takeover.sock", lambda: stops.append(1))
    assert server.open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.run)  # an exception out of it fails the test (the proxy)
        yield server, stops
        tg.cancel_scope.cancel()


async def exchange(path: Path, *packets: bytes) -> bytes:
    """Connect, send ``packets`` one by one reading an answer after each but the last,
    then read until the server hangs up; what it sent last."""

    def talk() -> bytes:
        with seqpacket(path) as sock:
            answer = b""
            for n, packet in enumerate(packets):
                sock.send(packet)
                if n < len(packets) - 1:
                    answer = sock.recv(1 << 20)
            while chunk := sock.recv(1 << 20):
                answer = chunk
            return answer

    return await anyio.to_thread.run_sync(talk)


REQUEST = json.dumps({"take": "sockets", "workers": 1}).encode()


@pytest.mark.parametrize(
    "packets",
    [
        [DEEP],
        [b"\xff\xfe\x00garbage"],  # not UTF-8 / UTF-16 JSON
        [b'{"take": "sockets", "workers": ' + b"9" * 5000 + b"}"],  # past int's digits
        [b'["take", "sockets"]'],
        [b'{"take": "sockets", "workers": "1"}'],
        [b'{"take": "sockets", "workers": ' + b"[" * 900 + b"]" * 900 + b"}"],
        [REQUEST, DEEP],  # the sockets handed, then a "ready" that is not JSON
        [REQUEST, b'{"ready": [1]}'],  # nor a pid
    ],
)
async def test_a_bad_message_abandons_the_takeover_and_the_proxy_serves_on(
    tmp_path: Path, packets: list[bytes]
) -> None:
    async with running_server(tmp_path, fake_ctx()) as (server, stops):
        with anyio.fail_after(10), captured_logs("WARNING") as logs:
            await exchange(server.path, *packets)
            while not any("takeover abandoned, still serving" in line for line in logs):
                await anyio.sleep(0.01)
            assert not stops  # not stopping: it still serves
            assert "TakeoverMessageError" in "".join(logs)
            # and it still answers the next one: a wrong worker count is told why
            answer = await exchange(server.path, b'{"take": "sockets", "workers": 3}')
            assert "has 1 data planes and this one would have 3" in json.loads(answer)["error"]


async def test_an_internal_error_while_handing_over_leaves_the_proxy_serving(
    tmp_path: Path,
) -> None:
    def broken() -> list[Any]:
        raise RuntimeError("a bug")

    async with running_server(tmp_path, fake_ctx(broken)) as (server, stops):
        with anyio.fail_after(10), captured_logs("ERROR") as logs:
            await exchange(server.path, REQUEST)
            while not any("internal error, still serving" in line for line in logs):
                await anyio.sleep(0.01)
            assert not stops
            answer = await exchange(server.path, b'{"take": "sockets", "workers": 3}')
            assert "would have 3" in json.loads(answer)["error"]


# --- the new process's side --------------------------------------------------------------


class FakeOldProcess(threading.Thread):
    """Listens on ``path``, reads the request and answers each of ``answers`` with one
    listening socket's fd (as the sockets packet would carry)."""

    def __init__(self, path: Path, answers: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.answers = answers
        self.request: bytes = b""
        self.handed = ""  # the handed socket, as /proc/self/fd names it ("socket:[inode]")

    def run(self) -> None:
        with self.listener:
            conn, _ = self.listener.accept()
            with conn, socket.socket() as handed:
                self.handed = os.readlink(f"/proc/self/fd/{handed.fileno()}")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                conn.settimeout(10)
                self.request = conn.recv(1 << 16)
                rights = array.array("i", [handed.fileno()]).tobytes()
                for answer in self.answers:
                    try:
                        conn.sendmsg([answer], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                    except OSError:
                        return  # the new process hung up: it gave up
                conn.recv(1)  # until the new process hangs up


def sockets(*entries: Any, more: Any = False) -> bytes:
    return json.dumps({"sockets": list(entries), "more": more}).encode()


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ([sockets(["bind"])], r"socket entry \['bind'\]"),  # was IndexError
        ([b'{"sockets": [["bind", "0.0.0.0:25565", Infinity, 0]]}'], "inf"),  # OverflowError
        ([b'{"sockets": [["bind", "0.0.0.0:25565", NaN, 0]]}'], "nan"),
        ([sockets(["bind", "0.0.0.0:25565", 0.5, 0])], "0.5"),
        ([sockets(["bind", "0.0.0.0:25565", True, 0])], "True"),
        ([sockets(["bind", "0.0.0.0:25565", 0, -1])], "-1"),
        ([sockets(["bind", "0.0.0.0:25565", 0, 10**30])], "socket entry"),
        ([sockets(["bind", 5, 0, 0])], "socket entry"),
        ([sockets("bind:25565")], "socket entry 'bind:25565'"),  # its characters were entries
        ([sockets(["bind", "0.0.0.0:25565", 0, 0], more="yes")], "expected"),
        ([b'{"sockets": 5}'], "expected"),
        ([DEEP], "not JSON"),  # was RecursionError
        ([b"[1, 2]"], "not a JSON object"),
        ([b'{"error": ' + b"[" * 900 + b"]" * 900 + b"}"], r"\[\[\[\[\[\[\[\.\.\.\]\]\]\]\]\]\]"),
    ],
)
async def test_a_bad_answer_from_the_old_process_is_a_takeover_error(
    tmp_path: Path, answers: list[bytes], message: str
) -> None:
    path = tmp_path / "takeover.sock"
    old = FakeOldProcess(path, answers)
    old.start()
    with anyio.fail_after(10), pytest.raises(TakeoverError, match=message):
        await take_over(path, 1)
    assert json.loads(old.request) == {"take": "sockets", "workers": 1}
    await anyio.to_thread.run_sync(old.join, 10)
    # the fd it was sent is closed too: once the old side closed its own, no fd of this
    # process names that socket (counting fds would see whatever else opens or closes)
    assert old.handed and old.handed not in open_links()


async def test_a_well_formed_answer_is_still_taken(tmp_path: Path) -> None:
    path = tmp_path / "takeover.sock"
    old = FakeOldProcess(path, [sockets(["bind", "127.0.0.1:25565", 0, 0])])
    old.start()
    with anyio.fail_after(10):
        inherited = await take_over(path, 1)
    try:
        (group,) = inherited.take("bind", "127.0.0.1:25565") or []
        assert len(group) == 1 and group[0].type == socket.SOCK_STREAM
        group[0].close()
    finally:
        inherited.abandon()
    await anyio.to_thread.run_sync(old.join, 10)
