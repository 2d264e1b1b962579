from __future__ import annotations

import json
from pathlib import Path

import pytest

from discoproxy.cli import main
from tests.support import write_servers


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


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


def test_routes_prints_the_table(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["routes", "--config", str(project / "discoproxy.toml")], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SERVER", "DOMAINS", "BACKENDS", "PORTS", "PROXY-PROTOCOL"]
    assert any(
        line.split()[:3] == ["lobby@file", "*.lobby.example.com", "10.0.0.6:25565"]
        for line in lines
    )
    assert any(line.startswith("conflict:") for line in lines)


def test_routes_json(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["routes", "--json", "--config", str(project / "discoproxy.toml")], capsys)
    data = json.loads(out)
    assert code == 0
    by_id = {row["id"]: row for row in data["routes"]}
    assert by_id["survival@file"]["domains"] == []  # lost the conflict to other@file
    assert by_id["other@file"]["domains"] == ["survival.example.com"]
    assert by_id["lobby@file"]["send_proxy_protocol"] is True


def test_help_documents_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("serve", "check", "routes"):
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
