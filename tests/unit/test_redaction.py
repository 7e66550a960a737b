"""Secrets never leave kcons: connection strings, client configs and library messages are redacted."""

from __future__ import annotations

import logging

import pytest

from kcons.config import (
    KAFKA_SECRET_PROPERTIES,
    KafkaSettings,
    PostgresSettings,
    RedisSettings,
    install_log_redaction,
    redact,
    redact_config,
    redact_text,
    remember_secrets,
    secrets_of,
)
from kcons.errors import ConfigError

SECRET = "S3cr#t?/@:%ü-pw"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://user:SECRET#pw@127.0.0.1:1/db",
        "postgresql://user:SECRET?pw@127.0.0.1:1/db",
        "postgresql://user:SECRET/pw@127.0.0.1:1/db",
        "postgresql://user:SECRET@pw@127.0.0.1:1/db",
        "postgresql://user:SECRET%23pw@127.0.0.1:1/db",
        "postgresql://user@127.0.0.1:1/db?password=SECRETpw&sslmode=disable",
        "postgresql://user@127.0.0.1:1/db?sslpassword=SECRETpw",
        "host=127.0.0.1 password='SECRET pw#' user=u",
        "host=127.0.0.1 password='SECRET pw",
        "host=127.0.0.1 sslpassword=SECRETpw user=u",
        "redis://:SECRET#pw@127.0.0.1:1/0",
        "redis://user:SECRET/pw@127.0.0.1:1/0",
        "rediss://:SECRET%40pw@127.0.0.1:1/0?password=SECRETpw",
    ],
)
def test_redact_hides_passwords_with_special_characters(dsn: str) -> None:
    shown = redact(dsn)
    assert "SECRET" not in shown, shown
    assert "pw" not in shown.replace("password", "").replace("sslpassword", ""), shown


@pytest.mark.parametrize("value", ["postgresql://u:p@h:abc/db", "redis://h:abc/0", "x://[::1", "://", "postgresql://["])
def test_redact_never_raises(value: str) -> None:
    assert isinstance(redact(value), str)


def test_redact_keeps_what_is_not_secret() -> None:
    assert redact("postgresql://app:pw@db.example:5432/shop?sslmode=require") == (
        "postgresql://app:***@db.example:5432/shop?sslmode=require"
    )


def test_secrets_of_reads_the_url_as_the_libraries_do() -> None:
    found = secrets_of("postgresql://u:S%C3%BCper%23pw@h/db")
    assert "Süper#pw" in found and "S%C3%BCper%23pw" in found
    assert "Süper#pw" in secrets_of("host=h password='Süper#pw'")
    assert "p@ss" in secrets_of("redis://:p%40ss@h/0")


@pytest.mark.parametrize(
    "prop",
    [*sorted(KAFKA_SECRET_PROPERTIES), "sasl.oauthbearer.client.secret", "ssl.certificate.pem", "my.api.token"],
)
def test_every_secret_bearing_kafka_property_is_redacted(prop: str) -> None:
    settings = KafkaSettings("a:1", {prop: "TOPSECRETVALUE", "linger.ms": 5})
    assert "TOPSECRETVALUE" not in repr(settings)
    assert redact_config(settings.properties)[prop] == "***"
    assert redact_config(settings.properties)["linger.ms"] == 5


@pytest.mark.parametrize(
    ("url", "setting"),
    [
        ("postgresql://user:SECRET#pw@h:5432/db", "KCONS_POSTGRES_DSN"),
        ("postgresql://user:SECRET/pw@h:5432/db", "KCONS_POSTGRES_DSN"),
        ("postgresql://user:SECRET@pw@h:5432/db", "KCONS_POSTGRES_DSN"),
        ("postgresql://user:SECRET%zzpw@h:5432/db", "KCONS_POSTGRES_DSN"),
        ("host=h password=SECRET pw", "KCONS_POSTGRES_DSN"),
        ("redis://:SECRET#pw@h:1/0", "KCONS_REDIS_URL"),
        ("redis://:SECRET/pw@h:1/0", "KCONS_REDIS_URL"),
    ],
)
def test_ambiguous_urls_are_refused_without_quoting_the_password(url: str, setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        if setting == "KCONS_REDIS_URL":
            RedisSettings(url)
        else:
            PostgresSettings(url)
    assert info.value.setting == setting
    assert "SECRET" not in str(info.value) and "pw" not in str(info.value)


def test_redact_text_removes_every_known_secret_longest_first() -> None:
    assert redact_text("a abcdef b abc c", {"abc", "abcdef"}) == "a *** b *** c"
    assert redact_text("x ab y", {"ab"}) == "x ab y"  # too short to search for in free text


def test_log_records_are_redacted_once_installed(caplog: pytest.LogCaptureFixture) -> None:
    remember_secrets([SECRET])
    install_log_redaction()
    install_log_redaction()  # idempotent
    log = logging.getLogger("kcons.test.redaction")
    with caplog.at_level(logging.DEBUG, logger="kcons.test.redaction"):
        log.warning("connect failed: %s", f"password={SECRET}")
        try:
            raise ValueError(f"bad {SECRET}")
        except ValueError:
            log.exception("boom")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert "connect failed: password=***" in text
    assert SECRET not in text
