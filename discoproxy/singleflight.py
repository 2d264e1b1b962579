"""One run of a piece of work per key at a time, shared by every caller that asks for it
meanwhile (the status refresh of one server, the start of one stopped server).

Rules for this file:
- No task of its own: the first caller runs the work itself, shielded so that its own
  cancellation cannot cut the others' answer short; the work must carry its own deadline
  (a status ping runs under ``status_timeout``). Later callers wait for the result, and
  may be cancelled while they wait. Nothing outlives the callers.
- Loop thread only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Run(Generic[T]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[K, T]):
    """Shares one in-flight run of ``work`` per key."""

    def __init__(self) -> None:
        self._runs: dict[K, _Run[T]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._runs

    def keys(self) -> list[K]:
        return list(self._runs)

    async def run(self, key: K, work: Callable[[], Awaitable[T]]) -> T:
        run = self._runs.get(key)
        if run is not None:
            await run.done.wait()
            if run.error is not None:
                raise run.error
            return run.result  # type: ignore[return-value]  # set whenever error is not
        run = self._runs[key] = _Run()
        try:
            with anyio.CancelScope(shield=True):
                result = await work()
            run.result = result
            return result
        except BaseException as exc:
            run.error = exc
            raise
        finally:
            del self._runs[key]
            run.done.set()
