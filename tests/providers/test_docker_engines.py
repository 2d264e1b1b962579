"""``[[providers.docker.engines]]``: several engines in one table, each its own provider
``docker.<name>`` with its endpoint, TLS files and overrides; refused shapes say why."""

from __future__ import annotations

from pathlib import Path

import pytest

from discoproxy.config import ConfigError, ProxyConfig
from discoproxy.provider import load_providers
from providers.docker import DockerProvider, SwarmProvider
from providers.docker.settings import DockerSettings, SwarmSettings


@pytest.fixture
def pems(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN TEST-----\n")
        files[name] = str(path)
    return files


def engines_config(pems: dict[str, str], **table: object) -> ProxyConfig:
    return ProxyConfig(
        providers={
            "docker": {
                "label_prefix": "mc",
                "network": "games",
                **table,
                "engines": [
                    {"name": "local", "endpoint": "unix:///var/run/docker.sock"},
                    {
                        "name": "eu-1",
                        "endpoint": "tcp://10.0.0.5:2376",
                        "tls_ca": pems["ca"],
                        "tls_cert": pems["cert"],
                        "tls_key": pems["key"],
                        "host_address": "10.0.0.5",
                        "network": "edge",
                    },
                ],
            }
        }
    )


def docker_instances(config: ProxyConfig) -> dict[str, DockerSettings]:
    registered = {"docker": DockerProvider, "swarm": SwarmProvider}
    return {
        provider.name: provider.settings  # type: ignore[attr-defined]
        for provider, _ in load_providers(config, registered)
        if provider.name.startswith("docker")
    }


def test_each_engine_is_a_provider_of_its_own_with_its_endpoint_tls_and_overrides(
    pems: dict[str, str],
) -> None:
    found = docker_instances(engines_config(pems))
    assert sorted(found) == ["docker.eu-1", "docker.local"]
    local, remote = found["docker.local"], found["docker.eu-1"]
    assert local.endpoint == "unix:///var/run/docker.sock" and local.tls_ca is None
    assert (local.network, local.label_prefix, local.host_address) == ("games", "mc", "127.0.0.1")
    assert remote.endpoint == "tcp://10.0.0.5:2376"
    assert (str(remote.tls_ca), str(remote.tls_cert)) == (pems["ca"], pems["cert"])
    assert (remote.network, remote.label_prefix, remote.host_address) == ("edge", "mc", "10.0.0.5")
    assert remote.engines == () and local.engines == ()


def test_without_engines_the_table_is_one_provider_named_docker() -> None:
    found = docker_instances(ProxyConfig(providers={"docker": {"label_prefix": "mc"}}))
    assert list(found) == ["docker"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"endpoint": "tcp://10.0.0.9:2376"}, "endpoint: set it on each of `engines`"),
        ({"tls_verify": False}, "tls_verify: set it on each of `engines`"),
    ],
)
def test_a_table_endpoint_beside_engines_is_refused(
    pems: dict[str, str], change: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        docker_instances(engines_config(pems, **change))


def test_engine_problems_name_the_engine_and_the_key(pems: dict[str, str]) -> None:
    def refused(engine: dict[str, object]) -> str:
        config = ProxyConfig(providers={"docker": {"engines": [engine]}})
        with pytest.raises(ConfigError) as caught:
            docker_instances(config)
        return str(caught.value)

    assert "TLS needs a tcp:// endpoint" in refused(
        {"name": "a", "endpoint": "unix:///run/docker.sock", "tls_ca": pems["ca"]}
    )
    assert "give both" in refused(
        {"name": "a", "endpoint": "tcp://10.0.0.5:2376", "tls_cert": pems["cert"]}
    )
    assert "no file at" in refused(
        {"name": "a", "endpoint": "tcp://10.0.0.5:2376", "tls_ca": "/nonexistent/ca.pem"}
    )
    assert "invalid engine name 'EU 1'" in refused({"name": "EU 1", "endpoint": "tcp://h:2376"})
    assert "engines.0" in refused({"name": "a"})  # no endpoint: names where
    # an engine's own overrides are checked as the table's are, naming the engine
    bad_prefix = refused({"name": "eu", "endpoint": "tcp://h:2376", "label_prefix": "bad."})
    assert "engines.0 (eu): label_prefix" in bad_prefix and "invalid label prefix" in bad_prefix
    two = ProxyConfig(
        providers={
            "docker": {
                "engines": [
                    {"name": "a", "endpoint": "tcp://h1:2376"},
                    {"name": "a", "endpoint": "tcp://h2:2376"},
                ]
            }
        }
    )
    with pytest.raises(ConfigError, match="'a' is used twice"):
        docker_instances(two)


def test_the_single_endpoint_takes_tls_files_too(pems: dict[str, str]) -> None:
    settings = DockerSettings(
        endpoint="tcp://10.0.0.5:2376",
        tls_ca=pems["ca"],
        tls_cert=pems["cert"],
        tls_key=pems["key"],
    )
    assert str(settings.tls_key) == pems["key"]


def test_swarm_refuses_engines() -> None:
    with pytest.raises(ValueError, match="several engines are not supported for Swarm"):
        SwarmSettings(engines=[{"name": "a", "endpoint": "tcp://h:2376"}])  # type: ignore[list-item]
