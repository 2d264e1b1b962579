from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from discoproxy.model import BackendAddress, ProxyMode, ServerDefinition, normalize_domain


def make(**fields: object) -> ServerDefinition:
    data: dict[str, object] = {"id": "mc", "domains": ["mc.example.com"], "addresses": ["10.0.0.5"]}
    data.update(fields)
    return ServerDefinition.model_validate(data)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Survival.Example.COM", "survival.example.com"),
        ("mc.example.com.", "mc.example.com"),
        ("  *.Lobby.example.com ", "*.lobby.example.com"),
        ("localhost", "localhost"),
    ],
)
def test_domains_are_normalised(raw: str, expected: str) -> None:
    assert normalize_domain(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "a b.com", "*.", "mc.*.com", "**.x.com", "-a.com", "a..b", "x" * 254]
)
def test_invalid_domains_are_rejected_with_the_accepted_form(raw: str) -> None:
    with pytest.raises(ValueError, match="domain"):
        normalize_domain(raw)


@pytest.mark.parametrize(
    ("raw", "host", "port"),
    [
        ("10.0.0.5", "10.0.0.5", 25565),
        ("10.0.0.5:25566", "10.0.0.5", 25566),
        ("MC-Backend:1", "mc-backend", 1),
        ("[::1]:25570", "::1", 25570),
        ("[2001:db8::1]", "2001:db8::1", 25565),
        ("2001:db8::1", "2001:db8::1", 25565),
    ],
)
def test_backend_address_parsing(raw: str, host: str, port: int) -> None:
    address = BackendAddress.parse(raw)
    assert (address.host, address.port) == (host, port)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("host:0", "expected 1-65535, got '0'"),
        ("host:65536", "expected 1-65535"),
        ("host:25565a", "expected 1-65535, got '25565a'"),
        ("[::1", "missing ']'"),
        ("[10.0.0.1]:5", "brackets are for IPv6"),
        (
            "[zz]:1",
            "invalid IPv6 address in '[zz]:1'; expected e.g. '[2001:db8::1]:25565', "
            "or '[2001:db8::1]' and '2001:db8::1' for port 25565",
        ),
        ("bad host:5", "expected an IP address or a hostname"),
        ("", "empty address"),
    ],
)
def test_bad_backend_addresses_say_what_is_accepted(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BackendAddress.parse(raw)


def test_infrarust_camel_case_fields_are_accepted() -> None:
    server = ServerDefinition.model_validate(
        {
            "id": "a",
            "domains": ["a.example.com"],
            "addresses": ["h"],
            "sendProxyProtocol": True,
            "proxyMode": "passthrough",
        }
    )
    assert server.send_proxy_protocol is True


def test_every_server_field_has_a_camel_case_spelling_too() -> None:
    server = make(maxPlayers=7, autoStopAfter=60, tcpshieldRealIp=True)
    assert (server.max_players, server.auto_stop_after, server.tcpshield_real_ip) == (7, 60, True)


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(600, 600), (2.5, 2.5), ("600", 600), ("90s", 90), ("10m", 600), ("1h", 3600), ("10M", 600)],
)
def test_auto_stop_after_takes_the_forms_the_docker_label_takes(
    raw: object, seconds: float
) -> None:
    assert make(auto_stop_after=raw).auto_stop_after == seconds


def test_a_bad_auto_stop_after_says_what_is_accepted() -> None:
    with pytest.raises(ValidationError, match="auto_stop_after") as info:
        make(auto_stop_after="soon")
    assert info.value.errors()[0]["msg"] == (
        "Value error, expected seconds (600) or a duration such as 30s, 10m or 1h, got 'soon'"
    )
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        make(auto_stop_after="-1m")


def test_every_server_field_is_in_the_readme_server_file_table() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("### Server files", 1)[1].split("\n\n", 2)[1]
    documented = {
        key for row in table.splitlines()[2:] for key in re.findall(r"`(\w+)`", row.split(" | ")[0])
    }
    assert set(ServerDefinition.model_fields) - documented == set()


def test_addresses_keep_their_order_for_failover() -> None:
    server = make(addresses=["b:2", "a:1"])
    assert [str(a) for a in server.addresses] == ["b:2", "a:1"]


def test_duplicate_domains_are_collapsed() -> None:
    assert make(domains=["A.com", "a.com."]).domains == ("a.com",)


@pytest.mark.parametrize("mode", ["offline", "client_only", "ClientOnly", "Intercepted", "full"])
def test_infrarust_proxy_modes_that_take_part_in_the_login_are_refused_saying_why(
    mode: str,
) -> None:
    with pytest.raises(ValidationError, match=f"proxy_mode '{mode}': the proxy would have to"):
        make(proxy_mode=mode)


@pytest.mark.parametrize("mode", ["passthrough", "zero_copy", "ZeroCopy", "server_only"])
def test_infrarust_proxy_modes_that_forward_the_bytes_load_as_passthrough(mode: str) -> None:
    assert make(proxy_mode=mode).proxy_mode is ProxyMode.PASSTHROUGH


def test_proxy_mode_is_case_insensitive() -> None:
    assert make(proxy_mode="Passthrough").proxy_mode == "passthrough"


def test_a_server_needs_a_domain_or_default() -> None:
    with pytest.raises(ValidationError, match="at least one entry in 'domains'"):
        make(domains=[])
    assert make(domains=[], default=True).default


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="domainz"):
        make(domainz=["x"])


def test_addresses_are_required() -> None:
    with pytest.raises(ValidationError, match="at least one address"):
        make(addresses=[])


def test_a_sleeping_server_needs_no_address() -> None:
    server = make(addresses=[], sleeping=True, auto_start=True)
    assert server.sleeping and server.addresses == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("backend", "backend"), ("MC.Internal.", "mc.internal"), ("none", None), ("", None)],
)
def test_domain_rewrite_is_backend_or_a_host_name(raw: str, expected: str | None) -> None:
    assert make(domain_rewrite=raw).domain_rewrite == expected


def test_a_bad_domain_rewrite_says_what_is_accepted() -> None:
    with pytest.raises(ValidationError, match=r"expected 'backend'.*'from_backend'.*a host name"):
        make(domain_rewrite="a b")


def test_motds_per_state_reject_unknown_states_and_fields() -> None:
    assert make(motds={"sleeping": {"text": "Zzz"}}).motds.sleeping is not None
    with pytest.raises(ValidationError, match=r"motds\.asleep"):
        make(motds={"asleep": {"text": "Zzz"}})
    with pytest.raises(ValidationError, match=r"motds\.online\.motd"):
        make(motds={"online": {"motd": "x"}})


def test_a_server_files_durations_take_the_forms_the_labels_take() -> None:
    server = ServerDefinition.model_validate(
        {
            "id": "x",
            "domains": ["x.example.com"],
            "addresses": ["10.0.0.1"],
            "sticky_ttl": "10m",
            "status_cache_ttl": "30s",
            "health_check": {"type": "tcp", "interval": "2s", "timeout": "500ms"},
        }
    )
    assert (server.sticky_ttl, server.status_cache_ttl) == (600, 30)
    assert server.health_check is not None
    assert (server.health_check.interval, server.health_check.timeout) == (2, 0.5)
    with pytest.raises(ValidationError, match="expected seconds"):
        ServerDefinition.model_validate(
            {"id": "x", "domains": ["x.example.com"], "addresses": ["a"], "sticky_ttl": "soon"}
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sticky_ttl", float("inf"), "Input should be a finite number"),
        ("auto_stop_after", float("nan"), "Input should be a finite number"),
        ("max_players", 2**31, "Input should be less than or equal to 2147483647"),
    ],
)
def test_a_server_file_value_out_of_any_sane_range_is_refused(
    field: str, value: float, message: str
) -> None:
    # a TOML server file can write inf and nan; a status answer's "max" is a Java int
    base = {"id": "mc", "domains": ["mc.example.com"], "addresses": ["10.0.0.5:25565"]}
    with pytest.raises(ValidationError, match=message):
        ServerDefinition.model_validate({**base, field: value})
