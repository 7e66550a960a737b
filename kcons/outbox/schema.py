"""The outbox DDL, shipped as package data, and the function that applies it.

``install_schema`` is idempotent (``CREATE ... IF NOT EXISTS``), so ``kcons outbox init`` can run
on every deployment. Table names are validated as plain identifiers before they are put into SQL.
"""

from __future__ import annotations

import sqlite3
from importlib import resources
from typing import Any

from kcons.config import check_identifier

__all__ = ["DEFAULT_TABLE", "install_schema", "postgres_ddl", "sqlite_ddl", "validate_table"]

DEFAULT_TABLE = "kcons_outbox"
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
    return text.replace("{table}", validate_table(table))


def postgres_ddl(table: str = DEFAULT_TABLE) -> str:
    """The PostgreSQL DDL for ``table`` (outbox table, indexes, fence table, NOTIFY trigger)."""
    return _ddl("postgres.sql", table)


def sqlite_ddl(table: str = DEFAULT_TABLE) -> str:
    """The SQLite DDL for ``table``."""
    return _ddl("sqlite.sql", table)


def install_schema(conn: Any, table: str = DEFAULT_TABLE) -> None:
    """Create the outbox schema on a sqlite3 connection or a psycopg connection, and commit."""
    if isinstance(conn, sqlite3.Connection):
        conn.executescript(sqlite_ddl(table))
        conn.commit()
        return
    with conn.transaction():
        # Serialise concurrent installers: CREATE ... IF NOT EXISTS is not safe against a race.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('kcons-outbox-schema', 0))")
        conn.execute(postgres_ddl(table))
