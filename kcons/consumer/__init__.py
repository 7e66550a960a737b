"""IdempotentConsumer: at-least-once delivery, duplicates dropped by a dedup store, poison messages dead-lettered.

Each batch goes through the same steps, and the commit decision is made in one place:

1. consume up to ``batch_size`` messages; read each one's event id (``kcons-id`` header, or
   Debezium's ``id`` header; a message without one is identified by ``topic/partition/offset``);
2. claim the ids in the dedup store, one call for the whole batch;
3. run the handler for claimed ids only (retries under a replaceable tenacity policy); ids
   already done are dropped as duplicates; ids another worker holds under a lease are *busy*:
   the partition is rewound to that message and paused, so it is tried again later and never
   skipped;
4. record the handled ids done, write poison messages to the dead-letter topic and wait for
   the acknowledgements;
5. commit, per partition, the offset after the last message whose effect is done or whose
   dead-letter write was acknowledged; partitions stopped early are rewound (seek) and paused.

With a store that can record one batch done and claim the next in a single call (Redis,
memory: :class:`~kcons.dedup.PipelinedDedupStore`), step 4's done records ride on the next
batch's claim, so a batch costs one store round trip; its offsets are committed after that call
(overlapping the following one), never before the done records are written. On idle, on
revocation and on close, pending done records are written and offsets committed at once.

Guarantees: every message is handled at least once or dead-lettered (offsets never move past a
message that is not done); a message whose id is done is never handled again while the store
keeps it (retention TTL). With :class:`IdempotentConsumer` a crash after a handler ran but
before its batch was recorded done can run that handler again once (at-least-once effects).
:class:`TransactionalIdempotentConsumer` closes that gap for effects in an SQL database: the
handler runs inside a transaction on the caller's connection and the dedup record commits in
the same transaction, guarded by the claim's owner, so each event's effect commits exactly once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import operator
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import tenacity
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from kcons.config import redact_config
from kcons.dedup import (
    BatchDedupStore,
    ClaimLostError,
    ClaimResult,
    DedupStore,
    PipelinedDedupStore,
    TransactionalDedupStore,
    check_lease,
)
from kcons.envelope import HEADER_ID
from kcons.errors import (
    ConfigError,
    DecodeError,
    ErrorClass,
    KconsError,
    PoisonMessageError,
    StoreError,
    classify_kafka_error,
    kafka_error_to_exception,
)
from kcons.metrics import (
    CONSUMER_BATCH_SECONDS,
    CONSUMER_COMMIT_FAILURES,
    CONSUMER_CONSUMED,
    CONSUMER_DEAD_LETTERED,
    CONSUMER_DUPLICATES,
    CONSUMER_FALLBACK_IDS,
    CONSUMER_HANDLED,
    CONSUMER_HANDLER_ERRORS,
    CONSUMER_HOLDS,
    CONSUMER_PAUSED_PARTITIONS,
)

log = logging.getLogger(__name__)

__all__ = [
    "DLQ_REASON_HEADER",
    "DLQ_SOURCE_HEADER",
    "BatchHandler",
    "BatchStats",
    "Handler",
    "IdempotentConsumer",
    "RetryLater",
    "TransactionalIdempotentConsumer",
    "default_dlq_topic",
    "default_event_id",
    "default_retry_policy",
    "default_store_retry_policy",
]

DLQ_REASON_HEADER = "kcons-dlq-reason"
DLQ_SOURCE_HEADER = "kcons-dlq-source"
_DLQ_REASON_MAX = 1000

# Client properties a dead-letter producer shares with the consumer (connection and security).
_SHARED_PREFIXES = (
    "bootstrap.servers", "security.protocol", "ssl.", "sasl.", "socket.", "broker.", "metadata.", "client.dns",
    "api.version", "enable.ssl.certificate.verification", "oauthbearer", "error_cb", "logger", "log_level",
    "client.rack", "resolve_cb", "connections.max.idle.ms", "reconnect.backoff",
)  # fmt: skip

TP = tuple[str, int]
#: One consumed message as a batch decides it: (message, event id, poison reason).
_Entry = tuple[Any, str | None, str | None]
Handler = Callable[[Any], None]
#: ``batch_handler(messages)``: the effects of a batch's new messages, in consumption order.
BatchHandler = Callable[[list[Any]], None]
KeyFunction = Callable[[Any], "str | None"]


class RetryLater(KconsError):
    """Raised by a handler when a downstream is saturated: the message is put back and its partition paused.

    The message is not retried at once and not dead-lettered: the partition is rewound to it
    and paused for ``retry_after_s`` seconds (back-pressure), then consumed again.
    """

    def __init__(self, retry_after_s: float = 1.0, reason: str = "handler asked to retry later") -> None:
        self.retry_after_s = max(0.0, float(retry_after_s))
        super().__init__(reason)


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


def default_event_id(msg: Any) -> str | None:
    """The event id of a message: the ``kcons-id`` header, else Debezium's ``id`` header, else None.

    Raises DecodeError when the id header is not UTF-8, which makes the message poison.
    """
    headers = msg.headers()
    if not headers:
        return None
    debezium: Any = None
    for name, value in headers:
        if name == HEADER_ID:
            if value:
                try:
                    return value.decode() if type(value) is bytes else _decode_id(value, HEADER_ID)
                except UnicodeDecodeError:
                    raise DecodeError(f"header {HEADER_ID} is not UTF-8") from None
            return None
        if name == "id" and debezium is None:
            debezium = value
    if debezium is not None:
        text = _decode_id(debezium, "id")
        if text is not None and len(text) >= 2 and text[0] == '"' and text[-1] == '"':
            text = text[1:-1] or None  # Debezium's JSON header converter quotes strings
        return text
    return None


def _decode_id(value: Any, header: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"header {header} is not UTF-8") from None
    return text or None


def default_dlq_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``: ``<topic>.dlq``."""
    return f"{topic}.dlq"


_NOT_RETRIED = (DecodeError, PoisonMessageError, RetryLater, ClaimLostError)


def default_retry_policy() -> tenacity.Retrying:
    """Three attempts with exponential backoff (0.1 s, 0.2 s, ... at most 2 s); poison errors are not retried."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
        retry=tenacity.retry_if_not_exception_type(_NOT_RETRIED),
        reraise=True,
    )


def default_store_retry_policy() -> tenacity.Retrying:
    """Retries of dedup store calls: four attempts within about a second, StoreError only."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential(multiplier=0.05, max=0.5),
        retry=tenacity.retry_if_exception_type(StoreError),
        reraise=True,
    )


@dataclass
class _Batch:
    """Bookkeeping of one batch: what is decided per partition and what must be rewound."""

    commit_to: dict[TP, int] = field(default_factory=dict)
    held: dict[TP, tuple[int, float, str]] = field(default_factory=dict)  # offset, pause seconds, reason
    claimed: set[str] = field(default_factory=set)
    done: list[str] = field(default_factory=list)
    poison: list[tuple[Any, str | None, str]] = field(default_factory=list)  # msg, claimed id, reason
    stats: BatchStats = field(default_factory=BatchStats)

    def hold(self, tp: TP, offset: int, pause_s: float, reason: str) -> None:
        """Stop the partition at ``offset``: nothing from there on is committed; it is rewound and paused."""
        current = self.held.get(tp)
        if current is None or offset < current[0]:
            self.held[tp] = (offset, pause_s, reason)
        if tp in self.commit_to and self.commit_to[tp] > offset:
            self.commit_to[tp] = offset


class IdempotentConsumer:
    """At-least-once consumer that drops duplicates by event id and dead-letters poison messages.

    ``config`` is a confluent-kafka consumer config (librdkafka names, ``group.id`` required);
    ``enable.auto.commit`` is forced off because offsets are committed only after the effects
    are done. ``handler(msg)`` runs once per new event id (see the module docstring for the
    exact guarantees). Or pass ``batch_handler(messages)`` instead (``handler=None``): it gets
    each batch's new messages at once, in order, so an effect that costs a round trip (Redis,
    an HTTP API, a bulk insert) costs one per batch; a batch it fails on is retried one
    message at a time (``batch_handler([msg])``) under the same retry and dead-letter rules,
    so the messages it applied before failing are applied again (effects must tolerate that,
    as with any at-least-once handler).
    The dedup ``store`` should be namespaced by the same consumer group.

    Claims are taken per batch, so ``lease_s`` should exceed the time one batch takes to
    handle; a slower batch lets another worker take its ids over (handled twice, never lost).
    A batch is up to ``batch_size`` messages: after waiting up to ``batch_timeout_s`` for the
    first one, whatever is already fetched (never waiting for more), so latency stays at one
    batch's handling time and batches grow by themselves under load.
    ``pause_s`` is how long a partition stays paused after it was rewound (busy id, store
    outage, failed dead-letter write). With ``async_commit`` (the default) the offsets of a
    finished batch are committed without waiting for the broker (a failed commit is merged
    into the next; idle, revocation and close commit synchronously). With
    ``async_commit=False`` the commit waits, and ``overlap_commit`` runs it on a helper thread
    during the next store round trip (default: on, unless the store says it is ``in_process``).
    ``consumer_factory``/``producer_factory`` build the Kafka clients (confluent-kafka by default).
    """

    #: True when a failed batch leaves no effect behind (its effects run in one transaction).
    _atomic_batch = False

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        handler: Handler | None,
        *,
        store: DedupStore,
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
        consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
        producer_factory: Callable[[dict[str, Any]], Any] = Producer,
    ) -> None:
        if not config.get("group.id"):
            raise ConfigError("group.id", "the idempotent consumer needs a consumer group (group.id)")
        if (handler is None) == (batch_handler is None):
            raise ConfigError("handler", "pass exactly one of handler (per message) or batch_handler (per batch)")
        if batch_handler is not None and self._atomic_batch:
            raise ConfigError("batch_handler", "the transactional consumer runs handler(msg, conn) per message")
        if not config.get("bootstrap.servers"):
            raise ConfigError("bootstrap.servers", "is not set")
        if not topics or any(not isinstance(t, str) or not t for t in topics):
            raise ConfigError("topics", f"expected a non-empty list of topic names, got {list(topics)!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
            raise ConfigError("batch_size", f"must be an integer in [1, 100000], got {batch_size!r}")
        if not 0 < batch_timeout_s <= 60:
            raise ConfigError("batch_timeout_s", f"must be in (0, 60], got {batch_timeout_s!r}")
        if not 0 <= pause_s <= 3600:
            raise ConfigError("pause_s", f"must be in [0, 3600], got {pause_s!r}")
        if not 0 < dlq_timeout_s <= 3600:
            raise ConfigError("dlq_timeout_s", f"must be in (0, 3600], got {dlq_timeout_s!r}")
        for name, policy in (("retry", retry), ("store_retry", store_retry)):
            if policy is not None and not isinstance(policy, tenacity.BaseRetrying):
                raise ConfigError(name, "expected a tenacity.Retrying policy object")
        self._lease_s = check_lease(lease_s)
        self._config = dict(config)
        self._config["enable.auto.commit"] = False
        self._user_on_commit: Callable[[Any, list[Any]], None] | None = self._config.get("on_commit")
        self._config["on_commit"] = self._on_commit
        self._async_commit = async_commit
        self._sent: dict[TP, int] = {}  # highest offset sent in an asynchronous commit, per partition
        self._unsettled: dict[TP, int] = {}  # sent asynchronously since the last synchronous commit
        self._topics = list(topics)
        self._batch_handler = batch_handler
        # Per message: the handler, or the batch handler on one message (how a failed batch is retried).
        self._handler: Handler = handler if handler is not None else _one_at_a_time(batch_handler)  # type: ignore[arg-type]
        self._store = store
        self._batch_store: BatchDedupStore | None = store if isinstance(store, BatchDedupStore) else None
        # One store call per batch: a batch's done records ride on the next batch's claim, and its
        # offsets are committed right after that call (never before its done records are written).
        self._pipelined: PipelinedDedupStore | None = (
            store if isinstance(store, PipelinedDedupStore) and not self._atomic_batch else None
        )
        self._deferred_done: list[str] = []  # handled, done records not written yet
        self._deferred_offsets: dict[TP, int] = {}  # offsets of those batches: not safe to commit yet
        self._ready_offsets: dict[TP, int] = {}  # done records written: committed with the next store call
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        # Overlapping the offset commit with the store round trip pays off for a networked store
        # only; for an in-process store the thread hand-off costs more than it hides.
        if overlap_commit is None:
            overlap_commit = not getattr(store, "in_process", False)
        # An asynchronous commit returns at once: nothing is left to overlap.
        self._overlap_commit = overlap_commit and not async_commit
        self._dlq_topic = dlq_topic or default_dlq_topic
        self._retry = retry or default_retry_policy()
        self._store_retry = store_retry or default_store_retry_policy()
        self._key_fn = key_fn
        self._batch_size = batch_size
        self._batch_timeout_s = batch_timeout_s
        self._pause_s = pause_s
        self._dlq_timeout_s = dlq_timeout_s
        self._producer_factory = producer_factory
        self._dlq_config = self._dead_letter_config(dlq_producer_config)
        self._producer: Any = None
        self._paused: dict[TP, float] = {}  # partition -> monotonic time to resume
        self._uncommitted: dict[TP, int] = {}  # offsets decided but not yet committed
        self._unreleased: set[str] = set()  # claims whose release failed; retried
        self._uncompleted: set[str] = set()  # handled ids whose completion failed; retried, treated as done
        self._stopping = threading.Event()
        self._rebalances = 0  # revocations and losses seen (a batch read across one is filtered)
        self._closed = False
        self._store_failing_since: float | None = None
        self.stats = BatchStats()
        self.last_batch = BatchStats()
        log.info("idempotent consumer for %s, config %s", ",".join(self._topics), redact_config(self._config))
        self._consumer = consumer_factory(self._config)
        self._consumer.subscribe(
            self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    # ------------------------------------------------------------------ public API

    def poll_once(self) -> int:
        """Consume one batch: claim, handle new ids, complete, dead-letter, commit. Returns messages handled."""
        if self._closed:
            raise KconsError("the consumer is closed")
        self._resume_due()
        self._retry_leftovers()
        # Wait for the first message only, then take what is already fetched: a batch never waits
        # to fill up (latency), and grows by itself while the previous one was being handled.
        first = self._consumer.poll(self._batch_timeout_s)
        if first is None:
            msgs: list[Any] = []
        elif self._batch_size > 1:
            rebalances = self._rebalances
            msgs = [first, *self._consumer.consume(self._batch_size - 1, 0)]
            if self._rebalances != rebalances:  # revoked between the two calls: drop what is no longer ours
                msgs = self._still_ours(msgs)
        else:
            msgs = [first]
        if not msgs:
            self._flush()
            return 0
        started = time.perf_counter()
        batch = self._valid(msgs)
        stats = self._process(batch) if batch else BatchStats()
        CONSUMER_BATCH_SECONDS.observe(time.perf_counter() - started)
        self.stats.add(stats)
        self.last_batch = stats
        return stats.handled

    def run(self, max_messages: int | None = None, idle_timeout_s: float | None = None) -> None:
        """Process batches until stop() or SIGTERM, ``max_messages`` decided, or ``idle_timeout_s`` without messages.

        A SIGTERM handler that calls :meth:`stop` is installed only when called from the main
        thread, and the previous handler is restored on return. The consumer stays open.
        """
        previous: Any = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: self.stop())
        try:
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
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (safe from signal handlers and other threads)."""
        self._stopping.set()

    def close(self) -> None:
        """Commit what is done, give back claims, flush the dead-letter producer and leave the group."""
        if self._closed:
            return
        self._closed = True
        try:
            self._retry_leftovers()
            self._flush()
        finally:
            try:
                self._consumer.close()
            finally:
                if self._committer is not None:
                    self._committer.shutdown(wait=True)
                if self._producer is not None:
                    self._producer.flush(self._dlq_timeout_s)

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
            f"closed={self._closed} paused_partitions={len(self._paused)} "
            f"uncommitted_partitions={len(self._uncommitted)} store_failing_s={failing:.0f}"
        )
        return healthy, detail

    @property
    def paused_partitions(self) -> list[TP]:
        """Partitions paused for back-pressure right now."""
        return sorted(self._paused)

    @property
    def kafka_consumer(self) -> Any:
        """The underlying confluent-kafka consumer (for metadata and assignment queries)."""
        return self._consumer

    # ------------------------------------------------------------------ one batch

    def _valid(self, msgs: list[Any]) -> list[Any]:
        errors = list(map(_access(msgs).error, msgs))
        if errors.count(None) == len(errors):
            return msgs  # the common case: no error, no copy
        out = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                out.append(msg)
                continue
            if err.code() == KafkaError._PARTITION_EOF:
                continue
            cls = classify_kafka_error(err)
            if cls in (ErrorClass.FATAL, ErrorClass.FENCED):
                raise kafka_error_to_exception(err, "consume")
            log.warning("consume reported %s (%s); continuing", err.str(), err.name())
        return out

    def _process(self, msgs: list[Any]) -> BatchStats:
        b = _Batch()
        stats = b.stats
        stats.consumed = len(msgs)
        CONSUMER_CONSUMED.inc(len(msgs))
        key_fn = self._key_fn
        # The common case, read in C: every message's first header is a kcons-id.
        header_ids = _header_ids(msgs) if key_fn is default_event_id else None
        entries: list[_Entry] | None = None  # msg, event id, poison reason (built when needed)
        if header_ids is None:
            entries = []
            fallback = 0
            for msg in msgs:
                entry, missing = self._entry(msg, key_fn)
                entries.append(entry)
                fallback += missing
            if fallback:
                stats.fallback_ids = fallback
                CONSUMER_FALLBACK_IDS.inc(fallback)
            ids = list(dict.fromkeys([e[1] for e in entries if e[1] is not None]))
        else:
            ids = list(dict.fromkeys(header_ids))
        try:
            result = self._claim(ids)
        except StoreError as exc:
            if self._store_failing_since is None:
                self._store_failing_since = time.monotonic()
            log.warning("dedup store claim failed, pausing the batch's partitions: %s", exc)
            self._hold_all(b, msgs, "store_error")
            self._finish(b)
            return stats
        self._store_failing_since = None
        b.claimed.update(result.claimed)
        try:
            with self._effects():
                seen = set(result.done) | self._uncompleted
                if len(result.claimed) == len(msgs) and not self._uncompleted and not self._atomic_batch:
                    # Every message new (distinct ids, all claimed, none poison), so ``ids`` is
                    # the batch's ids in order: the hot path, without per-message decisions.
                    self._run_all_new(msgs, ids, b, seen)
                else:
                    if entries is None:
                        assert header_ids is not None
                        entries = _new_entries(msgs, header_ids)
                    if self._batch_handler is not None:
                        self._walk_batched(entries, b, seen, self._batch_handler)
                    else:
                        self._walk(entries, b, seen, None if self._atomic_batch else self._handler)
        except Exception as exc:  # the batch did not finish: rewind every partition to its first message
            log.warning("batch effects failed, rewinding the batch's partitions: %s", _reason(exc))
            if self._atomic_batch:  # the transaction rolled back: nothing of the batch happened
                b.done.clear()
            b.commit_to.clear()
            b.poison.clear()
            b.held.clear()
            self._hold_all(b, msgs, "effects_failed")
            stats.handled = len(b.done)
            stats.duplicates = 0
            stats.deferred = len(msgs) - stats.handled
        except BaseException:
            self._abandon(b, msgs)
            raise
        self._finish(b)
        return stats

    @staticmethod
    def _entry(msg: Any, key_fn: KeyFunction) -> tuple[_Entry, int]:
        """``(msg, event id, poison reason)`` by ``key_fn``, and 1 when the id fell back to the message's position."""
        try:
            event_id = key_fn(msg)
        except Exception as exc:  # an id that cannot be read makes the message poison
            return (msg, None, _reason(exc)), 0
        if event_id is None:
            return (msg, f"{msg.topic()}/{msg.partition()}/{msg.offset()}", None), 1
        return (msg, event_id, None), 0

    def _hold_all(self, b: _Batch, msgs: list[Any], reason: str) -> None:
        """Hold every partition of the batch at its first message."""
        for msg in msgs:
            tp = (msg.topic(), msg.partition())
            if tp not in b.held:
                b.hold(tp, msg.offset(), self._pause_s, reason)
        b.stats.deferred = len(msgs)

    def _walk_batched(
        self,
        entries: list[_Entry],
        b: _Batch,
        seen: set[str],
        handler: BatchHandler,
    ) -> None:
        """Run ``handler`` once on the batch's new messages, then decide the batch as :meth:`_walk` does.

        When the batch handler raises, the batch is decided one message at a time instead (the
        handler on single-message lists, with the retry policy, holds and dead letters of
        :meth:`_walk`), so one bad message costs the batch's speed, never its neighbours; the
        messages the failed call had already applied are applied again (at-least-once). A
        RetryLater or ClaimLostError from the batch holds every partition at its first new
        message instead (back-pressure: nothing is retried at once).
        """
        fresh = _fresh_messages(entries, seen, b.claimed)
        if fresh:
            try:
                handler(fresh)
            except (RetryLater, ClaimLostError) as exc:
                # Every new message answers the same: each partition is held at its first new
                # message, and what precedes it (duplicates, poison messages) is decided as usual.
                self._walk(entries, b, seen, _raising(exc))
                return
            except Exception as exc:
                CONSUMER_HANDLER_ERRORS.inc()
                log.info("batch handler failed on %d messages (%s); one at a time now", len(fresh), _reason(exc))
                self._walk(entries, b, seen, self._handler)
                return
        self._walk(entries, b, seen, _already_done)

    def _run_all_new(self, msgs: list[Any], ids: list[str], b: _Batch, seen: set[str]) -> None:
        """Decide a batch whose messages are all new (``ids[i]`` is ``msgs[i]``'s id): handle, record done.

        The handler runs from C (``map``), and the ids and offsets are recorded per batch. At the
        first failure the messages before it are done and the rest (the failed one first, its
        attempt counted) go through :meth:`_walk`; a failed batch handler sends the whole batch
        there, as :meth:`_walk_batched` does.
        """
        batch_handler = self._batch_handler
        if batch_handler is not None:
            try:
                batch_handler(msgs)
            except (RetryLater, ClaimLostError) as exc:
                self._walk(_new_entries(msgs, ids), b, seen, _raising(exc))
                return
            except Exception as exc:
                CONSUMER_HANDLER_ERRORS.inc()
                log.info("batch handler failed on %d messages (%s); one at a time now", len(msgs), _reason(exc))
                self._walk(_new_entries(msgs, ids), b, seen, self._handler)
                return
        else:
            rest = iter(msgs)
            try:
                collections.deque(map(self._handler, rest), maxlen=0)
            except BaseException as exc:
                failed = len(msgs) - sum(1 for _ in rest) - 1  # ``rest`` stopped after the failed message
                b.done.extend(ids[:failed])
                b.commit_to.update(_end_offsets(msgs[:failed]))
                if not isinstance(exc, Exception):
                    raise
                seen.update(ids[:failed])
                self._walk(_new_entries(msgs[failed:], ids[failed:]), b, seen, self._handler, first_error=exc)
                return
        b.done.extend(ids)
        b.commit_to.update(_end_offsets(msgs))
        b.stats.handled = len(b.done)

    def _walk(
        self,
        entries: list[_Entry],
        b: _Batch,
        seen: set[str],
        direct: Handler | None,
        first_error: Exception | None = None,
    ) -> None:
        """Decide every message of the batch in order; a held partition skips the rest of its messages.

        ``seen`` starts with the ids already done; ids handled or dead-lettered here join it, so
        a repeat later in the batch is a duplicate. ``direct`` runs a new message's first
        attempt (None: :meth:`_attempt`); failures are retried through :meth:`_attempt`.
        ``first_error``: the first message's first attempt already ran and raised this.
        """
        held = b.held
        commit_to = b.commit_to
        stats = b.stats
        done = b.done
        claimed = b.claimed
        attempt = self._attempt
        for msg, event_id, poison in entries:
            tp = (msg.topic(), msg.partition())
            if held and tp in held:
                stats.deferred += 1
                continue
            if poison is not None:
                b.poison.append((msg, None, poison))
                commit_to[tp] = msg.offset() + 1
                continue
            if event_id in seen:
                stats.duplicates += 1
                commit_to[tp] = msg.offset() + 1
                continue
            if event_id not in claimed:
                b.hold(tp, msg.offset(), self._pause_s, "busy")
                stats.deferred += 1
                continue
            assert event_id is not None
            if first_error is not None:
                outcome = self._after_failure(msg, event_id, first_error)
                first_error = None
            else:
                try:
                    if direct is not None:
                        direct(msg)
                    else:
                        attempt(msg, event_id)
                except Exception as exc:
                    outcome = self._after_failure(msg, event_id, exc)
                else:
                    done.append(event_id)
                    seen.add(event_id)
                    commit_to[tp] = msg.offset() + 1
                    continue
            if outcome is None:
                done.append(event_id)
                seen.add(event_id)
                commit_to[tp] = msg.offset() + 1
            elif isinstance(outcome, RetryLater):
                b.hold(tp, msg.offset(), outcome.retry_after_s, "retry_later")
                stats.deferred += 1
            elif isinstance(outcome, ClaimLostError):
                b.hold(tp, msg.offset(), self._pause_s, "claim_lost")
                stats.deferred += 1
            else:
                b.poison.append((msg, event_id, outcome))
                seen.add(event_id)
                commit_to[tp] = msg.offset() + 1
        stats.handled = len(done)

    def _after_failure(self, msg: Any, event_id: str, first: Exception) -> RetryLater | ClaimLostError | str | None:
        """The first attempt failed: retry under the policy. None when done, RetryLater/ClaimLostError to hold,
        else the poison reason."""
        if isinstance(first, (RetryLater, ClaimLostError)):
            return first
        CONSUMER_HANDLER_ERRORS.inc()
        if isinstance(first, (DecodeError, PoisonMessageError)):
            return _reason(first)
        # The first attempt counts as the policy's first: it is replayed, not run again.
        pending: list[BaseException] = [first]

        def attempt() -> None:
            if pending:
                raise pending.pop()
            try:
                self._attempt(msg, event_id)
            except Exception:
                CONSUMER_HANDLER_ERRORS.inc()
                raise

        failure: BaseException
        try:
            self._retry(attempt)
            return None
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            failure = last if last is not None else exc
        except Exception as exc:
            failure = exc
        if isinstance(failure, (RetryLater, ClaimLostError)):
            return failure
        return _reason(failure)

    def _finish(self, b: _Batch) -> None:
        """Record done, dead-letter, give back claims, rewind held partitions and commit: the one commit decision."""
        if b.done and self._pipelined is None:
            self._record_done(b.done)
        if b.poison:
            self._dead_letter(b)
        leftover = b.claimed.difference(b.done)
        if leftover:
            self._release(leftover)
        stats = b.stats
        if stats.duplicates:
            CONSUMER_DUPLICATES.inc(stats.duplicates)
        if stats.handled:
            CONSUMER_HANDLED.inc(stats.handled)
        for tp, (offset, pause_s, reason) in b.held.items():
            self._rewind(tp, offset, pause_s)
            CONSUMER_HOLDS.labels(reason=reason).inc()
        if not b.commit_to:
            return
        if self._pipelined is None:
            self._commit(b.commit_to)
        elif b.done or self._deferred_done:
            self._deferred_done.extend(b.done)  # written by the next batch's store call, or by _flush
            self._merge(self._deferred_offsets, b.commit_to)
        else:  # nothing of this batch waits for a done record
            self._merge(self._ready_offsets, b.commit_to)

    def _flush(self) -> None:
        """Write deferred done records, then commit every decided offset (on idle, rebalance and close)."""
        if self._deferred_done:
            done, self._deferred_done = self._deferred_done, []
            self._record_done(done)
        offsets = self._ready_offsets
        self._merge(offsets, self._deferred_offsets)
        # Asynchronous commits still unanswered are repeated here and waited for, so that idle,
        # revocation and close leave the group's offsets settled.
        self._merge(offsets, self._unsettled)
        self._ready_offsets, self._deferred_offsets, self._unsettled = {}, {}, {}
        if offsets or self._uncommitted:
            self._commit(offsets, sync=True)

    def _abandon(self, b: _Batch, msgs: list[Any]) -> None:
        """On an interrupt mid-batch: keep what is done, give back the rest, rewind every partition."""
        with contextlib.suppress(Exception):
            if b.done and not self._atomic_batch:
                self._record_done(b.done)
            self._release(b.claimed.difference(b.done) if not self._atomic_batch else b.claimed)
        rewound: set[TP] = set()
        for msg in msgs:
            tp = (msg.topic(), msg.partition())
            if tp not in rewound:
                rewound.add(tp)
                with contextlib.suppress(Exception):
                    self._consumer.seek(TopicPartition(tp[0], tp[1], msg.offset()))

    # ------------------------------------------------------------------ effects (the transactional variant overrides)

    def _effects(self) -> contextlib.AbstractContextManager[Any]:
        """The unit of work around the batch's handlers (none: each handler's effect is its own)."""
        return contextlib.nullcontext()

    def _attempt(self, msg: Any, event_id: str) -> None:
        """One handler attempt."""
        self._handler(msg)

    def _record_done(self, ids: list[str]) -> None:
        """Mark handled ids done in the store; on failure keep them to retry, and treat them as done meanwhile."""
        try:
            self._store_retry(self._store.complete, ids)
        except StoreError as exc:
            log.error("recording %d handled ids done failed; retrying later: %s", len(ids), exc)
            self._uncompleted.update(ids)

    # ------------------------------------------------------------------ store, dead letters, offsets

    def _claim(self, ids: list[str]) -> ClaimResult:
        if self._pipelined is not None:
            return self._claim_pipelined(self._pipelined, ids)
        if not ids:
            return ClaimResult(frozenset())
        if self._batch_store is not None:
            result: ClaimResult = self._store_retry(self._batch_store.claim_batch, ids, self._lease_s)
            return result
        # A plain DedupStore cannot tell done from busy: treat the unclaimed as busy (never lose one).
        claimed = self._store_retry(self._store.claim, ids, self._lease_s)
        return ClaimResult(frozenset(claimed))

    def _claim_pipelined(self, store: PipelinedDedupStore, ids: list[str]) -> ClaimResult:
        """One store call per batch: write the previous batch's done records and claim this batch.

        Offsets whose done records an earlier call wrote are committed meanwhile, on a helper
        thread (the Kafka and store round trips overlap; no other Kafka call runs meanwhile).
        Offsets are still committed only after their batch's done records are written.
        """
        ready, self._ready_offsets = self._ready_offsets, {}
        commit = None
        if not self._overlap_commit:
            if ready or self._uncommitted:
                self._commit(ready)
        elif ready or self._uncommitted:
            if self._committer is None:
                self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kcons-commit")
            commit = self._committer.submit(self._commit, ready)
        try:
            done = self._deferred_done
            result: ClaimResult = (
                self._store_retry(store.complete_and_claim, done, ids, self._lease_s)
                if done or ids
                else ClaimResult(frozenset())
            )
        finally:
            if commit is not None:
                commit.result()
        self._deferred_done = []
        self._merge(self._ready_offsets, self._deferred_offsets)
        self._deferred_offsets = {}
        return result

    @staticmethod
    def _merge(into: dict[TP, int], offsets: Mapping[TP, int]) -> None:
        for tp, offset in offsets.items():
            if into.get(tp, -1) < offset:
                into[tp] = offset

    def _release(self, ids: set[str]) -> None:
        try:
            self._store_retry(self._store.release, list(ids))
        except StoreError as exc:
            log.warning("releasing %d claims failed; retrying later: %s", len(ids), exc)
            self._unreleased.update(ids)

    def _retry_leftovers(self) -> None:
        if self._uncompleted:
            ids = list(self._uncompleted)
            try:
                self._store.complete(ids)
                self._uncompleted.difference_update(ids)
            except StoreError as exc:
                log.warning("recording %d ids done still fails: %s", len(ids), exc)
        if self._unreleased:
            ids = list(self._unreleased)
            try:
                self._store.release(ids)
                self._unreleased.difference_update(ids)
            except StoreError as exc:
                log.warning("releasing %d claims still fails: %s", len(ids), exc)

    def _dead_letter(self, b: _Batch) -> None:
        """Write poison messages to their dead-letter topics and wait for the acknowledgements.

        A message whose write is not acknowledged holds its partition at its offset, so it is
        consumed and tried again later instead of being lost.
        """
        producer = self._dlq_producer()
        failed: dict[int, str] = {}
        acked: set[int] = set()
        for i, (msg, _event_id, reason) in enumerate(b.poison):
            headers = list(msg.headers() or [])
            headers.append((DLQ_REASON_HEADER, reason.encode("utf-8", "replace")))
            headers.append((DLQ_SOURCE_HEADER, f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()))

            def on_delivery(err: Any, _m: Any, i: int = i) -> None:
                if err is None:
                    acked.add(i)
                else:
                    failed[i] = f"{err.str()} ({err.name()})"

            try:
                self._produce(producer, self._dlq_topic(msg.topic()), msg, headers, on_delivery)
            except (KafkaException, BufferError) as exc:
                failed[i] = str(exc)
        remaining = producer.flush(self._dlq_timeout_s)
        if remaining:
            log.error("%d dead-letter writes were not acknowledged within %.1fs", remaining, self._dlq_timeout_s)
        for i, (msg, _event_id, _reason) in enumerate(b.poison):
            if i in acked:
                continue
            log.error(
                "dead-letter write of %s/%d/%d failed (%s); the partition is rewound to it",
                msg.topic(), msg.partition(), msg.offset(), failed.get(i, "not acknowledged"),
            )  # fmt: skip
            b.hold((msg.topic(), msg.partition()), msg.offset(), self._pause_s, "dead_letter_failed")
            b.stats.deferred += 1
        b.stats.dead_lettered = len(acked)
        if acked:
            CONSUMER_DEAD_LETTERED.inc(len(acked))

    def _produce(self, producer: Any, topic: str, msg: Any, headers: list[Any], cb: Callable[..., None]) -> None:
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(BufferError),
            stop=tenacity.stop_after_attempt(5),
            wait=tenacity.wait_fixed(0.1),
            before_sleep=lambda _state: producer.poll(0.5),
            reraise=True,
        ):
            with attempt:
                producer.produce(topic, value=msg.value(), key=msg.key(), headers=headers, on_delivery=cb)

    def _dlq_producer(self) -> Any:
        if self._producer is None:
            self._producer = self._producer_factory(self._dlq_config)
        return self._producer

    def _dead_letter_config(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        config = {k: v for k, v in self._config.items() if k.startswith(_SHARED_PREFIXES)}
        config.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5})
        config.update(overrides or {})
        return config

    def _rewind(self, tp: TP, offset: int, pause_s: float) -> None:
        part = TopicPartition(tp[0], tp[1], offset)
        try:
            self._consumer.seek(part)
            if pause_s > 0:
                self._consumer.pause([TopicPartition(tp[0], tp[1])])
                self._paused[tp] = time.monotonic() + pause_s
        except KafkaException as exc:
            # The partition was revoked meanwhile: its new owner starts from the committed offset.
            log.warning("rewinding %s[%d] to %d failed: %s", tp[0], tp[1], offset, exc)
        CONSUMER_PAUSED_PARTITIONS.set(len(self._paused))

    def _resume_due(self) -> None:
        if not self._paused:
            return
        now = time.monotonic()
        due = [tp for tp, at in self._paused.items() if at <= now]
        if not due:
            return
        for tp in due:
            del self._paused[tp]
        try:
            self._consumer.resume([TopicPartition(t, p) for t, p in due])
        except KafkaException as exc:
            log.warning("resuming %d partitions failed: %s", len(due), exc)
        CONSUMER_PAUSED_PARTITIONS.set(len(self._paused))

    def _commit(self, offsets: Mapping[TP, int], *, sync: bool = False) -> None:
        """Commit offsets (merged with earlier failed ones); failures are kept and retried.

        Between batches the commit is asynchronous (unless ``async_commit=False``): it is sent
        only after the offsets' effects are done, and its outcome arrives through
        :meth:`_on_commit`; a failed one is merged into the next commit. A lost commit only
        means redelivery, which the dedup store turns into dropped duplicates. On idle,
        revocation and close (``sync``) the commit waits for the broker.
        """
        pending = dict(self._uncommitted)
        for tp, offset in offsets.items():
            if pending.get(tp, -1) < offset:
                pending[tp] = offset
        if not pending:
            return
        parts = [TopicPartition(t, p, o) for (t, p), o in pending.items()]
        try:
            if self._async_commit and not sync:
                self._consumer.commit(offsets=parts, asynchronous=True)
                self._merge(self._sent, pending)
                self._merge(self._unsettled, pending)
                self._uncommitted = {}
                return
            result = self._consumer.commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if err is not None and hasattr(err, "fatal") and classify_kafka_error(err) is ErrorClass.FATAL:
                raise kafka_error_to_exception(err, "commit") from exc
            CONSUMER_COMMIT_FAILURES.inc()
            log.warning("offset commit failed, will retry: %s", exc)
            self._uncommitted = self._still_assigned(pending)
            return
        failed = {(r.topic, r.partition): pending[(r.topic, r.partition)] for r in result or [] if r.error}
        if failed:
            CONSUMER_COMMIT_FAILURES.inc()
            log.warning("offset commit failed for %d partitions, will retry", len(failed))
        self._uncommitted = self._still_assigned(failed) if failed else {}

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        """librdkafka's commit result (served in consume): keep failed offsets for the next commit.

        A failure is dropped when a higher offset of the partition was sent since: that commit
        supersedes it (and is retried itself if it fails).
        """
        if err is not None and err.code() == KafkaError._NO_OFFSET:
            err = None
        failed: dict[TP, int] = {}
        for tp in partitions or []:
            key = (tp.topic, tp.partition)
            if tp.offset >= 0 and (err is not None or tp.error is not None) and tp.offset >= self._sent.get(key, -1):
                failed[key] = tp.offset
        if failed:
            CONSUMER_COMMIT_FAILURES.inc()
            log.warning("offset commit failed for %d partitions, will retry: %s", len(failed), err)
            self._merge(self._uncommitted, self._still_assigned(failed))
        if self._user_on_commit is not None:
            self._user_on_commit(err, partitions)

    def _still_assigned(self, offsets: dict[TP, int]) -> dict[TP, int]:
        try:
            assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        except (KafkaException, RuntimeError):
            return offsets
        return {tp: o for tp, o in offsets.items() if tp in assigned}

    def _decided(self) -> int:
        s = self.stats
        return s.handled + s.duplicates + s.dead_lettered

    # ------------------------------------------------------------------ rebalance callbacks

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        log.info("assigned %s", _describe(partitions))
        for tp in partitions:
            self._paused.pop((tp.topic, tp.partition), None)  # a new assignment starts unpaused
        CONSUMER_PAUSED_PARTITIONS.set(len(self._paused))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Commit what is done for the revoked partitions and forget their pauses."""
        log.info("revoked %s", _describe(partitions))
        self._rebalances += 1
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        try:
            self._flush()
        except KconsError as exc:
            log.warning("commit on revoke failed; the new owner will see those messages as duplicates: %s", exc)
        self._forget(revoked)

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        """Partitions were lost (session expired): nothing can be committed for them any more."""
        log.warning("lost %s", _describe(partitions))
        self._rebalances += 1
        lost = {(tp.topic, tp.partition) for tp in partitions}
        if self._deferred_done:  # the effects happened: record them, but commit nothing for lost partitions
            done, self._deferred_done = self._deferred_done, []
            self._record_done(done)
        self._deferred_offsets = {tp: o for tp, o in self._deferred_offsets.items() if tp not in lost}
        self._ready_offsets = {tp: o for tp, o in self._ready_offsets.items() if tp not in lost}
        self._forget(lost)

    def _still_ours(self, msgs: list[Any]) -> list[Any]:
        """The messages of partitions still assigned (the others' new owner reads them from the committed offset)."""
        try:
            assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        except (KafkaException, RuntimeError):
            return msgs  # unknown assignment: keep them all (a revoked one is a duplicate at worst)
        return [m for m in msgs if m.error() is not None or (m.topic(), m.partition()) in assigned]

    def _forget(self, partitions: set[TP]) -> None:
        for tp in partitions:
            self._uncommitted.pop(tp, None)
            self._sent.pop(tp, None)
            self._unsettled.pop(tp, None)
            self._paused.pop(tp, None)
        CONSUMER_PAUSED_PARTITIONS.set(len(self._paused))
        # Claims are never held between batches (released or completed in _finish); the ones whose
        # release failed are given back now so the partitions' new owner need not wait for the lease.
        self._retry_leftovers()


class TransactionalIdempotentConsumer(IdempotentConsumer):
    """Exactly-once effects in an SQL database: ``handler(msg, conn)`` and the dedup record commit together.

    Each batch runs in one transaction on ``conn`` (opened by the store's ``transaction``);
    each message in a savepoint that first records its id done with ``store.complete_in``
    (which succeeds only while this worker still owns the claim) and then runs the handler.
    A failed attempt rolls back to the savepoint; a crash rolls back the whole batch, whose
    claims then expire after their lease. A worker whose lease was taken over gets
    ClaimLostError and rolls back instead of committing the effect a second time; a worker
    taking over waits on the row lock of a transaction still open and then sees the id done.

    ``connection`` is the caller's DB connection (psycopg in autocommit mode, or sqlite3 on
    the store's file); or pass ``connect``, a factory called again when the connection breaks.
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
        if not isinstance(store, TransactionalDedupStore):
            raise ConfigError("store", "the transactional consumer needs a store with complete_in (an SQL store)")
        if (connection is None) == (connect is None):
            raise ConfigError("connection", "pass exactly one of connection= or connect=")
        self._tx_store = store
        self._connect = connect
        self._conn = connection if connection is not None else connect()  # type: ignore[misc]
        _check_autocommit(self._conn)
        self._tx_handler = handler
        super().__init__(config, topics, self._handler_unused, store=store, **kwargs)

    _atomic_batch = True

    @property
    def connection(self) -> Any:
        """The DB connection the handlers run on."""
        return self._conn

    @staticmethod
    def _handler_unused(_msg: Any) -> None:
        raise AssertionError("not called: the transactional consumer calls handler(msg, conn)")

    @contextlib.contextmanager
    def _effects(self) -> Iterator[Any]:
        if self._connect is not None and _is_broken(self._conn):
            log.warning("the handler connection is broken; reconnecting")
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = self._connect()
            _check_autocommit(self._conn)
        with self._tx_store.transaction(self._conn):
            yield self._conn

    def _attempt(self, msg: Any, event_id: str) -> None:
        conn = self._conn
        with self._tx_store.transaction(conn):
            self._tx_store.complete_in(conn, [event_id])
            self._tx_handler(msg, conn)

    def _record_done(self, ids: list[str]) -> None:
        """Nothing to do: the done records committed with the batch's transaction."""


class _Access:
    """Message accessors for C-level loops: the Message type's own methods (fast), or by name (any object)."""

    def __init__(self, get: Callable[[str], Callable[[Any], Any]]) -> None:
        self.error = get("error")
        self.headers = get("headers")
        self.topic = get("topic")
        self.partition = get("partition")
        self.offset = get("offset")


_NATIVE = _Access(lambda name: getattr(Message, name))
_BY_NAME = _Access(operator.methodcaller)
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)


def _access(msgs: list[Any]) -> _Access:
    """The fast accessors when every message is a confluent-kafka Message, else the generic ones."""
    return _NATIVE if list(map(type, msgs)).count(Message) == len(msgs) else _BY_NAME


def _header_ids(msgs: list[Any]) -> list[str] | None:
    """Every message's id when each one's first header is a non-empty UTF-8 ``kcons-id``, else None.

    The common case of :func:`default_event_id` (kcons producers write that header first), read
    with C-level loops; None sends the batch through :func:`default_event_id` per message.
    """
    try:
        firsts = list(map(_FIRST, map(_access(msgs).headers, msgs)))  # TypeError/IndexError: no headers
        if list(map(_FIRST, firsts)).count(HEADER_ID) != len(firsts):
            return None
        ids: list[str] = list(map(bytes.decode, map(_SECOND, firsts)))  # TypeError: not bytes
    except (TypeError, IndexError, UnicodeDecodeError):
        return None
    return None if "" in ids else ids


def _end_offsets(msgs: list[Any]) -> dict[TP, int]:
    """Per partition, the offset after its last message in ``msgs`` (messages are in order per partition)."""
    get = _access(msgs)
    topics = set(map(get.topic, msgs))
    if len(topics) == 1:  # one topic: index the last message of each partition by partition alone
        (topic,) = topics
        last = dict(zip(map(get.partition, msgs), range(len(msgs)), strict=True))
        return {(topic, partition): msgs[i].offset() + 1 for partition, i in last.items()}
    ends = dict(
        zip(zip(map(get.topic, msgs), map(get.partition, msgs), strict=True), map(get.offset, msgs), strict=True)
    )
    return {tp: offset + 1 for tp, offset in ends.items()}


def _new_entries(msgs: list[Any], ids: list[str]) -> list[_Entry]:
    return list(zip(msgs, ids, repeat(None)))


def _fresh_messages(entries: list[_Entry], seen: set[str], claimed: set[str]) -> list[Any]:
    """The messages :meth:`IdempotentConsumer._walk` hands to a handler that never fails, in order.

    Skipped as there: poison messages, ids already seen (done, or earlier in the batch), and
    every message of a partition from its first id another worker holds (busy) on.
    """
    out: list[Any] = []
    busy: set[TP] = set()
    seen = set(seen)
    for msg, event_id, poison in entries:
        if poison is not None or event_id is None:
            continue
        tp = (msg.topic(), msg.partition())
        if busy and tp in busy:
            continue
        if event_id in seen:
            continue
        if event_id not in claimed:
            busy.add(tp)
            continue
        seen.add(event_id)
        out.append(msg)
    return out


def _already_done(_msg: Any) -> None:
    """The per-message step after a successful batch handler: its effect is done."""


def _raising(exc: Exception) -> Handler:
    """A handler that answers every message with ``exc`` (the batch handler's answer for all of them)."""

    def handle(_msg: Any) -> None:
        raise exc

    return handle


def _one_at_a_time(batch_handler: BatchHandler) -> Handler:
    def handle(msg: Any) -> None:
        batch_handler([msg])

    return handle


def _check_autocommit(conn: Any) -> None:
    # psycopg: kcons opens the transactions, so the connection must not open one implicitly.
    if hasattr(conn, "autocommit") and hasattr(conn, "info") and not conn.autocommit:
        raise ConfigError("connection", "a psycopg connection must be in autocommit mode (kcons opens transactions)")
    if getattr(conn, "in_transaction", False):
        raise ConfigError("connection", "the connection is inside an open transaction")


def _is_broken(conn: Any) -> bool:
    return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False))


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _DLQ_REASON_MAX else text[: _DLQ_REASON_MAX - 3] + "..."


def _describe(partitions: list[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
