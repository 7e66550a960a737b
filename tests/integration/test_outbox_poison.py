"""Poison outbox rows on real PostgreSQL, SQLite and Kafka: dead-lettered with a reason naming the row,
later rows of their aggregate held back in order, every other row published, the relay never stops."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import test_outbox_relay
from test_outbox_relay import _running, _wait_for

from kcons.adapters.postgres import PostgresOutboxStore
from kcons.adapters.sqlite import SqliteOutboxStore
from kcons.config import KafkaSettings
from kcons.envelope import Envelope, read_envelope
from kcons.outbox import OutboxRelay, RelaySettings, add, install_schema

pytestmark = [pytest.mark.integration]

outbox_db = test_outbox_relay.outbox_db  # the same fixture: a fresh database with the outbox schema


def _event(aggregate: str, version: int, payload: bytes | None = None) -> Envelope:
    return Envelope.of("Changed", "account", aggregate, payload if payload is not None else {"v": version},
                       version=version)  # fmt: skip


def _read(make_consumer: Callable[..., Any], topic: str, want: int) -> list[tuple[str, int | None]]:
    consumer = make_consumer(isolation_level="read_committed")
    consumer.subscribe([topic])
    got: list[tuple[str, int | None]] = []
    deadline = time.monotonic() + 60
    quiet = time.monotonic()
    while time.monotonic() < deadline:
        msgs = consumer.consume(100, 0.2)
        for msg in msgs:
            env = read_envelope(msg.key(), msg.value(), msg.headers())
            assert env is not None
            got.append((env.aggregate_id, env.version))
        if msgs:
            quiet = time.monotonic()
        elif len(got) >= want and time.monotonic() - quiet > 1.5:
            break
    return got


def _pg_relay(dsn: str, bootstrap: str, topic: str | None, **kw: Any) -> OutboxRelay:
    settings = RelaySettings(dsn=dsn, kafka=KafkaSettings(bootstrap), topic=topic, poll_interval_s=0.3, **kw)
    return OutboxRelay.for_postgres(settings)


def _dead(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT aggregateid, reason FROM kcons_outbox_dead ORDER BY position").fetchall()
    return [(str(a), str(r)) for a, r in rows]


@pytest.mark.parametrize("mode", ["transactional", "idempotent"])
def test_a_row_too_large_for_its_topic_is_dead_lettered_and_its_aggregate_held_until_resolved(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any],
    mode: str,
) -> None:  # fmt: skip
    topic = unique_topic(partitions=1, config={"max.message.bytes": "2000"})
    big = _event("b", 1, os.urandom(5000))  # random: the relay compresses, and it must not fit compressed either
    with psycopg.connect(outbox_db) as conn:
        add(conn, _event("a", 1))
        add(conn, big)
        add(conn, _event("b", 2))
        add(conn, _event("c", 1))
        conn.commit()
    with _running(_pg_relay(outbox_db, kafka_bootstrap, topic, mode=mode)) as relay:
        _wait_for("the good rows and the dead ones", lambda: relay.published == 2 and relay.dead_lettered == 2)
        dead = _dead(outbox_db)
        assert [a for a, _ in dead] == ["b", "b"]
        assert f"id={big.id}" in dead[0][1] and "MSG_SIZE_TOO_LARGE" in dead[0][1], dead
        assert dead[1][1].startswith("held:"), dead
        with psycopg.connect(outbox_db) as conn:  # a later row of the held aggregate is held too
            add(conn, _event("b", 3))
            add(conn, _event("d", 1))
            conn.commit()
        _wait_for("the next good row", lambda: relay.published == 3 and relay.dead_lettered == 3)
        store = PostgresOutboxStore(outbox_db)
        try:
            position = store.dead_rows()[0]["position"]
            assert store.resolve_dead(position, drop=True) == 2  # the operator gives up on the big row
        finally:
            store.close()
        _wait_for("the held rows, in order", lambda: relay.published == 5)
    assert _dead(outbox_db) == []
    got = _read(make_consumer, topic, want=5)
    assert sorted(set(got)) == [("a", 1), ("b", 2), ("b", 3), ("c", 1), ("d", 1)]
    b_order = [v for a, v in dict.fromkeys(got) if a == "b"]
    assert b_order == [2, 3]


def test_an_invalid_topic_name_and_json_array_headers_are_dead_lettered_with_their_row_named(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=1)
    bad_topic, bad_headers = _event("x", 1), _event("y", 1)
    with psycopg.connect(outbox_db) as conn:
        add(conn, _event("a", 1), topic=topic)
        add(conn, bad_topic, topic="no spaces allowed!")
        add(conn, bad_headers, topic=topic)
        conn.execute("UPDATE kcons_outbox SET headers = '[1, 2]'::jsonb WHERE id = %s", (bad_headers.id,))
        add(conn, _event("c", 1), topic=topic)
        conn.commit()
    with _running(_pg_relay(outbox_db, kafka_bootstrap, None)) as relay:
        _wait_for("the good rows and the dead ones", lambda: relay.published == 2 and relay.dead_lettered == 2)
    dead = dict(_dead(outbox_db))
    assert f"id={bad_topic.id}" in dead["x"] and "invalid Kafka topic name" in dead["x"], dead
    assert f"id={bad_headers.id}" in dead["y"] and "JSON object" in dead["y"], dead
    assert sorted(_read(make_consumer, topic, want=2)) == [("a", 1), ("c", 1)]


def test_sqlite_rows_with_bad_json_headers_or_a_text_payload_are_dead_lettered_and_retried(
    tmp_path: Path, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=1)
    path = str(tmp_path / f"outbox-{uuid.uuid4().hex[:6]}.db")
    db = sqlite3.connect(path)
    install_schema(db)
    bad_json, text_payload = _event("j", 1), _event("t", 1)
    with db:
        for event in [_event("a", 1), bad_json, text_payload, _event("t", 2), _event("c", 1)]:
            add(db, event)
        db.execute("UPDATE kcons_outbox SET headers = '{not json' WHERE id = ?", (bad_json.id,))
        db.execute("UPDATE kcons_outbox SET payload = 'plain text' WHERE id = ?", (text_payload.id,))
    relay = OutboxRelay.for_sqlite(path, KafkaSettings(kafka_bootstrap), topic=topic)
    with _running(relay):
        _wait_for("the good rows and the dead ones", lambda: relay.published == 2 and relay.dead_lettered == 3)
        store = SqliteOutboxStore(path)
        try:
            dead = {r["aggregateid"] + str(i): r["reason"] for i, r in enumerate(store.dead_rows())}
            assert f"id={bad_json.id}" in dead["j0"] and "not valid JSON" in dead["j0"], dead
            assert f"id={text_payload.id}" in dead["t1"] and "TEXT" in dead["t1"], dead
            assert dead["t2"].startswith("held:"), dead
            with db:  # the operator repairs the payload, then retries the aggregate
                db.execute("UPDATE kcons_outbox_dead SET payload = CAST(payload AS BLOB) WHERE id = ?",
                           (text_payload.id,))  # fmt: skip
            assert store.resolve_dead(int(store.dead_rows()[1]["position"]), drop=False) == 2
        finally:
            store.close()
        _wait_for("the retried aggregate", lambda: relay.published == 4)
    got = _read(make_consumer, topic, want=4)
    assert got == [("a", 1), ("c", 1), ("t", 1), ("t", 2)]
    db.close()


def test_the_dead_commands_list_and_put_an_aggregate_back_in_order(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kcons.cli import main

    path = str(tmp_path / "dead.db")
    db = sqlite3.connect(path)
    install_schema(db)
    events = [_event("a", 1), _event("a", 2), _event("b", 1)]
    with db:
        for event in events:
            add(db, event)
    store = SqliteOutboxStore(path)
    rows = store.fetch(10)
    store.claim_fence("cli", 1, "test")
    store.dead_letter([(rows[0], "poison: test"), (rows[1], "held: behind")], name="cli", token=1)
    runner = CliRunner()
    listed = runner.invoke(main, ["outbox", "dead", "list", "--sqlite", path])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["reason"] for line in listed.output.splitlines()] == ["poison: test", "held: behind"]
    missing = runner.invoke(main, ["outbox", "dead", "retry", "--sqlite", path, "999"])
    assert missing.exit_code != 0 and "no dead outbox row at position 999" in missing.output
    dropped = runner.invoke(main, ["outbox", "dead", "drop", "--sqlite", path, str(rows[0].position)])
    assert dropped.exit_code == 0 and "1 row(s)" in dropped.output, dropped.output
    back = [(r.position, r.id) for r in store.fetch(10)]
    assert back == [(rows[1].position, events[1].id), (rows[2].position, events[2].id)]
    assert store.dead_rows() == []
    store.close()
    db.close()


def test_a_relay_on_a_schema_without_the_dead_letter_table_says_to_run_init(outbox_db: str, tmp_path: Path) -> None:
    from kcons.errors import ConfigError

    with psycopg.connect(outbox_db, autocommit=True) as conn:
        conn.execute("DROP TABLE kcons_outbox_dead")  # as an outbox installed by schema version 2
    store = PostgresOutboxStore(outbox_db)
    with pytest.raises(ConfigError, match="kcons outbox init"):
        store.fetch(10)
    store.close()
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as db:
        install_schema(db)
        db.execute("DROP TABLE kcons_outbox_dead")
    lite = SqliteOutboxStore(path)
    with pytest.raises(ConfigError, match="kcons outbox init"):
        lite.fetch(10)
    lite.close()


def test_reads_hold_an_aggregate_as_soon_as_another_leader_dead_lettered_one_of_its_rows(outbox_db: str) -> None:
    with psycopg.connect(outbox_db) as conn:
        for aggregate, version in [("a", 1), ("b", 1), ("b", 2), ("c", 1)]:
            add(conn, _event(aggregate, version))
        conn.commit()
    store, other = PostgresOutboxStore(outbox_db), PostgresOutboxStore(outbox_db)
    try:
        store.claim_fence("n", 1, "me")
        first = store.fetch(1)  # the dead-letter table is empty: this read checks no row
        assert [(r.aggregateid, r.held) for r in first] == [("a", False)]
        store.mark_published(first, name="n", token=1, retain=False)
        other.claim_fence("n", 2, "newer leader")  # a newer leader dead-letters b's first row
        poison = next(r for r in other.fetch(10) if r.aggregateid == "b")
        other.dead_letter([(poison, "poison")], name="n", token=2)
        hinted = store.fetch(10)  # a read above the hint, then one from the start
        store.forget_position()
        plain = store.fetch(10)
        for batch in (hinted, plain):
            assert [(r.aggregateid, r.version, r.held) for r in batch] == [("b", 2, True), ("c", 1, False)]
        other.resolve_dead(poison.position, drop=False)  # the aggregate goes back: nothing held any more
        store.forget_position()
        assert [(r.aggregateid, r.version, r.held) for r in store.fetch(10)] == [
            ("b", 1, False), ("b", 2, False), ("c", 1, False)
        ]  # fmt: skip
    finally:
        store.close()
        other.close()
