"""The one line per connection, written without loguru's per-record machinery.

Rules for this file:
- At the default ``log_level = "INFO"`` every connection ends with this line, so its cost
  is part of every connection's: through loguru (frame lookup, time zone, record dict,
  format map, lock, flush) it measured 35-45 µs of the proxy's CPU per connection here,
  a third of all the rest. Built here it costs a few µs.
- The line looks exactly like loguru's (``cli.TEXT_FORMAT``, colours on a terminal), and
  ``log_format = "json"`` gives loguru's ``serialize`` shape (``text`` plus a ``record``
  with ``extra``, ``level``, ``message``, ``time``), so operators see one log, not two.
- A UDP session's end (``ports.py``) is written here too, with the same fields (and its
  port): one shape for every close line, TCP or UDP, ``worker=N`` included.
- It is built on the reactor thread and handed to the log writer
  (:mod:`discoproxy.logwriter`), which never blocks: a stalled stderr costs dropped
  (counted) lines, never a frozen data plane.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from discoproxy.logwriter import writer
from discoproxy.model import offline_uuid
from discoproxy.owners import REACTOR, owned_by
from discoproxy.proxy.addresses import format_addr

if TYPE_CHECKING:
    from discoproxy.proxy.connection import ClientConnection
    from discoproxy.proxy.ports import UdpSession

_GREEN = "\x1b[32m"
_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"


@owned_by(REACTOR)
class AccessLog:
    """Formats and writes the close line of each connection."""

    def __init__(
        self,
        log_format: str,
        write: Callable[[str], None] | None = None,
        colour: bool | None = None,
        worker: int | None = None,
    ) -> None:
        """``write`` takes each line (the log writer's non-blocking ``put`` by default)."""
        out = writer()
        self._write = write if write is not None else out.put
        self._json = log_format == "json"
        if colour is None:
            colour = write is None and out.isatty()
        self._colour = not self._json and colour
        self._worker = f"worker={worker} " if worker is not None else ""
        self._worker_no = worker
        self._second = -1
        self._stamp = ""  # "YYYY-MM-DD HH:MM:SS" of self._second, local time

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # one strftime per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}"

    def closed(self, conn: ClientConnection) -> None:
        now = time.time()
        client = format_addr(conn.client_addr)
        backend = format_addr(conn.backend_addr)
        route = conn.route.qualified_id if conn.route else "-"
        duration = time.monotonic() - conn.started
        up, down = conn.bytes_up, conn.bytes_down
        player = conn.player
        who = f"player={player} uuid={offline_uuid(player)} " if player is not None else ""
        message = (
            f"conn #{conn.id} closed: client={client} route={route} backend={backend} "
            f"{who}up={up}B down={down}B duration={duration:.3f}s {self._worker}"
            f"reason={conn.reason}"
        )
        extra: dict[str, object] | None = None
        if self._json:
            extra = {
                "conn": conn.id,
                "client": client,
                "route": route,
                "backend": backend,
                "bytes_up": up,
                "bytes_down": down,
                "duration_s": round(duration, 6),
                "reason": conn.reason,
            }
            if self._worker_no is not None:
                extra["worker"] = self._worker_no
            if player is not None:
                extra["player"] = player
                extra["uuid"] = str(offline_uuid(player))
        self._put(now, message, extra)

    def session_closed(self, session: UdpSession, port: str, reason: str) -> None:
        """A UDP session's end: the TCP line's fields (its id is a connection id), and
        the port route's ``port`` ("19132/udp")."""
        now = time.time()
        client = format_addr(session.client)
        backend = format_addr(session.backend)
        route = session.route.qualified_id
        duration = time.monotonic() - session.started
        up, down = session.bytes_up, session.bytes_down
        message = (
            f"udp session #{session.id} closed: client={client} route={route} port={port} "
            f"backend={backend} up={up}B down={down}B duration={duration:.3f}s "
            f"{self._worker}reason={reason}"
        )
        extra: dict[str, object] | None = None
        if self._json:
            extra = {
                "conn": session.id,
                "client": client,
                "route": route,
                "port": port,
                "backend": backend,
                "bytes_up": up,
                "bytes_down": down,
                "duration_s": round(duration, 6),
                "reason": reason,
            }
            if self._worker_no is not None:
                extra["worker"] = self._worker_no
        self._put(now, message, extra)

    def _put(self, now: float, message: str, extra: dict[str, object] | None) -> None:
        """Write ``message`` as loguru would (``extra``: the json record's bound fields)."""
        stamp = self._time(now)
        if self._colour:
            line = f"{_GREEN}{stamp}{_RESET} {_BOLD}INFO   {_RESET} {message}\n"
        else:
            line = f"{stamp} INFO    {message}\n"
        if extra is not None:
            moment = datetime.fromtimestamp(now).astimezone()
            record = {
                "extra": extra,
                "level": {"name": "INFO", "no": 20},
                "message": message,
                "name": __name__,
                "time": {"repr": str(moment), "timestamp": now},
            }
            line = json.dumps({"text": line, "record": record}) + "\n"
        self._write(line)
