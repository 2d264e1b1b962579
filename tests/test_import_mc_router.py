"""``discoproxy import mc-router``: the Compose service (or env file) that runs
itzg/mc-router, written here with its documented settings (its README's flags and
environment names, values of our own), turned into a config and server files that
load, keep mc-router's meaning, and name every setting not carried over."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from discoproxy.import_mc_router import (
    import_mc_router,
    settings_from_compose,
    settings_from_env_file,
    settings_from_flags,
)
from tests.test_cli import import_refused, run

COMPOSE = """\
services:
  vanilla:
    image: itzg/minecraft-server
  forge:
    image: itzg/minecraft-server
  router:
    image: itzg/mc-router:1.20
    ports: ["25566:25566"]
    environment:
      MAPPING: |
        vanilla.example.com=vanilla:25565
        forge.example.com=forge:25565
        modded.example.com=forge:25565
      DEFAULT: lobby:25565
      USE_PROXY_PROTOCOL: true
      SIMPLIFY_SRV: "true"
      CLIENTS_TO_ALLOW: 10.0.0.0/8, 192.168.0.0/16
      CLIENTS_TO_DENY: 10.6.6.0/24
      CONNECTION_RATE_LIMIT: 5
      AUTO_SCALE_ASLEEP_MOTD: "Asleep: join to wake it"
      AUTO_SCALE_LOADING_MOTD: "Starting…"
      WEBHOOK_URL: http://hooks.local/mc
      WEBHOOK_TIMEOUT: 5s
      API_BINDING: ":8080"
      METRICS_BACKEND: prometheus
      NGROK_TOKEN: secret
      TZ: Europe/Paris
    command: ["-in-docker", "-port", "25566", "--auto-scale-up", "-debug"]
"""


def test_a_compose_service_imports_into_a_config_and_servers_that_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "compose.yml"
    source.write_text(COMPOSE)
    out = tmp_path / "discoproxy"
    code, _, stderr = run(["import", "mc-router", str(source), "--out", str(out)], capsys)
    assert code == 0, stderr
    config = yaml.safe_load((out / "discoproxy.yaml").read_text())
    assert config["bind"] == ["0.0.0.0:25566"]  # the command's -port
    # -in-docker, and mc-router's -auto-scale-up for its discovered containers
    assert config["providers"]["docker"] == {"enabled": True, "mc_router_auto_scale_up": True}
    assert config["ip_filter"] == {"allow": ["10.0.0.0/8", "192.168.0.0/16"]}
    assert config["motds"] == {
        "sleeping": {"text": "Asleep: join to wake it"},
        "starting": {"text": "Starting…"},
    }
    assert config["webhooks"] == [
        {
            "url": "http://hooks.local/mc",
            "events": ["player_connected", "player_disconnected"],
            "timeout": 5.0,
        }
    ]
    assert config["log_level"] == "DEBUG"
    assert config["admin"] == {"listen": "0.0.0.0:8080"}
    servers = {p.stem: yaml.safe_load(p.read_text()) for p in (out / "servers").iterdir()}
    assert servers == {
        "vanilla-example-com": {
            "domains": ["vanilla.example.com", "*._tcp.vanilla.example.com"],
            "addresses": ["vanilla:25565"],
            "send_proxy_protocol": True,
        },
        "forge-example-com": {  # two names of one backend: one server
            "domains": [
                "forge.example.com",
                "modded.example.com",
                "*._tcp.forge.example.com",
                "*._tcp.modded.example.com",
            ],
            "addresses": ["forge:25565"],
            "send_proxy_protocol": True,
        },
        "default": {"default": True, "addresses": ["lobby:25565"], "send_proxy_protocol": True},
    }
    for note in (
        "CONNECTION_RATE_LIMIT: mc-router's is one budget for every client together",
        "CLIENTS_TO_DENY: mc-router ignores it when CLIENTS_TO_ALLOW is set",
        "NGROK_TOKEN: no ngrok agent",
        "TZ: not an mc-router setting",
        "WEBHOOK_URL: carried",
        "server-list pings send no event",
        "API_BINDING: carried as the admin listener",
        "USE_PROXY_PROTOCOL: carried to the imported servers",
    ):
        assert note in stderr, (note, stderr)
    assert "METRICS_BACKEND" not in stderr  # prometheus: /metrics, nothing to say
    code, _, report = run(["check", "--config", str(out / "discoproxy.yaml")], capsys)
    assert code == 0, report


def test_an_env_file_imports_its_settings() -> None:
    settings = settings_from_env_file(
        "# mc-router.env\n"
        "MAPPING=a.example.com=a:25565,b.example.com=b:25566\n"
        'RECEIVE_PROXY_PROTOCOL="true"\n'
        "TRUSTED_PROXIES='10.1.0.0/16'\n"
        "\n"
        "export ROUTES_CONFIG=/config/routes.json\n"
        "IN_DOCKER_SWARM=1\n"
        "DOCKER_REFRESH_INTERVAL=30\n"
        "LOG_LEVEL=warn\n"
    )
    imported = import_mc_router(settings)
    config = imported.config
    assert config["receive_proxy_protocol"] is True
    assert config["trusted_proxies"] == ["10.1.0.0/16"]
    assert config["providers"] == {
        "mc_router_routes": {"enabled": True, "path": "/config/routes.json"},
        "swarm": {"enabled": True, "poll_interval": 30.0},
    }
    assert config["log_level"] == "WARNING"
    assert imported.servers == {
        "a-example-com": {"domains": ["a.example.com"], "addresses": ["a:25565"]},
        "b-example-com": {"domains": ["b.example.com"], "addresses": ["b:25566"]},
    }
    assert imported.not_carried == []


def test_without_in_docker_nothing_is_discovered_as_in_mc_router() -> None:
    imported = import_mc_router({"MAPPING": "a.example.com=a:25565", "AUTO_SCALE_UP": "true"})
    assert imported.config["providers"] == {"docker": {"enabled": False}}
    assert imported.not_carried == [
        "AUTO_SCALE_UP: it applies to discovered containers, and IN_DOCKER is not set"
    ]


def test_the_global_auto_scale_flags_reach_the_docker_provider() -> None:
    settings = {
        "IN_DOCKER": "true",
        "AUTO_SCALE_UP": "true",
        "AUTO_SCALE_DOWN": "TRUE",
        "AUTO_SCALE_DOWN_AFTER": "15m",
    }
    assert import_mc_router(settings).config["providers"]["docker"] == {
        "enabled": True,
        "mc_router_auto_scale_up": True,
        "mc_router_auto_scale_down": True,
        "mc_router_auto_scale_down_after": 900.0,
    }


def test_receiving_proxy_headers_from_anyone_is_not_carried() -> None:
    imported = import_mc_router({"RECEIVE_PROXY_PROTOCOL": "true"})
    assert "receive_proxy_protocol" not in imported.config
    assert imported.not_carried[0].startswith(
        "RECEIVE_PROXY_PROTOCOL without TRUSTED_PROXIES: mc-router then trusts every header"
    )


def test_flags_parse_as_go_s_flag_package_does() -> None:
    assert settings_from_flags(
        ["--mapping=a.example.com=a:1", "-mapping", "b.example.com=b:2", "-in-docker",
         "-auto-scale-down-after=5m", "-simplify-srv=false"]
    ) == {
        "MAPPING": "a.example.com=a:1\nb.example.com=b:2",
        "IN_DOCKER": "true",
        "AUTO_SCALE_DOWN_AFTER": "5m",
        "SIMPLIFY_SRV": "false",
    }  # fmt: skip


def test_the_command_line_as_one_string_wins_over_the_environment() -> None:
    document = yaml.safe_load(
        "services:\n  r:\n    image: itzg/mc-router\n    environment: [PORT=1, DEBUG=true]\n"
        "    command: -port 2 -default 'lobby:25565'\n"
    )
    assert settings_from_compose(document) == {
        "PORT": "2",
        "DEBUG": "true",
        "DEFAULT": "lobby:25565",
    }


@pytest.mark.parametrize(
    ("compose", "message"),
    [
        ("services: {a: {image: nginx}}\n", "services: none run an itzg/mc-router image"),
        ("services: {a: {image: itzg/mc-router}, b: {image: itzg/mc-router}}\n",
         "services: several (a, b) run an itzg/mc-router image; name one with --service"),
        ("services: {r: {image: itzg/mc-router, environment: [MAPPING]}}\n",
         "services.r.environment: MAPPING takes its value from the host's environment"),
        ("services: {r: {image: itzg/mc-router, command: [-port]}}\n",
         "services.r.command: -port needs a value"),
        ("services: {r: {image: itzg/mc-router, command: [serve]}}\n",
         "services.r.command: 'serve' is not a flag"),
        ("services: {r: {image: itzg/mc-router, environment: {MAPPING: nohost}}}\n",
         "MAPPING: expected externalHostname=host:port, got 'nohost'"),
        ("services: {r: {image: itzg/mc-router, environment: {MAPPING: 'a b=x:1'}}}\n",
         "MAPPING (a-b): invalid domain 'a b'"),
        ("services: {r: {image: itzg/mc-router, environment: {DEFAULT: 'x:99999'}}}\n",
         "DEFAULT (default): invalid port in address 'x:99999'"),
        ("services: {r: {image: itzg/mc-router, environment: {PORT: http}}}\n",
         "PORT: expected 1-65535, got 'http'"),
        ("services: {r: {image: itzg/mc-router, environment: {IN_DOCKER: maybe}}}\n",
         "IN_DOCKER: expected true or false, got 'maybe'"),
        ("services: {r: {image: itzg/mc-router, environment: {LOG_LEVEL: loud}}}\n",
         "LOG_LEVEL: expected one of trace, debug"),
    ],
)  # fmt: skip
def test_a_setting_that_cannot_be_read_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], compose: str, message: str
) -> None:
    err = import_refused("mc-router", tmp_path / "compose.yaml", compose, capsys)
    assert message in err, err


def test_the_service_can_be_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "compose.yml"
    source.write_text(
        "services:\n  a: {image: itzg/mc-router, environment: {PORT: '1'}}\n"
        "  b: {image: itzg/mc-router, environment: {PORT: '2'}}\n"
    )
    out = tmp_path / "o"
    argv = ["import", "mc-router", str(source), "--service", "b", "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert yaml.safe_load((out / "discoproxy.yaml").read_text())["bind"] == ["0.0.0.0:2"]
