"""IdempotentConsumer: at-least-once delivery, duplicates dropped by a dedup store, poison messages dead-lettered.

The driver does the I/O around the pure decision of :mod:`kcons.consumer.plan`. Each batch:

1. read a batch (:class:`~kcons.kafka.loop.BatchSource`) and each message's event id
   (``kcons-id`` header, or Debezium's ``id`` header; a message without one is identified by
   ``topic/partition/offset``; an unreadable id makes it poison);
2. claim the ids in the dedup store, one call for the whole batch;
3. run the effects (:mod:`kcons.consumer.effects`) for claimed ids only, under the retry
   policy, and settle the plan: ids already done are dropped as duplicates; ids another worker
   holds under a lease are *busy*: the partition is rewound to that message and paused, so it
   is tried again later and never skipped;
4. record the handled ids done, write poison messages to the dead-letter topic and wait for
   the acknowledgements (:class:`~kcons.kafka.dlq.DeadLetterWriter`);
5. hand the decided offsets to the :class:`~kcons.kafka.ledger.OffsetLedger`, which commits,
   per partition, the offset after the last message whose effect is done *and recorded* or
   whose dead-letter write was acknowledged; held partitions are rewound and paused
   (:class:`~kcons.kafka.pauses.PauseSchedule`).

With a store that records one batch done and claims the next in a single call (declared
``pipelined``: Redis, memory), step 4's done records ride on the next batch's claim, so a batch
costs one store round trip; its offsets are committed after that call (overlapping the
following one), never before the done records are written. A done record that fails to be
written is retried before each batch and counts as done meanwhile; until it is written no
offset is committed past it. On idle, on revocation and on close, pending done records are
written and offsets committed at once: synchronously on revocation and close and once the
consumer has been idle for ``IDLE_SETTLE_S``; when it has just gone idle without waiting for the
broker, so that a batch arriving meanwhile is not held up by the commit's round trip.

With a store that can send that call and read its answer later (declared ``claim_ahead``:
Redis), the next batch is read (only what is already fetched) and its call sent before the
current batch is handled, so the store runs the script while this thread reads and handles; the
done records then ride two calls later. See :class:`IdempotentConsumer` (``claim_ahead``).

Guarantees: every message is handled at least once or dead-lettered (offsets never move past a
message that is not done and recorded); a message whose id is done is never handled again while
the store keeps it (retention TTL). With :class:`IdempotentConsumer` a crash after a handler ran
but before its batch was recorded done can run that handler again once (at-least-once effects).
:class:`TransactionalIdempotentConsumer` closes that gap for effects in an SQL database: the
handler runs inside a transaction on the caller's connection and the dedup record commits in
the same transaction, guarded by the claim's owner, so each event's effect commits exactly once.

The library installs no signal handler: call :meth:`IdempotentConsumer.stop` from yours (the
``kcons`` CLI does it with ``kcons.cli.signals.stop_on_signals``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tenacity

from kcons.config import redact_config
from kcons.consumer.effects import (
    BatchHandler,
    Effects,
    Handler,
    PerBatch,
    PerMessage,
    SameTransaction,
    default_retry_policy,
    run_plan,
)
from kcons.consumer.ids import KeyFunction, default_dlq_topic, default_event_id, entry_of, position_id, reason
from kcons.consumer.plan import TP, BatchPlan, Decision, Entry, abandon, after_dead_letters, all_new, hold_all
from kcons.dedup import (
    ClaimResult,
    DedupStore,
    StoreCapabilities,
    TransactionalDedupStore,
    capabilities_of,
    check_lease,
)
from kcons.errors import ConfigError, KconsError, StoreError
from kcons.kafka import Consumer, Producer, TopicPartition
from kcons.kafka.client import with_logger
from kcons.kafka.dlq import DeadLetterWriter
from kcons.kafka.ledger import OffsetLedger
from kcons.kafka.loop import BatchSource
from kcons.kafka.messages import end_offsets, header_ids
from kcons.kafka.pauses import PauseSchedule
from kcons.metrics import ConsumerMetrics

log = logging.getLogger(__name__)

__all__ = ["BatchStats", "IdempotentConsumer", "TransactionalIdempotentConsumer", "default_store_retry_policy"]

#: Idle this long (no message in any poll), a consumer committing asynchronously settles its offsets
#: synchronously; before that an idle poll sends them without waiting for the broker.
IDLE_SETTLE_S = 1.0


def default_store_retry_policy() -> tenacity.Retrying:
    """Retries of dedup store calls: four attempts within about a second, StoreError only."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential(multiplier=0.05, max=0.5),
        retry=tenacity.retry_if_exception_type(StoreError),
        reraise=True,
    )


@dataclass
class BatchStats:
    """What one or more batches did: consumed, handled, duplicates, dead-lettered, deferred."""

    consumed: int = 0
    handled: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    deferred: int = 0
    fallback_ids: int = 0

    def add(self, other: BatchStats) -> None:
        """Accumulate another batch's counts."""
        self.consumed += other.consumed
        self.handled += other.handled
        self.duplicates += other.duplicates
        self.dead_lettered += other.dead_lettered
        self.deferred += other.deferred
        self.fallback_ids += other.fallback_ids


class IdempotentConsumer:
    """At-least-once consumer that drops duplicates by event id and dead-letters poison messages.

    ``config`` is a confluent-kafka consumer config (librdkafka names, ``group.id`` required);
    ``enable.auto.commit`` is forced off because offsets are committed only after the effects
    are done. ``topics`` is a list of topic names. ``handler(msg)`` runs once per new event id
    (see the module docstring for the exact guarantees). Or pass ``batch_handler(messages)``
    instead (``handler=None``): it gets each batch's new messages at once, in order, so an effect
    that costs a round trip (Redis, an HTTP API, a bulk insert) costs one per batch; a batch it
    fails on is retried one message at a time (``batch_handler([msg])``) under the same retry and
    dead-letter rules, so the messages it applied before failing are applied again (effects must
    tolerate that, as with any at-least-once handler).

    The dedup ``store`` should be namespaced by the same consumer group; its capabilities are
    read once (:func:`kcons.dedup.capabilities_of`). ``store=None`` runs without deduplication:
    every message is new (identified by its position), for effects that are idempotent by
    themselves (a version guard, an upsert); poison messages are still dead-lettered and the
    rest of their batch applied.

    Claims are taken per batch, so ``lease_s`` should exceed the time one batch takes to
    handle (with ``claim_ahead``, two batches: a batch is claimed while the one before it is
    handled); a slower batch lets another worker take its ids over (handled twice, never lost).
    A batch is up to ``batch_size`` messages: after waiting up to ``batch_timeout_s`` for the
    first one, whatever is already fetched (never waiting for more), so latency stays at one
    batch's handling time and batches grow by themselves under load.
    ``pause_s`` is how long a partition stays paused after it was rewound (busy id, store
    outage, failed dead-letter write). With ``async_commit`` (the default) the offsets of a
    finished batch are committed without waiting for the broker (a failed commit is merged
    into the next; revocation, close and an idle stretch of ``IDLE_SETTLE_S`` commit
    synchronously, a poll that just found nothing sends the offsets without waiting). With
    ``async_commit=False`` the commit waits, and ``overlap_commit`` runs it on a helper thread
    during the next store round trip (default: on, unless the store declares ``in_process``;
    it applies to the one-call-per-batch path: with ``claim_ahead`` the store call is already
    in flight while the commit runs).
    ``claim_ahead`` (default: on when the store declares it, as :class:`~kcons.adapters.redis.RedisDedupStore`
    does): before a batch is handled, the next batch is read (only what is already fetched) and
    its claim sent, so the store works while the handlers run; the answer is read when that batch's
    turn comes. Ids the first batch also holds wait for its outcome (a duplicate if it did them,
    tried again after ``pause_s`` if not); the read-ahead batch's messages of partitions rewound
    meanwhile, revoked or lost are dropped and their claims given back; on close its claims are
    given back. Done records then ride two store calls later, and offsets are committed after them.
    ``commit_interval_s`` (default 0: after every batch) spaces the commit requests: the offsets
    of the batches finished meanwhile go with the next commit past the interval, or at once on
    idle, revocation and close; offsets are never committed earlier, only later (a crash
    replays at most that long a stretch of messages, which the dedup store or idempotent
    effects absorb), and the broker writes one offset record per interval instead of one per batch.
    ``consumer_factory``/``producer_factory`` build the Kafka clients (confluent-kafka by default).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        handler: Handler | None,
        *,
        store: DedupStore | None,
        batch_handler: BatchHandler | None = None,
        dlq_topic: Callable[[str], str] | None = None,
        retry: tenacity.Retrying | None = None,
        key_fn: KeyFunction = default_event_id,
        batch_size: int = 500,
        batch_timeout_s: float = 0.2,
        lease_s: float = 30.0,
        pause_s: float = 1.0,
        dlq_producer_config: Mapping[str, Any] | None = None,
        dlq_timeout_s: float = 30.0,
        store_retry: tenacity.Retrying | None = None,
        overlap_commit: bool | None = None,
        async_commit: bool = True,
        claim_ahead: bool | None = None,
        commit_interval_s: float = 0.0,
        consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
        producer_factory: Callable[[dict[str, Any]], Any] = Producer,
    ) -> None:
        if not config.get("group.id"):
            raise ConfigError("group.id", "the idempotent consumer needs a consumer group (group.id)")
        if not config.get("bootstrap.servers"):
            raise ConfigError("bootstrap.servers", "is not set")
        if isinstance(topics, str) or not topics or any(not isinstance(t, str) or not t for t in topics):
            raise ConfigError("topics", f"expected a non-empty list of topic names, got {topics!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
            raise ConfigError("batch_size", f"must be an integer in [1, 100000], got {batch_size!r}")
        if not 0 < batch_timeout_s <= 60:
            raise ConfigError("batch_timeout_s", f"must be in (0, 60], got {batch_timeout_s!r}")
        if not 0 <= pause_s <= 3600:
            raise ConfigError("pause_s", f"must be in [0, 3600], got {pause_s!r}")
        if not 0 <= commit_interval_s <= 60:
            raise ConfigError("commit_interval_s", f"must be in [0, 60], got {commit_interval_s!r}")
        if not 0 < dlq_timeout_s <= 3600:
            raise ConfigError("dlq_timeout_s", f"must be in (0, 3600], got {dlq_timeout_s!r}")
        for name, policy in (("retry", retry), ("store_retry", store_retry)):
            if policy is not None and not isinstance(policy, tenacity.BaseRetrying):
                raise ConfigError(name, "expected a tenacity.Retrying policy object")
        self._lease_s = check_lease(lease_s)
        self._store = store
        caps = capabilities_of(store) if store is not None else StoreCapabilities(in_process=True)
        self._metrics = ConsumerMetrics(str(config["group.id"]))  # children bound once, not per message
        # Every line names its group: several consumers in one process can be told apart.
        self._log = logging.LoggerAdapter(log, {"group": str(config["group.id"])})
        self._effects = self._make_effects(handler, batch_handler, caps)
        self._effects.handler_errors = self._metrics.handler_errors
        self._config = with_logger(config)  # librdkafka's lines through Python logging
        self._config["enable.auto.commit"] = False
        self._ledger = OffsetLedger(
            asynchronous=async_commit,
            user_on_commit=self._config.get("on_commit"),
            group=self._metrics.group,
            min_interval_s=commit_interval_s,
        )
        self._config["on_commit"] = self._ledger.on_commit
        self._dlq = DeadLetterWriter(
            self._config,
            topic_of=dlq_topic or default_dlq_topic,
            timeout_s=dlq_timeout_s,
            producer_config=dlq_producer_config,
            producer_factory=producer_factory,
        )
        self._topics = list(topics)
        self._caps = caps
        # One store call per batch: a batch's done records ride on the next batch's claim, and its
        # offsets are committed right after that call (never before its done records are written).
        self._pipelined = caps.pipelined and self._effects.records_done
        # Claim ahead: the next batch is read (only what is already fetched) and its store call sent
        # before the current batch is handled, so the store works while the handlers run.
        if claim_ahead is None:
            claim_ahead = caps.claim_ahead and self._pipelined
        if claim_ahead and not (caps.claim_ahead and self._pipelined):
            raise ConfigError("claim_ahead", "needs a store that declares claim_ahead (RedisDedupStore) and a handler")
        self._claim_ahead = bool(claim_ahead)
        self._ahead: _Batch | None = None  # read ahead, its store call in flight
        self._current: _Batch | None = None  # claimed, being read ahead of (a revocation drops from it)
        # Partitions revoked or lost during the read ahead: the lowest offset dropped from the batch claimed.
        self._revoked_during_read: dict[TP, int] = {}
        self._ahead_unhandled: list[_Batch] = []  # batches whose answer an interrupt left unread
        self._batch_claim = caps.batch_claim
        self._records_done = store is not None and self._effects.records_done
        self._fast_path = self._effects.fast_path
        self._deferred_done: list[str] = []  # handled, done records to write with the next claim
        self._uncompleted: set[str] = set()  # handled ids whose done record failed; retried, treated as done
        self._unconfirmed: set[str] = set()  # claim ahead: done records of a failed call, sent again; treated as done
        self._unreleased: set[str] = set()  # claims whose release failed; retried
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        # Overlapping the offset commit with the store round trip pays off for a networked store
        # only; an asynchronous commit returns at once, leaving nothing to overlap.
        if overlap_commit is None:
            overlap_commit = not caps.in_process
        self._overlap_commit = overlap_commit and not async_commit
        self._retry = retry or default_retry_policy()
        self._store_retry = store_retry or default_store_retry_policy()
        self._key_fn = key_fn
        self._pause_s = pause_s
        self._pauses = PauseSchedule(group=self._metrics.group)
        self._stopping = threading.Event()
        self._closed = False
        self._store_failing_since: float | None = None
        self._idle_since: float | None = None  # monotonic time of the first empty poll in a row
        self.stats = BatchStats()
        self.last_batch = BatchStats()
        self._effects.open()  # every check above passed: now take the effects' resources
        self._log.info("idempotent consumer for %s, config %s", ",".join(self._topics), redact_config(self._config))
        self._consumer = consumer_factory(self._config)
        self._ledger.attach(self._consumer)
        self._pauses.attach(self._consumer)
        self._source = BatchSource(self._consumer, batch_size=batch_size, timeout_s=batch_timeout_s)
        self._source.subscribe(
            self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _make_effects(
        self, handler: Handler | None, batch_handler: BatchHandler | None, caps: StoreCapabilities
    ) -> Effects:
        """The effects strategy for the constructor's handler arguments (no I/O)."""
        if (handler is None) == (batch_handler is None):
            raise ConfigError("handler", "pass exactly one of handler (per message) or batch_handler (per batch)")
        return PerBatch(batch_handler) if batch_handler is not None else PerMessage(handler)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ public API

    def poll_once(self) -> int:
        """Consume one batch: claim, handle new ids, complete, dead-letter, commit. Returns messages handled."""
        if self._closed:
            raise KconsError("the consumer is closed")
        self._pauses.resume_due()
        self._retry_leftovers()
        batch, self._ahead = self._ahead, None
        if batch is None:
            msgs = self._source.poll()
            if not msgs:
                now = time.monotonic()
                if self._idle_since is None:
                    self._idle_since = now
                self._flush(wait=now - self._idle_since >= IDLE_SETTLE_S)
                return 0
            self._idle_since = None
            if self._claim_ahead:
                batch = self._send(self._read(msgs), frozenset())
        started = time.perf_counter()
        stats = self._process_ahead(batch) if batch is not None else self._process(msgs)
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        self.stats.add(stats)
        self.last_batch = stats
        return stats.handled

    def run(self, max_messages: int | None = None, idle_timeout_s: float | None = None) -> None:
        """Process batches until :meth:`stop`, ``max_messages`` decided, or ``idle_timeout_s`` without messages.

        Installs no signal handler (call :meth:`stop` from yours). The consumer stays open.
        """
        decided_at_start = self._decided()
        last_activity = time.monotonic()
        while not self._stopping.is_set():
            before = self.stats.consumed
            self.poll_once()
            now = time.monotonic()
            if self.stats.consumed != before:
                last_activity = now
            elif idle_timeout_s is not None and now - last_activity >= idle_timeout_s:
                return
            if max_messages is not None and self._decided() - decided_at_start >= max_messages:
                return

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (safe from signal handlers and other threads)."""
        self._stopping.set()

    def close(self) -> None:
        """Commit what is done, give back claims, flush the dead-letter writer and leave the group."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drop_ahead()
            self._retry_leftovers()
            self._flush()
        finally:
            try:
                self._consumer.close()
            finally:
                if self._committer is not None:
                    self._committer.shutdown(wait=True)
                self._dlq.close()
                self._effects.close()

    def __enter__(self) -> IdempotentConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self, store_outage_s: float = 30.0) -> tuple[bool, str]:
        """``(healthy, detail)`` for :class:`~kcons.metrics.MetricsServer` health checks.

        Unhealthy when closed, or when the dedup store has failed for longer than
        ``store_outage_s`` (the consumer then keeps its partitions paused and makes no progress).
        """
        failing = 0.0 if self._store_failing_since is None else time.monotonic() - self._store_failing_since
        healthy = not self._closed and (self._store_failing_since is None or failing < store_outage_s)
        detail = (
            f"closed={self._closed} paused_partitions={len(self._pauses)} "
            f"uncommitted_partitions={self._ledger.uncommitted} store_failing_s={failing:.0f}"
        )
        return healthy, detail

    @property
    def paused_partitions(self) -> list[TP]:
        """Partitions paused for back-pressure right now."""
        return self._pauses.paused

    @property
    def kafka_consumer(self) -> Any:
        """The underlying confluent-kafka consumer (for metadata and assignment queries)."""
        return self._consumer

    # ------------------------------------------------------------------ one batch

    def _read_ids(self, msgs: list[Any], stats: BatchStats) -> tuple[list[str] | None, list[Entry] | None, list[str]]:
        """Each message's id (``raw``, when read in one pass) or entry (per message), and the batch's distinct ids."""
        raw: list[str] | None = None
        if self._store is None:
            raw = list(map(position_id, msgs))  # no dedup: every message is new
            return raw, None, raw
        if self._key_fn is default_event_id:
            raw = header_ids(msgs)  # the common case, read in C: every first header is a kcons-id
            if raw is not None:
                return raw, None, list(dict.fromkeys(raw))
        entries = []
        fallback = 0
        key_fn = self._key_fn
        for msg in msgs:
            entry, missing = entry_of(msg, key_fn)
            entries.append(entry)
            fallback += missing
        if fallback:
            stats.fallback_ids = fallback
            self._metrics.fallback_ids.inc(fallback)
        return None, entries, list(dict.fromkeys([e.event_id for e in entries if e.event_id is not None]))

    def _read(self, msgs: list[Any]) -> _Batch:
        """A batch's messages with their ids read (no store call yet)."""
        stats = BatchStats()
        raw, entries, ids = self._read_ids(msgs, stats)
        return _Batch(msgs, raw, entries, ids, stats)

    def _process(self, msgs: list[Any]) -> BatchStats:
        """Claim and handle one batch (the store call made and answered here)."""
        batch = self._read(msgs)
        try:
            claim = self._claim(batch.ids)
        except StoreError as exc:
            return self._store_failed(batch, exc)
        self._store_failing_since = None
        return self._handle_deciding(batch, claim)[0]

    def _store_failed(self, batch: _Batch, exc: StoreError) -> BatchStats:
        """The batch's claim failed: nothing of it is decided; every partition is rewound to its first message."""
        if self._store_failing_since is None:
            self._store_failing_since = time.monotonic()
        self._log.warning("dedup store claim failed, pausing the batch's partitions: %s", exc)
        msgs, stats = batch.msgs, batch.stats
        stats.consumed = len(msgs)
        self._metrics.consumed.inc(len(msgs))
        self._finish(hold_all(_starts(msgs), len(msgs), self._pause_s, "store_error"), batch.entries, msgs, stats)
        return stats

    def _process_ahead(self, batch: _Batch) -> BatchStats:
        """Claim ahead: read the next batch and send its claim, then take this batch's answer and handle it.

        Redis runs the two calls one after the other while this thread reads, decodes and handles,
        so the store's work overlaps the consumer's. No read happens while a call other than this
        batch's is in flight (a revocation during the read first takes this batch's answer).
        """
        if not self._stopping.is_set():
            self._current = batch  # a revocation while reading ahead drops its partitions from this batch
            try:
                following = self._source.poll(timeout_s=0)  # only what is already fetched
            except BaseException:
                self._ahead = batch  # not handled: close() takes its answer and gives its claims back
                raise
            finally:
                self._current = None
            if self._revoked_during_read:
                following = self._after_rebalance(following)
            if following:
                self._ahead = self._send(self._read(following), frozenset(batch.ids))
        try:
            claim = self._receive(batch)
        except BaseException as exc:
            if not isinstance(exc, StoreError):  # an interrupt: close() takes the answer and gives the claims back
                self._ahead_unhandled.append(batch)
                raise
            if self._ahead is not None:  # read after this batch, which is rewound: it goes too
                self._ahead.stage_waits = True  # and its done records count only after this batch's
                self._ahead.drop.update(_starts(batch.msgs))
            return self._store_failed(batch, exc)
        if self._ledger.has_ready:  # the done records the answer confirmed make offsets committable
            self._ledger.commit()
        if not batch.msgs:  # every message dropped (rewound, revoked or lost since it was read)
            return batch.stats
        try:
            stats, decision = self._handle_deciding(batch, claim)
        except BaseException:
            if self._ahead is not None:  # this batch's partitions were rewound: the batch read after it goes too
                self._ahead.drop.update(_starts(batch.msgs))
            raise
        ahead = self._ahead
        if ahead is not None:
            ahead.prior_done = frozenset(decision.done)
            ahead.drop.update(decision.holds)
        return stats

    def _after_rebalance(self, following: list[Any]) -> list[Any]:
        """The read ahead saw partitions revoked or lost; those handed back start again from the committed offset.

        Messages of such a partition read before the rebalance would come ahead of the ones read
        from the committed offset after it: all of the partition's messages are dropped, and it is
        rewound to the lowest of its committed offset, its messages just read and those the batch
        being handled dropped (reading again is safe: the store drops what is done).
        """
        revoked, self._revoked_during_read = self._revoked_during_read, {}
        try:
            assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        except Exception:  # unknown assignment: rewind every revoked partition (a seek of one not ours fails)
            assigned = set(revoked)
        back = {tp: offset for tp, offset in revoked.items() if tp in assigned}
        for msg in following:
            tp = (msg.topic(), msg.partition())
            if tp in back:
                back[tp] = min(back[tp], msg.offset())
        if not back:
            return following
        try:
            committed = self._consumer.committed([TopicPartition(t, p) for t, p in back], timeout=10)
            for tp in committed or []:
                if tp.offset >= 0 and (tp.topic, tp.partition) in back:
                    back[(tp.topic, tp.partition)] = min(back[(tp.topic, tp.partition)], tp.offset)
        except Exception as exc:  # the lowest offset seen is the one the new assignment starts from
            self._log.warning("reading committed offsets after a rebalance failed: %s", exc)
        for tp, offset in back.items():
            if offset < _NO_OFFSET:  # else nothing of it was read or dropped: it starts from the committed offset
                self._pauses.rewind(tp, offset)
        return [m for m in following if (m.topic(), m.partition()) not in back]

    def _send(self, batch: _Batch, overlap: frozenset[str]) -> _Batch:
        """Send the batch's claim, carrying the deferred done records (their offsets ride with it)."""
        store: Any = self._store
        batch.done_sent, self._deferred_done = self._deferred_done, []
        batch.stage = self._ledger.take_awaiting()  # committable once this call's done records are written
        batch.overlap = overlap
        try:
            batch.answer = store.send_complete_and_claim(batch.done_sent, batch.ids, self._lease_s)
        except StoreError as exc:
            batch.error = exc  # retried when the answer is wanted
        return batch

    def _receive(self, batch: _Batch) -> ClaimResult:
        """The answer to the batch's claim (retried at once under the store policy when it failed).

        On success the offsets whose done records rode on the call become committable. An id the
        batch handled just before also claimed (the call was sent before that batch finished) is
        a duplicate when that batch did it; otherwise that batch gave it back, perhaps after this
        call claimed it, so it is claimed anew (one more store call, for those ids only). The
        messages of partitions rewound since the call was sent are dropped and their claims given back.
        """
        if batch.claim is not None:  # taken already (by a revocation during the read ahead)
            return batch.claim
        if batch.failed and batch.error is not None:  # answered (failed) already, during the read ahead
            raise batch.error
        store: Any = self._store
        answer, batch.answer = batch.answer, None
        retried = False
        try:
            if answer is None:
                raise batch.error or StoreError("the claim was never sent")
            claim: ClaimResult = answer()
        except StoreError as exc:
            self._log.info("claim ahead failed, claiming again: %s", exc)
            try:
                claim = self._store_retry(store.complete_and_claim, batch.done_sent, batch.ids, self._lease_s)
                retried = True
            except StoreError as final:
                self._deferred_done[:0] = batch.done_sent  # written with the next store call
                self._unconfirmed.update(batch.done_sent)  # calls sent meanwhile may claim them again
                self._ledger.decide(batch.stage, awaiting_done=True)
                batch.done_sent, batch.stage = [], {}
                batch.error, batch.failed = final, True
                batch.without(batch.drop)  # rewound since: not held here, at offsets past the rewind
                raise
        self._store_failing_since = None
        self._ledger.decide(batch.stage, awaiting_done=bool(self._uncompleted) or batch.stage_waits)
        if self._unconfirmed:
            self._unconfirmed.difference_update(batch.done_sent)
        if retried and batch.done_sent and self._ahead is not None:
            # The call sent after this one may have run before the retry wrote these: it may claim them.
            self._unconfirmed.update(batch.done_sent)
            self._ahead.confirms = batch.done_sent
        batch.done_sent, batch.stage = [], {}
        if self._unconfirmed or self._uncompleted:  # handled here, done records not written yet: duplicates
            handled = claim.claimed & (self._unconfirmed | self._uncompleted)
            if handled:
                claim = ClaimResult(claim.claimed - handled, claim.done | handled, claim.busy)
            if batch.confirms:  # written by a retry while this call was in flight: later calls see them done
                self._unconfirmed.difference_update(batch.confirms)
        both = batch.overlap & claim.claimed
        if both:  # also claimed by the batch before, which has finished since: did it do them?
            did = both & batch.prior_done
            again = both - did  # given back since, maybe after this call claimed them: claim them anew
            fresh = ClaimResult(frozenset(), busy=again)
            if again:
                with contextlib.suppress(StoreError):  # busy, tried again later
                    fresh = self._store_retry(store.claim_batch, sorted(again), self._lease_s)
            unknown = again - fresh.claimed - fresh.done
            claim = ClaimResult(
                (claim.claimed - both) | fresh.claimed, claim.done | did | fresh.done, claim.busy | unknown
            )
        batch.claim = claim
        if batch.drop:
            self._give_back(batch, batch.drop)
        return batch.claim

    def _give_back(self, batch: _Batch, partitions: Collection[TP]) -> None:
        """Drop the batch's messages of ``partitions`` and release the claims no message left carries."""
        gone = batch.without(partitions)  # overlapping ids were sorted out by _receive: these are ours
        if gone and self._store is not None:
            self._release(gone)

    def _handle_deciding(self, batch: _Batch, claim: ClaimResult) -> tuple[BatchStats, Decision]:
        """Run the effects of a claimed batch and carry out the decision; its stats and the decision."""
        msgs, raw, entries, ids, stats = batch.msgs, batch.raw, batch.entries, batch.ids, batch.stats
        n = len(msgs)
        stats.consumed = n
        self._metrics.consumed.inc(n)
        claimed = claim.claimed
        effects = self._effects
        plan: BatchPlan | None = None
        decision: Decision | None = None
        try:
            with effects.unit():
                # Every message new (distinct ids, all claimed, none poison): ``ids`` is the batch's
                # ids in order, and the first pass over the whole batch usually decides it.
                first = None
                if self._fast_path and len(claimed) == n and not self._uncompleted:
                    first = effects.first_pass(msgs)
                    if first.ok == n:
                        decision = all_new(ids, end_offsets(msgs))
                if decision is None:
                    if entries is None:
                        assert raw is not None
                        entries = [
                            Entry(m.topic(), m.partition(), m.offset(), i) for m, i in zip(msgs, raw, strict=True)
                        ]
                    plan = BatchPlan(entries, claimed, claim.done | self._uncompleted, self._pause_s)
                    decision = run_plan(effects, plan, msgs, self._retry, first)
        except Exception as exc:  # the batch did not finish: rewind every partition to its first message
            self._log.warning("batch effects failed, rewinding the batch's partitions: %s", reason(exc))
            # A failed transaction rolled back every effect of the batch; otherwise what ran is done.
            done = [] if effects.atomic else decision.done if decision is not None else plan.done if plan else []
            decision = abandon(done, claimed, _starts(msgs), self._pause_s, "effects_failed")
            decision.deferred = n - decision.handled
        except BaseException:
            done = [] if effects.atomic or plan is None else plan.done
            self._abandon(abandon(done, claimed, _starts(msgs), 0.0, "interrupted"))
            raise
        self._finish(decision, entries, msgs, stats)
        return stats, decision

    def _finish(self, d: Decision, entries: list[Entry] | None, msgs: list[Any], stats: BatchStats) -> None:
        """Carry out a decision: record done, dead-letter, give back claims, rewind held partitions, commit."""
        if d.done and self._records_done:
            if self._pipelined:
                self._deferred_done.extend(d.done)  # written by the next batch's store call, or by _flush
            else:
                self._record_done(d.done)
        if d.dead_letter:
            assert entries is not None
            report = self._dlq.write([(msgs[p.position], p.reason) for p in d.dead_letter])
            acked = {i for i in range(len(d.dead_letter)) if report.is_acknowledged(i)}
            after_dead_letters(d, entries, acked, self._pause_s)
            if acked:
                self._metrics.dead_lettered.inc(len(acked))
        if d.release and self._store is not None:
            self._release(d.release)
        stats.handled = d.handled
        stats.duplicates = d.duplicates
        stats.deferred = d.deferred
        stats.dead_lettered = d.dead_lettered
        if d.duplicates:
            self._metrics.duplicates.inc(d.duplicates)
        if d.handled:
            self._metrics.handled.inc(d.handled)
        for tp, hold in d.holds.items():
            self._pauses.hold(tp, hold.offset, hold.pause_s)
            self._metrics.hold(hold.reason).inc()
        if d.commit:
            waits = bool(self._deferred_done or self._uncompleted) or self._done_in_flight()
            self._ledger.decide(d.commit, awaiting_done=waits)
            if not self._pipelined:
                self._ledger.commit()

    def _abandon(self, d: Decision) -> None:
        """On an interrupt mid-batch: keep what is done, give back the rest, rewind every partition."""
        if self._store is not None:
            with contextlib.suppress(Exception):
                if d.done and self._records_done:
                    self._record_done(self._deferred_done + d.done if self._pipelined else d.done)
                    self._deferred_done = []
                self._release(d.release)
        for tp, hold in d.holds.items():
            self._pauses.rewind(tp, hold.offset)

    # ------------------------------------------------------------------ store

    def _claim(self, ids: list[str]) -> ClaimResult:
        store = self._store
        if store is None:
            return ClaimResult(frozenset(ids))
        if self._pipelined:
            return self._claim_pipelined(ids)
        if not ids:
            return ClaimResult(frozenset())
        if self._batch_claim:
            result: ClaimResult = self._store_retry(store.claim_batch, ids, self._lease_s)  # type: ignore[attr-defined]
            return result
        # A plain DedupStore cannot tell done from busy: treat the unclaimed as busy (never lose one).
        return ClaimResult(frozenset(self._store_retry(store.claim, ids, self._lease_s)))

    def _claim_pipelined(self, ids: list[str]) -> ClaimResult:
        """One store call per batch: write the previous batch's done records and claim this batch.

        Offsets whose done records an earlier call wrote are committed meanwhile (on a helper
        thread with ``overlap_commit``: the Kafka and store round trips overlap; no other Kafka
        call runs meanwhile). Offsets are still committed only after their done records are written.
        """
        ledger = self._ledger
        commit = None
        if ledger.commit_due:
            if not self._overlap_commit:
                ledger.commit()
            else:
                if self._committer is None:
                    self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kcons-commit")
                commit = self._committer.submit(ledger.commit)
        try:
            done = self._deferred_done
            result: ClaimResult = (
                self._store_retry(self._store.complete_and_claim, done, ids, self._lease_s)  # type: ignore[union-attr]
                if done or ids
                else ClaimResult(frozenset())
            )
        finally:
            if commit is not None:
                commit.result()
        self._deferred_done = []
        if not self._uncompleted:
            ledger.done_recorded()
        return result

    def _done_in_flight(self) -> bool:
        """Claim ahead: a call not answered yet carries done records (offsets decided now must wait for them)."""
        ahead = self._ahead
        return ahead is not None and bool(ahead.done_sent)

    def _record_done(self, ids: list[str]) -> None:
        """Mark handled ids done; on failure keep them to retry (treated as done, no commit past them meanwhile)."""
        assert self._store is not None
        try:
            self._store_retry(self._store.complete, ids)
        except StoreError as exc:
            self._log.error("recording %d handled ids done failed; retrying before each batch: %s", len(ids), exc)
            self._uncompleted.update(ids)
        if self._unconfirmed:
            self._unconfirmed.difference_update(ids)  # written, or now among the uncompleted

    def _release(self, ids: set[str]) -> None:
        assert self._store is not None
        try:
            self._store_retry(self._store.release, list(ids))
        except StoreError as exc:
            self._log.warning("releasing %d claims failed; retrying later: %s", len(ids), exc)
            self._unreleased.update(ids)

    def _retry_leftovers(self) -> None:
        """Write the done records and give back the claims whose earlier attempt failed."""
        store = self._store
        if store is None:
            return
        recorded = bool(self._uncompleted) and _drain(store.complete, self._uncompleted, "recording ids done")
        if recorded and not self._deferred_done and not self._done_in_flight():
            self._ledger.done_recorded()
        if self._unreleased:
            _drain(store.release, self._unreleased, "releasing claims")

    def _flush(self, *, wait: bool = True) -> None:
        """Write deferred done records, then commit every decided offset (on idle, rebalance and close).

        ``wait=False`` (just idle): the commit does not wait for the broker when commits are asynchronous.
        """
        if self._deferred_done:
            done, self._deferred_done = self._deferred_done, []
            self._record_done(done)
        if not self._uncompleted:
            self._ledger.done_recorded()
        self._ledger.flush(wait=wait)

    def _decided(self) -> int:
        s = self.stats
        return s.handled + s.duplicates + s.dead_lettered

    # ------------------------------------------------------------------ rebalance callbacks

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        self._log.info("assigned %s", _describe(partitions))
        self._pauses.start([(tp.topic, tp.partition) for tp in partitions])  # a new assignment starts unpaused

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        """Commit what is done for the revoked partitions and forget them."""
        self._log.info("revoked %s", _describe(partitions))
        self._drop_current(partitions)
        try:
            self._flush()
        except KconsError as exc:
            self._log.warning("commit on revoke failed; the new owner will see those messages as duplicates: %s", exc)
        self._forget({(tp.topic, tp.partition) for tp in partitions})

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        """Partitions were lost (session expired): nothing can be committed for them any more."""
        self._log.warning("lost %s", _describe(partitions))
        self._drop_current(partitions)
        if self._deferred_done:  # the effects happened: record them, but commit nothing for lost partitions
            done, self._deferred_done = self._deferred_done, []
            self._record_done(done)
        self._forget({(tp.topic, tp.partition) for tp in partitions})

    def _drop_current(self, partitions: list[Any]) -> None:
        """Claim ahead: the batch claimed, not handled yet, leaves revoked or lost partitions to their new owner."""
        batch = self._current
        if batch is None:
            return
        gone = {(tp.topic, tp.partition) for tp in partitions}
        lowest = self._revoked_during_read
        for tp in gone:
            lowest.setdefault(tp, _NO_OFFSET)
        for msg in batch.msgs:
            tp = (msg.topic(), msg.partition())
            if tp in gone:
                lowest[tp] = min(lowest[tp], msg.offset())
        try:
            self._receive(batch)
        except StoreError:  # nothing claimed: drop the messages, the batch is held as a store outage
            batch.without(gone)
            return
        self._give_back(batch, gone)

    def _drop_ahead(self) -> None:
        """Claim ahead, on close: take the read-ahead batch's answer (it carries done records), give back its claims.

        A batch whose answer an interrupt left unread gives back every id it asked for (a release
        leaves done ids alone), and its done records are written again with the rest.
        """
        for lost in self._ahead_unhandled:
            self._deferred_done[:0] = lost.done_sent
            self._ledger.decide(lost.stage, awaiting_done=True)
            lost.done_sent, lost.stage = [], {}
            if lost.ids:
                self._release(set(lost.ids))
        self._ahead_unhandled = []
        batch, self._ahead = self._ahead, None
        if batch is None:
            return
        try:
            claim = self._receive(batch)
        except StoreError as exc:
            self._log.warning("claim ahead failed on close; its claims expire after their lease: %s", exc)
            return
        gone = set(claim.claimed)
        if gone:
            self._release(gone)

    def _forget(self, partitions: set[TP]) -> None:
        self._ledger.forget(partitions)
        self._pauses.release(partitions)
        # Claims are not held between batches (released or completed after each batch; with claim
        # ahead, the batch claimed while the next is read gives these partitions' claims back in
        # _drop_current); the ones whose release failed are given back now, so the partitions' new
        # owner need not wait.
        self._retry_leftovers()


class TransactionalIdempotentConsumer(IdempotentConsumer):
    """Exactly-once effects in an SQL database: ``handler(msg, conn)`` and the dedup record commit together.

    The :class:`IdempotentConsumer` driver with the :class:`~kcons.consumer.effects.SameTransaction`
    effects: each batch runs in one transaction on ``conn`` (opened by the store's ``transaction``);
    each message in a savepoint that first records its id done with ``store.complete_in`` (which
    succeeds only while this worker still owns the claim) and then runs the handler. A failed
    attempt rolls back to the savepoint; a crash rolls back the whole batch, whose claims then
    expire after their lease. A worker whose lease was taken over gets ClaimLostError and rolls
    back instead of committing the effect a second time; a worker taking over waits on the row
    lock of a transaction still open and then sees the id done.

    ``connection`` is the caller's DB connection (psycopg in autocommit mode, or sqlite3 on
    the store's file); or pass ``connect``, a factory called again when the connection breaks.
    Every setting is checked before ``connect`` is called.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        handler: Callable[[Any, Any], None],
        *,
        store: TransactionalDedupStore,
        connection: Any = None,
        connect: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._tx = SameTransaction(handler, store, connection=connection, connect=connect)
        super().__init__(config, topics, None, store=store, **kwargs)

    def _make_effects(
        self, handler: Handler | None, batch_handler: BatchHandler | None, caps: StoreCapabilities
    ) -> Effects:
        if batch_handler is not None:
            raise ConfigError("batch_handler", "the transactional consumer runs handler(msg, conn) per message")
        if not caps.transactional:
            raise ConfigError("store", "the transactional consumer needs a store with complete_in (an SQL store)")
        return self._tx

    @property
    def connection(self) -> Any:
        """The DB connection the handlers run on."""
        return self._tx.connection


_NO_OFFSET = 1 << 62  # no message of the partition seen (higher than any offset)


class _Batch:
    """One batch on its way through the driver: messages, ids and, with claim ahead, its store call.

    ``overlap``: the ids of the batch handled before it (not finished when this batch's call was
    sent); ``prior_done``: which of them that batch did; ``drop``: partitions rewound since the call
    was sent.
    """

    __slots__ = (
        "answer", "claim", "confirms", "done_sent", "drop", "entries", "error", "failed", "ids", "msgs", "overlap",
        "prior_done", "raw", "stage", "stage_waits", "stats",
    )  # fmt: skip

    def __init__(
        self, msgs: list[Any], raw: list[str] | None, entries: list[Entry] | None, ids: list[str], stats: BatchStats
    ) -> None:
        self.msgs = msgs
        self.raw = raw
        self.entries = entries
        self.ids = ids
        self.stats = stats
        self.answer: Callable[[], ClaimResult] | None = None
        self.error: StoreError | None = None
        self.failed = False  # the answer was taken and the call failed (after retries)
        self.claim: ClaimResult | None = None
        self.done_sent: list[str] = []  # done records carried by this batch's store call
        self.confirms: list[str] = []  # done records a retry wrote while this call was in flight
        self.stage: dict[TP, int] = {}  # the offsets those done records make committable
        self.stage_waits = False  # an earlier call failed: the stage waits for its done records too
        self.overlap: frozenset[str] = frozenset()
        self.prior_done: frozenset[str] = frozenset()
        self.drop: set[TP] = set()

    def without(self, partitions: Collection[TP]) -> set[str]:
        """Drop the messages of ``partitions``; return the claimed ids no message left carries."""
        keep = [i for i, m in enumerate(self.msgs) if (m.topic(), m.partition()) not in partitions]
        if len(keep) == len(self.msgs):
            return set()
        self.msgs = [self.msgs[i] for i in keep]
        if self.raw is not None:
            self.raw = [self.raw[i] for i in keep]
            self.ids = list(dict.fromkeys(self.raw))
        if self.entries is not None:
            self.entries = [self.entries[i] for i in keep]
            self.ids = list(dict.fromkeys([e.event_id for e in self.entries if e.event_id is not None]))
        if self.claim is None:
            return set()
        left = set(self.ids)
        gone = set(self.claim.claimed) - left
        self.claim = ClaimResult(self.claim.claimed & left, self.claim.done & left, self.claim.busy & left)
        return gone


def _drain(call: Callable[[list[str]], None], pending: set[str], what: str) -> bool:
    """Call ``call`` once on the ids of ``pending``; True (and they leave it) when it succeeded."""
    ids = list(pending)
    try:
        call(ids)
    except StoreError as exc:
        log.warning("%s (%d) still fails: %s", what, len(ids), exc)
        return False
    pending.difference_update(ids)
    return True


def _starts(msgs: list[Any]) -> dict[TP, int]:
    """Per partition, the offset of its first message in ``msgs``."""
    starts: dict[TP, int] = {}
    for msg in msgs:
        starts.setdefault((msg.topic(), msg.partition()), msg.offset())
    return starts


def _describe(partitions: list[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
