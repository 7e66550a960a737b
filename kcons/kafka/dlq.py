"""The one dead-letter writer: poison messages go to a dead-letter topic, with why and where from in headers.

Every part that consumes (consumer, processor, cache invalidator) dead-letters through
:class:`DeadLetterWriter`. A dead-letter record keeps the original key, value and headers, and
adds:

* ``kcons-dlq-reason``: why the message is poison (UTF-8 text, at most 1000 characters);
* ``kcons-dlq-topic``, ``kcons-dlq-partition``, ``kcons-dlq-offset``: where it came from, each
  in its own header (partition and offset as decimal text), the way Spring Kafka's
  ``DeadLetterPublishingRecoverer`` records the original position;
* ``kcons-dlq-source``: the same position as one ``topic/partition/offset`` text (kept for
  readers written against earlier kcons versions).

The writer's producer is idempotent with ``acks=all`` and shares the source client's connection
and security settings (:data:`~kcons.kafka.client.SHARED_CLIENT_KEYS`). :meth:`DeadLetterWriter.write`
waits (bounded) for the acknowledgements and reports which writes were acknowledged: the caller
must not commit past a poison message whose write was not acknowledged (hold its partition at
its offset and try again later), so nothing is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException, Producer

from kcons.kafka.client import check_producer_config, close_bounded, shared_client_config

__all__ = [
    "DLQ_OFFSET_HEADER",
    "DLQ_PARTITION_HEADER",
    "DLQ_REASON_HEADER",
    "DLQ_SOURCE_HEADER",
    "DLQ_TOPIC_HEADER",
    "DeadLetterReport",
    "DeadLetterWriter",
    "dead_letter_config",
    "dead_letter_headers",
    "default_dlq_topic",
]

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "kcons-dlq-reason"
DLQ_SOURCE_HEADER = "kcons-dlq-source"
DLQ_TOPIC_HEADER = "kcons-dlq-topic"
DLQ_PARTITION_HEADER = "kcons-dlq-partition"
DLQ_OFFSET_HEADER = "kcons-dlq-offset"
#: The longest reason written; a longer one is cut and ends with "...".
REASON_MAX = 1000


def default_dlq_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``: ``<topic>.dlq``."""
    return f"{topic}.dlq"


def dead_letter_config(source: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dead-letter producer's config: the source client's shared settings, idempotent, ``acks=all``.

    ``overrides`` (librdkafka properties) win over the defaults, but not over the guarantee:
    they go through :func:`~kcons.kafka.client.check_producer_config` like any producer config.
    """
    config = shared_client_config(source)
    config.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5})
    config.update(overrides or {})
    return check_producer_config(config, transactional=False)


def _reason_text(reason: str) -> bytes:
    text = reason if len(reason) <= REASON_MAX else reason[: REASON_MAX - 3] + "..."
    return text.encode("utf-8", "replace")


def dead_letter_headers(msg: Any, reason: str) -> list[tuple[str, bytes | str | None]]:
    """The headers of ``msg``'s dead-letter record: its own headers, then the reason and its position."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    headers: list[tuple[str, bytes | str | None]] = list(msg.headers() or [])
    headers.append((DLQ_REASON_HEADER, _reason_text(reason)))
    headers.append((DLQ_SOURCE_HEADER, f"{topic}/{partition}/{offset}".encode()))
    headers.append((DLQ_TOPIC_HEADER, str(topic).encode("utf-8", "replace")))
    headers.append((DLQ_PARTITION_HEADER, str(partition).encode()))
    headers.append((DLQ_OFFSET_HEADER, str(offset).encode()))
    return headers


@dataclass
class DeadLetterReport:
    """The outcome of one :meth:`DeadLetterWriter.write`: which writes the broker acknowledged.

    ``failed`` maps the index (in the list given to ``write``) of every write that was not
    acknowledged to why; every other index was acknowledged.
    """

    total: int
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def acknowledged(self) -> int:
        """How many writes were acknowledged."""
        return self.total - len(self.failed)

    @property
    def ok(self) -> bool:
        """True when every write was acknowledged."""
        return not self.failed

    def is_acknowledged(self, index: int) -> bool:
        """Whether the write at ``index`` was acknowledged."""
        return 0 <= index < self.total and index not in self.failed


class DeadLetterWriter:
    """Writes poison messages to their dead-letter topics and reports which writes were acknowledged.

    ``config`` is the source client's config (a consumer's); the producer is made on first use
    from :func:`dead_letter_config`. ``topic_of`` names the dead-letter topic of a source topic.
    Each :meth:`write` waits at most ``timeout_s`` for the acknowledgements.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        topic_of: Callable[[str], str] = default_dlq_topic,
        timeout_s: float = 30.0,
        producer_config: Mapping[str, Any] | None = None,
        producer_factory: Callable[[dict[str, Any]], Any] = Producer,
    ) -> None:
        if not 0 < timeout_s <= 3600:
            raise ValueError(f"timeout_s must be in (0, 3600], got {timeout_s!r}")
        self._config = dead_letter_config(config, producer_config)
        self._topic_of = topic_of
        self._timeout_s = timeout_s
        self._factory = producer_factory
        self._producer: Any = None

    @property
    def timeout_s(self) -> float:
        """The bound on one write's wait for acknowledgements."""
        return self._timeout_s

    def write(self, poison: Sequence[tuple[Any, str]]) -> DeadLetterReport:
        """Dead-letter each ``(message, reason)``; return once all are acknowledged or ``timeout_s`` passed.

        Never raises for a failed write: the report says which were not acknowledged, and the
        caller holds those messages' partitions (their dead-letter write is tried again later).
        """
        report = DeadLetterReport(len(poison))
        if not poison:
            return report
        producer = self._get_producer()
        # Filled by delivery reports; a report arriving after this call returned changes nothing.
        acked: set[int] = set()
        errors: dict[int, str] = {}
        fatal = False
        deadline = time.monotonic() + self._timeout_s

        def on_delivery(index: int) -> Callable[[Any, Any], None]:
            def delivered(err: Any, _msg: Any) -> None:
                nonlocal fatal
                if err is None:
                    acked.add(index)
                else:
                    errors[index] = f"{err.str()} ({err.name()})"
                    fatal = fatal or bool(err.fatal())

            return delivered

        for i, (msg, reason) in enumerate(poison):
            headers = dead_letter_headers(msg, reason)
            topic = self._topic_of(str(msg.topic()))
            try:
                self._produce(producer, topic, msg, headers, on_delivery(i), deadline)
            except (KafkaException, BufferError) as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
        try:
            remaining = producer.flush(max(0.0, deadline - time.monotonic()))
        except (KafkaException, RuntimeError) as exc:
            remaining = -1
            log.error("waiting for dead-letter acknowledgements failed: %s", exc)
        failed = report.failed
        for i in range(len(poison)):
            if i not in acked:
                failed[i] = errors.get(i, "not acknowledged in time")
        if failed:
            log.error(
                "%d of %d dead-letter writes were not acknowledged within %.1fs (%s queued)",
                len(failed), len(poison), self._timeout_s, remaining,
            )  # fmt: skip
        if fatal:  # an idempotent producer with a fatal error cannot write again: start afresh next time
            self._drop_producer()
        return report

    @staticmethod
    def _produce(producer: Any, topic: str, msg: Any, headers: list[Any], cb: Any, deadline: float) -> None:
        """Produce one record; while the local queue is full, serve delivery reports (until ``deadline``)."""
        while True:
            try:
                producer.produce(topic, value=msg.value(), key=msg.key(), headers=headers, on_delivery=cb)
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    raise
                producer.poll(0.1)

    def _get_producer(self) -> Any:
        if self._producer is None:
            self._producer = self._factory(self._config)
        return self._producer

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            close_bounded(producer.close, 1.0, "dead-letter producer")

    def close(self, timeout_s: float | None = None) -> None:
        """Wait (bounded) for writes still in flight, then drop the producer."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        bound = self._timeout_s if timeout_s is None else timeout_s

        def flush_and_close() -> None:
            producer.flush(bound)
            producer.close()

        close_bounded(flush_and_close, bound + 1.0, "dead-letter producer")
