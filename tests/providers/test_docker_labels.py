"""Docker labels → servers, without an engine: ``/containers/json`` records in, servers and
problems out. The records have the shape the engine's API 1.41 returns."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from discoproxy.model import ServerDefinition
from providers.docker import (
    LABELS,
    DockerSettings,
    LabelProblem,
    LabelSpec,
    SwarmSettings,
    inspection_target,
    is_relevant_event,
    labels_markdown,
    merge_inspected,
    own_id_from_cgroup,
    own_id_from_mountinfo,
    record_from_inspect,
    same_state,
    servers_from_containers,
)

OWN_ID = "f" * 64


def container(
    name: str = "mc-1",
    labels: dict[str, str] | None = None,
    networks: dict[str, str] | None = None,
    mode: str = "default",
    state: str = "running",
    ports: list[dict[str, Any]] | None = None,
    cid: str | None = None,
) -> dict[str, Any]:
    """A ``/containers/json`` record; ``networks`` maps name → IPv4 ('' = no address)."""
    if networks is None:
        networks = {"bridge": "172.17.0.2"}
    return {
        "Id": cid or (name.encode().hex() + "0" * 64)[:64],
        "Names": [f"/{name}"],
        "State": state,
        "Labels": labels or {},
        "HostConfig": {"NetworkMode": mode},
        "Ports": ports or [],
        "NetworkSettings": {
            "Networks": {
                net: {"IPAddress": ip, "GlobalIPv6Address": ""} for net, ip in networks.items()
            }
        },
    }


def scan(
    *records: dict[str, Any], own: str | None = None, **settings: Any
) -> tuple[list[ServerDefinition], list[str]]:
    result = servers_from_containers(list(records), DockerSettings(**settings), own)
    return list(result.servers), [str(p) for p in result.problems]


def one(record: dict[str, Any], **settings: Any) -> ServerDefinition:
    servers, problems = scan(record, **settings)
    assert problems == []
    assert len(servers) == 1
    return servers[0]


def problem_of(record: dict[str, Any], **settings: Any) -> str:
    servers, problems = scan(record, **settings)
    assert servers == []
    assert len(problems) == 1, problems
    return problems[0]


# -- selection ----------------------------------------------------------------------------


def test_domains_label_alone_routes_the_container_by_name_on_its_only_network() -> None:
    server = one(container("mc-1", {"infrarust.domains": "mc.example.com"}))
    assert server.id == "mc-1"
    assert server.domains == ("mc.example.com",)
    assert [str(a) for a in server.addresses] == ["172.17.0.2:25565"]
    assert not server.send_proxy_protocol and not server.default and server.name is None


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", " true "])
def test_enable_true_in_any_spelling(value: str) -> None:
    labels = {"infrarust.enable": value, "infrarust.domains": "mc.example.com"}
    assert one(container(labels=labels)).domains == ("mc.example.com",)


@pytest.mark.parametrize("value", ["false", "FALSE", "0"])
def test_enable_false_excludes_the_container_whatever_else_it_says(value: str) -> None:
    labels = {
        "infrarust.enable": value,
        "infrarust.domains": "mc.example.com",
        "infrarust.port": "x",
    }
    assert scan(container(labels=labels)) == ([], [])


def test_containers_without_our_labels_are_ignored_silently() -> None:
    assert scan(container(labels={"traefik.enable": "true", "com.example": "x"})) == ([], [])


def test_our_labels_without_domains_or_enable_are_reported_but_not_routed() -> None:
    servers, problems = scan(container(labels={"infrarust.default": "true"}))
    assert servers == []
    assert problems == [
        "container mc-1 has infrarust.* labels but none of infrarust.domains, infrarust.ports "
        "or infrarust.enable=true: not routed"
    ]


def test_enable_and_default_without_domains_is_a_catch_all() -> None:
    server = one(container(labels={"infrarust.enable": "true", "infrarust.default": "1"}))
    assert server.default and server.domains == ()


@pytest.mark.parametrize("state", ["paused", "restarting", "exited", "created"])
def test_only_running_containers_are_routed(state: str) -> None:
    assert scan(container(labels={"infrarust.domains": "a.example.com"}, state=state)) == ([], [])


def test_the_label_prefix_is_configurable() -> None:
    record = container(labels={"mc.domains": "a.example.com", "infrarust.domains": "b.example.com"})
    assert one(record, label_prefix="mc").domains == ("a.example.com",)


def test_server_id_is_the_container_name_not_a_legacy_link_alias() -> None:
    record = container("db", {"infrarust.domains": "a.example.com"})
    record["Names"] = ["/web/db", "/db"]
    assert one(record).id == "db"


# -- label values -------------------------------------------------------------------------

LABEL_VALUES = [
    pytest.param("domains", " MC.Example.com. , *.Lobby.example.com,,", "domains",
                 ("mc.example.com", "*.lobby.example.com"), id="domains-normalised"),
    pytest.param("send_proxy_protocol", "TRUE", "send_proxy_protocol", True, id="spp-TRUE"),
    pytest.param("send_proxy_protocol", "1", "send_proxy_protocol", True, id="spp-1"),
    pytest.param("send_proxy_protocol", "0", "send_proxy_protocol", False, id="spp-0"),
    pytest.param("send_proxy_protocol", "False", "send_proxy_protocol", False, id="spp-False"),
    pytest.param("default", "true", "default", True, id="default"),
    pytest.param("name", " Survival ", "name", "Survival", id="name"),
    pytest.param("name", "", "name", None, id="blank-name"),
    pytest.param("proxy_mode", "Passthrough", "proxy_mode", "passthrough", id="proxy_mode"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "value", "field", "expected"), LABEL_VALUES)
def test_label_maps_to_its_server_field(label: str, value: str, field: str, expected: Any) -> None:
    labels = {"infrarust.domains": "mc.example.com", f"infrarust.{label}": value}
    assert getattr(one(container(labels=labels)), field) == expected


@pytest.mark.parametrize(("value", "port"), [("25566", 25566), (" 1 ", 1), ("65535", 65535)])
def test_port_label_sets_the_backend_port(value: str, port: int) -> None:
    labels = {"infrarust.domains": "mc.example.com", "infrarust.port": value}
    assert one(container(labels=labels)).addresses[0].port == port


BAD_LABELS = [
    pytest.param("port", "25565a", "expected 1-65535, got '25565a'", id="port-letters"),
    pytest.param("port", "0", "expected 1-65535, got '0'", id="port-zero"),
    pytest.param("port", "65536", "expected 1-65535, got '65536'", id="port-too-big"),
    pytest.param("port", "", "expected 1-65535, got ''", id="port-empty"),
    pytest.param("port", "٣", "expected 1-65535, got '٣'", id="port-non-ascii-digit"),
    pytest.param("send_proxy_protocol", "yes",
                 "expected true, 1, false or 0, got 'yes'", id="bool-yes"),
    pytest.param("default", "on", "expected true, 1, false or 0, got 'on'", id="bool-on"),
    pytest.param("enable", "maybe", "expected true, 1, false or 0, got 'maybe'", id="enable"),
    pytest.param("domains", "mc.example.com,bad domain",
                 "invalid domain 'bad domain'; expected a hostname such as 'mc.example.com' or a "
                 "wildcard such as '*.example.com' (the '*' only as the whole first label)",
                 id="domain-shape"),
    pytest.param("domains", "a.*.example.com", "invalid domain 'a.*.example.com'", id="wildcard"),
    pytest.param("domains", " , ",
                 "a server needs at least one entry in 'domains', 'default = true' to be the "
                 "catch-all, or 'ports' to forward", id="domains-empty"),
    pytest.param("proxy_mode", "client_only",
                 "proxy_mode 'client_only': the proxy would have to take part in the login",
                 id="proxy-mode-unsupported"),
    pytest.param("proxy_mode", "fast", "unknown proxy_mode 'fast'; accepted: 'passthrough', "
                 "or Infrarust's 'zero_copy' and 'server_only'", id="proxy-mode-unknown"),
    pytest.param(
        "docker_network", " ", "expected a Docker network name, got ''", id="network-empty"
    ),
    pytest.param("max_players", "2147483648",
                 "Input should be less than or equal to 2147483647", id="players-past-java-int"),
    pytest.param("motds.online.online_players", "9" * 18,
                 "Input should be less than or equal to 2147483647", id="motd-players-huge"),
    pytest.param("weight", "9" * 5000, "expected a whole number >= 0, got '9999",
                 id="int-of-5000-digits"),  # not Python's "Exceeds the limit (4300 digits)"
    pytest.param("sticky_ttl", "9" * 400, "Input should be a finite number", id="duration-inf"),
    pytest.param("tls.cert", "  ", "expected a file path, got ''", id="tls-path-blank"),
    pytest.param("name", "n" * 201, "String should have at most 200 characters", id="name-long"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "value", "message"), BAD_LABELS)
def test_a_bad_label_drops_the_container_naming_label_and_value(
    label: str, value: str, message: str
) -> None:
    labels = {"infrarust.domains": "mc.example.com", f"infrarust.{label}": value}
    problem = problem_of(container("mc-1", labels))
    assert problem.startswith(f"container mc-1, label infrarust.{label}: {message}")


def test_a_huge_bad_label_is_reported_with_its_start_and_the_reason_not_whole() -> None:
    labels = {"infrarust.domains": "mc.example.com", "infrarust.group": "bad " + "x" * 5000}
    problem = problem_of(container("mc-1", labels))
    assert len(problem) < 600
    assert problem.startswith("container mc-1, label infrarust.group: invalid group 'bad xxx")
    assert "characters left out" in problem
    assert problem.endswith("(at most 200, starting with a letter or digit), e.g. 'survival'")


def test_tls_paths_are_trimmed() -> None:
    labels = {
        "infrarust.domains": "mc.example.com",
        "infrarust.tls.cert": " /certs/mc.pem ",
        "infrarust.tls.key": "/certs/mc.key\n",
    }
    tls = one(container("mc-1", labels)).tls
    assert tls is not None
    assert (str(tls.cert), str(tls.key)) == ("/certs/mc.pem", "/certs/mc.key")


def test_a_bad_label_drops_only_that_container() -> None:
    good = container("good", {"infrarust.domains": "good.example.com"}, {"bridge": "172.17.0.3"})
    bad = container("bad", {"infrarust.domains": "bad.example.com", "infrarust.port": "25565a"})
    servers, problems = scan(bad, good)
    assert [s.id for s in servers] == ["good"]
    assert problems == ["container bad, label infrarust.port: expected 1-65535, got '25565a'"]


def test_every_bad_label_of_a_container_is_reported() -> None:
    labels = {"infrarust.domains": "a b", "infrarust.port": "x", "infrarust.default": "yes"}
    _, problems = scan(container("mc-1", labels))
    assert [p.split(":")[0] for p in problems] == [
        "container mc-1, label infrarust.default",
        "container mc-1, label infrarust.port",
    ]  # domains are validated once the labels parse; a fix shows the next problem


def test_an_unknown_label_is_refused_with_the_closest_known_label() -> None:
    labels = {"infrarust.domains": "mc.example.com", "infrarust.send_proxy_protcol": "true"}
    fine = container("mc-2", {"infrarust.domains": "two.example.com"})
    result = servers_from_containers([container("mc-1", labels), fine], DockerSettings())
    assert [s.id for s in result.servers] == ["mc-2"]  # mc-1 is not routed, mc-2 is
    assert result.problems == (
        LabelProblem(
            "mc-1",
            "infrarust.send_proxy_protcol",
            "unknown label (did you mean infrarust.send_proxy_protocol?); known: "
            "enable, domains, port, docker_network, proxy_mode, send_proxy_protocol, name, "
            "default, ports, ip_filter.allow, ip_filter.deny, players.allow, players.deny, "
            "wake.allow, max_players, tls.cert, tls.key, tls.backend_tls, "
            "tls.backend_verify, tls.backend_ca, status_cache_ttl, domain_rewrite, "
            "tcpshield_real_ip, "
            "auto_start, auto_stop_after, use_healthcheck, group, balance, weight, "
            "health_check.type, health_check.interval, health_check.timeout, health_check.rise, "
            "health_check.fall, health_check.http_path, health_check.http_status, sticky_ttl, "
            "motds.{online,unreachable,starting,sleeping}"
            ".{text,version_name,max_players,online_players,favicon}",
        ),
    )


# -- backend address ----------------------------------------------------------------------

DOMAINS = {"infrarust.domains": "mc.example.com"}
TWO_NETWORKS = {"front": "10.1.0.2", "back": "10.2.0.2"}


def address_of(record: dict[str, Any], own: str | None = None, **settings: Any) -> str:
    servers, problems = scan(record, own=own, **settings)
    assert problems == [] and len(servers) == 1, problems
    return str(servers[0].addresses[0])


def test_several_networks_without_a_choice_are_reported_not_guessed() -> None:
    assert problem_of(container("mc-1", DOMAINS, TWO_NETWORKS)) == (
        "container mc-1 is on networks back, front: set label infrarust.docker_network to choose"
    )


def test_the_network_label_chooses_among_several() -> None:
    labels = {**DOMAINS, "infrarust.docker_network": "front"}
    assert address_of(container(labels=labels, networks=TWO_NETWORKS)) == "10.1.0.2:25565"


def test_a_network_label_naming_another_network_is_reported() -> None:
    labels = {**DOMAINS, "infrarust.docker_network": "games"}
    assert problem_of(container("mc-1", labels, TWO_NETWORKS)) == (
        "container mc-1, label infrarust.docker_network: the container is not on network 'games'; "
        "it is on back, front"
    )


def test_the_network_setting_applies_to_containers_on_it() -> None:
    assert address_of(container(labels=DOMAINS, networks=TWO_NETWORKS), network="back") == (
        "10.2.0.2:25565"
    )
    # not on it: the container's only network is used
    assert address_of(container(labels=DOMAINS), network="back") == "172.17.0.2:25565"


def test_the_network_label_beats_the_setting() -> None:
    labels = {**DOMAINS, "infrarust.docker_network": "front"}
    record = container(labels=labels, networks=TWO_NETWORKS)
    assert address_of(record, network="back") == "10.1.0.2:25565"


def own_container(networks: dict[str, str], mode: str = "default") -> dict[str, Any]:
    return container("discoproxy", {}, networks, mode=mode, cid=OWN_ID)


def test_in_a_container_the_one_shared_network_is_chosen() -> None:
    own = own_container({"back": "10.2.0.9"})
    servers, problems = scan(
        own, container("mc-1", DOMAINS, TWO_NETWORKS), own=OWN_ID[:12]
    )  # a short id (the hostname) is enough
    assert problems == []
    assert [str(s.addresses[0]) for s in servers] == ["10.2.0.2:25565"]


def test_in_a_container_no_shared_network_is_reported() -> None:
    own = own_container({"proxy": "10.9.0.9"})
    _, problems = scan(own, container("mc-1", DOMAINS), own=OWN_ID)
    assert problems == [
        "container mc-1 shares no network with discoproxy's container discoproxy (the "
        "container is on bridge, discoproxy on proxy): connect them to a common network, "
        "or set label infrarust.docker_network"
    ]


def test_in_a_container_several_shared_networks_are_reported() -> None:
    own = own_container({"front": "10.1.0.9", "back": "10.2.0.9"})
    _, problems = scan(own, container("mc-1", DOMAINS, TWO_NETWORKS), own=OWN_ID)
    assert problems == [
        "container mc-1 is on networks back, front, all shared with discoproxy's container "
        "discoproxy: set label infrarust.docker_network to choose"
    ]


def test_discoproxy_on_the_host_network_uses_the_plain_rules() -> None:
    own = own_container({"host": ""}, mode="host")
    servers, _ = scan(own, container("mc-1", DOMAINS), own=OWN_ID)
    assert [str(s.addresses[0]) for s in servers] == ["172.17.0.2:25565"]


def test_host_network_containers_are_reached_at_host_address() -> None:
    labels = {**DOMAINS, "infrarust.port": "25570"}
    record = container(labels=labels, networks={"host": ""}, mode="host")
    assert address_of(record) == "127.0.0.1:25570"
    assert address_of(record, host_address="192.168.1.10") == "192.168.1.10:25570"


@pytest.mark.parametrize(
    ("networks", "mode", "reason"),
    [
        ({"none": ""}, "none", "has network_mode none: nothing to connect to"),
        ({}, "default", "is attached to no network: nothing to connect to"),
        ({"bridge": ""}, "default", "has no IP address on network 'bridge'"),
    ],
)
def test_a_container_without_an_address_is_reported(
    networks: dict[str, str], mode: str, reason: str
) -> None:
    assert problem_of(container("mc-1", DOMAINS, networks, mode=mode)) == f"container mc-1 {reason}"


def test_an_ipv6_only_network_gives_the_global_v6_address() -> None:
    record = container(labels=DOMAINS, networks={"v6": ""})
    record["NetworkSettings"]["Networks"]["v6"]["GlobalIPv6Address"] = "fd00::2"
    assert address_of(record) == "[fd00::2]:25565"


def test_network_mode_container_uses_the_other_containers_network() -> None:
    vpn = container("vpn", {}, {"bridge": "172.17.0.7"}, cid="a" * 64)
    mc = container("mc-1", DOMAINS, {}, mode="container:" + "a" * 64)
    servers, problems = scan(vpn, mc)
    assert problems == [] and str(servers[0].addresses[0]) == "172.17.0.7:25565"
    gone = container("mc-1", DOMAINS, {}, mode="container:vpn")
    assert (
        problem_of(gone) == "container mc-1 uses the network of container vpn, which is not running"
    )


def published(private: int, public: int, ip: str = "0.0.0.0") -> dict[str, Any]:
    return {"IP": ip, "PrivatePort": private, "PublicPort": public, "Type": "tcp"}


def test_published_ports_use_the_host_port_at_host_address() -> None:
    ports = [published(25565, 32769, "::"), published(25565, 32768), published(25575, 1)]
    record = container(labels=DOMAINS, ports=ports)
    assert address_of(record, use_published_ports=True) == "127.0.0.1:32768"
    assert address_of(record, use_published_ports=True, host_address="10.0.0.1") == "10.0.0.1:32768"


def test_a_port_published_on_one_ip_is_reached_there() -> None:
    record = container(labels=DOMAINS, ports=[published(25565, 40000, "192.168.1.5")])
    assert address_of(record, use_published_ports=True) == "192.168.1.5:40000"


def test_an_unpublished_port_is_reported_when_published_ports_are_used() -> None:
    record = container("mc-1", DOMAINS, ports=[published(8080, 8080)])
    assert problem_of(record, use_published_ports=True) == (
        "container mc-1, label infrarust.port: container port 25565/tcp is not published "
        "(use_published_ports is on): publish it (docker run -p …:25565) or turn "
        "use_published_ports off"
    )


# -- whole listings -----------------------------------------------------------------------


def test_servers_are_sorted_by_id_and_problems_deduplicated() -> None:
    records = [
        container("zeta", {"infrarust.domains": "z.example.com"}),
        container("alpha", {"infrarust.domains": "a.example.com"}),
    ]
    servers, _ = scan(*records)
    assert [s.id for s in servers] == ["alpha", "zeta"]
    assert scan(*records) == scan(*reversed(records))


def test_two_containers_may_claim_one_domain_the_registry_decides() -> None:
    records = [
        container("b", {"infrarust.domains": "mc.example.com"}),
        container("a", {"infrarust.domains": "mc.example.com"}),
    ]
    servers, problems = scan(*records)
    assert [s.id for s in servers] == ["a", "b"] and problems == []


def test_malformed_records_do_not_raise() -> None:
    records: list[dict[str, Any]] = [
        {},
        {"Labels": None, "Names": None},
        {"Labels": {"infrarust.domains": "a.example.com"}, "NetworkSettings": None},
    ]
    servers, problems = scan(*records)
    assert servers == []
    assert problems == ["container (unnamed) is attached to no network: nothing to connect to"]


# -- events and discoproxy's own container ------------------------------------------------


def test_container_events_count_only_for_labelled_containers() -> None:
    labelled = {
        "Type": "container",
        "Action": "start",
        "Actor": {"ID": "x", "Attributes": {"name": "mc", "infrarust.domains": "a"}},
    }
    other = {
        "Type": "container",
        "Action": "start",
        "Actor": {"ID": "y", "Attributes": {"name": "db", "image": "postgres"}},
    }
    network = {
        "Type": "network",
        "Action": "connect",
        "Actor": {"ID": "n", "Attributes": {"container": "y", "name": "front"}},
    }
    assert is_relevant_event(labelled, "infrarust")
    assert not is_relevant_event(labelled, "mc")
    assert not is_relevant_event(other, "infrarust")
    assert is_relevant_event(network, "infrarust")  # fmt: skip


def test_container_events_are_followed_by_an_inspection_of_their_container() -> None:
    start = {"Type": "container", "Action": "start", "Actor": {"ID": "c1", "Attributes": {}}}
    connect = {
        "Type": "network",
        "Action": "connect",
        "Actor": {"ID": "n1", "Attributes": {"container": "c2", "name": "front"}},
    }
    assert inspection_target(start) == "c1"
    assert inspection_target(connect) is None
    assert inspection_target({"Type": "container", "Actor": {}}) is None


INSPECTED = {
    "Id": "c1",
    "Name": "/mc-1",
    "State": {"Status": "paused", "Running": True, "Paused": True},
    "Config": {"Labels": {"infrarust.domains": "mc.example.com"}},
    "HostConfig": {"NetworkMode": "default"},
    "NetworkSettings": {
        "Ports": {"25565/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}], "9/udp": None},
        "Networks": {"bridge": {"IPAddress": "172.17.0.2", "GlobalIPv6Address": ""}},
    },
}


def test_an_inspection_converts_to_a_listing_record() -> None:
    record = record_from_inspect(INSPECTED)
    assert record["State"] == "paused" and record["Names"] == ["/mc-1"]
    assert record["Ports"] == [
        {"IP": "0.0.0.0", "PrivatePort": 25565, "PublicPort": 32768, "Type": "tcp"}
    ]
    running = record_from_inspect({**INSPECTED, "State": {"Status": "running"}})
    assert address_of(running) == "172.17.0.2:25565"
    assert address_of(running, use_published_ports=True) == "127.0.0.1:32768"


def test_inspections_override_the_stale_listing() -> None:
    listed = [container("mc-1", DOMAINS, cid="c1"), container("mc-2", DOMAINS, cid="c2")]
    paused = record_from_inspect(INSPECTED)
    assert [r["State"] for r in merge_inspected(listed, {"c1": paused})] == ["running", "paused"]
    assert [r["Id"] for r in merge_inspected(listed, {"c2": None})] == ["c1"]  # gone


def test_a_listing_shows_an_inspection_when_state_and_name_agree() -> None:
    listed = container("mc-1", DOMAINS, cid="c1")
    inspected = record_from_inspect({**INSPECTED, "State": {"Status": "running"}})
    assert same_state(listed, inspected)
    assert not same_state(listed, record_from_inspect(INSPECTED))  # paused
    assert not same_state(listed, record_from_inspect({**INSPECTED, "Name": "/renamed"}))
    assert not same_state(None, inspected)
    exited = record_from_inspect({**INSPECTED, "State": {"Status": "exited"}})
    assert same_state(None, exited) and same_state(None, None)  # the list has running ones
    assert not same_state(listed, None)


def test_own_container_id_from_mountinfo_is_the_one_behind_etc_hostname() -> None:
    cid = "0123456789abcdef" * 4
    other = "fedcba9876543210" * 4
    mountinfo = (
        f"646 621 0:57 / /dev/shm rw - tmpfs shm rw\n"
        f"650 621 8:1 /var/lib/docker/containers/{other}/mounts/shm /x rw - ext4 /dev/sda1 rw\n"
        f"651 621 8:1 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw - ext4 "
        f"/dev/sda1 rw\n"
    )
    assert own_id_from_mountinfo(mountinfo) == cid
    assert own_id_from_mountinfo("27 1 8:1 / / rw - ext4 /dev/sda1 rw\n") is None


def test_own_container_id_from_cgroup_v1() -> None:
    cid = "0123456789abcdef" * 4
    assert own_id_from_cgroup(f"12:memory:/docker/{cid}\n0::/\n") == cid
    assert own_id_from_cgroup(f"1:name=systemd:/system.slice/docker-{cid}.scope\n") == cid
    assert own_id_from_cgroup("0::/\n4:memory:/process_api/76eab02fbd\n") is None


# -- settings and docs --------------------------------------------------------------------


def test_endpoint_defaults_to_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    assert DockerSettings().endpoint == "tcp://127.0.0.1:2375"
    monkeypatch.delenv("DOCKER_HOST")
    assert DockerSettings().endpoint == "unix:///var/run/docker.sock"


@pytest.mark.parametrize("prefix", ["", "infrarust.", ".x", "a b"])
def test_a_bad_label_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid label prefix"):
        DockerSettings(label_prefix=prefix)


def test_host_address_accepts_ips_and_host_names() -> None:
    assert DockerSettings(host_address="[::1]").host_address == "::1"
    assert DockerSettings(host_address="Docker.Internal").host_address == "docker.internal"
    with pytest.raises(ValueError, match="invalid host"):
        DockerSettings(host_address="not a host")


def test_labels_doc_lists_every_label_with_the_given_prefix() -> None:
    text = labels_markdown("mc")
    for spec in LABELS:
        assert f"| `mc.{spec.key}` | {spec.type} | {spec.default} |" in text
    assert "infrarust." not in text


# -- front door: status, MOTDs, wake-on-connect --------------------------------------------


@pytest.mark.parametrize("state", ["exited", "created"])
def test_a_stopped_auto_start_container_is_a_sleeping_server_without_address(state: str) -> None:
    labels = {"infrarust.domains": "mc.example.com", "infrarust.auto_start": "true"}
    servers, problems = scan(container("mc-1", labels, networks={}, state=state))
    assert problems == []
    (server,) = servers
    assert server.sleeping and server.auto_start and server.addresses == ()


@pytest.mark.parametrize(
    ("state", "labels"),
    [
        ("exited", {"infrarust.domains": "mc.example.com"}),
        ("exited", {"infrarust.domains": "mc.example.com", "infrarust.auto_start": "false"}),
        ("paused", {"infrarust.domains": "mc.example.com", "infrarust.auto_start": "true"}),
        ("dead", {"infrarust.domains": "mc.example.com", "infrarust.auto_start": "true"}),
    ],
)
def test_other_stopped_containers_are_not_routed(state: str, labels: dict[str, str]) -> None:
    assert scan(container("mc-1", labels, state=state)) == ([], [])


def test_a_running_auto_start_container_is_awake_with_its_address() -> None:
    labels = {
        "infrarust.domains": "mc.example.com",
        "infrarust.auto_start": "1",
        "infrarust.auto_stop_after": "10m",
        "infrarust.status_cache_ttl": "2.5",
        "infrarust.domain_rewrite": "backend",
    }
    (server,), problems = scan(container("mc-1", labels))
    assert problems == []
    assert not server.sleeping and str(server.addresses[0]) == "172.17.0.2:25565"
    assert (server.auto_stop_after, server.status_cache_ttl) == (600.0, 2.5)
    assert server.domain_rewrite == "backend"


def test_motd_labels_nest_into_the_server_motds() -> None:
    labels = {
        "infrarust.domains": "mc.example.com",
        "infrarust.motds.sleeping.text": "§7Zzz\\n§fjoin to wake",
        "infrarust.motds.online.max_players": "100",
        "infrarust.motds.unreachable.version_name": "down",
    }
    (server,), problems = scan(container("mc-1", labels))
    assert problems == []
    assert (
        server.motds.sleeping is not None and server.motds.sleeping.text == "§7Zzz\n§fjoin to wake"
    )
    assert server.motds.online is not None and server.motds.online.max_players == 100
    assert server.motds.unreachable is not None
    assert server.motds.unreachable.version_name == "down"


@pytest.mark.parametrize(
    ("label", "value", "message"),
    [
        ("auto_stop_after", "soon", "expected a duration such as 30, 30s, 10m or 1h, got 'soon'"),
        ("motds.online.max_players", "-1", "expected a whole number >= 0, got '-1'"),
        ("motds.sleeping.favicon", "/nonexistent.png", "favicon /nonexistent.png cannot be read"),
        ("domain_rewrite", "not a host", "invalid domain_rewrite 'not a host'"),
    ],
)
def test_bad_front_door_labels_name_the_label(label: str, value: str, message: str) -> None:
    labels = {"infrarust.domains": "mc.example.com", f"infrarust.{label}": value}
    servers, problems = scan(container("mc-1", labels))
    assert servers == []
    assert len(problems) == 1 and problems[0].startswith(
        f"container mc-1, label infrarust.{label}: "
    )
    assert message in problems[0]


def test_ip_filter_labels_nest_into_the_server_filter() -> None:
    labels = {
        "infrarust.domains": "mc.example.com",
        "infrarust.ip_filter.allow": "10.0.0.0/8, 2001:db8::/32",
        "infrarust.ip_filter.deny": "10.9.0.0/16",
    }
    (server,), problems = scan(container("mc-1", labels))
    assert problems == []
    assert [str(n) for n in server.ip_filter.allow] == ["10.0.0.0/8", "2001:db8::/32"]
    assert [str(n) for n in server.ip_filter.deny] == ["10.9.0.0/16"]
    _, problems = scan(container("mc-1", {**labels, "infrarust.ip_filter.deny": "10.0.0.300"}))
    assert problems == [
        "container mc-1, label infrarust.ip_filter.deny: invalid address or CIDR '10.0.0.300'; "
        "expected e.g. '203.0.113.0/24', '2001:db8::/32' or '198.51.100.7'"
    ]


def test_player_labels_are_the_servers_lists_and_cap() -> None:
    labels = {
        "infrarust.domains": "mc.example.com",
        "infrarust.players.allow": "Steve, Alex",
        "infrarust.players.deny": "Griefer",
        "infrarust.wake.allow": "Steve",
        "infrarust.max_players": "20",
    }
    result = servers_from_containers([container("mc-1", labels)], DockerSettings())
    (server,) = result.servers
    assert result.problems == ()
    assert server.players.refuses("Bob") and not server.players.refuses("alex")
    assert server.players.refuses("griefer") and "steve" in server.wake.allow
    assert server.max_players == 20


def test_a_bad_player_label_names_the_container_the_label_and_the_accepted_values() -> None:
    labels = {"infrarust.domains": "mc.example.com", "infrarust.players.deny": "not a name!"}
    result = servers_from_containers([container("mc-1", labels)], DockerSettings())
    assert result.servers == ()
    (problem,) = result.problems
    assert problem.container == "mc-1" and problem.label == "infrarust.players.deny"
    assert "neither a username" in problem.message


def _model_field(path: str) -> FieldInfo:
    """The ServerDefinition field a label spec's dotted ``field`` names."""
    model: type[BaseModel] = ServerDefinition
    *outer, last = path.split(".")
    for name in outer:
        annotation = model.model_fields[name].annotation
        model = next(
            arg
            for arg in (annotation, *typing.get_args(annotation))
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        )
    return model.model_fields[last]


@pytest.mark.parametrize(
    "spec", [spec for spec in LABELS if spec.type == "bool" and spec.field], ids=lambda s: s.key
)
def test_a_bool_label_documents_the_default_the_model_has(spec: LabelSpec) -> None:
    assert spec.field is not None
    default = _model_field(spec.field).default
    assert isinstance(default, bool)
    assert spec.default == f"`{str(default).lower()}`"


def test_labels_md_says_swarm_refuses_engines() -> None:
    with pytest.raises(ValidationError, match="several engines are not supported for Swarm"):
        SwarmSettings.model_validate({"engines": [{"name": "a", "endpoint": "unix:///a"}]})
    settings = labels_markdown().split("## Provider settings", 1)[1]
    assert "`[providers.swarm]` takes the same keys but `engines`, which it refuses" in (
        " ".join(settings.split())
    )
