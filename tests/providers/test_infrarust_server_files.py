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
    for key in ("network", "limbo_handlers", "timeouts", "max_players", "motd.crashed"):
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
