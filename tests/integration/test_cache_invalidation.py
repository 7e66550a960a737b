"""Change events from Kafka invalidate a ConsistentCache over real Redis, with rows in real PostgreSQL."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis

from kcons.cache import (
    CacheEntry,
    CacheInvalidator,
    CacheSettings,
    ChangeEvent,
    ConsistentCache,
    Versioned,
)
from kcons.envelope import Envelope

pytestmark = pytest.mark.backends


class Invalidator:
    """Runs CacheInvalidator.run in a thread and keeps its exception."""

    def __init__(self, inv: CacheInvalidator, bootstrap: str, topic: str, group: str, **kw: Any) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        config = {"bootstrap.servers": bootstrap, "group.id": group}

        def body() -> None:
            try:
                inv.run(config, [topic], stop=self.stop, **kw)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def _item_key(event: ChangeEvent) -> list[str]:
    return [f"item:{event.aggregate_id}"]


def _wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def items_db(fresh_database: Callable[[], str]) -> Iterator[str]:
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, version bigint NOT NULL, name text NOT NULL)")
        conn.execute("INSERT INTO items VALUES (1, 1, 'v1')")
    yield dsn


def _load(dsn: str, item_id: int) -> Versioned | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT name, version FROM items WHERE id = %s", (item_id,)).fetchone()
    return None if row is None else Versioned(str(row[0]).encode(), int(row[1]))


def _update_and_publish(dsn: str, producer: Any, topic: str, item_id: int) -> int:
    """The writer: commit the new row version, then publish its change event with that version."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "UPDATE items SET version = version + 1, name = 'v' || (version + 1) WHERE id = %s RETURNING version",
            (item_id,),
        ).fetchone()
        assert row is not None
    version = int(row[0])
    env = Envelope.of("ItemUpdated", "item", str(item_id), {"version": version}, version=version)
    producer.produce(topic, key=env.key, value=env.payload, headers=env.headers())
    producer.flush(10)
    return version


@pytest.mark.parametrize("fill_first", [False, True], ids=["invalidation-before-fill", "fill-before-invalidation"])
def test_classic_race_ends_with_the_new_value_or_none_never_the_old(
    fill_first: bool, items_db: str, redis_client: Any, kafka_bootstrap: str, unique_topic: Any, make_producer: Any
) -> None:
    topic = unique_topic(partitions=2)
    cache = ConsistentCache(redis_client, name="race", settings=CacheSettings(prefix=f"r{uuid.uuid4().hex[:8]}"))
    inv = Invalidator(CacheInvalidator(cache, _item_key), kafka_bootstrap, topic, f"g-{uuid.uuid4().hex[:8]}")
    loaded, proceed = threading.Event(), threading.Event()
    seen: list[Versioned | None] = []

    def slow_loader(key: str) -> Versioned | None:
        row = _load(items_db, 1)  # reads the old row (version 1)
        loaded.set()
        proceed.wait(30)
        return row

    reader = threading.Thread(target=lambda: seen.append(cache.get("item:1", slow_loader)))
    try:
        reader.start()
        assert loaded.wait(30)
        if fill_first:
            proceed.set()
            reader.join(30)
            assert cache.peek("item:1") == CacheEntry(1, b"v1")
        version = _update_and_publish(items_db, make_producer(), topic, 1)
        _wait_for(lambda: (e := cache.peek("item:1")) is not None and e.version >= version)
        proceed.set()
        reader.join(30)
        assert seen == [Versioned(b"v1", 1)]  # the reader began before the commit: the old row is a valid answer
        entry = cache.peek("item:1")
        assert entry is not None and entry.version == version and entry.is_tombstone
        assert cache.get("item:1", lambda key: _load(items_db, 1)) == Versioned(b"v2", 2)
        assert cache.peek("item:1") == CacheEntry(2, b"v2")
        assert inv.error is None
    finally:
        proceed.set()
        inv.close()


def _debezium_update(item_id: int, version: int) -> tuple[bytes, bytes]:
    value = {
        "before": {"id": item_id, "version": version - 1, "name": f"v{version - 1}"},
        "after": {"id": item_id, "version": version, "name": f"v{version}"},
        "op": "u",
        "source": {"schema": "public", "table": "items", "ts_ms": int(time.time() * 1000), "lsn": version},
    }
    return json.dumps({"id": item_id}).encode(), json.dumps({"schema": {}, "payload": value}).encode()


@pytest.mark.parametrize("batched", [False, True], ids=["idempotent-consumer", "batched"])
def test_out_of_order_and_duplicated_events_never_move_a_key_backwards(
    batched: bool, redis_client: Any, kafka_bootstrap: str, unique_topic: Any, make_producer: Any
) -> None:
    topic = unique_topic(partitions=1)
    cache = ConsistentCache(redis_client, name="order", settings=CacheSettings(prefix=f"o{uuid.uuid4().hex[:8]}"))
    rng = random.Random(11)
    versions = list(range(1, 61)) + [rng.randrange(1, 61) for _ in range(40)]
    rng.shuffle(versions)
    producer = make_producer()
    for i, v in enumerate(versions):  # kcons envelopes and Debezium change events, mixed
        if i % 2:
            key, value = _debezium_update(9, v)
            producer.produce(topic, key=key, value=value)
        else:
            env = Envelope.of("ItemUpdated", "item", "9", {}, version=v)
            producer.produce(topic, key=env.key, value=env.payload, headers=env.headers())
    producer.flush(10)
    observed: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            entry = cache.peek("item:9")
            if entry is not None:
                observed.append(entry.version)

    sampler = threading.Thread(target=sample)
    sampler.start()
    inv = Invalidator(
        CacheInvalidator(cache, _item_key), kafka_bootstrap, topic, f"g-{uuid.uuid4().hex[:8]}", batched=batched
    )
    try:
        _wait_for(lambda: (e := cache.peek("item:9")) is not None and e.version == 60)
        time.sleep(0.5)  # let the rest of the topic (older versions and duplicates) arrive too
    finally:
        inv.close()
        done.set()
        sampler.join()
    assert inv.error is None
    assert observed and observed == sorted(observed)
    assert cache.peek("item:9") == CacheEntry(60, None)


@pytest.mark.parametrize("batched", [False, True], ids=["idempotent-consumer", "batched"])
def test_offsets_are_committed_only_after_redis_acknowledged(
    batched: bool, kafka_bootstrap: str, unique_topic: Any, make_producer: Any, make_consumer: Any
) -> None:
    from confluent_kafka import TopicPartition

    from kcons.testing.local import RedisServer, free_port

    topic = unique_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    env = Envelope.of("ItemUpdated", "item", "4", {}, version=7)
    producer = make_producer()
    producer.produce(topic, key=env.key, value=env.payload, headers=env.headers())
    producer.flush(10)

    port = free_port()  # Redis is down while the event arrives
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
    cache = ConsistentCache(client, name="down")
    counting = CountingInvalidator(cache, _item_key, retry_after_s=0.2)
    inv = Invalidator(counting, kafka_bootstrap, topic, group, batched=batched)
    probe = make_consumer(**{"group.id": group})
    try:
        _wait_for(lambda: counting.calls >= 3)  # consumed, failed against the dead Redis, rewound, retried
        assert probe.committed([TopicPartition(topic, 0)], timeout=10)[0].offset < 0
        with RedisServer(port=port):
            _wait_for(lambda: cache.peek("item:4") == CacheEntry(7, None))
            _wait_for(lambda: probe.committed([TopicPartition(topic, 0)], timeout=10)[0].offset == 1)
    finally:
        inv.close()
        client.close()
    assert inv.error is None


class CountingInvalidator(CacheInvalidator):
    """Counts apply attempts, to see that an event is retried while Redis is down."""

    calls = 0

    def apply_events(self, events: Any) -> Any:
        self.calls += 1
        return super().apply_events(events)


@pytest.mark.parametrize("batched", [False, True], ids=["idempotent-consumer", "batched"])
def test_a_malformed_change_event_is_dead_lettered_and_the_rest_applied(
    batched: bool, redis_client: Any, kafka_bootstrap: str, unique_topic: Any, make_producer: Any, make_consumer: Any
) -> None:
    topic = unique_topic(partitions=1)
    unique_topic_name = f"{topic}.dlq"
    from confluent_kafka.admin import AdminClient

    from kcons.testing.plugin import create_topic

    create_topic(AdminClient({"bootstrap.servers": kafka_bootstrap}), unique_topic_name, 1)
    cache = ConsistentCache(redis_client, name="poison", settings=CacheSettings(prefix=f"p{uuid.uuid4().hex[:8]}"))
    producer = make_producer()
    bad = Envelope.of("ItemUpdated", "item", "5", {})  # no version: cannot be applied safely
    producer.produce(topic, key=bad.key, value=bad.payload, headers=bad.headers())
    producer.produce(topic, key=b"x", value=b"not a change event")
    good = Envelope.of("ItemUpdated", "item", "5", {}, version=3)
    producer.produce(topic, key=good.key, value=good.payload, headers=good.headers())
    producer.flush(10)
    inv = Invalidator(
        CacheInvalidator(cache, _item_key), kafka_bootstrap, topic, f"g-{uuid.uuid4().hex[:8]}", batched=batched
    )
    try:
        _wait_for(lambda: cache.peek("item:5") == CacheEntry(3, None))
    finally:
        inv.close()
    assert inv.error is None
    dlq = make_consumer()
    dlq.subscribe([unique_topic_name])
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        msg = dlq.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append(msg)
    assert [m.value() for m in got] == [bad.payload, b"not a change event"]
    reasons = [dict(m.headers())["kcons-dlq-reason"] for m in got]
    assert all(b"DecodeError" in r or b"version" in r for r in reasons), reasons


def test_write_through_after_commit_never_moves_a_key_back_under_concurrent_writers(
    items_db: str, redis_client: Any
) -> None:
    cache = ConsistentCache(redis_client, name="wt", settings=CacheSettings(prefix=f"w{uuid.uuid4().hex[:8]}"))
    assert cache.get("item:1", lambda key: _load(items_db, 1)) is not None  # write-through needs the key's history
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            barrier.wait()
            with psycopg.connect(items_db) as conn:
                for _ in range(30):
                    with conn.transaction():
                        row = conn.execute(
                            "UPDATE items SET version = version + 1, name = 'v' || (version + 1) WHERE id = 1 "
                            "RETURNING version, name"
                        ).fetchone()
                    assert row is not None
                    time.sleep(random.random() * 0.002)  # commits and cache writes interleave across writers
                    cache.write_through("item:1", str(row[1]).encode(), int(row[0]), committed_at=time.time())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = _load(items_db, 1)
    assert final is not None and final.version == 1 + 6 * 30
    assert cache.peek("item:1") == CacheEntry(final.version, final.value)


def test_write_behind_puts_the_newest_value_from_the_outbox_events_into_the_cache(
    redis_client: Any, kafka_bootstrap: str, unique_topic: Any, make_producer: Any
) -> None:
    from kcons.cache import Strategy

    topic = unique_topic(partitions=1)
    cache = ConsistentCache(redis_client, name="wb", settings=CacheSettings(prefix=f"b{uuid.uuid4().hex[:8]}"))
    producer = make_producer()
    # a filled key: its history covers the events below (a key without history gets tombstones)
    assert cache.get("item:8", lambda key: Versioned(b"v0", 0)) == Versioned(b"v0", 0)
    for v in [1, 2, 4, 3, 4, 2]:  # a replayed and reordered stream
        env = Envelope.of("ItemUpdated", "item", "8", {"name": f"v{v}"}, version=v)
        producer.produce(topic, key=env.key, value=env.payload, headers=env.headers())
    gone = Envelope.of("ItemDeleted", "item", "9", {}, version=5)
    producer.produce(topic, key=gone.key, value=gone.payload, headers=gone.headers())
    producer.flush(10)
    cache.write_through("item:9", b"old", 4)

    def name_of(event: ChangeEvent) -> bytes | None:
        if event.op == "ItemDeleted":
            return None  # no value: a tombstone
        return str(json.loads(event.value or b"{}")["name"]).encode()

    inv = Invalidator(
        CacheInvalidator(cache, _item_key, strategy=Strategy.WRITE_BEHIND, value_for=name_of),
        kafka_bootstrap, topic, f"g-{uuid.uuid4().hex[:8]}", batched=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: cache.peek("item:9") == CacheEntry(5, None))
    finally:
        inv.close()
    assert inv.error is None
    assert cache.peek("item:8") == CacheEntry(4, b"v4")
    assert cache.get("item:8", lambda key: None) == Versioned(b"v4", 4)  # a hit: no load
