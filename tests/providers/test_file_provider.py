"""The file provider, live: create, edit, break, fix and delete server files under a proxy."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.config import ProxyConfig, load_config
from discoproxy.model import ServerDefinition
from discoproxy.provider import Enabled, LoadResult, load_providers
from discoproxy.routing import Registry, RoutingTable
from providers.file import FileProvider, FileSettings
from tests.proxy.helpers import (
    backend,
    echo,
    handshake,
    named,
    provider_proxy,
    read_string,
    receive_all,
    routed,
)
from tests.support import captured_logs

pytestmark = pytest.mark.anyio

# Bounds for "the change shows up": generous, they are deadlines, not measurements.
LIVE_WITHIN_S = 5.0


@dataclass
class LiveProxy:
    directory: Path
    registry: Registry
    address: tuple[str, int]
    tables: list[RoutingTable] = field(default_factory=list)

    async def connect(self) -> SocketStream:
        return await anyio.connect_tcp(*self.address)

    async def wait_until(self, condition: Callable[[RoutingTable], bool]) -> None:
        with anyio.fail_after(LIVE_WITHIN_S):
            while not condition(self.registry.table):
                await anyio.sleep(0.01)

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text)
        return path


@asynccontextmanager
async def live_proxy(tmp_path: Path) -> AsyncIterator[LiveProxy]:
    directory = tmp_path / "servers"
    directory.mkdir()
    config = ProxyConfig(bind=("127.0.0.1:0",), servers_dir=directory)
    provider = FileProvider("file", FileSettings(), config)
    async with provider_proxy(provider, config, first_snapshot_within_s=5) as proxy:
        live = LiveProxy(directory, proxy.registry, proxy.address, proxy.tables)
        await anyio.sleep(0.2)  # let the watcher settle before tests write files
        yield live


def server_file(port: int, *domains: str) -> str:
    names = ", ".join(f'"{d}"' for d in domains)
    return f'domains = [{names}]\naddresses = ["127.0.0.1:{port}"]\n'


async def test_a_new_file_becomes_routable_and_a_deleted_one_goes_away(tmp_path: Path) -> None:
    async with backend(named(b"A")) as a, live_proxy(tmp_path) as live:
        path = live.write("survival.toml", server_file(a.port, "survival.example.com"))
        await live.wait_until(routed("survival.example.com", "survival@file"))
        async with await live.connect() as stream:
            await stream.send(handshake("survival.example.com"))
            with anyio.fail_after(5):
                assert await stream.receive() == b"A"
        path.unlink()
        await live.wait_until(routed("survival.example.com", None))
        async with await live.connect() as stream:
            await stream.send(handshake("survival.example.com"))
            reply = await receive_all(stream)
        assert "Unknown server: survival.example.com" in read_string(reply[2:])


async def test_edits_apply_without_cutting_open_connections(tmp_path: Path) -> None:
    async with backend(echo) as old, backend(named(b"new")) as new, live_proxy(tmp_path) as live:
        live.write("mc.toml", server_file(old.port, "mc.example.com"))
        await live.wait_until(routed("mc.example.com", "mc@file"))
        async with await live.connect() as stream:
            await stream.send(handshake("mc.example.com"))
            with anyio.fail_after(5):
                await stream.receive()
            live.write("mc.toml", server_file(new.port, "mc.example.com", "other.example.com"))
            await live.wait_until(routed("other.example.com", "mc@file"))
            await stream.send(b"still on the old backend")
            with anyio.fail_after(5):
                assert await stream.receive() == b"still on the old backend"
        async with await live.connect() as stream:
            await stream.send(handshake("mc.example.com"))
            with anyio.fail_after(5):
                assert await stream.receive() == b"new"


async def test_a_broken_file_keeps_its_last_good_version_until_fixed(tmp_path: Path) -> None:
    with captured_logs("INFO") as logs:
        async with backend(named(b"A")) as a, live_proxy(tmp_path) as live:
            path = live.write("mc.toml", server_file(a.port, "mc.example.com"))
            await live.wait_until(routed("mc.example.com", "mc@file"))
            other = live.write("other.toml", server_file(a.port, "other.example.com"))
            path.write_text('domains = ["mc.example.com"]\naddresses = ["127.0.0.1:99999"]\n')
            with anyio.fail_after(LIVE_WITHIN_S):
                while not any("server file rejected" in line for line in logs):
                    await anyio.sleep(0.01)
            rejected = next(line for line in logs if "server file rejected" in line)
            assert "keeping its last good version" in rejected
            assert f"{path}:2: addresses: invalid port in address '127.0.0.1:99999'" in rejected
            assert "expected 1-65535, got '99999'" in rejected
            await live.wait_until(routed("other.example.com", "other@file"))
            assert routed("mc.example.com", "mc@file")(live.registry.table)
            async with await live.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    assert await stream.receive() == b"A"
            path.write_text(server_file(a.port, "fixed.example.com"))
            await live.wait_until(routed("fixed.example.com", "mc@file"))
            assert routed("mc.example.com", None)(live.registry.table)
            assert other.exists()


async def test_write_to_temp_then_rename_publishes_only_whole_files(tmp_path: Path) -> None:
    async with live_proxy(tmp_path) as live:
        for generation in range(5):
            domains = [f"g{generation}-{i}.example.com" for i in range(50)]
            temp = live.directory / ".mc.toml.tmp"
            temp.write_text(server_file(25565, *domains))
            os.replace(temp, live.directory / "mc.toml")
            await live.wait_until(routed(domains[-1], "mc@file"))
        for table in live.tables:
            routes = [r for r in table.routes if r.qualified_id == "mc@file"]
            names = table.domains_of(routes[0]) if routes else []
            assert len(names) in (0, 50)  # never a partial version


async def test_truncate_then_slow_write_is_never_published_half_written(tmp_path: Path) -> None:
    async with live_proxy(tmp_path) as live:
        path = live.directory / "mc.toml"
        text = server_file(25565, *[f"s{i}.example.com" for i in range(50)])
        text += "send_proxy_protocol = true\n"
        # truncate, then write in pieces with pauses longer than the watcher's quiet step
        # (line by line: after the second line the file is valid but incomplete)
        with path.open("w") as handle:
            for line in text.splitlines(keepends=True):
                handle.write(line)
                handle.flush()
                await anyio.sleep(0.07)
        await live.wait_until(routed("s49.example.com", "mc@file"))
        await anyio.sleep(0.2)
        for table in live.tables:
            for route in table.routes:
                if route.qualified_id == "mc@file":
                    assert route.send_proxy_protocol  # the last line was there: whole file


async def test_directory_removed_keeps_routes_and_recreated_reloads(tmp_path: Path) -> None:
    with captured_logs("WARNING") as logs:
        async with backend(named(b"A")) as a, live_proxy(tmp_path) as live:
            live.write("mc.toml", server_file(a.port, "mc.example.com"))
            await live.wait_until(routed("mc.example.com", "mc@file"))
            published = len(live.tables)
            shutil.rmtree(live.directory)  # as `rm -rf`: the file goes, then the directory
            with anyio.fail_after(LIVE_WITHIN_S):  # the provider has seen it gone
                while not any("is missing; keeping its 1 servers" in line for line in logs):
                    await anyio.sleep(0.01)
            # while it is gone: the route is still published, and routes a login
            assert routed("mc.example.com", "mc@file")(live.registry.table)
            async with await live.connect() as stream:
                await stream.send(handshake("mc.example.com"))
                with anyio.fail_after(5):
                    assert await stream.receive() == b"A"
            assert all(routed("mc.example.com", "mc@file")(t) for t in live.tables[published:])
            live.directory.mkdir()
            live.write("new.toml", server_file(a.port, "new.example.com"))
            await live.wait_until(routed("new.example.com", "new@file"))
            assert routed("mc.example.com", None)(live.registry.table)


async def test_same_stem_in_toml_and_yaml_is_reported_and_the_first_kept(tmp_path: Path) -> None:
    with captured_logs("ERROR") as logs:
        async with live_proxy(tmp_path) as live:
            toml = live.write("mc.toml", server_file(25565, "a.example.com"))
            yaml = live.write("mc.yaml", "domains: [b.example.com]\naddresses: ['127.0.0.1:1']\n")
            with anyio.fail_after(LIVE_WITHIN_S):  # both files read: the second reported
                while not any("already used by" in line for line in logs):
                    await anyio.sleep(0.01)
            rejected = next(line for line in logs if "already used by" in line)
            assert f"{yaml}: id: 'mc' is already used by {toml}" in rejected
            await live.wait_until(routed("a.example.com", "mc@file"))
            assert not any(routed("b.example.com", "mc@file")(t) for t in live.tables)


def test_provider_table_is_validated_with_field_names(tmp_path: Path) -> None:
    config = ProxyConfig(providers={"file": {"enabled": "maybe"}})
    with pytest.raises(
        Exception, match=r"providers\.file\.enabled: Input should be 'auto', 'true' or 'false'"
    ):
        load_providers(config, {"file": FileProvider})
    config = ProxyConfig(providers={"fiel": {}})
    with pytest.raises(Exception, match=r"providers\.fiel: unknown provider; registered: file"):
        load_providers(config, {"file": FileProvider})


def test_enabled_takes_toml_booleans_as_well_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text("[providers.file]\nenabled = false\n")
    ((_, enabled),) = load_providers(load_config(path), {"file": FileProvider})
    assert enabled is Enabled.FALSE
    config = ProxyConfig(providers={"file": {"enabled": True}})
    assert load_providers(config, {"file": FileProvider})[0][1] is Enabled.TRUE


def _files(directory: Path) -> Path:
    directory.mkdir()
    (directory / "a.toml").write_text(server_file(25565, "a.example.com"))
    (directory / "b.toml").write_text('domains = ["b.example.com"]\naddresses = ["h:0"]\n')
    (directory / "c.toml").write_text(server_file(25565, "c.example.com"))
    (directory / "c.yaml").write_text("domains: [d.example.com]\naddresses: ['127.0.0.1:1']\n")
    (directory / ".a.toml.swp").write_text("not a server")
    return directory


async def test_load_once_gives_what_run_publishes_first_with_the_errors(tmp_path: Path) -> None:
    directory = _files(tmp_path / "servers")
    provider = FileProvider("file", FileSettings(), ProxyConfig(servers_dir=directory))
    with captured_logs("DEBUG") as logged:
        result = await provider.load_once()
    assert logged == []  # reported through the result, for check to print
    assert [s.id for s in result.servers] == ["a", "c"]
    assert len(result.errors) == 2
    assert result.errors[0].startswith(f"{directory / 'b.toml'}:2: addresses:")
    assert result.errors[1] == (
        f"{directory / 'c.yaml'}: id: 'c' is already used by {directory / 'c.toml'}; "
        "ids must be unique in servers_dir"
    )
    assert result.source == f"servers_dir {directory}"
    first: list[tuple[ServerDefinition, ...]] = []
    with anyio.fail_after(LIVE_WITHIN_S):
        async with anyio.create_task_group() as tg:

            def publish(servers: Iterable[ServerDefinition]) -> None:
                first.append(tuple(servers))
                tg.cancel_scope.cancel()

            tg.start_soon(
                FileProvider("file", FileSettings(), ProxyConfig(servers_dir=directory)).run,
                publish,
            )
    assert first == [result.servers]


async def test_load_once_reads_the_configured_directory_not_servers_dir(tmp_path: Path) -> None:
    elsewhere = _files(tmp_path / "elsewhere")
    config = ProxyConfig(servers_dir=tmp_path / "servers")
    provider = FileProvider("file", FileSettings(directory=elsewhere), config)
    result = await provider.load_once()
    assert [s.id for s in result.servers] == ["a", "c"]
    assert result.source == f"providers.file.directory {elsewhere}"
    assert provider.unavailable_reason() == f"providers.file.directory {elsewhere} does not exist"
    missing = FileProvider("file", FileSettings(), config)
    assert await missing.load_once() == LoadResult(
        (),
        warnings=(f"servers_dir {tmp_path / 'servers'} does not exist; serve waits for it",),
        source=f"servers_dir {tmp_path / 'servers'}",
    )


@pytest.mark.parametrize(
    "line",
    [
        "sleeping = true",
        'held_back = [{ address = "10.0.0.1", health = "starting" }]',
        'heldBack = [{ address = "10.0.0.1", health = "starting" }]',  # the camelCase alias
    ],
)
def test_fields_only_a_provider_sets_are_refused_in_a_server_file(
    tmp_path: Path, line: str
) -> None:
    from discoproxy.config import ConfigError
    from providers.file import load_server_file

    path = tmp_path / "game.toml"
    path.write_text(f'domains = ["game.example.com"]\naddresses = ["10.0.0.1"]\n{line}\n')
    key = line.split(" ", 1)[0]
    with pytest.raises(ConfigError, match=f"{key}: set by the provider"):
        load_server_file(path)


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        # each key is close to one of the server's own (auto_start, players, ports,
        # connect_timeout), which the nested table does not take
        (
            '[health_check]\ntype = "tcp"\nhttp_statu = 200',
            "5: health_check.http_statu: unknown key (did you mean 'http_status'?)",
        ),
        (
            "[motds.online]\nonline_player = 3",
            "4: motds.online.online_player: unknown key (did you mean 'online_players'?)",
        ),
        (
            'healthCheck = { type = "tcp", timeot = 2 }',  # the camelCase alias
            "3: healthCheck.timeot: unknown key (did you mean 'timeout'?)",
        ),
        (
            '[health_check]\ntype = "tcp"\nconnect_timout = 2',
            "5: health_check.connect_timout: unknown key",
        ),
    ],
)
def test_an_unknown_nested_key_of_a_server_file_is_matched_against_its_own_table(
    tmp_path: Path, lines: str, said: str
) -> None:
    from discoproxy.config import ConfigError
    from providers.file import load_server_file

    path = tmp_path / "game.toml"
    path.write_text(f'domains = ["game.example.com"]\naddresses = ["10.0.0.1"]\n{lines}\n')
    with pytest.raises(ConfigError) as info:
        load_server_file(path)
    assert str(info.value) == f"{path}:{said}"


def test_wake_keys_in_a_server_file_are_warned_as_having_no_effect(tmp_path: Path) -> None:
    """Only the Docker and Swarm providers start and stop servers: auto_start in a file is
    loaded (the server still routes) with a warning naming the file and the keys."""
    from providers.file import load_server_file_warned

    path = tmp_path / "game.toml"
    path.write_text('domains = ["game.example.com"]\naddresses = ["10.0.0.1"]\n')
    assert load_server_file_warned(path)[1] == []
    path.write_text(
        'domains = ["game.example.com"]\naddresses = ["10.0.0.1"]\n'
        'auto_start = true\nauto_stop_after = 600\n[wake]\nallow = ["Steve"]\n'
    )
    server, warnings = load_server_file_warned(path)
    assert server.auto_start
    assert warnings == [
        f"{path}: auto_start, auto_stop_after, wake.allow: has no effect here: discoproxy "
        "starts and stops only Docker containers and Swarm services (labels); this server "
        "is routed while its addresses answer"
    ]
