"""Process plumbing for the benchmark: CPU pinning, fd limits, /proc readings, children.

Rules for this file:
- Everything that reads /proc or starts a process is here, so scenarios only see
  "cpu seconds of this pid", "RSS of this pid" and a :class:`Child` to stop.
- Every wait has a deadline, and children are stopped in ``finally`` (SIGTERM, then
  SIGKILL), so an interrupted run leaves no process behind.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Cores:
    """Where things run: the load generator and backends on one core, the proxy on another."""

    load: int | None
    proxy: int | None

    @property
    def pinned(self) -> bool:
        return self.load is not None


def pick_cores() -> Cores:
    """The first two CPUs this process may use; no pinning on a single-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Cores(None, None)
    return Cores(cpus[0], cpus[1])


def pin_self(cpu: int | None) -> None:
    """Pin this process (and so every child it starts later, unless re-pinned) to ``cpu``."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def pin_process(pid: int, cpu: int | None) -> None:
    """Move every thread of a running process to ``cpu`` (taskset -a -p, in Python)."""
    if cpu is None:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of every thread of ``pid``, in seconds.

    Summed from ``/proc/PID/task/*/schedstat`` (nanoseconds) rather than ``utime +
    stime`` in ``/proc/PID/stat`` (10 ms ticks), because a quick run's whole
    measurement can be a few tens of ticks. Both proxies keep their threads for
    their whole life, so no exited thread's time is lost. Falls back to
    ``/proc/PID/stat`` where schedstat is not compiled in.
    """
    task_dir = Path(f"/proc/{pid}/task")
    try:
        total_ns = 0
        for task in task_dir.iterdir():
            total_ns += int((task / "schedstat").read_text().split()[0])
        return total_ns / 1e9
    except (FileNotFoundError, ValueError, IndexError):
        return stat_cpu_seconds(pid)


def stat_cpu_seconds(pid: int) -> float:
    """``utime + stime`` of ``pid`` from ``/proc/PID/stat``, in seconds (tick resolution)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def core_ticks(cpu: int) -> tuple[int, int]:
    """(busy, total) clock ticks of one CPU since boot, from ``/proc/stat``.

    Busy includes interrupt and softirq time, which no process is charged for: on
    loopback much of TCP's work runs there.
    """
    prefix = f"cpu{cpu} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]  # idle + iowait
            total = sum(values[:8])  # guest time is already inside user
            return total - idle, total
    raise RuntimeError(f"no {prefix!r} line in /proc/stat")


class CoreMeter:
    """How busy one CPU was between :meth:`__init__` and :meth:`busy` (0.0-1.0)."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self._start = core_ticks(cpu) if cpu is not None else (0, 0)

    def busy(self) -> float | None:
        if self.cpu is None:
            return None
        busy, total = core_ticks(self.cpu)
        elapsed = total - self._start[1]
        return (busy - self._start[0]) / elapsed if elapsed else None


def background_busy(cores: Cores, seconds: float = 1.0) -> dict[int, float]:
    """Busy % of each benchmark core over ``seconds`` while the benchmark does nothing:
    anything well above zero (another build, a test suite, dockerd) skews every figure."""
    meters = [CoreMeter(cpu) for cpu in (cores.load, cores.proxy) if cpu is not None]
    time.sleep(seconds)
    return {m.cpu: round((m.busy() or 0.0) * 100, 1) for m in meters if m.cpu is not None}


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` in ``/proc/PID/status``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port that was free a moment ago (TCP, or UDP with ``SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Child:
    """A child process started for the benchmark, its output going to ``log_path``."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, *, cpu: int | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        pinned = ["taskset", "-c", str(cpu), *argv] if cpu is not None else list(argv)
        self._log = log_path.open("wb")
        # taskset execs the program, so the pid is the program's own
        self.process = subprocess.Popen(
            pinned, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}:\n{self.output()}"
            )

    def wait_for_port(self, port: int, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Return once 127.0.0.1:``port`` accepts; the probe connection sends nothing."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} not accepting on 127.0.0.1:{port}:\n{self.output()}"
                    ) from None
                time.sleep(0.05)

    def wait_for_line(self, prefix: str, timeout: float = STARTUP_TIMEOUT_S) -> str:
        """First line of output starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} printed no {prefix!r} line:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        self._log.close()
