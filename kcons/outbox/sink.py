"""The relay's port to a message broker: the :class:`OutboxSink` protocol.

The relay reads committed rows in position order, hands each batch to its sink and marks the
rows published only after :meth:`OutboxSink.publish` returned, so a sink must return only when
the broker confirmed *every* record of the batch, in order. Implementations:
:class:`kcons.outbox.publisher.KafkaBatchPublisher` (Kafka acknowledgements or one Kafka
transaction per batch), :class:`kcons.outbox.sinks.rabbitmq.RabbitMqSink` (publisher confirms) and
:class:`kcons.outbox.sinks.rocketmq.RocketMqSink` (send acknowledgements, FIFO message groups).

Failures are typed so that the relay can tell them apart: :class:`~kcons.errors.SinkRowError`
names one row that can never be published (a permanent, per-row failure), every other failure
(:class:`~kcons.errors.SinkUnavailableError`, or the Kafka errors) means the batch is retried
whole. Either way no row of a failed batch is marked published: duplicates are possible after a
retry, gaps are not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from kcons.errors import SinkRowError, SinkUnavailableError
from kcons.outbox.rows import RecordTuple

__all__ = ["OutboxSink", "SinkRowError", "SinkUnavailableError"]


class OutboxSink(Protocol):
    """Publishes batches of outbox records; a batch is confirmed whole or raises."""

    #: ``"transactional"`` when the sink itself fences a former leader (a Kafka transaction);
    #: any other mode makes the relay check its fencing token before every batch.
    mode: str

    def start(self) -> None:
        """Open the connection (idempotent); a new leader calls it after taking the lease."""
        ...

    def wait_txn_gap(self) -> None:
        """Pause before a batch if the broker needs it (Kafka transactions); a no-op elsewhere."""
        ...

    def publish(
        self,
        records: Iterable[RecordTuple],
        *,
        still_leader: Callable[[], bool] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        """Publish ``records`` in order; return only after the broker confirmed every one of them.

        Raises :class:`~kcons.errors.SinkRowError` for a row that can never be published,
        :class:`~kcons.errors.LeadershipLostError` when ``still_leader`` turns false, and a
        retriable error otherwise. ``before_commit`` is a test hook run before the last step.
        """
        ...

    def reset(self) -> None:
        """Drop the connection (bounded); the next publish opens a new one."""
        ...

    def close(self, timeout: float = 5.0) -> None:
        """Finish (bounded) and close."""
        ...
