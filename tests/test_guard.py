"""discoproxy/guard.py without sockets: filter precedence, GCRA budgets and their bounds,
the bans file (atomic writes, expiry, errors that name the entry)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from discoproxy import guard
from discoproxy.guard import (
    Ban,
    BanList,
    RateLimiter,
    client_ip,
    filter_refusal,
    load_bans,
    parse_duration,
    save_bans,
)
from discoproxy.model import IpFilterSettings
from discoproxy.proxy import server as proxy_server


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    found = client_ip(text)
    assert found is not None
    return found


def test_client_addresses_unwrap_ipv4_mapped_and_zone_ids() -> None:
    assert client_ip("::ffff:203.0.113.7") == ipaddress.ip_address("203.0.113.7")
    assert client_ip("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert client_ip("not an address") is None


@pytest.mark.parametrize(
    ("allow", "deny", "client", "expected"),
    [
        ([], [], "198.51.100.7", None),
        ([], ["198.51.100.0/24"], "198.51.100.7", "denied by ip_filter"),
        (["10.0.0.0/8"], [], "198.51.100.7", "not in ip_filter allow"),
        (["10.0.0.0/8"], [], "10.1.2.3", None),
        (["10.0.0.0/8"], ["10.1.0.0/16"], "10.1.2.3", "denied by ip_filter"),  # deny wins
        (["2001:db8::/32"], [], "2001:db8::5", None),
        (["2001:db8::/32"], [], "10.1.2.3", "not in ip_filter allow"),  # other family
        ([], ["198.51.100.7"], "::ffff:198.51.100.7", "denied by ip_filter"),  # mapped
    ],
)
def test_filter_precedence(
    allow: list[str], deny: list[str], client: str, expected: str | None
) -> None:
    settings = IpFilterSettings(allow=allow, deny=deny)  # type: ignore[arg-type]
    assert filter_refusal(settings, ip(client)) == expected


def test_a_bad_cidr_names_the_value_and_the_accepted_form() -> None:
    with pytest.raises(ValueError, match=r"invalid address or CIDR '10\.0\.0\.0/33'"):
        IpFilterSettings(deny=["10.0.0.0/33"])  # type: ignore[arg-type]


def test_gcra_gives_the_burst_then_one_per_interval() -> None:
    limiter = RateLimiter(count=5, window=10.0)
    assert [limiter.allow("a", now=0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", now=0.0)  # another address has its own budget
    assert not limiter.allow("a", now=1.9)
    assert limiter.allow("a", now=2.0)  # one every window/count
    assert not limiter.allow("a", now=2.0)
    assert [limiter.allow("a", now=100.0) for _ in range(6)] == [True] * 5 + [False]


def test_an_off_budget_allows_everything() -> None:
    limiter = RateLimiter(count=0, window=10.0)
    assert not limiter
    assert all(limiter.allow("a", now=0.0) for _ in range(1000))
    assert len(limiter) == 0


def test_rate_state_is_bounded_under_a_flood_of_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(guard, "MAX_TRACKED_IPS", 1000)
    limiter = RateLimiter(count=1, window=60.0)
    for i in range(20_000):
        limiter.allow(f"2001:db8::{i:x}", now=0.0)
    assert len(limiter) == 1000


@given(
    st.integers(min_value=1, max_value=50),
    st.floats(min_value=0.1, max_value=100),
    st.lists(st.floats(min_value=0, max_value=1000), max_size=300),
)
def test_gcra_never_allows_more_than_burst_plus_elapsed_rate(
    count: int, window: float, times: list[float]
) -> None:
    limiter = RateLimiter(count, window)
    allowed = [t for t in sorted(times) if limiter.allow("x", now=t)]
    if allowed:
        span = allowed[-1] - allowed[0]
        assert len(allowed) <= count + span * count / window + 1e-6


def test_bans_round_trip_through_the_file_and_expire(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    now = time.time()
    bans = BanList(
        [
            Ban("griefing", now, None, network=ipaddress.ip_network("203.0.113.0/24")),
            Ban("spam", now, now + 3600, username="Spammer"),
            Ban("old", now - 10, now - 1, username="Gone"),
        ]
    )
    save_bans(path, bans)
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert [e.get("username") or e.get("ip") for e in document["bans"]] == [
        "203.0.113.0/24",
        "Spammer",
    ]  # the expired one is dropped on write
    loaded = load_bans(path)
    assert loaded.ip_ban(ip("203.0.113.9")) is not None
    assert loaded.ip_ban(ip("198.51.100.1")) is None
    assert loaded.user_ban("spammer") is not None  # case-insensitive
    assert loaded.user_ban("spammer", now=now + 7200) is None  # expired
    assert not list(tmp_path.glob(".bans.json.*"))  # no temp file left


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "invalid JSON"),
        ('{"bans": {}}', "expected"),
        ('{"bans": [{"ip": "1.2.3.4", "username": "x"}]}', r"bans\[0\]: expected exactly one"),
        ('{"bans": [{"ip": "300.1.1.1"}]}', r"bans\[0\]\.ip: invalid address or CIDR"),
        ('{"bans": [{"username": "no spaces"}]}', r"bans\[0\]\.username: invalid Minecraft"),
        ('{"bans": [{"ip": "1.2.3.4", "expires": "soon"}]}', r"bans\[0\]\.expires: invalid time"),
        ('{"bans": [{"ip": "1.2.3.4", "note": "x"}]}', r"bans\[0\]: unknown key 'note'"),
    ],
)
def test_a_bad_bans_file_names_the_file_and_entry(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bans.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_bans(path)


def test_a_missing_bans_file_is_no_bans(tmp_path: Path) -> None:
    assert len(load_bans(tmp_path / "nope.json")) == 0


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30s", 30), ("10m", 600), ("2h", 7200), ("7d", 604800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_bad_duration_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"expected e\.g\. 90, 30m, 12h or 7d"):
        parse_duration("soon")


def test_ban_commands_on_one_shared_file_at_once_lose_no_ban(tmp_path: Path) -> None:
    """Instances sharing the bans file run ``discoproxy ban add`` at the same moment:
    each read-modify-write holds the file's lock, so every ban lands."""
    config = tmp_path / "discoproxy.toml"
    bans = tmp_path / "bans.json"
    config.write_text(f'bans_file = "{bans}"\n')
    names = [f"griefer{i}" for i in range(8)]
    commands = [
        subprocess.Popen(
            [sys.executable, "-m", "discoproxy", "ban", "add", name, "--config", str(config)],
            stdout=subprocess.DEVNULL,
        )
        for name in names
    ]
    assert [command.wait(60) for command in commands] == [0] * len(names)
    assert sorted(b.username or "" for b in guard.load_bans(bans).bans) == sorted(names)


@pytest.mark.anyio
async def test_the_bans_file_is_polled_as_well_as_watched(tmp_path: Path) -> None:
    """A write on a network filesystem from another host raises no inotify event here:
    the stat poll alone picks it up (inode, mtime or size changed)."""
    path = tmp_path / "bans.json"
    guard.save_bans(path, guard.BanList())
    loads: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(proxy_server._poll_bans, path, loads.append)
        await anyio.sleep(proxy_server.BANS_POLL_S * 2)
        assert loads == []  # nothing changed: nothing re-read
        ban = guard.Ban("grief", time.time(), None, username="Griefer")
        guard.save_bans(path, guard.BanList([ban]))
        with anyio.fail_after(proxy_server.BANS_POLL_S * 4):
            while not loads:
                await anyio.sleep(0.02)
        assert loads == [False]
        tg.cancel_scope.cancel()
