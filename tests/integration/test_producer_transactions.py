"""Transactional and idempotent producers against a real broker."""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer

from kcons.envelope import HEADER_ID, Envelope, read_envelope
from kcons.errors import (
    AbortableTransactionError,
    ConfigError,
    KafkaOperationError,
    ProducerFencedError,
    TimeoutExceededError,
)
from kcons.kafka import futures
from kcons.kafka.futures import DeliveryFuture
from kcons.kafka.producer import IdempotentProducer, TransactionalProducer, wrap

pytestmark = [pytest.mark.integration, pytest.mark.backends]


def read_all(
    make_consumer: Callable[..., Any], topic: str, isolation: str, expect: int, idle_s: float = 3.0
) -> list[Any]:
    """Read a topic from the start until ``expect`` records arrived and nothing more came for ``idle_s``."""
    consumer = make_consumer(**{"isolation.level": isolation})
    consumer.subscribe([topic])
    out: list[Any] = []
    last = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None:
            if len(out) >= expect and time.monotonic() - last > idle_s:
                break
            continue
        if msg.error():
            continue
        out.append(msg)
        last = time.monotonic()
    consumer.close()
    return out


def txn_producer(bootstrap: str, tid: str | None = None, **extra: Any) -> TransactionalProducer:
    return TransactionalProducer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, **extra}, transactional_id=tid or f"tx-{uuid.uuid4().hex}"
    )


def test_aborted_transaction_is_invisible_to_read_committed_and_visible_to_read_uncommitted(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=2)
    producer = txn_producer(kafka_bootstrap)
    with producer.transaction():
        for i in range(5):
            producer.produce(topic, f"committed-{i}", key=str(i))
    with pytest.raises(RuntimeError, match="unit of work failed"), producer.transaction():
        for i in range(5):
            producer.produce(topic, f"aborted-{i}", key=str(i))
        producer.flush()  # the aborted records reach the log, so read_uncommitted can see them
        raise RuntimeError("unit of work failed")
    producer.close()

    committed = sorted(m.value().decode() for m in read_all(make_consumer, topic, "read_committed", 5))
    uncommitted = sorted(m.value().decode() for m in read_all(make_consumer, topic, "read_uncommitted", 10))
    assert committed == [f"committed-{i}" for i in range(5)]
    assert uncommitted == sorted([f"committed-{i}" for i in range(5)] + [f"aborted-{i}" for i in range(5)])


def test_second_producer_with_the_same_transactional_id_fences_the_first(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic()
    tid = f"tx-{uuid.uuid4().hex}"
    first = txn_producer(kafka_bootstrap, tid)
    with first.transaction():
        first.produce(topic, b"from-first")
    second = txn_producer(kafka_bootstrap, tid)
    zombie_future = None
    with pytest.raises(ProducerFencedError), first.transaction():
        zombie_future = first.produce(topic, b"from-zombie")
    assert first.closed
    assert zombie_future is not None and zombie_future.exception(timeout=5) is not None
    with second.transaction():
        second.produce(topic, b"from-second")
    second.close()
    values = sorted(m.value() for m in read_all(make_consumer, topic, "read_committed", 2))
    assert values == [b"from-first", b"from-second"]


def test_commit_resolves_every_future_and_each_event_carries_its_envelope_headers(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=3)
    producer = txn_producer(kafka_bootstrap)
    events = [Envelope.of("OrderPlaced", "order", str(i), {"n": i}, version=i) for i in range(20)]
    with producer.transaction():
        futures = [producer.send(topic, e) for e in events]
        plain = producer.produce(topic, b"raw value", key=b"k")
    assert all(f.done() and f.exception() is None for f in [*futures, plain])
    producer.close()

    got = read_all(make_consumer, topic, "read_committed", 21)
    assert len(got) == 21
    decoded = [read_envelope(m.key(), m.value(), m.headers(), topic=topic) for m in got]
    ids = {e.id for e in decoded if e is not None}
    assert len(ids) == 21  # every record has a distinct kcons-id, the raw one included
    by_id = {e.id: e for e in decoded if e is not None}
    for sent in events:
        received = by_id[sent.id]
        assert received.aggregate_id == sent.aggregate_id and received.version == sent.version
        assert received.payload == sent.payload and received.type == "OrderPlaced"


def test_run_in_transaction_aborts_a_failed_delivery_and_reruns_the_whole_unit(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    small = unique_topic(config={"max.message.bytes": "100000"})
    out = unique_topic()
    producer = txn_producer(kafka_bootstrap)
    attempts: list[int] = []

    def work(p: TransactionalProducer) -> int:
        attempts.append(len(attempts))
        p.produce(out, f"attempt-{len(attempts)}")
        # The first attempt writes a record the topic refuses: the delivery fails, so the commit must abort.
        p.produce(small, b"x" * (300_000 if len(attempts) == 1 else 10))
        return len(attempts)

    # librdkafka may need one more aborted attempt to bump the epoch after the refused record.
    runs = producer.run_in_transaction(work, attempts=5)
    assert runs >= 2
    producer.close()
    assert [m.value() for m in read_all(make_consumer, out, "read_committed", 1)] == [f"attempt-{runs}".encode()]
    assert [len(m.value()) for m in read_all(make_consumer, small, "read_committed", 1)] == [10]


def test_run_in_transaction_gives_up_after_its_attempts(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    small = unique_topic(config={"max.message.bytes": "100000"})
    producer = txn_producer(kafka_bootstrap)
    calls = []

    def always_too_big(p: TransactionalProducer) -> None:
        calls.append(1)
        p.produce(small, b"x" * 300_000)

    with pytest.raises(AbortableTransactionError):
        producer.run_in_transaction(always_too_big, attempts=2)
    assert len(calls) == 2
    # The producer stays usable (librdkafka may spend one more aborted attempt on an epoch bump).
    producer.run_in_transaction(lambda p: p.produce(small, b"ok"), attempts=3)
    producer.close()
    assert [m.value() for m in read_all(make_consumer, small, "read_uncommitted", 1)] == [b"ok"]


def test_wrap_detects_whether_an_existing_producer_is_transactional(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic()
    raw_txn = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{uuid.uuid4().hex}"})
    raw_idem = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    wrapped_txn = wrap(raw_txn)
    wrapped_idem = wrap(raw_idem)
    assert isinstance(wrapped_txn, TransactionalProducer) and wrapped_txn.raw is raw_txn
    assert type(wrapped_idem) is IdempotentProducer and wrapped_idem.raw is raw_idem
    with wrapped_txn.transaction():
        wrapped_txn.produce(topic, b"txn")
    fut = wrapped_idem.produce(topic, b"idem")
    wrapped_idem.flush()
    assert fut.result(0).topic() == topic
    wrapped_txn.close()
    wrapped_idem.close()
    got = read_all(make_consumer, topic, "read_committed", 2)
    assert sorted(m.value() for m in got) == [b"idem", b"txn"]
    assert all(HEADER_ID in dict(m.headers()) for m in got)


def test_init_against_an_unreachable_cluster_fails_within_its_bound() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutExceededError):
        TransactionalProducer(
            {"bootstrap.servers": "127.0.0.1:1", "transactional.id": "tx-unreachable"},
            init_timeout_s=1.0,
            retry_attempts=2,
        )
    assert time.monotonic() - start < 30  # bounded, not a timing claim about speed


def test_flush_against_an_unreachable_cluster_raises_instead_of_hanging() -> None:
    producer = IdempotentProducer({"bootstrap.servers": "127.0.0.1:1"}, flush_timeout_s=0.5)
    fut = producer.produce("nowhere", b"v")
    with pytest.raises(TimeoutExceededError):
        producer.flush()
    producer.close(0.1)
    assert fut.exception(timeout=5) is not None


def test_wrapping_a_producer_without_transactional_id_as_transactional_is_rejected(kafka_bootstrap: str) -> None:
    raw = Producer({"bootstrap.servers": kafka_bootstrap})
    with pytest.raises(ConfigError) as info:
        TransactionalProducer(raw)
    assert info.value.setting == "transactional.id"


def test_enqueued_records_commit_together_and_a_refused_one_fails_the_commit(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=2, config={"max.message.bytes": "100000"})
    producer = txn_producer(kafka_bootstrap)
    with pytest.raises(KafkaOperationError):
        producer.enqueue(topic, b"outside a transaction")
    with producer.transaction():
        for i in range(100):
            producer.enqueue(topic, f"bulk-{i}", key=str(i))
    # No futures and no callbacks: the refused record must still fail (and abort) the whole transaction.
    with pytest.raises(AbortableTransactionError), producer.transaction():
        producer.enqueue(topic, b"lost-with-its-transaction")
        producer.enqueue(topic, b"x" * 300_000)
    producer.close()
    values = [m.value() for m in read_all(make_consumer, topic, "read_committed", 100)]
    assert sorted(values) == sorted(f"bulk-{i}".encode() for i in range(100))
    assert all(HEADER_ID in dict(m.headers()) for m in read_all(make_consumer, topic, "read_committed", 100))


def test_commits_aborts_and_produced_messages_are_counted_in_metrics(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    topic = unique_topic()
    before = (
        value("kcons_transactions_committed_total"),
        value("kcons_transactions_aborted_total", reason="exception"),
        value("kcons_messages_produced_total"),
        value("kcons_transaction_duration_seconds_count", outcome="committed"),
    )
    producer = txn_producer(kafka_bootstrap)
    with producer.transaction():
        producer.produce(topic, b"a")
        producer.enqueue(topic, b"b")
    with pytest.raises(ValueError), producer.transaction():
        producer.produce(topic, b"c")
        raise ValueError("abort me")
    producer.close()
    after = (
        value("kcons_transactions_committed_total"),
        value("kcons_transactions_aborted_total", reason="exception"),
        value("kcons_messages_produced_total"),
        value("kcons_transaction_duration_seconds_count", outcome="committed"),
    )
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == 1
    assert after[2] - before[2] >= 2  # the aborted record may also have been acknowledged before the abort
    assert after[3] - before[3] == 1


def test_idempotent_producer_resolves_futures_and_calls_the_configured_delivery_callback(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=3)
    from_config: list[Any] = []
    per_message: list[Any] = []
    producer = wrap(
        {"bootstrap.servers": kafka_bootstrap, "acks": "-1", "on_delivery": lambda err, msg: from_config.append(err)}
    )
    assert type(producer) is IdempotentProducer
    futures = [producer.produce(topic, f"v{i}", key=f"k{i % 5}") for i in range(50)]
    special = producer.produce(topic, b"special", on_delivery=lambda err, msg: per_message.append(err))
    producer.flush()
    producer.close()
    offsets = {(f.result(0).partition(), f.result(0).offset()) for f in [*futures, special]}
    assert len(offsets) == 51  # every future resolved to its own log position
    assert from_config == [None] * 50 and per_message == [None]
    got = read_all(make_consumer, topic, "read_uncommitted", 51)
    assert len(got) == 51 and len({dict(m.headers())[HEADER_ID] for m in got}) == 51


def _live_futures() -> int:
    gc.collect()
    if futures.speedups is not None:  # the C futures the collector does not track are not in gc.get_objects()
        return int(futures.speedups.live_futures())
    return sum(1 for o in gc.get_objects() if isinstance(o, DeliveryFuture))


def test_futures_nobody_keeps_are_freed_once_delivered_and_a_kept_one_holds_the_produced_value(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=3)
    payload = b"p" * 1024
    txn = txn_producer(kafka_bootstrap)
    idem = IdempotentProducer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    before = _live_futures()
    with txn.transaction():
        for i in range(3000):
            txn.produce(topic, payload, key=b"%d" % (i % 10))  # fire and forget
        kept = txn.produce(topic, payload)
    for i in range(3000):
        idem.produce(topic, payload, key=b"%d" % (i % 10))
    idem.flush()
    assert not txn._tracker.pending and not idem._tracker.pending
    assert _live_futures() - before == 1, "only the future kept by the caller is alive"
    msg = kept.result(0)
    assert msg.topic() == topic and msg.offset() >= 0 and msg.value() is payload, "the produced bytes, not a copy"
    with pytest.raises(RuntimeError), txn.transaction():
        for _ in range(500):
            txn.produce(topic, payload)
        raise RuntimeError("abort")
    assert not txn._tracker.pending and _live_futures() - before == 1, "aborted futures are released too"
    txn.close()
    idem.close()


@pytest.mark.parametrize("timestamp_type", ["CreateTime", "LogAppendTime"])
def test_a_futures_message_matches_what_a_consumer_reads_back(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any], timestamp_type: str
) -> None:
    topic = unique_topic(partitions=3, config={"message.timestamp.type": timestamp_type})
    txn = txn_producer(kafka_bootstrap)
    plain = IdempotentProducer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5}, event_ids=False)
    payload = b"p" * 100
    with txn.transaction():
        futures = [
            txn.produce(topic, payload, b"bytes-key"),  # the id header alone
            txn.produce(topic, "text value", "text key", headers=[("a", "é"), ("b", b"\x00\x01"), ("c", None)]),
            txn.produce(topic, None, b"tombstone", headers={"d": b"dict header"}),
            txn.produce(topic, payload, b"k", headers=[(HEADER_ID, b"caller-id")], partition=2),
            txn.produce(topic, payload, b"cb", on_delivery=lambda err, msg: None),
        ]
    futures.append(plain.produce(topic, b"no headers at all", b"plain"))
    plain.flush()
    got = {(m.partition(), m.offset()): m for m in read_all(make_consumer, topic, "read_committed", len(futures))}
    assert len(got) == len(futures)
    for fut in futures:
        msg = fut.result(0)
        assert msg is fut.result(0), "the same Message on every call"
        read = got[(msg.partition(), msg.offset())]
        assert msg.topic() == read.topic() == topic and msg.error() is None
        assert (msg.key(), msg.value(), msg.headers()) == (read.key(), read.value(), read.headers())
        assert msg.timestamp() == read.timestamp()
    assert futures[0].result(0).value() is payload, "the produced bytes, not a copy"
    assert futures[3].result(0).partition() == 2
    assert {futures[0].result(0).timestamp()[0]} == {1 if timestamp_type == "CreateTime" else 2}
    txn.close()
    plain.close()
