"""Guard: IP filters, per-IP limits and bans — who may connect, decided cheaply.

Rules for this file:
- Everything is decided on the *real* client address: after a PROXY header from a
  trusted proxy, never before. IPv4-mapped IPv6 addresses count as IPv4.
- Precedence, in the order a connection meets them (the first that refuses wins):
  1. global ``[ip_filter]``: ``deny`` refuses; with a non-empty ``allow``, an address
     outside it is refused (deny wins over allow);
  2. ``max_connections_per_ip`` (connections open at once);
  3. bans by IP or CIDR, then the per-IP rate budget: status pings spend
     ``[rate_limit] status``, everything else ``connections``;
  4. once routed, the server's own ``[ip_filter]`` (deny, then allow) — it can narrow the
     global filter, never widen it;
  5. for a Minecraft login, a ban of the username in Login Start.
  Steps 1-2 happen right after accept (a refused client is closed without a reply);
  3-5 after the handshake, so a Minecraft player reads why (a Disconnect with the reason).
  UDP meets the same steps in the same order through the same functions
  (:func:`global_refusal`, :func:`routed_refusal`), without the TCP-only ones (2, the
  connection budget of 3, and 5).
- Per-IP state is bounded: open-connection counts live only while connections are open,
  rate state is kept for the :data:`MAX_TRACKED_IPS` most recently seen addresses (the
  least recently seen are forgotten), so a flood of distinct addresses costs bounded
  memory.
- Bans live in a JSON file written atomically (temp file + rename) and re-read when it
  changes; expired bans are ignored (and dropped on the next write).
- Nothing here logs per connection: callers count and log rejections, rate-limited.
"""

from __future__ import annotations

import collections
import datetime
import fcntl
import ipaddress
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from discoproxy.config import write_atomically
from discoproxy.model import IpFilterSettings, parse_networks
from discoproxy.owners import REACTOR, owned_by
from discoproxy.rejections import Rejection

if TYPE_CHECKING:
    from discoproxy.config import ProxyConfig

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Client addresses whose rate state is kept; beyond it the least recently seen goes.
MAX_TRACKED_IPS = 65536
BANS_FILE_VERSION = 1
MAX_USERNAME_CHARS = 16


def client_ip(host: str) -> IpAddress | None:
    """``host`` as an address, IPv4-mapped IPv6 unwrapped; None if it is not one."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _contains(networks: Sequence[IpNetwork], ip: IpAddress) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


def filter_refusal(settings: IpFilterSettings, ip: IpAddress) -> str | None:
    """Why ``settings`` refuses ``ip`` ("denied by ip_filter", "not in ip_filter allow"),
    or None: deny wins, and a non-empty allow refuses everything outside it."""
    if settings.deny and _contains(settings.deny, ip):
        return "denied by ip_filter"
    if settings.allow and not _contains(settings.allow, ip):
        return "not in ip_filter allow"
    return None


@owned_by(REACTOR)
class Guard:
    """The proxy's guard state: global filter, per-IP counts and budgets, the bans.

    Owned by the reactor thread: :meth:`configure` runs there on a reload and
    :meth:`set_bans` is posted there by the bans watcher, so ``idle`` has one writer.
    ``idle`` is true when no global setting is configured and no ban exists; the data
    plane then skips the global checks with one attribute test. A server's own
    ``ip_filter`` is not part of it: it travels with the route in the routing table and
    is checked whenever the route carries one, so a table swap can never skip it."""

    def __init__(self, config: ProxyConfig) -> None:
        self.open_per_ip: dict[str, int] = {}
        self.bans = BanList()
        self._rate_limit = config.rate_limit
        self.connections = RateLimiter(config.rate_limit.connections, config.rate_limit.window)
        self.status = RateLimiter(config.rate_limit.status, config.rate_limit.window)
        self.configure(config)

    def configure(self, config: ProxyConfig) -> None:
        """Take the global settings of ``config`` (at start and on a reload). Open
        connections stay counted; rate budgets restart only when their settings changed."""
        self.filter = config.ip_filter
        self.max_per_ip = config.max_connections_per_ip
        if config.rate_limit != self._rate_limit:
            self._rate_limit = config.rate_limit
            window = config.rate_limit.window
            self.connections = RateLimiter(config.rate_limit.connections, window)
            self.status = RateLimiter(config.rate_limit.status, window)
        self._configured = bool(self.filter or self.max_per_ip or self.connections or self.status)
        self._update()

    def set_bans(self, bans: BanList) -> None:
        """Swap in a new ban list (reactor thread)."""
        self.bans = bans
        self._update()

    def _update(self) -> None:
        self.idle = not (self._configured or len(self.bans))

    def opened(self, key: str) -> bool:
        """Count a connection from ``key``; False if it is over ``max_connections_per_ip``."""
        count = self.open_per_ip.get(key, 0)
        if count >= self.max_per_ip:
            return False
        self.open_per_ip[key] = count + 1
        return True

    def closed(self, key: str) -> None:
        count = self.open_per_ip.get(key, 1) - 1
        if count > 0:
            self.open_per_ip[key] = count
        else:
            self.open_per_ip.pop(key, None)


# The guard's causes of refusal (metric labels: discoproxy/rejections.py holds them all).
RATE_LIMITED = (Rejection.RATE_LIMIT_CONNECTIONS, Rejection.RATE_LIMIT_STATUS)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A guard step refused a client: ``cause`` is its fixed metric label, ``reason``
    says why for the log and the close line (it may name the route or the ban)."""

    cause: Rejection
    reason: str
    ban: Ban | None = None


def global_refusal(guard: Guard, ip: IpAddress) -> Refusal | None:
    """Step 1 of the precedence: the global ``[ip_filter]``."""
    why = filter_refusal(guard.filter, ip) if guard.filter else None
    return Refusal(Rejection(why), why) if why is not None else None


def routed_refusal(
    guard: Guard,
    ip: IpAddress,
    server_filter: IpFilterSettings | None,
    route_id: str,
    budget: RateLimiter | None,
) -> Refusal | None:
    """Steps 3-4 of the precedence, in order, once a connection has its route: bans by
    IP, the per-IP rate ``budget`` (None: none applies, as for UDP, which has its own
    datagram limits), then the server's own ``ip_filter``. Checked whatever the global
    state: the server filter travels with the route."""
    if guard.bans:
        ban = guard.bans.ip_ban(ip)
        if ban is not None:
            return Refusal(Rejection.BANNED, f"banned ({ban.target})", ban)
    if budget and not budget.allow(str(ip)):
        cause = RATE_LIMITED[budget is guard.status]
        return Refusal(cause, str(cause))
    if server_filter:
        why = filter_refusal(server_filter, ip)
        if why is not None:
            return Refusal(Rejection.SERVER_IP_FILTER, f"{route_id}: {why}")
    return None


@owned_by(REACTOR)
class RateLimiter:
    """GCRA per client IP: ``count`` new connections per ``window`` seconds, with a
    burst of ``count``; state bounded to :data:`MAX_TRACKED_IPS` addresses."""

    def __init__(self, count: int, window: float) -> None:
        self.count = count
        self.window = window
        self._interval = window / count if count else 0.0
        self._tat: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __bool__(self) -> bool:
        return self.count > 0

    def __len__(self) -> int:
        return len(self._tat)

    def allow(self, ip: str, now: float | None = None) -> bool:
        if not self.count:
            return True
        now = time.monotonic() if now is None else now
        tats = self._tat
        tat = tats.get(ip)
        if tat is None:
            if len(tats) >= MAX_TRACKED_IPS:
                tats.popitem(last=False)
            tat = now
        else:
            tats.move_to_end(ip)
            tat = max(tat, now)
        if tat - now > self.window - self._interval + 1e-9:
            tats[ip] = tat
            return False
        tats[ip] = tat + self._interval
        return True


# -- bans -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ban:
    """One ban: an address or network, or a Minecraft username (case-insensitive)."""

    reason: str
    created: float  # unix time
    expires: float | None = None  # unix time; None = never
    network: IpNetwork | None = None
    username: str | None = None

    @property
    def target(self) -> str:
        return str(self.network) if self.network is not None else f"user {self.username}"

    def active(self, now: float) -> bool:
        return self.expires is None or now < self.expires

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"reason": self.reason, "created": _iso(self.created)}
        if self.network is not None:
            entry["ip"] = str(self.network)
        if self.username is not None:
            entry["username"] = self.username
        entry["expires"] = _iso(self.expires) if self.expires is not None else None
        return entry

    @classmethod
    def from_json(cls, entry: Any, where: str) -> Ban:
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with 'ip' or 'username'")
        unknown = set(entry) - {"ip", "username", "reason", "created", "expires"}
        if unknown:
            raise ValueError(
                f"{where}: unknown key {sorted(unknown)[0]!r}; "
                "accepted: ip, username, reason, created, expires"
            )
        ip, username = entry.get("ip"), entry.get("username")
        if (ip is None) == (username is None):
            raise ValueError(f"{where}: expected exactly one of 'ip' or 'username'")
        network = parse_networks([ip], f"{where}.ip")[0] if ip is not None else None
        if username is not None:
            username = check_username(str(username), f"{where}.username")
        return cls(
            reason=str(entry.get("reason") or ""),
            created=_parse_time(entry.get("created"), f"{where}.created") or time.time(),
            expires=_parse_time(entry.get("expires"), f"{where}.expires"),
            network=network,
            username=username,
        )


def check_username(name: str, field: str = "username") -> str:
    if not 1 <= len(name) <= MAX_USERNAME_CHARS or not all(
        c.isascii() and (c.isalnum() or c == "_") for c in name
    ):
        raise ValueError(
            f"{field}: invalid Minecraft username {name!r}; expected 1-16 letters, digits or _"
        )
    return name


def _iso(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="seconds")


def _parse_time(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(
            f"{where}: invalid time {value!r}; expected ISO 8601 like 2026-12-01T12:00:00+00:00"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


class BanList:
    """An immutable set of bans, with fast lookups; see :func:`load_bans`."""

    def __init__(self, bans: Sequence[Ban] = ()) -> None:
        self.bans = tuple(bans)
        self._networks = [b for b in self.bans if b.network is not None]
        self._users = {b.username.lower(): b for b in self.bans if b.username is not None}

    def __len__(self) -> int:
        return len(self.bans)

    @property
    def has_usernames(self) -> bool:
        return bool(self._users)

    def ip_ban(self, ip: IpAddress, now: float | None = None) -> Ban | None:
        if not self._networks:
            return None
        now = time.time() if now is None else now
        for ban in self._networks:
            network = ban.network
            assert network is not None
            if ip.version == network.version and ip in network and ban.active(now):
                return ban
        return None

    def user_ban(self, username: str, now: float | None = None) -> Ban | None:
        ban = self._users.get(username.lower())
        if ban is None or not ban.active(time.time() if now is None else now):
            return None
        return ban


def load_bans(path: Path) -> BanList:
    """Read the bans file; a missing file is an empty list. Raises ValueError naming the
    file and the entry when it does not parse."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return BanList()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not text.strip():
        return BanList()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    entries = document.get("bans") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{path}: expected {{"version": 1, "bans": [...]}}')
    return BanList([Ban.from_json(e, f"{path}: bans[{i}]") for i, e in enumerate(entries)])


@contextmanager
def bans_locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of the bans file: instances sharing
    it (one path on a shared volume) may run ``discoproxy ban`` at once, and neither may
    lose the other's ban. The lock is a file beside it, ``.<name>.lock``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ban_target(text: str) -> tuple[IpNetwork | None, str | None]:
    """(network, None) for an address or CIDR, (None, username) otherwise; ValueError
    for neither."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False), None
    except ValueError:
        return None, check_username(text.strip(), "target")


def same_target(ban: Ban, network: IpNetwork | None, username: str | None) -> bool:
    if username is not None:
        return ban.username is not None and ban.username.lower() == username.lower()
    return bool(ban.network == network)


def edit_bans(
    path: Path,
    change: Callable[[list[Ban], int], list[Ban]],
    network: IpNetwork | None,
    username: str | None,
) -> BanList:
    """Read-modify-write the bans file under its lock (instances sharing it may edit it
    at once, and neither may lose the other's ban): ``change(the bans on other targets,
    how many were on this one)`` gives the new list, or raises ValueError to write
    nothing. The list written; ValueError for a file that does not load."""
    with bans_locked(path):
        bans = load_bans(path)
        kept = [b for b in bans.bans if not same_target(b, network, username)]
        written = BanList(change(kept, len(bans.bans) - len(kept)))
        save_bans(path, written)
    return written


def save_bans(path: Path, bans: BanList) -> None:
    """Write atomically (temp file in the same directory, fsync, rename); expired bans
    are left out."""
    now = time.time()
    document = {
        "version": BANS_FILE_VERSION,
        "bans": [ban.to_json() for ban in bans.bans if ban.active(now)],
    }
    write_atomically(path, json.dumps(document, indent=2) + "\n")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``7d`` → seconds."""
    value = text.strip().lower()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    factor = units.get(value[-1:])
    number = value[:-1] if factor is not None else value
    try:
        seconds = float(number) * (factor or 1.0)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}; expected e.g. 90, 30m, 12h or 7d") from None
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}; expected more than 0")
    return seconds
