"""`kcons audit outbox` on real PostgreSQL and Kafka: a deleted row, a row lost after marking, a stuck row and
excess copies are each reported (exit 1); a clean outbox with retention reports none; one re-publish is allowed."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from kcons.cli import main
from kcons.config import KafkaSettings
from kcons.envelope import Envelope
from kcons.outbox import OutboxRelay, RelaySettings, add, install_schema


@pytest.fixture
def outbox_db(kcons_fresh_database: Callable[[], str]) -> str:
    dsn = kcons_fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
    return dsn


def _write(dsn: str, events: list[Envelope]) -> None:
    with psycopg.connect(dsn) as conn:
        for e in events:
            add(conn, e)
        conn.commit()


def _events(aggregate: str, versions: range) -> list[Envelope]:
    return [Envelope.of("AccountChanged", "account", aggregate, {"v": v}, version=v) for v in versions]


@contextlib.contextmanager
def _relay(dsn: str, bootstrap: str, topic: str) -> Iterator[OutboxRelay]:
    settings = RelaySettings(
        dsn=dsn, kafka=KafkaSettings(bootstrap), topic=topic, poll_interval_s=0.2, retention_s=3600.0
    )
    relay = OutboxRelay.for_postgres(settings)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(60)


def _publish_all(dsn: str, bootstrap: str, topic: str, want: int) -> None:
    with _relay(dsn, bootstrap, topic) as relay:
        deadline = time.monotonic() + 60
        while relay.published < want:
            assert time.monotonic() < deadline, "relay did not publish"
            time.sleep(0.05)


def _audit(dsn: str, bootstrap: str, topic: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(
        main,
        ["audit", "outbox", "--dsn", dsn, "--bootstrap", bootstrap, "--topic", topic, "--relay-topic", topic,
         "--json", *args],
    )  # fmt: skip
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output.strip().splitlines()[-1])


def test_a_clean_outbox_with_retention_reports_no_violation(
    outbox_db: str, kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic(partitions=2)
    _write(outbox_db, _events("a", range(1, 6)) + _events("b", range(1, 4)))
    _publish_all(outbox_db, kcons_kafka_bootstrap, topic, 8)
    code, report = _audit(outbox_db, kcons_kafka_bootstrap, topic, "--versions", "strict")
    assert code == 0, report
    assert report["rows"] == report["published_rows"] == report["topic_records"] == 8
    assert report["stuck"] == report["missing"] == report["excess_copies"] == report["gaps"] == 0


def test_a_row_deleted_before_publishing_shows_as_a_version_gap(
    outbox_db: str, kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic()
    events = _events("a", range(1, 6))
    _write(outbox_db, events)
    with psycopg.connect(outbox_db, autocommit=True) as conn:
        conn.execute("DELETE FROM kcons_outbox WHERE id = %s", (events[2].id,))  # version 3, never published
    _publish_all(outbox_db, kcons_kafka_bootstrap, topic, 4)
    code, report = _audit(outbox_db, kcons_kafka_bootstrap, topic, "--versions", "strict")
    assert code == 1 and report["gaps"] == 1
    (gap,) = report["version_list"]
    assert (gap["aggregate"], gap["previous"], gap["version"]) == ("account/a", 2, 4)


def test_a_row_marked_published_but_not_on_the_topic_is_missing(
    outbox_db: str, kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic()
    _write(outbox_db, _events("a", range(1, 4)))
    _publish_all(outbox_db, kcons_kafka_bootstrap, topic, 3)
    lost = _events("b", range(1, 2))
    _write(outbox_db, lost)
    with psycopg.connect(outbox_db, autocommit=True) as conn:  # marked behind the relay's back: never sent
        conn.execute("UPDATE kcons_outbox SET published_at = now() WHERE id = %s", (lost[0].id,))
    code, report = _audit(outbox_db, kcons_kafka_bootstrap, topic)
    assert code == 1 and report["missing"] == 1 and report["missing_list"] == [lost[0].id]


def test_a_committed_row_never_published_is_stuck_with_its_age(
    outbox_db: str, kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic()
    _write(outbox_db, _events("a", range(1, 3)))
    time.sleep(1.2)
    code, report = _audit(outbox_db, kcons_kafka_bootstrap, topic, "--grace", "1")
    assert code == 1 and report["stuck"] == 2 and all(s["age_s"] >= 1 for s in report["stuck_list"])
    code, report = _audit(outbox_db, kcons_kafka_bootstrap, topic, "--grace", "600")
    assert code == 0 and report["in_flight"] == 2


def test_one_republish_is_allowed_and_more_copies_are_reported(
    outbox_db: str, kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic()
    events = _events("a", range(1, 4))
    _write(outbox_db, events)
    _publish_all(outbox_db, kcons_kafka_bootstrap, topic, 3)
    raw = Producer({"bootstrap.servers": kcons_kafka_bootstrap})
    raw.produce(topic, events[0].payload, events[0].key, headers=events[0].headers())  # a crash's re-publish
    raw.flush(30)
    code, report = _audit(outbox_db, kcons_kafka_bootstrap, topic)
    assert code == 0 and report["republished"] == 1 and report["excess_copies"] == 0
    raw.produce(topic, events[0].payload, events[0].key, headers=events[0].headers())  # beyond the bound
    raw.flush(30)
    code, report = _audit(outbox_db, kcons_kafka_bootstrap, topic)
    assert code == 1 and report["excess_list"] == [{"id": events[0].id, "copies": 3}]
    code, report = _audit(outbox_db, kcons_kafka_bootstrap, topic, "--max-copies", "3")
    assert code == 0
