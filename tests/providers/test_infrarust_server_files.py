"""Infrarust v2 server files as Infrarust documents them (its server-definition
reference: every key, in each form shown), loaded by discoproxy's file provider: each key
honoured with Infrarust's meaning, loaded with a warning naming it, or refused naming it
and why. Fixtures are written here from that schema, not copied."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from discoproxy.config import ConfigError
from providers.file import load_server_file_warned
from providers.infrarust import migration_markdown

# Every key of the reference's "full example", with values of our own.
FULL = """\
name = "survival"
network = "main"
domains = ["survival.mc.example.org", "*.survival.example.org"]
addresses = ["10.0.1.10:25565", "10.0.1.11:25565"]
proxy_mode = "passthrough"
send_proxy_protocol = false
domain_rewrite = "none"
max_players = 80
disconnect_message = "Survival is down for maintenance."
limbo_handlers = ["auth"]

[timeouts]
connect = "3s"
read = "30s"
write = "30s"

[ip_filter]
whitelist = ["192.168.1.0/24"]
blacklist = ["192.168.1.5/32"]

[motd.online]
text = "Survival - welcome"
version_name = "Survival 1.21"

[motd.sleeping]
text = "Survival - connect to wake it"

[motd.starting]
text = "Survival - starting"

[motd.offline]
text = "Survival - offline"

[motd.crashed]
text = "Survival - crashed"

[motd.stopping]
text = "Survival - stopping"

[motd.unreachable]
text = "Survival - unreachable"
"""


PTERODACTYL = 'server_manager = { type = "pterodactyl", api_url = "https://p", api_key = "k" }'


def load(tmp_path: Path, text: str) -> tuple[object, list[str]]:
    path = tmp_path / "survival.toml"
    path.write_text(text)
    return load_server_file_warned(path)


def test_the_documented_full_example_loads_with_infrarusts_meaning(tmp_path: Path) -> None:
    server, warnings = load(tmp_path, FULL)
    assert server.domains == ("survival.mc.example.org", "*.survival.example.org")  # type: ignore[attr-defined]
    assert [str(a) for a in server.addresses] == ["10.0.1.10:25565", "10.0.1.11:25565"]  # type: ignore[attr-defined]
    assert server.domain_rewrite is None  # type: ignore[attr-defined]
    assert server.unreachable_message == "Survival is down for maintenance."  # type: ignore[attr-defined]
    ip_filter = server.ip_filter  # type: ignore[attr-defined]
    assert ip_filter.allow == (ipaddress.ip_network("192.168.1.0/24"),)
    assert ip_filter.deny == (ipaddress.ip_network("192.168.1.5/32"),)  # blacklist wins
    motds = server.motds  # type: ignore[attr-defined]
    assert motds.online.text == "Survival - welcome" and motds.online.max_players == 80
    assert motds.sleeping.text.startswith("Survival - connect")
    assert motds.unreachable.text == "Survival - unreachable"
    joined = "\n".join(warnings)
    assert server.max_players == 80  # type: ignore[attr-defined]
    for key in ("network", "limbo_handlers", "timeouts", "motd.crashed"):
        assert key in joined, (key, warnings)
    assert all(w.startswith(str(tmp_path / "survival.toml")) for w in warnings)


@pytest.mark.parametrize("mode", ["passthrough", "zero_copy", "server_only"])
def test_forwarding_proxy_modes_forward_bytes(tmp_path: Path, mode: str) -> None:
    server, _ = load(
        tmp_path, f'domains = ["a.example.org"]\naddresses = ["a:1"]\nproxy_mode = "{mode}"\n'
    )
    assert server.proxy_mode.value == "passthrough"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('proxy_mode = "client_only"', "client_only: the proxy would have to take part"),
        ('proxy_mode = "offline"', "proxy_mode = offline"),
        ('forwarding_mode = "velocity"', "velocity: the proxy does not take part"),
        ('forwarding_mode = "bungee_guard"', "backend would reject every player"),
        ("bungeecord_channel = true", "bungeecord_channel = true"),
        (PTERODACTYL, "server_manager (type 'pterodactyl')"),
        ("max_players = -1", "max_players: expected a whole number"),
        ('ip_filter = { whitelist = ["10.0.0.0/8"], allow = ["10.0.0.0/8"] }', "mixed"),
        # a value of a type the translation did not expect: an error naming the key, not
        # a crash of the file provider (which would stop every file's routing)
        ('proxy_mode = ["x"]', "proxy_mode: Input should be 'passthrough'"),
        ('proxyMode = ["x"]', "proxy_mode: Input should be 'passthrough'"),
        ("filters = { name_filter = { whitelist = 3 } }",
         "filters.name_filter.whitelist: expected a list of player names, got 3"),
        ("filters = { name_filter = { blacklist = true } }",
         "filters.name_filter.blacklist: expected a list of player names, got True"),
    ],
)  # fmt: skip
def test_keys_that_would_change_who_gets_in_are_refused_with_the_reason(
    tmp_path: Path, line: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f'domains = ["a.example.org"]\naddresses = ["a:1"]\n{line}\n')
    assert message in str(caught.value) and str(tmp_path / "survival.toml") in str(caught.value)


@pytest.mark.parametrize(
    "line",
    [
        'forwarding_mode = "none"',
        "bungeecord_channel = false",
        "limbo_handlers = []",
        "max_players = 0",
    ],
)
def test_neutral_values_load_without_a_warning(tmp_path: Path, line: str) -> None:
    _, warnings = load(tmp_path, f'domains = ["a.example.org"]\naddresses = ["a:1"]\n{line}\n')
    assert warnings == []


def test_an_unknown_key_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="proxy_to"):
        load(tmp_path, 'domains = ["a.example.org"]\naddresses = ["a:1"]\nproxy_to = "x"\n')


def test_the_readme_table_is_the_loaders_own() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert migration_markdown() in readme, (
        "README's Infrarust table is stale: paste `uv run python -m providers.infrarust`"
    )


# -- Infrarust 1.x YAML server files (its configuration reference, English and French,
# and the forms its examples use: camelCase keys, backendDomain/rewriteDomain, motds with
# enabled, filters, caches), with values of our own.

V1_FULL = """\
domains:
  - "hub.example.org"
addresses:
  - "mc-hub.internal:25566"
sendProxyProtocol: true
proxy_protocol_version: 2
proxyMode: "passthrough"
backendDomain: "expected.downstream.example"
motds:
  online:
    enabled: true
    text: "Hub - welcome"
    version_name: "Paper 1.20.4"
    max_players: 100
    online_players: 3
    protocol_version: 765
    samples:
      - name: "Steve"
        id: "069a79f4-44e9-4726-a5be-fca90e38aaf5"
  offline:
    enabled: true
    text: "Hub is asleep - connect to wake it"
  starting:
    text: "Hub is starting"
  crashed:
    text: "Hub crashed"
  shutting_down:
    text: "Hub stops in ${seconds_remaining}s"
  unable_status:
    enabled: false
    text: "never shown"
filters:
  ip_filter:
    enabled: true
    whitelist: ["192.168.0.0/16"]
    blacklist: ["192.168.7.7"]
  name_filter:
    enabled: true
    whitelist: ["Steve", "Alex"]
    blacklist: ["griefer_1"]
  id_filter:
    enabled: false
    blacklist: ["069a79f4-44e9-4726-a5be-fca90e38aaf5"]
  rate_limiter:
    enabled: false
    requests_per_minute: 600
    burst_size: 10
  ban:
    enabled: false
caches:
  status_ttl_seconds: 30
  max_status_entries: 1000
"""


def load_yaml(tmp_path: Path, text: str) -> tuple[object, list[str]]:
    path = tmp_path / "hub.yml"
    path.write_text(text)
    return load_server_file_warned(path)


def test_a_v1_yaml_file_loads_with_infrarusts_meaning(tmp_path: Path) -> None:
    server, warnings = load_yaml(tmp_path, V1_FULL)
    assert server.id == "hub" and server.domains == ("hub.example.org",)  # type: ignore[attr-defined]
    assert server.send_proxy_protocol is True  # type: ignore[attr-defined]
    assert server.proxy_mode.value == "passthrough"  # type: ignore[attr-defined]
    assert server.domain_rewrite == "expected.downstream.example"  # type: ignore[attr-defined]
    assert server.status_cache_ttl == 30  # type: ignore[attr-defined]
    ip_filter = server.ip_filter  # type: ignore[attr-defined]
    assert ip_filter.allow == (ipaddress.ip_network("192.168.0.0/16"),)
    assert ip_filter.deny == (ipaddress.ip_network("192.168.7.7/32"),)
    players = server.players  # type: ignore[attr-defined]
    assert "steve" in players.allow and "Alex" in players.allow and "griefer_1" in players.deny
    assert players.refuses("Griefer_1") and players.refuses("Bob")
    motds = server.motds  # type: ignore[attr-defined]
    assert motds.online.text == "Hub - welcome" and motds.online.protocol_version == 765
    assert motds.sleeping.text == "Hub is asleep - connect to wake it"  # v1's offline
    assert motds.starting.text == "Hub is starting"
    joined = "\n".join(warnings)
    for key in ("motds.online.samples", "motds.crashed", "motds.shutting_down",
                "caches.max_status_entries"):  # fmt: skip
        assert key in joined, (key, warnings)
    assert "unable_status" not in joined  # switched off: nothing to warn about
    assert all(w.startswith(str(tmp_path / "hub.yml")) for w in warnings)


@pytest.mark.parametrize(
    ("lines", "rewrite"),
    [
        ("rewriteDomain: true", "mc-hub.internal"),  # the first address's host
        ("rewriteDomain: false", None),
        ('backendDomain: "x.example"', "x.example"),
    ],
)
def test_v1_rewrites_are_domain_rewrite(tmp_path: Path, lines: str, rewrite: str | None) -> None:
    text = f'domains: ["hub.example.org"]\naddresses: ["mc-hub.internal:25566"]\n{lines}\n'
    server, _ = load_yaml(tmp_path, text)
    assert server.domain_rewrite == rewrite  # type: ignore[attr-defined]


def test_v1s_single_motd_is_the_online_answer(tmp_path: Path) -> None:
    text = (
        'domains: ["hub.example.org"]\naddresses: ["a:1"]\n'
        'motd:\n  version: "1.20.1"\n  max_players: 100\n  online_players: 0\n'
        '  description: "Welcome to my server!"\n'
    )
    server, warnings = load_yaml(tmp_path, text)
    online = server.motds.online  # type: ignore[attr-defined]
    assert (online.text, online.version_name, online.max_players) == (
        "Welcome to my server!",
        "1.20.1",
        100,
    )
    assert warnings == []


@pytest.mark.parametrize("mode", ["passthrough", "zerocopy", "server_only"])
def test_v1_forwarding_modes_forward_bytes(tmp_path: Path, mode: str) -> None:
    server, _ = load_yaml(
        tmp_path, f'domains: [a.example.org]\naddresses: ["a:1"]\nproxyMode: {mode}\n'
    )
    assert server.proxy_mode.value == "passthrough"  # type: ignore[attr-defined]


def test_v1_proxy_protocol_version_1_is_warned(tmp_path: Path) -> None:
    text = (
        'domains: [a.example.org]\naddresses: ["a:1"]\n'
        "sendProxyProtocol: true\nproxy_protocol_version: 1\n"
    )
    _, warnings = load_yaml(tmp_path, text)
    assert "proxy_protocol_version = 1" in "\n".join(warnings)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("proxyMode: client_only", "proxy_mode = client_only: the proxy would have to"),
        ("proxyMode: full", "proxy_mode = full"),
        ("proxyMode: offline", "proxy_mode = offline"),
        ("server_manager: {provider_name: Local, server_id: local_server}", "type 'Local'"),
        ("filters: {rate_limiter: {requests_per_minute: 600, burst_size: 10}}",
         "filters.rate_limiter: per-server rate limits are not supported"),
        ("filters: {rate_limiter: {requestLimit: 10, windowLength: 1s}}", "[rate_limit]"),
        ("filters: {id_filter: {enabled: true, whitelist: ['069a79f4-44e9-4726-a5be-fca"
         "90e38aaf5']}}",
         "filters.id_filter: Infrarust matches the account's UUID"),
        ("filters: {name_filter: {whitelist: [player1], size: 3}}", "name_filter.size: unknown"),
        ("filters: {ban: {enabled: true, storage_type: file, file_path: bans.json}}",
         "one bans file"),
        ("proxy_protocol_version: 3", "expected 1 or 2"),
        ('backendDomain: "x.example"\nrewriteDomain: true', "keep one"),
        ("sendProxyProtocol: true\nsend_proxy_protocol: false", "given twice"),
        ("caches: {ttl: 3}", "caches.ttl: unknown"),
    ],
)  # fmt: skip
def test_v1_keys_that_would_change_who_gets_in_are_refused_with_the_reason(
    tmp_path: Path, lines: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml(tmp_path, f'domains: [a.example.org]\naddresses: ["a:1"]\n{lines}\n')
    assert message in str(caught.value) and str(tmp_path / "hub.yml") in str(caught.value)


def test_timeouts_connect_is_the_servers_connect_timeout(tmp_path: Path) -> None:
    server, warnings = load(
        tmp_path, 'domains = ["a.example.org"]\naddresses = ["a:1"]\n[timeouts]\nconnect = "3s"\n'
    )
    assert server.connect_timeout == 3.0 and warnings == []  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"timeouts\.idle: unknown"):
        load(
            tmp_path, 'domains = ["a.example.org"]\naddresses = ["a:1"]\n[timeouts]\nidle = "3s"\n'
        )
