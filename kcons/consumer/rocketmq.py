"""The idempotent consumer on a RocketMQ 5 topic, driven by the same decision core as on Kafka.

Messages are received with RocketMQ's simple consumer (``rocketmq-python-client``, gRPC to the
proxy): up to ``batch_size`` at a time, each invisible to other consumers of the group for
``invisible_s``. A batch is decided by :class:`~kcons.consumer.plan.BatchPlan` exactly as a
Kafka batch is: the ids (``kcons-id``) are claimed in the dedup store (any
:class:`~kcons.dedup.BatchDedupStore`), a duplicate or an id already done is dropped, a message
without an id or whose handler keeps failing is dead-lettered, an id busy in another worker is
held. Each **message group** is one "partition" (a message without a group is one of its own)
and a message's place in the batch its "offset", so a hold stops only its own group. Then:

1. the done records are written (``complete``);
2. dead letters are sent to the group's dead-letter topic (default ``%DLQ%<group>``, RocketMQ's
   own DLQ topic, which must exist with ``message.type=NORMAL``) with the original properties
   plus ``kcons-dlq-reason``, ``kcons-dlq-topic`` and ``kcons-dlq-message-id``; a send the broker
   did not acknowledge holds the message;
3. claims not used are given back;
4. every decided message is acknowledged (``ack``); a held message is made visible again after
   the hold's pause (``change_invisible_duration``), so it is received again, never lost.

The effects run through the consumer's strategies (:mod:`kcons.consumer.effects`):
:class:`~kcons.consumer.effects.PerMessage` (``handler(delivery)``, the default) or, with
:meth:`RocketMqIdempotentConsumer.same_transaction`, :class:`~kcons.consumer.effects.SameTransaction`
(``handler(delivery, conn)`` and the done record commit in one SQL transaction: exactly-once
effects with the PostgreSQL or SQLite store). So a message is acknowledged only after its effect
and its done record (or its acknowledged dead-letter copy). A crash in between lets the message
become visible again after ``invisible_s``; its claim then makes it wait for the lease, and the
effect runs again (at-least-once) unless it committed with its done record. With a FIFO consumer
group (``consumeMessageOrderly``) the broker hands out a group's next message only after the
previous one was acknowledged, so each aggregate is handled in order.

Where it stops: a message held (or crashed on) more often than the group's ``retryMaxTimes`` is
moved by the broker itself to ``%DLQ%<group>``, without a kcons reason; keep that limit above the
holds you expect (busy ids, store outages).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from kcons.config import check_range, check_rocketmq_endpoints
from kcons.consumer.effects import Effects, SameTransaction, attempts_policy, effects_for, run_plan
from kcons.consumer.ids import reason
from kcons.consumer.plan import BatchPlan, Decision, Entry, abandon, after_dead_letters, hold_all
from kcons.dedup import BatchDedupStore, SqlDedupStore, unique_in_order

__all__ = ["RocketMqDelivery", "RocketMqIdempotentConsumer", "SqlDedupStore", "group_partitions"]

log = logging.getLogger(__name__)


class RocketMqDelivery(NamedTuple):
    """One message as the handler gets it."""

    event_id: str | None
    body: bytes
    properties: dict[str, str]
    message: Any


def group_partitions(groups: list[str | None]) -> list[int]:
    """A "partition" number per message: one per distinct message group, and one per message without a group."""
    numbers: dict[str, int] = {}
    # Groups get negative numbers, a lone message its own index: no two can meet.
    return [i if group is None else numbers.setdefault(group, -1 - len(numbers)) for i, group in enumerate(groups)]


class RocketMqIdempotentConsumer:
    """Consumes one topic as one consumer group; each event id's handler runs once while its dedup record is kept."""

    def __init__(
        self,
        endpoints: str,
        topic: str,
        group: str,
        handler: Callable[[RocketMqDelivery], None] | None,
        store: BatchDedupStore,
        *,
        effects: Effects | None = None,
        dead_letter_topic: str | None = None,
        batch_size: int = 32,
        invisible_s: int = 30,
        lease_s: float = 30.0,
        attempts: int = 3,
        hold_pause_s: float = 1.0,
        request_timeout_s: int = 10,
    ) -> None:
        self.endpoints = check_rocketmq_endpoints("KCONS_ROCKETMQ_ENDPOINTS", endpoints)
        self.topic = topic
        self.group = group
        self.dead_letter_topic = dead_letter_topic or f"%DLQ%{group}"
        self.effects: Effects = effects_for(handler, effects)
        self.store = store
        self.batch_size = check_range("batch_size", batch_size, 1, 32)
        # The proxy refuses less than 10 s (its minInvisibleTimeMillsForRecv).
        self.invisible_s = check_range("invisible_s", invisible_s, 10, 43200)
        self.lease_s = check_range("lease_s", lease_s, 0.1, 86400.0)
        self.attempts = check_range("attempts", attempts, 1, 100)
        self.hold_pause_s = hold_pause_s
        self._request_timeout_s = request_timeout_s
        self.handled = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self._stop = threading.Event()
        self._consumer: Any = None
        self._producer: Any = None
        self._retry = attempts_policy(self.attempts)

    @classmethod
    def same_transaction(
        cls,
        endpoints: str,
        topic: str,
        group: str,
        handler: Callable[[RocketMqDelivery, Any], None],
        store: SqlDedupStore,
        *,
        connect: Callable[[], Any],
        **kw: Any,
    ) -> RocketMqIdempotentConsumer:
        """``handler(delivery, conn)`` and each id's done record commit in one transaction (exactly-once effects).

        ``connect`` opens the handler's connection (psycopg in autocommit mode; kcons opens the
        transactions); ``store`` is the PostgreSQL or SQLite dedup store on that database.
        """
        return cls(endpoints, topic, group, None, store, effects=SameTransaction(handler, store, connect=connect), **kw)

    def stop(self) -> None:
        """Finish the current batch and return from :meth:`run`."""
        self._stop.set()

    def _start(self) -> None:
        from rocketmq import ClientConfiguration, Credentials, FilterExpression, Producer, SimpleConsumer

        config = ClientConfiguration(self.endpoints, Credentials(), request_timeout=self._request_timeout_s)
        if self._consumer is None:
            consumer = SimpleConsumer(config, self.group, {self.topic: FilterExpression()}, await_duration=1)
            consumer.startup()
            self._consumer = consumer
        if self._producer is None:
            producer = Producer(config, (self.dead_letter_topic,))
            producer.startup()
            self._producer = producer

    def run(self) -> None:
        """Consume until :meth:`stop`; a failed receive is retried (unacknowledged messages come back)."""
        self.effects.open()
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._start()
                    batch = self._consumer.receive(self.batch_size, self.invisible_s)
                    failures = 0
                except Exception as exc:  # the client raises bare Exceptions (also before its settings arrived)
                    failures += 1
                    (log.warning if failures % 50 == 0 else log.debug)("RocketMQ receive failed (%s); retrying", exc)
                    self._stop.wait(0.2)
                    continue
                if batch:
                    self._handle_batch(list(batch))
        finally:
            self.close()

    def close(self) -> None:
        """Stop the clients (unacknowledged messages become visible again after ``invisible_s``)."""
        self.effects.close()
        for client in (self._consumer, self._producer):
            if client is not None:
                try:
                    client.shutdown()
                except Exception as exc:  # already broken
                    log.debug("stopping a RocketMQ client failed: %s", type(exc).__name__)
        self._consumer = self._producer = None

    def _handle_batch(self, batch: list[Any]) -> None:
        partitions = group_partitions([m.message_group or None for m in batch])
        entries = [
            Entry(self.topic, partitions[i], i, eid, None if eid else "no event id")
            for i, msg in enumerate(batch)
            for eid in [(msg.properties or {}).get("kcons-id") or None]
        ]
        ids = unique_in_order([e.event_id for e in entries if e.event_id])
        try:
            claim = self.store.claim_batch(ids, self.lease_s)
        except Exception as exc:  # store down: nothing decided, everything comes back later
            log.warning("dedup claim failed (%s); batch held", type(exc).__name__)
            starts = {(e.topic, e.partition): e.offset for e in reversed(entries)}  # first message of each group
            self._settle(batch, entries, hold_all(starts, len(batch), self.hold_pause_s, "store"))
            return
        deliveries = [
            RocketMqDelivery(e.event_id, m.body, dict(m.properties or {}), m)
            for e, m in zip(entries, batch, strict=True)
        ]
        starts = {(e.topic, e.partition): e.offset for e in reversed(entries)}
        plan = BatchPlan(entries, claim.claimed, claim.done, self.hold_pause_s)
        try:
            with self.effects.unit():
                decision = run_plan(self.effects, plan, deliveries, self._retry)
        except Exception as exc:  # the batch did not finish: a failed transaction rolled its effects back
            log.warning("batch effects failed (%s); batch held", reason(exc))
            done = [] if self.effects.atomic else plan.done
            decision = abandon(done, claim.claimed, starts, self.hold_pause_s, "effects_failed")
        try:
            if decision.done and self.effects.records_done:
                self.store.complete(decision.done)
        except Exception as exc:  # effects done, records not: received again, held by the claims until they expire
            log.warning("dedup complete failed (%s); batch held", type(exc).__name__)
            self._settle(batch, entries, hold_all(starts, len(batch), self.hold_pause_s, "store"))
            return
        acknowledged = {n for n, poison in enumerate(decision.dead_letter) if self._dead_letter(batch, poison)}
        decision = after_dead_letters(decision, entries, acknowledged, self.hold_pause_s)
        if decision.release:
            try:
                self.store.release(sorted(decision.release))
            except Exception as exc:  # the claims expire on their own
                log.debug("dedup release failed: %s", type(exc).__name__)
        self.handled += decision.handled
        self.duplicates += decision.duplicates
        self.dead_lettered += decision.dead_lettered
        self._settle(batch, entries, decision)

    def _dead_letter(self, batch: list[Any], poison: Any) -> bool:
        from rocketmq import Message

        original = batch[poison.position]
        msg = Message()
        msg.topic = self.dead_letter_topic
        msg.body = original.body
        if original.keys:
            msg.keys = next(iter(original.keys))
        properties = dict(original.properties or {})
        properties.update({"kcons-dlq-reason": poison.reason, "kcons-dlq-topic": self.topic,
                           "kcons-dlq-message-id": str(original.message_id)})  # fmt: skip
        for name, value in properties.items():
            msg.add_property(name, value)
        try:
            self._producer.send(msg)
            return True
        except Exception as exc:  # not acknowledged: the message is held and dead-lettered again later
            log.warning("dead-letter send to %s failed (%s); message held", self.dead_letter_topic, exc)
            return False

    def _settle(self, batch: list[Any], entries: list[Entry], decision: Decision) -> None:
        """Acknowledge every decided message; make each held one visible again after its hold's pause."""
        for i, msg in enumerate(batch):
            hold = decision.holds.get((entries[i].topic, entries[i].partition))
            try:
                if hold is None or i < hold.offset:
                    self._consumer.ack(msg)
                else:
                    self._consumer.change_invisible_duration(msg, max(1, round(hold.pause_s)))
            except Exception as exc:  # not acknowledged: received again after invisible_s (the dedup drops it)
                log.warning("acknowledging a RocketMQ message failed (%s)", exc)
