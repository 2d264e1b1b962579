"""Fuzz the protocol parsers: every Hypothesis property test in ``tests/protocol/``, with
far more examples than the test suite gives them, for a time budget (issue 7).

    uv run python -m bench.fuzz                     # 10 minutes
    uv run python -m bench.fuzz --minutes 1         # a quick look
    uv run python -m bench.fuzz -k minecraft        # a subset (pytest -k expression)
    uv run python -m bench.fuzz --seed 1234         # a reproducible run

The tests run under pytest in this process, with this module's :class:`FuzzPlugin`:

- only Hypothesis tests are collected (the suite's example-based tests are deselected),
  with no deadline and no health checks;
- the budget is shared out as the run goes: a test gets ``time left / tests left``, and
  what a test does not use goes to the ones after it;
- a test runs in rounds until its share is spent: one Hypothesis run of
  ``ROUND_S`` seconds' worth of examples (measured on the round before), then another
  with a fresh seed. Hypothesis has no time limit of its own, and stopping a run from
  inside the test confuses its record of the choices made (``FlakyStrategyDefinition``
  for tests drawing with ``st.data()``), so a run is never interrupted;
- a round's size is set by replacing the test's settings object (the suite pins
  ``max_examples=300`` through ``tests/protocol/feed.py: PROPERTY``, which a profile
  cannot override; Hypothesis has no public setter for a test's settings), keeping the
  rest of it; examples are counted through the documented ``test.hypothesis.inner_test``.

A failure ends that test's rounds; Hypothesis shrinks it and prints the falsifying
example, with a ``@reproduce_failure`` blob and the round's seed. Failures are also stored
in Hypothesis's database (``.hypothesis/``), so the ordinary test run replays them on
this machine; each one found must become an explicit example test in
``tests/protocol/``. Exit status: pytest's (0 when nothing failed).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_TESTS = REPO / "tests" / "protocol"
DEFAULT_MINUTES = 10.0
# Examples per test at most; the time budget normally ends a test first.
DEFAULT_EXAMPLES = 10_000_000
# A Hypothesis run (round) lasts about this long; the first one measures the pace.
ROUND_S = 5.0
FIRST_ROUND_EXAMPLES = 100


@dataclass
class TestRun:
    nodeid: str
    examples: int = 0  # calls of the test body: generated, replayed and shrinking ones
    rounds: int = 0
    seconds: float = 0.0
    exhausted: bool = False  # Hypothesis ran out of distinct examples to try
    outcome: str = "not run"


class FuzzPlugin:
    """A pytest plugin object: select the property tests, size and time their rounds."""

    def __init__(self, budget_s: float, max_examples: int, seed: int | None = None) -> None:
        self.started = time.monotonic()
        self.end = self.started + budget_s
        self.max_examples = max_examples
        self.seed = seed
        self.runs: dict[str, TestRun] = {}
        self.current: TestRun | None = None

    # -- collection ----------------------------------------------------------------------

    @pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        keep, drop = [], []
        for item in items:
            test = getattr(item, "obj", None)
            if getattr(test, "is_hypothesis_test", False):
                if not getattr(test, "_fuzz_counted", False):  # parametrized: one function
                    test._fuzz_counted = True
                    test.hypothesis.inner_test = self._counted(test.hypothesis.inner_test)
                keep.append(item)
                self.runs[item.nodeid] = TestRun(item.nodeid)
            else:
                drop.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def _counted(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(inner)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.current is not None:
                self.current.examples += 1
            return inner(*args, **kwargs)

        return counted

    # -- running ---------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> bool | None:
        run = self.runs.get(pyfuncitem.nodeid)
        if run is None:
            return None  # pytest's own call
        # imported here, not at the top: pytest must import hypothesis (its plugin) first,
        # or it warns that it cannot rewrite the asserts in it
        from hypothesis import HealthCheck, settings

        test = pyfuncitem.obj
        kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        start = time.monotonic()
        left = sum(1 for r in self.runs.values() if r.outcome == "not run")
        deadline = start + max(0.0, self.end - start) / max(1, left)
        pinned = test._hypothesis_internal_use_settings  # the suite's @settings
        size = FIRST_ROUND_EXAMPLES
        self.current = run
        try:
            while True:
                test._hypothesis_internal_use_settings = settings(
                    pinned,
                    max_examples=size,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    print_blob=True,
                )
                if self.seed is not None:  # what @seed sets: each round its own seed
                    test._hypothesis_internal_use_seed = self._round_seed(run)
                round_start, before = time.monotonic(), run.examples
                run.rounds += 1
                test(**kwargs)  # a failure raises: pytest reports it, the rounds end
                now = time.monotonic()
                done = run.examples - before
                if done < size:
                    run.exhausted = True
                    break
                if now >= deadline or run.examples >= self.max_examples:
                    break
                pace = done / max(now - round_start, 1e-3)
                size = int(pace * min(ROUND_S, deadline - now)) or 1
                size = min(size, self.max_examples - run.examples)
        finally:
            self.current = None
            test._hypothesis_internal_use_settings = pinned
            run.seconds = time.monotonic() - start
        return True

    def _round_seed(self, run: TestRun) -> int:
        assert self.seed is not None
        return zlib.crc32(f"{self.seed}:{run.nodeid}:{run.rounds}".encode())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        run = self.runs.get(report.nodeid)
        if run is not None and (report.when == "call" or report.failed):
            run.outcome = report.outcome

    # -- summary ---------------------------------------------------------------------------

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        write = terminalreporter.write_line
        runs = list(self.runs.values())
        width = max([len(self._name(run)) for run in runs] + [13])
        write("")
        header = f"{'examples':>11} {'rounds':>6} {'s':>6} {'ex/s':>7}  result"
        write(f"{'property test':<{width}} {header}")
        for run in runs:
            rate = run.examples / run.seconds if run.seconds else 0.0
            result = run.outcome + (" (exhausted)" if run.exhausted else "")
            write(
                f"{self._name(run):<{width}} {run.examples:>11,} {run.rounds:>6} "
                f"{run.seconds:>6.1f} {rate:>7.0f}  {result}"
            )
        total = sum(run.examples for run in runs)
        failed = [run.nodeid for run in runs if run.outcome == "failed"]
        elapsed = time.monotonic() - self.started
        write(
            f"fuzz: {len(runs)} property tests, {total:,} examples in {elapsed:.0f} s, "
            f"{len(failed)} failed"
        )
        for nodeid in failed:
            write(f"FAILED {nodeid}: make its falsifying example a test in tests/protocol/")

    @staticmethod
    def _name(run: TestRun) -> str:
        return run.nodeid.removeprefix("tests/protocol/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz",
        description="Run every Hypothesis property test in tests/protocol/ with many "
        "examples, within a time budget.",
    )
    parser.add_argument(
        "--minutes", type=float, default=DEFAULT_MINUTES, help="time budget (default 10)"
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=DEFAULT_EXAMPLES,
        help="max_examples per test; the budget usually ends a test first",
    )
    parser.add_argument(
        "--seed", type=int, help="derive every round's Hypothesis seed from this, to replay a run"
    )
    parser.add_argument("-k", dest="keyword", help="only tests matching this pytest -k expression")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.examples <= 0:
        parser.error("--minutes and --examples must be positive")

    pytest_args = [str(PROTOCOL_TESTS), "-q", "-p", "no:cacheprovider", f"--rootdir={REPO}"]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    plugin = FuzzPlugin(args.minutes * 60, args.examples, args.seed)
    return int(pytest.main(pytest_args, plugins=[plugin]))


if __name__ == "__main__":
    sys.exit(main())
