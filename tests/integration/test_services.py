"""The harness gives real Kafka, Redis and PostgreSQL servers that behave as in production."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis
from confluent_kafka import TopicPartition

from kcons.envelope import Envelope, read_envelope

pytestmark = pytest.mark.backends


def _consume(consumer: Any, want: int, timeout: float = 30.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.5):
            assert msg.error() is None, msg.error()
            got.append(msg)
    return got


def _produce(producer: Any, topic: str, envs: list[Envelope]) -> None:
    errors: list[Any] = []
    for env in envs:
        producer.produce(
            topic,
            env.payload,
            key=env.key,
            headers=env.headers(),
            on_delivery=lambda e, m: errors.append(e) if e else None,
        )
    assert producer.flush(30) == 0
    assert errors == []


def test_idempotent_producer_round_trip_and_group_commit_resume(
    make_producer: Callable[..., Any], make_consumer: Callable[..., Any], unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=3)
    producer = make_producer(**{"enable.idempotence": True, "acks": "all"})
    first = [Envelope.of("e", "agg", f"a{i % 5}", {"i": i}, version=i) for i in range(300)]
    _produce(producer, topic, first)

    group = f"g-{uuid.uuid4().hex[:8]}"
    c1 = make_consumer(**{"group.id": group})
    c1.subscribe([topic])
    got = _consume(c1, len(first))
    ids = [read_envelope(m.key(), m.value(), m.headers()).id for m in got]  # type: ignore[union-attr]
    assert sorted(ids) == sorted(e.id for e in first)
    c1.commit(asynchronous=False)
    committed = c1.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    assert sum(tp.offset for tp in committed) == len(first)
    c1.close()

    second = [Envelope.of("e", "agg", f"a{i % 5}", {"i": i}) for i in range(50)]
    _produce(producer, topic, second)
    c2 = make_consumer(**{"group.id": group})
    c2.subscribe([topic])
    resumed = _consume(c2, len(second))
    time.sleep(1.0)
    resumed += c2.consume(500, 0.5)
    assert sorted(m.headers()[0][1].decode() for m in resumed) == sorted(e.id for e in second)


def test_one_aggregate_keeps_its_order_in_one_partition(
    make_producer: Callable[..., Any], make_consumer: Callable[..., Any], unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=4)
    producer = make_producer(**{"enable.idempotence": True, "acks": "all"})
    envs = [Envelope.of("e", "agg", "same-aggregate", b"x", version=v) for v in range(200)]
    _produce(producer, topic, envs)
    consumer = make_consumer()
    consumer.subscribe([topic])
    got = _consume(consumer, len(envs))
    assert len({m.partition() for m in got}) == 1
    versions = [read_envelope(m.key(), m.value(), m.headers()).version for m in got]  # type: ignore[union-attr]
    assert versions == list(range(200))


def test_redis_set_get(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"kcons:test:{uuid.uuid4().hex}"
    assert client.set(key, b"value", ex=30)
    assert client.get(key) == b"value"
    assert 0 < client.ttl(key) <= 30
    client.close()


def test_postgres_query_and_rollback(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE t (id int primary key)")
        conn.commit()
        conn.execute("INSERT INTO t VALUES (1)")
        conn.rollback()
        conn.execute("INSERT INTO t VALUES (2)")
        conn.commit()
        assert conn.execute("SELECT array_agg(id) FROM t").fetchone() == ([2],)
        assert conn.execute("SELECT current_setting('listen_addresses')").fetchone() in (("127.0.0.1",), ("*",))


def test_short_fixture_names_are_aliases_of_the_kcons_fixtures(
    kafka_bootstrap: str, kcons_kafka_bootstrap: str, redis_url: str, kcons_redis_url: str,
    postgres_dsn: str, kcons_postgres_dsn: str,
) -> None:  # fmt: skip
    assert (kafka_bootstrap, redis_url, postgres_dsn) == (kcons_kafka_bootstrap, kcons_redis_url, kcons_postgres_dsn)


def test_a_suites_own_redis_url_fixture_does_not_change_what_kcons_fixtures_use(
    tmp_path: Any, kcons_redis_url: str
) -> None:
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef redis_url():\n    return 'the-suites-own-value'\n"
    )
    (tmp_path / "test_user.py").write_text(
        "def test_both(redis_url, redis_client):\n"
        "    assert redis_url == 'the-suites-own-value'\n"
        "    assert redis_client.ping()\n"
    )
    env = {**os.environ, "KCONS_REDIS_URL": kcons_redis_url}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout
