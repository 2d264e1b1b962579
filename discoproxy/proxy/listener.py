"""What every listening socket in the reactor shares: start, close, and resting after an
accept error instead of spinning.

Rules for this file:
- ``on_event`` stays in each subclass (the hot accept loop differs: name routes sniff,
  port routes dial at once); everything else lives here once.
- An accept error (EMFILE/ENFILE: out of file descriptors) is logged as a rate-limited
  rejection and the listener leaves epoll for :data:`ACCEPT_BACKOFF_S`: a level-triggered
  socket that stays readable would otherwise spin the reactor at 100 % CPU.
- A socket that cannot be opened raises :class:`ListenError`, the one message for it: at
  start ``cli.py`` prints it and exits, on a reload the bind is reported as not applied.
"""

from __future__ import annotations

import errno
import socket
from select import EPOLLIN
from typing import TYPE_CHECKING

from discoproxy.owners import REACTOR, any_thread, owned_by
from discoproxy.rejections import Rejection

if TYPE_CHECKING:
    from discoproxy.proxy.server import ProxyContext

# Connections accepted per listener wake-up before other fds get their turn.
ACCEPT_BATCH = 64
# After an accept error (EMFILE: out of fds), the listener rests this long.
ACCEPT_BACKOFF_S = 0.1
# Binding below this port needs root or CAP_NET_BIND_SERVICE (Linux's default
# net.ipv4.ip_unprivileged_port_start).
PRIVILEGED_PORTS_BELOW = 1024


class ListenError(OSError):
    """Raised when a listening socket (``bind``, or the admin listener) cannot be opened.

    ``str()`` is the whole line for an operator: the address, the reason, what is likely
    behind it and the setting that moves it, e.g. ``cannot listen on 0.0.0.0:25565:
    address already in use — is a server already running there? set bind = …``.
    """

    def __init__(self, where: str, port: int, setting: str, exc: OSError) -> None:
        super().__init__(exc.errno, exc.strerror)
        self.where = where  # the address as shown, "(admin)" appended for that listener
        self.port = port
        self.setting = setting  # what to write instead, e.g. 'bind = ["host:port"]'

    def __str__(self) -> str:
        reason = self.strerror or "cannot bind"
        reason = reason[:1].lower() + reason[1:]
        if self.errno == errno.EADDRINUSE:
            reason += " — is a server already running there?"
        elif self.errno == errno.EACCES and 0 < self.port < PRIVILEGED_PORTS_BELOW:
            reason += f" — ports below {PRIVILEGED_PORTS_BELOW} need root or CAP_NET_BIND_SERVICE;"
        elif self.errno == errno.EADDRNOTAVAIL:
            reason += " — is that an address of this machine?"
        else:
            reason += ";"
        return f"cannot listen on {self.where}: {reason} set {self.setting}"


@owned_by(REACTOR)
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

    @property
    @any_thread
    def sock(self) -> socket.socket:
        """The listening socket (handed to a new process by a takeover); set once."""
        return self._sock

    def start(self) -> None:
        self._ctx.reactor.register(self._sock.fileno(), self, EPOLLIN)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._ctx.reactor.unregister(self._sock.fileno())
        self._sock.close()
