"""Backend host names resolved recently, so a connection does not wait on the resolver.

Rules for this file:
- Used by the reactor thread only (no lock). A name's addresses are kept ``NAME_TTL_S``;
  a failure for ``NAME_FAILURE_TTL_S`` (a resolver that is down must not get one lookup
  per connection); a connection that cannot reach an address it was given forgets the
  name, so a container that came back elsewhere is looked up again at once.
- One resolution in flight per name: a caller that :meth:`NameCache.start_resolving`
  refuses waits for the one under way (UDP drops the datagram: the client resends), so a
  flood of datagrams or connections to a name cannot queue lookups on the resolver's
  thread pool; :meth:`NameCache.put` ends it.
- Bounded: past ``MAX_NAMES`` entries the cache starts over; names in flight are at most
  the routes' host names.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from discoproxy.owners import REACTOR, owned_by

# (family, ip, port, the name it came from)
Resolved = tuple[socket.AddressFamily, str, int, str]

NAME_TTL_S = 5.0
NAME_FAILURE_TTL_S = 1.0
MAX_NAMES = 4096


def resolved_addresses(infos: list[tuple[Any, ...]], host: str, port: int) -> tuple[Resolved, ...]:
    """getaddrinfo's answer for ``host`` as cache entries, in order, without repeats."""
    resolved: list[Resolved] = []
    for family, _, _, _, sockaddr in infos:
        entry = (socket.AddressFamily(family), str(sockaddr[0]), port, host)
        if entry not in resolved:
            resolved.append(entry)
    return tuple(resolved)


class CachedName(NamedTuple):
    expires: float
    addresses: tuple[Resolved, ...]
    error: str


@owned_by(REACTOR)
class NameCache:
    """``(host, port)`` → what resolving it gave, until it expires (on ``clock``, by
    default ``time.monotonic``)."""

    __slots__ = ("_clock", "_entries", "_resolving")

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._entries: dict[tuple[str, int], CachedName] = {}
        self._resolving: set[tuple[str, int]] = set()

    def get(self, host: str, port: int) -> CachedName | None:
        entry = self._entries.get((host, port))
        if entry is None or entry.expires < self._clock():
            return None
        return entry

    def start_resolving(self, host: str, port: int) -> bool:
        """True if no resolution of ``(host, port)`` is in flight: the caller starts one
        and ends it with :meth:`put`. False: one is under way already."""
        key = (host, port)
        if key in self._resolving:
            return False
        self._resolving.add(key)
        return True

    def put(self, host: str, port: int, addresses: tuple[Resolved, ...], error: str) -> None:
        self._resolving.discard((host, port))
        if len(self._entries) >= MAX_NAMES:
            self._entries.clear()
        ttl = NAME_TTL_S if addresses else NAME_FAILURE_TTL_S
        self._entries[(host, port)] = CachedName(self._clock() + ttl, addresses, error)

    def forget(self, host: str, port: int) -> None:
        self._entries.pop((host, port), None)
