"""``labels.md`` is generated: it must match what the code would generate now."""

from __future__ import annotations

import pytest

from discoproxy.cli import main
from providers.docker import labels_markdown
from tests.support import REPO


def test_labels_md_matches_the_generated_text() -> None:
    committed = (REPO / "labels.md").read_text(encoding="utf-8")
    # compared up to trailing newlines: print() adds one, a shell redirect keeps it
    assert committed.rstrip("\n") == labels_markdown().rstrip("\n"), (
        "labels.md is out of date; regenerate it: uv run discoproxy labels > labels.md"
    )


def test_discoproxy_labels_prints_labels_md(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["labels"])
    assert exit_.value.code == 0
    committed = (REPO / "labels.md").read_text(encoding="utf-8")
    assert capsys.readouterr().out.rstrip("\n") == committed.rstrip("\n")
