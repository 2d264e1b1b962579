"""Load generators: they must cost less than the proxies they load.

- :func:`bulk` streams from a tmpfs file with ``sendfile`` (no copy through user
  space), one blocking thread per connection, and times until the sink has counted
  every byte: the data crossed the proxy, not just the client's socket buffer.
- :func:`connect_loop`, :func:`status_loop`, :func:`tls_loop` and :func:`hold_idle` run
  on uvloop with asyncio protocols (the cheapest Python path; no streams, no task per
  connection beyond the workers); :func:`tls_loop`'s handshakes are uvloop's own TLS
  (OpenSSL through Python's ``ssl``), a full one per connection.
- :func:`ping_pong` is a blocking socket in a tight loop: one syscall each way per
  round trip, nothing else on the client's path.
- :class:`UdpLoad` keeps a window of datagrams in flight per client socket to a UDP
  echo, from one thread on ``epoll``, so the load is bounded by what comes back.

Every wait has a deadline: a socket timeout or ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.payloads import BYTE_COUNT, PING, SERIAL_DIGITS, SERIAL_MARKER
from discoproxy.protocol import minecraft

SOCKET_TIMEOUT_S = 30.0
SOURCE_FILE_BYTES = 64 << 20
SETTLE_S = 1.0


def make_source_file(directory: Path) -> Path:
    """A file bulk streams are sent from, cycling over it; tmpfs when there is one."""
    shm = Path("/dev/shm")
    path = (shm if shm.is_dir() and os.access(shm, os.W_OK) else directory) / "bench-source"
    block = bytes(range(256)) * 4096
    with path.open("wb") as file:
        for _ in range(SOURCE_FILE_BYTES // len(block)):
            file.write(block)
    return path


# -- bulk ---------------------------------------------------------------------------------


def _blocking_with_deadline(sock: socket.socket) -> None:
    """Blocking mode (so ``sendfile`` blocks in the kernel) with kernel-side timeouts."""
    sock.settimeout(None)
    timeval = struct.pack("ll", int(SOCKET_TIMEOUT_S), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)


def _stream(
    port: int, prefix: bytes, size: int, source: int, errors: list[str], local: str | None = None
) -> None:
    try:
        address = (local, 0) if local is not None else None
        with socket.create_connection(
            ("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S, source_address=address
        ) as sock:
            _blocking_with_deadline(sock)
            sock.sendall(prefix)
            sent = 0
            while sent < size:
                offset = sent % SOURCE_FILE_BYTES
                count = min(SOURCE_FILE_BYTES - offset, size - sent)
                sent += os.sendfile(sock.fileno(), source, offset, count)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < BYTE_COUNT.size:
                chunk = sock.recv(BYTE_COUNT.size - len(answer))
                if not chunk:
                    break
                answer += chunk
        if len(answer) != BYTE_COUNT.size:
            errors.append(f"sink closed after {len(answer)} bytes of its count")
        elif (counted := BYTE_COUNT.unpack(answer)[0]) != len(prefix) + size:
            errors.append(f"sink counted {counted} bytes, sent {len(prefix) + size}")
    except OSError as exc:
        errors.append(f"stream: {exc}")


def bulk(
    port: int,
    prefix: bytes,
    total_bytes: int,
    streams: int,
    source: Path,
    sources: Sequence[str] = (),
) -> float:
    """Send ``total_bytes`` split over ``streams`` connections; seconds until all counted.
    ``sources``: loopback addresses the streams come from, in turn (workers = N steers
    each client IP to one worker)."""
    errors: list[str] = []
    fd = os.open(source, os.O_RDONLY)
    try:
        threads = [
            threading.Thread(
                target=_stream,
                args=(port, prefix, total_bytes // streams, fd, errors),
                kwargs={"local": sources[n % len(sources)] if sources else None},
            )
            for n in range(streams)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    if errors:
        raise RuntimeError(f"bulk to port {port}: {errors[0]}")
    return elapsed


# -- connection cost ----------------------------------------------------------------------


class _Probe(asyncio.Protocol):
    """Send the payload, read the expected reply length, close."""

    __slots__ = ("done", "expected", "got", "payload", "transport")

    def __init__(self, payload: bytes, expected: int, done: asyncio.Future[bool]) -> None:
        self.payload = payload
        self.expected = expected
        self.done = done
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.expected:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.got >= self.expected)


@dataclass(frozen=True)
class ConnectResult:
    seconds: float
    ok: int
    failed: int


IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h


def _bound_socket(source: str) -> socket.socket:
    """A client socket bound to ``source`` whose port the kernel picks at connect time
    (``IP_BIND_ADDRESS_NO_PORT``): a plain bind to port 0 must find a port free for
    every destination, which tens of thousands of TIME_WAIT sockets make slow."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    sock.setblocking(False)
    return sock


async def _run_probes(
    port: int,
    make_probe: Callable[[asyncio.Future[bool]], asyncio.Protocol],
    total: int,
    concurrency: int,
    deadline_s: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    sources: Sequence[str] = (),
) -> ConnectResult:
    """``total`` connections, ``concurrency`` at a time, each one probe; a probe sets its
    future to whether its exchange succeeded when its connection is lost. With ``tls``
    each connection is a TLS client for ``server_name``, its probe made once the
    handshake is done."""
    loop = asyncio.get_running_loop()
    remaining = total
    ok = failed = 0

    async def worker(n: int) -> None:
        nonlocal remaining, ok, failed
        local = (sources[n % len(sources)], 0) if sources else None
        while remaining > 0:
            remaining -= 1
            done: asyncio.Future[bool] = loop.create_future()
            probe = make_probe(done)
            try:
                if local is not None:  # the port is picked at connect, by the 4-tuple
                    sock = _bound_socket(local[0])
                    await loop.sock_connect(sock, ("127.0.0.1", port))
                    await loop.create_connection(
                        lambda: probe,  # noqa: B023
                        ssl=tls,
                        server_hostname=server_name,
                        sock=sock,
                    )
                else:
                    await loop.create_connection(
                        lambda: probe,  # noqa: B023
                        "127.0.0.1",
                        port,
                        ssl=tls,
                        server_hostname=server_name,
                    )
                success = await done
            except (OSError, ssl.SSLError):
                success = False
            if success:
                ok += 1
            else:
                failed += 1

    started = time.perf_counter()
    async with asyncio.timeout(deadline_s):
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return ConnectResult(time.perf_counter() - started, ok, failed)


def connect_loop(
    port: int,
    payload: bytes,
    expected: int,
    total: int,
    concurrency: int,
    timeout: float,
    sources: Sequence[str] = (),
) -> ConnectResult:
    """``total`` connections, ``concurrency`` at a time: connect, send, read reply, close
    (from ``sources`` in turn, one per concurrent client, when given)."""
    return uvloop.run(
        _run_probes(
            port,
            lambda done: _Probe(payload, expected, done),
            total,
            concurrency,
            timeout,
            sources=sources,
        )
    )


# -- TLS handshakes -----------------------------------------------------------------------


def tls_client_context(cafile: Path | None = None) -> ssl.SSLContext:
    """A client context that never resumes: no session tickets asked for, and no session
    handed to a new connection (uvloop never does), so every connection is a full
    handshake (:class:`_TlsProbe` counts any that was not).

    Without ``cafile`` the certificate is not verified (``CERT_NONE``): the client still
    checks the server's handshake signature, but not the chain, which would be one more
    ECDSA verification of the load core's per handshake; :func:`tls_check` verifies the
    chain and the name once per target instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.options |= ssl.OP_NO_TICKET
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile)
    return context


class _TlsProbe(_Probe):
    """Once the TLS handshake is done: send the request, read the expected plaintext reply
    length, close (close_notify, then FIN). Counts sessions that were resumed."""

    __slots__ = ("resumed",)

    def __init__(
        self, request: bytes, expected: int, resumed: list[int], done: asyncio.Future[bool]
    ) -> None:
        super().__init__(request, expected, done)
        self.resumed = resumed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport.get_extra_info("ssl_object")
        if tls is None or tls.session_reused:
            self.resumed[0] += 1
        super().connection_made(transport)


@dataclass(frozen=True)
class TlsResult:
    seconds: float
    ok: int
    failed: int
    resumed: int  # connections whose handshake was not a full one (must be 0)


def tls_loop(
    port: int,
    context: ssl.SSLContext,
    server_name: str,
    request: bytes,
    expected: int,
    total: int,
    concurrency: int,
    timeout: float,
) -> TlsResult:
    """``total`` TLS connections to ``server_name``, ``concurrency`` at a time: connect,
    full handshake, send ``request``, read ``expected`` plaintext bytes, close."""
    resumed = [0]
    result = uvloop.run(
        _run_probes(
            port,
            lambda done: _TlsProbe(request, expected, resumed, done),
            total,
            concurrency,
            timeout,
            tls=context,
            server_name=server_name,
        )
    )
    return TlsResult(result.seconds, result.ok, result.failed, resumed[0])


def tls_check(port: int, cafile: Path, server_name: str, request: bytes, reply: bytes) -> str:
    """One TLS connection, blocking, verifying the certificate against ``cafile`` and its
    name: the answer to ``request`` must be ``reply``. Returns "version cipher"."""
    context = tls_client_context(cafile)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as sock,
    ):
        sock.sendall(request)
        got = b""
        while len(got) < len(reply) and (chunk := sock.recv(len(reply) - len(got))):
            got += chunk
        version, cipher = sock.version(), (sock.cipher() or ("?",))[0]
    if got != reply:
        raise RuntimeError(f"port {port}: TLS reply {got[:64]!r}, not the reply backend's")
    return f"{version} {cipher}"


# -- status pings -------------------------------------------------------------------------


def _frame_end(buffer: bytes | bytearray) -> int | None:
    """End of the first length-prefixed packet in ``buffer``, None until it is complete."""
    length = shift = 0
    for i in range(min(len(buffer), 3)):
        byte = buffer[i]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            end = i + 1 + length
            return end if len(buffer) >= end else None
        shift += 7
    return None


class _Pinger(asyncio.Protocol):
    """A server-list ping as a client does it: handshake + status request, read the
    status response, ping, read the pong, close. Records the answer's serial."""

    __slots__ = ("answered", "buffer", "done", "ok", "request", "serials", "transport")

    def __init__(self, request: bytes, serials: set[bytes], done: asyncio.Future[bool]) -> None:
        self.request = request
        self.serials = serials
        self.done = done
        self.buffer = b""
        self.answered = False
        self.ok = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.answered:  # the status response first
            end = _frame_end(buffer)
            if end is None:
                self.buffer = buffer
                return
            at = buffer.find(SERIAL_MARKER, 0, end)
            if at >= 0:
                at += len(SERIAL_MARKER)
                self.serials.add(buffer[at : at + SERIAL_DIGITS])
            self.answered = True
            buffer = buffer[end:]
            self.transport.write(PING)
        if len(buffer) >= len(PING):
            self.ok = buffer[: len(PING)] == PING  # the pong carries the ping's bytes
            self.transport.close()
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.ok)


@dataclass(frozen=True)
class PingResult:
    seconds: float
    ok: int
    failed: int
    answers: int  # distinct serials seen: status responses that came from the backend


def status_loop(
    port: int, requests: Sequence[bytes], total: int, concurrency: int, timeout: float
) -> PingResult:
    """``total`` server-list pings (:class:`_Pinger`), ``concurrency`` at a time, the
    n-th sending ``requests[n % len(requests)]``."""
    serials: set[bytes] = set()
    cycle = itertools.cycle(requests)
    result = uvloop.run(
        _run_probes(
            port, lambda done: _Pinger(next(cycle), serials, done), total, concurrency, timeout
        )
    )
    return PingResult(result.seconds, result.ok, result.failed, len(serials))


def status_ping(port: int, request: bytes) -> str:
    """One server-list ping, blocking; the status document (JSON) answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(request)
        buffer = b""
        while (end := _frame_end(buffer)) is None:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"port {port} closed before a status response: {buffer!r}")
            buffer += chunk
        packet = minecraft.parse_packet(buffer[:end])
        if isinstance(packet, minecraft.Packet) and packet.packet_id == 0x00:
            sock.sendall(PING)
            pong = b""
            while len(pong) < len(PING) and (chunk := sock.recv(len(PING) - len(pong))):
                pong += chunk
            if pong == PING:
                size = minecraft.read_varint(packet.payload)
                assert isinstance(size, tuple)
                return packet.payload[size[1] :].decode()
            raise RuntimeError(f"port {port} answered ping {PING!r} with {pong!r}")
        raise RuntimeError(f"port {port} answered a status request with {buffer[:64]!r}")


# -- latency ------------------------------------------------------------------------------


def ping_pong(port: int, prefix: bytes, rounds: int, size: int = 64) -> list[int]:
    """Round-trip times (ns) of ``size``-byte messages to an echo, one connection."""
    message = bytes(size)
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(prefix)
        _recv_exactly(sock, len(prefix))
        times = []
        clock = time.perf_counter_ns
        for _ in range(rounds):
            started = clock()
            sock.sendall(message)
            _recv_exactly(sock, size)
            times.append(clock() - started)
    return times


def _recv_exactly(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise RuntimeError(f"echo closed after {got} of {size} bytes")
        got += len(chunk)


# -- UDP ----------------------------------------------------------------------------------

# A client with datagrams in flight and no reply for this long has lost them: they are
# written off and its window sent afresh (a late reply still counts as delivered).
UDP_STALL_S = 0.05
# After the sending stops, how long the replies still in flight are waited for.
UDP_DRAIN_S = 0.1


@dataclass(frozen=True)
class UdpResult:
    seconds: float  # from the first datagram sent to the last reply received
    sent: int
    received: int
    errors: int  # send or receive errors (ICMP port unreachable, a full buffer)


class UdpLoad:
    """``clients`` UDP sockets, each its own source port (one proxy session each), each
    keeping ``window`` datagrams of ``size`` bytes in flight to an echo: a reply sends
    the next one, so the load never outruns what comes back and buffers do not overflow.

    The sockets are kept between :meth:`run` calls, so the proxy's sessions are too:
    what is measured is forwarding, not opening sessions.
    """

    def __init__(self, port: int, clients: int, window: int, size: int) -> None:
        self.port = port
        self.window = window
        self.message = bytes(size)
        self.epoll = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        try:
            for _ in range(clients):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.socks[sock.fileno()] = sock
                sock.bind(("127.0.0.1", 0))
                sock.connect(("127.0.0.1", port))
                sock.setblocking(False)
                self.epoll.register(sock.fileno(), select.EPOLLIN)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        self.epoll.close()
        for sock in self.socks.values():
            sock.close()

    def run(self, seconds: float) -> UdpResult:
        """Keep every window full for ``seconds``, then wait up to :data:`UDP_DRAIN_S`
        for the replies in flight."""
        window, message, socks = self.window, self.message, self.socks
        poll = self.epoll.poll
        clock = time.perf_counter
        sent = received = errors = 0
        in_flight = dict.fromkeys(socks, 0)
        last = dict.fromkeys(socks, 0.0)

        def fill(fd: int) -> None:
            nonlocal sent, errors
            send = socks[fd].send
            while in_flight[fd] < window:
                try:
                    send(message)
                except OSError:
                    errors += 1
                    return
                sent += 1
                in_flight[fd] += 1

        started = last_reply = clock()
        for fd in socks:
            last[fd] = started
            fill(fd)
        stop = started + seconds
        next_check = started + UDP_STALL_S
        sending = True
        while True:
            now = clock()
            if sending and now >= stop:
                sending = False
                stop = now + UDP_DRAIN_S
            if not sending and (now >= stop or received >= sent):
                break
            for fd, _ in poll(UDP_STALL_S):
                recv = socks[fd].recv
                while True:
                    try:
                        recv(65536)
                    except BlockingIOError:
                        break
                    except OSError:
                        errors += 1
                        break
                    received += 1
                    if in_flight[fd]:
                        in_flight[fd] -= 1
                last_reply = last[fd] = clock()
                if sending:
                    fill(fd)
            if sending and now >= next_check:
                next_check = now + UDP_STALL_S
                for fd in socks:
                    if now - last[fd] >= UDP_STALL_S:  # its window is lost
                        last[fd] = now
                        in_flight[fd] = 0
                        fill(fd)
        if not received:
            raise RuntimeError(f"UDP port {self.port}: no reply ({errors} errors)")
        return UdpResult(last_reply - started, sent, received, errors)


# -- idle connections ---------------------------------------------------------------------


class _Held(asyncio.Protocol):
    """An idle connection that can be asked to see ``n`` more bytes come back."""

    __slots__ = ("got", "target", "transport", "waiter")

    def __init__(self) -> None:
        self.got = 0
        self.target = 0
        self.waiter: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def expect(self, data: bytes) -> asyncio.Future[bool]:
        self.waiter = asyncio.get_running_loop().create_future()
        if self.transport.is_closing():
            self.waiter.set_result(False)
            return self.waiter
        self.target = self.got + len(data)
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.waiter is not None and self.got >= self.target and not self.waiter.done():
            self.waiter.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(False)


@dataclass(frozen=True)
class HoldResult:
    opened: int
    echoed: int
    open_seconds: float


async def _hold_idle(
    port: int, prefix: bytes, count: int, at_peak: Callable[[], None], deadline_s: float
) -> HoldResult:
    loop = asyncio.get_running_loop()
    held: list[_Held] = []

    async def open_one() -> None:
        _, protocol = await loop.create_connection(_Held, "127.0.0.1", port)
        held.append(protocol)
        await protocol.expect(prefix)

    started = time.perf_counter()
    async with asyncio.timeout(deadline_s):
        batch = 256
        for first in range(0, count, batch):
            results = await asyncio.gather(
                *(open_one() for _ in range(first, min(count, first + batch))),
                return_exceptions=True,
            )
            if errors := [r for r in results if isinstance(r, BaseException)]:
                raise RuntimeError(f"opening idle connection {first}+: {errors[0]!r}")
    open_seconds = time.perf_counter() - started
    try:
        await asyncio.sleep(SETTLE_S)
        at_peak()
        async with asyncio.timeout(deadline_s):
            echoed = await asyncio.gather(*(h.expect(b"x") for h in held))
    finally:
        for protocol in held:
            protocol.transport.abort()
    return HoldResult(len(held), sum(echoed), open_seconds)


def hold_idle(
    port: int, prefix: bytes, count: int, at_peak: Callable[[], None], timeout: float
) -> HoldResult:
    """Open ``count`` connections (each sends ``prefix`` and sees it echoed), call
    ``at_peak`` while all are idle, then check every one still echoes a byte."""
    return uvloop.run(_hold_idle(port, prefix, count, at_peak, timeout))
