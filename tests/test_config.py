from __future__ import annotations

from pathlib import Path

import pytest

from discoproxy.config import ConfigError, ProxyConfig, load_config, parse_bind


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_embedded_default_needs_no_file() -> None:
    config = load_config(None)
    assert config.bind_addresses == (("0.0.0.0", 25565),)
    assert config.servers_dir == Path("servers")
    assert config.receive_proxy_protocol is False
    assert config.trusted_proxies == ()  # nobody may send a PROXY header unless named


def test_toml_and_yaml_load_the_same(tmp_path: Path) -> None:
    toml = write(tmp_path, "a.toml", 'bind = ["127.0.0.1:1", "[::1]:2"]\nidle_timeout = 3\n')
    yaml = write(tmp_path, "a.yaml", "bind:\n  - 127.0.0.1:1\n  - '[::1]:2'\nidle_timeout: 3\n")
    assert load_config(toml) == load_config(yaml)
    assert load_config(toml).bind_addresses == (("127.0.0.1", 1), ("::1", 2))


def test_bind_accepts_a_single_string(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "c.toml", 'bind = ":25577"\n')).bind_addresses == (
        ("0.0.0.0", 25577),
    )


def test_unknown_key_names_the_key_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", 'bind = "0.0.0.0:1"\n\nconect_timeout = 3\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:3: conect_timeout: unknown key (did you mean 'connect_timeout'?)"
    )


@pytest.mark.parametrize(
    ("text", "line", "said"),
    [
        # each of these keys is close to one of the top-level table's (max_connections,
        # players, idle_timeout), which a nested table does not take
        (
            "[rate_limit]\nconnection = 3\n",
            2,
            "rate_limit.connection: unknown key (did you mean 'connections'?)",
        ),
        (
            "[motds.unreachable]\nonline_player = 3\n",
            2,
            "motds.unreachable.online_player: unknown key (did you mean 'online_players'?)",
        ),
        ('[admin]\nlistn = ":1"\n', 2, "admin.listn: unknown key (did you mean 'listen'?)"),
        (
            '[[webhooks]]\nurl = "http://h"\ntimout = 3\n',
            3,
            "webhooks.0.timout: unknown key (did you mean 'timeout'?)",
        ),
        ("[admin]\nidle_timout = 3\n", 2, "admin.idle_timout: unknown key"),
        (
            "motds:\n  sleeping:\n    online_player: 3\n",
            3,
            "motds.sleeping.online_player: unknown key (did you mean 'online_players'?)",
        ),
    ],
)
def test_an_unknown_nested_key_is_matched_against_its_own_tables_keys(
    tmp_path: Path, text: str, line: int, said: str
) -> None:
    path = write(tmp_path, "c.yaml" if text.startswith("motds:") else "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:{line}: {said}"


def test_an_unknown_nested_key_set_by_the_environment_is_matched_against_its_table() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"DISCOPROXY_RATE_LIMIT__CONNECTION": "3"})
    assert str(info.value) == (
        "environment: rate_limit.connection: unknown key (did you mean 'connections'?)"
    )


def test_an_unknown_key_of_a_provider_table_in_a_list_is_matched_against_its_table(
    tmp_path: Path,
) -> None:
    from discoproxy.provider import load_providers
    from providers.docker import DockerProvider

    path = write(
        tmp_path,
        "c.toml",
        '[[providers.docker.engines]]\nname = "eu"\nendpoint = "unix:///x"\nnme = "x"\n'
        "api_timout = 3\n",
    )
    with pytest.raises(ConfigError) as info:
        load_providers(load_config(path), {"docker": DockerProvider}, path=path)
    assert str(info.value).splitlines() == [
        # an engine has a name; api_timeout is the [providers.docker] table's, not an engine's
        f"{path}:4: providers.docker.engines.0.nme: unknown key (did you mean 'name'?)",
        f"{path}:5: providers.docker.engines.0.api_timout: unknown key",
    ]


def test_bad_value_names_field_and_accepted_values(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", 'log_format = "xml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:1: log_format: Input should be 'text' or 'json' (got 'xml')"


def test_negative_timeout_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "connect_timeout: -1\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml:1: connect_timeout: Input should be greater than or equal to 0"
    ):
        load_config(path)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_an_infinite_or_nan_number_is_refused_not_taken_as_no_limit(
    tmp_path: Path, value: str
) -> None:
    # TOML has inf and nan: a handshake_timeout of inf would switch the slowloris guard off
    path = write(tmp_path, "c.toml", f"handshake_timeout = {value}\n")
    with pytest.raises(ConfigError, match=r"c.toml:1: handshake_timeout: Input should be a finite"):
        load_config(path)


def test_invalid_toml_says_where(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", "bind = [\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_invalid_yaml_gives_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "bind: 1\nfoo: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unsupported file type '\.json'"):
        load_config(write(tmp_path, "c.json", "{}"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("25565", "expected 'host:port'"),
        ("::1:25565", r"write IPv6 addresses as '\[::\]:25565'"),
        ("example.com:1", "expected an IP address"),
        ("0.0.0.0:70000", "expected 0-65535"),
    ],
)
def test_bad_bind(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bind(raw)


def test_trusted_proxies_are_cidrs(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "c.toml", 'trusted_proxies = ["10.0.0.0/8", "fd00::/8"]\n')
    )
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "fd00::/8"]
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config(write(tmp_path, "d.toml", 'trusted_proxies = ["10.0.0.300/8"]\n'))


def test_a_bad_trusted_proxy_names_the_key_value_and_accepted_forms(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", 'bind = ":1"\ntrusted_proxies = ["10.0.0.0/33"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:2: trusted_proxies: invalid address or CIDR '10.0.0.0/33'; expected e.g. "
        "'203.0.113.0/24', '2001:db8::/32' or '198.51.100.7' (got ['10.0.0.0/33'])"
    )


def test_trusted_proxies_take_the_forms_ip_filter_takes(tmp_path: Path) -> None:
    text = 'trusted_proxies = ["10.0.0.7", "10.1.2.3/16"]\n'
    config = load_config(write(tmp_path, "c.toml", text))
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.7/32", "10.1.0.0/16"]
    config = load_config(None, {"DISCOPROXY_TRUSTED_PROXIES": "10.0.0.0/8,fd00::/8"})
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "fd00::/8"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('receive_proxy_protocol = "maybe"', "expected true or false (got 'maybe')"),
        ("receive_proxy_protocol = [true]", "expected true or false (got [True])"),
        ('max_connections = "many"', "expected a whole number (got 'many')"),
        ("max_connections = 1.5", "expected a whole number (got 1.5)"),
        ('udp_per_ip_bytes_per_s = "fast"', "expected a number (got 'fast')"),
        ("bans_file = 5", "expected a path, as a string (got 5)"),
        ("ban_message = 5", "expected a string (got 5)"),
        ("bind = 5", "expected a list (got 5)"),
        ("players = 5", "expected a table of keys (got 5)"),
    ],
)
def test_a_value_of_the_wrong_type_is_told_the_accepted_form(
    tmp_path: Path, line: str, message: str
) -> None:
    path = write(tmp_path, "c.toml", f"log_level = 'INFO'\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2: {line.split(' ')[0]}: {message}"


def test_a_nested_key_is_found_on_its_line(tmp_path: Path) -> None:
    text = 'bind = ":1"\n\n[admin]\ntoken = "t"\nlisten = "nowhere"\n'
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/c.toml:5: admin.listen: invalid bind"):
        load_config(write(tmp_path, "c.toml", text))
    text = 'bind: ":1"\nadmin:\n  token: t\n  listen: nowhere\n'
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/c.yaml:4: admin.listen: invalid bind"):
        load_config(write(tmp_path, "c.yaml", text))
    text = '[[webhooks]]\nurl = "http://a"\n[[webhooks]]\nurl = "ftp://b"\n'
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/w.toml:4: webhooks.1.url: expected"):
        load_config(write(tmp_path, "w.toml", text))


def test_with_the_environment_over_a_file_each_error_names_where_its_key_was_set(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "c.toml", 'bind = ":1"\nidle_timeout = "long"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {"DISCOPROXY_MAX_CONNECTIONS": "many"})
    assert str(info.value).splitlines() == [
        f"{path}:2: idle_timeout: expected a number (got 'long')",
        "environment: max_connections: expected a whole number (got 'many')",
    ]


def test_every_key_has_a_description() -> None:
    assert all(
        field.description or name in ("log_level", "log_format")
        for name, field in ProxyConfig.model_fields.items()
    )


def test_front_door_keys_load_with_motds_per_state(tmp_path: Path) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text(
        "status_cache_ttl = 10\nstatus_stale_for = 30\nauto_start_wait = 5\n"
        'unreachable_message = "{server} is down"\n'
        '[motds.unknown_domain]\ntext = "No server {domain}"\n'
        "[motds.sleeping]\nmax_players = 0\n"
    )
    config = load_config(path)
    assert (config.status_cache_ttl, config.status_stale_for, config.auto_start_wait) == (10, 30, 5)
    assert config.motds.unknown_domain.text == "No server {domain}"
    # a table changes the fields it sets; the others keep their defaults
    assert config.motds.sleeping.max_players == 0
    assert config.motds.sleeping.text == ProxyConfig().motds.sleeping.text
    assert config.motds.unknown_domain.protocol_version == -1
    assert config.motds.starting.text is not None  # untouched states keep theirs


def test_a_bad_favicon_names_the_file_line_field_and_accepted_forms(tmp_path: Path) -> None:
    path = tmp_path / "discoproxy.toml"
    path.write_text(f'[motds.unreachable]\nfavicon = "{tmp_path}/nope.png"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:2: motds.unreachable.favicon: favicon {tmp_path}/nope.png cannot be read: "
        "No such file or directory; expected the path of a readable 64x64 PNG file or a "
        f"'data:image/png;base64,...' URI (got '{tmp_path}/nope.png')"
    )


PROXY_PROTOCOL_NEEDS_TRUSTED_PROXIES = (
    "trusted_proxies: required when receive_proxy_protocol = true (got none): any client "
    "could otherwise send a PROXY header and forge its address past ip_filter, bans and "
    "rate limits; list the addresses of your load balancers, e.g. trusted_proxies = "
    '["10.0.0.0/8"], or trust every address explicitly: trusted_proxies = '
    '["0.0.0.0/0", "::/0"]'
)


def test_receive_proxy_protocol_without_trusted_proxies_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", "receive_proxy_protocol = true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {PROXY_PROTOCOL_NEEDS_TRUSTED_PROXIES}"
    path = write(tmp_path, "d.toml", "receive_proxy_protocol = true\ntrusted_proxies = []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2: {PROXY_PROTOCOL_NEEDS_TRUSTED_PROXIES}"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"DISCOPROXY_RECEIVE_PROXY_PROTOCOL": "true"})
    assert str(info.value) == f"environment: {PROXY_PROTOCOL_NEEDS_TRUSTED_PROXIES}"


def test_trusting_every_address_is_accepted_when_said_explicitly(tmp_path: Path) -> None:
    text = 'receive_proxy_protocol = true\ntrusted_proxies = ["0.0.0.0/0", "::/0"]\n'
    config = load_config(write(tmp_path, "c.toml", text))
    assert config.receive_proxy_protocol is True
    assert [str(net) for net in config.trusted_proxies] == ["0.0.0.0/0", "::/0"]
    env = {
        "DISCOPROXY_RECEIVE_PROXY_PROTOCOL": "true",
        "DISCOPROXY_TRUSTED_PROXIES": '["0.0.0.0/0", "::/0"]',
    }
    assert len(load_config(None, env).trusted_proxies) == 2


def test_environment_overrides_the_file_key_by_key(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", 'bind = ":1"\nidle_timeout = 9\n[admin]\ntoken = "t"\n')
    env = {
        "DISCOPROXY_BIND": "127.0.0.1:2",
        "DISCOPROXY_ADMIN__LISTEN": "0.0.0.0:9000",
        "DISCOPROXY_RECEIVE_PROXY_PROTOCOL": "true",
        "DISCOPROXY_TRUSTED_PROXIES": '["10.0.0.0/8"]',
        "DISCOPROXY_CONFIG": "ignored: the CLI reads it",
        "PATH": "/usr/bin",
    }
    config = load_config(path, env)
    assert config.bind_addresses == (("127.0.0.1", 2),)
    assert config.idle_timeout == 9  # from the file
    assert config.admin.listen == "0.0.0.0:9000"
    assert config.admin.token == "t"  # the rest of [admin] kept
    assert config.receive_proxy_protocol is True
    assert [str(net) for net in config.trusted_proxies] == ["10.0.0.0/8"]
    assert load_config(None, {"DISCOPROXY_SERVERS_DIR": "/srv"}).servers_dir == Path("/srv")


def test_a_bad_environment_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"DISCOPROXY_IDEL_TIMEOUT": "3"})
    assert str(info.value) == (
        "environment variable DISCOPROXY_IDEL_TIMEOUT: no config key 'idel_timeout' "
        "(did you mean DISCOPROXY_IDLE_TIMEOUT?)"
    )
    with pytest.raises(ConfigError) as info:
        load_config(None, {"DISCOPROXY_ADMIN__LISTEN": "nowhere"})
    assert str(info.value).startswith("environment: admin.listen: invalid bind 'nowhere'")


def test_admin_token_file_wins_and_an_unreadable_one_is_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    config = load_config(
        write(tmp_path, "c.toml", f'[admin]\ntoken = "x"\ntoken_file = "{secret}"\n')
    )
    assert config.admin.bearer_token() == "from-file"
    secret.unlink()
    with pytest.raises(ConfigError, match=r"admin.token_file: cannot read .*token"):
        config.admin.bearer_token()
