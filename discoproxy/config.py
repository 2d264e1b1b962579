"""Global proxy configuration: listeners, limits, timeouts, and how it is loaded.

Rules for this file:
- Every key has a default, so ``discoproxy serve`` runs with no file at all (the embedded
  default). Unknown keys are errors: a typo must not silently fall back to a default.
- Loading never exits or logs: it raises :class:`ConfigError`, whose message names the
  source (file and line when known), the field path and the accepted values. Only
  ``cli.py`` turns that into an exit code.
- The same document loader serves server files (``servers_dir/*.toml|yaml``).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tempfile
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from discoproxy.model import IpFilterSettings, PlayerLists, parse_networks
from discoproxy.motd import Motd

DEFAULT_PORT = 25565
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")

Seconds = Annotated[float, Field(ge=0)]


class ConfigError(Exception):
    """Raised when a config or server file cannot be read, parsed or validated.

    The message is complete and meant for an operator: source, field, seen value and
    accepted form. ``source`` is the file (or container) the error came from.
    """

    def __init__(self, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


def parse_bind(value: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``":port"`` (all interfaces) → (host, port)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid bind {value!r}; expected '[v6-address]:port'")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid bind {value!r}; expected 'host:port', e.g. '0.0.0.0:25565'")
        if ":" in host:
            raise ValueError(f"invalid bind {value!r}; write IPv6 addresses as '[::]:25565'")
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(
                f"invalid bind host {host!r} in {value!r}; expected an IP address"
            ) from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid bind port in {value!r}; expected 0-65535")
    return host, int(port_text)


class GlobalMotds(BaseModel):
    """What the server list shows when discoproxy answers for a server itself. ``{domain}``
    is the name the player used, ``{server}`` the server's display name (or id)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    unknown_domain: Motd = Field(
        default=Motd(version_name="discoproxy", protocol_version=-1),
        description="A name no server claims; text defaults to unknown_server_message.",
    )
    unreachable: Motd = Field(
        default=Motd(text="§c{server} is unreachable", version_name="offline", protocol_version=-1),
        description="A server whose backend does not answer.",
    )
    starting: Motd = Field(
        default=Motd(
            text="§e{server} is starting…\n§7try again in a few seconds", version_name="starting"
        ),
        description="A server being started (auto_start).",
    )
    sleeping: Motd = Field(
        default=Motd(text="§7{server} is sleeping\n§fjoin to wake it up", version_name="sleeping"),
        description="A stopped auto_start server: a login starts it.",
    )

    @field_validator("unknown_domain", "unreachable", "starting", "sleeping", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        """A ``[motds.<state>]`` table changes the fields it sets; the others keep their
        defaults (a down server keeps its "offline" version when only its text changes)."""
        if not isinstance(value, Mapping) or info.field_name is None:
            return value
        default = cls.model_fields[info.field_name].default
        assert isinstance(default, Motd)
        return {**default.model_dump(exclude_none=True), **value}


WEBHOOK_EVENTS = (
    "player_connected",
    "player_disconnected",
    "route_added",
    "route_removed",
    "backend_down",
    "backend_up",
    "server_woken",
    "server_stopped",
)


class WebhookSettings(BaseModel):
    """One receiver of events: each is POSTed to ``url`` as JSON, in order, off the data
    plane (a bounded queue; retries with backoff; dropped and counted when it stays down)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    url: str = Field(description="http:// or https:// address the events are POSTed to.")
    events: tuple[str, ...] = Field(
        default=WEBHOOK_EVENTS,
        description=f"Which events it receives; default all: {', '.join(WEBHOOK_EVENTS)}.",
    )
    secret: str | None = Field(
        default=None,
        description="Signs each body: header X-Discoproxy-Signature: sha256=<hex HMAC-SHA256 "
        "of the body with this secret>.",
    )
    timeout: float = Field(
        default=5.0, gt=0, le=60, description="Seconds one delivery attempt may take."
    )
    retries: int = Field(
        default=4, ge=0, le=20, description="Attempts after the first (backoff 0.5 s, doubling)."
    )
    queue: int = Field(
        default=1000, ge=1, le=100_000, description="Events waiting at most; more are dropped."
    )
    name: str | None = Field(
        default=None, description="Its label in metrics and logs; default: the URL's host:port."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        try:
            parts.port  # noqa: B018 (urlsplit checks the port only when asked)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for event in value if isinstance(value, list | tuple) else ():
            if event not in WEBHOOK_EVENTS:
                raise ValueError(f"unknown event {event!r}; accepted: {', '.join(WEBHOOK_EVENTS)}")
        return value

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname}:{port}"


class AdminSettings(BaseModel):
    """The admin listener: Prometheus ``/metrics``, the JSON API and the dashboard."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    listen: str = Field(
        default="127.0.0.1:8404",
        description="Address of the admin listener, 'host:port'; '' turns it off. Loopback "
        "by default: expose it with care (and a token).",
    )
    token: str = Field(
        default="",
        description="Bearer token every /metrics, /api and dashboard request must carry "
        "('Authorization: Bearer …'); '' = none. /healthz and /readyz stay open.",
    )
    token_file: Path | None = Field(
        default=None, description="File holding the token (e.g. a Docker secret); wins over token."
    )
    read_only: bool = Field(
        default=True,
        description="Refuse the API's write endpoints (POST /api/reload); false allows them.",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_bind(value)
        return value

    def bearer_token(self) -> str:
        """The token in force: ``token_file``'s content (stripped) or ``token``."""
        if self.token_file is not None:
            try:
                return self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"admin.token_file: cannot read {self.token_file}: {exc}"
                ) from exc
        return self.token


class RateLimitSettings(BaseModel):
    """New connections per client IP per ``window`` (GCRA: a burst of the full budget,
    then one every window/count); 0 turns a budget off."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    connections: int = Field(
        default=0, ge=0, description="Logins and every other connection, per IP per window."
    )
    status: int = Field(
        default=0, ge=0, description="Minecraft status pings, per IP per window (looser)."
    )
    window: float = Field(default=10.0, gt=0, description="Seconds the budgets are counted over.")


class ProxyConfig(BaseModel):
    """The global configuration (``discoproxy.toml``). Durations are in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    bind: tuple[str, ...] = Field(
        default=(f"0.0.0.0:{DEFAULT_PORT}",),
        description="Listen addresses, 'host:port' or '[v6]:port'; a string or a list.",
    )
    receive_proxy_protocol: bool = Field(
        default=False,
        description="Expect a PROXY v1/v2 header from trusted_proxies on every TCP "
        "connection (port routes too, read before the dial); UDP datagrams are judged by "
        "their own source address.",
    )
    # No default trust: a PROXY header sets the address ip_filter, bans and rate limits
    # judge, so trusting everyone must be written out (as Traefik wants trustedIPs or
    # an explicit insecure). Until issue 15 the default was ["0.0.0.0/0", "::/0"].
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(
        default=(),
        validate_default=True,
        description="CIDRs (or addresses) allowed to send a PROXY header; others are treated "
        "as direct clients. Required with receive_proxy_protocol; ['0.0.0.0/0', '::/0'] "
        "trusts all.",
    )
    connect_timeout: Seconds = Field(
        default=5.0,
        description="Per backend address dial; 0 = no deadline of discoproxy's own (the "
        "kernel's SYN retries end a dial that gets no answer, after about 2 minutes).",
    )
    handshake_timeout: Seconds = Field(
        default=5.0,
        description="Time a client has to send its PROXY header and handshake; 0 = never "
        "(a client that sends nothing holds its connection until it closes).",
    )
    idle_timeout: Seconds = Field(
        default=600.0, description="Close a connection silent both ways this long; 0 = never."
    )
    shutdown_timeout: Seconds = Field(
        default=30.0, description="On SIGTERM/SIGINT, how long open connections may finish."
    )
    max_connections: int = Field(
        default=20000,
        ge=0,
        description="Concurrent client connections; 0 = unlimited. Per worker process with "
        "workers above 1 (each process's descriptors), as HAProxy's per-process maxconn.",
    )
    max_connections_per_ip: int = Field(
        default=0, ge=0, description="Concurrent connections per client IP; 0 = unlimited."
    )
    ip_filter: IpFilterSettings = Field(
        default_factory=IpFilterSettings,
        description="Global allow/deny CIDRs on the real client address (after PROXY "
        "protocol): deny refuses, a non-empty allow refuses everything outside it.",
    )
    rate_limit: RateLimitSettings = Field(
        default_factory=RateLimitSettings,
        description="New connections per client IP per window: [rate_limit] connections, "
        "status, window.",
    )
    bans_file: Path = Field(
        default=Path("bans.json"),
        description="JSON file of bans (by IP/CIDR or username), re-read when it changes; "
        "managed with 'discoproxy ban'. A missing file means no bans.",
    )
    ban_message: str = Field(
        default="You are banned from this server: {reason}{until}",
        description="Disconnect text for a banned player ({reason}, {until}).",
    )
    rate_limited_message: str = Field(
        default="Too many connections from your address; wait a moment",
        description="Disconnect text for a login over its rate budget.",
    )
    not_allowed_message: str = Field(
        default="You may not join this server from your address",
        description="Disconnect text for a login a server's ip_filter refuses.",
    )
    players: PlayerLists = Field(
        default_factory=PlayerLists,
        description="Global allow/deny lists of usernames or offline UUIDs, checked at every "
        "Minecraft Login Start: deny refuses, a non-empty allow refuses every other player.",
    )
    player_not_allowed_message: str = Field(
        default="You are not allowed to join {server}",
        description="Disconnect text for a login the [players] lists refuse ({server}).",
    )
    server_full_message: str = Field(
        default="{server} is full ({max_players} players)",
        description="Disconnect text for a login past a server's max_players.",
    )
    wake_not_allowed_message: str = Field(
        default="{server} is asleep, and you may not wake it",
        description="Disconnect text for a login to a sleeping server its wake.allow omits.",
    )
    servers_dir: Path = Field(
        default=Path("servers"), description="Directory of server files (*.toml, *.yaml)."
    )
    unknown_server_message: str = Field(
        default="Unknown server: {domain}",
        description="Disconnect/status text for a name no server claims ({domain} is replaced).",
    )
    http_unmatched_status: int = Field(
        default=421,
        ge=400,
        le=599,
        description="HTTP status for a request whose Host no server claims (421 Misdirected "
        "Request by default; 404 is common too).",
    )
    fallbacks: dict[str, str] = Field(
        default_factory=dict,
        description="Per-listener catch-all: a bind address (as written in 'bind') → the "
        "qualified id ('id@provider') of the server that gets that listener's connections "
        "whose name matches no server (before the global default server).",
    )
    unreachable_message: str = Field(
        default="Server {server} is unreachable",
        description="Disconnect text for a login whose server does not answer.",
    )
    starting_message: str = Field(
        default="Server {server} is starting, try again in a few seconds",
        description="Disconnect text for a login that woke a stopped server (auto_start).",
    )
    auto_start_wait: Seconds = Field(
        default=0.0,
        description="How long a login that wakes a server is held, waiting for it to answer, "
        "before it gets the starting message; 0 = answer at once.",
    )
    status_cache_ttl: Seconds = Field(
        default=5.0,
        description="Seconds a server's status answer is served from cache (server files "
        "may override); 0 asks the backend on every ping (concurrent pings share one).",
    )
    status_stale_for: Seconds = Field(
        default=60.0,
        description="After a failed refresh, how long past its TTL a cached status is still "
        "served (marked stale in the logs); then the unreachable MOTD.",
    )
    status_timeout: Seconds = Field(
        default=3.0, description="How long a status ping to a backend may take."
    )
    workers: int = Field(
        default=0,
        ge=0,
        description="Data-plane processes accepting on the same listeners, each client IP "
        "always on the same one (per-IP limits hold); 0: one per CPU this process may run "
        "on; 1: one process, no workers. Takes effect at the next start.",
    )
    stall_timeout: float = Field(
        default=10.0,
        ge=0,
        description="Seconds a data plane may go without answering the liveness check "
        "(every second, through its loop and its reactor): a worker is then killed and "
        "started again, as a crashed one is (a stuck one would keep its clients' IPs "
        "waiting on it for good); one process fails /healthz until it answers again, "
        "for its orchestrator to restart it. 0: never.",
    )
    takeover_socket: Path | None = Field(
        default=None,
        description="Unix socket this process listens on (mode 0600) so that 'serve "
        "--take-over' with the same config takes its listening sockets over: no "
        "connection refused while it restarts; this one then drains and exits. Takes "
        "effect at the next start.",
    )
    port_routes_bind: str = Field(
        default="0.0.0.0",
        description="IP address the listeners of servers' port routes ('ports') bind; "
        "'::' for IPv6 and IPv4.",
    )
    udp_session_timeout: Seconds = Field(
        default=60.0, description="A UDP session (one client address) ends after this silence."
    )
    udp_max_sessions: int = Field(
        default=10000,
        ge=0,
        description="UDP sessions open at once; 0 = unlimited. Per worker process with "
        "workers above 1.",
    )
    udp_per_ip_packets_per_s: float = Field(
        default=0, ge=0, description="Datagrams per second one client IP may send; 0 = no limit."
    )
    udp_per_ip_bytes_per_s: float = Field(
        default=0, ge=0, description="Bytes per second one client IP may send; 0 = no limit."
    )
    recv_buffer_size: int = Field(
        default=0, ge=0, description="SO_RCVBUF of UDP sockets, bytes; 0 = the OS default."
    )
    send_buffer_size: int = Field(
        default=0, ge=0, description="SO_SNDBUF of UDP sockets, bytes; 0 = the OS default."
    )
    motds: GlobalMotds = Field(
        default_factory=GlobalMotds,
        description="Server-list answers: [motds.unknown_domain], [motds.unreachable], "
        "[motds.starting], [motds.sleeping].",
    )
    providers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-provider tables, e.g. [providers.docker]; see each provider's keys.",
    )
    admin: AdminSettings = Field(
        default_factory=AdminSettings,
        description="[admin] listen, token, token_file, read_only: metrics, API, dashboard.",
    )
    webhooks: tuple[WebhookSettings, ...] = Field(
        default=(),
        description="[[webhooks]] url, events, secret, timeout, retries, queue, name: "
        "receivers of player, route, backend and wake events (needs a restart to change).",
    )
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("bind", mode="before")
    @classmethod
    def _bind(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("at least one bind address is required")
            for item in value:
                parse_bind(str(item))
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _trusted_proxies(cls, value: Any) -> Any:
        """As ``ip_filter``'s lists: CIDRs or bare addresses, a list or one string; a bad
        entry is named with the accepted forms (pydantic's own message names neither)."""
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            return value
        return parse_networks(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies_named(
        cls, value: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], info: ValidationInfo
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        if info.data.get("receive_proxy_protocol") and not value:
            raise ValueError(
                "required when receive_proxy_protocol = true (got none): any client could "
                "otherwise send a PROXY header and forge its address past ip_filter, bans and "
                "rate limits; list the addresses of your load balancers, e.g. trusted_proxies "
                '= ["10.0.0.0/8"], or trust every address explicitly: trusted_proxies = '
                '["0.0.0.0/0", "::/0"]'
            )
        return value

    @field_validator("fallbacks")
    @classmethod
    def _fallbacks(cls, value: dict[str, str]) -> dict[str, str]:
        for bind, target in value.items():
            parse_bind(bind)
            if "@" not in target:
                raise ValueError(
                    f"fallback for {bind!r}: {target!r} is not a qualified id; expected "
                    "'server-id@provider', e.g. 'web@file' or 'site@docker'"
                )
        return value

    @model_validator(mode="after")
    def _fallbacks_name_binds(self) -> ProxyConfig:
        unknown = set(self.fallbacks) - set(self.bind)
        if unknown:
            raise ValueError(
                f"fallbacks: {sorted(unknown)[0]!r} is not one of the bind addresses "
                f"({', '.join(self.bind)})"
            )
        return self

    @field_validator("port_routes_bind")
    @classmethod
    def _port_routes_bind(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"expected an IP address such as '0.0.0.0' or '::', got {value!r}"
            ) from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def bind_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_bind(item) for item in self.bind)


def write_atomically(path: Path, text: str) -> None:
    """Replace *path* with *text* so a reader sees the old file or the new one, never half
    of one: a temp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def read_document(path: Path) -> dict[str, Any]:
    """Parse a TOML or YAML file into a mapping; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}", str(path)) from exc
    suffix = path.suffix.lower()
    data: Any
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}", str(path)) from exc
    elif suffix in (".yaml", ".yml"):
        import yaml  # here: a worker process imports this module, never a file (~2 MiB)

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError(f"{where}: invalid YAML: {problem}", str(path)) from exc
        if data is None:
            data = {}
    else:
        raise ConfigError(
            f"{path}: unsupported file type {suffix!r}; "
            f"expected one of {', '.join(CONFIG_SUFFIXES)}",
            str(path),
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of keys at the top level", str(path))
    return data


# A TOML table header: ``[a.b]``, ``[[a]]`` (an array of tables: one entry per header).
_TOML_HEADER = re.compile(r"^[ \t]*\[(\[?)[ \t]*([^\[\]#]+?)[ \t]*\]\]?[ \t]*(?:#.*)?$")
# A key line: TOML ``a.b = …`` (dotted keys) or YAML ``a: …`` / ``- a: …`` (indented).
_KEY_PART = r"(?:\"[^\"\n]*\"|'[^'\n]*'|[\w-]+)"
_KEY_LINE = re.compile(
    rf"^([ \t]*)(-[ \t]+)?({_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART})*)[ \t]*([=:])"
)


def _key_names(text: str, dotted: bool) -> tuple[str, ...]:
    if not dotted:
        return (text.strip("\"'"),)
    return tuple(a or b or c for a, b, c in re.findall(r"\"([^\"]*)\"|'([^']*)'|([\w-]+)", text))


def _line_of(text: str, loc: Sequence[str | int]) -> int | None:
    """Best-effort line of the key at *loc* (``("providers", "docker", "endpoint")``) in
    TOML or YAML text: the line of that key, else of the nearest enclosing one written
    (a ``[providers.docker]`` header, ``trusted_proxies = [...]`` for an entry of it)."""
    target = tuple(loc)
    table: tuple[str | int, ...] = ()  # TOML: the keys of the current [table]
    arrays: dict[tuple[str | int, ...], int] = {}  # TOML: [[name]] entries seen so far
    nested: list[tuple[int, str]] = []  # YAML: (indent, key) of the mappings around
    best, best_line = 0, None
    for number, line in enumerate(text.splitlines(), 1):
        header = _TOML_HEADER.match(line)
        if header:
            table = _key_names(header[2], dotted=True)
            if header[1]:  # [[name]]: its index among the entries of that array
                index = arrays[table] = arrays.get(table, -1) + 1
                table = (*table, index)
            nested = []
            keys = table
        else:
            match = _KEY_LINE.match(line)
            if match is None:
                continue
            if match[4] == "=":
                keys = (*table, *_key_names(match[3], dotted=True))
            else:
                indent = len(match[1]) + len(match[2] or "")
                while nested and nested[-1][0] >= indent:
                    nested.pop()
                nested.append((indent, _key_names(match[3], dotted=False)[0]))
                keys = tuple(key for _, key in nested)
        if best < len(keys) <= len(target) and target[: len(keys)] == keys:
            best, best_line = len(keys), number
    return best_line


def _set_by(environment: Mapping[str, Any], loc: Sequence[str | int]) -> bool:
    """Whether the ``DISCOPROXY_*`` overrides set the value at *loc* (or one around it)."""
    node: Any = environment
    for part in loc:
        if not isinstance(node, Mapping):
            return True  # a whole value (a list, a table) set over the file's
        if str(part) not in node:
            return False
        node = node[str(part)]
    return bool(loc)


def locate(
    source: str,
    text: str | None,
    loc: Sequence[str | int],
    environment: Mapping[str, Any] | None = None,
) -> str:
    """Where the key at *loc* was written: ``file:line`` (``file`` when the line is not
    found), or ``environment`` when the ``DISCOPROXY_*`` overrides set it."""
    if environment and _set_by(environment, loc):
        return "environment"
    line = _line_of(text, loc) if text is not None and loc else None
    return f"{source}:{line}" if line else source


# pydantic's texts for a value of the wrong type name a Python type, not the accepted
# form: "Input should be a valid boolean, unable to interpret input" for "maybe".
_EXPECTED_BY_TYPE = {
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "path_type": "expected a path, as a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "set_type": "expected a list",
    "frozen_set_type": "expected a list",
    "dict_type": "expected a table of keys",
    "model_type": "expected a table of keys",
}


def _kinds(annotation: Any) -> list[Any]:
    """The types a value of *annotation* may have: ``Annotated`` and unions opened."""
    if get_origin(annotation) is Annotated:
        return _kinds(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [kind for arg in get_args(annotation) for kind in _kinds(arg)]
    return [annotation]


def _inside(kind: Any, part: str | int) -> list[Any]:
    """The types of the value at key or index *part* of a value of type *kind*."""
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        for name, field in kind.model_fields.items():
            if part in (name, field.alias, field.validation_alias):
                return _kinds(field.annotation)
        return []
    origin, args = get_origin(kind), get_args(kind)
    if origin in (dict, Mapping) and len(args) == 2 and isinstance(part, str):
        return _kinds(args[1])
    if origin in (tuple, list, set, frozenset, Sequence) and args and isinstance(part, int):
        if origin is tuple and args[-1] is not Ellipsis:  # tuple[A, B]: one type a place
            return _kinds(args[part]) if part < len(args) else []
        return _kinds(args[0])
    return []


def _keys_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The keys of the table at *loc* in a document *model* validates: those of the
    model that validates that table (``()``: *model*'s own); none when no model does."""
    kinds: list[Any] = [model]
    for part in loc:
        # in a union of a model and another type (``bool | HealthCheck``) pydantic's loc
        # names the member it tried
        named = [kind for kind in kinds if getattr(kind, "__name__", None) == part]
        kinds = named or [inner for kind in kinds for inner in _inside(kind, part)]
    return [
        name
        for kind in kinds
        if isinstance(kind, type) and issubclass(kind, BaseModel)
        for name in kind.model_fields
    ]


def describe_validation_error(
    exc: ValidationError,
    source: str,
    text: str | None = None,
    at: Sequence[str] = (),
    model: type[BaseModel] | None = None,
    environment: Mapping[str, Any] | None = None,
) -> str:
    """One line per problem: ``source[:line]: field: message (got value)``.

    *text* is the source's content (for the line); *at* the keys the validated table
    sits under (``("providers", "docker")``); *model* the model validated, whose keys
    (those of the nested model holding it, for a key of a nested table) an unknown key
    is matched against; *environment* the ``DISCOPROXY_*`` overrides merged over the
    file: a key they set is said to come from ``environment``.
    """
    lines = []
    for error in exc.errors(include_url=False):
        loc = (*at, *error["loc"])
        where = locate(source, text, loc, environment)
        if not error["loc"] and environment and (not at or _set_by(environment, at)):
            where = f"{source} + environment"  # a check of several keys, set in both
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
            keys = _keys_at(model, error["loc"][:-1]) if model is not None else []
            close = difflib.get_close_matches(str(error["loc"][-1]), keys, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        elif error["type"] in _EXPECTED_BY_TYPE:
            message = _EXPECTED_BY_TYPE[error["type"]]
        field = ".".join(str(part) for part in loc) or "(top level)"
        got = error.get("input")
        shown = (
            ""
            if error["type"] in ("extra_forbidden", "missing") or "got " in message
            else (f" (got {got!r})" if not isinstance(got, Mapping) else "")
        )
        lines.append(f"{where}: {field}: {message}{shown}")
    return "\n".join(lines)


def source_text(path: Path) -> str | None:
    """*path*'s text, for the lines of error messages; None when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


Model = TypeVar("Model", bound=BaseModel)


def validate_document(model: type[Model], data: Mapping[str, Any], path: Path) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message = describe_validation_error(exc, str(path), source_text(path), model=model)
        raise ConfigError(message, str(path)) from exc


ENV_PREFIX = "DISCOPROXY_"
# DISCOPROXY_* variables that are not config keys (read by the CLI itself)
ENV_NOT_KEYS = frozenset({"DISCOPROXY_CONFIG", "DISCOPROXY_ADMIN_URL", "DISCOPROXY_ADMIN_TOKEN"})


def _env_value(text: str) -> Any:
    """A TOML value when the text is one (``true``, ``30``, ``["a", "b"]``), else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``DISCOPROXY_<KEY>`` (``__`` between nested keys) → a mapping over the file's keys.

    ``DISCOPROXY_BIND=0.0.0.0:25565``, ``DISCOPROXY_ADMIN__LISTEN=0.0.0.0:8404``,
    ``DISCOPROXY_IDLE_TIMEOUT=300``. An unknown name is an error naming the variable.
    """
    overrides: dict[str, Any] = {}
    fields = ProxyConfig.model_fields
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in fields:
            close = difflib.get_close_matches(path[0], list(fields), n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""
            raise ConfigError(f"environment variable {name}: no config key {path[0]!r}{hint}")
        target = overrides
        for key in path[:-1]:
            nested = target.setdefault(key, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"environment variable {name}: {key!r} is not a table")
            target = nested
        target[path[-1]] = _env_value(text)
    return overrides


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """Load the global config: the file (``None``: the embedded default), then the
    ``DISCOPROXY_*`` variables of ``environ`` over it."""
    overrides = environment_overrides(environ) if environ else {}
    if path is None and not overrides:
        return ProxyConfig()
    data = read_document(path) if path is not None else {}
    if not overrides:
        assert path is not None
        return validate_document(ProxyConfig, data, path)
    try:
        return ProxyConfig.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        if path is None:
            message = describe_validation_error(exc, "environment", model=ProxyConfig)
        else:  # each key named where it was set: the file (with its line) or the variables
            message = describe_validation_error(
                exc, str(path), source_text(path), model=ProxyConfig, environment=overrides
            )
        raise ConfigError(message, str(path) if path else None) from exc
