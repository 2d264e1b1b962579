"""``domain_rewrite`` in every form Infrarust's server files use, and ours, loaded from a
server file and checked by the host a backend sees in the handshake it is forwarded:
``"none"``, ``"from_backend"`` (the first address's host), ``{ explicit = "…" }``, an
explicit host string, and ``"backend"`` (the host of the address dialed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from discoproxy.config import ConfigError
from providers.file import load_server_file
from tests.proxy.helpers import (
    backend,
    handshake,
    receive_all,
    record_handshakes,
    running_proxy,
)

pytestmark = pytest.mark.anyio


async def seen_host(tmp_path: Path, rewrite: str, host: str = "127.0.0.1") -> str:
    """The handshake host a backend sees for a login to play.example.com."""
    hosts: list[str] = []
    async with backend(record_handshakes(hosts)) as info:
        path = tmp_path / "play.toml"
        rewrite_line = f"domain_rewrite = {rewrite}\n" if rewrite else ""
        path.write_text(
            'domains = ["play.example.com"]\n'
            f'addresses = ["{host}:{info.port}", "10.255.255.1:25565"]\n' + rewrite_line
        )
        server = load_server_file(path)
        async with running_proxy([server]) as proxy:
            stream = await proxy.connect()
            async with stream:
                await stream.send(handshake("play.example.com"))
                assert await receive_all(stream) == b"ok"
    (seen,) = hosts
    return seen


@pytest.mark.parametrize(
    ("rewrite", "expected"),
    [
        ("", "play.example.com"),
        ('"none"', "play.example.com"),
        ('"from_backend"', "localhost"),  # the first address's host, as written
        ('{ explicit = "mc.local" }', "mc.local"),
        ('"mc.internal"', "mc.internal"),
        ('"backend"', "localhost"),  # the dialed address's host
    ],
)
async def test_each_form_is_what_the_backend_sees(
    tmp_path: Path, rewrite: str, expected: str
) -> None:
    assert await seen_host(tmp_path, rewrite, host="localhost") == expected


@pytest.mark.parametrize(
    "rewrite", ['{ explicit = "from_backend" }', '{ implicit = "x" }', '"not a host!"']
)
def test_a_bad_form_is_refused_naming_the_accepted_ones(tmp_path: Path, rewrite: str) -> None:
    path = tmp_path / "play.toml"
    path.write_text(
        f'domains = ["a.example.com"]\naddresses = ["a:1"]\ndomain_rewrite = {rewrite}\n'
    )
    with pytest.raises(ConfigError, match=r"domain_rewrite.*from_backend.*explicit"):
        load_server_file(path)
