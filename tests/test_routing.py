from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from discoproxy.model import ServerDefinition
from discoproxy.routing import Registry, RoutingTable, build_table


def server(sid: str, *domains: str, default: bool = False) -> ServerDefinition:
    return ServerDefinition(id=sid, domains=domains, addresses=("127.0.0.1:1",), default=default)  # type: ignore[arg-type]


def test_exact_beats_wildcard() -> None:
    table = build_table(
        {"file": [server("wild", "*.example.com"), server("exact", "mc.example.com")]}
    )
    assert table.lookup_host("mc.example.com").qualified_id == "exact@file"  # type: ignore[union-attr]
    assert table.lookup_host("other.example.com").qualified_id == "wild@file"  # type: ignore[union-attr]


def test_most_specific_wildcard_wins() -> None:
    table = build_table(
        {"file": [server("broad", "*.example.com"), server("eu", "*.eu.example.com")]}
    )
    assert table.lookup_host("a.eu.example.com").qualified_id == "eu@file"  # type: ignore[union-attr]
    assert table.lookup_host("a.us.example.com").qualified_id == "broad@file"  # type: ignore[union-attr]
    assert table.lookup_host("a.b.c.eu.example.com").qualified_id == "eu@file"  # type: ignore[union-attr]


def test_wildcard_does_not_match_its_own_apex() -> None:
    table = build_table({"file": [server("wild", "*.example.com")]})
    assert table.lookup_host("example.com") is None
    assert table.lookup_host("notexample.com") is None


def test_default_is_used_only_when_nothing_matches() -> None:
    table = build_table({"file": [server("catch", default=True), server("mc", "mc.example.com")]})
    assert table.lookup_or_default("mc.example.com").qualified_id == "mc@file"  # type: ignore[union-attr]
    assert table.lookup_or_default("x.org").qualified_id == "catch@file"  # type: ignore[union-attr]
    assert table.lookup_or_default(None).qualified_id == "catch@file"  # type: ignore[union-attr]


def test_lookup_or_default_matches_wildcards_like_lookup_host() -> None:
    table = build_table(
        {
            "file": [
                server("catch", default=True),
                server("broad", "*.example.com"),
                server("eu", "*.eu.example.com"),
                server("exact", "mc.eu.example.com"),
            ]
        }
    )
    for name, expected in [
        ("mc.eu.example.com", "exact@file"),
        ("a.eu.example.com", "eu@file"),
        ("a.b.example.com", "broad@file"),
        ("example.com", "catch@file"),
        ("x.org", "catch@file"),
        ("", "catch@file"),
    ]:
        assert table.lookup_or_default(name).qualified_id == expected  # type: ignore[union-attr]
        if name:
            found = table.lookup_host(name)
            assert (found.qualified_id if found else "catch@file") == expected


def test_lookup_without_wildcards_or_default() -> None:
    table = build_table({"file": [server("mc", "mc.example.com")]})
    assert table.lookup_or_default("a.mc.example.com") is None
    assert table.lookup_host("a.mc.example.com") is None
    assert table.lookup_or_default(None) is None


def test_conflict_has_a_deterministic_winner_whatever_the_order() -> None:
    a, b = server("b-server", "mc.example.com"), server("a-server", "mc.example.com")
    for order in ([a, b], [b, a]):
        table = build_table({"file": order})
        assert table.lookup_host("mc.example.com").qualified_id == "a-server@file"  # type: ignore[union-attr]
        assert [str(c) for c in table.conflicts] == [
            "'mc.example.com' is claimed by a-server@file and b-server@file; "
            "a-server@file wins (first qualified id in sort order)"
        ]


def test_conflict_across_providers_uses_the_qualified_id() -> None:
    table = build_table({"file": [server("mc", "x.com")], "docker": [server("mc", "x.com")]})
    assert table.lookup_host("x.com").qualified_id == "mc@docker"  # type: ignore[union-attr]
    assert table.conflicts[0].losers == ("mc@file",)


def test_two_defaults_are_a_conflict() -> None:
    table = build_table({"file": [server("z", default=True), server("y", default=True)]})
    assert table.default.qualified_id == "y@file"  # type: ignore[union-attr]
    assert table.conflicts[0].name == "(default)"


def test_registry_swaps_tables_and_keeps_old_ones_intact() -> None:
    registry = Registry()
    seen = []
    registry.add_listener(seen.append)
    assert registry.apply_snapshot("file", [server("a", "a.com")])
    old = registry.table
    assert registry.apply_snapshot("docker", [server("b", "b.com")])
    assert registry.table.lookup_host("b.com") is not None
    assert old.lookup_host("b.com") is None
    assert old.lookup_host("a.com") is not None
    assert len(seen) == 2


def test_registry_skips_an_unchanged_snapshot_but_applies_an_empty_one() -> None:
    registry = Registry()
    registry.apply_snapshot("file", [server("a", "a.com")])
    assert not registry.apply_snapshot("file", [server("a", "a.com")])
    assert registry.apply_snapshot("file", [])
    assert registry.table.lookup_host("a.com") is None


def test_lookup_with_ten_thousand_routes() -> None:
    servers = [server(f"s{i}", f"s{i}.example.com", f"*.w{i}.example.org") for i in range(10_000)]
    table = build_table({"file": servers})
    assert table.lookup_host("s9999.example.com").qualified_id == "s9999@file"  # type: ignore[union-attr]
    assert table.lookup_host("x.y.w5000.example.org").qualified_id == "s5000@file"  # type: ignore[union-attr]
    assert table.lookup_host("nothing.example.net") is None


def test_domains_of_lists_the_names_a_route_won() -> None:
    table = build_table(
        {
            "file": [
                server("a", "a.example.com", "*.a.example.org", "x.example.com"),
                server("b", "x.example.com", "b.example.com"),
                server("catch", default=True),
            ]
        }
    )
    a, b, catch = (table.by_id[f"{sid}@file"] for sid in ("a", "b", "catch"))
    assert table.domains_of(a) == ("a.example.com", "x.example.com", "*.a.example.org")
    assert table.domains_of(b) == ("b.example.com",)  # x.example.com went to a@file
    assert table.domains_of(catch) == ()


def test_domains_of_a_port_route_or_a_foreign_route_is_empty() -> None:
    mc = ServerDefinition.model_validate(
        {"id": "mc", "domains": ["mc.example.com"], "addresses": ["10.0.0.5"], "ports": ["25575"]}
    )
    table = build_table({"file": [mc]})
    other = build_table({"file": [mc]})
    assert table.domains_of(table.by_id["mc@file"]) == ("mc.example.com",)
    assert table.domains_of(table.ports[("tcp", 25575)]) == ()  # a copy, its own addresses
    assert table.domains_of(other.by_id["mc@file"]) == ()


def test_route_names_are_built_once_with_the_table() -> None:
    table = build_table({"file": [server("a", "a.example.com", "*.a.example.org")]})
    route = table.by_id["a@file"]
    # the same immutable value every call: built with the table, not per call
    assert table.domains_of(route) is table.domains_of(route)
    assert isinstance(table.domains_of(route), tuple)


def _opcodes_run(call: Callable[[], object]) -> int:
    """How many bytecodes ``call()`` executes (its frames and every frame it calls)."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "opcode":
            count += 1
        return local

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        call()
    finally:
        sys.settrace(previous)
    return count


def _names_table(size: int) -> RoutingTable:
    servers = [server(f"s{i}", f"s{i}.example.com", f"*.w{i}.example.org") for i in range(size)]
    return build_table({"file": servers})


def test_domains_of_costs_the_same_with_ten_or_a_thousand_routes() -> None:
    """/api/routes asks once per route: a scan of every name per call made it quadratic
    (0.14 s at 2,000 routes, 3.7 s at 10,000). Counted in bytecodes, not timed."""
    small, large = _names_table(10), _names_table(1_000)
    route_small, route_large = small.by_id["s5@file"], large.by_id["s500@file"]
    assert small.domains_of(route_small) == ("s5.example.com", "*.w5.example.org")
    assert large.domains_of(route_large) == ("s500.example.com", "*.w500.example.org")
    assert _opcodes_run(lambda: small.domains_of(route_small)) == _opcodes_run(
        lambda: large.domains_of(route_large)
    )
