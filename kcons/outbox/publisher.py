"""Publish one batch of outbox records to Kafka and return only when Kafka acknowledged all of it.

Two modes:

* ``transactional`` (default): every batch is one Kafka transaction under a ``transactional.id``
  shared by all relay replicas of one outbox. A new leader's ``init_transactions`` aborts
  whatever the previous leader left open and fences its producer, so a paused former leader's
  commit fails: its batch never becomes visible to ``read_committed`` consumers.
* ``idempotent``: ``enable.idempotence`` with ``acks=all``, flush, check every delivery report.
  Faster per batch, but a paused former leader that resumes between its last leadership check
  and its produce call can still append duplicates (never losses; consumers dedupe by ``kcons-id``).

Either way a failed batch is re-published whole on retry, so Kafka may hold duplicates, never gaps.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kcons.config import redact_config
from kcons.errors import (
    ErrorClass,
    KafkaOperationError,
    LeadershipLostError,
    ProducerFencedError,
    TimeoutExceededError,
    kafka_error_to_exception,
    raise_for_kafka_error,
)
from kcons.outbox.rows import OutboxRecord, RecordTuple

__all__ = ["MODES", "KafkaBatchPublisher", "LeadershipLostError"]

log = logging.getLogger(__name__)

MODES = ("transactional", "idempotent")


_FORCED = {"enable.idempotence": True, "acks": "all"}
_UNASSIGNED = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner picks by key


class KafkaBatchPublisher:
    """Publishes batches through one confluent-kafka producer; a batch is acknowledged whole or raises."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        mode: str = "transactional",
        transactional_id: str | None = None,
        ack_timeout_s: float = 30.0,
        txn_gap_s: float = 0.002,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "transactional" and not transactional_id:
            raise ValueError("transactional mode needs a transactional_id")
        cfg: dict[str, Any] = {"linger.ms": 2, "batch.num.messages": 10000, "compression.type": "lz4"}
        cfg.update(config)
        cfg.update(_FORCED)
        if mode == "transactional":
            cfg["transactional.id"] = transactional_id
            cfg.setdefault("transaction.timeout.ms", max(60000, int(ack_timeout_s * 2000)))
            # A transaction begun right after the previous commit meets CONCURRENT_TRANSACTIONS
            # while the broker still writes that commit's markers; librdkafka then backs off
            # exponentially from retry.backoff.ms (default 100 ms, up to 1 s), which would
            # dominate the publish latency. Short backoffs plus the pause of txn_gap_s between
            # transactions (see wait_txn_gap) measured fastest.
            cfg.setdefault("retry.backoff.ms", 5)
            cfg.setdefault("retry.backoff.max.ms", 20)
        else:
            cfg.pop("transactional.id", None)
        self.mode = mode
        self._config = cfg
        self._ack_timeout_s = ack_timeout_s
        self._producer: Any = None
        self.txn_gap_s = txn_gap_s if mode == "transactional" else 0.0
        self._txn_ended = 0.0  # monotonic time the last transaction ended

    def wait_txn_gap(self) -> None:
        """Sleep until ``txn_gap_s`` has passed since the last transaction ended (transactional mode).

        Kafka finishes a commit (writes its markers) shortly after answering it; a transaction
        begun within that window is refused with CONCURRENT_TRANSACTIONS and retried with
        backoff. Measured on the local test broker with transactions of 30 records: back to
        back a transaction took 30 ms (median), with a 2 ms pause 12 ms including the pause.
        The relay calls this before its last read of a small batch, so rows committed during
        the pause still join it.
        """
        delay = self._txn_ended + self.txn_gap_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def __repr__(self) -> str:
        return f"KafkaBatchPublisher(mode={self.mode!r}, config={redact_config(self._config)!r})"

    @property
    def started(self) -> bool:
        """True while a producer is open."""
        return self._producer is not None

    def start(self) -> None:
        """Create the producer; in transactional mode ``init_transactions`` fences any previous leader."""
        from confluent_kafka import KafkaException, Producer

        if self._producer is not None:
            return
        producer = Producer(self._config)
        if self.mode == "transactional":
            try:
                producer.init_transactions(self._ack_timeout_s)
            except KafkaException as exc:
                self._close_quietly(producer)
                raise_for_kafka_error(exc, "init_transactions")
        self._producer = producer

    def publish(self, records: Iterable[OutboxRecord | RecordTuple], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Publish ``records`` in order; return when all are acknowledged (committed), else raise.

        ``still_leader`` is checked after producing and before committing: a relay that lost its
        lease aborts instead of committing. ``before_commit`` is a test hook.
        """
        from confluent_kafka import KafkaException

        self.start()
        producer = self._producer
        if self.mode == "idempotent":
            self._publish_idempotent(producer, records, still_leader)
            return
        self.wait_txn_gap()
        try:
            producer.begin_transaction()
            self._produce_all(producer, records, None)
            if before_commit is not None:
                before_commit()
            if still_leader is not None and not still_leader():
                self._abort_quietly()
                raise LeadershipLostError("lease lost before commit; batch aborted")
            producer.commit_transaction(self._ack_timeout_s)
        except KafkaException as exc:
            self._after_failure(exc, "commit_transaction")
        except BaseException:
            self._abort_quietly()
            raise
        finally:
            self._txn_ended = time.monotonic()

    def _publish_idempotent(self, producer: Any, records: Iterable[OutboxRecord | RecordTuple],
                            still_leader: Callable[[], bool] | None) -> None:  # fmt: skip
        from confluent_kafka import KafkaException

        if still_leader is not None and not still_leader():
            raise LeadershipLostError("lease lost before producing")
        failures: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err)

        try:
            self._produce_all(producer, records, delivered)
            remaining = producer.flush(self._ack_timeout_s)
        except KafkaException as exc:
            self.reset()
            raise_for_kafka_error(exc, "produce")
        if failures:
            self.reset()
            raise kafka_error_to_exception(failures[0], "produce")
        if remaining:
            self.reset()
            raise TimeoutExceededError(f"{remaining} records not acknowledged within {self._ack_timeout_s}s")

    def _produce_all(self, producer: Any, records: Iterable[OutboxRecord | RecordTuple],
                     callback: Callable[[Any, Any], None] | None) -> None:  # fmt: skip
        produce = producer.produce
        for rec in records:
            if isinstance(rec, OutboxRecord):
                rec = (rec.topic, rec.value, rec.key, rec.headers, rec.timestamp_ms)
            topic, value, key, headers, timestamp_ms = rec
            try:
                # Positional (partition, callback, on_delivery, timestamp, headers): cheaper than
                # keywords in confluent-kafka; the callback must sit in the first callback slot.
                produce(topic, value, key, _UNASSIGNED, callback, None, timestamp_ms, headers)
            except BufferError:
                self._produce_when_room(producer, rec, callback)

    def _produce_when_room(self, producer: Any, rec: RecordTuple, callback: Callable[[Any, Any], None] | None) -> None:
        """The local queue is full: serve delivery reports until there is room (bounded)."""
        deadline = time.monotonic() + self._ack_timeout_s
        topic, value, key, headers, timestamp_ms = rec
        while True:
            producer.poll(0.05)
            try:
                producer.produce(topic, value, key, _UNASSIGNED, callback, None, timestamp_ms, headers)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise TimeoutExceededError("producer queue stayed full") from None

    def _after_failure(self, exc: BaseException, operation: str) -> None:
        """Abort what can be aborted, drop a producer that cannot go on, and raise the typed error."""
        try:
            raise_for_kafka_error(exc, operation, in_transaction_end=True)
        except ProducerFencedError as typed:
            self.reset()
            raise LeadershipLostError(f"producer fenced by a newer relay: {typed}") from exc
        except KafkaOperationError as typed:
            if typed.error_class == ErrorClass.ABORTABLE:
                self._abort_quietly()
            else:
                self.reset()  # fatal, indefinite, retriable or unknown: a fresh producer re-inits cleanly
            raise

    def _abort_quietly(self) -> None:
        from confluent_kafka import KafkaException

        if self._producer is None or self.mode != "transactional":
            return
        try:
            self._producer.abort_transaction(self._ack_timeout_s)
        except KafkaException as exc:
            log.warning("abort_transaction failed (%s); recreating the producer", exc)
            self.reset()

    @staticmethod
    def _close_quietly(producer: Any, wait_s: float = 2.0) -> None:
        """Drop queued messages and close the client (in a thread: a dead broker must not block us)."""
        try:
            producer.purge()
            producer.flush(0)
        except Exception as exc:  # closing a broken producer is best effort
            log.debug("purging producer: %s", type(exc).__name__)
        closer = getattr(producer, "close", None)
        if closer is None:  # older confluent-kafka: the handle goes with the object
            return

        def close() -> None:
            # A fenced producer's close() warns that its abort failed: expected here, so logged.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    closer()
                except Exception as exc:  # best effort
                    log.debug("closing producer: %s", type(exc).__name__)
            for w in caught:
                log.debug("closing producer: %s", w.message)

        thread = threading.Thread(target=close, name="kcons-outbox-producer-close", daemon=True)
        thread.start()
        thread.join(wait_s)

    def reset(self) -> None:
        """Drop the producer without waiting; the next publish creates (and in transactional mode re-inits) one."""
        producer, self._producer = self._producer, None
        if producer is not None:
            self._close_quietly(producer)

    def close(self, timeout: float = 5.0) -> None:
        """Flush and drop the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.flush(timeout)
            except Exception as exc:  # closing is best effort
                log.debug("flush on close: %s", type(exc).__name__)
            self._close_quietly(producer)
