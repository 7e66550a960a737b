"""kcons: make Kafka-based systems consistent (nothing lost, nothing duplicated, nothing stale).

The public API is re-exported here, lazily (PEP 562): ``import kcons`` imports no part of the
package and none of its client libraries (confluent-kafka, redis, psycopg); ``kcons.X`` or
``from kcons import X`` imports the one module that defines ``X``, on first use. Each name's
home is listed in ``_EXPORTS``; docs/architecture.md describes the parts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # the same names as _EXPORTS, for type checkers and IDEs
    from kcons.adapters.memory import MemoryDedupStore
    from kcons.adapters.postgres import PostgresDedupStore
    from kcons.adapters.raft import RaftLeaseBackend
    from kcons.adapters.redis import RedisDedupStore
    from kcons.adapters.sqlite import SqliteDedupStore
    from kcons.aio import AsyncIdempotentProducer, AsyncTransactionalProcessor, AsyncTransactionalProducer
    from kcons.audit import CacheAuditor, OutboxReport, TopicAuditor, TopicReport, audit_outbox, audit_topic
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
        with_envelope,
        with_envelopes,
    )
    from kcons.dedup import ClaimLostError, ClaimResult, DedupStore, TransactionalDedupStore
    from kcons.envelope import Envelope, read_envelope
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
    from kcons.ids import new_event_id, uuid7
    from kcons.kafka.producer import (
        DeliveryFuture,
        IdempotentProducer,
        TransactionalProducer,
        UnverifiedConfigWarning,
        wrap,
        wrap_idempotent,
        wrap_transactional,
    )
    from kcons.lease import Lease, LeaseBackend
    from kcons.metrics import MetricsServer
    from kcons.outbox import OutboxRelay, RelaySettings
    from kcons.processor import Output, ProcessorStats, TransactionalProcessor
    from kcons.raft.client import RaftClient

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "MemoryDedupStore": "kcons.adapters.memory",
    "PostgresDedupStore": "kcons.adapters.postgres",
    "RaftLeaseBackend": "kcons.adapters.raft",
    "RedisDedupStore": "kcons.adapters.redis",
    "SqliteDedupStore": "kcons.adapters.sqlite",
    "CacheAuditor": "kcons.audit",
    "OutboxReport": "kcons.audit",
    "TopicAuditor": "kcons.audit",
    "TopicReport": "kcons.audit",
    "audit_outbox": "kcons.audit",
    "audit_topic": "kcons.audit",
    "AsyncIdempotentProducer": "kcons.aio",
    "AsyncTransactionalProcessor": "kcons.aio",
    "AsyncTransactionalProducer": "kcons.aio",
    "CacheInvalidator": "kcons.cache",
    "CacheSettings": "kcons.cache",
    "ChangeEvent": "kcons.cache",
    "ConsistentCache": "kcons.cache",
    "Strategy": "kcons.cache",
    "Versioned": "kcons.cache",
    "KafkaSettings": "kcons.config",
    "PostgresSettings": "kcons.config",
    "RedisSettings": "kcons.config",
    "Settings": "kcons.config",
    "BatchHandler": "kcons.consumer",
    "BatchStats": "kcons.consumer",
    "DLQ_REASON_HEADER": "kcons.consumer",
    "DLQ_SOURCE_HEADER": "kcons.consumer",
    "IdempotentConsumer": "kcons.consumer",
    "RetryLater": "kcons.consumer",
    "TransactionalIdempotentConsumer": "kcons.consumer",
    "ClaimLostError": "kcons.dedup",
    "ClaimResult": "kcons.dedup",
    "DedupStore": "kcons.dedup",
    "TransactionalDedupStore": "kcons.dedup",
    "Envelope": "kcons.envelope",
    "read_envelope": "kcons.envelope",
    "AbortableTransactionError": "kcons.errors",
    "ConfigError": "kcons.errors",
    "DecodeError": "kcons.errors",
    "DeliveryError": "kcons.errors",
    "ErrorClass": "kcons.errors",
    "FatalKafkaError": "kcons.errors",
    "IndefiniteOutcomeError": "kcons.errors",
    "KafkaOperationError": "kcons.errors",
    "KconsError": "kcons.errors",
    "PoisonMessageError": "kcons.errors",
    "ProducerFencedError": "kcons.errors",
    "RetriableKafkaError": "kcons.errors",
    "StoreError": "kcons.errors",
    "TimeoutExceededError": "kcons.errors",
    "classify_kafka_error": "kcons.errors",
    "new_event_id": "kcons.ids",
    "uuid7": "kcons.ids",
    "Lease": "kcons.lease",
    "LeaseBackend": "kcons.lease",
    "MetricsServer": "kcons.metrics",
    "OutboxRelay": "kcons.outbox",
    "RelaySettings": "kcons.outbox",
    "Output": "kcons.processor",
    "ProcessorStats": "kcons.processor",
    "TransactionalProcessor": "kcons.processor",
    "DeliveryFuture": "kcons.kafka.producer",
    "IdempotentProducer": "kcons.kafka.producer",
    "TransactionalProducer": "kcons.kafka.producer",
    "wrap": "kcons.kafka.producer",
    "wrap_idempotent": "kcons.kafka.producer",
    "wrap_transactional": "kcons.kafka.producer",
    "UnverifiedConfigWarning": "kcons.kafka.producer",
    "with_envelope": "kcons.consumer",
    "with_envelopes": "kcons.consumer",
    "RaftClient": "kcons.raft.client",
}

__all__ = [
    "DLQ_REASON_HEADER",
    "DLQ_SOURCE_HEADER",
    "AbortableTransactionError",
    "AsyncIdempotentProducer",
    "AsyncTransactionalProcessor",
    "AsyncTransactionalProducer",
    "BatchHandler",
    "BatchStats",
    "CacheAuditor",
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
    "OutboxReport",
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
    "TopicAuditor",
    "TopicReport",
    "TransactionalDedupStore",
    "TransactionalIdempotentConsumer",
    "TransactionalProcessor",
    "TransactionalProducer",
    "UnverifiedConfigWarning",
    "Versioned",
    "__version__",
    "audit_outbox",
    "audit_topic",
    "classify_kafka_error",
    "new_event_id",
    "read_envelope",
    "uuid7",
    "with_envelope",
    "with_envelopes",
    "wrap",
    "wrap_idempotent",
    "wrap_transactional",
]


def __getattr__(name: str) -> object:
    """Import ``name``'s module on first access and cache the value in this module's namespace."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's attributes, including the public names not imported yet."""
    return sorted({*globals(), *__all__})
