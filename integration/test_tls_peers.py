"""TLS routed by SNI through discoproxy, against OpenSSL on both ends.

Peers: two ``openssl s_server -www`` backends, each with its own self-signed certificate
made at test time; clients are Python's ``ssl`` and ``openssl s_client -servername``.
The certificate that comes back names the backend the connection reached.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from integration.peers import running_peer
from tests.support import ProxyProcess, require_program, running_proxy

pytestmark = pytest.mark.peer

NAMES = ("a.example.com", "b.example.com")
IO_TIMEOUT_S = 5.0


def require_openssl() -> str:
    return require_program("openssl", "apt-get install openssl")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name → (certificate, key), self-signed, CN and SAN set to the name."""
    openssl = require_openssl()
    directory = tmp_path_factory.mktemp("certs")
    made = {}
    for name in NAMES:
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        argv = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        argv += ["-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert)]
        argv += ["-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"]
        subprocess.run(argv, check=True, capture_output=True, timeout=IO_TIMEOUT_S)
        made[name] = (cert, key)
    return made


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, certs: dict[str, tuple[Path, Path]]
) -> Iterator[ProxyProcess]:
    openssl = require_openssl()
    with ExitStack() as stack:
        servers = {}
        for name, (cert, key) in certs.items():
            argv = [openssl, "s_server", "-accept", "127.0.0.1:0", "-www"]
            argv += ["-cert", str(cert), "-key", str(key)]
            backend = stack.enter_context(running_peer(argv, name=f"s_server {name}"))
            port = backend.wait_for_line(r"^ACCEPT 127\.0\.0\.1:(\d+)$").group(1)
            servers[f"{name.split('.')[0]}.toml"] = (
                f'domains = ["{name}"]\naddresses = ["127.0.0.1:{port}"]\n'
            )
        yield stack.enter_context(running_proxy(tmp_path_factory.mktemp("tls"), servers))


def client_context(certs: dict[str, tuple[Path, Path]]) -> ssl.SSLContext:
    """Trusts both backends' certificates and skips the name check, so a certificate
    from the wrong backend comes back and is reported instead of failing the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    for cert, _ in certs.values():
        context.load_verify_locations(cert)
    return context


def s_client(proxy: ProxyProcess, servername: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` through the proxy; stdin is empty, so it closes after the handshake."""
    return subprocess.run(
        [
            require_openssl(),
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.port}",
            "-servername",
            servername,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("name", NAMES)
def test_python_ssl_reaches_backend_chosen_by_sni(
    proxy: ProxyProcess, certs: dict[str, tuple[Path, Path]], name: str
) -> None:
    with (
        socket.create_connection(proxy.address, timeout=IO_TIMEOUT_S) as raw,
        client_context(certs).wrap_socket(raw, server_hostname=name) as tls,
    ):
        client_port = tls.getsockname()[1]  # wrap_socket detached ``raw``
        cert = tls.getpeercert()
        tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk

    assert cert is not None
    assert (("commonName", name),) in cert["subject"]
    assert response.startswith(b"HTTP/1.0 200 ok\r\n")
    assert b"s_server" in response
    route = f"{name.split('.')[0]}@file"
    proxy.wait_for_line(rf"closed: client=127\.0\.0\.1:{client_port} route={route} ")


@pytest.mark.parametrize("name", NAMES)
def test_openssl_s_client_reaches_backend_chosen_by_servername(
    proxy: ProxyProcess, name: str
) -> None:
    result = s_client(proxy, name)

    assert f"subject=CN = {name}\n" in result.stdout, result.stdout + result.stderr


def test_unknown_sni_gets_unrecognized_name_alert(
    proxy: ProxyProcess, certs: dict[str, tuple[Path, Path]]
) -> None:
    with (
        socket.create_connection(proxy.address, timeout=IO_TIMEOUT_S) as raw,
        pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"),
    ):
        client_port = raw.getsockname()[1]
        client_context(certs).wrap_socket(raw, server_hostname="nowhere.example.com")

    line = proxy.wait_for_line(rf"closed: client=127\.0\.0\.1:{client_port} route=- ")
    assert "nowhere.example.com" in line


def test_openssl_s_client_with_unknown_servername_reports_unrecognized_name(
    proxy: ProxyProcess,
) -> None:
    result = s_client(proxy, "nowhere.example.com")

    assert result.returncode != 0
    assert "unrecognized name" in result.stderr, result.stdout + result.stderr
