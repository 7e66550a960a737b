"""The outbox writer: insert events in the caller's open database transaction.

``add(conn, event)`` never commits and never opens a transaction of its own: the event row
commits or rolls back together with the caller's business changes, which is the whole point of
the transactional outbox. Accepted connections: a psycopg 3 connection, a SQLAlchemy 2
``Session`` or ``Connection`` (PostgreSQL or SQLite dialect), and a ``sqlite3`` connection.

For per-aggregate order, add an aggregate's event *after* taking the lock that serialises
writers of that aggregate (typically the ``UPDATE`` of the aggregate row): the row's position is
drawn when it is inserted, and the relay publishes in position order.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from kcons.envelope import Envelope
from kcons.errors import StoreError
from kcons.outbox.rows import encode_headers
from kcons.outbox.schema import DEFAULT_TABLE, validate_table

__all__ = ["OutboxUsageError", "add", "add_many"]

_COLUMNS = "id, aggregatetype, aggregateid, type, payload, topic, headers, version"


class OutboxUsageError(StoreError):
    """``add`` was called in a way that would break atomicity (no open transaction, unknown connection)."""


def _params(event: Envelope, topic: str | None) -> tuple[Any, ...]:
    return (
        event.id,
        event.aggregate_type,
        event.aggregate_id,
        event.type,
        event.payload,
        topic,
        encode_headers(event),
        event.version,
    )


def _check_id(event: Envelope) -> None:
    try:
        uuid.UUID(event.id)
    except ValueError:
        raise OutboxUsageError(f"event id must be a UUID, got {event.id[:40]!r}") from None


def _is_psycopg(conn: Any) -> bool:
    return type(conn).__module__.startswith("psycopg") and hasattr(conn, "cursor") and hasattr(conn, "pgconn")


def _sqlalchemy_connection(conn: Any) -> Any | None:
    """Return the SQLAlchemy ``Connection`` of a Session/Connection (joining its transaction), else None."""
    if not type(conn).__module__.startswith("sqlalchemy"):
        return None
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    if isinstance(conn, Session):
        return conn.connection()  # autobegins the session's transaction if needed; never commits
    if isinstance(conn, Connection):
        return conn
    return None


def _pg_insert_sql(table: str) -> str:
    return f"INSERT INTO {table} ({_COLUMNS}) VALUES (%s::uuid, %s, %s, %s, %s::bytea, %s, %s::jsonb, %s::bigint)"


def _sqlite_insert_sql(table: str) -> str:
    return f"INSERT INTO {table} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


def add_many(conn: Any, events: Iterable[Envelope], *, topic: str | None = None, table: str = DEFAULT_TABLE) -> int:
    """Insert ``events`` (in this order) into the outbox inside the caller's open transaction; returns the count.

    Raises OutboxUsageError for a psycopg connection in autocommit mode outside a transaction
    block, because the rows would commit on their own.
    """
    validate_table(table)
    batch: Sequence[Envelope] = list(events)
    if not batch:
        return 0
    for event in batch:
        _check_id(event)
    rows = [_params(e, topic) for e in batch]
    if isinstance(conn, sqlite3.Connection):
        conn.executemany(_sqlite_insert_sql(table), rows)
        return len(rows)
    if _is_psycopg(conn):
        from psycopg.pq import TransactionStatus

        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            raise OutboxUsageError(
                "the psycopg connection is in autocommit mode with no open transaction; "
                "use `with conn.transaction():` so the events commit with the business change"
            )
        with conn.cursor() as cur:
            if len(rows) == 1:
                cur.execute(_pg_insert_sql(table), rows[0])
            else:
                cur.executemany(_pg_insert_sql(table), rows)
        return len(rows)
    sa_conn = _sqlalchemy_connection(conn)
    if sa_conn is not None:
        dialect = sa_conn.dialect.name
        if dialect == "postgresql":
            sql = _pg_insert_sql(table)
        elif dialect == "sqlite":
            sql = _sqlite_insert_sql(table)
        else:
            raise OutboxUsageError(f"unsupported SQLAlchemy dialect {dialect!r} (postgresql or sqlite)")
        sa_conn.exec_driver_sql(sql, rows if len(rows) > 1 else rows[0])
        return len(rows)
    raise OutboxUsageError(
        f"unsupported connection type {type(conn).__module__}.{type(conn).__name__}: "
        "expected psycopg.Connection, sqlalchemy Session/Connection or sqlite3.Connection"
    )


def add(conn: Any, event: Envelope, *, topic: str | None = None, table: str = DEFAULT_TABLE) -> None:
    """Insert one event into the outbox inside the caller's open transaction; never commits."""
    add_many(conn, [event], topic=topic, table=table)
