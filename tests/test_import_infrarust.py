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


INFRARUST_V1 = """\
bind: "0.0.0.0:25566"
keepalive_timeout: 30s
domains: ["hub.example.com"]
addresses: ["localhost:25570"]
file_provider:
  proxies_path: ["./proxies", "./more"]
  file_type: "yaml"
  watch: true
docker_provider:
  docker_host: "unix:///var/run/docker.sock"
  label_prefix: "infrarust"
  polling_interval: 10
  watch: true
  default_domains: ["docker.local"]
cache:
  status_ttl_seconds: 30
  max_status_entries: 1000
telemetry:
  enabled: false
logging:
  use_color: true
motds:
  unknown:
    version: "1.20.1"
    max_players: 100
    online_players: 0
    description: "Unknown server"
  unreachable:
    description: "Down for now"
filters:
  rate_limiter:
    requestLimit: 10
    windowLength: 1s
  ip_filter:
    enabled: true
    whitelist: ["10.0.0.0/8"]
    blacklist: ["10.6.6.0/24"]
  name_filter:
    enabled: true
    blacklist: ["Griefer"]
  ban:
    enabled: true
    file_path: "bans.json"
"""


def test_an_infrarust_1_config_yaml_imports_into_a_config_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "config.yaml"
    source.write_text(INFRARUST_V1)
    out = tmp_path / "discoproxy"
    code, _, stderr = run(["import", "infrarust", str(source), "--out", str(out)], capsys)
    assert code == 0, stderr
    config = yaml.safe_load((out / "discoproxy.yaml").read_text())
    assert config["bind"] == ["0.0.0.0:25566"] and config["servers_dir"] == "./proxies"
    assert config["providers"]["docker"] == {
        "enabled": True,
        "endpoint": "unix:///var/run/docker.sock",
        "label_prefix": "infrarust",
    }
    assert config["status_cache_ttl"] == 30.0
    assert config["motds"] == {
        "unknown_domain": {
            "version_name": "1.20.1",
            "max_players": 100,
            "online_players": 0,
            "text": "Unknown server",
        },
        "unreachable": {"text": "Down for now"},
    }
    assert config["rate_limit"] == {"connections": 10, "window": 1.0}
    assert config["ip_filter"] == {"allow": ["10.0.0.0/8"], "deny": ["10.6.6.0/24"]}
    assert config["players"] == {"allow": [], "deny": ["Griefer"]}
    route = yaml.safe_load((out / "servers" / "config.yaml").read_text())
    assert route == {"addresses": ["localhost:25570"], "domains": ["hub.example.com"]}
    for note in (
        "keepalive_timeout", "file_provider.proxies_path: one servers_dir here",
        "docker_provider.default_domains", "docker_provider.polling_interval",
        "cache.max_status_entries", "telemetry", "logging", "filters.ban",
        "filters.rate_limiter: carried",
        "domains/addresses: written as servers/config.yaml beside the config; move it into "
        "./proxies",
    ):  # fmt: skip
        assert note in stderr, (note, stderr)
    code, _, report = run(["check", "--config", str(out / "discoproxy.yaml")], capsys)
    assert "config NOT ok: the config itself" not in report, report


def test_an_infrarust_1_config_with_addresses_but_no_domains_is_a_default_route() -> None:
    from discoproxy.importers import import_infrarust_v1

    imported = import_infrarust_v1({"addresses": ["10.0.0.5:25565"]})
    assert imported.servers == {"config": {"addresses": ["10.0.0.5:25565"], "default": True}}


def test_an_infrarust_1_value_of_the_wrong_kind_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = import_refused(
        "infrarust",
        tmp_path / "config.yaml",
        "filters:\n  rate_limiter:\n    requestLimit: x\n",
        capsys,
    )
    assert "filters.rate_limiter.requestLimit: expected a whole number, got 'x'" in err, err


def test_an_infrarust_1_route_without_proxies_path_loads_from_where_it_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "config.yaml"
    source.write_text('domains: ["hub.example.com"]\naddresses: ["10.0.0.5:25565"]\n')
    out = tmp_path / "o"
    code, _, err = run(["import", "infrarust", str(source), "--out", str(out)], capsys)
    assert code == 0, err
    config = yaml.safe_load((out / "discoproxy.yaml").read_text())
    assert config["servers_dir"] == str(out / "servers")
    assert (out / "servers" / "config.yaml").exists()
