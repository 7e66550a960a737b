"""The idempotent consumer on a real RocketMQ 5 FIFO topic (Redis dedup store): once per id, in order, DLQ reasons."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
from rocketmq import ClientConfiguration, Credentials, Message, Producer

from kcons.adapters.redis import RedisDedupStore
from kcons.consumer.rocketmq import RocketMqDelivery, RocketMqIdempotentConsumer
from kcons.testing import running, wait_for
from kcons.testing.rocketmq import drain

pytestmark = [pytest.mark.integration]


@pytest.fixture
def topology(kcons_rocketmq: Any) -> tuple[str, str, str]:
    """A FIFO topic, a FIFO consumer group and the group's dead-letter topic (``%DLQ%<group>``)."""
    tag = uuid.uuid4().hex[:8]
    topic = kcons_rocketmq.create_topic(f"work-{tag}", "FIFO")
    group = kcons_rocketmq.create_group(f"workers-{tag}", fifo=True)
    dlq = kcons_rocketmq.create_topic(f"%DLQ%{group}", "NORMAL", queues=1)
    return topic, group, dlq


def _send(endpoints: str, topic: str, messages: list[tuple[str | None, str, bytes]]) -> None:
    """Send (event id or None, aggregate, body) in order, each aggregate as one message group."""
    producer = Producer(ClientConfiguration(endpoints, Credentials(), request_timeout=10), (topic,))
    producer.startup()
    try:
        for event_id, aggregate, body in messages:
            msg = Message()
            msg.topic, msg.body, msg.keys, msg.message_group = topic, body, aggregate, aggregate
            if event_id is not None:
                msg.add_property("kcons-id", event_id)
            producer.send(msg)
    finally:
        producer.shutdown()


def test_each_id_takes_effect_once_in_order_per_aggregate_and_poison_goes_to_the_dlq_with_its_reason(
    kcons_rocketmq: Any, redis_url: str, topology: tuple[str, str, str]
) -> None:
    topic, group, dlq = topology
    ids = {(a, v): str(uuid.uuid4()) for a in range(4) for v in range(5)}
    effects: list[tuple[str, int]] = []

    def handler(d: RocketMqDelivery) -> None:
        if d.body == b"boom":
            raise ValueError("cannot parse")
        aggregate, version = d.body.decode().split(":")
        effects.append((aggregate, int(version)))

    messages: list[tuple[str | None, str, bytes]] = [
        (ids[(a, v)], f"acc-{a}", f"acc-{a}:{v}".encode()) for v in range(5) for a in range(4)
    ]
    messages += [(ids[(0, 4)], "acc-0", b"acc-0:4"), (None, "acc-9", b"no id"), (str(uuid.uuid4()), "acc-8", b"boom")]
    _send(kcons_rocketmq.endpoints, topic, messages)
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=f"rocketmq-{topic}")
    consumer = RocketMqIdempotentConsumer(kcons_rocketmq.endpoints, topic, group, handler, store, batch_size=8)
    errors: list[BaseException] = []
    with running(consumer, errors):
        wait_for("every message to be decided",
                 lambda: consumer.handled + consumer.dead_lettered + consumer.duplicates >= len(messages), timeout=90)
        _send(kcons_rocketmq.endpoints, topic, [(ids[(1, 0)], "acc-1", b"acc-1:0")])  # a producer's late copy
        wait_for("the late copy to be dropped", lambda: consumer.duplicates >= 2, timeout=60)
    assert not errors, errors
    assert sorted(effects) == sorted((f"acc-{a}", v) for a, v in ids)  # each id's effect exactly once
    for a in range(4):
        assert [v for agg, v in effects if agg == f"acc-{a}"] == list(range(5))  # in order per aggregate
    dead = drain(kcons_rocketmq.endpoints, dlq, f"dlq-reader-{uuid.uuid4().hex[:6]}", want=2, idle_s=2)
    assert sorted(m.properties["kcons-dlq-reason"] for m in dead) == ["ValueError: cannot parse", "no event id"]
    assert all(m.properties["kcons-dlq-topic"] == topic for m in dead)
    # Everything was acknowledged: a new consumer of the group receives nothing.
    assert drain(kcons_rocketmq.endpoints, topic, group, want=0, idle_s=3, timeout=10) == []


def test_unacknowledged_dead_letter_holds_the_message_instead_of_losing_it(
    kcons_rocketmq: Any, redis_url: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    topic = kcons_rocketmq.create_topic(f"work-{tag}", "FIFO")
    group = kcons_rocketmq.create_group(f"workers-{tag}", fifo=True)  # no %DLQ% topic: every dead-letter send fails
    _send(kcons_rocketmq.endpoints, topic, [(None, "acc-1", b"no id")])
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=f"rocketmq-{topic}")
    consumer = RocketMqIdempotentConsumer(kcons_rocketmq.endpoints, topic, group, lambda d: None, store,
                                          hold_pause_s=1.0)  # fmt: skip
    errors: list[BaseException] = []
    with running(consumer, errors):
        time.sleep(5)  # several attempts, each failing
    assert not errors, errors
    assert consumer.dead_lettered == 0
    again = drain(kcons_rocketmq.endpoints, topic, group, want=1, idle_s=1, timeout=60)
    assert [m.body for m in again] == [b"no id"] and again[0].delivery_attempt > 1  # received again, not lost


def test_same_transaction_effects_commit_with_their_dedup_records(
    kcons_rocketmq: Any, fresh_database: Any, topology: tuple[str, str, str]
) -> None:
    import psycopg

    from kcons.adapters.postgres import PostgresDedupStore

    topic, group, _dlq = topology
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE effects (event_id text NOT NULL)")
    ids = [str(uuid.uuid4()) for _ in range(6)]
    failed_once: set[str] = set()

    def handler(d: RocketMqDelivery, conn: Any) -> None:
        conn.execute("INSERT INTO effects VALUES (%s)", (d.event_id,))
        if d.event_id == ids[2] and d.event_id not in failed_once:
            failed_once.add(d.event_id)
            raise RuntimeError("transient")  # rolls back this attempt's effect and done record

    messages: list[tuple[str | None, str, bytes]] = [(i, f"acc-{n % 2}", b"x") for n, i in enumerate(ids)]
    _send(kcons_rocketmq.endpoints, topic, [*messages, (ids[0], "acc-0", b"x")])  # the last one a duplicate
    consumer = RocketMqIdempotentConsumer.same_transaction(
        kcons_rocketmq.endpoints, topic, group, handler, PostgresDedupStore(dsn, namespace=group),
        connect=lambda: psycopg.connect(dsn, autocommit=True),
    )  # fmt: skip
    errors: list[BaseException] = []
    with running(consumer, errors):
        wait_for("every message to be decided", lambda: consumer.handled + consumer.duplicates >= 7, timeout=60)
    assert not errors, errors
    with psycopg.connect(dsn) as conn:
        rows = sorted(r[0] for r in conn.execute("SELECT event_id FROM effects"))
    assert rows == sorted(ids)  # one effect per id: the failed attempt's row was rolled back with it
