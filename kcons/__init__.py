"""kcons: make Kafka-based systems consistent (nothing lost, nothing duplicated, nothing stale).

The public API is re-exported here; submodules hold the parts (see the README).
"""

from __future__ import annotations

__version__ = "0.1.0"

from kcons.adapters.memory import MemoryDedupStore
from kcons.adapters.postgres import PostgresDedupStore
from kcons.adapters.raft import RaftLeaseBackend
from kcons.adapters.redis import RedisDedupStore
from kcons.adapters.sqlite import SqliteDedupStore
from kcons.aio import AsyncIdempotentProducer, AsyncTransactionalProcessor, AsyncTransactionalProducer
from kcons.cache import CacheInvalidator, CacheSettings, ChangeEvent, ConsistentCache, Strategy, Versioned
from kcons.config import KafkaSettings, PostgresSettings, RedisSettings, Settings
from kcons.consumer import (
    DLQ_REASON_HEADER,
    DLQ_SOURCE_HEADER,
    BatchHandler,
    BatchStats,
    IdempotentConsumer,
    RetryLater,
    TransactionalIdempotentConsumer,
)
from kcons.dedup import ClaimLostError, ClaimResult, DedupStore, TransactionalDedupStore
from kcons.envelope import Envelope, new_event_id, read_envelope, uuid7
from kcons.errors import (
    AbortableTransactionError,
    ConfigError,
    DecodeError,
    DeliveryError,
    ErrorClass,
    FatalKafkaError,
    IndefiniteOutcomeError,
    KafkaOperationError,
    KconsError,
    PoisonMessageError,
    ProducerFencedError,
    RetriableKafkaError,
    StoreError,
    TimeoutExceededError,
    classify_kafka_error,
)
from kcons.lease import Lease, LeaseBackend
from kcons.metrics import MetricsServer
from kcons.outbox import OutboxRelay, RelaySettings
from kcons.processor import Output, ProcessorStats, TransactionalProcessor
from kcons.producer import DeliveryFuture, IdempotentProducer, TransactionalProducer, wrap
from kcons.raft.client import RaftClient

__all__ = [
    "DLQ_REASON_HEADER",
    "DLQ_SOURCE_HEADER",
    "AbortableTransactionError",
    "AsyncIdempotentProducer",
    "AsyncTransactionalProcessor",
    "AsyncTransactionalProducer",
    "BatchHandler",
    "BatchStats",
    "CacheInvalidator",
    "CacheSettings",
    "ChangeEvent",
    "ClaimLostError",
    "ClaimResult",
    "ConfigError",
    "ConsistentCache",
    "DecodeError",
    "DedupStore",
    "DeliveryError",
    "DeliveryFuture",
    "Envelope",
    "ErrorClass",
    "FatalKafkaError",
    "IdempotentConsumer",
    "IdempotentProducer",
    "IndefiniteOutcomeError",
    "KafkaOperationError",
    "KafkaSettings",
    "KconsError",
    "Lease",
    "LeaseBackend",
    "MemoryDedupStore",
    "MetricsServer",
    "OutboxRelay",
    "Output",
    "PoisonMessageError",
    "PostgresDedupStore",
    "PostgresSettings",
    "ProcessorStats",
    "ProducerFencedError",
    "RaftClient",
    "RaftLeaseBackend",
    "RedisDedupStore",
    "RedisSettings",
    "RelaySettings",
    "RetriableKafkaError",
    "RetryLater",
    "Settings",
    "SqliteDedupStore",
    "StoreError",
    "Strategy",
    "TimeoutExceededError",
    "TransactionalDedupStore",
    "TransactionalIdempotentConsumer",
    "TransactionalProcessor",
    "TransactionalProducer",
    "Versioned",
    "__version__",
    "classify_kafka_error",
    "new_event_id",
    "read_envelope",
    "uuid7",
    "wrap",
]
