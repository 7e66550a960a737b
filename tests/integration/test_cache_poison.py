"""Poison never stops the cache invalidator: a record that cannot be decoded or applied goes to
``<topic>.dlq`` with its reason, the rest of its batch is applied, and the invalidator keeps running."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from test_cache_invalidation import Invalidator, _wait_for  # the same harness: run() in a thread

from kcons.cache import CacheEntry, CacheInvalidator, CacheSettings, ChangeEvent, ConsistentCache
from kcons.envelope import Envelope


def _group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def _item_key(event: ChangeEvent) -> list[str]:
    if event.aggregate_id == "unmappable":
        raise ValueError("no cache key for this aggregate")
    return [f"item:{event.aggregate_id}"]


def _kcons(producer: Any, topic: str, item: str, version: int) -> None:
    env = Envelope.of("ItemUpdated", "item", item, {}, version=version)
    producer.produce(topic, key=env.key, value=env.payload, headers=env.headers())


def _negative_version(producer: Any, topic: str, item: str) -> bytes:
    env = Envelope.of("ItemUpdated", "item", item, {"poison": True}, version=1)
    headers = [(k, b"-1" if k == "kcons-version" else v) for k, v in env.headers()]
    producer.produce(topic, key=env.key, value=env.payload, headers=headers)
    return env.payload


def _debezium(op_fields: dict[str, Any], wrap_extra: bool = False) -> bytes:
    doc: dict[str, Any] = {
        "before": {"id": 8, "version": 1},
        "after": {"id": 8, "version": 2},
        "source": {"schema": "public", "table": "items", "ts_ms": 1, "lsn": 5},
    }
    doc.update(op_fields)
    if wrap_extra:
        return json.dumps({"schema": {}, "payload": doc, "extra": 1}).encode()
    return json.dumps(doc).encode()


def _dead_letters(make_consumer: Any, topic: str, count: int) -> list[Any]:
    dlq = make_consumer()
    dlq.subscribe([f"{topic}.dlq"])
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < count and time.monotonic() < deadline:
        msg = dlq.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append(msg)
    return got


@pytest.fixture
def dlq_topic(kafka_bootstrap: str, unique_topic: Any) -> str:
    from confluent_kafka.admin import AdminClient

    from kcons.testing.plugin import create_topic

    topic = unique_topic(partitions=1)
    create_topic(AdminClient({"bootstrap.servers": kafka_bootstrap}), f"{topic}.dlq", 1)
    return topic


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "idempotent-consumer"])
def test_poison_version_is_dead_lettered_the_rest_of_its_batch_applied_and_the_invalidator_keeps_running(
    batched: bool, dlq_topic: str, redis_client: Any, kafka_bootstrap: str, make_producer: Any, make_consumer: Any
) -> None:
    topic = dlq_topic
    cache = ConsistentCache(redis_client, name="poison", settings=CacheSettings(prefix=f"p{uuid.uuid4().hex[:8]}"))
    producer = make_producer()
    for item in range(5):  # good events on both sides of the poison one, all in one batch
        _kcons(producer, topic, str(item), 10 + item)
    poison = _negative_version(producer, topic, "99")
    for item in range(5, 10):
        _kcons(producer, topic, str(item), 10 + item)
    producer.flush(10)
    inv = Invalidator(CacheInvalidator(cache, _item_key), kafka_bootstrap, topic, _group(), batched=batched)
    try:
        _wait_for(lambda: all(cache.peek(f"item:{i}") == CacheEntry(10 + i, None) for i in range(10)))
        got = _dead_letters(make_consumer, topic, 1)
        assert inv.thread.is_alive() and inv.error is None
        _kcons(producer, topic, "later", 3)  # a later event is still applied
        producer.flush(10)
        _wait_for(lambda: cache.peek("item:later") == CacheEntry(3, None))
    finally:
        inv.close()
    assert inv.error is None, inv.error
    assert cache.peek("item:99") is None
    assert [m.value() for m in got] == [poison]
    headers = dict(got[0].headers())
    assert b"negative version" in headers["kcons-dlq-reason"]
    assert headers["kcons-id"]  # the original headers are kept


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "idempotent-consumer"])
def test_debezium_events_without_a_valid_op_or_with_a_bad_wrapper_are_dead_lettered_not_skipped(
    batched: bool, dlq_topic: str, redis_client: Any, kafka_bootstrap: str, make_producer: Any, make_consumer: Any
) -> None:
    topic = dlq_topic
    cache = ConsistentCache(redis_client, name="dbz", settings=CacheSettings(prefix=f"d{uuid.uuid4().hex[:8]}"))
    producer = make_producer()
    bad = [
        _debezium({"op": None}),
        _debezium({"op": 3}),
        _debezium({}),
        _debezium({"op": "u"}, wrap_extra=True),
    ]
    for value in bad:
        producer.produce(topic, key=b'{"id":8}', value=value)
    unmappable = Envelope.of("ItemUpdated", "item", "unmappable", {}, version=4)  # keys_for raises
    producer.produce(topic, key=unmappable.key, value=unmappable.payload, headers=unmappable.headers())
    _kcons(producer, topic, "1", 7)
    producer.produce(topic, key=b'{"id":8}', value=_debezium({"op": "u"}))
    producer.flush(10)
    inv = Invalidator(CacheInvalidator(cache, _item_key), kafka_bootstrap, topic, _group(), batched=batched)
    try:
        _wait_for(lambda: cache.peek("item:1") == CacheEntry(7, None) and cache.peek("item:8") == CacheEntry(2, None))
        got = _dead_letters(make_consumer, topic, 5)
        assert inv.thread.is_alive()
    finally:
        inv.close()
    assert inv.error is None, inv.error
    assert [m.value() for m in got] == [*bad, unmappable.payload]
    reasons = [dict(m.headers())["kcons-dlq-reason"].decode() for m in got]
    assert all("op" in r for r in reasons[:3]), reasons
    assert "other keys" in reasons[3] and "no cache key" in reasons[4], reasons
