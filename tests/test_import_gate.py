"""``discoproxy import gate``: a Gate Lite config.yml, written here from Gate's documented
lite schema (every route key, in each form its docs show), turned into discoproxy's
config and server files that load, with every key that is not carried over named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from discoproxy.importers import gate_markdown
from tests.test_cli import import_refused, run

GATE = """\
config:
  bind: 0.0.0.0:25577
  connectionTimeout: 3s
  readTimeout: 30s
  proxyProtocol: true
  debug: false
  quota:
    connections: {enabled: true, ops: 5, burst: 10, maxEntries: 1000}
  lite:
    enabled: true
    routes:
      - host: play.example.org
        backend: [10.0.0.5:25565]
        strategy: round-robin
        max-connections: 50
        proxyProtocol: true
        blacklist: [203.0.113.0/24]
        fallback:
          motd: |
            Play is offline.
            Come back later!
          version: {name: Try later, protocol: -1}
          players: {online: 0, max: 100}
      - host: '*.example.org'
        backend: 10.0.0.6:25566
        tcpShieldRealIP: true
      - host: [lobby.example.org, LOBBY.example.net]
        backend: [10.0.0.7:25565, backend.example.org:25566]
        cachePingTTL: 60s
        modifyVirtualHost: true
      - host: '*'
        backend: 10.0.0.10:25565
        cachePingTTL: -1
connect:
  enabled: false
api:
  enabled: false
"""


def test_a_gate_lite_config_imports_into_files_that_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "config.yml"
    source.write_text(GATE)
    out = tmp_path / "discoproxy"
    code, _, stderr = run(["import", "gate", str(source), "--out", str(out)], capsys)
    assert code == 0, stderr
    config = yaml.safe_load((out / "discoproxy.yaml").read_text())
    assert config["bind"] == ["0.0.0.0:25577"] and config["connect_timeout"] == 3.0
    servers = {p.stem: yaml.safe_load(p.read_text()) for p in (out / "servers").glob("*.yaml")}
    assert sorted(servers) == [
        "01-play-example-org",
        "02-example-org",
        "03-lobby-example-org",
        "04-default",
    ]
    play = servers["01-play-example-org"]
    assert play["balance"] == "round_robin" and play["send_proxy_protocol"] is True
    assert play["ip_filter"] == {"deny": ["203.0.113.0/24"]}
    assert play["motds"]["unreachable"]["text"] == "Play is offline.\nCome back later!"
    assert play["motds"]["unreachable"]["max_players"] == 100
    assert servers["02-example-org"]["tcpshield_real_ip"] is True
    assert "tcpShieldRealIP" not in stderr  # carried
    lobby = servers["03-lobby-example-org"]
    assert lobby["domain_rewrite"] == "backend" and lobby["status_cache_ttl"] == 60.0
    assert lobby["balance"] == "random"  # Gate's default over several backends
    assert (
        servers["04-default"]["default"] is True and servers["04-default"]["status_cache_ttl"] == 0
    )
    for key in (
        "max-connections", "config.proxyProtocol", "config.readTimeout",
        "config.quota", "config.debug", "connect:", "api:",
    ):  # fmt: skip
        assert key in stderr, (key, stderr)
    # what was written loads, and routes as Gate routed it
    config_path = str(out / "discoproxy.yaml")
    code, _, report = run(["check", "--config", config_path], capsys)
    assert code == 0, report
    code, routes, _ = run(["routes", "--offline", "--json", "--config", config_path], capsys)
    rows = {row["id"]: row for row in json.loads(routes)["routes"]}
    assert "lobby.example.net" in json.dumps(rows["03-lobby-example-org@file"])
    assert "*.example.org" in json.dumps(rows["02-example-org@file"])


def test_existing_files_are_kept_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "config.yml"
    source.write_text(GATE)
    out = tmp_path / "discoproxy"
    assert run(["import", "gate", str(source), "--out", str(out)], capsys)[0] == 0
    code, _, err = run(["import", "gate", str(source), "--out", str(out)], capsys)
    assert code == 1 and "pass --force" in err
    assert run(["import", "gate", str(source), "--out", str(out), "--force"], capsys)[0] == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config: {}", "config.lite.routes"),
        ("config: {lite: {routes: [{host: a.example.org}]}}", "host and backend are both required"),
        ("config: {lite: {routes: [{host: a, backend: b, strategy: fastest}]}}", "strategy"),
        # what a Gate key becomes, refused by the model: named as the Gate key
        ("config: {lite: {routes: [{host: a.example.org, backend: 'b:99999'}]}}",
         "config.lite.routes[0].backend: invalid port in address 'b:99999'"),
        ("config: {lite: {routes: [{host: 'bad host!', backend: b}]}}",
         "config.lite.routes[0].host: invalid domain 'bad host!'"),
        ("config: {bind: nope, lite: {routes: []}}", "config.bind: invalid bind 'nope'"),
    ],
)  # fmt: skip
def test_what_is_not_a_gate_lite_config_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    err = import_refused("gate", tmp_path / "config.yml", text, capsys)
    assert message in err, err


def test_the_readme_table_is_the_importers_own() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert gate_markdown() in readme, (
        "README's Gate Lite table is stale: paste `uv run python -m discoproxy.importers`"
    )
