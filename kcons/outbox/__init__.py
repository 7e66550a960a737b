"""The transactional outbox: write events in the business transaction, relay them to Kafka.

The writer (:func:`add`) inserts the event row in the caller's open transaction; the relay
(:class:`OutboxRelay`) publishes committed rows in commit order per aggregate, one leader among
replicas (see DESIGN.md, "Outbox", and :mod:`kcons.outbox.store` for the ordering argument).
"""

from kcons.outbox.leadership import AdvisoryLockLeaseBackend, SingleProcessLease
from kcons.outbox.publisher import KafkaBatchPublisher, LeadershipLostError
from kcons.outbox.relay import OutboxRelay, RelaySettings
from kcons.outbox.rows import OutboxRecord, OutboxRow, to_record
from kcons.outbox.schema import DEFAULT_TABLE, install_schema, postgres_ddl, sqlite_ddl
from kcons.outbox.store import OutboxStore, PostgresOutboxStore, SqliteOutboxStore
from kcons.outbox.writer import OutboxUsageError, add, add_many

__all__ = [
    "DEFAULT_TABLE",
    "AdvisoryLockLeaseBackend",
    "KafkaBatchPublisher",
    "LeadershipLostError",
    "OutboxRecord",
    "OutboxRelay",
    "OutboxRow",
    "OutboxStore",
    "OutboxUsageError",
    "PostgresOutboxStore",
    "RelaySettings",
    "SingleProcessLease",
    "SqliteOutboxStore",
    "add",
    "add_many",
    "install_schema",
    "postgres_ddl",
    "sqlite_ddl",
    "to_record",
]
