"""``discoproxy import infrarust``: an ``infrarust.toml``, written here from Infrarust's
documented global settings (its keys, with values of our own), turned into a
discoproxy config that loads and keeps Infrarust's meaning, with every key that is not
carried over named. Its server files load as they are (tests/providers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.test_cli import import_refused, run

INFRARUST = """\
bind = "0.0.0.0:25577"
worker_threads = 0
max_connections = 500
connect_timeout = "2m30s"
connect_max_attempts = 3
servers_dir = "./servers"
plugins_dir = "./plugins"
announce_proxy_commands = true
receive_proxy_protocol = true
so_reuseport = false
unknown_domain_behavior = "drop"

[active_health]
enabled = true

[rate_limit]
enabled = true
max_connections = 4
window = "20s"
status_max = 200
status_window = "10s"

[status_cache]
ttl = "7s"
max_entries = 500

[keepalive]
time = "30s"

[ban]
provider = "builtin"
file = "bans.json"

[default_motd.online]
text = "Unknown server"
version_name = "Proxy"

[default_motd.crashed]
text = "Crashed"

[docker]
endpoint = "unix:///var/run/docker.sock"
network = "minecraft"
poll_interval = "30s"

[ip_filter]
whitelist = ["10.0.0.0/8"]
blacklist = ["10.6.6.0/24"]

[forwarding]
mode = "velocity"

[telemetry]
enabled = true

[web]
enable_api = true
"""


def test_an_infrarust_toml_imports_into_a_config_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "infrarust.toml"
    source.write_text(INFRARUST)
    out = tmp_path / "discoproxy"
    code, _, stderr = run(["import", "infrarust", str(source), "--out", str(out)], capsys)
    assert code == 0, stderr
    config = yaml.safe_load((out / "discoproxy.yaml").read_text())
    assert config["bind"] == ["0.0.0.0:25577"] and config["max_connections"] == 500
    assert config["connect_timeout"] == 150.0 and config["servers_dir"] == "./servers"
    assert config["rate_limit"] == {"connections": 4, "status": 200, "window": 20.0}
    assert config["status_cache_ttl"] == 7.0
    assert config["ip_filter"] == {"allow": ["10.0.0.0/8"], "deny": ["10.6.6.0/24"]}
    assert config["providers"]["docker"] == {
        "enabled": True,
        "endpoint": "unix:///var/run/docker.sock",
        "network": "minecraft",
    }
    assert config["motds"]["unknown_domain"]["text"] == "Unknown server"
    for note in (
        "worker_threads", "connect_max_attempts", "plugins_dir", "receive_proxy_protocol",
        "unknown_domain_behavior = drop", "status_window", "status_cache.max_entries",
        "ban.file", "default_motd.crashed", "docker.poll_interval",
        "forwarding.mode = velocity", "telemetry", "web", "keepalive", "active_health",
    ):  # fmt: skip
        assert note in stderr, (note, stderr)
    code, _, report = run(["check", "--config", str(out / "discoproxy.yaml")], capsys)
    assert "config NOT ok: the config itself" not in report, report


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_connections = [1]\n", "max_connections: expected a whole number, got [1]"),
        ('[rate_limit]\nenabled = true\nmax_connections = "x"\n',
         "rate_limit.max_connections: expected a whole number, got 'x'"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    err = import_refused("infrarust", tmp_path / "infrarust.toml", text, capsys)
    assert message in err, err


def test_a_bad_duration_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "infrarust.toml"
    source.write_text('connect_timeout = "soon"\n')
    code, _, err = run(["import", "infrarust", str(source), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "connect_timeout" in err and "2m30s" in err
