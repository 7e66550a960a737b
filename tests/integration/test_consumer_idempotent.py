"""IdempotentConsumer on real Kafka, Redis and PostgreSQL: duplicates, crashes, poison messages, back-pressure."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import tenacity
from confluent_kafka import TopicPartition

from kcons.adapters.memory import MemoryDedupStore
from kcons.adapters.postgres import PostgresDedupStore
from kcons.adapters.redis import RedisDedupStore
from kcons.consumer import (
    DLQ_REASON_HEADER,
    DLQ_SOURCE_HEADER,
    IdempotentConsumer,
    RetryLater,
    TransactionalIdempotentConsumer,
)
from kcons.dedup import DedupStore
from kcons.errors import DecodeError

pytestmark = [pytest.mark.integration, pytest.mark.backends]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fault"))


def produce(producer: Any, topic: str, events: list[tuple[str | None, bytes]], **kw: Any) -> None:
    """Write (event id or None, value) pairs in order; extra headers via ``headers=``."""
    extra = kw.get("headers", [])
    for event_id, value in events:
        headers = list(extra)
        if event_id is not None:
            headers.append(("kcons-id", event_id.encode()))
        producer.produce(topic, value=value, key=kw.get("key", b"k"), headers=headers, partition=kw.get("partition", 0))
    assert producer.flush(30) == 0


def config(bootstrap: str, group: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
    }
    cfg.update(extra)
    return cfg


def drive(consumer: IdempotentConsumer, until: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll batches until ``until()`` holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"condition not reached in {timeout_s}s; stats {consumer.stats}"
        consumer.poll_once()


def committed(kafka_bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    from confluent_kafka import Consumer

    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=20)
        return [tp.offset for tp in parts]
    finally:
        probe.close()


def read_all(make_consumer: Callable[..., Any], topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    reader = make_consumer()
    reader.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for msg in reader.consume(100, 0.5):
            if msg.error() is None:
                out.append(msg)
    return out


def redis_consumer(
    bootstrap: str, redis_url: str, group: str, topic: str, handled: list[str], **settings: Any
) -> IdempotentConsumer:
    """A consumer of ``topic`` with the group's Redis store; each handled message's kcons-id goes to ``handled``."""
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=group)
    return IdempotentConsumer(
        config(bootstrap, group),
        [topic],
        lambda m: handled.append(dict(m.headers())["kcons-id"].decode()),
        store=store,
        **settings,
    )


@pytest.fixture
def group() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pg_dsn(fresh_database: Callable[[], str]) -> str:
    return fresh_database()


def test_each_event_id_is_handled_once_and_messages_without_id_fall_back_to_their_position(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_producer: Callable[..., Any], group: str
) -> None:
    topic = unique_topic()
    events: list[tuple[str | None, bytes]] = [(f"e{i}", b"v") for i in range(20)]
    events += [("e3", b"resend"), ("e7", b"resend"), (None, b"no-id-1"), (None, b"no-id-2")]
    produce(make_producer(), topic, events)
    handled: list[bytes] = []
    with IdempotentConsumer(
        config(kafka_bootstrap, group), [topic], lambda m: handled.append(m.value()), store=MemoryDedupStore()
    ) as consumer:
        drive(consumer, lambda: consumer.stats.handled + consumer.stats.duplicates >= len(events))
        assert consumer.stats.duplicates == 2
        assert consumer.stats.fallback_ids == 2
    assert len(handled) == 22
    assert b"resend" not in handled
    assert handled.count(b"no-id-1") == 1 and handled.count(b"no-id-2") == 1
    assert committed(kafka_bootstrap, group, topic) == [len(events)]


@pytest.mark.parametrize("store_kind", ["redis", "postgres"])
def test_a_message_redelivered_after_a_crash_between_effect_and_commit_is_dropped_as_a_duplicate(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    redis_url: str,
    redis_client: Any,
    pg_dsn: str,
    group: str,
    store_kind: str,
) -> None:
    """A worker process applies the effects and records them done, then is SIGKILLed at its offset commit."""
    topic = unique_topic()
    ids = [f"id-{i}" for i in range(10)]
    produce(make_producer(), topic, [(i, b"v") for i in ids])
    env = dict(os.environ, KCONS_KAFKA_BOOTSTRAP=kafka_bootstrap, KCONS_REDIS_URL=redis_url, KCONS_POSTGRES_DSN=pg_dsn)
    if store_kind == "postgres":
        from _consumer_worker import EFFECTS_DDL

        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(EFFECTS_DDL)
    worker = subprocess.run(
        [sys.executable, str(ROOT / "tests/fault/_consumer_worker.py"), "--group", group, "--topic", topic,
         "--store", store_kind, "--batch-size", "10", "--crash-at-commit"],
        env=env, timeout=120, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert worker.returncode == -signal.SIGKILL, worker.stderr[-2000:]
    assert committed(kafka_bootstrap, group, topic) == [-1001], "the crash came before any offset commit"

    def effects() -> list[str]:
        if store_kind == "redis":
            # the worker appends "<id>|<pid>"
            return [v.decode().rpartition("|")[0] for v in redis_client.lrange(f"kcons-test-effects:{group}", 0, -1)]
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            return [r[0] for r in conn.execute("SELECT event_id FROM kcons_fault_effects").fetchall()]

    assert sorted(effects()) == sorted(ids), "every effect was applied once before the crash"
    store: DedupStore = (
        RedisDedupStore(redis.Redis.from_url(redis_url), namespace=group)
        if store_kind == "redis"
        else PostgresDedupStore(pg_dsn, namespace=group)
    )
    handled: list[bytes] = []
    with IdempotentConsumer(
        config(kafka_bootstrap, group), [topic], lambda m: handled.append(m.value()), store=store
    ) as second:
        drive(second, lambda: second.stats.duplicates >= 10)
        assert second.stats.handled == 0
    assert handled == []
    assert sorted(effects()) == sorted(ids)
    assert committed(kafka_bootstrap, group, topic) == [10]


def test_a_crash_inside_the_handler_leaves_a_claim_that_expires_after_its_lease_then_another_worker_handles_it(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    redis_url: str,
    redis_client: Any,
    group: str,
) -> None:
    topic = unique_topic()
    produce(make_producer(), topic, [("before", b"v"), ("fatal", b"v"), ("after", b"v")])
    env = dict(os.environ, KCONS_KAFKA_BOOTSTRAP=kafka_bootstrap, KCONS_REDIS_URL=redis_url)
    worker = subprocess.run(
        [sys.executable, str(ROOT / "tests/fault/_consumer_worker.py"), "--group", group, "--topic", topic,
         "--store", "redis", "--lease", "10", "--batch-size", "10", "--kill-on-id", "fatal"],
        env=env, timeout=120, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert worker.returncode == -signal.SIGKILL, worker.stderr[-2000:]
    state, owner, deadline_ms = RedisDedupStore(redis_client, namespace=group).describe("fatal")
    assert state == "claimed" and owner and deadline_ms is not None, "claimed, not done"
    seconds, micros = redis_client.time()
    assert 0 < deadline_ms - (seconds * 1000 + micros // 1000) <= 10_000, "in progress under its lease"
    effects = redis_client.lrange(f"kcons-test-effects:{group}", 0, -1)
    assert [e.rpartition(b"|")[0] for e in effects] == [b"before"]  # the worker appends "<id>|<pid>"

    handled: list[str] = []
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=group)
    with IdempotentConsumer(
        config(kafka_bootstrap, group), [topic], lambda m: handled.append(dict(m.headers())["kcons-id"].decode()),
        store=store, lease_s=10, pause_s=0.5,
    ) as other:  # fmt: skip
        drive(other, lambda: "after" in handled)
        assert other.stats.deferred >= 1, "the message was busy (claimed by the dead worker) at first"
    # "before" was handled by the dead worker but its batch was never recorded done: at-least-once
    # effects for the non-transactional consumer, so it may run again; "fatal" runs exactly here.
    assert handled.count("fatal") == 1
    assert handled.index("fatal") < handled.index("after")
    assert committed(kafka_bootstrap, group, topic) == [3]


def test_poison_messages_reach_the_dead_letter_topic_with_reason_source_and_original_headers(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    make_consumer: Callable[..., Any],
    group: str,
) -> None:
    topic = unique_topic()
    dlq = unique_topic(prefix="dlq")
    producer = make_producer()
    produce(producer, topic, [("ok-1", b"fine"), ("bad", b"explodes")], headers=[("trace", b"t-1")])
    producer.produce(topic, value=b"undecodable", key=b"k", headers=[("kcons-id", b"\xff\xfe"), ("trace", b"t-2")])
    produce(producer, topic, [("ok-2", b"fine")])
    attempts: list[str] = []

    def handler(msg: Any) -> None:
        attempts.append(msg.value().decode())
        if msg.value() == b"explodes":
            raise ValueError("cannot apply explodes")

    policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none(), reraise=True)
    with IdempotentConsumer(
        config(kafka_bootstrap, group), [topic], handler, store=MemoryDedupStore(), dlq_topic=lambda _t: dlq,
        retry=policy,
    ) as consumer:  # fmt: skip
        drive(consumer, lambda: consumer.stats.handled + consumer.stats.dead_lettered >= 4)
        assert consumer.stats.dead_lettered == 2
    assert attempts.count("explodes") == 3
    assert "undecodable" not in attempts, "a message that cannot be decoded is not handled or retried"
    assert committed(kafka_bootstrap, group, topic) == [4]

    dead = read_all(make_consumer, dlq, 2)
    assert len(dead) == 2
    by_value = {m.value(): m for m in dead}
    exploded = dict(by_value[b"explodes"].headers())
    assert exploded[DLQ_SOURCE_HEADER] == f"{topic}/0/1".encode()
    assert exploded[DLQ_REASON_HEADER].startswith(b"ValueError: cannot apply explodes")
    assert exploded["trace"] == b"t-1" and exploded["kcons-id"] == b"bad"
    undecodable = dict(by_value[b"undecodable"].headers())
    assert undecodable[DLQ_SOURCE_HEADER] == f"{topic}/0/2".encode()
    assert undecodable[DLQ_REASON_HEADER].startswith(DecodeError.__name__.encode())
    assert undecodable["kcons-id"] == b"\xff\xfe" and undecodable["trace"] == b"t-2"
    assert by_value[b"explodes"].key() == b"k"


def test_a_poison_message_is_not_committed_when_its_dead_letter_write_fails(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_producer: Callable[..., Any], group: str
) -> None:
    topic = unique_topic()
    produce(make_producer(), topic, [("a", b"fine"), ("b", b"poison"), ("c", b"fine")])
    handled: list[bytes] = []

    def handler(msg: Any) -> None:
        if msg.value() == b"poison":
            raise ValueError("poison")
        handled.append(msg.value())

    with IdempotentConsumer(
        config(kafka_bootstrap, group), [topic], handler, store=MemoryDedupStore(),
        dlq_topic=lambda _t: "invalid topic name!", retry=tenacity.Retrying(stop=tenacity.stop_after_attempt(1)),
        dlq_producer_config={"message.timeout.ms": 3000}, pause_s=0.2,
    ) as consumer:  # fmt: skip
        drive(consumer, lambda: consumer.stats.deferred >= 2)
        assert consumer.stats.dead_lettered == 0
        assert committed(kafka_bootstrap, group, topic) == [1], "the offset stops at the poison message"
    assert handled.count(b"fine") == 2, "the message after it was handled once and is a duplicate on redelivery"


def test_a_rolled_back_handler_transaction_leaves_neither_the_effect_nor_the_dedup_record(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    make_consumer: Callable[..., Any],
    pg_dsn: str,
    group: str,
) -> None:
    topic = unique_topic()
    dlq = unique_topic(prefix="dlq")
    produce(make_producer(), topic, [("good", b"1"), ("rolls-back", b"2")])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE effects (event_id text NOT NULL)")
    store = PostgresDedupStore(pg_dsn, namespace=group)

    def handler(msg: Any, conn: Any) -> None:
        event_id = dict(msg.headers())["kcons-id"].decode()
        conn.execute("INSERT INTO effects VALUES (%s)", (event_id,))
        if event_id == "rolls-back":
            raise RuntimeError("constraint the handler discovers after writing")

    with TransactionalIdempotentConsumer(
        config(kafka_bootstrap, group), [topic], handler, store=store,
        connection=psycopg.connect(pg_dsn, autocommit=True), dlq_topic=lambda _t: dlq,
        retry=tenacity.Retrying(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none(), reraise=True),
    ) as consumer:  # fmt: skip
        drive(consumer, lambda: consumer.stats.handled + consumer.stats.dead_lettered >= 2)
        consumer.connection.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT event_id FROM effects").fetchall() == [("good",)]
        rows = dict(conn.execute("SELECT id, state FROM kcons_dedup WHERE namespace = %s", (group,)).fetchall())
    assert rows == {"good": 1}, "no dedup record for the rolled-back event, a done record for the committed one"
    assert len(read_all(make_consumer, dlq, 1)) == 1


def test_a_message_busy_in_another_worker_is_not_skipped_but_retried_after_the_claim_is_released(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    redis_url: str,
    group: str,
) -> None:
    topic = unique_topic()
    produce(make_producer(), topic, [("x", b"1"), ("y", b"2")])
    other_worker = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=group)
    assert other_worker.claim(["x"], lease_s=60) == {"x"}
    handled: list[bytes] = []
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=group)
    with IdempotentConsumer(
        config(kafka_bootstrap, group), [topic], lambda m: handled.append(m.value()), store=store, pause_s=0.2
    ) as consumer:
        drive(consumer, lambda: consumer.stats.deferred >= 2)
        assert handled == [], "nothing after the busy message in its partition runs before it"
        assert committed(kafka_bootstrap, group, topic) in ([0], [-1001])
        other_worker.release(["x"])
        drive(consumer, lambda: len(handled) == 2)
    assert handled == [b"1", b"2"]
    assert committed(kafka_bootstrap, group, topic) == [2]


def test_retry_later_pauses_the_partition_and_handles_the_message_once_afterwards(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_producer: Callable[..., Any], group: str
) -> None:
    topic = unique_topic(partitions=2)
    producer = make_producer()
    produce(producer, topic, [("p0-a", b"a"), ("p0-b", b"b")], partition=0)
    produce(producer, topic, [("p1-a", b"c")], partition=1)
    calls: list[bytes] = []
    refusals = iter([True, True])

    def handler(msg: Any) -> None:
        calls.append(msg.value())
        if msg.value() == b"a" and next(refusals, False):
            raise RetryLater(0.3, "downstream saturated")

    with IdempotentConsumer(config(kafka_bootstrap, group), [topic], handler, store=MemoryDedupStore()) as consumer:
        drive(consumer, lambda: consumer.stats.handled >= 3)
        assert consumer.paused_partitions == []
    assert calls.count(b"a") == 3 and calls.count(b"b") == 1 and calls.count(b"c") == 1
    assert calls.index(b"b") > max(i for i, v in enumerate(calls) if v == b"a"), "order within the partition kept"
    assert committed(kafka_bootstrap, group, topic, 2) == [2, 1]


@pytest.mark.parametrize(
    ("strategy", "store"), [("range", "memory"), ("cooperative-sticky", "memory"), ("cooperative-sticky", "redis")]
)
def test_a_partition_paused_by_back_pressure_when_revoked_is_read_again_when_assigned_back(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    redis_url: str,
    group: str,
    strategy: str,
    store: str,
) -> None:
    """librdkafka keeps a partition's pause across a rebalance: the consumer must resume it, or it stalls.

    With the Redis store the consumer claims ahead (the next batch is read while one is handled).
    """
    from confluent_kafka import Consumer

    topic = unique_topic(partitions=2)
    producer = make_producer()
    for p in (0, 1):
        produce(producer, topic, [(f"e-{p}-1", b"a"), (f"e-{p}-2", b"b")], partition=p)
    calls: dict[int, list[bytes]] = {0: [], 1: []}

    def handler(msg: Any) -> None:
        seen = calls[msg.partition()]
        seen.append(msg.value())
        if len(seen) == 1:
            raise RetryLater(600, "downstream saturated")  # held far beyond this test

    cfg = config(kafka_bootstrap, group, **{"partition.assignment.strategy": strategy})
    dedup: DedupStore = (
        MemoryDedupStore() if store == "memory" else RedisDedupStore(redis.Redis.from_url(redis_url), namespace=group)
    )
    with IdempotentConsumer(cfg, [topic], handler, store=dedup) as consumer:
        drive(consumer, lambda: consumer.paused_partitions == [(topic, 0), (topic, 1)])
        # A second member joins and takes a partition (revoked from the first consumer), then
        # leaves: the partition comes back to the first consumer, which must read it again.
        other = Consumer({**cfg, "enable.auto.commit": False})
        moved: list[int] = []
        other.subscribe([topic], on_assign=lambda _c, ps: moved.extend(tp.partition for tp in ps))
        try:
            deadline = time.monotonic() + 60
            while not moved:
                assert time.monotonic() < deadline, "the second member never got a partition"
                consumer.poll_once()
                other.poll(0.1)
        finally:
            other.close()  # it commits nothing: the messages wait for the first consumer
        assert len(moved) == 1
        back = moved[0]
        drive(consumer, lambda: len(calls[back]) == 3)
        assert (topic, back) not in consumer.paused_partitions
    assert calls[back] == [b"a", b"a", b"b"], "the held message first, then the next, each once"
    assert committed(kafka_bootstrap, group, topic, 2)[back] == 2


def test_a_partition_paused_by_back_pressure_when_lost_is_read_again_when_assigned_back(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    group: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A consumer that stopped polling past max.poll.interval.ms loses its held partition, rejoins, reads it again."""
    topic = unique_topic(partitions=1)
    produce(make_producer(), topic, [("e-1", b"a"), ("e-2", b"b")])
    calls: list[bytes] = []

    def handler(msg: Any) -> None:
        calls.append(msg.value())
        if len(calls) == 1:
            raise RetryLater(600, "downstream saturated")  # held far beyond this test

    cfg = config(kafka_bootstrap, group, **{"max.poll.interval.ms": 6000})
    with IdempotentConsumer(cfg, [topic], handler, store=MemoryDedupStore()) as consumer:
        drive(consumer, lambda: consumer.paused_partitions == [(topic, 0)])
        caplog.set_level(logging.INFO, logger="kcons.consumer.driver")
        time.sleep(8)  # past max.poll.interval.ms: the member leaves the group, its partition is lost
        drive(consumer, lambda: consumer.stats.handled >= 2)
        assert consumer.paused_partitions == []
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("lost ")] == [f"lost {topic}[0]"]
    assert calls[1:] == [b"a", b"b"], "the held message first, then the next, each once"
    assert committed(kafka_bootstrap, group, topic) == [2]


def test_two_consumers_in_one_group_handle_every_event_once_across_a_rebalance(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    redis_url: str,
    group: str,
) -> None:
    topic = unique_topic(partitions=4)
    producer = make_producer()
    for p in range(4):
        produce(producer, topic, [(f"e-{p}-{i}", b"v") for i in range(300)], partition=p)
        produce(producer, topic, [(f"e-{(p + 1) % 4}-{i}", b"resend") for i in range(0, 300, 10)], partition=p)
    handled: list[str] = []
    first = redis_consumer(kafka_bootstrap, redis_url, group, topic, handled, batch_size=50)
    drive(first, lambda: len(handled) >= 200)
    second = redis_consumer(kafka_bootstrap, redis_url, group, topic, handled, batch_size=50)
    try:
        deadline = time.monotonic() + 60
        while len(set(handled)) < 1200:
            assert time.monotonic() < deadline
            first.poll_once()
            second.poll_once()
        for _ in range(10):  # let any redelivered resends be seen
            first.poll_once()
            second.poll_once()
    finally:
        first.close()
        second.close()
    assert len(handled) == len(set(handled)) == 1200
    assert sum(committed(kafka_bootstrap, group, topic, 4)) == 4 * 330


@pytest.mark.parametrize("then", ["close", "revoke"])
def test_offsets_sent_by_the_first_idle_poll_are_settled_by_an_immediate_close_or_revocation(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    redis_url: str,
    group: str,
    then: str,
) -> None:
    topic = unique_topic(partitions=2)
    producer = make_producer()
    for p in range(2):
        produce(producer, topic, [(f"e-{p}-{i}", b"v") for i in range(50)], partition=p)
    handled: list[str] = []
    # A long commit interval: nothing is committed between batches, only the idle poll sends offsets.
    settings: dict[str, Any] = {"batch_size": 20, "commit_interval_s": 60.0}
    first = redis_consumer(kafka_bootstrap, redis_url, group, topic, handled, **settings)
    drive(first, lambda: len(handled) >= 100)
    while first.poll_once() != 0:  # the first empty poll sends the offsets without waiting for the broker
        pass
    if then == "revoke":
        second = redis_consumer(kafka_bootstrap, redis_url, group, topic, handled, **settings)
        deadline = time.monotonic() + 60
        while not second.kafka_consumer.assignment():  # the first consumer's revocation comes at once
            assert time.monotonic() < deadline
            first.poll_once()
            second.poll_once()
        for _ in range(10):
            first.poll_once()
            second.poll_once()
        second.close()
    first.close()
    assert len(handled) == len(set(handled)) == 100
    assert committed(kafka_bootstrap, group, topic, 2) == [50, 50]


@pytest.mark.parametrize("claim_ahead", [True, False])
def test_with_redis_ids_repeated_in_the_next_batches_are_handled_once_and_everything_is_committed(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    redis_url: str,
    group: str,
    claim_ahead: bool,
) -> None:
    topic = unique_topic(partitions=2)
    producer = make_producer()
    for p in range(2):  # every id again a few messages later, and on the other partition
        events = [(f"e-{p}-{i}", b"v") for i in range(400)]
        events = [e for i, e in enumerate(events) for e in ([e, (f"e-{p}-{i - 3}", b"resend")] if i >= 3 else [e])]
        events += [(f"e-{1 - p}-{i}", b"resend") for i in range(0, 400, 7)]
        produce(producer, topic, events, partition=p)
    sent = 2 * (400 + 397 + len(range(0, 400, 7)))
    handled: list[str] = []
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace=group)
    consumer = IdempotentConsumer(
        config(kafka_bootstrap, group),
        [topic],
        lambda m: handled.append(dict(m.headers())["kcons-id"].decode()),
        store=store,
        batch_size=16,
        claim_ahead=claim_ahead,
    )
    try:
        drive(consumer, lambda: consumer.stats.handled + consumer.stats.duplicates >= sent)
    finally:
        consumer.close()
    assert sorted(handled) == sorted(f"e-{p}-{i}" for p in range(2) for i in range(400))
    assert consumer.stats.duplicates == sent - 800
    assert committed(kafka_bootstrap, group, topic, 2) == [400 + 397 + 58, 400 + 397 + 58]
    assert store.claim_batch(handled, lease_s=30).done == set(handled)


def test_sigterm_stops_run_through_stop_on_signals_and_run_installs_no_handler_itself(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_producer: Callable[..., Any], group: str
) -> None:
    from kcons.cli.signals import stop_on_signals

    topic = unique_topic()
    producer = make_producer()
    produce(producer, topic, [(f"s{i}", b"v") for i in range(5)])
    seen: list[bytes] = []
    previous = signal.getsignal(signal.SIGTERM)
    handlers_in_run: list[Any] = []

    def handler(msg: Any) -> None:
        seen.append(msg.value())
        handlers_in_run.append(signal.getsignal(signal.SIGTERM))
        if len(seen) == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    consumer = IdempotentConsumer(config(kafka_bootstrap, group), [topic], handler, store=MemoryDedupStore())
    consumer.run(max_messages=5)
    assert len(handlers_in_run) == 5 and all(h is previous for h in handlers_in_run), "run() installs no handler"
    produce(producer, topic, [(f"s{i}", b"v") for i in range(5, 10)])
    with stop_on_signals(consumer):
        consumer.run(idle_timeout_s=60)
    consumer.close()
    assert len(seen) == 10
    assert signal.getsignal(signal.SIGTERM) is previous
    assert committed(kafka_bootstrap, group, topic) == [10]


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "effects.db")


def test_sqlite_transactional_consumer_commits_effect_and_dedup_record_together(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    sqlite_path: str,
    group: str,
) -> None:
    import sqlite3

    from kcons.adapters.sqlite import SqliteDedupStore

    topic = unique_topic()
    produce(make_producer(), topic, [("a", b"1"), ("b", b"2"), ("a", b"dup"), ("c", b"fails")])
    store = SqliteDedupStore(sqlite_path, namespace=group)
    conn = sqlite3.connect(sqlite_path, isolation_level=None)
    conn.execute("CREATE TABLE effects (event_id TEXT NOT NULL, value TEXT)")

    def handler(msg: Any, db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO effects VALUES (?, ?)", (dict(msg.headers())["kcons-id"].decode(), msg.value()))
        if msg.value() == b"fails":
            raise RuntimeError("rolled back")

    dlq = unique_topic(prefix="dlq")
    with TransactionalIdempotentConsumer(
        config(kafka_bootstrap, group), [topic], handler, store=store, connection=conn, dlq_topic=lambda _t: dlq,
        retry=tenacity.Retrying(stop=tenacity.stop_after_attempt(1), reraise=True),
    ) as consumer:  # fmt: skip
        drive(consumer, lambda: consumer.stats.handled + consumer.stats.duplicates + consumer.stats.dead_lettered >= 4)
    rows = sorted(conn.execute("SELECT event_id, value FROM effects").fetchall())
    assert rows == [("a", b"1"), ("b", b"2")]
    states = dict(conn.execute("SELECT id, state FROM kcons_dedup").fetchall())
    assert states == {"a": 1, "b": 1}
