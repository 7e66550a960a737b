"""Relay settings fail at construction, naming the KCONS_* setting, and never print the DSN password."""

from __future__ import annotations

import pytest

from kcons.config import KafkaSettings
from kcons.errors import ConfigError
from kcons.outbox.relay import RelaySettings

BASE = {"KCONS_POSTGRES_DSN": "postgresql://u:s3cret@db:5432/app", "KCONS_KAFKA_BOOTSTRAP": "k:9092"}


def test_defaults_from_the_environment() -> None:
    s = RelaySettings.from_env(BASE)
    assert (s.table, s.name, s.mode, s.batch_size, s.retention_s, s.topic) == (
        "kcons_outbox", "default", "transactional", 1000, None, None,
    )  # fmt: skip
    assert s.kafka.bootstrap_servers == "k:9092"


def test_flags_override_the_environment() -> None:
    s = RelaySettings.from_env(BASE, bootstrap="other:9093", batch_size=50, topic="t", mode=None)
    assert (s.kafka.bootstrap_servers, s.batch_size, s.topic, s.mode) == ("other:9093", 50, "t", "transactional")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KCONS_OUTBOX_BATCH_SIZE", "0"),
        ("KCONS_OUTBOX_BATCH_SIZE", "many"),
        ("KCONS_OUTBOX_MODE", "exactly-once"),
        ("KCONS_OUTBOX_TABLE", "Bad-Name"),
        ("KCONS_OUTBOX_NAME", "has space"),
        ("KCONS_OUTBOX_LEASE_TTL_S", "0.1"),
        ("KCONS_OUTBOX_RETENTION_S", "-1"),
        ("KCONS_OUTBOX_METRICS_PORT", "70000"),
        ("KCONS_METRICS_PORT", "70000"),
    ],
)
def test_bad_values_name_their_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        RelaySettings.from_env({**BASE, name: value})
    assert info.value.setting == name


@pytest.mark.parametrize("missing", ["KCONS_POSTGRES_DSN", "KCONS_KAFKA_BOOTSTRAP"])
def test_missing_connection_settings_are_named(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError) as info:
        RelaySettings.from_env(env)
    assert info.value.setting == missing


def test_repr_hides_the_database_password() -> None:
    s = RelaySettings(dsn=BASE["KCONS_POSTGRES_DSN"], kafka=KafkaSettings("k:9092"))
    assert "s3cret" not in repr(s) and "***" in repr(s)


def test_the_relay_reads_the_shared_metrics_address_unless_its_own_is_set() -> None:
    shared = RelaySettings.from_env({**BASE, "KCONS_METRICS_PORT": "9400", "KCONS_METRICS_HOST": "0.0.0.0"})
    assert (shared.metrics_port, shared.metrics_host) == (9400, "0.0.0.0")
    own = RelaySettings.from_env(
        {**BASE, "KCONS_METRICS_PORT": "9400", "KCONS_METRICS_HOST": "0.0.0.0", "KCONS_OUTBOX_METRICS_PORT": "9401"}
    )
    assert (own.metrics_port, own.metrics_host) == (9401, "127.0.0.1"), "host and port come from one source"
    assert RelaySettings.from_env(BASE).metrics_port is None
    assert RelaySettings.from_env({**BASE, "KCONS_METRICS_PORT": "0"}).metrics_port is None, "0 is off, as elsewhere"


AMQP = {"KCONS_POSTGRES_DSN": BASE["KCONS_POSTGRES_DSN"], "KCONS_OUTBOX_SINK": "rabbitmq"}


def test_rabbitmq_sink_needs_no_kafka_and_redacts_the_amqp_password() -> None:
    s = RelaySettings.from_env({**AMQP, "KCONS_AMQP_URL": "amqp://relay:pa55word@mq:5672/%2F"})
    assert (s.sink, s.kafka, s.amqp_exchange) == ("rabbitmq", None, "kcons.outbox")
    assert "pa55word" not in repr(s) and "mq:5672" in repr(s)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({}, "KCONS_AMQP_URL"),
        ({"KCONS_AMQP_URL": "http://mq:5672/"}, "KCONS_AMQP_URL"),
        ({"KCONS_AMQP_URL": "amqp://u:p@mq:99999/"}, "KCONS_AMQP_URL"),
        ({"KCONS_AMQP_URL": "amqp://mq/", "KCONS_AMQP_EXCHANGE": "has space"}, "KCONS_AMQP_EXCHANGE"),
        ({"KCONS_OUTBOX_SINK": "carrier-pigeon"}, "KCONS_OUTBOX_SINK"),
    ],
)
def test_bad_rabbitmq_settings_name_the_setting_and_hide_the_password(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        RelaySettings.from_env({**AMQP, **env})
    assert info.value.setting == setting
    assert "p@" not in str(info.value)


def test_kafka_sink_still_requires_the_bootstrap() -> None:
    with pytest.raises(ConfigError) as info:
        RelaySettings.from_env({"KCONS_POSTGRES_DSN": BASE["KCONS_POSTGRES_DSN"]})
    assert info.value.setting == "KCONS_KAFKA_BOOTSTRAP"
