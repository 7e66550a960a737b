"""RocketTransactionalOutbox: an event published with RocketMQ 5's transactional messages, decided by the outbox table.

No relay runs: the outbox row is the *commit record* of the local transaction, and RocketMQ
delivers the message. One :meth:`RocketTransactionalOutbox.transaction` does, in order:

1. ``BEGIN`` and insert the event's outbox row, already marked published (``published_at``), so a
   relay on the same table never sends it again. The row's primary key (the event id) is now
   locked by this open transaction.
2. Send the *half message* (invisible to consumers): key = aggregate id, envelope headers as
   properties, ``kcons-id`` among them.
3. Run the caller's business writes on the same connection (the ``with`` body).
4. ``COMMIT`` the database transaction, then commit the half message. On any failure before the
   database commit, roll both back.

If the process dies or the message's commit is lost between 4's two steps, the broker asks a
producer of the topic (any :class:`RocketTransactionalOutbox` started with that topic) through a
*check-back*. The checker answers from the outbox table with a trial ``INSERT ... ON CONFLICT
(id) DO NOTHING`` of the event id, always rolled back:

* a committed row conflicts at once: **COMMIT**;
* a row of a transaction still open makes the insert wait (bounded by ``lock_timeout``): if that
  transaction commits, the insert conflicts (**COMMIT**); if it aborts, or the wait times out,
  see below;
* the insert succeeds: no committed row exists and no open transaction holds the id, and since
  the row is inserted *before* the half message is sent, no later transaction can still write it:
  **ROLLBACK**;
* the wait timed out or the database failed: *unknown*, and the broker checks again later.

Where it stops: the answer is only as good as the row's presence, so keep published rows (the
relay's retention, ``kcons outbox purge``) longer than the broker checks a half message
(``transactionCheckMax`` x ``transactionCheckInterval``, by default 15 x 30 s), or a very late
check of a committed event finds no row and rolls it back. An acknowledged message is only as
durable as the broker's flush and replication settings (see :mod:`kcons.outbox.sinks.rocketmq`).
The broker may check a half message more than once and commit it more than once, so delivery
is at-least-once: consumers dedupe by ``kcons-id``. Transactional messages cannot carry a FIFO
message group (RocketMQ refuses the combination), so per-aggregate order is not guaranteed here:
consumers order by ``kcons-version``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kcons.config import check_postgres_dsn, check_rocketmq_endpoints
from kcons.envelope import Envelope
from kcons.errors import SinkUnavailableError
from kcons.outbox.rows import encode_headers
from kcons.outbox.schema import DEFAULT_TABLE, validate_table
from kcons.outbox.sinks.rocketmq import rocketmq_message, rocketmq_topic

__all__ = ["CheckAnswer", "RocketTransactionalOutbox", "answer_for"]

log = logging.getLogger(__name__)


class CheckAnswer(enum.Enum):
    """What a check-back answers for a half message."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    UNKNOWN = "unknown"


def answer_for(trial_inserted: bool | None) -> CheckAnswer:
    """The check-back rule: a trial insert that conflicted (False) means the row is committed.

    True (the insert went through: no row, no open writer) means roll back; None (the wait timed
    out or the database failed) means ask again later.
    """
    if trial_inserted is None:
        return CheckAnswer.UNKNOWN
    return CheckAnswer.ROLLBACK if trial_inserted else CheckAnswer.COMMIT


class RocketTransactionalOutbox:
    """Publishes each event as a RocketMQ transactional message that commits iff its database transaction commits.

    ``topics`` are the RocketMQ topics (``message.type=TRANSACTION``) this instance sends to and
    answers check-backs for; every process that publishes to them should start one, so a
    check-back for a crashed process's half message finds a checker. One instance runs one
    transaction at a time on its own connection (threads wait for each other); use one instance
    per worker for parallel transactions.
    """

    def __init__(
        self,
        endpoints: str,
        dsn: str,
        topics: Sequence[str],
        *,
        table: str = DEFAULT_TABLE,
        check_lock_timeout_s: float = 5.0,
        request_timeout_s: float = 10.0,
        before_message_commit: Callable[[], None] | None = None,
    ) -> None:
        self.endpoints = check_rocketmq_endpoints("KCONS_ROCKETMQ_ENDPOINTS", endpoints)
        self._dsn = check_postgres_dsn("KCONS_POSTGRES_DSN", dsn)
        self.topics = tuple(rocketmq_topic(t) for t in topics)
        self.table = validate_table(table)
        self._check_lock_timeout_ms = max(1, int(check_lock_timeout_s * 1000))
        self._request_timeout_s = request_timeout_s
        self._before_message_commit = before_message_commit
        self._producer: Any = None
        self._conn: Any = None
        self._check_conn: Any = None
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        #: (event id, answer) of every check-back answered, oldest first (bounded).
        self.answers: list[tuple[str, CheckAnswer]] = []

    def __repr__(self) -> str:
        return f"RocketTransactionalOutbox(endpoints={self.endpoints!r}, topics={self.topics!r}, table={self.table!r})"

    def start(self) -> RocketTransactionalOutbox:
        """Start the producer (with its check-back handler) and open the database connection."""
        import psycopg
        from rocketmq import ClientConfiguration, Credentials, Producer, TransactionChecker

        outbox = self

        class _Checker(TransactionChecker):  # type: ignore[misc]
            def check(self, message: Any) -> Any:
                return outbox._resolution(outbox.check(message.properties.get("kcons-id", "")))

        if self._producer is None:
            # The client needs whole seconds (a float breaks its route queries).
            timeout = max(1, round(self._request_timeout_s))
            config = ClientConfiguration(self.endpoints, Credentials(), request_timeout=timeout)
            producer = Producer(config, self.topics, _Checker())
            try:
                producer.startup()
            except Exception as exc:  # the client raises bare Exceptions
                raise SinkUnavailableError(f"cannot start the RocketMQ producer ({type(exc).__name__})") from None
            self._producer = producer
        if self._conn is None:
            self._conn = psycopg.connect(self._dsn)
        return self

    @staticmethod
    def _resolution(answer: CheckAnswer) -> Any:
        from rocketmq import TransactionResolution

        return {
            CheckAnswer.COMMIT: TransactionResolution.COMMIT,
            CheckAnswer.ROLLBACK: TransactionResolution.ROLLBACK,
            CheckAnswer.UNKNOWN: TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED,
        }[answer]

    @contextlib.contextmanager
    def transaction(self, event: Envelope, *, topic: str | None = None) -> Iterator[Any]:
        """Yield a psycopg connection in an open transaction; at the end commit it, then the event's message.

        The event goes to ``topic`` (default: the first of ``topics``). An exception in the body,
        or a failed half-message send or database commit, rolls back both and is raised; a failed
        message commit after the database commit is not raised: the check-back commits it.
        """
        target = rocketmq_topic(topic) if topic else self.topics[0]
        if target not in self.topics:
            raise ValueError(f"topic {target!r} is not one of this outbox's topics {self.topics}")
        self.start()
        with self._lock:
            conn = self._conn
            try:
                self._insert_row(conn, event, target)
                msg = rocketmq_message(target, event.payload, event.key, event.headers(), fifo=False)
                txn = self._producer.begin_transaction()
                try:
                    self._producer.send(msg, txn)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    raise SinkUnavailableError(f"the half message was not accepted ({reason})") from None
                try:
                    yield conn
                    conn.commit()
                except BaseException:
                    self._rollback_quietly(txn)
                    raise
            except BaseException:
                self._discard_connection()
                raise
        if self._before_message_commit is not None:
            self._before_message_commit()
        try:
            txn.commit()
        except Exception as exc:  # the database committed: the check-back commits the message
            log.warning("committing the half message of %s failed (%s); the broker's check-back will commit it",
                        event.id, type(exc).__name__)  # fmt: skip

    def _insert_row(self, conn: Any, event: Envelope, topic: str) -> None:
        conn.execute(
            f"INSERT INTO {self.table} (id, aggregatetype, aggregateid, type, payload, topic, headers, version, "
            "published_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, clock_timestamp())",
            (event.id, event.aggregate_type, event.aggregate_id, event.type, event.payload, topic,
             encode_headers(event), event.version),
        )  # fmt: skip

    def _rollback_quietly(self, txn: Any) -> None:
        try:
            txn.rollback()
        except Exception as exc:  # the check-back finds no row and rolls it back
            log.warning("rolling back a half message failed (%s); the check-back will", type(exc).__name__)

    def _discard_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.rollback()
            with contextlib.suppress(Exception):
                conn.close()

    def check(self, event_id: str) -> CheckAnswer:
        """Answer a check-back for ``event_id`` from the outbox table (see the module docstring)."""
        import psycopg
        import psycopg.errors

        inserted: bool | None = None
        with self._check_lock:
            try:
                if self._check_conn is None:
                    self._check_conn = psycopg.connect(self._dsn)
                conn = self._check_conn
                try:
                    conn.execute(f"SET LOCAL lock_timeout = {self._check_lock_timeout_ms}")
                    row = conn.execute(
                        f"INSERT INTO {self.table} (id, aggregatetype, aggregateid, type, payload) "
                        "VALUES (%s, '', '', '', ''::bytea) ON CONFLICT (id) DO NOTHING RETURNING 1",
                        (event_id,),
                    ).fetchone()
                    inserted = row is not None
                finally:
                    conn.rollback()  # the trial row never stays
            except psycopg.errors.LockNotAvailable:
                log.info("check-back of %s: its transaction is still open; asking again later", event_id)
            except (psycopg.Error, ValueError) as exc:
                log.warning("check-back of %s failed (%s); the broker asks again later", event_id, type(exc).__name__)
                conn, self._check_conn = self._check_conn, None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            answer = answer_for(inserted)
            self.answers.append((event_id, answer))
            del self.answers[:-1000]
        log.info("check-back of %s answered %s", event_id, answer.value)
        return answer

    def close(self) -> None:
        """Stop the producer and close the database connections."""
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.shutdown()
        with self._lock:
            self._discard_connection()
        with self._check_lock:
            conn, self._check_conn = self._check_conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def __enter__(self) -> RocketTransactionalOutbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
