"""A commit whose outcome is unknown (the cluster froze mid-commit) re-creates the producer instead of guessing."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from kcons.errors import IndefiniteOutcomeError
from kcons.kafka.producer import TransactionalProducer
from kcons.testing.plugin import create_topic

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


def read_committed(bootstrap: str, topic: str, expect: int) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"verify-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    last = time.monotonic()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        msg = consumer.poll(0.3)
        if msg is not None and msg.error() is None:
            values.append(msg.value())
            last = time.monotonic()
        elif len(values) >= expect and time.monotonic() - last > 3:
            break
    consumer.close()
    return values


def test_commit_that_times_out_reinitialises_the_producer_and_it_keeps_working(kafka_cluster: Any) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_cluster.bootstrap})
    topic = create_topic(admin, f"indef-{uuid.uuid4().hex[:8]}", partitions=1, replication=3)
    producer = TransactionalProducer(
        {"bootstrap.servers": kafka_cluster.bootstrap, "linger.ms": 1},
        transactional_id=f"tx-{uuid.uuid4().hex}",
        commit_timeout_s=2.0,
        init_timeout_s=60.0,
    )
    first_raw = producer.raw

    def resume_all() -> None:
        for node in kafka_cluster.nodes:
            node.resume()

    resumer = threading.Timer(4.0, resume_all)
    try:
        with pytest.raises(IndefiniteOutcomeError), producer.transaction():
            producer.produce(topic, b"maybe")
            producer.flush()
            for node in kafka_cluster.nodes:  # the whole cluster freezes: the commit cannot be confirmed
                node.pause()
            resumer.start()
    finally:
        resumer.join(30)
        resume_all()
    assert not producer.closed and producer.raw is not first_raw  # a new instance, same transactional.id
    with producer.transaction():
        producer.produce(topic, b"after")
    producer.close()

    values = read_committed(kafka_cluster.bootstrap, topic, 1)
    assert values.count(b"after") == 1
    assert values.count(b"maybe") <= 1  # committed or aborted by the new instance's init, never twice
