"""The transactional outbox: write events in the business transaction, relay them to Kafka.

The writer (:func:`add`) inserts the event row in the caller's open transaction; the relay
(:class:`OutboxRelay`) publishes committed rows in commit order per aggregate, one leader among
replicas. The stores and lease backends it runs on are adapters: :mod:`kcons.adapters.postgres`
(whose ``outbox`` module gives the ordering argument), :mod:`kcons.adapters.sqlite`,
:mod:`kcons.adapters.raft`; docs/architecture.md shows where each guarantee lives.
"""

from kcons.errors import LeadershipLostError
from kcons.outbox.publisher import KafkaBatchPublisher
from kcons.outbox.relay import OutboxRelay, RelaySettings
from kcons.outbox.rows import OutboxRecord, OutboxRow, to_record
from kcons.outbox.schema import (
    DEFAULT_TABLE,
    SchemaLockTimeoutError,
    install_schema,
    postgres_ddl,
    schema_is_current,
    sqlite_ddl,
)
from kcons.outbox.sink import OutboxSink
from kcons.outbox.store import OutboxStore
from kcons.outbox.writer import OutboxUsageError, add, add_many

__all__ = [
    "DEFAULT_TABLE",
    "KafkaBatchPublisher",
    "LeadershipLostError",
    "OutboxRecord",
    "OutboxRelay",
    "OutboxRow",
    "OutboxSink",
    "OutboxStore",
    "OutboxUsageError",
    "RelaySettings",
    "SchemaLockTimeoutError",
    "add",
    "add_many",
    "install_schema",
    "postgres_ddl",
    "schema_is_current",
    "sqlite_ddl",
    "to_record",
]
