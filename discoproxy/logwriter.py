"""The process's log output: a bounded queue drained by one writer thread.

Rules for this file:
- Nothing that serves connections ever writes to stderr itself. The reactor thread (close
  lines, rejections, "backend unreachable") and the asyncio loop hand finished lines to
  :meth:`LogWriter.put`, which never blocks: a stalled log pipe (a blocked logging driver,
  a full disk, ``docker logs`` not read) would otherwise freeze every connection.
- The queue holds at most :data:`MAX_QUEUED_LINES`; past that a line is dropped and
  counted (``discoproxy_log_lines_dropped_total``), so a stalled pipe costs log lines,
  never latency or memory.
- One writer thread does the blocking ``write`` + ``flush``, a batch at a time. It looks
  ``sys.stderr`` up at write time, so a replaced stream (pytest's capture) is honoured.
- At exit :meth:`LogWriter.close` gives the thread :data:`CLOSE_WAIT_S` to write what is
  queued; a pipe still stalled then does not hold the process.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import TextIO

# Lines waiting for the writer; about 2 MB of close lines. A healthy pipe drains
# thousands of lines a second, so only a stalled one ever fills it.
MAX_QUEUED_LINES = 10_000
# Lines written per write + flush: a burst costs a few syscalls, not one pair per line.
MAX_BATCH_LINES = 256
# How long close() waits for the queued lines to be written at exit.
CLOSE_WAIT_S = 2.0

_STOP = None  # the sentinel that ends the writer thread


class LogWriter:
    """Hands log lines to a writer thread; never blocks the caller."""

    def __init__(
        self,
        stream: Callable[[], TextIO] = lambda: sys.stderr,
        max_queued: int = MAX_QUEUED_LINES,
    ) -> None:
        self._stream = stream
        self._max = max_queued
        # SimpleQueue: put() is one C call and lock-free for the caller; qsize() is exact
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._dropped = 0
        self._dropped_lock = threading.Lock()  # producers on two threads; only on drops
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def dropped(self) -> int:
        """Lines dropped because the queue was full (the writer could not keep up)."""
        return self._dropped

    def isatty(self) -> bool:
        isatty = getattr(self._stream(), "isatty", None)
        return bool(isatty and isatty())

    def put(self, line: str) -> None:
        """Queue ``line`` (with its newline) for writing; drop and count it when full."""
        if self._queue.qsize() >= self._max:
            with self._dropped_lock:
                self._dropped += 1
            return
        self._queue.put(line)
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="discoproxy-log", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            line = get()
            if line is _STOP:
                return
            batch = [line]
            stop = False
            while len(batch) < MAX_BATCH_LINES:
                try:
                    more = get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)
            stream = self._stream()
            try:
                stream.write("".join(batch))
                stream.flush()
            except (OSError, ValueError):  # stderr closed or broken: nothing to tell
                pass
            if stop:
                return

    def close(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Write what is queued (waiting at most ``timeout``) and stop the thread; False
        if the stream was still stalled. The next :meth:`put` starts a new thread."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._queue.put(_STOP)
        thread.join(timeout)
        return not thread.is_alive()


_writer = LogWriter()


def writer() -> LogWriter:
    """The process's log writer (stderr)."""
    return _writer
