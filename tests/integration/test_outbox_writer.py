"""The outbox writer joins the caller's transaction on psycopg, SQLAlchemy and sqlite3; the SQLite relay publishes."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from kcons.config import KafkaSettings
from kcons.envelope import Envelope, read_envelope
from kcons.outbox import OutboxRelay, OutboxUsageError, add, add_many, install_schema

pytestmark = pytest.mark.integration


def _event(aggregate: str, version: int, **headers: str) -> Envelope:
    return Envelope.of("Shipped", "order", aggregate, {"v": version}, version=version, headers=headers or None)


def _sa_engine(dsn: str) -> sa.Engine:
    return sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))


@pytest.fixture
def outbox_db(fresh_database: Callable[[], str]) -> str:
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
    return dsn


def _advisory_locks(conn: Any) -> tuple[Any, ...] | None:
    """Advisory locks held in this connection's database (pg_locks is server-wide; the server is shared)."""
    return conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()


def _rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT id::text, aggregatetype, aggregateid, type, payload, headers, version, txid::text, position "
            "FROM kcons_outbox ORDER BY position"
        ).fetchall()


def test_psycopg_event_commits_and_rolls_back_with_the_business_transaction(outbox_db: str) -> None:
    kept, dropped = _event("o-1", 1, tenant="t1"), _event("o-2", 1)
    with psycopg.connect(outbox_db) as conn:
        add(conn, dropped)
        conn.rollback()
        add(conn, kept)
        xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        conn.commit()
    rows = _rows(outbox_db)
    assert len(rows) == 1
    row = rows[0]
    assert row[:5] == (kept.id, "order", "o-1", "Shipped", b'{"v":1}')  # Debezium outbox columns
    assert row[5] == {"tenant": "t1"} and row[6] == 1
    assert xid is not None and row[7] == xid[0]  # the writing transaction's id


def test_psycopg_autocommit_without_a_transaction_is_refused(outbox_db: str) -> None:
    with psycopg.connect(outbox_db, autocommit=True) as conn:
        with pytest.raises(OutboxUsageError):
            add(conn, _event("o-3", 1))
        with conn.transaction():
            add(conn, _event("o-3", 1))
    assert len(_rows(outbox_db)) == 1


def test_add_many_keeps_the_given_order(outbox_db: str) -> None:
    events = [_event("o-4", v) for v in range(1, 6)]
    with psycopg.connect(outbox_db) as conn:
        assert add_many(conn, events) == 5
        conn.commit()
    assert [r[0] for r in _rows(outbox_db)] == [e.id for e in events]


def test_sqlalchemy_session_joins_the_session_transaction(outbox_db: str) -> None:
    engine = _sa_engine(outbox_db)
    try:
        kept, dropped = _event("s-1", 1), _event("s-2", 1)
        with Session(engine) as session:
            add(session, dropped)
            session.rollback()
            add(session, kept)
            session.commit()
        with engine.connect() as conn:
            add(conn, _event("s-3", 1))
            conn.rollback()
        with engine.begin() as conn:
            add(conn, _event("s-4", 1))
    finally:
        engine.dispose()
    assert [r[2] for r in _rows(outbox_db)] == ["s-1", "s-4"]


def test_sqlalchemy_on_sqlite_and_plain_sqlite3(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    with sqlite3.connect(path) as db:
        install_schema(db)
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with Session(engine) as session:
            add(session, _event("q-1", 1))
            session.commit()
    finally:
        engine.dispose()
    db = sqlite3.connect(path)
    try:
        add(db, _event("q-2", 1))
        db.rollback()
        add(db, _event("q-3", 1))
        db.commit()
        got = [r[0] for r in db.execute("SELECT aggregateid FROM kcons_outbox ORDER BY position")]
    finally:
        db.close()
    assert got == ["q-1", "q-3"]


def test_sqlite_relay_publishes_committed_events_in_commit_order(
    tmp_path: Path, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=2)
    path = str(tmp_path / "embedded.db")
    db = sqlite3.connect(path)
    install_schema(db)
    relay = OutboxRelay.for_sqlite(path, KafkaSettings(kafka_bootstrap), topic=topic)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    expected: list[str] = []
    try:
        for txn in range(20):
            events = [_event(f"e{txn % 3}", txn * 5 + i) for i in range(5)]
            add_many(db, events)
            if txn % 4 == 3:
                db.rollback()
                continue
            db.commit()
            expected.extend(e.id for e in events)
        deadline = time.monotonic() + 60
        while relay.published < len(expected) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        relay.stop()
        thread.join(30)
        db.close()
    assert relay.published == len(expected)
    consumer = make_consumer()
    consumer.subscribe([topic])
    got: list[Envelope] = []
    deadline = time.monotonic() + 30
    while len(got) < len(expected) and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.5):
            env = read_envelope(msg.key(), msg.value(), msg.headers())
            assert env is not None
            got.append(env)
    assert sorted(e.id for e in got) == sorted(expected)
    for agg in {e.aggregate_id for e in got}:
        ids = [e.id for e in got if e.aggregate_id == agg]
        assert ids == [i for i in expected if i in set(ids)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_relay_publishes_serves_metrics_and_stops_on_sigterm(
    fresh_database: Callable[[], str], kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    dsn = fresh_database()
    topic = unique_topic()
    init = subprocess.run(
        [sys.executable, "-m", "kcons.cli", "outbox", "init", "--dsn", dsn], capture_output=True, text=True, timeout=60
    )
    assert init.returncode == 0, init.stderr
    with psycopg.connect(dsn) as conn:
        add_many(conn, [_event("cli", v) for v in range(3)])
        conn.commit()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kcons.cli", "outbox", "relay", "--dsn", dsn, "--bootstrap", kafka_bootstrap,
         "--topic", topic, "--metrics-port", str(port), "--name", "cli-test"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ),
    )  # fmt: skip
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                body = ""
            if 'kcons_outbox_published_total{relay="cli-test"} 3.0' in body:
                break
            time.sleep(0.2)
        assert 'kcons_outbox_published_total{relay="cli-test"} 3.0' in body
        assert 'kcons_outbox_is_leader{relay="cli-test"} 1.0' in body
        assert "kcons_outbox_publish_latency_seconds_bucket" in body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            assert resp.status == 200
            assert "leader" in resp.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-2000:]
    with psycopg.connect(dsn) as conn:
        left = conn.execute("SELECT count(*) FROM kcons_outbox").fetchone()
        holders = _advisory_locks(conn)
    assert left == (0,) and holders == (0,)  # published, and the lease was released on the way out


def test_cli_purge_deletes_only_published_rows_past_retention(outbox_db: str) -> None:
    with psycopg.connect(outbox_db) as conn:
        add_many(conn, [_event("p", v) for v in range(4)])
        conn.commit()
        conn.execute("UPDATE kcons_outbox SET published_at = now() - interval '1 hour' WHERE version < 2")
        conn.execute("UPDATE kcons_outbox SET published_at = now() WHERE version = 2")
        conn.commit()
    run = subprocess.run(
        [sys.executable, "-m", "kcons.cli", "outbox", "purge", "--dsn", outbox_db, "--older-than", "600"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "purged 2 " in run.stdout
    with psycopg.connect(outbox_db) as conn:
        left = conn.execute("SELECT version, published_at IS NULL FROM kcons_outbox ORDER BY version").fetchall()
    assert left == [(2, False), (3, True)]


def test_cli_relays_a_sqlite_outbox(
    tmp_path: Path, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic()
    path = str(tmp_path / "cli.db")
    init = subprocess.run(
        [sys.executable, "-m", "kcons.cli", "outbox", "init", "--sqlite", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    events = [_event("sq", v) for v in range(5)]
    with sqlite3.connect(path) as db:
        add_many(db, events)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kcons.cli", "outbox", "relay", "--sqlite", path, "--bootstrap", kafka_bootstrap,
         "--topic", topic],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        consumer = make_consumer()
        consumer.subscribe([topic])
        got: list[str] = []
        deadline = time.monotonic() + 60
        while len(got) < 5 and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.5):
                env = read_envelope(msg.key(), msg.value(), msg.headers())
                assert env is not None
                got.append(env.id)
    finally:
        proc.send_signal(signal.SIGTERM)  # a graceful stop marks what Kafka acknowledged
        out, _ = proc.communicate(timeout=60)
    assert got == [e.id for e in events]
    assert proc.returncode == 0, out.decode()[-2000:]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM kcons_outbox").fetchone() == (0,)


def test_cli_relay_takes_its_lease_from_raft(
    tmp_path: Path, outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    from kcons.raft.cluster import LocalRaftCluster

    secret = b"outbox-cli-raft-secret-0123456789"
    topic = unique_topic()
    with psycopg.connect(outbox_db) as conn:
        add_many(conn, [_event("raft", v) for v in range(4)])
        conn.commit()
    with LocalRaftCluster(3, tmp_path / "raft", secret) as cluster:
        cluster.wait_for_leader()
        env = dict(os.environ, KCONS_RAFT_SECRET=secret.decode())
        proc = subprocess.Popen(
            [sys.executable, "-m", "kcons.cli", "outbox", "relay", "--dsn", outbox_db, "--bootstrap", kafka_bootstrap,
             "--topic", topic, "--lease-backend", "raft", "--raft-peers", cluster.peers_spec, "--name", "via-raft"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            left: tuple[Any, ...] | None = None
            while time.monotonic() < deadline:
                with psycopg.connect(outbox_db) as conn:
                    left = conn.execute("SELECT count(*) FROM kcons_outbox").fetchone()
                    advisory = _advisory_locks(conn)
                    fence = conn.execute("SELECT token FROM kcons_outbox_fence WHERE name = 'via-raft'").fetchone()
                if left == (0,):
                    break
                time.sleep(0.2)
            assert left == (0,)
            assert advisory == (0,)  # leadership did not come from PostgreSQL
            assert fence is not None and fence[0] >= 1  # the Raft grant's token fenced the marks
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-2000:]
