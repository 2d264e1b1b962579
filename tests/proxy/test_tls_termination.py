"""TLS termination in-process: the certificate chosen by SNI, plaintext to the backend,
certificates rotated without a restart, a bad certificate reported and the old one kept.
Certificates are made with the ``openssl`` command (installed by .ci/run)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from discoproxy.proxy import tls_termination
from tests.proxy.helpers import Backend, backend, running_proxy, server
from tests.support import captured_logs, require_program

pytestmark = pytest.mark.anyio


def make_cert(
    directory: Path, name: str, serial: int = 1, san: str | None = None
) -> tuple[Path, Path]:
    openssl = require_program("openssl", "apt-get install openssl")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", f"/CN={name}", "-addext", f"subjectAltName={san or 'DNS:' + name}",
            "-set_serial", str(serial),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def upper(stream: SocketStream, info: Backend) -> None:
    """Plaintext backend: records what it gets and answers it upper-cased."""
    async for chunk in stream:
        info.received.append(chunk)
        await stream.send(chunk.upper())


def client_context() -> ssl.SSLContext:
    """A TLS client context that takes the test's self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def talk(port: int, name: str, message: bytes) -> tuple[dict[str, object], bytes]:
    """A TLS client (Python ssl) with SNI ``name``: the peer certificate and the answer."""
    context = client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(message)
        answer = tls.recv(1024)
        info = _decode(der)
    return info, answer


def _decode(der: bytes) -> dict[str, object]:
    """Subject CN and serial of a DER certificate, via the openssl command."""
    result = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-noout", "-subject", "-serial"],
        input=der,
        capture_output=True,
        check=True,
    )
    lines = result.stdout.decode().splitlines()
    subject = lines[0].split("CN", 1)[1].strip(" =")
    serial = int(lines[1].split("=", 1)[1], 16)
    return {"cn": subject, "serial": serial}


def held_session(
    port: int, message: bytes, opened: threading.Event, release: threading.Event
) -> bytes:
    """A TLS session to a.example.com held open (``opened`` set once ``message`` is
    answered) until ``release``: the answer."""
    context = client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="a.example.com") as tls,
    ):
        tls.sendall(message)
        answer = tls.recv(1024)
        opened.set()
        release.wait(10)
    return answer


def tls_server(sid: str, domain: str, address: str, cert: Path, key: Path) -> object:
    return server(sid, domain, addresses=[address], tls={"cert": str(cert), "key": str(key)})


async def test_each_name_gets_its_certificate_and_the_backend_plaintext(tmp_path: Path) -> None:
    cert_a, key_a = make_cert(tmp_path, "a.example.com")
    cert_b, key_b = make_cert(tmp_path, "b.example.com")
    async with backend(upper) as a, backend(upper) as b:
        routes = [
            tls_server("a", "a.example.com", a.address, cert_a, key_a),
            tls_server("b", "b.example.com", b.address, cert_b, key_b),
        ]
        async with running_proxy(routes) as proxy:
            info, answer = await anyio.to_thread.run_sync(
                talk, proxy.port, "a.example.com", b"hi a"
            )
            assert info["cn"] == "a.example.com" and answer == b"HI A"
            info, answer = await anyio.to_thread.run_sync(
                talk, proxy.port, "b.example.com", b"hi b"
            )
            assert info["cn"] == "b.example.com" and answer == b"HI B"
    assert a.received == [b"hi a"] and b.received == [b"hi b"]  # plaintext, nothing else


async def test_certificates_rotate_without_restart_and_a_bad_one_keeps_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls_termination, "CERT_CHECK_S", 0.0)
    cert, key = make_cert(tmp_path, "a.example.com", serial=1)
    async with backend(upper) as a:
        async with running_proxy([tls_server("a", "a.example.com", a.address, cert, key)]) as proxy:
            first, _ = await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"x")
            assert first["serial"] == 1
            rotated = tmp_path / "rotated"
            rotated.mkdir()
            new_cert, new_key = make_cert(rotated, "a.example.com", serial=2)
            await anyio.sleep(0.01)  # a later mtime
            shutil.copy(new_key, key)
            shutil.copy(new_cert, cert)
            second, _ = await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"x")
            assert second["serial"] == 2
            cert.write_text("not a certificate")
            third, answer = await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"x")
            assert third["serial"] == 2 and answer == b"X"


async def test_a_terminated_connection_ends_and_leaves_the_table(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "a.example.com")
    async with backend(upper) as a:
        async with running_proxy([tls_server("a", "a.example.com", a.address, cert, key)]) as proxy:
            await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"12345")
            await proxy.wait_on_reactor(lambda ctx: not ctx.connections)


async def test_a_missing_certificate_fails_that_handshake_only(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "b.example.com")
    async with backend(upper) as a, backend(upper) as b:
        routes = [
            tls_server(
                "a", "a.example.com", a.address, tmp_path / "nope.crt", tmp_path / "nope.key"
            ),
            tls_server("b", "b.example.com", b.address, cert, key),
        ]
        async with running_proxy(routes) as proxy:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"x")
            _, answer = await anyio.to_thread.run_sync(talk, proxy.port, "b.example.com", b"ok")
            assert answer == b"OK"


async def test_backend_tls_re_encrypts_and_verifies_the_backend(tmp_path: Path) -> None:
    front_cert, front_key = make_cert(tmp_path, "a.example.com")
    backend_dir = tmp_path / "backend"
    backend_dir.mkdir()
    back_cert, back_key = make_cert(backend_dir, "backend", san="IP:127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(back_cert, back_key)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    seen: list[bytes] = []

    async def serve(stream: SocketStream) -> None:
        # the untrusted case below hangs up in the middle of the handshake: not an error here
        async with stream:
            try:
                tls_stream = await anyio.streams.tls.TLSStream.wrap(
                    stream, server_side=True, ssl_context=context
                )
            except (anyio.BrokenResourceError, ssl.SSLError):
                return
            data = await tls_stream.receive()
            seen.append(data)
            await tls_stream.send(data.upper())

    tls = {"cert": str(front_cert), "key": str(front_key), "backend_tls": True}
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        trusted = server(
            "a",
            "a.example.com",
            addresses=[f"127.0.0.1:{port}"],
            tls={**tls, "backend_ca": str(back_cert)},
        )
        async with running_proxy([trusted]) as proxy:
            _, answer = await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"sec")
            assert answer == b"SEC" and seen == [b"sec"]
        # without the backend's CA, verification fails: the client is not forwarded
        untrusted = server("a", "a.example.com", addresses=[f"127.0.0.1:{port}"], tls=tls)
        async with running_proxy([untrusted]) as proxy:
            _, answer = await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"x")
            assert answer == b""
        tg.cancel_scope.cancel()
    assert seen == [b"sec"]


async def test_a_backend_ca_that_cannot_be_read_is_named_and_ends_that_connection(
    tmp_path: Path,
) -> None:
    cert, key = make_cert(tmp_path, "a.example.com")
    missing = tmp_path / "no-such-ca.pem"
    tls = {"cert": str(cert), "key": str(key), "backend_tls": True, "backend_ca": str(missing)}
    async with backend(upper) as a:
        routes = [server("a", "a.example.com", addresses=[a.address], tls=tls)]
        with captured_logs("ERROR") as lines:
            async with running_proxy(routes) as proxy:
                _, answer = await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"x")
                assert answer == b""  # handshake done, then closed: never forwarded
                await proxy.wait_on_reactor(lambda ctx: not ctx.connections)
        assert a.connections == 0
    assert any(f"backend_ca {missing}: No such file or directory" in line for line in lines)


def close_cleanly(port: int, name: str) -> None:
    """Send, read, then close_notify and wait for the proxy's (raises if it never comes)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        tls = context.wrap_socket(raw, server_hostname=name)
        tls.sendall(b"bye")
        assert tls.recv(1024) == b"BYE"
        tls.unwrap()


async def test_a_client_close_notify_is_answered_with_one(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "a.example.com")
    async with backend(upper) as a:
        async with running_proxy([tls_server("a", "a.example.com", a.address, cert, key)]) as proxy:
            await anyio.to_thread.run_sync(close_cleanly, proxy.port, "a.example.com")


def _idle_client(port: int, name: str) -> bytes:
    """Complete the handshake, send nothing, read until the proxy closes."""
    context = client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        try:
            return tls.recv(1024)
        except (ssl.SSLError, ConnectionError):
            return b""


async def test_a_terminated_connection_that_moves_nothing_is_closed_at_idle_timeout(
    tmp_path: Path,
) -> None:
    cert, key = make_cert(tmp_path, "a.example.com")
    async with backend(upper) as a:
        routes = [tls_server("a", "a.example.com", a.address, cert, key)]
        async with running_proxy(routes, idle_timeout=0.3) as proxy:
            answer = await anyio.to_thread.run_sync(_idle_client, proxy.port, "a.example.com")
            assert answer == b""  # closed by the proxy, long before the client's 10 s
            with anyio.fail_after(5):
                while await proxy.ctx.reactor.run(lambda: len(proxy.ctx.connections)):
                    await anyio.sleep(0.01)


async def test_a_terminated_connection_counts_open_on_its_backend_and_reports_dials_at_once(
    tmp_path: Path,
) -> None:

    cert, key = make_cert(tmp_path, "a.example.com")
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    dead = ("127.0.0.1", refused.getsockname()[1])
    opened, release = threading.Event(), threading.Event()

    def hold() -> bytes:
        return held_session(proxy.port, b"held", opened, release)

    try:
        async with backend(upper) as a:
            defined = server(
                "a",
                "a.example.com",
                addresses=[f"{dead[0]}:{dead[1]}", a.address],  # failover: the dead one first
                tls={"cert": str(cert), "key": str(key)},
            )
            async with running_proxy([defined]) as proxy:

                def pool_numbers(ctx: object) -> dict[tuple[str, int], tuple[int, int]]:
                    pool = dict(proxy.ctx.pools)["a@test"]
                    return {b.address: (b.active, b.failed_total) for b in pool.backends}

                answers: list[bytes] = []

                async def client() -> None:
                    answers.append(await anyio.to_thread.run_sync(hold))

                alive = ("127.0.0.1", a.port)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client)
                    with anyio.fail_after(5):
                        while not opened.is_set():
                            await anyio.sleep(0.02)
                    # while the session is open: counted on its backend, the failed dial known
                    assert await proxy.on_reactor(pool_numbers) == {dead: (0, 1), alive: (1, 0)}
                    release.set()
                await proxy.wait_on_reactor(lambda ctx: not ctx.connections)
                assert await proxy.on_reactor(pool_numbers) == {dead: (0, 1), alive: (0, 0)}
                assert answers == [b"HELD"]
    finally:
        refused.close()


async def test_certificate_files_are_read_off_the_loop_thread(tmp_path: Path) -> None:
    # a slow filesystem must not stall the loop: the stat and reads run in a thread

    cert = tmp_path / "c.pem"
    cert.write_bytes(b"cert bytes")
    threads: list[threading.Thread] = []
    real = tls_termination.read_file_contents

    def recording(paths: tuple[Path, ...], known: tls_termination.Stamp | None) -> object:
        threads.append(threading.current_thread())
        return real(paths, known)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tls_termination, "read_file_contents", recording)
        read = await tls_termination.read_files((cert,), None)
    assert read is not None and read.contents == (b"cert bytes",)
    assert threads and threads[0] is not threading.current_thread()
    with pytest.raises(FileNotFoundError):
        await tls_termination.read_files((tmp_path / "missing.pem",), None)


async def test_a_terminated_connection_ended_from_outside_logs_its_backend_and_bytes(
    tmp_path: Path,
) -> None:
    """Kicked (or banned, or cut at shutdown) while its relay runs on the loop: the close
    line still names the backend and the plaintext bytes moved, under the kick's reason."""

    from discoproxy.proxy.access_log import AccessLog

    cert, key = make_cert(tmp_path, "a.example.com")
    opened, release = threading.Event(), threading.Event()
    lines: list[str] = []

    def hold() -> None:
        assert held_session(proxy.port, b"eleven byte", opened, release) == b"ELEVEN BYTE"

    async with backend(upper) as a:
        async with running_proxy([tls_server("a", "a.example.com", a.address, cert, key)]) as proxy:
            await proxy.on_reactor(
                lambda ctx: setattr(ctx, "_access", AccessLog("text", lines.append))
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, hold)
                with anyio.fail_after(5):
                    while not opened.is_set():
                        await anyio.sleep(0.02)
                conn_id = await proxy.on_reactor(lambda ctx: next(iter(ctx.connections)).id)
                assert await proxy.on_reactor(lambda ctx: ctx.kick(str(conn_id))) == 1
                await proxy.wait_on_reactor(lambda ctx: not ctx.connections)
                release.set()
    (line,) = lines
    assert f"backend=127.0.0.1:{a.port} up=11B down=11B" in line, line
    assert "reason=kicked" in line, line


async def test_a_bug_in_a_terminated_relay_says_internal_error_on_the_close_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from discoproxy.proxy.access_log import AccessLog

    async def broken(*args: object) -> str:
        raise RuntimeError("relay bug")

    monkeypatch.setattr(tls_termination, "_relay", broken)
    cert, key = make_cert(tmp_path, "a.example.com")
    lines: list[str] = []
    async with backend(upper) as a:
        async with running_proxy([tls_server("a", "a.example.com", a.address, cert, key)]) as proxy:
            await proxy.on_reactor(
                lambda ctx: setattr(ctx, "_access", AccessLog("text", lines.append))
            )
            with contextlib.suppress(ssl.SSLError, OSError):  # closed without an answer
                _, answer = await anyio.to_thread.run_sync(talk, proxy.port, "a.example.com", b"hi")
                assert answer == b""
            await proxy.wait_on_reactor(lambda ctx: not ctx.connections)
            assert await proxy.on_reactor(lambda ctx: ctx.stats.internal_errors) == 1
    (line,) = lines
    assert "reason=internal error: RuntimeError('relay bug')" in line, line


async def test_a_terminated_session_cut_at_shutdown_still_writes_its_close_line(
    tmp_path: Path,
) -> None:
    """The shutdown deadline aborts it while its relay runs on the loop: the drain waits
    for the relay's report, so the line is written (backend, bytes) before the reactor
    stops."""
    from discoproxy.proxy.access_log import AccessLog

    cert, key = make_cert(tmp_path, "a.example.com")
    opened, release = threading.Event(), threading.Event()
    lines: list[str] = []
    async with backend(upper) as a, anyio.create_task_group() as clients:
        route = tls_server("a", "a.example.com", a.address, cert, key)
        async with running_proxy([route], shutdown_timeout=0.1) as proxy:
            await proxy.on_reactor(
                lambda ctx: setattr(ctx, "_access", AccessLog("text", lines.append))
            )
            clients.start_soon(
                anyio.to_thread.run_sync, held_session, proxy.port, b"cut", opened, release
            )
            with anyio.fail_after(5):
                while not opened.is_set():
                    await anyio.sleep(0.02)
        release.set()
    (line,) = lines
    assert f"backend=127.0.0.1:{a.port} up=3B down=3B" in line, line
    assert "reason=shutdown timeout" in line, line
