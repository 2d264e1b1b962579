"""What every listening socket in the reactor shares: start, close, and resting after an
accept error instead of spinning.

Rules for this file:
- ``on_event`` stays in each subclass (the hot accept loop differs: name routes sniff,
  port routes dial at once); everything else lives here once.
- An accept error (EMFILE/ENFILE: out of file descriptors) is logged as a rate-limited
  rejection and the listener leaves epoll for :data:`ACCEPT_BACKOFF_S`: a level-triggered
  socket that stays readable would otherwise spin the reactor at 100 % CPU.
"""

from __future__ import annotations

import socket
from select import EPOLLIN
from typing import TYPE_CHECKING

from discoproxy.proxy.rejections import Rejection

if TYPE_CHECKING:
    from discoproxy.proxy.server import ProxyContext

# Connections accepted per listener wake-up before other fds get their turn.
ACCEPT_BATCH = 64
# After an accept error (EMFILE: out of fds), the listener rests this long.
ACCEPT_BACKOFF_S = 0.1


class BaseListener:
    """A listening socket registered in the reactor."""

    __slots__ = ("_ctx", "_sock", "address", "label")

    def __init__(self, ctx: ProxyContext, sock: socket.socket, label: str) -> None:
        self._ctx = ctx
        self._sock = sock
        name = sock.getsockname()
        self.address: tuple[str, int] = (name[0], name[1])
        self.label = label  # in metrics and the API: the bind as configured, or "25/tcp"

    def _accept_failed(self, exc: OSError, where: str) -> None:
        """Out of fds (or another accept error): stop accepting for a moment, not spin."""
        ctx = self._ctx
        reason = f"accept failed on {where}: {exc}"
        ctx.log_rejection(None, reason, Rejection.ACCEPT_FAILED, self.label)
        fd = self._sock.fileno()
        ctx.reactor.unregister(fd)

        def resume() -> None:
            if self._sock.fileno() >= 0 and not ctx.closing:
                ctx.reactor.register(fd, self, EPOLLIN)  # type: ignore[arg-type]

        ctx.reactor.call_later(ACCEPT_BACKOFF_S, resume)

    def on_internal_error(self, exc: Exception) -> None:
        pass  # logged by the reactor; the listener carries on

    def start(self) -> None:
        self._ctx.reactor.register(self._sock.fileno(), self, EPOLLIN)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._ctx.reactor.unregister(self._sock.fileno())
        self._sock.close()
