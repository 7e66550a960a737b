"""The :class:`CacheInvalidator`: applies change events to a :class:`~kcons.cache.ConsistentCache`.

**The loop.** :meth:`CacheInvalidator.run` consumes through
:class:`~kcons.consumer.IdempotentConsumer` with :meth:`CacheInvalidator.handle_batch` as its
batch handler, so it shares the consume loop and the poison rule of every kcons consumer: each
batch is applied in one pipelined Redis round trip and its offsets are committed only after
Redis acknowledged; a record that cannot be decoded or applied goes to ``<topic>.dlq`` with its
reason in ``kcons-dlq-reason`` while the rest of its batch is applied, and the invalidator keeps
running; an unreachable Redis pauses the partitions and is retried, never skipped. The default
mode keeps no dedup store (``batched=True``: the version guard makes replays harmless);
``batched=False`` adds one.

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

from kcons.cache.cache import ConsistentCache
from kcons.cache.events import ChangeEvent, KeysFor, ValueFor, aggregate_key, decode_change_event
from kcons.cache.model import CacheUnavailableError, CacheWrite, Strategy, WriteOutcome
from kcons.config import check_range
from kcons.errors import ConfigError, PoisonMessageError, StoreError

if TYPE_CHECKING:
    from kcons.consumer import IdempotentConsumer

log = logging.getLogger(__name__)

__all__ = ["AppliedInvalidation", "CacheInvalidator", "OnApplied", "plan_writes"]

#: The invalidator's default least time between two offset commits (see :meth:`CacheInvalidator.consumer`).
COMMIT_INTERVAL_S = 0.5


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
            writes.append(cache.value_write(key, value, event.version, committed_at=event.committed_at))
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
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        store: Any = None,
        dedup: bool = True,
        **kwargs: Any,
    ) -> IdempotentConsumer:
        """An :class:`~kcons.consumer.IdempotentConsumer` that feeds this invalidator's :meth:`handle_batch`.

        ``config`` is a confluent-kafka consumer config (``group.id`` required);
        ``isolation.level`` defaults to ``read_committed`` (aborted relay transactions are never
        applied) and ``auto.offset.reset`` to ``earliest``. With ``dedup=False`` the consumer
        keeps no dedup store: every record is applied, which is harmless since the version guard
        makes a replayed event a no-op. Otherwise the dedup ``store`` defaults to an in-memory one
        (100,000 ids), which only saves Redis round trips. Batches default to 1,000 records and
        50 ms, and offsets are committed at most every ``commit_interval_s`` (default 0.5 s, and
        at once when idle): still only after Redis acknowledged, and a restart replays at most
        that stretch, which the version guard makes harmless, while the broker writes one offset
        record per interval instead of one per batch. Other keyword arguments go to the consumer
        (``dlq_topic``, ``dlq_timeout_s``...).
        """
        from kcons.consumer import IdempotentConsumer

        merged: dict[str, Any] = {"isolation.level": "read_committed", "auto.offset.reset": "earliest"}
        merged.update(config)
        kwargs.setdefault("batch_timeout_s", 0.05)
        kwargs.setdefault("batch_size", 1000)
        kwargs.setdefault("commit_interval_s", COMMIT_INTERVAL_S)
        if dedup and store is None:
            from kcons.adapters.memory import MemoryDedupStore

            store = MemoryDedupStore(max_entries=100_000)
        return IdempotentConsumer(
            merged, topics, None, batch_handler=self.handle_batch, store=store if dedup else None, **kwargs
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

        Runs on :meth:`consumer`, the consumer driver shared by every part of kcons that
        consumes: each batch is applied in one pipelined Redis round trip, and a record that
        cannot be decoded or applied is dead-lettered while the rest of its batch is applied.
        ``batched=True`` (default) skips the dedup store (replays are harmless under the version
        guard); ``batched=False`` adds one (``store``, default in memory), which saves Redis
        round trips on replays. An unreachable Redis pauses the partitions and retries them,
        never skipping a record. Other keyword arguments go to :meth:`consumer`.
        """
        consumer = self.consumer(config, topics, store=store, dedup=not batched, **kwargs)
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                consumer.poll_once()
        finally:
            consumer.close()

    def run_batched(
        self, config: Mapping[str, Any], topics: Sequence[str], *, stop: threading.Event | None = None, **kwargs: Any
    ) -> None:
        """:meth:`run` without a dedup store (the default mode); kept for callers of the earlier name."""
        self.run(config, topics, stop=stop, batched=True, **kwargs)
