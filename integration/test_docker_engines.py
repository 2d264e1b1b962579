"""One discoproxy following several Docker engines (``[[providers.docker.engines]]``):
this host's engine over its socket, and a second real engine in a network namespace
(``integration/swarm_support.py``) over ``tcp://`` with TLS client certificates, made
here with openssl for the engine's address.

``discoproxy serve`` runs as a user runs it, from a config file. Each engine is its own
provider, ``docker.<name>``, so its routes are tagged with it; a labelled container on
each engine is reached through the proxy. The remote engine's container uses the host
network of its namespace and is reached at that engine's own ``host_address``. Then the
remote engine is stopped: the local engine's routes keep working and a container started
there afterwards is routed. ``discoproxy check`` names a wrong CA as such.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import docker
import docker.errors
import pytest

from integration.docker_support import (
    BACKEND_SCRIPT,
    HOST_MOUNTS,
    IMAGE,
    PYTHON,
    docker_resources,
    ensure_image,
    require_docker,
)
from integration.swarm_support import namespaced_engine, stop_engine
from integration.test_image import first_reply
from tests.support import REPO, require_program, running_proxy

pytestmark = pytest.mark.peer

TLS_PORT = 2376
BACKEND_PORT = 25565
ROUTED_WITHIN_S = 30.0


def openssl(*args: str) -> None:
    result = subprocess.run(
        [require_program("openssl", "apt-get install openssl"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
    )  # fmt: skip
    return key, cert


def issue(directory: Path, ca: tuple[Path, Path], name: str, extensions: str) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}{ext}" for ext in (".key", ".csr", ".pem"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions + "\n")
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext_file),
    )  # fmt: skip
    return cert, key


def wait_reply(address: tuple[str, int], domain: str, expected: bytes, logs: Sequence[str]) -> None:
    deadline = time.monotonic() + ROUTED_WITHIN_S
    while (reply := first_reply(address, domain)) != expected:
        if time.monotonic() > deadline:
            tail = "\n".join([line for line in logs if " conn #" not in line][-40:])
            raise AssertionError(f"{domain}: {reply!r}, not {expected!r}\n{tail}")
        time.sleep(0.2)


def check(config: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "discoproxy", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    return result.stdout + result.stderr


def test_one_proxy_follows_two_engines_one_over_tls_and_survives_one_going_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = require_docker()
    ensure_image(local)
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = make_ca(certs, "engine-ca")
    other_ca = make_ca(certs, "other-ca")
    client_cert, client_key = issue(certs, ca, "discoproxy", "extendedKeyUsage=clientAuth")

    def tls_args(ip: str) -> list[str]:
        server_cert, server_key = issue(
            certs, ca, "engine", f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth"
        )
        return [
            "--tlsverify",
            f"--tlscacert={ca[1]}",
            f"--tlscert={server_cert}",
            f"--tlskey={server_key}",
            "-H",
            f"tcp://{ip}:{TLS_PORT}",
        ]

    with (
        namespaced_engine(tls_args) as remote,
        docker_resources(local, "dpe") as resources,
    ):
        # the remote engine is ours, on a veth: never through an HTTP proxy of the env
        for variable in ("NO_PROXY", "no_proxy"):
            monkeypatch.setenv(variable, f"{remote.ip},127.0.0.1,localhost")
        ensure_image(remote.client)
        prefix = resources.prefix
        remote_domain, local_domain = f"remote.{prefix}.test", f"local.{prefix}.test"
        remote.client.containers.run(
            IMAGE,
            [PYTHON, "-c", BACKEND_SCRIPT],
            name=f"{prefix}-remote",
            environment={"NAME": "remote-a", "PORT": str(BACKEND_PORT)},
            network_mode="host",  # the namespace's network: at the engine's own address
            volumes=HOST_MOUNTS,
            labels={f"{prefix}.domains": remote_domain, f"{prefix}.port": str(BACKEND_PORT)},
            detach=True,
        )
        resources.run("local", resources.labels(domains=local_domain))

        engines = textwrap.dedent(f"""
            [providers.file]
            enabled = false
            [providers.swarm]
            enabled = false
            [providers.docker]
            label_prefix = "{prefix}"
            [[providers.docker.engines]]
            name = "local"
            endpoint = "unix:///var/run/docker.sock"
            [[providers.docker.engines]]
            name = "remote"
            endpoint = "tcp://{remote.ip}:{TLS_PORT}"
            tls_cert = "{client_cert}"
            tls_key = "{client_key}"
            host_address = "{remote.ip}"
            """)
        good = engines + f'tls_ca = "{ca[1]}"\n'
        wrong = tmp_path / "wrong.toml"
        wrong.write_text(engines + f'tls_ca = "{other_ca[1]}"\n')
        report = check(wrong)
        assert "provider docker.remote" in report and "CERTIFICATE_VERIFY_FAILED" in report, report
        assert "provider docker.local: 1 servers" in report, report

        with running_proxy(tmp_path, config=good) as proxy:
            wait_reply(proxy.address, remote_domain, b"remote-a", proxy.lines)
            wait_reply(proxy.address, local_domain, resources.name("local").encode(), proxy.lines)
            text = "\n".join(proxy.lines)
            assert "docker.local" in text and "docker.remote" in text, text

            stop_engine(remote)
            deadline = time.monotonic() + ROUTED_WITHIN_S
            while not any("provider docker.remote failed" in line for line in proxy.lines):
                assert time.monotonic() < deadline, "\n".join(proxy.lines[-40:])
                time.sleep(0.1)
            # the local engine's routes are untouched, and still followed
            wait_reply(proxy.address, local_domain, resources.name("local").encode(), proxy.lines)
            after = f"after.{prefix}.test"
            resources.run("after", resources.labels(domains=after))
            wait_reply(proxy.address, after, resources.name("after").encode(), proxy.lines)
            assert not any("provider docker.local failed" in line for line in proxy.lines)
        with contextlib.suppress(docker.errors.DockerException, OSError):
            remote.client.close()
