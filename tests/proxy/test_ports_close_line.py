"""A UDP session's close line carries what a TCP connection's does (``access_log.py``):
client, route, backend, bytes each way, duration, reason, the worker with workers = N,
and its port; with ``log_format = "json"`` as the record's bound fields."""

from __future__ import annotations

import json
import re
import socket
from functools import partial

import anyio
import pytest

from discoproxy.config import ProxyConfig
from discoproxy.logwriter import writer
from discoproxy.proxy.server import ProxyContext, run_proxy
from discoproxy.routing import Registry
from tests.proxy.test_ports import free_ports, udp_client, udp_echo, udp_route

pytestmark = pytest.mark.anyio


async def _one_session_closed(
    monkeypatch: pytest.MonkeyPatch, log_format: str, worker: int | None
) -> tuple[str, int, int]:
    """Run one UDP session to its idle timeout: its close line, its client's port and the
    backend's port."""
    lines: list[str] = []
    monkeypatch.setattr(writer(), "put", lines.append)  # where close lines go
    port = free_ports(1, socket.SOCK_DGRAM)
    async with udp_echo() as (backend_port, _):
        registry = Registry()
        registry.apply_snapshot("test", [udp_route("bedrock", port, backend_port)])
        config = ProxyConfig.model_validate(
            {
                "bind": ["127.0.0.1:0"],
                "log_format": log_format,
                "udp_session_timeout": 0.2,
                "port_routes_bind": "127.0.0.1",
            }
        )
        ctx = ProxyContext(config, registry, worker=worker)  # as a worker's context is
        async with anyio.create_task_group() as tg:
            await tg.start(partial(run_proxy, config, registry, context=ctx))
            async with await udp_client(port) as client:
                with anyio.fail_after(5):
                    while True:  # the port opens a moment after the start
                        await client.send(b"hello")
                        with anyio.move_on_after(0.2):
                            assert await client.receive() == b"echo:hello"
                            break
                client_port = client.extra(anyio.abc.SocketAttribute.local_port)
                with anyio.fail_after(5):
                    while not (closed := [line for line in lines if "udp session #" in line]):
                        await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    (line,) = closed
    return line, client_port, backend_port


@pytest.mark.parametrize("worker", [None, 1])
async def test_a_udp_session_close_line_has_the_tcp_lines_fields(
    monkeypatch: pytest.MonkeyPatch, worker: int | None
) -> None:
    line, client, backend = await _one_session_closed(monkeypatch, "text", worker)
    shown = f"worker={worker} " if worker is not None else ""
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO    udp session #\d+ closed: "
        rf"client=127\.0\.0\.1:{client} route=bedrock@test port=\d+/udp "
        rf"backend=127\.0\.0\.1:{backend} up=5B down=10B duration=\d+\.\d{{3}}s "
        rf"{shown}reason=idle timeout\n$",
        line,
    ), line


@pytest.mark.parametrize("worker", [None, 1])
async def test_a_udp_session_json_close_line_binds_the_tcp_lines_fields(
    monkeypatch: pytest.MonkeyPatch, worker: int | None
) -> None:
    line, client, backend = await _one_session_closed(monkeypatch, "json", worker)
    entry = json.loads(line)
    record = entry["record"]
    assert record["level"] == {"name": "INFO", "no": 20}
    assert record["message"].startswith("udp session #")
    assert entry["text"].endswith(f"{record['message']}\n")
    extra = record["extra"]
    assert isinstance(extra.pop("duration_s"), float)
    assert isinstance(extra.pop("conn"), int)
    port = extra.pop("port")
    assert re.fullmatch(r"\d+/udp", port), port
    expected = {
        "client": f"127.0.0.1:{client}",
        "route": "bedrock@test",
        "backend": f"127.0.0.1:{backend}",
        "bytes_up": 5,
        "bytes_down": 10,
        "reason": "idle timeout",
    }
    if worker is not None:
        expected["worker"] = worker
    assert extra == expected
