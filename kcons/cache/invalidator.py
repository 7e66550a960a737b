"""The :class:`CacheInvalidator`: applies change events to a :class:`~kcons.cache.ConsistentCache`.

**Invalidator loops.** :meth:`CacheInvalidator.run` consumes with a plain consumer that applies
each polled batch in one pipelined Redis round trip (default), or through
:class:`~kcons.consumer.IdempotentConsumer` (``batched=False``: one round trip per event, its
dedup store and dead-letter handling). Both commit offsets only after Redis acknowledged and
retry an unreachable Redis instead of skipping. Both follow the one poison rule: a record that
cannot be decoded or applied goes to ``<topic>.dlq`` with its reason in ``kcons-dlq-reason``,
the rest of its batch is applied, and the invalidator keeps running.
Commit-to-applied lag is measured from the ``kcons-committed-at`` header (epoch seconds) when
the writer sets one, else from the Kafka record timestamp (the kcons outbox relay stamps each
record with its outbox row's insert time, so the time spent in the outbox counts).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, stop_when_event_set, wait_exponential

from kcons.cache.cache import ConsistentCache
from kcons.cache.events import ChangeEvent, KeysFor, ValueFor, aggregate_key, decode_change_event
from kcons.cache.model import CacheUnavailableError, CacheWrite, Strategy, WriteOutcome
from kcons.config import check_range
from kcons.errors import ConfigError, DecodeError, DeliveryError, PoisonMessageError, StoreError

if TYPE_CHECKING:
    from kcons.consumer import IdempotentConsumer

log = logging.getLogger(__name__)

__all__ = ["AppliedInvalidation", "CacheInvalidator", "OnApplied", "plan_writes"]


def plan_writes(
    cache: ConsistentCache,
    event: ChangeEvent,
    keys_for: KeysFor,
    strategy: Strategy = Strategy.VERSIONED_INVALIDATION,
    value_for: ValueFor | None = None,
) -> list[CacheWrite]:
    """The guarded writes one change event causes: tombstones, or new values for write-behind.

    Deletes always write tombstones. For write-behind the value is ``value_for(event)`` (default:
    the event's payload); an event without a value falls back to a tombstone.
    """
    writes: list[CacheWrite] = []
    value: bytes | None = None
    if strategy is Strategy.WRITE_BEHIND and event.op not in {"d", "delete", "deleted"}:
        value = value_for(event) if value_for is not None else event.value
    for key in keys_for(event):
        if value is None:
            writes.append(cache.tombstone_write(key, event.version))
        else:
            writes.append(cache.value_write(key, value, event.version))
    return writes


@dataclass(frozen=True, slots=True)
class AppliedInvalidation:
    """One cache write caused by a change event, after Redis acknowledged it."""

    key: str
    version: int
    outcome: WriteOutcome
    event: ChangeEvent


OnApplied = Callable[[Sequence[AppliedInvalidation]], None]


class CacheInvalidator:
    """Applies change events to a :class:`ConsistentCache` under the version guard.

    Each event is decoded (:func:`decode_change_event`), mapped to keys with ``keys_for``, and
    written as a tombstone (``VERSIONED_INVALIDATION``) or as its new value (``WRITE_BEHIND``).
    :meth:`apply_records` returns only after Redis acknowledged every write, so a Kafka loop that
    commits offsets afterwards never loses an invalidation; replays are harmless because the
    guard never moves a key's version backwards. ``on_applied`` is called after each batch.
    """

    def __init__(
        self,
        cache: ConsistentCache,
        keys_for: KeysFor = aggregate_key,
        *,
        strategy: Strategy = Strategy.VERSIONED_INVALIDATION,
        value_for: ValueFor | None = None,
        version_field: str = "version",
        on_applied: OnApplied | None = None,
        retry_after_s: float = 0.5,
    ) -> None:
        check_range("retry_after_s", retry_after_s, 0.0, 3600.0)
        if strategy is Strategy.WRITE_THROUGH:
            raise ConfigError(
                "strategy",
                "write-through is done by the writer (ConsistentCache.write_through); the invalidator "
                "applies VERSIONED_INVALIDATION or WRITE_BEHIND",
            )
        self.cache = cache
        self.keys_for = keys_for
        self.strategy = strategy
        self.value_for = value_for
        self.version_field = version_field
        self.on_applied = on_applied
        self.retry_after_s = retry_after_s

    def decode(self, message: Any) -> ChangeEvent | None:
        """Decode a confluent-kafka ``Message`` (raises DecodeError for a malformed change event)."""
        ts_type, ts = message.timestamp() if hasattr(message, "timestamp") else (0, None)
        return decode_change_event(
            message.key(),
            message.value(),
            message.headers(),
            topic=message.topic(),
            timestamp_ms=ts if ts_type else None,
            version_field=self.version_field,
        )

    def writes_of(self, event: ChangeEvent) -> list[CacheWrite]:
        """The guarded writes of one event; PoisonMessageError when ``keys_for``/``value_for`` cannot map it."""
        try:
            writes = plan_writes(self.cache, event, self.keys_for, self.strategy, self.value_for)
            for w in writes:
                if not isinstance(w.key, str) or not isinstance(w.value, bytes):
                    raise TypeError("keys_for must give str keys and value_for bytes values")
        except Exception as exc:
            raise PoisonMessageError(f"cannot map the event to cache writes: {type(exc).__name__}: {exc}", exc) from exc
        return writes

    def apply_events(self, events: Sequence[ChangeEvent]) -> list[AppliedInvalidation]:
        """Write the cache changes of ``events`` in one Redis round trip; returns once acknowledged.

        Raises PoisonMessageError when an event cannot be mapped to cache writes (nothing is written).
        """
        planned = [(e, self.writes_of(e)) for e in events]
        writes = [w for _, ws in planned for w in ws]
        owners = [e for e, ws in planned for _ in ws]
        results = self.cache.apply_writes(writes, [e.committed_at for e in owners])
        applied = [
            AppliedInvalidation(w.key, w.version, r.outcome, e) for w, r, e in zip(writes, results, owners, strict=True)
        ]
        if applied and self.on_applied is not None:
            self.on_applied(applied)
        return applied

    def decode_all(self, messages: Sequence[Any]) -> list[ChangeEvent]:
        """The change events of ``messages``, without records that change nothing; DecodeError on a bad one."""
        return [e for e in map(self.decode, messages) if e is not None]

    def apply_records(self, messages: Sequence[Any]) -> list[AppliedInvalidation]:
        """Decode and apply a batch of Kafka records; records that change nothing are skipped."""
        return self.apply_events(self.decode_all(messages))

    def handle(self, message: Any) -> None:
        """Apply one Kafka record (a per-message IdempotentConsumer handler); returns once Redis acknowledged.

        A record that cannot be decoded or applied raises DecodeError/PoisonMessageError (the
        consumer dead-letters it); an unreachable Redis raises RetryLater, so the partition is
        rewound and paused, never skipped: the offset is committed only after the invalidation
        is applied.
        """
        self.handle_batch([message])

    def handle_batch(self, messages: list[Any]) -> None:
        """Apply a batch of Kafka records in one Redis round trip (the IdempotentConsumer batch handler).

        Raises like :meth:`handle`: DecodeError or PoisonMessageError for a record that cannot be
        decoded, mapped to keys or written (the consumer then retries the batch one record at a
        time, so only that record is dead-lettered and the rest is applied), RetryLater when Redis
        is unreachable (the batch is rewound, never skipped).
        """
        from kcons.consumer import RetryLater

        events = self.decode_all(messages)
        if not events:
            return
        try:
            self.apply_events(events)
        except CacheUnavailableError as exc:
            raise RetryLater(self.retry_after_s, f"cache unavailable: {exc}") from exc
        except StoreError as exc:
            raise PoisonMessageError(f"the cache refused the write: {exc}", exc) from exc

    def consumer(
        self, config: Mapping[str, Any], topics: Sequence[str], *, store: Any = None, **kwargs: Any
    ) -> IdempotentConsumer:
        """An :class:`~kcons.consumer.IdempotentConsumer` that feeds this invalidator.

        ``config`` is a confluent-kafka consumer config (``group.id`` required);
        ``isolation.level`` defaults to ``read_committed`` (aborted relay transactions are never
        applied) and ``auto.offset.reset`` to ``earliest``. The dedup ``store`` defaults to an
        in-memory one (100,000 ids): the version guard already makes re-applying an event harmless, so the
        store only saves Redis round trips. Other keyword arguments go to the consumer.
        """
        from kcons.adapters.memory import MemoryDedupStore
        from kcons.consumer import IdempotentConsumer

        merged: dict[str, Any] = {"isolation.level": "read_committed", "auto.offset.reset": "earliest"}
        merged.update(config)
        kwargs.setdefault("batch_timeout_s", 0.05)
        return IdempotentConsumer(
            merged,
            topics,
            None,
            batch_handler=self.handle_batch,
            store=store if store is not None else MemoryDedupStore(max_entries=100_000),
            **kwargs,
        )

    def run(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        stop: threading.Event | None = None,
        batched: bool = True,
        store: Any = None,
        **kwargs: Any,
    ) -> None:
        """Consume ``topics`` until ``stop`` is set; offsets commit only after Redis acknowledged the invalidations.

        By default through :meth:`run_batched` (one pipelined Redis round trip per polled batch);
        with ``batched=False`` through :meth:`consumer` (IdempotentConsumer with
        :meth:`handle_batch`: one Redis round trip per consumed batch too, plus its dedup store
        and its retry and dead-letter handling). Both give the same guarantees; the batched loop
        skips the dedup store, since replays are harmless under the version guard.
        """
        if batched:
            self.run_batched(config, topics, stop=stop, **kwargs)
            return
        consumer = self.consumer(config, topics, store=store, **kwargs)
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                consumer.poll_once()
        finally:
            consumer.close()

    def run_batched(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        stop: threading.Event | None = None,
        max_batch: int = 1000,
        poll_s: float = 0.05,
        redis_retry_s: float = 300.0,
        dlq_topic: Callable[[str], str] = lambda topic: f"{topic}.dlq",
        dlq_timeout_s: float = 30.0,
    ) -> None:
        """The high-throughput loop: each polled batch is applied in one pipelined Redis round trip.

        Same guarantees as the IdempotentConsumer path: a batch's offsets are committed only
        after Redis acknowledged all of its writes and the dead-letter topic acknowledged its
        poison records (:class:`~kcons.kafka.dlq.DeadLetterWriter`: ``kcons-dlq-reason`` and the
        original position). A record is poison when it cannot be decoded (DecodeError), mapped to
        keys (PoisonMessageError) or written (a StoreError other than an unreachable Redis); the
        rest of its batch is applied and the loop goes on. An unreachable Redis (or dead-letter
        topic) is retried with backoff for up to ``redis_retry_s``, then the error propagates
        with the batch uncommitted (the next process replays it). Batches are read through
        :class:`~kcons.kafka.loop.BatchSource`. No dedup store is needed: replays are harmless
        under the version guard.
        """
        from kcons.kafka import Consumer, TopicPartition
        from kcons.kafka.client import close_bounded
        from kcons.kafka.dlq import DeadLetterWriter
        from kcons.kafka.loop import BatchSource
        from kcons.kafka.messages import end_offsets

        check_range("max_batch", max_batch, 1, 100_000)
        if not config.get("group.id"):
            raise ConfigError("group.id", "the invalidator needs a consumer group (group.id)")
        merged: dict[str, Any] = {"isolation.level": "read_committed", "auto.offset.reset": "earliest"}
        merged.update(config)
        merged["enable.auto.commit"] = False
        stop = stop or threading.Event()
        retrying = Retrying(
            stop=stop_after_delay(redis_retry_s) | stop_when_event_set(stop),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception_type(CacheUnavailableError),
            reraise=True,
        )
        dlq = DeadLetterWriter(merged, topic_of=dlq_topic, timeout_s=dlq_timeout_s)
        consumer = Consumer(merged)
        source = BatchSource(consumer, batch_size=max_batch, timeout_s=poll_s, operation="invalidator consume")
        try:
            source.subscribe(list(topics))
            while not stop.is_set():
                records = source.poll()
                if not records:
                    continue
                poison = self._apply_batch(records, retrying)
                if poison:
                    _dead_letter(dlq, poison, stop, redis_retry_s)
                offsets = [TopicPartition(t, p, o) for (t, p), o in end_offsets(records).items()]
                consumer.commit(offsets=offsets, asynchronous=True)
        finally:
            # Commits nothing more: offsets were committed batch by batch.
            close_bounded(consumer.close, 30.0, "invalidator consumer")
            dlq.close(5.0)

    def _apply_batch(self, records: Sequence[Any], retrying: Retrying) -> list[tuple[Any, str]]:
        """Apply a batch's change events in one round trip; return the poison records with their reasons.

        A record is poison when it cannot be decoded or mapped to keys, or when the store refuses
        its write (then the batch is applied one event at a time to find it). An unreachable
        Redis is retried by ``retrying`` and then raised: nothing is skipped.
        """
        good: list[tuple[Any, ChangeEvent]] = []
        poison: list[tuple[Any, str]] = []
        for msg in records:
            try:
                event = self.decode(msg)
                if event is not None:
                    self.writes_of(event)
                    good.append((msg, event))
            except (DecodeError, PoisonMessageError) as exc:
                poison.append((msg, _reason(exc)))
        try:
            retrying(self.apply_events, [event for _, event in good])
        except CacheUnavailableError:
            raise
        except (StoreError, PoisonMessageError):
            for msg, event in good:  # one record's write was refused: find it, apply the others
                try:
                    retrying(self.apply_events, [event])
                except CacheUnavailableError:
                    raise
                except (StoreError, PoisonMessageError) as exc:
                    poison.append((msg, _reason(exc)))
        poison.sort(key=lambda item: (str(item[0].topic()), item[0].partition(), item[0].offset()))
        return poison


def _reason(exc: BaseException) -> str:
    """The ``kcons-dlq-reason`` of a record that cannot be decoded or applied."""
    return f"{type(exc).__name__}: {exc}"[:1000]


def _dead_letter(dlq: Any, poison: Sequence[tuple[Any, str]], stop: threading.Event, bound_s: float) -> None:
    """Dead-letter ``poison``; return once every write was acknowledged (the others are written again).

    Raises DeliveryError when the dead-letter topic keeps refusing for ``bound_s`` (or on stop):
    the batch is then left uncommitted, so the next process tries again and nothing is lost.
    """
    pending = list(poison)

    def write() -> None:
        report = dlq.write(pending)
        pending[:] = [item for i, item in enumerate(pending) if not report.is_acknowledged(i)]
        if pending:
            raise DeliveryError(f"{len(pending)} dead-letter writes were not acknowledged")

    Retrying(
        stop=stop_after_delay(bound_s) | stop_when_event_set(stop),
        wait=wait_exponential(multiplier=0.1, max=5.0),
        retry=retry_if_exception_type(DeliveryError),
        reraise=True,
    )(write)
    log.error("dead-lettered %d change events that cannot be decoded or applied", len(poison))
