from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile("ci", max_examples=500, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    """asyncio, as ``discoproxy serve`` runs it (the data plane has its own reactor)."""
    return ("asyncio", {})
