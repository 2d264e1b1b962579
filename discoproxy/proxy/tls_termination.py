"""TLS termination: the handshake with the server's own certificate, then plaintext (or
TLS again) to its backend.

Rules for this file:
- The reactor sniffs the ClientHello and routes by SNI as for passthrough; a route with
  ``tls`` hands the client's fd and the bytes already read to :func:`terminate`, which
  runs on the asyncio loop: the handshake's crypto and the copies must not stall the
  reactor's other connections. Passthrough stays the default and stays in the reactor.
- ``handshake_timeout`` still bounds the TLS handshake (counted from accept): a client
  that stalls after its ClientHello is closed like any other slow handshake.
- The bytes already read (the ClientHello) are fed to an ``ssl.SSLObject`` through a
  ``MemoryBIO``: nothing the client sent is lost or read twice.
- :class:`CertStore` keeps one ``SSLContext`` per (cert, key) and looks at the files'
  mtimes at most every :data:`CERT_CHECK_S`: a changed pair is loaded for new handshakes;
  a pair that fails to load is reported (file and reason) and the previous context kept.
- The files are read through a :data:`FileReader`: this process's own
  (:func:`read_files`), or with ``workers`` the control plane's, asked over the channel
  (a worker reads no file). Contexts are built from the bytes (:func:`_pem_path`: Python's
  ``ssl`` takes paths only, so a memfd stands in for the file).
- The connection stays a :class:`~discoproxy.proxy.connection.ClientConnection` for the
  bookkeeping: the close line (bytes each way, reason) is written when the relay ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from discoproxy.owners import LOOP, owned_by
from discoproxy.protocol import tls
from discoproxy.proxy.addresses import Proxied, proxy_v2_header

if TYPE_CHECKING:
    from discoproxy.model import TlsSettings
    from discoproxy.proxy.connection import ClientConnection
    from discoproxy.proxy.server import ProxyContext
    from discoproxy.routing import Route

# How often a certificate's files are looked at for a change, at most.
CERT_CHECK_S = 1.0
READ_BYTES = 64 * 1024
# After the client's EOF the backend may still be answering: it gets this long to finish
# (a request sent with shutdown(SHUT_WR), as curl and HTTP/1.0 clients do).
BACKEND_FINISH_S = 5.0


class CertificateError(Exception):
    """Raised when a server's certificate or key cannot be loaded (file and reason)."""


Stamp = tuple[float, ...]  # the files' mtimes


@dataclass(frozen=True)
class FileContents:
    """The bytes of some files (a certificate and its key, a CA bundle) as read at
    ``stamp``; crosses from the control plane to a worker."""

    stamp: Stamp
    contents: tuple[bytes, ...]


# (paths, the stamp already loaded or None) → the files, None while their mtimes are
# still that stamp; OSError as reading them raised it
FileReader = Callable[[tuple[Path, ...], Stamp | None], Awaitable[FileContents | None]]


def read_file_contents(paths: tuple[Path, ...], known: Stamp | None) -> FileContents | None:
    """The files' bytes, or None when none of their mtimes changed from ``known``."""
    stamp = tuple(path.stat().st_mtime for path in paths)
    if stamp == known:
        return None
    return FileContents(stamp, tuple(path.read_bytes() for path in paths))


async def read_files(paths: tuple[Path, ...], known: Stamp | None) -> FileContents | None:
    """This process's own :data:`FileReader` (one process, or the control plane): the
    stat and reads in a thread, so a slow filesystem never stalls the loop (it runs once
    per ``CERT_CHECK_S`` per certificate, not per handshake)."""
    return await asyncio.to_thread(read_file_contents, paths, known)


@dataclass
class _Loaded:
    context: ssl.SSLContext
    stamp: Stamp
    checked: float


@owned_by(LOOP)
class CertStore:
    """Server-side contexts per (cert, key), reloaded when their files change."""

    def __init__(self, reader: FileReader = read_files) -> None:
        self.reader = reader
        self._loaded: dict[tuple[Path, Path], _Loaded] = {}
        self._backend: dict[tuple[bool, Path | None], ssl.SSLContext] = {}

    async def context(self, settings: TlsSettings) -> ssl.SSLContext:
        key = (settings.cert, settings.key)
        loaded = self._loaded.get(key)
        now = time.monotonic()
        if loaded is not None and now - loaded.checked < CERT_CHECK_S:
            return loaded.context
        try:
            files = await self.reader(key, loaded.stamp if loaded is not None else None)
        except OSError as exc:
            if loaded is not None:
                loaded.checked = now
                logger.error("certificate {}: {}; keeping the one loaded", settings.cert, exc)
                return loaded.context
            raise CertificateError(f"certificate {settings.cert}: {exc.strerror or exc}") from exc
        if files is None:  # unchanged since ``loaded``
            assert loaded is not None
            loaded.checked = now
            return loaded.context
        try:
            context = _server_context(*files.contents)
        except (ssl.SSLError, OSError) as exc:
            why = f"certificate {settings.cert} / key {settings.key}: {exc}"
            if loaded is None:
                raise CertificateError(why) from exc
            loaded.checked = now
            loaded.stamp = files.stamp  # reported once per change, not per handshake
            logger.error("{}; keeping the certificate loaded before", why)
            return loaded.context
        if loaded is not None:
            logger.info("certificate {} reloaded", settings.cert)
        self._loaded[key] = _Loaded(context, files.stamp, now)
        return context

    async def backend_context(self, settings: TlsSettings) -> ssl.SSLContext:
        key = (settings.backend_verify, settings.backend_ca)
        context = self._backend.get(key)
        if context is None:
            if settings.backend_ca is not None:
                files = await self.reader((settings.backend_ca,), None)
                assert files is not None  # nothing known: always read
                with _pem_path(files.contents[0]) as cafile:
                    context = ssl.create_default_context(cafile=cafile)
            else:
                context = ssl.create_default_context()
            if not settings.backend_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._backend[key] = context
        return context


def _server_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _pem_path(cert) as cert_path, _pem_path(key) as key_path:
        context.load_cert_chain(cert_path, key_path)
    return context


@contextlib.contextmanager
def _pem_path(data: bytes) -> Iterator[str]:
    """A path that reads as ``data`` and is no file on disk (a memfd): what was read is
    what is loaded, in whichever process read it."""
    fd = os.memfd_create("discoproxy-pem", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class _Ended(Exception):
    """The relay is over; ``reason`` is what the close line says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Handoff:
    """What the reactor hands over with a client fd: taken on the reactor thread, so the
    loop never reads the connection's own state."""

    conn_id: int
    started: float  # time.monotonic() of accept: handshake_timeout counts from it
    prefix: bytes  # the ClientHello bytes already read
    proxied: Proxied | None  # the backend's PROXY header addresses, if it wants one
    order: tuple[tuple[str, int], ...]  # the backends to dial, in the pool's order


async def terminate(
    ctx: ProxyContext, conn: ClientConnection, route: Route, fd: int, handoff: Handoff
) -> None:
    """Run a terminated connection to its end, then hand it back to the reactor to be
    closed and logged. ``conn`` is only used through ``call_into``: ``tls_dialed`` once
    the backend dials are done, ``terminated`` at the end."""
    settings = route.server.tls
    assert settings is not None
    loop = asyncio.get_running_loop()
    client = socket.socket(fileno=fd)
    client.setblocking(False)
    counts = [0, 0]  # plaintext bytes up, down: as far as the relay got, if it is cancelled
    backend: tuple[str, int] | None = None
    failed: list[tuple[str, int]] = []  # backends whose dial failed, for the pool
    reason = "both sides closed"
    try:
        try:
            context = await ctx.certs.context(settings)
        except CertificateError as exc:
            logger.error("{}: {}", route.qualified_id, exc)
            await loop.sock_sendall(client, tls.encode_alert(tls.ALERT_INTERNAL_ERROR))
            raise _Ended("certificate not loaded") from exc
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        incoming.write(handoff.prefix)
        tls_obj = context.wrap_bio(incoming, outgoing, server_side=True)
        deadline = ctx.config.handshake_timeout  # counted from accept, as for every client
        left = max(0.0, handoff.started + deadline - time.monotonic()) if deadline else None
        try:
            async with asyncio.timeout(left):
                await _handshake(loop, client, tls_obj, incoming, outgoing)
        except TimeoutError:
            raise _Ended("handshake timeout") from None
        try:
            reader, writer, backend = await _dial(ctx, handoff, route, settings, failed)
        finally:  # the pool hears of the dials now, not when the session ends
            with contextlib.suppress(RuntimeError):
                dialed, failures = backend, tuple(failed)
                ctx.reactor.call_into(conn, lambda: conn.tls_dialed(dialed, failures))
        try:
            idle = ctx.config.idle_timeout
            reason = await _relay(
                loop, idle, client, tls_obj, incoming, outgoing, reader, writer, counts
            )
        finally:
            writer.close()
    except _Ended as ended:
        reason = ended.reason
    except ssl.SSLError as exc:
        reason = f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        reason = f"client reset: {exc.strerror or exc}"
    except Exception as exc:  # a bug: the close line says so; the task's handler logs it
        reason = f"internal error: {exc!r}"
        raise
    finally:
        client.close()
        up, down = counts
        with contextlib.suppress(RuntimeError):  # the reactor stopped: nothing to account to
            ctx.reactor.call_into(conn, lambda: conn.terminated(backend, up, down, reason))


async def _handshake(
    loop: asyncio.AbstractEventLoop,
    client: socket.socket,
    tls_obj: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
) -> None:
    while True:
        try:
            tls_obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            break
        finally:
            if outgoing.pending:
                await loop.sock_sendall(client, outgoing.read())
        data = await loop.sock_recv(client, READ_BYTES)
        if not data:
            raise _Ended("client closed during the TLS handshake")
        incoming.write(data)
    if outgoing.pending:
        await loop.sock_sendall(client, outgoing.read())


async def _dial(
    ctx: ProxyContext,
    handoff: Handoff,
    route: Route,
    settings: TlsSettings,
    failed: list[tuple[str, int]],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int]]:
    errors = [] if handoff.order else [f"every backend of {route.qualified_id} is down"]
    timeout = route.server.connect_timeout or ctx.config.connect_timeout or None
    backend_tls = None
    if settings.backend_tls:
        try:
            backend_tls = await ctx.certs.backend_context(settings)
        except (OSError, ssl.SSLError) as exc:  # the CA bundle: no dial can be verified
            reason = getattr(exc, "strerror", None) or exc
            logger.bind(route=route.qualified_id).error(
                "conn #{} {}: backend_ca {}: {}",
                handoff.conn_id,
                route.qualified_id,
                settings.backend_ca,
                reason,
            )
            raise _Ended("backend CA not loaded") from exc
    for host, port in handoff.order:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=backend_tls, server_hostname=host if backend_tls else None
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            errors.append(f"{host}:{port}: {getattr(exc, 'strerror', None) or exc or 'timed out'}")
            failed.append((host, port))
            continue
        if handoff.proxied is not None:
            writer.write(proxy_v2_header(handoff.proxied))
        return reader, writer, (host, port)
    logger.bind(route=route.qualified_id).warning(
        "conn #{} backend unreachable for {}: {}",
        handoff.conn_id,
        route.qualified_id,
        "; ".join(errors),
    )
    raise _Ended("backend unreachable")


async def _relay(
    loop: asyncio.AbstractEventLoop,
    idle_timeout: float,
    client: socket.socket,
    tls_obj: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    counts: list[int],
) -> str:
    """Both directions until one ends (then the other gets ``BACKEND_FINISH_S`` to finish
    after a client's EOF), a reset, or ``idle_timeout`` with no byte either way: this
    relay keeps its own idle deadline, as it owns the connection while it runs. Why it
    ended; ``counts`` (plaintext bytes up, down) grow as they move."""
    reasons: list[str] = []
    moved = [time.monotonic()]

    async def client_to_backend() -> None:
        while True:
            try:
                while True:
                    plain = tls_obj.read(READ_BYTES)
                    if not plain:
                        reasons.append("client closed")
                        return
                    counts[0] += len(plain)
                    moved[0] = time.monotonic()
                    writer.write(plain)
                    await writer.drain()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                reasons.append("client closed")
                return
            data = await loop.sock_recv(client, READ_BYTES)
            if not data:
                reasons.append("client closed")
                return
            incoming.write(data)

    async def backend_to_client() -> None:
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                reasons.append("backend closed")
                return
            counts[1] += len(data)
            moved[0] = time.monotonic()
            tls_obj.write(data)
            await loop.sock_sendall(client, outgoing.read())

    async def side(direction: Callable[[], Awaitable[None]]) -> None:
        try:
            await direction()
        except (ConnectionError, OSError) as exc:
            reasons.append(f"reset: {exc.strerror or exc}")

    # two plain tasks, awaited below whatever happens: an anyio task group, its events
    # and a sleeping idle task per connection cost more CPU than the relay itself
    upward = loop.create_task(side(client_to_backend))
    downward = loop.create_task(side(backend_to_client))
    tasks = (upward, downward)
    try:
        while True:  # until one side ends or nothing moved for idle_timeout
            left = moved[0] + idle_timeout - time.monotonic() if idle_timeout > 0 else None
            if left is not None and left <= 0:
                reasons.append("idle timeout")
                break
            done, _ = await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
        for task in tasks:  # a bug in a side, not a reset: the caller's to report
            if task.done() and (exc := task.exception()) is not None:
                raise exc
        # one side is done: pass the close on (EOF to the backend, and let it finish its
        # answer), then close_notify to the client either way, as a TLS peer expects
        if reasons[:1] == ["client closed"] and writer.can_write_eof() and not downward.done():
            writer.write_eof()
            await asyncio.wait((downward,), timeout=BACKEND_FINISH_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(ssl.SSLError, ssl.SSLWantReadError):
        tls_obj.unwrap()
    if outgoing.pending:
        with contextlib.suppress(OSError):
            await loop.sock_sendall(client, outgoing.read())
    return reasons[0] if reasons else "both sides closed"
