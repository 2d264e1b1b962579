"""The backends every scenario talks to, in one child process on the load-generator core.

    python -m bench.backends    # prints "ports sink=P reply=P echo=P", runs until SIGTERM

- **sink** (bulk): reads a stream until EOF without copying it to user space
  (``splice`` socket → pipe → /dev/null, one thread per connection), then answers
  with the byte count, so the client times the whole transfer through the proxy.
- **reply** (connection cost): answers the first bytes of a connection with one
  canned status response, then closes when the client does.
- **echo** (latency, idle connections): writes back whatever it reads.

They must cost less than the proxies, or the proxies' figures would be the backends'
ones: the "direct" rows, where the client talks to these without a proxy, are the
check. reply and echo run on uvloop with asyncio protocols, the cheapest Python path.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import threading

import uvloop

from bench.payloads import BYTE_COUNT, REPLY

PIPE_BYTES = 1 << 20
LISTEN_BACKLOG = 4096


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(LISTEN_BACKLOG)
    return sock


def _drain(conn: socket.socket) -> None:
    """Discard everything ``conn`` sends, then tell it how many bytes that was."""
    read_fd, write_fd = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        total = 0
        while True:
            moved = os.splice(conn.fileno(), write_fd, PIPE_BYTES, flags=os.SPLICE_F_MOVE)
            if moved == 0:
                break
            total += moved
            while moved:
                moved -= os.splice(read_fd, null, moved, flags=os.SPLICE_F_MOVE)
        conn.sendall(BYTE_COUNT.pack(total))
    except OSError:
        pass
    finally:
        conn.close()
        for fd in (read_fd, write_fd, null):
            os.close(fd)


def _serve_sink(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_drain, args=(conn,), daemon=True).start()


class Reply(asyncio.Protocol):
    """Answer the first bytes with :data:`REPLY`; close when the peer closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(REPLY)

    def eof_received(self) -> bool:
        return False


class Echo(asyncio.Protocol):
    """Write back every byte read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


async def serve() -> None:
    loop = asyncio.get_running_loop()
    sink, reply, echo = _listener(), _listener(), _listener()
    threading.Thread(target=_serve_sink, args=(sink,), daemon=True).start()
    await loop.create_server(Reply, sock=reply, backlog=LISTEN_BACKLOG)
    await loop.create_server(Echo, sock=echo, backlog=LISTEN_BACKLOG)
    ports = [s.getsockname()[1] for s in (sink, reply, echo)]
    print("ports sink={} reply={} echo={}".format(*ports), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve())
