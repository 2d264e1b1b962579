"""Test support shared by ``tests/`` and ``integration/``: peers, running proxies, backends.

Rule: a test that needs Docker or a third-party program fails (not skips) when ``CI`` is
set and the dependency is missing; outside CI it skips with what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
from loguru import logger

REPO = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))

_LISTENING = re.compile(r"listening on ([0-9a-fA-F.:\[\]]+)")


def dependency_missing(message: str) -> NoReturn:
    """What a test needs is not here: fail under CI (a skip there proves nothing), skip
    elsewhere; ``message`` says what is missing and how to get it."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_program(name: str, install_hint: str) -> str:
    """Path of ``name``; fail under CI, skip elsewhere, when it is not installed."""
    path = shutil.which(name)
    if path is None:
        dependency_missing(f"{name} not found: {install_hint}")
    return path


@contextmanager
def captured_logs(level: str = "INFO") -> Iterator[list[str]]:
    """The loguru lines at ``level`` and above logged while inside, as text: wait for
    the line that says a thing happened rather than sleeping and hoping it did."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level=level)
    try:
        yield lines
    finally:
        logger.remove(sink)


class FakeClock:
    """A monotonic clock that moves only when the test says so: pass it as ``clock=`` to
    code that measures TTLs and idle periods, and the edges become exact."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextmanager
def serving(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    """A threaded TCP server on loopback with ``handler``: its port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class ProxyProcess:
    """A ``discoproxy serve`` child process on loopback with its own config and servers."""

    process: subprocess.Popen[str]
    address: tuple[str, int]
    lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.address[1]

    def output(self) -> str:
        return "\n".join(self.lines)

    def admin_url(self, timeout: float = 5.0) -> str:
        """The admin listener's base URL (``running_proxy`` binds it to a free port)."""
        line = self.wait_for_line(r"admin on http://", timeout)
        return line.split("admin on ", 1)[1].split("/ ", 1)[0].rstrip("/")

    def wait_for_line(self, pattern: str, timeout: float = 5.0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r} in:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def write_servers(directory: Path, servers: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in servers.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


@contextmanager
def running_proxy(
    tmp_path: Path,
    servers: dict[str, str] | None = None,
    config: str = "",
    bind: str = "127.0.0.1:0",
    startup_timeout: float = 15.0,
    admin_listen: str = "127.0.0.1:0",
    args: Sequence[str] = (),
) -> Iterator[ProxyProcess]:
    """Start ``discoproxy serve`` with ``servers`` (file name → TOML/YAML text) and
    ``args`` after the config."""
    servers_dir = write_servers(tmp_path / "servers", servers or {})
    config_path = tmp_path / "discoproxy.toml"
    config_path.write_text(
        f'bind = ["{bind}"]\nservers_dir = "{servers_dir}"\n' + textwrap.dedent(config)
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "discoproxy", "serve", "--config", str(config_path), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # the admin listener on a free port: tests run side by side
        env={**os.environ, "NO_COLOR": "1", "DISCOPROXY_ADMIN__LISTEN": admin_listen},
    )
    lines: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + startup_timeout
    address: tuple[str, int] | None = None
    try:
        while address is None:
            for line in list(lines):
                match = _LISTENING.search(line)
                if match:
                    host, _, port = match.group(1).rpartition(":")
                    address = (host.strip("[]"), int(port))
                    break
            if address is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("discoproxy did not start:\n" + "\n".join(lines))
                time.sleep(0.02)
        yield ProxyProcess(process, address, lines)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(2)
