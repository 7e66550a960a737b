"""Publish one batch of outbox records to Kafka and return only when Kafka acknowledged all of it.

Two modes:

* ``transactional`` (default): every batch is one Kafka transaction. The batches alternate between
  two producers whose ``transactional.id`` s (``<id>`` and ``<id>.1``) are shared by all relay
  replicas of one outbox: right after a commit the broker still writes its markers and refuses a
  new transaction on the same id for a few milliseconds (librdkafka then waits 20 ms), while
  the other id is free. A new leader runs ``init_transactions`` on both ids before its first
  batch, which aborts whatever the previous leader left open and fences its producers, so a
  paused former leader's commit fails: its batch never becomes visible to ``read_committed``
  consumers.
* ``idempotent``: ``enable.idempotence`` with ``acks=all``, flush, check every delivery report.
  Faster per batch, but a paused former leader that resumes between its last leadership check
  and its produce call can still append duplicates (never losses; consumers dedupe by ``kcons-id``).

Either way a failed batch is re-published whole on retry, so Kafka may hold duplicates, never gaps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import repeat
from typing import Any

from kcons.config import redact_config
from kcons.errors import LeadershipLostError, ProducerFencedError
from kcons.kafka.producer import IdempotentProducer, Record, TransactionalProducer
from kcons.outbox.rows import OutboxRecord, RecordTuple

__all__ = ["MODES", "KafkaBatchPublisher", "LeadershipLostError"]

log = logging.getLogger(__name__)

MODES = ("transactional", "idempotent")


_FORCED = {"enable.idempotence": True, "acks": "all"}
#: How long dropping a producer may wait for its client to close (a dead broker must not block the relay).
_CLOSE_TIMEOUT_S = 2.0
#: Transactional producers a publisher alternates between: ``<transactional.id>``, ``<transactional.id>.1``.
TXN_PRODUCERS = 2


def _as_tuples(records: Iterable[OutboxRecord | RecordTuple]) -> Iterable[Record]:
    """The records as ``(topic, value, key, headers, timestamp_ms)`` tuples, converted as they are consumed.

    Lazily: the relay passes a generator that builds each record just before it is produced, so
    that a batch's records are never all alive at once (fewer objects for the garbage collector).
    """
    if isinstance(records, list) and not any(map(isinstance, records, repeat(OutboxRecord))):
        return records  # a list of tuples as it is
    return (
        (rec.topic, rec.value, rec.key, rec.headers, rec.timestamp_ms) if isinstance(rec, OutboxRecord) else rec
        for rec in records
    )


class KafkaBatchPublisher:
    """Publishes batches through one kcons producer; a batch is acknowledged whole or raises.

    Transactional mode publishes through a :class:`~kcons.kafka.producer.TransactionalProducer`
    (one transaction per batch), idempotent mode through an
    :class:`~kcons.kafka.producer.IdempotentProducer`. What an error means (abort, re-create,
    close) is decided by the producer; the publisher only maps a fenced producer to
    :class:`LeadershipLostError` and replaces a producer that closed itself.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        mode: str = "transactional",
        transactional_id: str | None = None,
        ack_timeout_s: float = 30.0,
        txn_gap_s: float = 0.002,
        producers: int = TXN_PRODUCERS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "transactional" and not transactional_id:
            raise ValueError("transactional mode needs a transactional_id")
        if producers < 1:
            raise ValueError(f"producers must be >= 1, got {producers}")
        cfg: dict[str, Any] = {"linger.ms": 2, "batch.num.messages": 10000, "compression.type": "lz4"}
        cfg.update(config)
        cfg.update(_FORCED)
        if mode == "transactional":
            cfg["transactional.id"] = transactional_id
            cfg.setdefault("transaction.timeout.ms", max(60000, int(ack_timeout_s * 2000)))
            # Short backoffs for the transactional requests librdkafka retries with retry.backoff.ms
            # (default 100 ms, up to 1 s). (A refused AddPartitionsToTxn, CONCURRENT_TRANSACTIONS,
            # is retried after a fixed 20 ms whatever these say: see publish.)
            cfg.setdefault("retry.backoff.ms", 5)
            cfg.setdefault("retry.backoff.max.ms", 20)
        else:
            cfg.pop("transactional.id", None)
            producers = 1
        self.mode = mode
        self._config = cfg
        self._ack_timeout_s = ack_timeout_s
        #: The transactional.id of each producer (the first is the outbox's own id, unchanged).
        self._ids = [f"{transactional_id}.{i}" if i else str(transactional_id) for i in range(producers)]
        self._producers: list[TransactionalProducer | IdempotentProducer] = []
        self._turn = 0  # the producer that publishes the next batch
        self.txn_gap_s = txn_gap_s if mode == "transactional" else 0.0
        self._txn_ended = [0.0] * producers  # monotonic time each producer's last transaction ended

    def wait_txn_gap(self) -> None:
        """Sleep until ``txn_gap_s`` has passed since the next producer's last transaction ended.

        Kafka finishes a commit (writes its markers) shortly after answering it; a transaction
        begun on the same ``transactional.id`` within that window is refused with
        CONCURRENT_TRANSACTIONS, which librdkafka retries after a fixed 20 ms. With the
        producers taking turns, the next one's last transaction ended a whole batch ago, so
        this rarely sleeps. The relay calls it before its last read of a small batch, so rows
        committed during a pause still join it.
        """
        delay = self._txn_ended[self._turn] + self.txn_gap_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def __repr__(self) -> str:
        return f"KafkaBatchPublisher(mode={self.mode!r}, config={redact_config(self._config)!r})"

    @property
    def started(self) -> bool:
        """True while the producers are open."""
        return bool(self._producers)

    def start(self) -> None:
        """Create the producers; in transactional mode their ``init_transactions`` fence any previous leader's."""
        if self._producers:
            return
        bound = self._ack_timeout_s
        made: list[TransactionalProducer | IdempotentProducer] = []
        try:
            if self.mode == "transactional":
                for tid in self._ids:  # every id, before any batch: a former leader is fenced on all of them
                    made.append(
                        TransactionalProducer(
                            {**self._config, "transactional.id": tid},
                            init_timeout_s=bound,
                            commit_timeout_s=bound,
                            flush_timeout_s=bound,
                            close_timeout_s=_CLOSE_TIMEOUT_S,
                            event_ids=False,  # outbox rows carry their kcons-id
                        )
                    )
            else:
                made.append(
                    IdempotentProducer(
                        self._config, flush_timeout_s=bound, close_timeout_s=_CLOSE_TIMEOUT_S, event_ids=False
                    )
                )
        except BaseException:
            for producer in made:
                producer.close(0)
            raise
        self._producers = made
        self._turn = 0

    def publish(self, records: Iterable[OutboxRecord | RecordTuple], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Publish ``records`` in order; return when all are acknowledged (committed), else raise.

        ``still_leader`` is checked after producing and before committing (transactional mode;
        before producing in idempotent mode): a relay that lost its lease aborts instead of
        committing. ``before_commit`` is a test hook.

        In transactional mode the producers take turns, one batch each. Order is kept: a batch
        is produced only after the previous batch's commit returned (its outcome decided), so in
        every partition its records follow the previous batch's, and ``read_committed``
        consumers read them in that order whichever producer wrote them.
        """
        self.start()
        turn = self._turn
        producer = self._producers[turn]
        try:
            if isinstance(producer, TransactionalProducer):
                self._turn = (turn + 1) % len(self._producers)
                self._publish_transaction(producer, turn, records, still_leader, before_commit)
            else:
                if still_leader is not None and not still_leader():
                    raise LeadershipLostError("lease lost before producing")
                producer.produce_all(_as_tuples(records))
        except ProducerFencedError as exc:
            self.reset()
            raise LeadershipLostError(f"producer fenced by a newer relay: {exc}") from exc
        finally:
            if producer.closed:  # closed itself after a fatal error: new ones (re-initialised) next time
                self.reset()

    def _publish_transaction(self, producer: TransactionalProducer, turn: int,
                             records: Iterable[OutboxRecord | RecordTuple], still_leader: Callable[[], bool] | None,
                             before_commit: Callable[[], None] | None) -> None:  # fmt: skip
        delay = self._txn_ended[turn] + self.txn_gap_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            with producer.transaction():
                producer.enqueue_all(_as_tuples(records))
                if before_commit is not None:
                    before_commit()
                if still_leader is not None and not still_leader():
                    raise LeadershipLostError("lease lost before commit; batch aborted")
        finally:
            self._txn_ended[turn] = time.monotonic()

    def reset(self) -> None:
        """Drop the producers (bounded); the next publish creates (and in transactional mode re-inits) them."""
        producers, self._producers = self._producers, []
        for producer in producers:
            producer.close(0)

    def close(self, timeout: float = 5.0) -> None:
        """Flush (bounded) and drop the producers."""
        producers, self._producers = self._producers, []
        for producer in producers:
            producer.close(timeout)
