"""On the 3-broker cluster a partition gets a new leader and stays writable when its leader dies."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from kcons.testing.plugin import create_topic


def _leader(admin: AdminClient, topic: str) -> int:
    return int(admin.list_topics(topic, timeout=10).topics[topic].partitions[0].leader)


def test_partition_fails_over_and_stays_writable_with_acks_all(kafka_cluster: Any) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_cluster.bootstrap})
    topic = create_topic(admin, f"failover-{uuid.uuid4().hex[:8]}", partitions=1, replication=3)
    producer = Producer(
        {"bootstrap.servers": kafka_cluster.bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 1}
    )
    delivered: list[int] = []
    failed: list[Any] = []

    def on_delivery(err: Any, msg: Any) -> None:
        (failed.append(err) if err else delivered.append(int(msg.value())))

    for i in range(100):
        producer.produce(topic, str(i).encode(), on_delivery=on_delivery)
    assert producer.flush(30) == 0

    old_leader = _leader(admin, topic)
    victim = kafka_cluster.node_index_for_broker(old_leader)
    kafka_cluster.kill_node(victim)
    try:
        deadline = time.monotonic() + 60
        new_leader = old_leader
        while time.monotonic() < deadline:
            try:
                new_leader = _leader(admin, topic)
            except Exception:  # metadata may be briefly unavailable during the election
                new_leader = -1
            if new_leader not in (old_leader, -1):
                break
            time.sleep(0.2)
        assert new_leader not in (old_leader, -1), "no new leader was elected"

        for i in range(100, 200):
            producer.produce(topic, str(i).encode(), on_delivery=on_delivery)
        assert producer.flush(60) == 0
        assert failed == []
        assert sorted(delivered) == list(range(200))
    finally:
        kafka_cluster.restart_node(victim)

    consumer = Consumer(
        {"bootstrap.servers": kafka_cluster.bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while len(seen) < 200 and time.monotonic() < deadline:
        seen += [int(m.value()) for m in consumer.consume(500, 0.5) if m.error() is None]
    consumer.close()
    assert seen == list(range(200)), "every acknowledged write survives the failover, in order, once"
