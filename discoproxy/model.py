"""The vocabulary every part of discoproxy shares: what a routable server is.

Rules for this file:
- Field names and meanings follow Infrarust's server files (``domains``, ``addresses``,
  ``send_proxy_protocol``, ``proxy_mode``), so its users bring their files unchanged; the
  camelCase spellings of Infrarust 1.x (``sendProxyProtocol``, ``proxyMode``) are accepted too.
- Validation happens here, once, at the edge. What leaves this module is normalised:
  lower-case domains without trailing dots, addresses split into host and port.
- Error messages name the field, what was seen and the accepted form; the caller adds
  where the value came from (file, container, label).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from discoproxy.motd import MAX_PLAYER_COUNT
from discoproxy.motd import Motd as Motd  # part of the vocabulary: ServerMotds holds it

DEFAULT_BACKEND_PORT = 25565

# RFC 1123 labels, plus "_" which real deployments use (SRV-style names, Docker hosts).
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN_RE = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_MAX_DOMAIN_LENGTH = 253  # RFC 1035 §2.3.4, in text form without the trailing dot


class ProxyMode(enum.StrEnum):
    """How a connection is carried to its backend.

    Only ``passthrough`` exists: Infrarust's ``zero_copy`` and ``server_only`` forward
    bytes too and load as it (in server files, labels and Infrarust's own files);
    ``client_only`` and ``offline`` are refused with the reason.
    """

    PASSTHROUGH = "passthrough"


class Balance(enum.StrEnum):
    """Which backend of a pool a new connection dials first (the others follow, in
    turn, if that dial fails)."""

    FAILOVER = "failover"  # the first healthy address, in the order given
    ROUND_ROBIN = "round_robin"  # in turn, by weight
    RANDOM = "random"  # at random, by weight
    LEAST_CONNECTIONS = "least_connections"  # fewest open connections per weight

    LOWEST_LATENCY = "lowest_latency"  # the fastest health check (needs health_check)
    FEWEST_PLAYERS = "fewest_players"  # fewest online (needs a minecraft health_check)


MAX_WEIGHT = 256


class CheckKind(enum.StrEnum):
    """What an active health check does against each backend of a pool."""

    TCP = "tcp"  # connect
    MINECRAFT = "minecraft"  # handshake, status, ping/pong: a real server-list ping
    TLS = "tls"  # connect + TLS handshake (certificate not verified)
    HTTP = "http"  # a GET whose status line must be the expected status


class HealthCheck(BaseModel):
    """``health_check = { type = "tcp", interval = 5, timeout = 2, rise = 2, fall = 3 }``:
    HAProxy's ``check inter/rise/fall``. Checks run on the control plane, spread over the
    interval; a backend goes down after ``fall`` failed checks in a row and up again
    after ``rise`` passed ones."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: CheckKind = Field(
        description="tcp, minecraft, tls or http. A minecraft check's status answer "
        "also refreshes the status cache."
    )
    interval: float = Field(default=5.0, ge=0.2, le=3600, description="Seconds between checks.")
    timeout: float = Field(default=2.0, gt=0, le=60, description="Seconds a check may take.")
    rise: int = Field(default=2, ge=1, le=100, description="Passed checks in a row to go up.")
    fall: int = Field(default=3, ge=1, le=100, description="Failed checks in a row to go down.")
    http_path: str = Field(default="/", description="Path of an http check's GET.")
    http_status: int = Field(default=200, ge=100, le=599, description="Status it must answer.")

    @field_validator("interval", "timeout", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """``5``, ``0.5``, ``2s``, ``1m``: as the Docker labels take them."""
        return label_duration(value, "seconds (5) or a duration such as 500ms, 2s or 1m")

    @field_validator("http_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in " \r\n"):
            raise ValueError(f"invalid http_path {value!r}; expected a path such as '/health'")
        return value


# Infrarust's modes that forward the bytes as they are (``zerocopy``: v1): they load as
# ``passthrough``; those where its proxy takes part in the login are refused, and why.
FORWARDING_PROXY_MODES = frozenset({"passthrough", "zero_copy", "zerocopy", "server_only"})
INTERCEPTED_PROXY_MODES = frozenset({"client_only", "offline", "full", "intercepted"})
INTERCEPTED_REASON = (
    "the proxy would have to take part in the login (authenticate players or rewrite "
    "packets); discoproxy forwards the bytes as they are. Use passthrough (the backend "
    "authenticates) or remove it"
)


def normalize_domain(value: str) -> str:
    """Lower-case, strip surrounding blanks and one trailing dot; validate the shape.

    Accepted: ``example.com``, ``*.example.com`` (a leading wildcard label only).
    """
    domain = value.strip().lower()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain:
        raise ValueError("empty domain; expected a name such as 'mc.example.com'")
    if len(domain) > _MAX_DOMAIN_LENGTH:
        raise ValueError(f"domain {value!r} is longer than {_MAX_DOMAIN_LENGTH} characters")
    if not _DOMAIN_RE.match(domain):
        raise ValueError(
            f"invalid domain {value!r}; expected a hostname such as 'mc.example.com' "
            "or a wildcard such as '*.example.com' (the '*' only as the whole first label)"
        )
    return domain


def _parse_port(text: str, original: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"invalid port in address {original!r}; expected 1-65535, got {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port in address {original!r}; expected 1-65535, got {text!r}")
    return port


class HeldBack(BaseModel):
    """A replica a provider keeps out of the pool for now, and why (the API shows it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    address: str  # host:port, as the replica would be dialed
    health: str  # the Docker HEALTHCHECK status: "starting" or "unhealthy"


# Fields only a provider sets (a server file that sets one is refused).
PROVIDER_SET_FIELDS = ("sleeping", "held_back")


class BackendAddress(BaseModel):
    """One backend endpoint: ``host[:port]``, ``[v6]:port`` or a bare IPv6 literal."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    host: str
    port: int = DEFAULT_BACKEND_PORT
    # relative share of new connections (round_robin, random, least_connections);
    # 0 takes none while another backend is up (drain it)
    weight: int = Field(default=1, ge=0, le=MAX_WEIGHT)

    @classmethod
    def parse(cls, value: str) -> BackendAddress:
        text = value.strip()
        if not text:
            raise ValueError("empty address; expected 'host[:port]' such as '10.0.0.5:25565'")
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError(f"invalid address {value!r}; missing ']' after IPv6 literal")
            host, rest = text[1:end], text[end + 1 :]
            if rest and not rest.startswith(":"):
                raise ValueError(f"invalid address {value!r}; expected '[v6]:port'")
            port = _parse_port(rest[1:], value) if rest else DEFAULT_BACKEND_PORT
            _check_ip(host, value, want_v6=True)
            return cls(host=host, port=port)
        if text.count(":") > 1:  # a bare IPv6 literal, no port
            _check_ip(text, value, want_v6=True)
            return cls(host=text, port=DEFAULT_BACKEND_PORT)
        host, sep, port_text = text.partition(":")
        port = _parse_port(port_text, value) if sep else DEFAULT_BACKEND_PORT
        if not _HOSTNAME_RE.match(host.lower()):
            raise ValueError(
                f"invalid host in address {value!r}; expected an IP address or a hostname"
            )
        return cls(host=host.lower(), port=port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _backend_address(item: object) -> BackendAddress:
    """An ``addresses`` entry: 'host[:port]', or { address = 'host[:port]', weight = n }."""
    if isinstance(item, BackendAddress):
        return item
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"address", "weight"})
        if unknown or "address" not in item:
            raise ValueError(
                f"invalid address entry {item!r}; expected 'host[:port]' or "
                "{ address = 'host[:port]', weight = 1 }"
            )
        weight = item.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(
                f"invalid weight {weight!r} for {item['address']!r}; expected an integer "
                f"from 0 (no new connections) to {MAX_WEIGHT}"
            )
        parsed = BackendAddress.parse(str(item["address"]))
        return BackendAddress(host=parsed.host, port=parsed.port, weight=weight)
    return BackendAddress.parse(str(item))


def _check_ip(host: str, original: str, *, want_v6: bool) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"invalid IPv6 address in {original!r}; expected e.g. '[2001:db8::1]:25565', "
            "or '[2001:db8::1]' and '2001:db8::1' for port 25565"
        ) from None
    if want_v6 and ip.version != 6:
        raise ValueError(f"invalid address {original!r}; brackets are for IPv6 literals only")


DOMAIN_REWRITE_BACKEND = "backend"
_FROM_BACKEND = "from_backend"  # Infrarust's spelling: the first address's host
# Ports one mapping may open: each is a listening socket (an fd, a reactor entry).
MAX_PORTS_PER_MAPPING = 1024
_PORT_MAPPING_RE = re.compile(r"^(\d+)(?:-(\d+))?(?::(\d+)(?:-(\d+))?)?(?:/(tcp|udp))?$")


class PortMapping(BaseModel):
    """Ports discoproxy listens on for a server and the backend ports they map to:
    ``"25575/tcp"``, ``"9000-9010:8000-8010/tcp"``, ``"19132/udp"``."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    protocol: str  # "tcp" or "udp"
    listen: int  # first port listened on
    count: int  # ports in the range
    target: int  # backend port of the first one; the others follow by offset

    @classmethod
    def parse(cls, value: str) -> PortMapping:
        text = value.strip().lower().replace(" ", "")
        match = _PORT_MAPPING_RE.match(text)
        if match is None:
            raise ValueError(
                f"invalid port mapping {value!r}; expected 'PORT[-END][:TARGET[-END]]/tcp|udp', "
                "e.g. '25575/tcp', '9000-9010:8000-8010/tcp' or '19132/udp'"
            )
        first, last, target_first, target_last, protocol = match.groups()
        listen = _mapping_port(first, value)
        listen_end = _mapping_port(last, value) if last else listen
        target = _mapping_port(target_first, value) if target_first else listen
        target_end = _mapping_port(target_last, value) if target_last else None
        if listen_end < listen:
            raise ValueError(
                f"invalid port range in {value!r}: {listen}-{listen_end} runs backwards"
            )
        count = listen_end - listen + 1
        if count > MAX_PORTS_PER_MAPPING:
            raise ValueError(
                f"port range in {value!r} has {count} ports; at most {MAX_PORTS_PER_MAPPING}"
            )
        if target_end is None:
            target_end = target + count - 1
        if target_end - target + 1 != count:
            raise ValueError(
                f"port ranges in {value!r} differ in length: {count} ports map to "
                f"{target_end - target + 1}"
            )
        if target_end > 65535:
            raise ValueError(f"target ports in {value!r} run past 65535")
        return cls(protocol=protocol or "tcp", listen=listen, count=count, target=target)

    def pairs(self) -> list[tuple[int, int]]:
        """(listen port, backend port) for every port of the mapping."""
        return [(self.listen + i, self.target + i) for i in range(self.count)]

    def __str__(self) -> str:
        def span(first: int) -> str:
            return str(first) if self.count == 1 else f"{first}-{first + self.count - 1}"

        if self.target == self.listen:
            return f"{span(self.listen)}/{self.protocol}"
        return f"{span(self.listen)}:{span(self.target)}/{self.protocol}"


def _mapping_port(text: str, original: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {text} in {original!r}; expected 1-65535")
    return port


def parse_networks(
    values: Iterable[object], field: str = ""
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDRs (or bare addresses) → networks; an error names ``field`` and the value."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            where = f"{field}: " if field else ""
            raise ValueError(
                f"{where}invalid address or CIDR {value!r}; expected e.g. '203.0.113.0/24', "
                "'2001:db8::/32' or '198.51.100.7'"
            ) from None
    return tuple(networks)


class IpFilterSettings(BaseModel):
    """Who may connect, by real client address: ``deny`` refuses, and a non-empty
    ``allow`` refuses everything outside it (deny wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(
        default=(), description="CIDRs or addresses allowed; empty: everyone not denied."
    )
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(
        default=(), description="CIDRs or addresses refused, whatever 'allow' says."
    )

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            return value
        return parse_networks(value)

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)


_DURATION_PART = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def peer_duration_s(value: Any, where: str) -> float:
    """Gate's and Infrarust's durations: ``10s``, ``1m``, ``500ms``, ``2m30s``, or a
    number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).replace(" ", "")
    if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{where}: expected a duration such as 10s, 1m or 2m30s, got {value!r}")
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


def label_duration(value: Any, expected: str) -> Any:
    """A server file's duration as the labels write it (``30s``, ``10m``): seconds;
    anything but a string is left to the field's own type check."""
    if not isinstance(value, str):
        return value
    try:
        return peer_duration_s(value.strip().lower(), "duration")
    except ValueError:
        raise ValueError(f"expected {expected}, got {value!r}") from None


_USERNAME_RE = re.compile(r"^[A-Za-z0-9_]{1,16}$")


def offline_uuid(username: str) -> uuid.UUID:
    """The UUID an offline-mode server gives *username*: Java's
    ``UUID.nameUUIDFromBytes("OfflinePlayer:" + name)`` (MD5, version 3)."""
    digest = hashlib.md5(f"OfflinePlayer:{username}".encode(), usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest, version=3)


class PlayerList(BaseModel):
    """Players by username (any case) or UUID (with or without dashes; the offline-mode
    UUID of a name is what a login is matched by)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    names: frozenset[str] = frozenset()  # lower-cased
    uuids: frozenset[uuid.UUID] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _from_entries(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple | set | frozenset):
            return value
        names: set[str] = set()
        uuids: set[uuid.UUID] = set()
        for entry in value:
            text = str(entry).strip()
            if _USERNAME_RE.match(text):
                names.add(text.lower())
                continue
            try:
                uuids.add(uuid.UUID(text))
            except ValueError:
                raise ValueError(
                    f"{text!r} is neither a username (1-16 letters, digits or _) nor a UUID "
                    "(e.g. 069a79f4-44e9-4726-a5be-fca90e38aaf5)"
                ) from None
        return {"names": frozenset(names), "uuids": frozenset(uuids)}

    def __bool__(self) -> bool:
        return bool(self.names or self.uuids)

    def __contains__(self, username: object) -> bool:
        if not isinstance(username, str):
            return False
        return username.lower() in self.names or (
            bool(self.uuids) and offline_uuid(username) in self.uuids
        )

    def entries(self) -> list[str]:
        return sorted(self.names) + sorted(str(u) for u in self.uuids)


class PlayerLists(BaseModel):
    """Who may log in, by username: ``deny`` refuses, and a non-empty ``allow`` refuses
    every player not on it (deny wins), as ``ip_filter`` does for addresses."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    allow: PlayerList = Field(
        default_factory=PlayerList,
        description="Usernames or offline UUIDs allowed to log in; empty: everyone not denied.",
    )
    deny: PlayerList = Field(
        default_factory=PlayerList,
        description="Usernames or offline UUIDs refused, whatever 'allow' says.",
    )

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def refuses(self, username: str) -> bool:
        return username in self.deny or (bool(self.allow) and username not in self.allow)


class WakeSettings(BaseModel):
    """Who may start a sleeping server (``auto_start``) by logging in."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    allow: PlayerList = Field(
        default_factory=PlayerList,
        description="Usernames or offline UUIDs whose login wakes the server; empty: anyone "
        "allowed to log in. Others read `wake_not_allowed_message` and it stays asleep.",
    )


class TlsSettings(BaseModel):
    """TLS termination for a server: discoproxy completes the handshake with this
    certificate (chosen by SNI: the server's domains) and forwards plaintext, or TLS
    again with ``backend_tls``. Paths are read inside discoproxy's container."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    cert: Path = Field(description="PEM certificate chain (leaf first).")
    key: Path = Field(description="PEM private key of the certificate.")
    backend_tls: bool = Field(
        default=False, description="Speak TLS to the backend too (re-encrypt)."
    )
    backend_verify: bool = Field(
        default=True,
        description="With backend_tls: verify the backend's certificate (system CAs, or "
        "backend_ca) and its name.",
    )
    backend_ca: Path | None = Field(
        default=None, description="With backend_tls: PEM CA bundle to verify the backend."
    )


class ServerMotds(BaseModel):
    """Per-state overrides of what the server list shows; unset fields fall back to the
    global ``[motds.<state>]`` of the config."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    online: Motd | None = Field(
        default=None,
        description="Patches the backend's own status answer (text, version, players, icon).",
    )
    unreachable: Motd | None = Field(
        default=None, description="Shown when the backend does not answer a status ping."
    )
    starting: Motd | None = Field(
        default=None, description="Shown while a woken server is starting (auto_start)."
    )
    sleeping: Motd | None = Field(
        default=None, description="Shown while an auto_start server is stopped."
    )


class ServerDefinition(BaseModel):
    """A routable server, as a provider publishes it.

    ``id`` is unique within its provider (file stem, container name); the registry
    qualifies it as ``id@provider``.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        alias_generator=to_camel,
        populate_by_name=True,
    )

    id: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="Unique within its provider: the file stem, or the container name."
    )
    domains: tuple[str, ...] = Field(
        default=(),
        description="Names routed to this server: exact ('mc.example.com') or wildcard "
        "('*.example.com'); matched against the Minecraft handshake, TLS SNI or HTTP Host.",
    )
    addresses: tuple[BackendAddress, ...] = Field(
        description="Backends as 'host[:port]' (port 25565 by default), or "
        "{ address = 'host[:port]', weight = 3 }; the pool 'balance' chooses from.",
    )
    balance: Balance = Field(
        default=Balance.FAILOVER,
        description="Which address a new connection dials first: 'failover' (the first "
        "healthy one, in order), 'round_robin', 'random' or 'least_connections' (by "
        "weight), 'lowest_latency' (the fastest last check) or 'fewest_players' (the "
        "fewest online at the last minecraft check, moved by the connections opened and "
        "closed there since); a "
        "failed dial moves on to the next healthy address (4 at most but for 'failover').",
    )
    health_check: HealthCheck | None = Field(
        default=None,
        description="Active checks of each address: { type = 'tcp' | 'minecraft' | 'tls' | "
        "'http', interval = 5, timeout = 2, rise = 2, fall = 3 }; a backend that fails "
        "them takes no new connections until it passes again.",
    )
    sticky_ttl: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a client IP keeps dialing the backend it last reached "
        "(reconnecting players land on the same replica); 0: off.",
    )
    send_proxy_protocol: bool = Field(
        default=False,
        description="Send a PROXY protocol v2 header with the real client address first.",
    )
    proxy_mode: ProxyMode = Field(
        default=ProxyMode.PASSTHROUGH,
        description="How connections are carried: 'passthrough' (the bytes as they are), "
        "or Infrarust's 'zero_copy' and 'server_only', which load as it; 'client_only' and "
        "'offline' are refused (discoproxy takes no part in the login).",
    )
    default: bool = Field(
        default=False,
        description="Catch-all: receives every connection whose name matches no server.",
    )
    name: str | None = Field(
        default=None, max_length=200, description="Display name used in logs and player messages."
    )
    status_cache_ttl: float | None = Field(
        default=None,
        ge=0,
        description="Seconds a status answer from this server is served from cache without "
        "asking it again; default: the global status_cache_ttl. 0 asks on every ping.",
    )
    motds: ServerMotds = Field(
        default_factory=ServerMotds,
        description="Server-list answers per state: online, unreachable, starting, sleeping.",
    )
    domain_rewrite: str | None = Field(
        default=None,
        description="Name the backend sees in the Minecraft handshake instead of the "
        "player's: 'backend' for the host of the address dialed, 'from_backend' for the "
        "host of the first address (Infrarust's), or an explicit host name (also as "
        "Infrarust's `{ explicit = \"mc.local\" }`); 'none' (the default) keeps it.",
    )
    connect_timeout: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="Seconds a dial to one of its addresses may take before the next is "
        "tried; default: the global connect_timeout (Infrarust's `timeouts.connect`).",
    )
    tcpshield_real_ip: bool = Field(
        default=False,
        description="Tell the backend the player's address in TCPShield's real-IP format "
        "(Gate Lite's `tcpShieldRealIP`): the handshake's host becomes "
        "'host///ip:port///unix-time' (1.7+ logins and pings), for backends that read that "
        "format unsigned. Real-IP data from a trusted_proxies peer connecting directly "
        "(TCPShield, signed) is passed on as sent; anyone else's is replaced.",
    )
    unreachable_message: str | None = Field(
        default=None,
        description="What a player logging in reads when no backend of this server "
        "answers; default: the global `unreachable_message` ({server}, {domain} filled in).",
    )
    auto_start: bool = Field(
        default=False,
        description="Keep the server routable while it is stopped and start it when a "
        "player logs in (providers that can start servers: docker).",
    )
    auto_stop_after: float | None = Field(
        default=None,
        ge=0,
        description="Stop the server after this many seconds with no player connected "
        "(with auto_start); unset or 0: never.",
    )
    tls: TlsSettings | None = Field(
        default=None,
        description="Terminate TLS here: { cert = '...pem', key = '...pem' }; without it, "
        "TLS passes through to the backend untouched (the default).",
    )
    ip_filter: IpFilterSettings = Field(
        default_factory=IpFilterSettings,
        description="Per-server allow/deny CIDRs, applied after the global [ip_filter]: "
        "it can narrow who reaches this server, never widen it.",
    )
    players: PlayerLists = Field(
        default_factory=PlayerLists,
        description="Per-server allow/deny lists of usernames or offline UUIDs, checked at "
        "Login Start after the global [players]: it can narrow who logs in, never widen it.",
    )
    wake: WakeSettings = Field(
        default_factory=WakeSettings,
        description="{ allow = [...] }: who may wake this server while it sleeps (auto_start).",
    )
    max_players: int = Field(
        default=0,
        ge=0,
        le=MAX_PLAYER_COUNT,
        description="Players logged in at once through this proxy; a login past it reads "
        "`server_full_message`. 0: no limit. Also the server list's maximum unless "
        "motds.online sets one.",
    )
    ports: tuple[PortMapping, ...] = Field(
        default=(),
        description="Ports forwarded as they are, without reading a name: "
        "'25575/tcp', '9000-9010:8000-8010/tcp' (by offset), '19132/udp'; a port without a "
        "target maps to the same number on each backend address's host.",
    )
    sleeping: bool = Field(
        default=False,
        description="Set by the provider: the server is stopped and waits for auto_start "
        "(it then has no address).",
    )
    held_back: tuple[HeldBack, ...] = Field(
        default=(),
        description="Set by the provider: replicas of the pool that take no connection "
        "(a Docker HEALTHCHECK starting or unhealthy); shown by the API, never dialed.",
    )

    @field_validator("domains", mode="before")
    @classmethod
    def _domains(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            return value
        seen: dict[str, None] = {}
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"expected a domain string, got {item!r}")
            seen[normalize_domain(item)] = None
        return tuple(seen)

    @field_validator("addresses", mode="before")
    @classmethod
    def _addresses(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            return value
        return tuple(_backend_address(item) for item in value)

    @field_validator("balance", mode="before")
    @classmethod
    def _balance(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip().lower().replace("-", "_")
        accepted = ", ".join(f"'{b.value}'" for b in Balance)
        if text not in Balance._value2member_map_:
            raise ValueError(f"unknown balance {value!r}; accepted: {accepted}")
        return Balance(text)

    @field_validator("proxy_mode", mode="before")
    @classmethod
    def _proxy_mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            mode = value.strip().lower().replace("-", "_")
            mode = {"zerocopy": "zero_copy", "serveronly": "server_only"}.get(mode, mode)
            mode = "client_only" if mode == "clientonly" else mode
            if mode in INTERCEPTED_PROXY_MODES:
                raise ValueError(f"proxy_mode {value!r}: {INTERCEPTED_REASON}")
            if mode not in FORWARDING_PROXY_MODES:
                raise ValueError(
                    f"unknown proxy_mode {value!r}; accepted: 'passthrough', or Infrarust's "
                    "'zero_copy' and 'server_only' (which forward the bytes the same)"
                )
            return ProxyMode.PASSTHROUGH
        return value

    @field_validator("auto_stop_after", "sticky_ttl", "status_cache_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        """The forms the Docker labels take (``600``, ``30s``, ``10m``, ``1h``), so a
        server file can say what a label says."""
        return label_duration(value, "seconds (600) or a duration such as 30s, 10m or 1h")

    @field_validator("ports", mode="before")
    @classmethod
    def _ports(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            return value
        return tuple(
            item if isinstance(item, PortMapping) else PortMapping.parse(str(item))
            for item in value
        )

    @field_validator("domain_rewrite", mode="before")
    @classmethod
    def _domain_rewrite(cls, value: Any) -> Any:
        accepted = (
            "expected 'backend' (the dialed address's host), 'from_backend' (the first "
            "address's host, as Infrarust), 'none', a host name such as 'mc.internal', or "
            "{ explicit = 'mc.internal' }"
        )
        if isinstance(value, Mapping):  # Infrarust's inline table: { explicit = "…" }
            if set(value) != {"explicit"} or not isinstance(value["explicit"], str):
                raise ValueError(f"invalid domain_rewrite {dict(value)!r}; {accepted}")
            value = value["explicit"]
            if value.strip().lower() in ("none", "false", DOMAIN_REWRITE_BACKEND, _FROM_BACKEND):
                raise ValueError(
                    f"invalid domain_rewrite {{ explicit = {value!r} }}: an explicit host "
                    f"name is expected there; {accepted}"
                )
        if value is None or not isinstance(value, str):
            return value
        text = value.strip().lower().rstrip(".")
        if not text or text in ("none", "false"):
            return None
        if text not in (DOMAIN_REWRITE_BACKEND, _FROM_BACKEND) and not _HOSTNAME_RE.match(text):
            raise ValueError(f"invalid domain_rewrite {value!r}; {accepted}")
        return text

    @model_validator(mode="after")
    def _from_backend(self) -> ServerDefinition:
        """Infrarust's ``from_backend``: the host of the first entry of ``addresses``."""
        if self.domain_rewrite != _FROM_BACKEND:
            return self
        if not self.addresses:
            raise ValueError("domain_rewrite 'from_backend' needs addresses (it uses the first)")
        object.__setattr__(self, "domain_rewrite", self.addresses[0].host.lower())
        return self

    @model_validator(mode="after")
    def _max_players_shown(self) -> ServerDefinition:
        """``max_players`` is the server list's maximum too, unless motds.online sets one."""
        online = self.motds.online
        if not self.max_players or (online is not None and online.max_players is not None):
            return self
        shown = (online or Motd()).model_copy(update={"max_players": self.max_players})
        object.__setattr__(self, "motds", self.motds.model_copy(update={"online": shown}))
        return self

    @model_validator(mode="after")
    def _checked_balance(self) -> ServerDefinition:
        check = self.health_check
        if self.balance is Balance.LOWEST_LATENCY and check is None:
            raise ValueError(
                "balance 'lowest_latency' needs health_check (the checks measure the "
                "latency), e.g. health_check = { type = 'tcp' }"
            )
        if self.balance is Balance.FEWEST_PLAYERS and (
            check is None or check.type is not CheckKind.MINECRAFT
        ):
            raise ValueError(
                "balance 'fewest_players' needs health_check = { type = 'minecraft' } "
                "(its status answers count the players)"
            )
        return self

    @model_validator(mode="after")
    def _routable(self) -> ServerDefinition:
        if not self.addresses and not self.sleeping and not self.held_back:
            raise ValueError("addresses: at least one address is required, e.g. ['10.0.0.5:25565']")
        if not self.domains and not self.default and not self.ports:
            raise ValueError(
                "a server needs at least one entry in 'domains', 'default = true' "
                "to be the catch-all, or 'ports' to forward"
            )
        return self
