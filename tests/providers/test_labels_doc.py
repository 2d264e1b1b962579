"""``labels.md`` is generated: it must match what the code would generate now."""

from __future__ import annotations

from providers.docker import labels_markdown
from tests.support import REPO


def test_labels_md_matches_the_generated_text() -> None:
    committed = (REPO / "labels.md").read_text(encoding="utf-8")
    # compared up to trailing newlines: print() adds one, a shell redirect keeps it
    assert committed.rstrip("\n") == labels_markdown().rstrip("\n"), (
        "labels.md is out of date; regenerate it: uv run discoproxy labels --markdown > labels.md"
    )
