"""PostgreSQL adapters: the dedup store, the outbox store and the advisory-lock lease backend.

psycopg is imported when a store connects, not when this package is imported.
"""

from kcons.adapters.postgres.dedup import DEDUP_SCHEMA_SQL, PostgresDedupStore, dedup_schema_sql
from kcons.adapters.postgres.leadership import AdvisoryLockLeaseBackend, advisory_key
from kcons.adapters.postgres.outbox import PostgresOutboxStore

__all__ = [
    "DEDUP_SCHEMA_SQL",
    "AdvisoryLockLeaseBackend",
    "PostgresDedupStore",
    "PostgresOutboxStore",
    "advisory_key",
    "dedup_schema_sql",
]
