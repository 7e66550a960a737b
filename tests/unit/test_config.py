"""Settings fail at start with a message naming the setting, and never leak secrets."""

from __future__ import annotations

import pytest

from kcons.config import KafkaSettings, PostgresSettings, RedisSettings, Settings, env_bool, env_int, redact
from kcons.errors import ConfigError


def test_bad_bootstrap_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        KafkaSettings.from_env({"KCONS_KAFKA_BOOTSTRAP": "localhost"})
    assert info.value.setting == "KCONS_KAFKA_BOOTSTRAP"
    assert "host:port" in str(info.value)


def test_missing_bootstrap_is_reported_as_unset() -> None:
    with pytest.raises(ConfigError, match="KCONS_KAFKA_BOOTSTRAP: is not set"):
        KafkaSettings.from_env({})


def test_bootstrap_list_is_normalised_and_properties_are_kept() -> None:
    s = KafkaSettings.from_env({"KCONS_KAFKA_BOOTSTRAP": " a:9092 , b:9093 ", "KCONS_KAFKA_CONFIG": '{"linger.ms": 5}'})
    assert s.bootstrap_servers == "a:9092,b:9093"
    assert s.client_config(**{"acks": "all"}) == {"bootstrap.servers": "a:9092,b:9093", "linger.ms": 5, "acks": "all"}


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"x"'])
def test_kafka_config_must_be_a_json_object(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        KafkaSettings.from_env({"KCONS_KAFKA_BOOTSTRAP": "a:1", "KCONS_KAFKA_CONFIG": raw})
    assert info.value.setting == "KCONS_KAFKA_CONFIG"


def test_port_out_of_range_is_rejected() -> None:
    with pytest.raises(ConfigError):
        KafkaSettings("host:70000")


def test_redis_url_scheme_is_checked_without_echoing_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        RedisSettings("http://user:hunter2@h:1/0")
    assert info.value.setting == "KCONS_REDIS_URL"
    assert "hunter2" not in str(info.value)


def test_postgres_repr_and_errors_hide_the_password() -> None:
    s = PostgresSettings("postgresql://app:s3cret@db:5432/shop")
    assert "s3cret" not in repr(s)
    with pytest.raises(ConfigError) as info:
        PostgresSettings("mysql://app:s3cret@db/shop")
    assert "s3cret" not in str(info.value)
    assert info.value.setting == "KCONS_POSTGRES_DSN"


def test_pool_bounds_are_validated_by_name() -> None:
    with pytest.raises(ConfigError) as info:
        PostgresSettings("dbname=x", pool_max=0)
    assert info.value.setting == "pool_max"


def test_kafka_properties_with_secrets_are_redacted_in_repr() -> None:
    s = KafkaSettings("a:1", {"sasl.password": "topsecret", "sasl.username": "svc"})
    assert "topsecret" not in repr(s)
    assert "svc" in repr(s)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://u:pw@h:5/db", "postgresql://u:***@h:5/db"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("host=h password=pw dbname=d", "host=h password=*** dbname=d"),
        ("host=h password='p w' dbname=d", "host=h password=*** dbname=d"),
        ("redis://h:1/0", "redis://h:1/0"),
    ],
)
def test_redact_removes_passwords(raw: str, expected: str) -> None:
    assert redact(raw) == expected


def test_integer_and_boolean_settings_name_themselves_when_wrong() -> None:
    with pytest.raises(ConfigError, match="KCONS_X: expected an integer"):
        env_int("KCONS_X", 1, environ={"KCONS_X": "ten"})
    with pytest.raises(ConfigError, match="KCONS_X: must be >= 2"):
        env_int("KCONS_X", 5, minimum=2, environ={"KCONS_X": "1"})
    with pytest.raises(ConfigError, match="KCONS_B: expected true or false"):
        env_bool("KCONS_B", True, environ={"KCONS_B": "maybe"})
    assert env_bool("KCONS_B", True, environ={"KCONS_B": "off"}) is False
    assert env_int("KCONS_X", 7, environ={"KCONS_X": " "}) == 7


def test_settings_from_env_builds_only_what_is_configured() -> None:
    s = Settings.from_env({"KCONS_REDIS_URL": "redis://h:1/0"})
    assert s.kafka is None and s.postgres is None
    assert s.redis is not None and s.redis.url == "redis://h:1/0"
