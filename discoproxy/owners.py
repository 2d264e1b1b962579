"""Which thread owns each piece of mutable state, said once, in code.

Rules for this file:
- The data plane (connections, listeners, relays, counters, the guard, the name cache)
  is owned by the reactor thread; the control plane (registry, providers, status service,
  waker, admin, TLS certificates, listener bookkeeping) by the asyncio loop. A class is
  marked with :func:`owned_by`; a method that runs on the other side, or on either, is
  marked :func:`on_reactor`, :func:`on_loop` or :func:`any_thread`.
- The marks cost nothing at run time (an attribute on the function). ``tests/
  test_ownership.py`` runs the proxy under a profiler and fails when a marked function
  runs on a thread that does not own it, so a comment can no longer drift from the code.
- Crossing happens through ``proxy/planes.py`` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal, TypeVar

Owner = Literal["reactor", "loop", "any"]
REACTOR: Owner = "reactor"
LOOP: Owner = "loop"
ANY: Owner = "any"

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

# every class marked with owned_by, for the ownership test
OWNED: list[type] = []


def _mark(owner: Owner) -> Callable[[F], F]:
    def mark(fn: F) -> F:
        fn.__owner__ = owner  # type: ignore[attr-defined]
        return fn

    return mark


on_reactor = _mark(REACTOR)
on_loop = _mark(LOOP)
any_thread = _mark(ANY)


def owned_by(owner: Owner) -> Callable[[C], C]:
    """Mark every method of the class that has no mark of its own as run by ``owner``'s
    thread (``__init__`` excepted: objects are built before they are handed over)."""

    def mark(cls: C) -> C:
        for name, value in vars(cls).items():
            fn: Any = value.fget if isinstance(value, property) else value
            if callable(fn) and name != "__init__" and not hasattr(fn, "__owner__"):
                with contextlib.suppress(AttributeError, TypeError):  # builtins, descriptors
                    fn.__owner__ = owner
        cls.__owner__ = owner  # type: ignore[attr-defined]
        OWNED.append(cls)
        return cls

    return mark


def owner_of(fn: Any) -> Owner | None:
    return getattr(fn, "__owner__", None)
