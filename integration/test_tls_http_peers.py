"""TLS termination, HTTP Host routing and WebSocket through one discoproxy listener,
against clients nobody here wrote.

One ``discoproxy serve`` (module-scoped) listens on one port for every case below; its
server files route names to backends this module runs in threads on loopback:

- ``a``/``b``/``r.example.test`` are *terminated* (``tls = { cert, key }``, self-signed
  certificates made with the ``openssl`` CLI) in front of plain ``http.server`` backends,
  ``wss.example.test`` likewise in front of the ``websockets`` backend;
- ``pt.example.test`` is TLS *passthrough* to a Python ``ssl`` echo backend with its own
  certificate, which the proxy never sees;
- ``web1``/``web2``/``ws.example.test`` are plain HTTP (``http.server`` backends and a
  ``websockets`` asyncio server); ``mc.example.test`` is Minecraft, to a raw TCP backend.

What proves what:

- ``openssl s_client -servername`` and Python ``ssl`` get the certificate of the name they
  asked for (subject parsed from s_client's output, verified against that certificate
  only), and the backend's ``http.server`` parses the request: it got plaintext.
- Rotation: the pair for ``r.example.test`` is replaced on disk while the proxy runs; new
  s_client handshakes see the new serial within a few seconds (the store looks at mtimes
  at most once a second). A broken certificate then keeps the last good serial and the
  proxy logs an error naming the file; a good pair after it is picked up again.
- ``curl --resolve … --cacert`` (a real HTTPS client verifying the chain and the name)
  gets 200 and the terminated backend's body.
- ``curl`` with ``--resolve``, ``-H Host:`` (also upper-case with a trailing dot) or as
  an HTTP proxy client (absolute-form target) reaches the plain-HTTP backend of that
  name; an unmatched Host gets ``421`` (and the configured ``http_unmatched_status``,
  404 here, where the config has that key).
- The ``websockets`` client, connecting to 127.0.0.1 with the URI's host in its Host
  field, completes the upgrade through Host routing (``ws://``) and through termination
  (``wss://``, SNI) and exchanges messages both ways; an unmatched Host gets 421.
- A Minecraft login, a TLS passthrough connection, a terminated TLS connection and a
  plain HTTP keep-alive connection are opened at once on the same port and kept open
  while each exchanges data with its own backend (a barrier holds all four open between
  rounds); the proxy's close lines name each one's route.
- Deadline: a client that sends a ClientHello for a terminated name and then stalls is
  closed at ``handshake_timeout``, as every other handshake is.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import InvalidStatus

from tests.support import ProxyProcess, require_program, running_proxy

pytestmark = pytest.mark.peer

TERMINATED = ("a.example.test", "b.example.test")
ROTATED = "r.example.test"
WSS = "wss.example.test"  # terminated, in front of the websockets backend
PASSTHROUGH = "pt.example.test"
IO_TIMEOUT_S = 5.0
# CertStore looks at a pair's mtimes at most once a second (CERT_CHECK_S); a change
# must show within a few of those.
ROTATION_DEADLINE_S = 5.0
# socketserver's shutdown() waits up to one poll for serve_forever to notice.
POLL_S = 0.05


def require_openssl() -> str:
    return require_program("openssl", "apt-get install openssl")


def require_curl() -> str:
    return require_program("curl", "apt-get install curl")


def make_cert(directory: Path, name: str, serial: int) -> tuple[Path, Path]:
    """A self-signed P-256 certificate (CN and SAN ``name``) and its key, in ``directory``."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    argv = [require_openssl(), "req", "-x509", "-newkey", "ec"]
    argv += ["-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]
    argv += ["-keyout", str(key), "-out", str(cert), "-set_serial", str(serial)]
    argv += ["-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"]
    subprocess.run(argv, check=True, capture_output=True, timeout=IO_TIMEOUT_S)
    return cert, key


# -- backends ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request an HTTP backend parsed."""

    requestline: str
    host: str | None
    body: bytes
    client_port: int


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    name: str
    seen: list[Seen]


class _HttpHandler(BaseHTTPRequestHandler):
    """Answers ``backend <name> host=<Host> path=<path>`` and the body upper-cased;
    HTTP/1.1, so a client may keep the connection for more requests."""

    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _answer(self, body: bytes) -> None:
        host = self.headers.get("Host")
        self.server.seen.append(Seen(self.requestline, host, body, self.client_address[1]))
        data = f"backend {self.server.name} host={host} path={self.path}\n".encode()
        data += body.upper()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the proxy's close lines say enough


@dataclass
class HttpBackend:
    name: str
    port: int
    seen: list[Seen]

    def request(self, path: str) -> Seen:
        """The request this backend parsed for ``path`` (there must be exactly one)."""
        found = [seen for seen in list(self.seen) if f" {path} " in seen.requestline]
        assert len(found) == 1, f"backend {self.name} saw {self.seen}"
        return found[0]


@contextmanager
def http_backend(name: str) -> Iterator[HttpBackend]:
    server = _HttpServer(("127.0.0.1", 0), _HttpHandler)
    server.name, server.seen = name, []
    thread = threading.Thread(
        target=server.serve_forever, args=(POLL_S,), name=f"http-{name}", daemon=True
    )
    thread.start()
    try:
        yield HttpBackend(name, server.server_address[1], server.seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(IO_TIMEOUT_S)


@dataclass
class LineBackend:
    """A raw TCP backend: an optional preamble (TLS handshake, Minecraft packets), then
    every line ``x`` is answered with ``<name>: X``. What it saw is in ``events``."""

    name: str
    port: int
    events: list[tuple[int, str]] = field(default_factory=list)  # (client port, what)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    backend: LineBackend
    preamble: Callable[[socket.socket, LineBackend, int], socket.socket]


class _LineHandler(socketserver.BaseRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        backend = self.server.backend
        port = self.client_address[1]
        sock = self.request
        sock.settimeout(IO_TIMEOUT_S * 2)
        try:
            sock = self.server.preamble(sock, backend, port)
            stream = sock.makefile("rwb")
            while line := stream.readline():
                text = line.decode().rstrip("\n")
                backend.events.append((port, f"line {text}"))
                stream.write(f"{backend.name}: {text.upper()}\n".encode())
                stream.flush()
        except (OSError, ValueError) as exc:
            backend.events.append((port, f"error {exc!r}"))


@contextmanager
def line_backend(
    name: str, preamble: Callable[[socket.socket, LineBackend, int], socket.socket]
) -> Iterator[LineBackend]:
    server = _TcpServer(("127.0.0.1", 0), _LineHandler)
    server.backend = LineBackend(name, server.server_address[1])
    server.preamble = preamble
    thread = threading.Thread(
        target=server.serve_forever, args=(POLL_S,), name=f"tcp-{name}", daemon=True
    )
    thread.start()
    try:
        yield server.backend
    finally:
        server.shutdown()
        server.server_close()
        thread.join(IO_TIMEOUT_S)


def tls_preamble(
    context: ssl.SSLContext,
) -> Callable[[socket.socket, LineBackend, int], socket.socket]:
    """The passthrough backend completes the TLS handshake itself, with its own cert,
    and records the SNI of the ClientHello it got."""
    handshake = threading.local()  # the callback runs in the handler's thread

    def remember(_tls: object, name: str | None, _context: ssl.SSLContext) -> None:
        handshake.sni = name

    context.sni_callback = remember

    def preamble(sock: socket.socket, backend: LineBackend, port: int) -> socket.socket:
        handshake.sni = None
        tls = context.wrap_socket(sock, server_side=True)
        backend.events.append((port, f"tls sni={handshake.sni}"))
        return tls

    return preamble


# Minecraft: the handshake (next state 2, login) and Login Start of protocol 765 (1.20.4),
# written and read here by hand so the test does not use discoproxy's own codec.
MC_PROTOCOL = 765


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mc_string(text: str) -> bytes:
    data = text.encode()
    return varint(len(data)) + data


def mc_packet(packet_id: int, payload: bytes) -> bytes:
    body = varint(packet_id) + payload
    return varint(len(body)) + body


def mc_login(domain: str, port: int, username: str) -> bytes:
    handshake = varint(MC_PROTOCOL) + mc_string(domain) + struct.pack(">H", port) + varint(2)
    login_start = mc_string(username) + bytes(16)  # name, then the player's UUID
    return mc_packet(0x00, handshake) + mc_packet(0x00, login_start)


def _varint_from(read: Callable[[int], bytes]) -> int:
    value = 0
    for shift in range(0, 35, 7):
        byte = read(1)
        if not byte:
            raise EOFError("connection closed inside a VarInt")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
    raise ValueError("VarInt too long")


class _Cursor:
    """Reads a packet's fields in order."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, count: int) -> bytes:
        chunk = self.data[self.at : self.at + count]
        self.at += count
        return chunk

    def varint(self) -> int:
        return _varint_from(self.take)

    def string(self) -> str:
        return self.take(self.varint()).decode()


def minecraft_preamble(sock: socket.socket, backend: LineBackend, port: int) -> socket.socket:
    """Read the handshake and Login Start, record them, greet the player by name."""

    def read(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    def packet() -> tuple[int, _Cursor]:
        cursor = _Cursor(read(_varint_from(read)))
        return cursor.varint(), cursor

    handshake_id, handshake = packet()
    protocol, address = handshake.varint(), handshake.string()
    (server_port,) = struct.unpack(">H", handshake.take(2))
    next_state = handshake.varint()
    login_id, login = packet()
    username = login.string()
    backend.events.append(
        (
            port,
            f"login {address}:{server_port} {username} protocol={protocol} "
            f"next={next_state} ids={handshake_id},{login_id}",
        )
    )
    sock.sendall(f"welcome {username} to {backend.name}\n".encode())
    return sock


@dataclass
class WsBackend:
    port: int
    hosts: list[str]


@contextmanager
def websocket_backend() -> Iterator[WsBackend]:
    """A ``websockets`` asyncio server on its own loop in a thread: greets with the Host
    it saw, answers ``echo: <text>`` (binary: reversed) and ``burst N`` with N messages."""
    hosts: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None  # set once the opening handshake is done
        host = ws.request.headers["Host"]
        hosts.append(host)
        await ws.send(f"hello via {host} path={ws.request.path}")
        async for message in ws:
            if isinstance(message, bytes):
                await ws.send(message[::-1])
            elif message.startswith("burst "):
                for i in range(int(message.split()[1])):
                    await ws.send(f"burst item {i}")
            else:
                await ws.send(f"echo: {message}")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="websockets-backend", daemon=True)
    thread.start()

    async def start() -> Any:
        return await ws_serve(handler, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(IO_TIMEOUT_S)
    try:
        yield WsBackend(server.sockets[0].getsockname()[1], hosts)
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(IO_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(IO_TIMEOUT_S)
        loop.close()


# -- the proxy and everything behind it ------------------------------------------------


@dataclass
class Peers:
    proxy: ProxyProcess
    http: dict[str, HttpBackend]  # by server id: a, b, r, web1, web2
    minecraft: LineBackend
    passthrough: LineBackend
    websocket: WsBackend
    certs: dict[str, tuple[Path, Path]]  # by name; ROTATED's files are replaced by a test
    passthrough_cert: Path


def server_file(name: str, port: int, tls: tuple[Path, Path] | None = None) -> str:
    text = f'domains = ["{name}"]\naddresses = ["127.0.0.1:{port}"]\n'
    if tls is not None:
        text += f'tls = {{ cert = "{tls[0]}", key = "{tls[1]}" }}\n'
    return text


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    directory = tmp_path_factory.mktemp("certs")
    certs = {name: make_cert(directory, name, serial=1) for name in (*TERMINATED, ROTATED, WSS)}
    pt_cert, pt_key = make_cert(tmp_path_factory.mktemp("passthrough"), PASSTHROUGH, serial=7)
    pt_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pt_context.load_cert_chain(pt_cert, pt_key)
    with ExitStack() as stack:
        http = {
            sid: stack.enter_context(http_backend(sid.upper()))
            for sid in ("a", "b", "r", "web1", "web2")
        }
        minecraft = stack.enter_context(line_backend("MC", minecraft_preamble))
        passthrough = stack.enter_context(line_backend("PT", tls_preamble(pt_context)))
        websocket = stack.enter_context(websocket_backend())
        servers = {
            "a.toml": server_file(TERMINATED[0], http["a"].port, certs[TERMINATED[0]]),
            "b.toml": server_file(TERMINATED[1], http["b"].port, certs[TERMINATED[1]]),
            "r.toml": server_file(ROTATED, http["r"].port, certs[ROTATED]),
            "pt.toml": server_file(PASSTHROUGH, passthrough.port),
            "web1.toml": server_file("web1.example.test", http["web1"].port),
            "web2.toml": server_file("web2.example.test", http["web2"].port),
            "ws.toml": server_file("ws.example.test", websocket.port),
            "wss.toml": server_file(WSS, websocket.port, certs[WSS]),
            "mc.toml": server_file("mc.example.test", minecraft.port),
        }
        proxy = stack.enter_context(running_proxy(tmp_path_factory.mktemp("proxy"), servers))
        yield Peers(proxy, http, minecraft, passthrough, websocket, certs, pt_cert)


def closed_line(proxy: ProxyProcess, client_port: int, route: str) -> str:
    """The proxy's close line for the connection from 127.0.0.1:<client_port>."""
    return proxy.wait_for_line(rf"closed: client=127\.0\.0\.1:{client_port} route={route} ")


# -- openssl s_client -------------------------------------------------------------------


@dataclass
class Handshake:
    subject_cn: str
    serial: int
    output: str


def s_client(
    proxy: ProxyProcess, servername: str, request: bytes = b"", verify_with: Path | None = None
) -> Handshake:
    """``openssl s_client -servername`` through the proxy; with a ``request``, it is sent
    and the answer read until the server closes. The server certificate it printed."""
    openssl = require_openssl()
    argv = [openssl, "s_client", "-connect", f"127.0.0.1:{proxy.port}"]
    argv += ["-servername", servername]
    if request:
        argv += ["-ign_eof"]  # read the answer; with no request, quit after the handshake
    if verify_with is not None:
        argv += ["-CAfile", str(verify_with), "-verify_hostname", servername]
        argv += ["-verify_return_error"]
    result = subprocess.run(
        argv, input=request, capture_output=True, timeout=IO_TIMEOUT_S, check=False
    )
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    subject = re.search(r"^subject=\s*CN\s*=\s*(\S+?)\s*$", output, re.MULTILINE)
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", output, re.S)
    assert result.returncode == 0 and subject and pem, f"s_client {servername}:\n{output}"
    decoded = subprocess.run(
        [openssl, "x509", "-noout", "-serial"],
        input=pem.group(0),
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT_S,
        check=True,
    )
    serial = int(decoded.stdout.strip().split("=", 1)[1], 16)
    return Handshake(subject.group(1), serial, output)


@pytest.mark.parametrize("name", TERMINATED)
def test_s_client_gets_each_names_certificate_and_backend_gets_plaintext(
    peers: Peers, name: str
) -> None:
    sid = name.split(".")[0]
    path = f"/s_client-{sid}"
    request = f"GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n".encode()

    handshake = s_client(peers.proxy, name, request, verify_with=peers.certs[name][0])

    assert handshake.subject_cn == name
    assert "Verify return code: 0 (ok)" in handshake.output, handshake.output
    assert f"backend {sid.upper()} host={name} path={path}\n" in handshake.output
    seen = peers.http[sid].request(path)  # http.server parsed it: it arrived as plaintext
    assert seen.requestline == f"GET {path} HTTP/1.0"
    assert seen.host == name


@pytest.mark.parametrize("name", TERMINATED)
def test_python_ssl_with_sni_gets_that_names_certificate(peers: Peers, name: str) -> None:
    sid = name.split(".")[0]
    path = f"/python-ssl-{sid}"
    context = ssl.create_default_context(cafile=str(peers.certs[name][0]))  # only this one
    with (
        socket.create_connection(peers.proxy.address, timeout=IO_TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        client_port = tls.getsockname()[1]
        cert = tls.getpeercert()
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := tls.recv(65536):
            response += chunk

    assert cert is not None and (("commonName", name),) in cert["subject"]
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(f"backend {sid.upper()} host={name} path={path}\n".encode())
    assert peers.http[sid].request(path).host == name
    closed_line(peers.proxy, client_port, f"{sid}@file")


# -- rotation ---------------------------------------------------------------------------


def replace_file(target: Path, source: Path | bytes) -> None:
    """Atomically put new contents at ``target`` (a new inode with a fresh mtime)."""
    staged = target.with_name(target.name + ".new")
    staged.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    os.replace(staged, target)


def wait_for_serial(proxy: ProxyProcess, serial: int) -> list[int]:
    """s_client handshakes until one shows ``serial``; the serials seen on the way."""
    seen = []
    deadline = time.monotonic() + ROTATION_DEADLINE_S
    while not seen or seen[-1] != serial:
        assert time.monotonic() < deadline, f"serial {serial} never came; saw {seen}"
        if seen:
            time.sleep(0.2)
        seen.append(s_client(proxy, ROTATED).serial)
    return seen


def test_certificate_rotates_without_restart_and_a_broken_one_keeps_the_last_good(
    peers: Peers, tmp_path: Path
) -> None:
    proxy = peers.proxy
    cert, key = peers.certs[ROTATED]
    assert s_client(proxy, ROTATED).serial == 1

    new_cert, new_key = make_cert(tmp_path, ROTATED, serial=2)
    started = time.monotonic()
    replace_file(key, new_key)
    replace_file(cert, new_cert)
    seen = wait_for_serial(proxy, 2)
    took = time.monotonic() - started

    assert set(seen) <= {1, 2}, seen
    assert took < 1.0 + ROTATION_DEADLINE_S / 2, seen  # about one CERT_CHECK_S
    proxy.wait_for_line(rf"certificate {re.escape(str(cert))} reloaded")
    assert proxy.process.poll() is None  # the same process: no restart

    replace_file(cert, b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    time.sleep(1.2)  # past CERT_CHECK_S: the next handshake looks at the files
    after_broken = [s_client(proxy, ROTATED).serial for _ in range(3)]
    error = proxy.wait_for_line(rf"ERROR.*certificate {re.escape(str(cert))}\b")

    assert after_broken == [2, 2, 2]
    assert "keeping the certificate loaded before" in error, error

    (tmp_path / "fixed").mkdir()
    fixed_cert, fixed_key = make_cert(tmp_path / "fixed", ROTATED, serial=3)
    replace_file(key, fixed_key)
    replace_file(cert, fixed_cert)
    assert set(wait_for_serial(proxy, 3)) <= {2, 3}


# -- curl -------------------------------------------------------------------------------


@dataclass
class CurlResult:
    status: int
    body: str
    stderr: str


def curl(*args: str, proxy: str | None = None) -> CurlResult:
    """curl through ``proxy`` only, never one from the environment; the status is its
    last line."""
    argv = [require_curl(), "-sS", "--max-time", str(IO_TIMEOUT_S), "-w", r"\n%{http_code}"]
    argv += ["--proxy", proxy] if proxy else ["--noproxy", "*"]
    argv += args
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=IO_TIMEOUT_S * 2, check=False
    )
    body, _, status = result.stdout.rpartition("\n")
    assert result.returncode == 0, f"curl {args}: rc={result.returncode}\n{result.stderr}"
    return CurlResult(int(status), body, result.stderr)


@pytest.mark.parametrize("name", TERMINATED)
def test_curl_https_through_termination_reaches_plain_http_backend(peers: Peers, name: str) -> None:
    port = peers.proxy.port
    sid = name.split(".")[0]

    result = curl(
        "--resolve",
        f"{name}:{port}:127.0.0.1",
        "--cacert",
        str(peers.certs[name][0]),
        f"https://{name}:{port}/curl-{sid}",
    )

    assert result.status == 200, result
    assert result.body == f"backend {sid.upper()} host={name}:{port} path=/curl-{sid}\n"
    assert peers.http[sid].request(f"/curl-{sid}").requestline.startswith("GET /curl-")


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("web1.example.test", "resolve"),
        ("web2.example.test", "resolve"),
        ("web1.example.test", "host-header"),
        ("web2.example.test", "host-header"),
        ("web2.example.test", "mixed-case-host"),
        ("web1.example.test", "absolute-form"),
    ],
)
def test_curl_plain_http_is_routed_by_host(peers: Peers, name: str, how: str) -> None:
    port = peers.proxy.port
    sid = name.split(".")[0]
    path = f"/{how}"
    if how == "resolve":
        result = curl("--resolve", f"{name}:{port}:127.0.0.1", f"http://{name}:{port}{path}")
        host = f"{name}:{port}"
    elif how == "host-header":
        result = curl("-H", f"Host: {name}", f"http://127.0.0.1:{port}{path}")
        host = name
    elif how == "mixed-case-host":  # names are matched lower-cased, without a trailing dot
        host = name.upper() + "."
        result = curl("-H", f"Host: {host}", f"http://127.0.0.1:{port}{path}")
    else:  # curl talking to discoproxy as to an HTTP proxy: GET http://name/path
        result = curl(f"http://{name}{path}", proxy=f"http://127.0.0.1:{port}")
        host, path = name, f"http://{name}{path}"

    assert result.status == 200, result
    assert result.body == f"backend {sid.upper()} host={host} path={path}\n"
    assert peers.http[sid].request(path).host == host


def test_curl_with_unmatched_host_gets_421(peers: Peers) -> None:
    result = curl("-H", "Host: nowhere.example.test", f"http://127.0.0.1:{peers.proxy.port}/")

    assert result.status == 421, result
    assert result.body == "Unknown server: nowhere.example.test\n"


def test_curl_with_unmatched_host_gets_the_configured_status(tmp_path: Path, peers: Peers) -> None:
    servers = {"web1.toml": server_file("web1.example.test", peers.http["web1"].port)}
    with running_proxy(tmp_path, servers, config="http_unmatched_status = 404\n") as proxy:
        unmatched = curl("-H", "Host: nowhere.example.test", f"http://127.0.0.1:{proxy.port}/")
        matched = curl("-H", "Host: web1.example.test", f"http://127.0.0.1:{proxy.port}/404")

    assert unmatched.status == 404, unmatched
    assert unmatched.body == "Unknown server: nowhere.example.test\n"
    assert matched.status == 200 and matched.body.startswith("backend WEB1 "), matched


# -- WebSocket --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "name"), [("ws", "ws.example.test"), ("wss", WSS)], ids=["ws-host", "wss-sni"]
)
def test_websocket_through_discoproxy_exchanges_messages_both_ways(
    peers: Peers, scheme: str, name: str
) -> None:
    """ws: routed by Host, bytes replayed; wss: terminated (SNI), plaintext to the backend."""
    port = peers.proxy.port
    tls: dict[str, Any] = {}
    if scheme == "wss":  # server_hostname (SNI) comes from the URI, as Host does
        tls["ssl"] = ssl.create_default_context(cafile=str(peers.certs[WSS][0]))

    async def talk() -> tuple[int, list[Any]]:
        # TCP to 127.0.0.1, while Host (and SNI) come from the URI's name
        async with ws_connect(
            f"{scheme}://{name}:{port}/chat",
            host="127.0.0.1",
            port=port,
            proxy=None,
            open_timeout=IO_TIMEOUT_S,
            **tls,
        ) as ws:
            client_port = ws.local_address[1]
            assert ws.response is not None and ws.response.status_code == 101
            got: list[Any] = [await ws.recv()]
            for i in range(5):
                await ws.send(f"message {i}")
                got.append(await ws.recv())
            await ws.send(b"\x00\x01binary\xff")
            got.append(await ws.recv())
            await ws.send("burst 4")
            got += [await ws.recv() for _ in range(4)]
            return client_port, got

    client_port, got = asyncio.run(asyncio.wait_for(talk(), IO_TIMEOUT_S * 2))

    assert got == [
        f"hello via {name}:{port} path=/chat",
        *(f"echo: message {i}" for i in range(5)),
        b"\xffyranib\x01\x00",
        *(f"burst item {i}" for i in range(4)),
    ]
    assert peers.websocket.hosts[-1] == f"{name}:{port}"
    closed_line(peers.proxy, client_port, f"{name.split('.')[0]}@file")


def test_websocket_to_unmatched_host_is_refused_with_421(peers: Peers) -> None:
    port = peers.proxy.port

    async def attempt() -> None:
        async with ws_connect(
            f"ws://nowhere.example.test:{port}/", host="127.0.0.1", port=port, proxy=None
        ):
            pass

    with pytest.raises(InvalidStatus) as raised:
        asyncio.run(asyncio.wait_for(attempt(), IO_TIMEOUT_S))
    assert raised.value.response.status_code == 421


# -- all at once ------------------------------------------------------------------------


def http_exchange(stream: BinaryIO, host: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive POST on ``stream``; the status and the body."""
    stream.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    stream.flush()
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


ROUNDS = 3


def test_minecraft_tls_and_http_share_one_port_at_the_same_time(peers: Peers) -> None:
    proxy = peers.proxy
    barrier = threading.Barrier(4, timeout=IO_TIMEOUT_S * 2)

    def together(step: Callable[[int], None]) -> None:
        """Each round: this connection's exchange, then wait until all have done theirs."""
        try:
            for round_ in range(ROUNDS + 1):
                step(round_)
                barrier.wait()
        except BaseException:
            barrier.abort()
            raise

    def minecraft() -> tuple[int, list[bytes]]:
        with socket.create_connection(proxy.address, timeout=IO_TIMEOUT_S) as sock:
            stream = sock.makefile("rwb")
            got: list[bytes] = []

            def step(round_: int) -> None:
                if round_ == 0:
                    sock.sendall(mc_login("mc.example.test", proxy.port, "tester"))
                else:
                    stream.write(f"mc round {round_}\n".encode())
                    stream.flush()
                got.append(stream.readline())

            together(step)
            return sock.getsockname()[1], got

    def passthrough() -> tuple[int, list[bytes]]:
        context = ssl.create_default_context(cafile=str(peers.passthrough_cert))
        with (
            socket.create_connection(proxy.address, timeout=IO_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=PASSTHROUGH) as tls,
        ):
            stream = tls.makefile("rwb")
            got: list[bytes] = []

            def step(round_: int) -> None:
                if round_ == 0:
                    cert = tls.getpeercert()
                    assert cert is not None
                    got.append(str(cert["serialNumber"]).encode())  # the backend's own: 7
                    return
                stream.write(f"tls round {round_}\n".encode())
                stream.flush()
                got.append(stream.readline())

            together(step)
            return tls.getsockname()[1], got

    def terminated() -> tuple[int, list[tuple[int, bytes]]]:
        name = TERMINATED[0]
        context = ssl.create_default_context(cafile=str(peers.certs[name][0]))
        with (
            socket.create_connection(proxy.address, timeout=IO_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            stream = tls.makefile("rwb")
            got: list[tuple[int, bytes]] = []
            together(
                lambda r: got.append(
                    http_exchange(stream, name, f"/together-{r}", f"tls-http {r}".encode())
                )
            )
            return tls.getsockname()[1], got

    def plain_http() -> tuple[int, list[tuple[int, bytes]]]:
        with socket.create_connection(proxy.address, timeout=IO_TIMEOUT_S) as sock:
            stream = sock.makefile("rwb")
            got: list[tuple[int, bytes]] = []
            together(
                lambda r: got.append(
                    http_exchange(
                        stream, "web2.example.test", f"/together-{r}", f"http {r}".encode()
                    )
                )
            )
            return sock.getsockname()[1], got

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(job) for job in (minecraft, passthrough, terminated, plain_http)]
        (mc_port, mc_got), (pt_port, pt_got), (term_port, term_got), (http_port, http_got) = [
            future.result(timeout=IO_TIMEOUT_S * 4) for future in futures
        ]

    assert mc_got == [
        b"welcome tester to MC\n",
        *(f"MC: MC ROUND {r}\n".encode() for r in range(1, ROUNDS + 1)),
    ]
    login = f"login mc.example.test:{proxy.port} tester protocol={MC_PROTOCOL} next=2 ids=0,0"
    assert login in [what for _, what in peers.minecraft.events], peers.minecraft.events
    assert pt_got == [b"07", *(f"PT: TLS ROUND {r}\n".encode() for r in range(1, ROUNDS + 1))]
    assert f"tls sni={PASSTHROUGH}" in [what for _, what in peers.passthrough.events]
    assert term_got == [
        (200, f"backend A host=a.example.test path=/together-{r}\nTLS-HTTP {r}".encode())
        for r in range(ROUNDS + 1)
    ]
    assert http_got == [
        (200, f"backend WEB2 host=web2.example.test path=/together-{r}\nHTTP {r}".encode())
        for r in range(ROUNDS + 1)
    ]
    # each HTTP connection stayed one connection to its backend (keep-alive)
    assert (
        len({peers.http["a"].request(f"/together-{r}").client_port for r in range(ROUNDS + 1)}) == 1
    )
    assert (
        len({peers.http["web2"].request(f"/together-{r}").client_port for r in range(ROUNDS + 1)})
        == 1
    )
    for port, route in (
        (mc_port, "mc@file"),
        (pt_port, "pt@file"),
        (term_port, "a@file"),
        (http_port, "web2@file"),
    ):
        closed_line(proxy, port, route)


# -- deadlines --------------------------------------------------------------------------

HANDSHAKE_TIMEOUT_S = 1.0
# the deadline sweep runs every handshake_timeout/4: closed by ~1.25 s, given 3
STALL_WAIT_S = 3.0


def test_a_stalled_terminated_handshake_is_closed_at_handshake_timeout(
    tmp_path: Path, peers: Peers
) -> None:
    name = TERMINATED[0]
    servers = {"a.toml": server_file(name, peers.http["a"].port, peers.certs[name])}
    config = f"handshake_timeout = {HANDSHAKE_TIMEOUT_S}\nidle_timeout = 60\n"
    context = ssl.create_default_context(cafile=str(peers.certs[name][0]))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()  # a complete ClientHello, and then nothing more

    with (
        running_proxy(tmp_path, servers, config=config) as proxy,
        socket.create_connection(proxy.address, timeout=STALL_WAIT_S) as sock,
    ):
        client_port = sock.getsockname()[1]
        sock.sendall(hello)
        started = time.monotonic()
        closed = False
        try:
            while sock.recv(65536):  # the server's first flight, then EOF or a reset
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
        waited = time.monotonic() - started
        if closed:
            closed_line(proxy, client_port, "a@file")

    assert closed, f"still open {waited:.1f}s after a stalled handshake (handshake_timeout=1)"
