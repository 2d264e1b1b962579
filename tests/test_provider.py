"""The provider API's offline read (``check``, ``routes --offline``) with scripted providers."""

from __future__ import annotations

from typing import Any, ClassVar

import anyio
import pytest

from discoproxy.config import ProxyConfig
from discoproxy.model import ServerDefinition
from discoproxy.provider import (
    LoadResult,
    LoadsOnce,
    Provider,
    ProviderSettings,
    Publish,
    snapshot_once,
)

pytestmark = pytest.mark.anyio

MC = ServerDefinition.model_validate(
    {"id": "mc", "domains": ["mc.example.com"], "addresses": ["10.0.0.5"]}
)


class RunOnly:
    """A third-party provider with no ``load_once``: publishes, or fails, from ``run``."""

    Settings: ClassVar[type[ProviderSettings]] = ProviderSettings

    def __init__(self, name: str, settings: Any, config: ProxyConfig) -> None:
        self.name = name
        self.publishes = True
        self.fails: Exception | None = None
        self.runs = 0

    async def available(self) -> bool:
        return True

    def unavailable_reason(self) -> str:
        return ""

    async def run(self, publish: Publish) -> None:
        self.runs += 1
        if self.fails is not None:
            raise self.fails
        if self.publishes:
            publish([MC])
        await anyio.sleep_forever()


class Offline(RunOnly):
    async def load_once(self) -> LoadResult:
        return LoadResult((MC,), errors=("item x: bad",), source="somewhere")


def provider(cls: type[RunOnly]) -> RunOnly:
    made = cls("scripted", ProviderSettings(), ProxyConfig())
    assert isinstance(made, Provider)
    return made


async def test_snapshot_once_asks_load_once_and_does_not_run_the_provider() -> None:
    scripted = provider(Offline)
    assert isinstance(scripted, LoadsOnce)
    result = await snapshot_once(scripted, wait_s=5)
    assert result == LoadResult((MC,), errors=("item x: bad",), source="somewhere")
    assert scripted.runs == 0


async def test_snapshot_once_runs_a_provider_without_load_once_until_it_publishes() -> None:
    scripted = provider(RunOnly)
    assert not isinstance(scripted, LoadsOnce)
    with anyio.fail_after(5):
        assert await snapshot_once(scripted, wait_s=5) == LoadResult((MC,))


async def test_snapshot_once_raises_what_the_provider_raised() -> None:
    scripted = provider(RunOnly)
    scripted.fails = ConnectionRefusedError("no source at x")
    with pytest.raises(ConnectionRefusedError, match="no source at x"):
        await snapshot_once(scripted, wait_s=5)


async def test_snapshot_once_warns_when_nothing_is_published_within_the_wait() -> None:
    scripted = provider(RunOnly)
    scripted.publishes = False
    result = await snapshot_once(scripted, wait_s=0.05)
    assert result == LoadResult((), warnings=("provider scripted: no routes within 0.05s",))


class Stuck(RunOnly):
    async def load_once(self) -> LoadResult:
        await anyio.sleep_forever()
        raise AssertionError


async def test_snapshot_once_gives_up_on_a_load_once_that_does_not_answer() -> None:
    with pytest.raises(TimeoutError, match=r"no answer within 0\.05s"):
        await snapshot_once(provider(Stuck), wait_s=0.05)
