"""The idempotent consumer on a real RabbitMQ queue with the Redis dedup store: once per id, poison dead-lettered."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
import redis

from kcons.adapters.redis import RedisDedupStore
from kcons.consumer.amqp import AmqpDelivery, AmqpIdempotentConsumer
from kcons.testing import running, wait_for
from kcons.testing.rabbitmq import drain

pytestmark = [pytest.mark.integration]


@pytest.fixture
def queues(amqp_url: str) -> Iterator[tuple[str, str]]:
    """A work queue and the queue bound to its dead-letter exchange (deleted afterwards)."""
    tag = uuid.uuid4().hex[:8]
    work, dead = f"work-{tag}", f"work-{tag}.dead"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.queue_declare(work, durable=True, arguments={"x-queue-type": "quorum"})
    ch.exchange_declare(f"{work}.dlx", "fanout", durable=True)
    ch.queue_declare(dead, durable=True)
    ch.queue_bind(dead, f"{work}.dlx")
    yield work, dead
    for q in (work, dead):
        ch.queue_delete(q)
    ch.exchange_delete(f"{work}.dlx")
    conn.close()


def _send(amqp_url: str, queue: str, messages: list[tuple[str | None, bytes]]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for event_id, body in messages:
        ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, message_id=event_id))
    conn.close()


def test_each_id_takes_effect_once_and_poison_goes_to_the_dead_letter_exchange_with_its_reason(
    amqp_url: str, redis_url: str, queues: tuple[str, str]
) -> None:
    work, dead = queues
    ids = [str(uuid.uuid4()) for _ in range(5)]
    effects: list[str] = []

    def handler(d: AmqpDelivery) -> None:
        if d.body == b"boom":
            raise ValueError("cannot parse")
        assert d.event_id is not None
        effects.append(d.event_id)

    first = [(i, b"ok") for i in ids] + [(ids[0], b"ok"), (None, b"no id"), (str(uuid.uuid4()), b"boom")]
    _send(amqp_url, work, first)
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=f"amqp-{work}")
    consumer = AmqpIdempotentConsumer(amqp_url, work, handler, store, batch_size=4, idle_s=0.1)
    errors: list[BaseException] = []
    with running(consumer, errors):
        wait_for("the first messages to be decided", lambda: consumer.handled + consumer.dead_lettered >= 7)
        _send(amqp_url, work, [(ids[1], b"ok"), (ids[2], b"ok")])  # redelivered by a producer later
        wait_for("the late duplicates to be dropped", lambda: consumer.duplicates >= 3)
    assert not errors, errors
    assert sorted(effects) == sorted(ids)  # each id's effect exactly once
    assert drain(amqp_url, work) == []  # everything acknowledged
    dead_letters = drain(amqp_url, dead)
    reasons = sorted(str(props.headers["kcons-dlq-reason"]) for props, _ in dead_letters)
    assert reasons == ["ValueError: cannot parse", "no event id"]
    assert all(props.headers["kcons-dlq-queue"] == work for props, _ in dead_letters)


def test_unconfirmed_dead_letter_write_requeues_the_message_instead_of_losing_it(
    amqp_url: str, redis_url: str, queues: tuple[str, str]
) -> None:
    work, dead = queues
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_unbind(dead, f"{work}.dlx")  # the dead-letter exchange now routes nowhere
    conn.close()
    _send(amqp_url, work, [(None, b"no id")])
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=f"amqp-{work}")
    consumer = AmqpIdempotentConsumer(amqp_url, work, lambda d: None, store, idle_s=0.1, hold_pause_s=0.1)
    errors: list[BaseException] = []
    with running(consumer, errors):
        time.sleep(1.5)  # several attempts, each unconfirmed
    assert not errors, errors
    assert consumer.dead_lettered == 0
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    method, _props, body = conn.channel().basic_get(work, auto_ack=True)
    conn.close()
    assert method is not None and method.redelivered and body == b"no id"  # consumed, requeued, not lost


def test_same_transaction_effects_commit_with_their_dedup_records_before_the_ack(
    amqp_url: str, fresh_database: Callable[[], str], queues: tuple[str, str]
) -> None:
    import psycopg

    from kcons.adapters.postgres import PostgresDedupStore

    work, _dead = queues
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE effects (event_id text NOT NULL)")
    ids = [str(uuid.uuid4()) for _ in range(6)]
    failed_once: set[str] = set()

    def handler(d: AmqpDelivery, conn: Any) -> None:
        conn.execute("INSERT INTO effects VALUES (%s)", (d.event_id,))
        if d.event_id == ids[2] and d.event_id not in failed_once:
            failed_once.add(d.event_id)
            raise RuntimeError("transient")  # rolls back this attempt's effect and done record

    _send(amqp_url, work, [*((i, b"ok") for i in ids), (ids[0], b"ok")])  # the last one a duplicate
    consumer = AmqpIdempotentConsumer.same_transaction(
        amqp_url, work, handler, PostgresDedupStore(dsn, namespace=f"amqp-{work}"),
        connect=lambda: psycopg.connect(dsn, autocommit=True), batch_size=10, idle_s=0.1,
    )  # fmt: skip
    errors: list[BaseException] = []
    with running(consumer, errors):
        wait_for("every message to be decided", lambda: consumer.handled + consumer.duplicates >= 7, timeout=60)
    assert not errors, errors
    with psycopg.connect(dsn) as conn:
        rows = sorted(r[0] for r in conn.execute("SELECT event_id FROM effects"))
    assert rows == sorted(ids)  # one effect per id: the failed attempt's row was rolled back with it
    assert drain(amqp_url, work) == []  # everything acknowledged after the commit

