"""The outbox DDL, shipped as package data, and the function that applies it.

``install_schema`` runs on every relay start (``kcons outbox init`` as an init container), so on
PostgreSQL it must never get in the application's way: it first reads the schema version recorded
in ``kcons_schema`` and returns without touching anything when it is current; otherwise it applies
DDL that takes no lock on an existing outbox table (indexes and trigger are created only when
missing), with a ``lock_timeout`` so that it gives up (SchemaLockTimeoutError) rather than queue
behind an open transaction while the writers queue behind it. Table names are validated as plain
identifiers before they are put into SQL.
"""

from __future__ import annotations

import sqlite3
from importlib import resources
from typing import Any

from kcons.config import check_identifier
from kcons.errors import KconsError

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "DEFAULT_TABLE",
    "SCHEMA_VERSION",
    "SchemaLockTimeoutError",
    "install_schema",
    "postgres_ddl",
    "schema_is_current",
    "sqlite_ddl",
    "validate_table",
]

DEFAULT_TABLE = "kcons_outbox"
#: Version of ``sql/postgres.sql``; raise it with every change to that file so that
#: ``kcons outbox init`` applies the change once, then goes back to doing nothing.
SCHEMA_VERSION = 3
#: How long ``install_schema`` waits for a lock before giving up. Short on purpose: while the
#: installer waits for a table lock, the application's writers queue behind it.
DEFAULT_LOCK_TIMEOUT_S = 2.0


class SchemaLockTimeoutError(KconsError):
    """The schema installer gave up waiting for a lock (an open transaction holds the table)."""
#: Derived names (``<table>_fence``, ``<table>_notify``, ``<table>_published``) must stay within
#: PostgreSQL's 63-byte identifier limit.
_MAX_TABLE_LENGTH = 41


def validate_table(name: str, setting: str = "KCONS_OUTBOX_TABLE") -> str:
    """Return ``name`` if it is a lower-case SQL identifier (safe to put into SQL), else raise ConfigError.

    Lower case because the table name is also the NOTIFY channel, a string that PostgreSQL does
    not case-fold the way it folds the unquoted table name.
    """
    return check_identifier(setting, name, kind="lowercase_sql", max_length=_MAX_TABLE_LENGTH)


def _ddl(resource: str, table: str) -> str:
    text = resources.files("kcons.outbox").joinpath("sql", resource).read_text(encoding="utf-8")
    return text.replace("{table}", validate_table(table)).replace("{version}", str(SCHEMA_VERSION))


def postgres_ddl(table: str = DEFAULT_TABLE) -> str:
    """The PostgreSQL DDL for ``table`` (outbox table, indexes, fence table, NOTIFY trigger)."""
    return _ddl("postgres.sql", table)


def sqlite_ddl(table: str = DEFAULT_TABLE) -> str:
    """The SQLite DDL for ``table``."""
    return _ddl("sqlite.sql", table)


def schema_is_current(conn: Any, table: str = DEFAULT_TABLE) -> bool:
    """True when ``table`` exists and ``kcons_schema`` records SCHEMA_VERSION or later (psycopg).

    Takes no lock on the outbox table (``to_regclass`` only looks the name up), so it never waits
    for, or delays, the application's transactions.
    """
    name = validate_table(table)
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL, to_regclass('kcons_schema') IS NOT NULL", (name,)
    ).fetchone()
    if not (row and row[0] and row[1]):
        return False
    found = conn.execute("SELECT version FROM kcons_schema WHERE component = %s", (f"outbox:{name}",)).fetchone()
    return found is not None and int(found[0]) >= SCHEMA_VERSION


def install_schema(conn: Any, table: str = DEFAULT_TABLE, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> bool:
    """Create or upgrade the outbox schema (sqlite3 or psycopg connection) and commit.

    Returns False when the PostgreSQL schema was already current (nothing was done), True when
    DDL ran. Raises SchemaLockTimeoutError when a lock could not be had within ``lock_timeout_s``
    (the database is left as it was).
    """
    if isinstance(conn, sqlite3.Connection):
        conn.executescript(sqlite_ddl(table))
        conn.commit()
        return True
    if lock_timeout_s <= 0:
        raise ValueError("lock_timeout_s must be > 0 (0 would mean: wait forever)")
    import psycopg

    try:
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_s * 1000)}ms",))
            if schema_is_current(conn, table):
                return False
            # Serialise concurrent installers: CREATE ... IF NOT EXISTS is not safe against a race.
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('kcons-outbox-schema', 0))")
            if schema_is_current(conn, table):  # another installer finished while we waited
                return False
            conn.execute(postgres_ddl(table))
    except psycopg.errors.LockNotAvailable:
        raise SchemaLockTimeoutError(
            f"outbox schema for {table!r} not applied: no lock within {lock_timeout_s:g}s (lock_timeout);"
            " an open transaction holds the table or another installer is running. Nothing was changed;"
            " retry when it has finished, or apply `kcons outbox init --print-sql` in a migration"
        ) from None
    return True
