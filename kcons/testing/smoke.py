"""A produce/consume round trip through the stack named by ``KCONS_*``: the dev stack's check."""

from __future__ import annotations

import time
import uuid
from typing import Any

from kcons.config import Settings
from kcons.envelope import Envelope, read_envelope
from kcons.errors import ConfigError, DeliveryError, TimeoutExceededError

__all__ = ["run_smoke"]


def run_smoke(messages: int = 1000, timeout_s: float = 60.0) -> dict[str, Any]:
    """Produce ``messages`` events idempotently, consume and commit them, touch Redis and PostgreSQL.

    Returns a report with ``ok`` true only when every event came back exactly once and the
    group's committed offset equals the number produced.
    """
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from kcons.kafka.client import with_logger

    settings = Settings.from_env()
    if settings.kafka is None or settings.redis is None or settings.postgres is None:
        named = (
            ("KCONS_KAFKA_BOOTSTRAP", settings.kafka),
            ("KCONS_REDIS_URL", settings.redis),
            ("KCONS_POSTGRES_DSN", settings.postgres),
        )
        missing = [name for name, value in named if value is None]
        raise ConfigError(missing[0], 'is not set: run `kcons dev up` and `eval "$(kcons dev env)"`')
    report: dict[str, Any] = {"messages": messages}
    topic = f"kcons-smoke-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(with_logger(settings.kafka.client_config()))
    admin.create_topics([NewTopic(topic, num_partitions=3)])[topic].result(timeout=30)

    t0 = time.monotonic()
    producer = Producer(with_logger(settings.kafka.client_config(**{"enable.idempotence": True, "acks": "all"})))
    sent: set[str] = set()
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    for i in range(messages):
        env = Envelope.of("smoke.ping", "smoke", f"agg-{i % 17}", {"n": i}, version=i)
        sent.add(env.id)
        producer.produce(topic, env.payload, key=env.key, headers=env.headers(), on_delivery=on_delivery)
        producer.poll(0)
    if producer.flush(timeout_s) > 0:
        raise TimeoutExceededError(f"{topic}: messages still undelivered after {timeout_s}s")
    if failures:
        raise DeliveryError(f"{len(failures)} deliveries failed, first: {failures[0]}")
    report["produce_s"] = round(time.monotonic() - t0, 3)

    t1 = time.monotonic()
    group = f"kcons-smoke-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(with_logger(settings.kafka.client_config(**{
        "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })))  # fmt: skip
    consumer.subscribe([topic])
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < messages and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error():
                    continue
                env_in = read_envelope(msg.key(), msg.value(), msg.headers())
                if env_in is not None:
                    seen.append(env_in.id)
            consumer.commit(asynchronous=False) if seen else None
        committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    finally:
        consumer.close()
    report["consume_s"] = round(time.monotonic() - t1, 3)
    report["received"] = len(seen)
    report["duplicates"] = len(seen) - len(set(seen))
    report["lost"] = len(sent - set(seen))
    report["committed"] = sum(max(tp.offset, 0) for tp in committed)

    import psycopg
    import redis

    r = redis.Redis.from_url(settings.redis.url, socket_timeout=settings.redis.socket_timeout_s)
    key = f"kcons:smoke:{uuid.uuid4().hex}"
    r.set(key, b"ok", ex=60)
    report["redis"] = r.get(key) == b"ok"
    r.close()
    with psycopg.connect(settings.postgres.dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT 41 + 1").fetchone()
    report["postgres"] = row is not None and row[0] == 42
    admin.delete_topics([topic])
    report["ok"] = (
        report["lost"] == 0 and report["duplicates"] == 0 and report["committed"] == messages
        and report["redis"] and report["postgres"]
    )  # fmt: skip
    return report
