"""``kcons outbox init`` never gets in the application's way (real PostgreSQL).

It runs as an init container on every relay start, so with an application transaction open on
the outbox table it must return at once (the schema is current: a no-op that takes no table
lock), and the application's INSERTs must never wait for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import psycopg
import pytest
from click.testing import CliRunner

from kcons.cli import main
from kcons.outbox.schema import SCHEMA_VERSION, postgres_ddl, schema_is_current

pytestmark = pytest.mark.integration


def _insert(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute(
        "INSERT INTO kcons_outbox (id, aggregatetype, aggregateid, type, payload)"
        " VALUES (%s, 'order', 'o1', 'Placed', '')",
        (uuid.uuid4(),),
    )


def _init(dsn: str, *args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = CliRunner().invoke(main, ["outbox", "init", "--dsn", dsn, *args])
    return result.exit_code, result.output, time.monotonic() - started


def _triggers(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_trigger"
            " WHERE tgrelid = 'kcons_outbox'::regclass AND tgname = 'kcons_outbox_notify'"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def dsn(fresh_database: Callable[[], str]) -> str:
    return fresh_database()


def test_init_applies_once_then_reports_current(dsn: str) -> None:
    code, out, _ = _init(dsn)
    assert code == 0, out
    assert "applied" in out
    with psycopg.connect(dsn) as conn:
        assert schema_is_current(conn)
        row = conn.execute("SELECT version FROM kcons_schema WHERE component = 'outbox:kcons_outbox'").fetchone()
    assert row == (SCHEMA_VERSION,)
    code, out, _ = _init(dsn)
    assert code == 0 and "already current" in out, out
    assert _triggers(dsn) == 1


def test_init_is_a_no_op_while_an_application_transaction_holds_the_table(dsn: str) -> None:
    assert _init(dsn)[0] == 0
    app = psycopg.connect(dsn)
    writer = psycopg.connect(dsn, autocommit=True)
    writer.execute("SET statement_timeout = '500ms'")  # a blocked INSERT would be cancelled: the test fails
    failures: list[BaseException] = []
    inserted = 0
    done = threading.Event()

    def write() -> None:
        nonlocal inserted
        while not done.is_set():
            try:
                _insert(writer)
                inserted += 1
            except BaseException as exc:  # recorded and asserted below
                failures.append(exc)
                return

    try:
        _insert(app)  # open transaction holding ROW EXCLUSIVE on the outbox table
        thread = threading.Thread(target=write)
        thread.start()
        try:
            for _ in range(3):
                code, out, elapsed = _init(dsn)
                assert code == 0 and "already current" in out, out
                assert elapsed < 1.0, f"init took {elapsed:.2f}s"
            # The real entry point too, as the init container runs it.
            proc = subprocess.run(
                [sys.executable, "-m", "kcons.cli", "outbox", "init", "--dsn", dsn],
                capture_output=True, text=True, timeout=60, env={**os.environ, "KCONS_LOG_LEVEL": "WARNING"},
            )  # fmt: skip
            assert proc.returncode == 0 and "already current" in proc.stdout, proc.stderr
        finally:
            done.set()
            thread.join(10)
        app.commit()
    finally:
        app.close()
        writer.close()
    assert failures == []
    assert inserted > 0


def test_upgrade_of_an_unversioned_schema_takes_no_table_lock(dsn: str) -> None:
    """A schema installed before versions were recorded: init records it without locking the table."""
    assert _init(dsn)[0] == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE kcons_schema")
    app = psycopg.connect(dsn)
    try:
        _insert(app)
        code, out, elapsed = _init(dsn, "--lock-timeout", "0.5")
        assert code == 0 and "applied" in out, out
        assert elapsed < 1.0, f"init took {elapsed:.2f}s"
        app.commit()
    finally:
        app.close()
    assert _triggers(dsn) == 1


def test_init_gives_up_after_lock_timeout_with_a_clear_error(dsn: str) -> None:
    """A missing trigger needs a table lock: init waits --lock-timeout, then fails and changes nothing."""
    assert _init(dsn)[0] == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TRIGGER kcons_outbox_notify ON kcons_outbox")
        conn.execute("DELETE FROM kcons_schema")
    app = psycopg.connect(dsn)
    try:
        _insert(app)
        code, out, elapsed = _init(dsn, "--lock-timeout", "0.3")
        assert code == 1, out
        assert "lock_timeout" in out and "Nothing was changed" in out
        assert elapsed < 1.5
        app.commit()
    finally:
        app.close()
    with psycopg.connect(dsn) as conn:
        assert not schema_is_current(conn)
    assert _init(dsn)[0] == 0
    assert _triggers(dsn) == 1


def test_print_sql_is_a_migration_that_init_then_accepts_as_current(dsn: str) -> None:
    result = CliRunner().invoke(main, ["outbox", "init", "--print-sql", "--table", "orders_outbox"])
    assert result.exit_code == 0
    assert result.output.strip() == postgres_ddl("orders_outbox").strip()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(result.output.encode())  # what a migration tool would run, twice is harmless
        conn.execute(result.output.encode())
    code, out, _ = _init(dsn, "--table", "orders_outbox")
    assert code == 0 and "already current" in out, out
