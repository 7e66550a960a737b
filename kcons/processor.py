"""Exactly-once consume-transform-produce: :class:`TransactionalProcessor`.

Each worker owns one read_committed consumer and one :class:`~kcons.kafka.producer.TransactionalProducer`
(KIP-447: the input offsets are committed inside the output transaction with
``send_offsets_to_transaction`` and the consumer's group metadata, so the broker fences a
worker that lost its partitions). As in Kafka Streams' exactly-once mode, one transaction spans
several reads: it opens with the first record read after a commit, each read's outputs are
produced as soon as it is handled, and it commits (the positions after every record handled in
it, then the commit) ``commit_interval_s`` after it opened or once it holds
``commit_max_records`` records, whichever comes first, at once when a read returns nothing, and
before :meth:`TransactionalProcessor.run` returns. librdkafka keeps fetching in the background
during the commit, so the next read is served from what was prefetched. Rebalance callbacks run
only inside a read: a revocation while a transaction is open commits it there, before the
partitions move (as Kafka Streams does); a loss, or a commit that fails, aborts it there and
every partition that stays assigned is rewound to its committed offset (what the read returned
for it is dropped), so no transaction spans a rebalance. When a transaction
aborts (abortable error, failed delivery, handler error, timeout) or its outcome is unknown,
the consumer rewinds to the committed offsets, which the broker returns only once no transaction on them is pending
(``require_stable``), so nothing is skipped and nothing is written twice. A producer that fails
fatally without being fenced is re-created with the same ``transactional.id`` (whose
``init_transactions`` aborts what the broken one left open) a bounded number of times in a
row; a fenced one stops the worker, since another process owns its ``transactional.id``.

A processor in a consumer group without committed offsets starts at the *beginning* of its
input (``auto.offset.reset=earliest``, as Kafka Streams does), so records written before the
first worker started are processed too; set ``auto.offset.reset`` yourself to change that. It
reads through the one Kafka layer (:mod:`kcons.kafka`: the batch source, the consumed-message
rule, the config checks and the bounded close) and installs no signal handler: a program stops
it with ``with stop_on_signals(processor): processor.run()`` (:mod:`kcons.cli.signals`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from kcons import metrics
from kcons.envelope import Envelope
from kcons.errors import (
    AbortableTransactionError,
    ConfigError,
    DecodeError,
    FatalKafkaError,
    IndefiniteOutcomeError,
    KafkaOperationError,
    PoisonMessageError,
    ProducerFencedError,
    RetriableKafkaError,
    TimeoutExceededError,
    raise_for_kafka_error,
)
from kcons.kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, Message, TopicPartition
from kcons.kafka.client import check_consumer_config, close_bounded
from kcons.kafka.dlq import dead_letter_headers, default_dlq_topic
from kcons.kafka.loop import BatchSource
from kcons.kafka.producer import HeaderList, TransactionalProducer

log = logging.getLogger(__name__)

__all__ = [
    "DeadLettered",
    "Handler",
    "Output",
    "OutputLike",
    "ProcessorStats",
    "TransactionalProcessor",
    "check_consumer_config",
]


@dataclass(frozen=True, slots=True)
class Output:
    """One record the handler wants written, atomically with the consumption of its input."""

    topic: str
    value: bytes | str | None
    key: bytes | str | None = None
    headers: HeaderList | None = None
    partition: int | None = None

    @classmethod
    def event(cls, topic: str, envelope: Envelope) -> Output:
        """An event with its envelope headers, keyed by aggregate id."""
        return cls(topic, envelope.payload, envelope.key, list(envelope.headers()))


#: What a handler may return for one input: Output objects or (topic, Envelope) pairs.
OutputLike = Output | tuple[str, Envelope]
#: ``handler(message)`` returns the outputs for one input record.
Handler = Callable[[Message], Iterable[OutputLike]]

_EARLIEST = {"earliest", "smallest", "beginning"}

_T = TypeVar("_T")


def _renamed(name: str, value: _T | None, old_name: str, old_value: _T | None, default: _T) -> _T:
    """A renamed argument's value: ``name=``, else the deprecated ``old_name=`` (with a warning), else the default."""
    if old_value is None:
        return default if value is None else value
    warnings.warn(f"{old_name}= is deprecated; use {name}=", DeprecationWarning, stacklevel=3)
    if value is not None:
        raise ConfigError(name, f"given twice: as {name}= and as the deprecated {old_name}=")
    return old_value


@dataclass
class ProcessorStats:
    """Counts kept by one processor (also exported as Prometheus metrics)."""

    records: int = 0
    outputs: int = 0
    transactions: int = 0
    rewinds: int = 0
    dead_lettered: int = 0


class DeadLettered(NamedTuple):
    """In precomputed outputs: the input is poison and goes to its dead-letter topic, for ``reason``."""

    reason: str


#: The poison rule of the processor: a handler raising one of these dead-letters its input.
POISON = (DecodeError, PoisonMessageError)


@dataclass(slots=True)
class _OpenTransaction:
    """What the open transaction holds: the next offset of each partition handled in it, and counts."""

    opened: float
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0
    outputs: int = 0
    dead: int = 0


class TransactionalProcessor:
    """Reads ``topics``, runs ``handler`` on each record and writes its outputs exactly once.

    The outputs of the records handled in a transaction and the consumer offsets after them commit
    in one Kafka transaction, so a read_committed reader sees each input's outputs once, whatever
    crashes. Give every worker process a stable ``transactional_id`` (e.g. ``"<app>-worker-<n>"``):
    a restarted worker then fences its previous incarnation at once and the broker aborts its open
    transaction, instead of leaving it to expire after ``transaction.timeout.ms``. Records are read
    ``batch_size`` at most at a time; a transaction spans reads and commits ``commit_interval_s``
    (default 0.1 s, like Kafka Streams' ``commit.interval.ms`` with exactly-once) after its first
    record, or once it holds ``commit_max_records`` records, or as soon as a read returns nothing,
    whichever comes first: a larger interval means fewer commits (more throughput) and outputs
    visible to read_committed readers later, and more work redone after an abort. No transaction is
    opened without input. ``batch_timeout_s`` is the wait for a batch of the async processor
    (:class:`kcons.aio.AsyncTransactionalProcessor`, one transaction per batch). A new consumer
    group starts at the earliest offset unless the consumer config sets ``auto.offset.reset``. The
    poison rule: a handler that raises DecodeError or PoisonMessageError for an input sends that
    input to ``dlq_topic(topic)`` (default ``<topic>.dlq``; original key, value and headers, plus
    ``kcons-dlq-reason`` and its position) *inside the open transaction*, so the dead letter commits
    with the other outputs and the offsets, and the processor goes on. Any other handler exception
    aborts the open transaction, rewinds, and is raised from :meth:`run` (nothing is skipped).
    :meth:`stop` (thread- and signal-safe; no signal handler is installed for you) commits the open
    transaction and closes cleanly. ``on_commit(stats)`` is called after each committed transaction.
    ``input_topics=`` and ``batch_max=`` are deprecated names of ``topics=`` and ``batch_size=``.
    """

    #: Producers re-created in a row (without a commit in between) before a fatal error is raised.
    MAX_FATAL_RECOVERIES = 3

    def __init__(
        self,
        consumer_config: Mapping[str, Any],
        producer_config: Mapping[str, Any],
        topics: Sequence[str] | None = None,
        handler: Handler | None = None,
        *,
        batch_size: int | None = None,
        batch_timeout_s: float = 0.1,
        commit_interval_s: float = 0.1,
        commit_max_records: int = 10_000,
        transactional_id: str | None = None,
        poll_timeout_s: float = 0.5,
        commit_timeout_s: float = 30.0,
        init_timeout_s: float = 30.0,
        rewind_timeout_s: float = 60.0,
        on_commit: Callable[[ProcessorStats], None] | None = None,
        dlq_topic: Callable[[str], str] = default_dlq_topic,
        input_topics: Sequence[str] | None = None,
        batch_max: int | None = None,
    ) -> None:
        topics = _renamed("topics", topics, "input_topics", input_topics, None)
        batch_size = _renamed("batch_size", batch_size, "batch_max", batch_max, 500)
        if handler is None:
            raise ConfigError("handler", "is required: it maps each input record to its outputs")
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
        if batch_timeout_s <= 0:
            raise ConfigError("batch_timeout_s", f"must be > 0, got {batch_timeout_s}")
        if poll_timeout_s <= 0:
            raise ConfigError("poll_timeout_s", f"must be > 0, got {poll_timeout_s}")
        if not 0 < commit_interval_s <= 60:
            raise ConfigError("commit_interval_s", f"must be in (0, 60], got {commit_interval_s!r}")
        if commit_max_records < 1:
            raise ConfigError("commit_max_records", f"must be >= 1, got {commit_max_records}")
        if isinstance(topics, str):
            raise ConfigError("topics", f"expected a list of topic names, got the string {topics[:60]!r}")
        if not topics:
            raise ConfigError("topics", "at least one topic is required")
        self._consumer_config = check_consumer_config(consumer_config)
        self._consumer_config.setdefault("auto.offset.reset", "earliest")
        tid = transactional_id or producer_config.get("transactional.id")
        if not tid:
            raise ConfigError(
                "transactional.id", "is required: give each worker a stable id so a restart fences its zombie"
            )
        self.topics = list(topics)
        self.handler = handler
        self.batch_size = batch_size
        self.batch_timeout_s = batch_timeout_s
        self.poll_timeout_s = poll_timeout_s
        self.commit_interval_s = commit_interval_s
        self.commit_max_records = commit_max_records
        self.commit_timeout_s = commit_timeout_s
        self.rewind_timeout_s = rewind_timeout_s
        self.stats = ProcessorStats()
        self.on_commit = on_commit
        self.dlq_topic = dlq_topic
        reset = str(self._consumer_config["auto.offset.reset"]).lower()
        self._reset_offset = OFFSET_BEGINNING if reset in _EARLIEST else OFFSET_END
        self._stop = threading.Event()
        self._buffer: list[Message] = []
        self._lag_at = 0.0
        self._group = str(self._consumer_config["group.id"])
        self._lag_series: set[tuple[str, int]] = set()  # partitions with a kcons_processor_lag series
        self._consumer_closed = False
        self._revoked_in_call: set[tuple[str, int]] = set()  # partitions revoked during the current read
        self._assigned_in_call: set[tuple[str, int]] = set()
        self._aborted_in_call = False  # a rebalance callback aborted the open transaction during the current read
        self._leaving: set[tuple[str, int]] = set()  # partitions being revoked while their callback commits
        self._open: _OpenTransaction | None = None  # the transaction spanning reads, if one is open
        # The producer first: init_transactions fences an older incarnation of this worker and
        # settles its open transaction before this consumer fetches any committed offset.
        self._producer_config = dict(producer_config)
        self._transactional_id = str(tid)
        self._init_timeout_s = init_timeout_s
        self._fatal_recoveries = 0
        self.producer = self._new_producer()
        try:
            self.consumer = Consumer(self._consumer_config)
        except KafkaException as exc:
            self.producer.close(0)
            raise ConfigError("consumer config", str(exc)) from None
        self._source = BatchSource(self.consumer, batch_size=batch_size, timeout_s=poll_timeout_s)

    def _new_producer(self) -> TransactionalProducer:
        return TransactionalProducer(
            self._producer_config,
            transactional_id=self._transactional_id,
            init_timeout_s=self._init_timeout_s,
            commit_timeout_s=self.commit_timeout_s,
        )

    # lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    def run(self, *, max_records: int | None = None) -> ProcessorStats:
        """Process until :meth:`stop` (or ``max_records`` committed inputs); then close.

        Raises ProducerFencedError/FatalKafkaError when this worker was fenced or its producer
        broke, and re-raises handler exceptions (after aborting and rewinding).
        """
        try:
            self.subscribe()
            while not self._stop.is_set():
                msgs = self._read()
                if msgs:
                    self._add(msgs)
                if self._open is not None and (not msgs or self._commit_due(max_records)):
                    self._commit_open()
                self._update_lag()
                if max_records is not None and self.stats.records >= max_records:
                    break
            self._commit_open()  # stopped: what was handled commits before the clients close
        finally:
            self.close()
        return self.stats

    def subscribe(self) -> None:
        """Subscribe to the input topics with the processor's rebalance handling (:meth:`run` does it)."""
        self._source.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

    def close(self) -> None:
        """Leave the group and close both clients (bounded); safe to call twice."""
        if self.producer.closed and self._consumer_closed:
            return
        with contextlib.suppress(Exception):
            if not self.producer.closed and self.producer.in_transaction:
                self.producer.abort_transaction(reason="closed")
        if not self._consumer_closed:
            self._consumer_closed = True
            close_bounded(self.consumer.close, self.commit_timeout_s, "processor consumer")
            self._drop_lag_series(self._lag_series)
            self._lag_series = set()
        self.producer.close(self.commit_timeout_s)

    # rebalancing -------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", _describe(partitions))
        self._assigned_in_call.update((tp.topic, tp.partition) for tp in partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_up(partitions, "revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_up(partitions, "lost")

    def _give_up(self, partitions: list[TopicPartition], why: str) -> None:
        """Partitions are leaving: no transaction may span the move, and their unprocessed records are dropped."""
        log.info("%s %s", why, _describe(partitions))
        committing = why == "revoked" and self._open is not None and not self.producer.closed
        gone = {(tp.topic, tp.partition) for tp in partitions}
        # As Kafka Streams does: what was handled commits before the partitions move (during the
        # revocation this member's generation is still current). If the commit fails, it aborts
        # and rewinds the partitions that stay, and what this read returned before the callback
        # for them is dropped too: they were rewound under it, so it comes again. The leaving
        # ones are not sought: librdkafka would carry that seek over to a later assignment of
        # the partition to this member, which would then read it twice.
        if committing and self.producer.in_transaction:
            self._leaving = gone
            try:
                if not self._commit_open():
                    self._aborted_in_call = True
            finally:
                self._leaving = set()
        self._open = None
        if not self.producer.closed and self.producer.in_transaction:
            # Lost partitions (this member is out of the group; its commit would be refused):
            # the open transaction holds outputs of their records and must end before they move.
            # The read that runs this callback then rewinds what is still ours.
            self.producer.abort_transaction(reason=why)
            self._aborted_in_call = True
        self._revoked_in_call.update(gone)
        self._assigned_in_call -= gone  # assigned and then revoked within one read: not ours
        self._buffer[:] = [m for m in self._buffer if (m.topic(), m.partition()) not in gone]

    # the loop ---------------------------------------------------------------------------

    def _read(self) -> list[Message]:
        """One read of up to ``batch_size`` records, waiting no longer than the open transaction may stay open."""
        if self._open is None:
            timeout = self.poll_timeout_s
        else:
            timeout = max(0.0, self._open.opened + self.commit_interval_s - time.monotonic())
        self._buffer = []
        self._revoked_in_call = set()
        self._assigned_in_call = set()
        self._aborted_in_call = False
        msgs = self._source.poll(timeout, self.batch_size)
        if self._revoked_in_call or self._aborted_in_call:
            msgs = self._after_rebalance_in_call(msgs)
        return msgs

    def _commit_due(self, max_records: int | None) -> bool:
        """Whether the open transaction has run its interval, holds its maximum, or reaches ``max_records``."""
        txn = self._open
        if txn is None:
            return False
        if txn.records >= self.commit_max_records:
            return True
        if max_records is not None and self.stats.records + txn.records >= max_records:
            return True
        return time.monotonic() - txn.opened >= self.commit_interval_s

    def _collect_batch(self) -> list[Message]:
        """Read up to ``batch_size`` records, closing the batch ``batch_timeout_s`` after its first one."""
        buf = self._buffer = []
        deadline: float | None = None
        while len(buf) < self.batch_size and not self._stop.is_set():
            if deadline is None:
                timeout = self.poll_timeout_s
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
            self._revoked_in_call = set()
            self._assigned_in_call = set()
            msgs = self._source.poll(timeout, self.batch_size - len(buf))
            if self._revoked_in_call:
                msgs = self._after_rebalance_in_call(msgs)
            buf.extend(msgs)
            if buf and deadline is None:
                deadline = time.monotonic() + self.batch_timeout_s
            if not msgs and not buf:
                break  # idle: give run() a chance to update lag and check stop
        self._buffer = []
        return buf

    def _after_rebalance_in_call(self, msgs: list[Message]) -> list[Message]:
        """Drop what one read returned for partitions revoked during that read.

        Records fetched before the revocation can come back in the same call as the rebalance
        callback; they are not ours to process. A partition revoked and assigned again within
        the call is rewound to its committed offset, since its old and new records are mixed.
        """
        if self._aborted_in_call:
            # The open transaction was aborted: every partition that was ours before this read
            # and still is goes back to its committed offset and this read's records of it are
            # dropped (they come again). Partitions newly assigned in this read started at
            # their committed offsets already.
            fresh = self._assigned_in_call - self._revoked_in_call
            self._buffer[:] = []
            stale = {(tp.topic, tp.partition) for tp in self.consumer.assignment()} - fresh
            if stale:
                self._rewind("rebalanced", only=stale)
            return [m for m in msgs if (m.topic(), m.partition()) in fresh]
        gone = self._revoked_in_call
        back = gone & self._assigned_in_call
        kept = [m for m in msgs if (m.topic(), m.partition()) not in gone]
        if back:
            self._buffer[:] = [m for m in self._buffer if (m.topic(), m.partition()) not in back]
            self._rewind("reassigned", only=back)
        return kept

    def _process(
        self, batch: list[Message], outputs: Sequence[Iterable[OutputLike] | DeadLettered] | None = None
    ) -> None:
        """Handle one batch (or take precomputed ``outputs``) in a transaction of its own and commit it."""
        self._add(batch, outputs)
        self._commit_open()

    def _add(self, batch: list[Message], outputs: Sequence[Iterable[OutputLike] | DeadLettered] | None = None) -> None:
        """Run the handler on ``batch`` (or take ``outputs``) and produce its outputs in the open transaction.

        Opens the transaction if none is; the input positions are kept for its commit.
        """
        with self._settling():
            producer = self.producer
            txn = self._open
            if txn is None:
                producer.begin_transaction()
                txn = self._open = _OpenTransaction(time.monotonic())
            offsets = txn.offsets
            produced = 0
            dead = 0
            for index, msg in enumerate(batch):
                outs = self._outputs_of(msg) if outputs is None else outputs[index]
                if isinstance(outs, DeadLettered):
                    producer.enqueue(
                        self.dlq_topic(str(msg.topic())),
                        msg.value(),
                        msg.key(),
                        headers=dead_letter_headers(msg, outs.reason),
                    )
                    dead += 1
                    offsets[_position_key(msg)] = _offset_of(msg) + 1
                    continue
                for out in outs:
                    if isinstance(out, Output):
                        producer.enqueue(out.topic, out.value, out.key, headers=out.headers, partition=out.partition)
                    else:
                        topic, envelope = out
                        producer.enqueue(topic, envelope.payload, envelope.key, headers=list(envelope.headers()))
                    produced += 1
                offsets[_position_key(msg)] = _offset_of(msg) + 1
            txn.records += len(batch)
            txn.outputs += produced
            txn.dead += dead

    def _commit_open(self) -> bool:
        """Commit the open transaction (if any) with the positions after every record handled in it.

        False when it was aborted instead (and the partitions rewound to their committed offsets).
        """
        txn = self._open
        if txn is None:
            return True
        committed = False
        with self._settling():
            producer = self.producer
            # Offsets last: the output partitions are registered with the coordinator while the
            # records are produced, which measured ~1.5x faster than registering offsets first.
            producer.send_offsets(
                [TopicPartition(t, p, o) for (t, p), o in txn.offsets.items()],
                self.consumer.consumer_group_metadata(),
                self.commit_timeout_s,
            )
            producer.commit_transaction()
            self._open = None
            committed = True
        if not committed:
            return False  # _settling aborted the transaction and rewound
        self._fatal_recoveries = 0
        self.stats.records += txn.records
        self.stats.outputs += txn.outputs
        self.stats.transactions += 1
        if txn.dead:
            self.stats.dead_lettered += txn.dead
            metrics.PROCESSOR_DEAD_LETTERED.inc(txn.dead)
            log.error("dead-lettered %d input records the handler could not process", txn.dead)
        metrics.PROCESSOR_RECORDS.inc(txn.records)
        metrics.PROCESSOR_BATCH_SIZE.observe(txn.records)
        if self.on_commit is not None:
            self.on_commit(self.stats)
        return True

    @contextlib.contextmanager
    def _settling(self) -> Iterator[None]:
        """On a failure inside the open transaction: abort it, rewind, and raise only what must stop the worker.

        An unknown outcome, an abortable error, a timeout or a retriable error rewind to the
        committed offsets and return; a broken (not fenced) producer is re-created; a fenced one
        and handler errors (after the rewind) are raised.
        """
        producer = self.producer
        try:
            yield
        except BaseException as exc:
            self._open = None
            failure: BaseException = exc
            if not producer.closed and producer.in_transaction:
                try:
                    producer.abort_after_error("exception" if isinstance(exc, Exception) else "interrupted")
                except Exception as abort_exc:  # the abort's own failure decides what happens next
                    failure = abort_exc
            if isinstance(failure, IndefiniteOutcomeError):
                # The producer was re-created; the committed offsets now say whether the transaction committed.
                log.warning("transaction outcome unknown (%s); rewinding to the committed offsets", failure)
                self._rewind("indefinite")
            elif isinstance(failure, ProducerFencedError):
                # Another worker runs with this transactional.id: this one must stop.
                if failure is exc:
                    raise
                raise failure from exc
            elif isinstance(failure, FatalKafkaError):
                self._recover_from_fatal(failure)
            elif isinstance(failure, (AbortableTransactionError, TimeoutExceededError, RetriableKafkaError)):
                log.warning("transaction aborted (%s); rewinding to the committed offsets", failure)
                self._rewind("aborted")
            else:
                if isinstance(failure, Exception) and not producer.closed:
                    self._rewind("handler_error")
                if failure is exc:
                    raise
                raise failure from exc

    def _outputs_of(self, msg: Message) -> list[OutputLike] | DeadLettered:
        """The handler's outputs for ``msg`` (all of them, before any is written), or DeadLettered if it is poison."""
        try:
            return list(self.handler(msg))
        except POISON as exc:
            return poison_of(exc)

    def _recover_from_fatal(self, exc: FatalKafkaError) -> None:
        """Replace a broken (not fenced) producer and rewind: its open transaction is aborted by the new one's init.

        Gives up (raises) after ``MAX_FATAL_RECOVERIES`` in a row without a committed batch.
        """
        self._fatal_recoveries += 1
        if self._fatal_recoveries > self.MAX_FATAL_RECOVERIES:
            raise exc
        log.warning("producer failed fatally (%s); re-creating it and rewinding", exc)
        if not self.producer.closed:
            self.producer.close(0)
        self.producer = self._new_producer()
        self._rewind("fatal")

    def _rewind(self, reason: str, only: set[tuple[str, int]] | None = None) -> None:
        """Seek every assigned partition (or those in ``only``) back to its committed offset (else the reset policy)."""
        self.stats.rewinds += 1
        metrics.PROCESSOR_REWINDS.labels(reason).inc()

        def fetch() -> list[TopicPartition]:
            assignment = [tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) not in self._leaving]
            if only is not None:
                assignment = [tp for tp in assignment if (tp.topic, tp.partition) in only]
            if not assignment:
                return []
            try:
                return list(self.consumer.committed(assignment, timeout=min(10.0, self.rewind_timeout_s)))
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if err is not None and hasattr(err, "name") and str(err.name()) in {"_TIMED_OUT", "REQUEST_TIMED_OUT"}:
                    raise RetriableKafkaError(f"fetching committed offsets timed out: {err.str()}") from exc
                raise_for_kafka_error(exc, "committed")
                raise

        retrying = Retrying(
            stop=stop_after_attempt(20) | stop_after_delay(self.rewind_timeout_s),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(RetriableKafkaError),
            reraise=True,
        )
        committed = retrying(fetch)
        for tp in committed:
            if tp.error is not None:
                raise KafkaOperationError(f"cannot read the committed offset of {tp.topic}[{tp.partition}]: {tp.error}")
            offset = tp.offset if tp.offset >= 0 else self._reset_offset
            try:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
            except KafkaException as exc:
                raise_for_kafka_error(exc, f"seek {tp.topic}[{tp.partition}]")
        log.info("rewound %d partition(s) to their committed offsets (%s)", len(committed), reason)

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_at < 1.0:
            return
        self._lag_at = now
        try:
            positions = self.consumer.position(self.consumer.assignment())
            owned: set[tuple[str, int]] = set()
            for tp in positions:
                _low, high = self.consumer.get_watermark_offsets(tp, timeout=1.0, cached=True)
                if high >= 0 and tp.offset >= 0:
                    owned.add((tp.topic, tp.partition))
                    metrics.PROCESSOR_LAG.labels(self._group, tp.topic, str(tp.partition)).set(max(0, high - tp.offset))
        except (KafkaException, RuntimeError) as exc:
            log.debug("lag not updated: %s", exc)
            return
        self._drop_lag_series(self._lag_series - owned)
        self._lag_series = owned

    def _drop_lag_series(self, partitions: set[tuple[str, int]]) -> None:
        """Remove the lag series of partitions this processor no longer owns (another worker reports them)."""
        for topic, partition in partitions:
            with contextlib.suppress(KeyError):
                metrics.PROCESSOR_LAG.remove(self._group, topic, str(partition))


def poison_of(exc: BaseException) -> DeadLettered:
    """The dead-letter reason of a handler's DecodeError or PoisonMessageError."""
    return DeadLettered(f"{type(exc).__name__}: {exc}")


def _position_key(msg: Message) -> tuple[str, int]:
    topic, partition = msg.topic(), msg.partition()
    if topic is None or partition is None:
        raise KafkaOperationError("a consumed record has no topic or partition")
    return topic, partition


def _offset_of(msg: Message) -> int:
    offset = msg.offset()
    if offset is None or offset < 0:
        raise KafkaOperationError(f"a consumed record of {msg.topic()} has no offset")
    return offset


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
