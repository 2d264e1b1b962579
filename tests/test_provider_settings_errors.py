"""A bad ``[providers.<name>]`` table is reported as the rest of the config is: the file
and line the key is on, or ``environment`` for a key a ``DISCOPROXY_*`` variable set."""

from __future__ import annotations

from pathlib import Path

import pytest

from discoproxy.config import ConfigError, load_config
from discoproxy.provider import Provider, load_providers
from providers.docker import DockerProvider
from providers.file import FileProvider
from tests.test_cli import run

REGISTERED: dict[str, type[Provider]] = {"docker": DockerProvider, "file": FileProvider}
MISTYPED = "providers.docker.endpiont: unknown key (did you mean 'endpoint'?)"


def refused(path: Path | None, environ: dict[str, str] | None = None) -> str:
    """What ``load_providers`` says of the config at *path* (with *environ* over it)."""
    config = load_config(path, environ)
    with pytest.raises(ConfigError) as info:
        load_providers(config, REGISTERED, path=path, environ=environ)
    return str(info.value)


def test_an_unknown_provider_key_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text('bind = ":25565"\n\n[providers.docker]\nendpiont = "unix:///x"\n')
    assert refused(path) == f"{path}:4: {MISTYPED}"
    path = tmp_path / "discoproxy.yaml"
    path.write_text("providers:\n  file:\n    enabled: auto\n  docker:\n    endpiont: x\n")
    assert refused(path) == f"{path}:5: {MISTYPED}"


def test_a_bad_provider_value_names_the_file_line_and_accepted_form(tmp_path: Path) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text("[providers.file]\nenabled = true\ndirectory = 5\n")
    assert refused(path) == (
        f"{path}:3: providers.file.directory: expected a path, as a string (got 5)"
    )


def test_an_unknown_provider_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text('bind = ":25565"\n[providers.dokcer]\nenabled = true\n')
    assert refused(path) == (
        f"{path}:2: providers.dokcer: unknown provider; registered: docker, file"
    )


def test_a_provider_key_set_by_the_environment_says_so(tmp_path: Path) -> None:
    environ = {"DISCOPROXY_PROVIDERS__DOCKER__ENDPIONT": "unix:///x"}
    assert refused(None, environ) == f"environment: {MISTYPED}"
    path = tmp_path / "discoproxy.toml"
    path.write_text('[providers.docker]\nendpoint = "unix:///y"\n')
    assert refused(path, environ) == f"environment: {MISTYPED}"
    environ = {"DISCOPROXY_PROVIDERS__DOCKER__LABEL_PREFIX": "mc"}
    path.write_text('[providers.docker]\nendpiont = "unix:///y"\n')
    assert refused(path, environ) == f"{path}:2: {MISTYPED}"


def test_check_names_the_config_file_of_a_bad_provider_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text('[providers.docker]\nendpiont = "unix:///x"\n')
    code, _, err = run(["check", "--config", str(path)], capsys)
    assert code == 1
    assert err.splitlines() == [
        f"error: {path}:2: {MISTYPED}",
        "config NOT ok: the config itself does not load",
    ]


def test_check_names_the_environment_for_a_bad_provider_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text('bind = ":25565"\n')
    monkeypatch.setenv("DISCOPROXY_PROVIDERS__DOCKER__ENDPIONT", "unix:///x")
    code, _, err = run(["check", "--config", str(path)], capsys)
    assert code == 1
    assert err.splitlines()[0] == f"error: environment: {MISTYPED}"


def test_check_gives_the_accepted_forms_of_trusted_proxies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text('trusted_proxies = ["10.0.0.0/33"]\n')
    code, _, err = run(["check", "--config", str(path)], capsys)
    assert code == 1
    assert err.splitlines()[0] == (
        f"error: {path}:1: trusted_proxies: invalid address or CIDR '10.0.0.0/33'; expected "
        "e.g. '203.0.113.0/24', '2001:db8::/32' or '198.51.100.7' (got ['10.0.0.0/33'])"
    )


def test_an_engine_override_error_is_said_once(tmp_path: Path) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text(
        '[providers.docker]\nenabled = true\n[[providers.docker.engines]]\nname = "a"\n'
        'endpoint = "unix:///a"\nlabel_prefix = "bad prefix!"\n'
    )
    assert refused(path) == (
        f"{path}:1: providers.docker: engines.0 (a): label_prefix: invalid label prefix "
        "'bad prefix!'; expected letters, digits, '.', '-' or '_', not ending with '.', "
        "e.g. 'infrarust'"
    )
    environ = {"DISCOPROXY_LOG_LEVEL": "debug"}  # not this table's: the file alone is named
    assert refused(path, environ).startswith(f"{path}:1: providers.docker: engines.0 (a): ")
    environ = {"DISCOPROXY_PROVIDERS__DOCKER__NETWORK": "mc"}
    assert refused(path, environ).startswith(f"{path} + environment: providers.docker: ")
