"""The Docker provider's package: the label and record code works without the ``docker``
SDK loaded (``discoproxy labels``, the pure tests), and the package's names all resolve."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import providers.docker

# run in a fresh interpreter: this test process may have imported the SDK already
_REPORT_SDK = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('SDK loaded' if 'docker' in sys.modules else 'no SDK'))\n"
)


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _REPORT_SDK + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_labels_and_records_do_not_load_the_sdk() -> None:
    result = _fresh(
        "from providers.docker import DockerSettings, labels_markdown, servers_from_containers\n"
        "record = {'Id': 'a' * 64, 'Names': ['/mc'], 'State': 'running',\n"
        "          'Labels': {'infrarust.domains': 'mc.example.com'},\n"
        "          'NetworkSettings': {'Networks': {'bridge': {'IPAddress': '172.17.0.2'}}}}\n"
        "scan = servers_from_containers([record], DockerSettings())\n"
        "assert [s.id for s in scan.servers] == ['mc'], scan\n"
        "assert 'infrarust.domains' in labels_markdown()\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no SDK"


def test_discoproxy_labels_does_not_load_the_sdk() -> None:
    result = _fresh(
        "import sys\n"
        "from discoproxy.cli import main\n"
        "sys.argv = ['discoproxy', 'labels']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Docker labels")
    assert result.stdout.strip().endswith("no SDK")


def test_the_provider_loads_the_sdk() -> None:
    result = _fresh("from providers.docker import DockerProvider\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SDK loaded"


def test_every_exported_name_is_its_modules_own() -> None:
    for name in providers.docker.__all__:
        home = importlib.import_module(f"providers.docker.{providers.docker._HOMES[name]}")
        assert getattr(providers.docker, name) is getattr(home, name), name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        providers.docker.NoSuchThing  # noqa: B018
