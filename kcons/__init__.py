"""kcons: make Kafka-based systems consistent (nothing lost, nothing duplicated, nothing stale).

The public API is re-exported here; submodules hold the parts (see the README).
"""

from __future__ import annotations

__version__ = "0.1.0"

from kcons.adapters.memory import MemoryDedupStore
from kcons.adapters.postgres import PostgresDedupStore
from kcons.adapters.redis import RedisDedupStore
from kcons.adapters.sqlite import SqliteDedupStore
from kcons.aio import AsyncIdempotentProducer, AsyncTransactionalProcessor, AsyncTransactionalProducer
from kcons.cache import CacheInvalidator, ChangeEvent, ConsistentCache, Strategy, Versioned
from kcons.config import KafkaSettings, PostgresSettings, RedisSettings, Settings
from kcons.consumer import IdempotentConsumer, RetryLater, TransactionalIdempotentConsumer
from kcons.dedup import ClaimLostError, DedupStore, TransactionalDedupStore
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
from kcons.processor import Output, TransactionalProcessor
from kcons.producer import IdempotentProducer, TransactionalProducer, wrap

__all__ = [
    "AbortableTransactionError",
    "AsyncIdempotentProducer",
    "AsyncTransactionalProcessor",
    "AsyncTransactionalProducer",
    "CacheInvalidator",
    "ChangeEvent",
    "ClaimLostError",
    "ConfigError",
    "ConsistentCache",
    "DecodeError",
    "DedupStore",
    "DeliveryError",
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
    "ProducerFencedError",
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
