"""Hand-offs between workers that fail, and what a handed connection may carry.

With ``workers = N`` a connection from a trusted balancer whose PROXY header names a
client of another worker is handed there (``ClientConnection._hand_off``). The worker
that accepted it counted it; when the other never takes it (restarting, dead with the
connection queued or unread, or the control plane gone) it still ends with one close
line saying why, counted closed, its socket closed. And ``adopt`` keeps the same bound
on the bytes it was handed as ``_read_prefix`` keeps on what it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import socketserver
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from discoproxy.protocol import minecraft
from discoproxy.proxy.access_log import AccessLog
from discoproxy.proxy.channel import socket_pair
from discoproxy.proxy.connection import MAX_PREFIX_BYTES, HandedClient, adopt_client
from discoproxy.proxy.server import ProxyContext
from discoproxy.proxy.stats import UNROUTED
from discoproxy.proxy.steering import steer_index
from discoproxy.proxy.worker import Worker
from tests.proxy.helpers import backend, handshake, running_proxy, server, until_closed
from tests.support import ProxyProcess, serving
from tests.support import running_proxy as proxy_process

WORKERS = 2
BALANCER = next(f"127.0.0.{n}" for n in range(2, 60) if steer_index(f"127.0.0.{n}", WORKERS) == 0)
# a client worker 1 owns, behind a balancer the kernel steers to worker 0
CLIENT = next(f"198.51.100.{n}" for n in range(1, 60) if steer_index(f"198.51.100.{n}", 2) == 1)
HELLO = handshake("mc.example.com")
CONFIG = (
    "workers = 2\nreceive_proxy_protocol = true\n"
    'trusted_proxies = ["127.0.0.0/8"]\nhandshake_timeout = 30\n'
)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def mc(port: int) -> dict[str, str]:
    return {"mc.toml": f'domains = ["mc.example.com"]\naddresses = ["127.0.0.1:{port}"]\n'}


def through_balancer(proxy: ProxyProcess, client: str = CLIENT) -> socket.socket:
    """A connection from the balancer (worker 0's) naming ``client`` (worker 1's), with
    a login right behind its PROXY header."""
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((BALANCER, 0))
    sock.connect(("127.0.0.1", proxy.port))
    sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 25565\r\n".encode() + HELLO)
    return sock


def ended(sock: socket.socket) -> bool:
    """The proxy closed ``sock`` (end of file or a reset), rather than serving it."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def worker_pid(proxy: ProxyProcess, index: int) -> int:
    with urllib.request.urlopen(proxy.admin_url() + "/api/workers", timeout=5) as answer:
        workers = json.load(answer)["workers"]
    pid = workers[index]["pid"]
    assert pid, workers
    return int(pid)


def wait_for_count(proxy: ProxyProcess, pattern: str, count: int, timeout: float = 15.0) -> None:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while sum(1 for line in list(proxy.lines) if regex.search(line)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} of {pattern!r}:\n{proxy.output()}"
        time.sleep(0.01)


def metric(proxy: ProxyProcess, sample: str) -> float:
    with urllib.request.urlopen(proxy.admin_url() + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def failed_line(reason: str) -> str:
    return (
        rf"conn #\d+ closed: client={re.escape(CLIENT)}:40000 route=- backend=- up=\d+B "
        rf"down=0B duration=\S+ worker=0 reason=handoff failed: {reason}$"
    )


def test_a_connection_for_a_restarting_worker_ends_with_its_close_line(tmp_path: Path) -> None:
    """Worker 1 killed, waiting its back-off: worker 0's connection for it is closed
    with a close line naming why, and counted closed (retried with a longer back-off
    each time, should the replacement have started before the hand-off got there)."""
    with serving(_Echo) as port, proxy_process(tmp_path, mc(port), CONFIG) as proxy:
        proxy.wait_for_line("worker 1 ready")
        for attempt in range(1, 7):
            os.kill(worker_pid(proxy, 1), signal.SIGKILL)
            wait_for_count(proxy, r"worker 1 \(pid \d+\) exited with signal SIGKILL", attempt)
            with through_balancer(proxy) as sock:
                if ended(sock):
                    break
            wait_for_count(proxy, "worker 1 ready", attempt + 1)  # served: once more
        else:
            pytest.fail("worker 1 was back every time before the hand-off reached it")
        proxy.wait_for_line(failed_line("worker 1 restarting"))
        assert metric(proxy, f'discoproxy_connections_total{{route="{UNROUTED}"}}') == 1
        active = f'discoproxy_connections_active{{listener="127.0.0.1:{proxy.port}",route="-"}}'
        assert metric(proxy, active) == 0


def test_a_connection_queued_for_a_worker_that_dies_ends_with_its_close_line(
    tmp_path: Path,
) -> None:
    """Worker 1 stopped (SIGSTOP) while a connection is handed to it, then killed: it
    never took it, so worker 0 closes it with its close line (and the socket is closed:
    the client reads its end)."""
    with serving(_Echo) as port, proxy_process(tmp_path, mc(port), CONFIG) as proxy:
        proxy.wait_for_line("worker 1 ready")
        pid = worker_pid(proxy, 1)
        os.kill(pid, signal.SIGSTOP)
        try:
            with through_balancer(proxy) as sock:
                time.sleep(1.0)  # the control plane has it queued for (or sent to) worker 1
                assert not re.search(failed_line(".*"), proxy.output(), re.MULTILINE)
                os.kill(pid, signal.SIGKILL)
                proxy.wait_for_line(failed_line("worker 1 exited"))
                assert ended(sock)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert metric(proxy, f'discoproxy_connections_total{{route="{UNROUTED}"}}') == 1


# a proxy behind a trusted PROXY-protocol balancer on loopback, with time to spare
BEHIND_A_BALANCER: dict[str, Any] = {
    "receive_proxy_protocol": True,
    "trusted_proxies": ["127.0.0.0/8"],
    "handshake_timeout": 30,
}


@pytest.mark.anyio
async def test_a_hand_off_without_a_control_plane_ends_with_its_close_line() -> None:
    """The control plane is gone when a worker hands a connection off (its channel's
    other end closed): the connection ends where it was accepted, logged and counted."""
    ours, theirs = socket_pair()
    theirs.close()  # the control plane's end: gone
    worker = Worker(ours)
    lines: list[str] = []
    async with running_proxy(**BEHIND_A_BALANCER) as proxy:

        def as_a_worker(ctx: ProxyContext) -> None:
            ctx._access = AccessLog("text", lines.append)
            ctx.steer = lambda ip: 1  # every client is another worker's
            ctx.hand_off = worker._hand_off

        await proxy.on_reactor(as_a_worker)
        stream = await proxy.connect()
        header = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25565\r\n"
        await stream.send(header + HELLO)
        with anyio.fail_after(5):
            await until_closed(stream)
        await proxy.wait_on_reactor(lambda ctx: lines)
        (line,) = lines
        assert "client=203.0.113.9:40000 route=- backend=-" in line, line
        assert f"up={len(header + HELLO)}B down=0B" in line, line
        assert line.rstrip().endswith("reason=handoff failed: control plane gone"), line
        closed = await proxy.on_reactor(lambda ctx: ctx.stats.route(UNROUTED).closed)
        accepted = await proxy.on_reactor(lambda ctx: sum(ctx.stats.accepted.values()))
        assert (accepted, closed) == (1, 1)
        assert await proxy.connections() == []
    ours.close()


@pytest.mark.anyio
async def test_a_bug_while_handing_off_ends_the_connection_counted_as_an_internal_error() -> None:
    lines: list[str] = []
    async with running_proxy(**BEHIND_A_BALANCER) as proxy:

        async def broken(worker: int, handed: Any, fd: int) -> None:
            os.close(fd)  # sent on, as the real one's request does, then a bug
            raise RuntimeError("injected hand-off bug")

        def as_a_worker(ctx: ProxyContext) -> None:
            ctx._access = AccessLog("text", lines.append)
            ctx.steer = lambda ip: 1
            ctx.hand_off = broken

        await proxy.on_reactor(as_a_worker)
        stream = await proxy.connect()
        await stream.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25565\r\n" + HELLO)
        with anyio.fail_after(5):
            await until_closed(stream)
        await proxy.wait_on_reactor(lambda ctx: lines)
        (line,) = lines
        assert "reason=handoff failed: internal error: RuntimeError" in line, line
        assert await proxy.on_reactor(lambda ctx: ctx.stats.internal_errors) == 1
        assert await proxy.connections() == []


@pytest.mark.anyio
async def test_adopt_bounds_what_it_was_handed_as_a_read_does() -> None:
    """A handed connection whose bytes after the header exceed MAX_PREFIX_BYTES with no
    routable handshake (a status request whose answer is pending, then more) is refused
    at once, with the reason _read_prefix gives, not left to buffer until the next read."""
    lines: list[str] = []

    async def silent(stream: Any, info: Any) -> None:
        await until_closed(stream)

    async with backend(silent) as status_backend:
        mc_server = server("mc", "mc.example.com", addresses=[status_backend.address])
        async with running_proxy([mc_server], handshake_timeout=30) as proxy:
            await proxy.on_reactor(
                lambda ctx: setattr(ctx, "_access", AccessLog("text", lines.append))
            )
            junk = b"\x00" * (MAX_PREFIX_BYTES + 4000)
            data = (
                b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 25565\r\n"
                + handshake("mc.example.com", next_state=1)
                + minecraft.encode_packet(0x00, b"")  # status request: answer pending
                + junk
            )
            with socket.create_server(("127.0.0.1", 0)) as listener:
                client = socket.create_connection(listener.getsockname())
                accepted, peer = listener.accept()
            handed = HandedClient(
                peer=(peer[0], peer[1]),
                listener="test",
                fallback=None,
                port_key=None,
                started=time.monotonic(),
                data=data,
            )
            fd = accepted.detach()
            await proxy.on_reactor(lambda ctx: adopt_client(ctx, fd, handed))
            await proxy.wait_on_reactor(lambda ctx: lines, within_s=2)
            (line,) = lines
            assert "client=203.0.113.7:40000 route=mc@test" in line, line
            reason = f"reason=protocol error: sent {len(junk)} bytes without a routable handshake"
            assert line.rstrip().endswith(reason), line
            client.settimeout(5)
            with client:
                assert client.recv(65536) == b""
