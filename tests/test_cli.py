from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from discoproxy.cli import main
from discoproxy.protocol import minecraft
from tests.support import running_proxy, write_servers
from tests.test_config import PROXY_PROTOCOL_NEEDS_TRUSTED_PROXIES


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def import_refused(kind: str, source: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    """``discoproxy import KIND SOURCE`` of ``text``, which must fail: its stderr."""
    source.write_text(text)
    code, _, err = run(["import", kind, str(source), "--out", str(source.parent / "o")], capsys)
    assert code == 1, err
    return err


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_servers(
        tmp_path / "servers",
        {
            "survival.toml": 'domains = ["survival.example.com"]\naddresses = ["10.0.0.5:25565"]\n',
            "lobby.yaml": (
                "domains: ['*.lobby.example.com']\naddresses: ['10.0.0.6']\n"
                "sendProxyProtocol: true\n"
            ),
            "other.toml": 'domains = ["survival.example.com"]\naddresses = ["10.0.0.7"]\n',
        },
    )
    (tmp_path / "discoproxy.toml").write_text(f'servers_dir = "{tmp_path / "servers"}"\n')
    return tmp_path


def test_check_accepts_a_valid_setup(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["check", "--config", str(project / "discoproxy.toml")], capsys)
    assert code == 0
    assert "config ok: 1 listeners, 3 servers" in err
    assert (
        "route conflict: 'survival.example.com' is claimed by other@file and survival@file" in err
    )


def test_check_warns_of_a_fallback_no_provider_serves(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = project / "discoproxy.toml"
    config.write_text(
        config.read_text() + 'bind = ["0.0.0.0:25565"]\n'
        '[fallbacks]\n"0.0.0.0:25565" = "survival@file"\n'
    )
    _, _, err = run(["check", "--config", str(config)], capsys)
    assert "no provider serves now" not in err
    config.write_text(config.read_text().replace("survival@file", "survivl@file"))
    code, _, err = run(["check", "--config", str(config)], capsys)
    assert code == 0  # the server may come later: a warning, not an error
    assert (
        "warning: fallbacks: '0.0.0.0:25565' names 'survivl@file', which no provider serves now"
        in err
    )


def test_check_fails_on_a_bad_server_file(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = project / "servers" / "broken.toml"
    bad.write_text('domains = ["ok.example.com"]\naddresses = ["10.0.0.5:99999"]\n')
    code, _, err = run(["check", "--config", str(project / "discoproxy.toml")], capsys)
    assert code == 1
    assert (
        f"error: {bad}:2: addresses: invalid port in address '10.0.0.5:99999'; "
        "expected 1-65535, got '99999'" in err
    )


def test_check_fails_on_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_conections = 3\n")
    code, _, err = run(["check", "--config", str(path)], capsys)
    assert code == 1
    assert f"{path}:1: max_conections: unknown key (did you mean 'max_connections'?)" in err


def test_check_explains_why_proxy_protocol_needs_trusted_proxies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "discoproxy.toml"
    config.write_text(f'servers_dir = "{tmp_path}"\nreceive_proxy_protocol = true\n')
    code, _, err = run(["check", "--config", str(config)], capsys)
    assert code == 1
    assert err == (
        f"error: {config}: {PROXY_PROTOCOL_NEEDS_TRUSTED_PROXIES}\n"
        "config NOT ok: the config itself does not load\n"
    )


def test_routes_prints_the_table(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["routes", "--offline", "--config", str(project / "discoproxy.toml")]
    code, out, _ = run(argv, capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SERVER", "DOMAINS", "BACKENDS", "PORTS", "PROXY-PROTOCOL", "STATE"]
    assert any(
        line.split()[:3] == ["lobby@file", "*.lobby.example.com", "10.0.0.6:25565"]
        for line in lines
    )
    assert any(line.startswith("conflict:") for line in lines)


def test_routes_json(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["routes", "--offline", "--json", "--config", str(project / "discoproxy.toml")]
    code, out, _ = run(argv, capsys)
    data = json.loads(out)
    assert code == 0
    by_id = {row["id"]: row for row in data["routes"]}
    assert by_id["survival@file"]["domains"] == []  # lost the conflict to other@file
    assert by_id["other@file"]["domains"] == ["survival.example.com"]
    assert by_id["lobby@file"]["send_proxy_protocol"] is True


def _offline(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """``check``'s exit code and report, and the route ids ``routes --offline`` prints."""
    code, _, report = run(["check", "--config", str(config)], capsys)
    routes_code, out, _ = run(["routes", "--offline", "--json", "--config", str(config)], capsys)
    assert routes_code == 0
    return code, report, [row["id"] for row in json.loads(out)["routes"]]


def test_check_and_routes_offline_read_the_file_providers_directory(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = write_servers(
        project / "elsewhere",
        {"creative.toml": 'domains = ["creative.example.com"]\naddresses = ["10.0.0.8"]\n'},
    )
    (project / "servers" / "broken.toml").write_text("domains = [\n")  # not read
    config = project / "discoproxy.toml"
    config.write_text(
        f'servers_dir = "{project / "servers"}"\n'
        f'[providers.file]\ndirectory = "{elsewhere}"\n'
        "[providers.docker]\nenabled = false\n"
    )
    code, report, ids = _offline(config, capsys)
    assert code == 0, report
    assert ids == ["creative@file"]
    assert f"note: provider file: 1 servers from providers.file.directory {elsewhere}" in report
    assert "config ok: 1 listeners, 1 servers" in report
    assert "broken.toml" not in report


def test_check_reports_errors_in_the_file_providers_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = write_servers(
        tmp_path / "elsewhere", {"bad.toml": 'domains = ["x.example.com"]\naddresses = "a:0"\n'}
    )
    config = tmp_path / "discoproxy.toml"
    config.write_text(f'[providers.file]\ndirectory = "{elsewhere}"\n')
    code, report, ids = _offline(config, capsys)
    assert code == 1
    assert ids == []
    assert f"error: {elsewhere / 'bad.toml'}:2: addresses:" in report
    # the last line is the verdict, and it agrees with the exit code
    last = report.strip().splitlines()[-1]
    assert (
        last == "config NOT ok: 1 error above; 1 listeners, 0 servers would be routed without them"
    )


def test_check_ends_with_a_verdict_when_the_config_itself_is_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "discoproxy.toml"
    config.write_text("max_connections = -3\n")
    code, _, report = run(["check", "--config", str(config)], capsys)
    assert code == 1 and "max_connections" in report
    assert report.strip().splitlines()[-1].startswith("config NOT ok")


def test_check_and_routes_offline_skip_a_disabled_file_provider(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "servers" / "broken.toml").write_text("domains = [\n")
    config = project / "discoproxy.toml"
    config.write_text(
        f'servers_dir = "{project / "servers"}"\n'
        "[providers.file]\nenabled = false\n"
        "[providers.docker]\nenabled = false\n"
    )
    code, report, ids = _offline(config, capsys)
    assert code == 0, report
    assert ids == []
    assert "note: provider file disabled in the config" in report
    assert "config ok: 1 listeners, 0 servers" in report
    assert "broken.toml" not in report


def test_check_notes_a_missing_directory_the_enabled_provider_would_wait_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "discoproxy.toml"
    missing = tmp_path / "not-yet"
    config.write_text(
        f'[providers.file]\nenabled = true\ndirectory = "{missing}"\n'
        "[providers.docker]\nenabled = false\n"
    )
    code, report, ids = _offline(config, capsys)
    assert code == 0, report
    assert ids == []
    assert (
        f"warning: providers.file.directory {missing} does not exist; serve waits for it" in report
    )
    config.write_text(f'servers_dir = "{missing}"\n[providers.docker]\nenabled = false\n')
    code, report, _ = _offline(config, capsys)
    assert code == 0
    assert f"note: provider file off: servers_dir {missing} does not exist" in report


def test_help_documents_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("serve", "check", "routes", "connections", "health"):
        assert command in out
    code, out, _ = run(["serve", "--help"], capsys)
    for option in ("--config", "--bind", "--servers-dir", "--log-level", "--log-format"):
        assert option in out


def test_ban_add_list_remove_edit_the_bans_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "discoproxy.toml"
    bans = tmp_path / "bans.json"
    config.write_text(f'bans_file = "{bans}"\n')
    args = ["--config", str(config)]
    code, out, _ = run(["ban", "add", "203.0.113.0/24", "--reason", "grief", *args], capsys)
    assert code == 0 and "banned 203.0.113.0/24" in out
    code, out, _ = run(["ban", "add", *args, "Notch", "--duration", "1h"], capsys)
    assert code == 0 and "banned user Notch until" in out
    code, out, _ = run(["ban", "list", "--json", *args], capsys)
    listed = json.loads(out)
    assert [b.get("ip") or b.get("username") for b in listed] == ["203.0.113.0/24", "Notch"]
    assert listed[1]["expires"] is not None
    code, out, _ = run(["ban", "remove", "notch", *args], capsys)
    assert code == 0
    code, _, err = run(["ban", "remove", *args, "notch"], capsys)
    assert code != 0 and "no ban on notch" in err
    code, _, err = run(["ban", "add", "not a name", *args], capsys)
    assert code != 0 and "invalid Minecraft username 'not a name'" in err
    assert [b["ip"] for b in json.loads(bans.read_text())["bans"]] == ["203.0.113.0/24"]


def test_serve_raises_the_open_file_limit_to_the_hard_limit() -> None:
    import resource

    from discoproxy.cli import raise_nofile_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        raise_nofile_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_routes_connections_and_health_read_a_running_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        backend = f"127.0.0.1:{listener.getsockname()[1]}"
        servers = {"game.toml": f'domains = ["game.example.com"]\naddresses = ["{backend}"]\n'}
        with running_proxy(tmp_path, servers) as proxy:
            admin = proxy.admin_url()
            with socket.create_connection(proxy.address) as client:
                client.sendall(
                    minecraft.encode_handshake(765, "game.example.com", 25565, 2)
                    + minecraft.encode_login_start("tester")
                )
                accepted, _ = listener.accept()
                with accepted:
                    accepted.recv(100)
                    code, out, _ = run(["routes", "--admin", admin], capsys)
                    assert code == 0
                    header, row = out.splitlines()[:2]
                    assert header.split()[-4:] == ["ACTIVE", "TOTAL", "UP", "DOWN"]
                    assert row.split()[:3] == ["game@file", "game.example.com", backend]
                    assert row.split()[-4:-2] == ["1", "1"]

                    code, out, _ = run(["connections", "--admin", admin, "--json"], capsys)
                    assert code == 0
                    (conn,) = json.loads(out)["connections"]
                    assert conn["route"] == "game@file"
                    assert conn["client"] == "{}:{}".format(*client.getsockname())

                    code, out, _ = run(["connections", "--admin", admin], capsys)
                    assert out.splitlines()[-1] == "1 open"
                    header, row = out.splitlines()[:2]
                    assert header.split()[:5] == ["ID", "WORKER", "PROTO", "CLIENT", "PLAYER"]
                    worker = conn["worker"]  # workers = 0: one per CPU; one process: None
                    assert row.split()[1] == ("-" if worker is None else str(worker))
                    assert row.split()[4] == "tester"  # its Login Start's name

            code, out, _ = run(["health", "--admin", admin], capsys)
            assert code == 0
            assert out.strip() == f"{admin}/healthz: ok"
            code, _, _ = run(["health", "--ready", "--admin", admin], capsys)
            assert code == 0
        code, _, err = run(["health", "--admin", admin], capsys)
        assert code == 1
        assert err.startswith(f"unhealthy: no admin API at {admin}")
        code, _, err = run(["routes", "--admin", admin], capsys)
        assert code == 2
        assert "'routes --offline' shows what the config would route" in err


def test_commands_find_the_admin_api_from_the_config_and_use_its_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = '[admin]\ntoken = "t0ken"\n'
    with running_proxy(tmp_path, {}, config) as proxy:
        host, port = proxy.admin_url().removeprefix("http://").split(":")
        # a config naming that admin address (what the running instance was started with)
        path = tmp_path / "client.toml"
        path.write_text(f'[admin]\nlisten = "0.0.0.0:{port}"\ntoken = "t0ken"\n')
        code, out, _ = run(["routes", "--config", str(path)], capsys)
        assert code == 0, out
        path.write_text(f'[admin]\nlisten = "{host}:{port}"\n')
        code, _, err = run(["routes", "--config", str(path)], capsys)
        assert code == 2
        assert "401, the admin API wants a token" in err
        code, _, _ = run(["routes", "--config", str(path), "--token", "t0ken"], capsys)
        assert code == 0


def test_the_routes_table_shows_each_backends_open_connections_and_why_it_is_down() -> None:
    from discoproxy.cli import _backends_cell

    row = {
        "backends": ["10.0.0.1:25565", "10.0.0.2:25565"],
        "pool": [
            {"address": "10.0.0.1:25565", "weight": 2, "state": "up", "active": 3},
            {
                "address": "10.0.0.2:25565",
                "weight": 1,
                "state": "down",
                "active": 0,
                "last_check": "connection refused",
                "last_error": "",
            },
            {"address": "10.0.0.3:25565", "weight": 1, "state": "down", "last_error": "timed out"},
            {"address": "10.0.0.4:25565", "weight": 0, "state": "starting", "active": 0},
        ],
    }
    assert _backends_cell(row) == (
        "10.0.0.1:25565 x2 3 open, 10.0.0.2:25565 (down: connection refused), "
        "10.0.0.3:25565 (down: timed out), 10.0.0.4:25565 x0 (starting)"
    )
