"""kcons: make Kafka-based systems consistent (nothing lost, nothing duplicated, nothing stale).

The public API is re-exported here; submodules hold the parts (see the README).
"""

from __future__ import annotations

__version__ = "0.1.0"

from kcons.config import KafkaSettings, PostgresSettings, RedisSettings, Settings
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
from kcons.metrics import MetricsServer

__all__ = [
    "AbortableTransactionError",
    "ConfigError",
    "DecodeError",
    "DeliveryError",
    "Envelope",
    "ErrorClass",
    "FatalKafkaError",
    "IndefiniteOutcomeError",
    "KafkaOperationError",
    "KafkaSettings",
    "KconsError",
    "MetricsServer",
    "PoisonMessageError",
    "PostgresSettings",
    "ProducerFencedError",
    "RedisSettings",
    "RetriableKafkaError",
    "Settings",
    "StoreError",
    "TimeoutExceededError",
    "__version__",
    "classify_kafka_error",
    "new_event_id",
    "read_envelope",
    "uuid7",
]
