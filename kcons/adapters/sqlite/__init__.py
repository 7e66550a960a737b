"""SQLite adapters: the dedup store and the outbox store, for one process on one database file."""

from kcons.adapters.sqlite.dedup import SQLITE_DEDUP_SCHEMA_SQL, SqliteDedupStore
from kcons.adapters.sqlite.outbox import SqliteOutboxStore

__all__ = ["SQLITE_DEDUP_SCHEMA_SQL", "SqliteDedupStore", "SqliteOutboxStore"]
