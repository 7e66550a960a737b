"""kcons' Kafka layer: the only code of the package (besides ``kcons.testing``) that imports confluent-kafka.

``client`` checks client configs and closes clients with a time bound; ``messages`` holds the one
rule for consumed messages' errors and fast batch accessors; ``loop`` is the one batch source;
``dlq`` the one dead-letter writer; ``ledger`` owns a consumer's offset commits (decided vs
committed) and ``pauses`` its partition holds (rewind, pause, resume when due); ``producer``
holds the idempotent and transactional producers (each has a client) and ``futures`` their
delivery future. The confluent-kafka types other kcons modules need are re-exported here, so
they import them through this package.
"""

from __future__ import annotations

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

__all__ = [
    "OFFSET_BEGINNING",
    "OFFSET_END",
    "AdminClient",
    "Consumer",
    "KafkaError",
    "KafkaException",
    "Message",
    "Producer",
    "TopicPartition",
]
