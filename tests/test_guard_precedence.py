"""One precedence for TCP and UDP: both go through guard.global_refusal and
guard.routed_refusal, so a client refused for several reasons is refused for the same
one whichever protocol it uses."""

from __future__ import annotations

import ipaddress
import time

from discoproxy.config import ProxyConfig
from discoproxy.guard import (
    Ban,
    BanList,
    Guard,
    routed_refusal,
)
from discoproxy.model import ServerDefinition
from discoproxy.proxy.ports import udp_refusal
from discoproxy.rejections import Rejection
from discoproxy.routing import Route, build_table

CLIENT = ("198.51.100.7", 40000)


def _guard(**settings: object) -> Guard:
    guard = Guard(ProxyConfig.model_validate(settings))
    ban = Ban("grief", time.time(), network=ipaddress.ip_network("198.51.100.0/24"))
    guard.set_bans(BanList([ban]))
    return guard


def _route(**extra: object) -> Route:
    server = ServerDefinition.model_validate(
        {"id": "mc", "addresses": ["10.0.0.5:19132"], "ports": ["19132/udp"], **extra}
    )
    return build_table({"test": [server]}).ports[("udp", 19132)]


def test_banned_and_outside_the_server_filter_is_banned_on_tcp_and_udp() -> None:
    guard = _guard()
    route = _route(ip_filter={"allow": ["192.0.2.0/24"]})
    ip = ipaddress.ip_address(CLIENT[0])
    tcp = routed_refusal(guard, ip, route.ip_filter, route.qualified_id, guard.connections)
    udp = udp_refusal(guard, CLIENT, route)
    assert tcp is not None and udp is not None
    assert tcp.cause == udp.cause == Rejection.BANNED


def test_the_global_filter_comes_first_on_udp() -> None:
    guard = _guard(ip_filter={"deny": ["198.51.100.0/24"]})
    refusal = udp_refusal(guard, CLIENT, _route())
    assert refusal is not None and refusal.cause == "denied by ip_filter"


def test_a_server_filter_refusal_names_the_route_but_its_cause_does_not() -> None:
    guard = Guard(ProxyConfig())
    route = _route(ip_filter={"deny": ["198.51.100.0/24"]})
    refusal = udp_refusal(guard, CLIENT, route)
    assert refusal is not None
    assert refusal.cause == "server ip_filter"  # a fixed metric label, whatever the route
    assert refusal.reason == "mc@test: denied by ip_filter"
