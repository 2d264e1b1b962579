"""The backends every scenario talks to, in one child process on the load-generator core.

    python -m bench.backends    # prints "ports sink=P reply=P echo=P mcstatus=P
                                # udp_echo=P", runs until SIGTERM

- **sink** (bulk): reads a stream until EOF without copying it to user space
  (``splice`` socket → pipe → /dev/null, one thread per connection), then answers
  with the byte count, so the client times the whole transfer through the proxy.
- **reply** (connection cost): answers the first bytes of a connection with one
  canned status response, then closes when the client does.
- **echo** (latency, idle connections): writes back whatever it reads.
- **mcstatus** (status pings): a Minecraft server's server-list side. It parses the
  packets (handshake with next state 1, status request, ping), answers the status
  request with a status response numbered by a serial (``payloads.SERIAL_*``) and the
  ping with its pong, and refuses anything else by closing.
- **udp_echo** (UDP port routes): sends every datagram back to where it came from, one
  blocking thread doing ``recvfrom`` + ``sendto`` (two syscalls a datagram, no event
  loop in between).

They must cost less than the proxies, or the proxies' figures would be the backends'
ones: the "direct" rows, where the client talks to these without a proxy, are the
check. reply, echo and mcstatus run on uvloop with asyncio protocols, the cheapest Python path.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import threading

import uvloop

from bench.payloads import BYTE_COUNT, REPLY, SERIAL_DIGITS, SERIAL_HEAD, SERIAL_TAIL

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


def _serve_udp_echo(sock: socket.socket) -> None:
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, address = recvfrom(65535)
        try:  # noqa: SIM105  (contextlib.suppress costs a call per datagram)
            sendto(data, address)
        except OSError:
            pass  # a full buffer or a vanished client: the client counts it lost


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


def _frame(buffer: bytes) -> tuple[int, int] | None:
    """(body start, body end) of the first length-prefixed packet, None until complete."""
    length = shift = 0
    for i in range(min(len(buffer), 3)):  # 3 VarInt bytes: 2 MiB, far above any packet
        byte = buffer[i]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            end = i + 1 + length
            return (i + 1, end) if len(buffer) >= end else None
        shift += 7
    if len(buffer) >= 3:
        raise ValueError("packet length VarInt longer than 3 bytes")
    return None


class McStatus(asyncio.Protocol):
    """Server-list ping as a Minecraft server answers it: handshake (next state 1),
    status request → status response, ping → pong; the client closes."""

    answers = 0  # status responses sent, by every connection: the serial

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.stage = 0  # 0: handshake, 1: status request, 2: ping, 3: done

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        try:
            while (frame := _frame(buffer)) is not None:
                start, end = frame
                body = buffer[start:end]
                buffer = buffer[end:]
                self._packet(body)
        except ValueError:
            self.transport.abort()
            return
        self.buffer = buffer

    def _packet(self, body: bytes) -> None:
        stage = self.stage
        if stage == 0 and body[:1] == b"\x00" and body[-1:] == b"\x01":  # next state 1
            self.stage = 1
        elif stage == 1 and body == b"\x00":
            McStatus.answers += 1
            serial = b"%0*d" % (SERIAL_DIGITS, McStatus.answers)
            self.transport.write(SERIAL_HEAD + serial + SERIAL_TAIL)
            self.stage = 2
        elif stage == 2 and body[:1] == b"\x01" and len(body) == 9:
            self.transport.write(b"\x09" + body)  # the pong: the ping's own bytes
            self.stage = 3
        else:
            raise ValueError(f"unexpected packet {body[:1].hex()} in stage {stage}")

    def eof_received(self) -> bool:
        return False


async def serve() -> None:
    loop = asyncio.get_running_loop()
    sink, reply, echo, mcstatus = _listener(), _listener(), _listener(), _listener()
    reply2, reply3 = _listener(), _listener()  # with reply: a 3-backend pool
    threading.Thread(target=_serve_sink, args=(sink,), daemon=True).start()
    udp_echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_echo.bind(("127.0.0.1", 0))
    threading.Thread(target=_serve_udp_echo, args=(udp_echo,), daemon=True).start()
    for replies in (reply, reply2, reply3):
        await loop.create_server(Reply, sock=replies, backlog=LISTEN_BACKLOG)
    await loop.create_server(Echo, sock=echo, backlog=LISTEN_BACKLOG)
    await loop.create_server(McStatus, sock=mcstatus, backlog=LISTEN_BACKLOG)
    ports = [s.getsockname()[1] for s in (sink, reply, echo, mcstatus, udp_echo, reply2, reply3)]
    print(
        "ports sink={} reply={} echo={} mcstatus={} udp_echo={} reply2={} reply3={}".format(*ports),
        flush=True,
    )
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve())
