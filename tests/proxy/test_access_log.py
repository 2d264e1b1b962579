"""The per-connection close line: loguru's look, without loguru's cost."""

from __future__ import annotations

import io
import json
import re

import pytest

from discoproxy.model import ServerDefinition
from discoproxy.proxy.access_log import AccessLog
from discoproxy.proxy.connection import ClientConnection
from discoproxy.routing import Route


def _closed_connection() -> ClientConnection:
    conn = ClientConnection.__new__(ClientConnection)
    conn.id = 7
    conn.client_addr = ("2001:db8::7", 40000)
    conn.backend_addr = ("10.0.0.5", 25565)
    server = ServerDefinition(id="mc", domains=["mc.example.com"], addresses=["10.0.0.5:25565"])
    conn.route = Route("mc@file", "file", (("10.0.0.5", 25565),), False, server)
    conn.prefix_bytes = 20
    conn.started = 0.0
    conn.reason = "both sides closed"
    conn.player = None

    class _Flow:
        count = 0

    conn.up, conn.down = _Flow(), _Flow()  # type: ignore[assignment]
    conn.up.count, conn.down.count = 100, 300
    return conn


LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO    conn #7 closed: "
    r"client=\[2001:db8::7\]:40000 route=mc@file backend=10\.0\.0\.5:25565 "
    r"up=120B down=300B duration=\d+\.\d{3}s reason=both sides closed\n$"
)


def test_a_login_names_its_player_and_offline_uuid() -> None:
    stream = io.StringIO()
    conn = _closed_connection()
    conn.player = "Notch"
    AccessLog("text", stream.write).closed(conn)
    assert "backend=10.0.0.5:25565 player=Notch uuid=b50ad385-829d-3141-a216-7e7d7539ba7f up=" in (
        stream.getvalue()
    )
    stream = io.StringIO()
    AccessLog("json", stream.write).closed(conn)
    extra = json.loads(stream.getvalue())["record"]["extra"]
    assert (extra["player"], extra["uuid"]) == ("Notch", "b50ad385-829d-3141-a216-7e7d7539ba7f")


def test_text_line_has_loguru_layout_and_every_field() -> None:
    stream = io.StringIO()
    AccessLog("text", stream.write).closed(_closed_connection())
    assert LINE.match(stream.getvalue()), stream.getvalue()


def test_a_terminal_gets_loguru_colours() -> None:
    stream = io.StringIO()
    AccessLog("text", stream.write, colour=True).closed(_closed_connection())
    line = stream.getvalue()
    assert line.startswith("\x1b[32m") and "\x1b[1mINFO   \x1b[0m conn #7 closed" in line


def test_json_has_loguru_serialize_shape() -> None:
    stream = io.StringIO()
    AccessLog("json", stream.write).closed(_closed_connection())
    entry = json.loads(stream.getvalue())
    assert LINE.match(entry["text"])
    record = entry["record"]
    assert record["level"] == {"name": "INFO", "no": 20}
    assert record["message"].startswith("conn #7 closed: ")
    assert record["extra"] == {
        "conn": 7,
        "client": "[2001:db8::7]:40000",
        "route": "mc@file",
        "backend": "10.0.0.5:25565",
        "bytes_up": 120,
        "bytes_down": 300,
        "duration_s": record["extra"]["duration_s"],
        "reason": "both sides closed",
    }
    assert record["time"]["timestamp"] > 0


@pytest.mark.anyio
async def test_warning_level_writes_no_close_line(capfd: pytest.CaptureFixture[str]) -> None:
    from tests.proxy.helpers import backend, echo, handshake, running_proxy, server

    async with backend(echo) as b:
        servers = [server("mc", "mc.example.com", addresses=[b.address])]
        async with running_proxy(servers, log_level="WARNING") as proxy:
            async with await proxy.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                await stream.receive()
            await proxy.wait_on_reactor(lambda ctx: not ctx.connections)
    assert "closed:" not in capfd.readouterr().err


@pytest.mark.anyio
async def test_a_routed_refusal_and_a_login_start_timeout_name_their_route() -> None:
    """Refused by the server's own ip_filter (after routing), or cut waiting for the
    Login Start: the close line says which route the client asked for."""
    from tests.proxy.helpers import handshake, receive_all, running_proxy, server

    lines: list[str] = []
    servers = [
        server("denied", "denied.example.com", addresses=["127.0.0.1:1"],
               ip_filter={"deny": ["127.0.0.0/8"]}),
        server("mc", "mc.example.com", addresses=["127.0.0.1:1"]),
    ]  # fmt: skip
    async with running_proxy(servers, handshake_timeout=0.3) as proxy:
        await proxy.on_reactor(lambda ctx: setattr(ctx, "_access", AccessLog("text", lines.append)))
        async with await proxy.connect() as stream:
            await stream.send(handshake("denied.example.com"))
            await receive_all(stream)
        async with await proxy.connect() as stream:
            await stream.send(handshake("mc.example.com", username=None))  # no Login Start
            await receive_all(stream)
        await proxy.wait_on_reactor(lambda ctx: not ctx.connections)
    refused, timed_out = lines
    assert "route=denied@test" in refused and "reason=refused: denied@test: denied by" in refused
    assert "route=mc@test" in timed_out and "reason=handshake timeout" in timed_out
