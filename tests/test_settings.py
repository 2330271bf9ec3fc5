"""Configuration: embedded defaults, TOML files, environment overrides, and clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError
from gateway.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path):
    """Write a TOML file into tmp_path and return its path."""

    def make(text: str, name: str = "gateway.toml") -> Path:
        return write(tmp_path / name, text)

    return make


def config_error(path: Path | None = None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env or {})
    return str(info.value)


# -- defaults and files --------------------------------------------------------------------


def test_no_file_gives_the_embedded_defaults():
    settings = load_settings(None, env={})

    assert settings == Settings()
    assert settings.store.backend == "sqlite"
    assert settings.auth.jwt_algorithm == "HS256"
    assert settings.server.max_message_size == 64 * 1024


def test_the_embedded_defaults_match_the_contract():
    s = Settings()

    assert (s.server.heartbeat, s.server.hello_timeout) == (30, 10)
    assert s.server.max_ttl == 30 * 24 * 3600
    assert (s.presence.batch_ms, s.presence.offline_grace) == (250, 5)
    assert (s.push.urgent_cooldown, s.push.background_cooldown, s.push.linger) == (10, 1200, 60)
    assert (s.push.collapse_id, s.push.alert_loc_key) == ("incoming-message", "NEW_MESSAGE")
    assert s.push.clear_cooldown == 60


def test_a_file_overrides_only_the_keys_it_sets(config):
    path = config(
        """
        [server]
        port = 9443
        heartbeat = 45

        [push]
        linger = 5

        [push.apns]
        sandbox = true
        """
    )

    settings = load_settings(path, env={})

    assert settings.server.port == 9443
    assert settings.server.heartbeat == 45.0 and isinstance(settings.server.heartbeat, float)
    assert settings.push.linger == 5.0
    assert settings.push.apns.sandbox is True
    assert settings.server.host == Settings().server.host
    assert settings.push.fcm == Settings().push.fcm
    assert settings.auth == Settings().auth


def test_an_empty_file_gives_the_defaults(config):
    assert load_settings(config(""), env={}) == Settings()


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.toml"

    message = config_error(missing)

    assert str(missing) in message and "not found" in message


def test_invalid_toml_names_the_file(config):
    path = config("[server\nport = 1")

    message = config_error(path)

    assert str(path) in message and "TOML" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nbogus = 1", "[server] bogus"),
        ("[bogus]\nx = 1", "[bogus]"),
        ("[push.apns]\nbogus = 1", "[push.apns] bogus"),
        ("[store]\nbakend = 'sqlite'", "[store] bakend"),
    ],
)
def test_an_unknown_key_names_the_file_and_the_key(config, text, key):
    path = config(text)

    message = config_error(path)

    assert str(path) in message
    assert key in message
    assert "unknown key" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nport = '8765'", "[server] port"),
        ("[server]\nport = true", "[server] port"),
        ("[server]\nheartbeat = 'often'", "[server] heartbeat"),
        ("[push.apns]\nsandbox = 1", "[push.apns] sandbox"),
        ("[auth]\njwt_secret = 123", "[auth] jwt_secret"),
        ("server = 5", "[server]"),
        ("[push]\napns = 'x'", "[push] apns"),
    ],
)
def test_a_wrong_type_names_the_file_and_the_key(config, text, key):
    path = config(text)

    message = config_error(path)

    assert str(path) in message
    assert key in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nport = 70000", "[server] port"),
        ("[server]\nport = -1", "[server] port"),
        ("[server]\nheartbeat = 0", "[server] heartbeat"),
        ("[server]\nmax_message_size = -5", "[server] max_message_size"),
        ("[presence]\nbatch_ms = -1", "[presence] batch_ms"),
        ("[groups]\nmax_members = 0", "[groups] max_members"),
        ("[push]\nclear_cooldown = 0", "[push] clear_cooldown"),
    ],
)
def test_out_of_range_values_name_the_key(config, text, key):
    assert key in config_error(config(text))


def test_groups_allow_1024_members_unless_configured(config):
    assert load_settings(env={}).groups.max_members == 1024
    assert load_settings(config("[groups]\nmax_members = 5"), env={}).groups.max_members == 5


def test_port_zero_is_allowed_for_tests(config):
    assert load_settings(config("[server]\nport = 0"), env={}).server.port == 0


def test_a_missing_credentials_file_names_file_key_and_path(config, tmp_path):
    path = config(
        """
        [push.apns]
        key_file = "keys/AuthKey_ABC.p8"
        key_id = "ABC"
        team_id = "TEAM"
        topic = "com.example.app"
        """
    )

    message = config_error(path)

    assert str(path) in message
    assert "[push.apns] key_file" in message
    assert str(tmp_path / "keys" / "AuthKey_ABC.p8") in message


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("server", "tls_cert"),
        ("auth", "jwt_public_key_file"),
        ("push.apns", "ca_file"),
        ("push.fcm", "service_account_file"),
    ],
)
def test_every_credentials_path_must_name_an_existing_file(config, section, key):
    message = config_error(config(f"[{section}]\n{key} = 'missing.pem'"))

    assert f"[{section}] {key}" in message and "missing.pem" in message


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc" / "gateway"
    write(conf_dir / "keys" / "AuthKey.p8", "placeholder")
    write(conf_dir / "fcm.json", "{}")
    path = write(
        conf_dir / "gateway.toml",
        """
        [store]
        path = "data/queue.db"

        [push.apns]
        key_file = "keys/AuthKey.p8"
        key_id = "K"
        team_id = "T"
        topic = "com.example.app"

        [push.fcm]
        service_account_file = "fcm.json"
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    settings = load_settings(path, env={})

    assert settings.store.path == conf_dir.resolve() / "data" / "queue.db"
    assert settings.push.apns.key_file == conf_dir.resolve() / "keys" / "AuthKey.p8"
    assert settings.push.fcm.service_account_file == conf_dir.resolve() / "fcm.json"


def test_absolute_paths_are_kept(config, tmp_path):
    db = tmp_path / "abs" / "q.db"

    settings = load_settings(config(f"[store]\npath = '{db}'"), env={})

    assert settings.store.path == db


# -- environment overrides -----------------------------------------------------------------


def test_env_overrides_a_key_with_a_typed_value():
    settings = load_settings(None, env={"GATEWAY__SERVER__PORT": "9000"})

    assert settings.server.port == 9000


def test_env_reaches_nested_tables_and_takes_plain_text():
    settings = load_settings(None, env={"GATEWAY__PUSH__APNS__TOPIC": "com.example.app"})

    assert settings.push.apns.topic == "com.example.app"


def test_env_accepts_quoted_toml_strings_and_booleans():
    env = {"GATEWAY__AUTH__JWT_SECRET": '"123456"', "GATEWAY__PUSH__APNS__SANDBOX": "true"}

    settings = load_settings(None, env=env)

    assert settings.auth.jwt_secret == "123456"
    assert settings.push.apns.sandbox is True


def test_env_wins_over_the_file(config):
    path = config("[server]\nport = 1111\nhost = '0.0.0.0'")

    settings = load_settings(path, env={"GATEWAY__SERVER__PORT": "2222"})

    assert (settings.server.port, settings.server.host) == (2222, "0.0.0.0")


def test_env_names_are_case_insensitive_after_the_prefix():
    assert load_settings(None, env={"GATEWAY__server__Port": "9001"}).server.port == 9001


def test_unrelated_env_vars_are_ignored():
    env = {"GATEWAY_PORT": "1", "PORT": "2", "XGATEWAY__SERVER__PORT": "3"}

    assert load_settings(None, env=env) == Settings()


@pytest.mark.parametrize("name", ["GATEWAY__PORT", "GATEWAY__SERVER__", "GATEWAY____PORT"])
def test_a_malformed_env_var_name_is_named(name):
    message = config_error(env={name: "1"})

    assert name in message


def test_an_unknown_env_key_names_the_variable_and_the_key():
    message = config_error(env={"GATEWAY__SERVER__BOGUS": "1"})

    assert "GATEWAY__SERVER__BOGUS" in message and "[server] bogus" in message


@pytest.mark.parametrize("name", ["GATEWAY__SEVRER__PORT", "GATEWAY__PUSH__APSN__TOPIC"])
def test_a_misspelt_table_in_an_env_var_names_the_variable(config, name):
    message = config_error(config(""), env={name: "9000"})

    assert name in message


def test_an_ill_typed_env_value_names_the_variable():
    message = config_error(env={"GATEWAY__SERVER__PORT": "eighty"})

    assert "GATEWAY__SERVER__PORT" in message and "[server] port" in message


# -- choices and consistency ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[auth]\njwt_algorithm = 'none'", "[auth] jwt_algorithm"),
        ("[auth]\njwt_algorithm = 'HS512'", "[auth] jwt_algorithm"),
        ("[store]\nbackend = 'postgres'", "[store] backend"),
        ("[store]\nsynchronous = 'off'", "[store] synchronous"),
        ("[log]\nlevel = 'trace'", "[log] level"),
    ],
)
def test_a_value_outside_its_choices_is_refused_with_the_choices(config, text, key):
    message = config_error(config(text))

    assert key in message and "one of" in message


def test_the_choice_lists_are_those_documented(config):
    assert "HS256, ES256, RS256" in config_error(config("[auth]\njwt_algorithm = 'none'"))
    assert "sqlite, redis" in config_error(config("[store]\nbackend = 'x'"))


def test_choices_are_case_insensitive_and_normalised(config):
    path = config("[auth]\njwt_algorithm = 'hs256'\n[store]\nbackend = 'REDIS'")

    settings = load_settings(path, env={})

    assert (settings.auth.jwt_algorithm, settings.store.backend) == ("HS256", "redis")


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_an_asymmetric_algorithm_needs_a_public_key_file(config, algorithm):
    message = config_error(config(f"[auth]\njwt_algorithm = '{algorithm}'"))

    assert "jwt_public_key_file" in message and algorithm in message


def test_an_asymmetric_algorithm_with_a_public_key_file_loads(config, tmp_path):
    write(tmp_path / "jwt.pub", "placeholder")

    settings = load_settings(
        config("[auth]\njwt_algorithm = 'ES256'\njwt_public_key_file = 'jwt.pub'"), env={}
    )

    assert settings.auth.jwt_public_key_file == tmp_path / "jwt.pub"


def test_tls_cert_and_key_go_together(config, tmp_path):
    write(tmp_path / "cert.pem", "placeholder")

    assert "tls_key" in config_error(config("[server]\ntls_cert = 'cert.pem'"))


def test_apns_token_credentials_need_key_id_team_id_and_topic(config, tmp_path):
    write(tmp_path / "k.p8", "placeholder")

    assert "key_id" in config_error(config("[push.apns]\nkey_file = 'k.p8'\ntopic = 'x'"))
    assert "topic" in config_error(
        config("[push.apns]\nkey_file = 'k.p8'\nkey_id = 'K'\nteam_id = 'T'")
    )


@pytest.mark.parametrize("section", ["push.apns", "push.fcm"])
def test_endpoints_must_be_http_or_https(config, section):
    assert f"[{section}] endpoint" in config_error(config(f"[{section}]\nendpoint = 'ftp://x'"))
    for url in ("http://127.0.0.1:8443", "https://api.example.com"):
        load_settings(config(f"[{section}]\nendpoint = '{url}'"), env={})


def test_replace_changes_single_keys_of_a_section():
    settings = Settings().replace(server={"port": 0}, presence={"batch_ms": 10})

    assert settings.server.port == 0
    assert settings.server.host == Settings().server.host
    assert settings.presence.batch_ms == 10


# -- the shipped default file --------------------------------------------------------------


def _without_paths(value: Any) -> Any:
    """A dataclass tree as nested dicts, with every path-valued field left out."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: _without_paths(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not isinstance(getattr(value, f.name), Path)
        }
    return value


def test_the_shipped_default_file_loads_and_equals_the_embedded_defaults():
    path = REPO / "config" / "default.toml"
    settings = load_settings(path, env={})

    assert _without_paths(settings) == _without_paths(Settings())


def test_redis_cluster_is_chosen_in_the_file_or_the_environment(config):
    path = config("[store]\nbackend = 'redis'\nredis_url = 'redis://10.0.0.1:7000'")

    assert load_settings(path, env={}).store.redis_cluster is False
    settings = load_settings(path, env={"GATEWAY__STORE__REDIS_CLUSTER": "true"})
    assert settings.store.redis_cluster is True


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[store]\nredis_cluster = true", ["[store] redis_cluster", 'backend = "redis"']),
        (
            "[store]\nbackend = 'redis'\nredis_cluster = true\nredis_url = 'redis://h:7000/3'",
            ["[store] redis_url", "database 0", "'3'"],
        ),
        ("[store]\nbackend = 'redis'\nredis_cluster = 'yes'", ["[store] redis_cluster"]),
        ("[store]\nbackend = 'redis'\nredis_replicas = -1", ["[store] redis_replicas", "-1"]),
        ("[store]\nbackend = 'redis'\nredis_replicas = 1.5", ["[store] redis_replicas"]),
        ("[store]\nredis_replicas = 1", ["[store] redis_replicas", 'backend = "redis"']),
        (
            "[store]\nbackend = 'redis'\nredis_replica_timeout = 0",
            ["[store] redis_replica_timeout", "positive"],
        ),
    ],
)
def test_a_redis_cluster_setting_that_cannot_work_is_refused(config, text, words):
    message = config_error(config(text))

    assert all(word in message for word in words), message
    assert "gateway.toml" in message, message


def test_redis_replicas_is_read_from_the_file(config):
    path = config("[store]\nbackend = 'redis'\nredis_replicas = 1\nredis_replica_timeout = 0.5")

    store = load_settings(path, env={}).store
    assert (store.redis_replicas, store.redis_replica_timeout) == (1, 0.5)


# -- [push.webpush] -----------------------------------------------------------------------------


def test_webpush_allowed_hosts_default_to_the_browser_push_services():
    hosts = load_settings(None, env={}).push.webpush.allowed_hosts
    assert set(hosts) == {
        "fcm.googleapis.com",
        "updates.push.services.mozilla.com",
        "*.notify.windows.com",
        "web.push.apple.com",
    }


def test_webpush_allowed_hosts_from_a_file_or_the_environment(config):
    path = config('[push.webpush]\nallowed_hosts = ["fcm.googleapis.com", "127.0.0.1"]\n')
    assert load_settings(path, env={}).push.webpush.allowed_hosts == (
        "fcm.googleapis.com",
        "127.0.0.1",
    )
    env = {"GATEWAY__PUSH__WEBPUSH__ALLOWED_HOSTS": "fcm.googleapis.com, ::1"}
    assert load_settings(None, env=env).push.webpush.allowed_hosts == ("fcm.googleapis.com", "::1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('allowed_hosts = ["10.0.0.1"]', "allowed_hosts: '10.0.0.1': not a host name"),
        ('allowed_hosts = ["*.com"]', "allowed_hosts: '*.com': a wildcard"),
        ("allowed_hosts = 5", "allowed_hosts must be an array of strings"),
        ('subject = "ops@example.com"', "subject must be a mailto: or https:// URL"),
        ('vapid_private_key_file = "missing.pem"', "vapid_private_key_file: file not found"),
    ],
)
def test_webpush_errors_name_the_file_and_key(config, text, message):
    path = config(f"[push.webpush]\n{text}\n")
    with pytest.raises(ConfigError, match=f"^{path}: \\[push.webpush\\] ") as caught:
        load_settings(path, env={})
    assert message in str(caught.value)


def test_a_vapid_key_needs_a_subject(config, tmp_path):
    (tmp_path / "vapid.pem").write_text("checked by the provider")
    path = config('[push.webpush]\nvapid_private_key_file = "vapid.pem"\n')
    with pytest.raises(ConfigError, match="subject is required"):
        load_settings(path, env={})
