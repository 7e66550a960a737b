"""The one consume loop step: a batch that never waits to fill up, never crosses a rebalance, carries no errors.

:class:`BatchSource` waits up to ``timeout_s`` for the first message, then takes only what is
already fetched (``consume(batch_size - 1, 0)``): a batch costs no latency, and grows by
itself while the previous one was being handled. Messages of partitions revoked or lost while
the batch was read are dropped (their new owner reads them from the committed offset), and the
batch goes through :func:`~kcons.kafka.messages.check_consumed`. Every part that consumes (the
consumer driver, the processor, the cache invalidator through the consumer) reads through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaException

from kcons.errors import raise_for_kafka_error
from kcons.kafka.messages import check_consumed

__all__ = ["BatchSource", "RebalanceCallback"]

log = logging.getLogger(__name__)

#: confluent-kafka's rebalance callback: ``(consumer, partitions)``.
RebalanceCallback = Callable[[Any, list[Any]], None]


class BatchSource:
    """Reads batches from a confluent-kafka ``Consumer`` (or anything with its poll/consume/assignment).

    Subscribe through :meth:`subscribe` (the callbacks are forwarded, after the source notes the
    rebalance), or call :meth:`note_rebalance` from your own revoke/lost callbacks: a batch read
    across a revocation keeps only the messages of partitions still assigned.
    """

    __slots__ = ("_batch_size", "_consumer", "_operation", "_timeout_s", "rebalances")

    def __init__(self, consumer: Any, *, batch_size: int, timeout_s: float, operation: str = "consume") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._consumer = consumer
        self._batch_size = batch_size
        self._timeout_s = timeout_s
        self._operation = operation
        #: Revocations and losses seen so far (a batch read across one is filtered).
        self.rebalances = 0

    @property
    def consumer(self) -> Any:
        """The Kafka consumer read from."""
        return self._consumer

    def subscribe(
        self,
        topics: Sequence[str],
        *,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None:
        """Subscribe the consumer to ``topics``; the callbacks run as given, after the source notes revocations."""

        def revoked(consumer: Any, partitions: list[Any]) -> None:
            self.rebalances += 1
            if on_revoke is not None:
                on_revoke(consumer, partitions)

        def lost(consumer: Any, partitions: list[Any]) -> None:
            self.rebalances += 1
            if on_lost is not None:
                on_lost(consumer, partitions)

        def assigned(consumer: Any, partitions: list[Any]) -> None:
            if on_assign is not None:
                on_assign(consumer, partitions)

        self._consumer.subscribe(list(topics), on_assign=assigned, on_revoke=revoked, on_lost=lost)

    def note_rebalance(self) -> None:
        """Record a revocation or loss (for callers that install their own rebalance callbacks)."""
        self.rebalances += 1

    def poll(self, timeout_s: float | None = None, max_messages: int | None = None) -> list[Any]:
        """One batch: up to ``batch_size`` data messages, in order per partition; ``[]`` when none came in time.

        ``timeout_s`` and ``max_messages`` override the source's wait and size for this call (a
        caller that fills a batch over several calls asks for what is left). Raises the typed
        kcons exception for a fatal consumer error (see ``check_consumed``) or a failed
        ``poll``/``consume`` call.
        """
        consumer = self._consumer
        rebalances = self.rebalances
        size = self._batch_size if max_messages is None else max_messages
        try:
            first = consumer.poll(self._timeout_s if timeout_s is None else timeout_s)
            if first is None:
                return []
            msgs = [first, *consumer.consume(size - 1, 0)] if size > 1 else [first]
        except KafkaException as exc:
            raise_for_kafka_error(exc, self._operation)
            raise  # unreachable: raise_for_kafka_error always raises
        if self.rebalances != rebalances:  # revoked while reading: drop what is no longer ours
            msgs = self._still_ours(msgs)
        return check_consumed(msgs, self._operation)

    def _still_ours(self, msgs: list[Any]) -> list[Any]:
        """The messages of partitions still assigned (the others' new owner reads them from the committed offset)."""
        try:
            assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        except (KafkaException, RuntimeError):
            return msgs  # unknown assignment: keep them all (a revoked one is a duplicate at worst)
        return [m for m in msgs if m.error() is not None or (m.topic(), m.partition()) in assigned]
