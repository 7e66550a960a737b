"""The idempotent consumer: a pure batch decision (:mod:`.plan`), effect strategies (:mod:`.effects`) and the driver.

:class:`IdempotentConsumer` gives at-least-once delivery with duplicates dropped by a dedup store
and poison messages dead-lettered; :class:`TransactionalIdempotentConsumer` commits each effect
and its dedup record in one SQL transaction (exactly-once effects). See :mod:`kcons.consumer.driver`
for the exact guarantees.
"""

from __future__ import annotations

from kcons.consumer.driver import (
    BatchStats,
    IdempotentConsumer,
    TransactionalIdempotentConsumer,
    default_store_retry_policy,
)
from kcons.consumer.effects import BatchHandler, Handler, RetryLater, default_retry_policy
from kcons.consumer.handlers import EnvelopeBatchHandler, EnvelopeHandler, with_envelope, with_envelopes
from kcons.consumer.ids import default_dlq_topic, default_event_id
from kcons.kafka.dlq import (
    DLQ_OFFSET_HEADER,
    DLQ_PARTITION_HEADER,
    DLQ_REASON_HEADER,
    DLQ_SOURCE_HEADER,
    DLQ_TOPIC_HEADER,
)

__all__ = [
    "DLQ_OFFSET_HEADER",
    "DLQ_PARTITION_HEADER",
    "DLQ_REASON_HEADER",
    "DLQ_SOURCE_HEADER",
    "DLQ_TOPIC_HEADER",
    "BatchHandler",
    "BatchStats",
    "EnvelopeBatchHandler",
    "EnvelopeHandler",
    "Handler",
    "IdempotentConsumer",
    "RetryLater",
    "TransactionalIdempotentConsumer",
    "default_dlq_topic",
    "default_event_id",
    "default_retry_policy",
    "default_store_retry_policy",
    "with_envelope",
    "with_envelopes",
]
