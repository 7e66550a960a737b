"""The offset ledger: one object owns a consumer's commit decision (what is decided, what is committed).

Offsets enter the ledger *decided* (the offset after a partition's last message whose effect is
done or whose dead-letter write was acknowledged). A decided offset whose batch still has done
records not written to the dedup store *awaits* them (:meth:`OffsetLedger.decide` with
``awaiting_done``) and is committed only after :meth:`OffsetLedger.done_recorded`: the group's
offset never moves past a message whose done record is not written (a committed offset implies
the dedup store knows every message before it), and a crash before that replays the message.

With ``min_interval_s`` an ordinary commit sends at most one request per interval: offsets
decided meanwhile stay ready and go out with the next commit past the interval or with
:meth:`OffsetLedger.flush`. A commit is only ever later, never earlier, than without it (a crash
replays at most that interval's messages), and the broker writes far fewer offset records.

Commits are asynchronous between batches (unless ``asynchronous=False``): the outcome arrives
through :meth:`OffsetLedger.on_commit` (give it to the consumer as its ``on_commit``); a failed
commit is merged into the next one, unless a higher offset of that partition was sent since
(the newer commit supersedes it). :meth:`OffsetLedger.flush` (revocation, close, a consumer idle
for a while) commits synchronously, repeating asynchronous commits still unanswered, so the
group's offsets are settled; ``flush(wait=False)`` (a consumer that just went idle) sends what is
ready at once without waiting for the broker, so a batch arriving meanwhile is not held up.
:meth:`OffsetLedger.forget` drops everything about partitions revoked or lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kcons.errors import ErrorClass, classify_kafka_error, kafka_error_to_exception
from kcons.metrics import CONSUMER_COMMIT_FAILURES

__all__ = ["OffsetLedger"]

log = logging.getLogger(__name__)

TP = tuple[str, int]
OnCommit = Callable[[Any, list[Any]], None]


def _merge(into: dict[TP, int], offsets: Mapping[TP, int]) -> None:
    """Keep the higher offset per partition."""
    for tp, offset in offsets.items():
        if into.get(tp, -1) < offset:
            into[tp] = offset


class OffsetLedger:
    """Decided and committed offsets of one consumer; the only code that commits them.

    ``asynchronous``: commit between batches without waiting (the outcome comes through
    :meth:`on_commit`). ``user_on_commit``: the application's own ``on_commit`` callback,
    still called with every commit result. ``group``: the consumer group, the metrics' label.
    ``min_interval_s``: the least time between two commit requests (0: every :meth:`commit`
    sends; :meth:`flush` always does). Call :meth:`attach` with the consumer before committing.
    """

    def __init__(
        self,
        *,
        asynchronous: bool = True,
        user_on_commit: OnCommit | None = None,
        group: str = "",
        min_interval_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= min_interval_s <= 60.0:
            raise ValueError(f"min_interval_s must be in [0, 60], got {min_interval_s!r}")
        self._commit_failures = CONSUMER_COMMIT_FAILURES.labels(group=group)
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last_sent = -float("inf")  # clock time of the last commit request
        self._asynchronous = asynchronous
        self._user_on_commit = user_on_commit
        self._consumer: Any = None
        self._awaiting: dict[TP, int] = {}  # decided; their done records are not written yet
        self._ready: dict[TP, int] = {}  # decided and safe to commit
        self._failed: dict[TP, int] = {}  # commits that failed: merged into the next one
        self._sent: dict[TP, int] = {}  # highest offset sent asynchronously, per partition
        self._unsettled: dict[TP, int] = {}  # sent asynchronously since the last synchronous commit

    def attach(self, consumer: Any) -> None:
        """The Kafka consumer whose offsets this ledger commits."""
        self._consumer = consumer

    @property
    def has_ready(self) -> bool:
        """True when something is decided and safe to commit, or a failed commit waits to be repeated."""
        return bool(self._ready or self._failed)

    @property
    def commit_due(self) -> bool:
        """True when :meth:`commit` would send a request now (something is ready and the interval has passed)."""
        if not (self._ready or self._failed):
            return False
        return not self._min_interval_s or self._clock() - self._last_sent >= self._min_interval_s

    @property
    def uncommitted(self) -> int:
        """Partitions with decided offsets not committed yet (awaiting, ready or failed)."""
        return len(self._awaiting.keys() | self._ready.keys() | self._failed.keys())

    def decide(self, offsets: Mapping[TP, int], *, awaiting_done: bool = False) -> None:
        """Record decided offsets; with ``awaiting_done`` they wait for :meth:`done_recorded` before any commit."""
        _merge(self._awaiting if awaiting_done else self._ready, offsets)

    def done_recorded(self) -> None:
        """Every done record handed over so far is written: the offsets awaiting them are safe to commit."""
        if self._awaiting:
            _merge(self._ready, self._awaiting)
            self._awaiting = {}

    def take_awaiting(self) -> dict[TP, int]:
        """Hand over the offsets awaiting done records (the caller decides them again once those are written)."""
        awaiting, self._awaiting = self._awaiting, {}
        return awaiting

    def commit(self, *, sync: bool = False, now: bool = False) -> None:
        """Commit the ready offsets (and failed ones again); ``sync`` waits for the broker and settles earlier
        asynchronous commits too. A failure is kept and retried with the next commit; a fatal one raises.
        Within ``min_interval_s`` of the last request an unsynchronised commit sends nothing (the
        offsets stay ready for the next one), unless ``now`` is set."""
        sent_at = self._clock() if self._min_interval_s else 0.0
        if not (sync or now) and sent_at - self._last_sent < self._min_interval_s:
            return
        offsets, self._ready = self._ready, {}
        if sync:
            _merge(offsets, self._unsettled)
            self._unsettled = {}
        pending = dict(self._failed)
        _merge(pending, offsets)
        if not pending:
            return
        self._last_sent = sent_at
        parts = [TopicPartition(t, p, o) for (t, p), o in pending.items()]
        try:
            if self._asynchronous and not sync:
                self._consumer.commit(offsets=parts, asynchronous=True)
                _merge(self._sent, pending)
                _merge(self._unsettled, pending)
                self._failed = {}
                return
            result = self._consumer.commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and classify_kafka_error(err) is ErrorClass.FATAL:
                raise kafka_error_to_exception(err, "commit") from exc
            self._commit_failures.inc()
            log.warning("offset commit failed, will retry: %s", exc)
            self._failed = self.still_assigned(pending)
            return
        failed = {(r.topic, r.partition): pending[(r.topic, r.partition)] for r in result or [] if r.error}
        if failed:
            self._commit_failures.inc()
            log.warning("offset commit failed for %d partitions, will retry", len(failed))
        self._failed = self.still_assigned(failed) if failed else {}

    def flush(self, *, wait: bool = True) -> None:
        """Commit what is ready now, whatever the interval.

        ``wait`` (revocation, close, a consumer idle for a while): synchronously, with the
        asynchronous commits not answered yet. ``wait=False`` (a consumer that just went idle):
        asynchronously when the ledger is, so the caller's next batch does not wait for the broker.
        """
        if wait or not self._asynchronous:
            if self._ready or self._failed or self._unsettled:
                self.commit(sync=True)
        elif self._ready or self._failed:
            self.commit(now=True)

    def on_commit(self, err: Any, partitions: list[Any]) -> None:
        """librdkafka's commit result (served in poll/consume): keep failed offsets for the next commit.

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
            self._commit_failures.inc()
            log.warning("offset commit failed for %d partitions, will retry: %s", len(failed), err)
            _merge(self._failed, self.still_assigned(failed))
        if self._user_on_commit is not None:
            self._user_on_commit(err, partitions)

    def forget(self, partitions: Collection[TP]) -> None:
        """Drop everything about partitions no longer ours (after a revocation's flush, or a loss)."""
        for store in (self._awaiting, self._ready, self._failed, self._sent, self._unsettled):
            for tp in partitions:
                store.pop(tp, None)

    def still_assigned(self, offsets: dict[TP, int]) -> dict[TP, int]:
        """The offsets of partitions the consumer still has (all of them when the assignment is unknown)."""
        try:
            assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        except (KafkaException, RuntimeError):
            return offsets
        return {tp: o for tp, o in offsets.items() if tp in assigned}
