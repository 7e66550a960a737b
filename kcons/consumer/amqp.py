"""The idempotent consumer on a RabbitMQ queue, driven by the same decision core as on Kafka.

A batch of deliveries (up to ``batch_size``, prefetched with ``basic.qos``) is decided by
:class:`~kcons.consumer.plan.BatchPlan` exactly as a Kafka batch is: the ids are claimed in the
dedup store (any :class:`~kcons.dedup.BatchDedupStore`: Redis, PostgreSQL, SQLite, memory), a
duplicate or an id already done is dropped, a message without an id or whose handler keeps
failing is dead-lettered, an id busy in another worker holds the queue there. The queue is one
"partition" and a delivery's place in the batch its "offset". Then, in this order:

1. the done records are written (``complete``);
2. dead letters are published to ``dead_letter_exchange`` with publisher confirms, ``mandatory``,
   persistent, carrying the original headers plus ``kcons-dlq-reason`` and ``kcons-dlq-queue``;
   a write that is not confirmed holds the queue at that message;
3. claims not used are given back;
4. deliveries before the first held one are acked; that one and every later one is nacked with
   ``requeue=True`` (redelivered later, never lost).

So a message is acknowledged only after its effect and its done record (or its confirmed
dead-letter copy). A crash in between redelivers it; its claim then makes it wait for the lease
(at-least-once effect, exactly as on Kafka). With :meth:`AmqpIdempotentConsumer.same_transaction`
the effects run as :class:`~kcons.consumer.effects.SameTransaction` does on Kafka: the batch's
``handler(delivery, conn)`` calls and their done records commit in one PostgreSQL or SQLite
transaction, acknowledged only after that commit; a crash before the commit rolls both back and
the redelivered messages run again, a crash after it finds them done (exactly-once effects).
Client: pika (see :mod:`kcons.outbox.sinks.rabbitmq`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import pika
import pika.exceptions

from kcons.config import check_amqp_url, check_identifier, check_range
from kcons.consumer.effects import Effects, SameTransaction, attempts_policy, effects_for, run_plan
from kcons.consumer.ids import reason
from kcons.consumer.plan import BatchPlan, Decision, Entry, abandon, after_dead_letters, hold_all
from kcons.dedup import BatchDedupStore, SqlDedupStore, unique_in_order

__all__ = ["AmqpDelivery", "AmqpIdempotentConsumer", "SqlDedupStore"]

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError)


class AmqpDelivery(NamedTuple):
    """One message as the handler gets it."""

    event_id: str | None
    body: bytes
    headers: dict[str, Any]
    properties: Any
    delivery_tag: int


def _event_id(props: Any) -> str | None:
    headers = props.headers or {}
    value = props.message_id or headers.get("kcons-id")
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value) if value else None


class AmqpIdempotentConsumer:
    """Consumes one queue; each event id's handler runs once while its dedup record is kept."""

    def __init__(
        self,
        url: str,
        queue: str,
        handler: Callable[[AmqpDelivery], None] | None,
        store: BatchDedupStore,
        *,
        effects: Effects | None = None,
        dead_letter_exchange: str | None = None,
        batch_size: int = 100,
        lease_s: float = 30.0,
        attempts: int = 3,
        hold_pause_s: float = 1.0,
        idle_s: float = 0.2,
    ) -> None:
        self._url = check_amqp_url("KCONS_AMQP_URL", url)
        self.queue = check_identifier("queue", queue, kind="key", max_length=200)
        self.dead_letter_exchange = check_identifier(
            "dead_letter_exchange", dead_letter_exchange or f"{queue}.dlx", kind="key", max_length=200
        )
        self.effects: Effects = effects_for(handler, effects)
        self.store = store
        self.batch_size = check_range("batch_size", batch_size, 1, 10000)
        self.lease_s = check_range("lease_s", lease_s, 0.1, 86400.0)
        self.attempts = check_range("attempts", attempts, 1, 100)
        self.hold_pause_s = hold_pause_s
        self.idle_s = idle_s
        self.handled = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self._stop = threading.Event()
        self._retry = attempts_policy(self.attempts)

    @classmethod
    def same_transaction(
        cls,
        url: str,
        queue: str,
        handler: Callable[[AmqpDelivery, Any], None],
        store: SqlDedupStore,
        *,
        connect: Callable[[], Any],
        **kw: Any,
    ) -> AmqpIdempotentConsumer:
        """``handler(delivery, conn)`` and each id's done record commit in one transaction (exactly-once effects).

        ``connect`` opens the handler's connection (psycopg in autocommit mode, or sqlite3 on the
        store's file; kcons opens the transactions); ``store`` is the PostgreSQL or SQLite dedup
        store on that database. The batch's deliveries are acknowledged only after the commit.
        """
        return cls(url, queue, None, store, effects=SameTransaction(handler, store, connect=connect), **kw)

    def stop(self) -> None:
        """Finish the current batch and return from :meth:`run`."""
        self._stop.set()

    def run(self) -> None:
        """Consume until :meth:`stop`; a lost connection is reopened (unacked deliveries come back)."""
        self.effects.open()
        try:
            while not self._stop.is_set():
                try:
                    self._run_connection()
                except _CONNECTION_ERRORS as exc:
                    log.warning("RabbitMQ connection lost (%s); reconnecting", type(exc).__name__)
                    self._stop.wait(1.0)
        finally:
            self.effects.close()

    def _run_connection(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self._url))
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self.batch_size)
            dlq = connection.channel()
            dlq.confirm_delivery()
            dlq.exchange_declare(self.dead_letter_exchange, "fanout", durable=True)
            batch: list[tuple[Any, Any, bytes]] = []
            for method, props, body in channel.consume(self.queue, inactivity_timeout=self.idle_s):
                if method is not None:
                    batch.append((method, props, body))
                if batch and (method is None or len(batch) >= self.batch_size):
                    self._handle_batch(channel, dlq, batch)
                    batch = []
                if self._stop.is_set() and not batch:
                    break
            channel.cancel()  # unacked deliveries of an unfinished batch are requeued by the close
        finally:
            if connection.is_open:
                connection.close()

    def _handle_batch(self, channel: Any, dlq: Any, batch: list[tuple[Any, Any, bytes]]) -> None:
        entries = [
            Entry(self.queue, 0, i, eid, None if eid else "no event id")
            for i, (_m, props, _b) in enumerate(batch)
            for eid in [_event_id(props)]
        ]
        ids = unique_in_order([e.event_id for e in entries if e.event_id])
        try:
            claim = self.store.claim_batch(ids, self.lease_s)
        except Exception as exc:  # store down: nothing decided, everything comes back later
            log.warning("dedup claim failed (%s); batch requeued", type(exc).__name__)
            self._settle(channel, batch, hold_all({(self.queue, 0): 0}, len(batch), self.hold_pause_s, "store"))
            time.sleep(self.hold_pause_s)
            return
        deliveries = [
            AmqpDelivery(e.event_id, body, dict(props.headers or {}), props, method.delivery_tag)
            for e, (method, props, body) in zip(entries, batch, strict=True)
        ]
        plan = BatchPlan(entries, claim.claimed, claim.done, self.hold_pause_s)
        try:
            with self.effects.unit():
                decision = run_plan(self.effects, plan, deliveries, self._retry)
        except Exception as exc:  # the batch did not finish: a failed transaction rolled its effects back
            log.warning("batch effects failed (%s); batch requeued", reason(exc))
            done = [] if self.effects.atomic else plan.done
            decision = abandon(done, claim.claimed, {(self.queue, 0): 0}, self.hold_pause_s, "effects_failed")
        try:
            if decision.done and self.effects.records_done:
                self.store.complete(decision.done)
        except Exception as exc:  # effects done, records not: redelivered, held by the claims until they expire
            log.warning("dedup complete failed (%s); batch requeued", type(exc).__name__)
            self._settle(channel, batch, hold_all({(self.queue, 0): 0}, len(batch), self.hold_pause_s, "store"))
            return
        acknowledged = {n for n, poison in enumerate(decision.dead_letter) if self._dead_letter(dlq, batch, poison)}
        decision = after_dead_letters(decision, entries, acknowledged, self.hold_pause_s)
        if decision.release:
            try:
                self.store.release(sorted(decision.release))
            except Exception as exc:  # the claims expire on their own
                log.debug("dedup release failed: %s", type(exc).__name__)
        self.handled += decision.handled
        self.duplicates += decision.duplicates
        self.dead_lettered += decision.dead_lettered
        self._settle(channel, batch, decision)

    def _dead_letter(self, dlq: Any, batch: list[tuple[Any, Any, bytes]], poison: Any) -> bool:
        _m, props, body = batch[poison.position]
        headers = dict(props.headers or {})
        headers.update({"kcons-dlq-reason": poison.reason, "kcons-dlq-queue": self.queue})
        out = pika.BasicProperties(delivery_mode=2, message_id=props.message_id, headers=headers,
                                   content_type=props.content_type, timestamp=props.timestamp)  # fmt: skip
        try:
            dlq.basic_publish(self.dead_letter_exchange, self.queue, body, out, mandatory=True)
            return True
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            log.warning("dead-letter write to %s not confirmed (%s); message requeued",
                        self.dead_letter_exchange, type(exc).__name__)  # fmt: skip
            return False

    def _settle(self, channel: Any, batch: list[tuple[Any, Any, bytes]], decision: Decision) -> None:
        """Ack every delivery before the queue's hold (all of them without one), requeue the rest."""
        hold = decision.holds.get((self.queue, 0))
        cut = len(batch) if hold is None else hold.offset
        if cut > 0:
            channel.basic_ack(batch[cut - 1][0].delivery_tag, multiple=True)
        if cut < len(batch):
            channel.basic_nack(batch[-1][0].delivery_tag, multiple=True, requeue=True)
            if hold is not None:
                self._stop.wait(hold.pause_s)
