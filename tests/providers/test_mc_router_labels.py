"""itzg/mc-router's container labels (its documented ``mc-router.host``, ``.port``,
``.default``, ``.network``, ``.auto-scale-up``, ``.auto-scale-down``,
``.auto-scale-asleep-motd``), routed as mc-router routes them, next to ``infrarust.*``
containers. Records are shaped as the engine's /containers/json answers."""

from __future__ import annotations

from providers.docker import is_relevant_event
from tests.providers.test_docker_labels import container, one, problem_of, scan


def test_host_and_port_route_each_host_to_the_container() -> None:
    server = one(
        container(
            "vanilla",
            {"mc-router.host": " mc.example.com , other.example.com", "mc-router.port": "25566"},
        )
    )
    assert server.id == "vanilla"
    assert server.domains == ("mc.example.com", "other.example.com")
    assert [str(a) for a in server.addresses] == ["172.17.0.2:25566"]


def test_the_default_port_is_25565_and_default_makes_a_catch_all_too() -> None:
    server = one(
        container("lobby", {"mc-router.host": "lobby.example.com", "mc-router.default": "T"})
    )
    assert server.default and server.domains == ("lobby.example.com",)
    assert [str(a) for a in server.addresses] == ["172.17.0.2:25565"]


def test_default_without_a_host_is_not_routed_as_in_mc_router() -> None:
    assert scan(container("lobby", {"mc-router.default": "true"})) == ([], [])


def test_network_picks_the_network_on_a_container_with_several() -> None:
    record = container(
        "mc",
        {"mc-router.host": "mc.example.com", "mc-router.network": "games"},
        networks={"games": "10.1.0.5", "db": "10.2.0.5"},
    )
    assert [str(a) for a in one(record).addresses] == ["10.1.0.5:25565"]


def test_auto_scale_labels_wake_and_stop_a_stopped_container() -> None:
    labels = {
        "mc-router.host": "mc.example.com",
        "mc-router.auto-scale-up": "true",
        "mc-router.auto-scale-down": "1",
        "mc-router.auto-scale-asleep-motd": "Asleep: join to wake it",
    }
    server = one(container("mc", labels, state="exited"))
    assert server.sleeping and server.auto_start
    assert server.auto_stop_after == 600  # mc-router's default idle time, 10m
    assert server.motds.sleeping is not None
    assert server.motds.sleeping.text == "Asleep: join to wake it"
    # without auto-scale-up, a stopped container is not routed, as in mc-router
    assert scan(container("mc", {"mc-router.host": "mc.example.com"}, state="exited")) == ([], [])


def test_bad_values_name_the_container_and_the_mc_router_label() -> None:
    message = problem_of(
        container("mc", {"mc-router.host": "mc.example.com", "mc-router.auto-scale-up": "yes"})
    )
    assert message.startswith("container mc, label mc-router.auto-scale-up: expected one of 1")
    port = problem_of(container("mc", {"mc-router.host": "mc.example.com", "mc-router.port": "x"}))
    assert port.startswith("container mc, label mc-router.port: expected 1-65535")
    # found once the labels are read as ours: still named as the container has them
    host = problem_of(container("mc", {"mc-router.host": "bad_host!.example.com"}))
    assert host.startswith("container mc, label mc-router.host: "), host


def test_both_label_sets_on_one_container_are_refused() -> None:
    labels = {"mc-router.host": "a.example.com", "infrarust.domains": "b.example.com"}
    assert "use one set" in problem_of(container("mc", labels))


def test_mc_router_and_infrarust_containers_route_side_by_side() -> None:
    servers, problems = scan(
        container("a", {"mc-router.host": "a.example.com"}),
        container("b", {"infrarust.domains": "b.example.com"}, networks={"bridge": "172.17.0.3"}),
    )
    assert problems == []
    assert {s.id: s.domains for s in servers} == {
        "a": ("a.example.com",),
        "b": ("b.example.com",),
    }


def test_an_unknown_mc_router_label_is_refused() -> None:
    servers, problems = scan(
        container("a", {"mc-router.host": "a.example.com", "mc-router.hots": "x"}),
        container("b", {"mc-router.host": "b.example.com"}),
    )
    assert [s.id for s in servers] == ["b"]  # the others are routed
    assert len(problems) == 1 and "label mc-router.hots: unknown mc-router label" in problems[0]


def test_events_of_mc_router_containers_resync() -> None:
    event = {"Type": "container", "Actor": {"Attributes": {"mc-router.host": "a.example.com"}}}
    assert is_relevant_event(event, "infrarust")


def test_mc_router_s_global_auto_scale_flags_apply_where_a_container_has_no_label() -> None:
    """mc-router's -auto-scale-up, -auto-scale-down and -auto-scale-down-after are the
    provider's mc_router_auto_scale_* settings; a container's own label wins."""
    flags = {
        "mc_router_auto_scale_up": True,
        "mc_router_auto_scale_down": True,
        "mc_router_auto_scale_down_after": "5m",
    }
    bare = container("mc", {"mc-router.host": "mc.example.com"}, state="exited")
    server = one(bare, **flags)
    assert server.sleeping and server.auto_start and server.auto_stop_after == 300
    opted_out = container(
        "mc",
        {
            "mc-router.host": "mc.example.com",
            "mc-router.auto-scale-up": "false",
            "mc-router.auto-scale-down": "true",  # stops after the global idle time
        },
    )
    server = one(opted_out, **flags)
    assert not server.auto_start and server.auto_stop_after == 300
    assert scan(container("mc", opted_out["Labels"], state="exited"), **flags) == ([], [])
    # containers labelled ours are not mc-router's: the flags leave them alone
    ours = one(container("mc", {"infrarust.domains": "mc.example.com"}), **flags)
    assert not ours.auto_start and ours.auto_stop_after is None


def test_a_bad_global_idle_time_is_refused_naming_the_setting() -> None:
    import pytest
    from pydantic import ValidationError

    from providers.docker import DockerSettings

    with pytest.raises(ValidationError, match="mc_router_auto_scale_down_after"):
        DockerSettings(mc_router_auto_scale_down_after="soon")  # type: ignore[arg-type]


def test_a_long_global_idle_time_is_written_so_the_label_parser_takes_it() -> None:
    # 300h formatted with :g read "1.08e+06", which the duration label refuses: every
    # mc-router container was then dropped with a problem about a label it did not have
    flags = {"mc_router_auto_scale_down": True, "mc_router_auto_scale_down_after": "300h"}
    server = one(container("mc", {"mc-router.host": "mc.example.com"}), **flags)
    assert server.auto_stop_after == 300 * 3600
