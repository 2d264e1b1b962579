"""Third-party peers as child processes: start, read their output, wait, stop.

Rules for this file:
- Every peer listens on loopback only, and every wait here has a deadline; a peer that
  does not come up fails the test with its own output in the message.
- Peers are stopped in ``finally`` (SIGTERM, then SIGKILL), so a failing test leaves no
  process behind.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# How long a peer gets to print its ready line or open its port; node with
# minecraft-data takes about a second on a cold cache.
PEER_STARTUP_TIMEOUT_S = 15.0
PEER_STOP_TIMEOUT_S = 5.0


@dataclass
class PeerProcess:
    """A running third-party program whose stdout and stderr are collected as lines."""

    name: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = PEER_STARTUP_TIMEOUT_S) -> re.Match[str]:
        """First output line matching ``pattern``; fails if the peer exits or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if time.monotonic() > deadline or self.process.poll() is not None:
                state = "running" if self.process.poll() is None else "exited"
                raise AssertionError(
                    f"{self.name} ({state}) printed no line matching {pattern!r}:\n{self.output()}"
                )
            time.sleep(0.02)

    def wait_for_json(
        self, since: int = 0, timeout: float = PEER_STARTUP_TIMEOUT_S, **fields: object
    ) -> dict[str, Any]:
        """First JSON-object line, from line ``since`` on, whose items include ``fields``."""
        deadline = time.monotonic() + timeout
        while True:
            for record in json_lines(self.lines[since:]):
                if all(record.get(key) == value for key, value in fields.items()):
                    return record
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} printed no JSON line with {fields}:\n{self.output()}"
                )
            time.sleep(0.02)


def json_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The lines that are JSON objects, parsed; other output (warnings, traces) is skipped."""
    records = []
    for line in lines:
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


@contextmanager
def running_peer(
    argv: Sequence[str], *, name: str, cwd: Path | None = None
) -> Iterator[PeerProcess]:
    """Run ``argv`` for the duration of the block, collecting its output."""
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peer = PeerProcess(name, process)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            peer.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, name=f"{name}-output", daemon=True)
    reader.start()
    try:
        yield peer
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(PEER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(PEER_STOP_TIMEOUT_S)
        reader.join(PEER_STOP_TIMEOUT_S)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for peers that cannot report the one they bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    address: tuple[str, int], peer: PeerProcess, timeout: float = PEER_STARTUP_TIMEOUT_S
) -> None:
    """Return once ``address`` accepts a TCP connection; fail if ``peer`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(address, timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline or peer.process.poll() is not None:
                raise AssertionError(
                    f"{peer.name} is not accepting on {address[0]}:{address[1]}:\n{peer.output()}"
                ) from None
            time.sleep(0.05)
