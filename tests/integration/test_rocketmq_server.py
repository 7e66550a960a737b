"""The local RocketMQ 5 node of kcons.testing: FIFO order per message group, transactional half messages, restart."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from rocketmq import (
    ClientConfiguration,
    Credentials,
    FilterExpression,
    Message,
    Producer,
    SimpleConsumer,
    TransactionChecker,
    TransactionResolution,
)

pytestmark = [pytest.mark.integration]


def _receive(consumer: Any, want: int, timeout: float = 60.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            batch = consumer.receive(16, 20)
        except Exception:  # the consumer's settings arrive asynchronously after startup
            time.sleep(0.2)
            continue
        for msg in batch:
            consumer.ack(msg)
            got.append(msg)
    return got


def test_local_node_delivers_a_message_group_in_order(kcons_rocketmq: Any) -> None:
    topic = kcons_rocketmq.create_topic(f"t-{uuid.uuid4().hex[:8]}", "FIFO")
    group = kcons_rocketmq.create_group(f"g-{uuid.uuid4().hex[:8]}", fifo=True)
    config = ClientConfiguration(kcons_rocketmq.endpoints, Credentials(), request_timeout=10)
    producer = Producer(config, (topic,))
    consumer = SimpleConsumer(config, group, {topic: FilterExpression()}, await_duration=2)
    producer.startup()
    consumer.startup()
    try:
        for i in range(10):
            msg = Message()
            msg.topic, msg.body, msg.keys, msg.message_group = topic, f"{i}".encode(), "agg-1", "agg-1"
            producer.send(msg)
        got = _receive(consumer, 10)
    finally:
        producer.shutdown()
        consumer.shutdown()
    assert [m.body for m in got] == [f"{i}".encode() for i in range(10)]


class _Commit(TransactionChecker):  # type: ignore[misc]
    def __init__(self) -> None:
        self.checked: list[bytes] = []

    def check(self, message: Any) -> Any:
        self.checked.append(message.body)
        return TransactionResolution.COMMIT


def test_an_unfinished_half_message_is_checked_back_and_committed(kcons_rocketmq: Any) -> None:
    topic = kcons_rocketmq.create_topic(f"t-{uuid.uuid4().hex[:8]}", "TRANSACTION")
    group = kcons_rocketmq.create_group(f"g-{uuid.uuid4().hex[:8]}", fifo=False)
    config = ClientConfiguration(kcons_rocketmq.endpoints, Credentials(), request_timeout=10)
    checker = _Commit()
    producer = Producer(config, (topic,), checker)
    consumer = SimpleConsumer(config, group, {topic: FilterExpression()}, await_duration=2)
    producer.startup()
    consumer.startup()
    try:
        msg = Message()
        msg.topic, msg.body = topic, b"half"
        producer.send(msg, producer.begin_transaction())  # neither committed nor rolled back
        got = _receive(consumer, 1)
        checked_before_delivery = list(checker.checked)
    finally:
        producer.shutdown()
        consumer.shutdown()
    assert [m.body for m in got] == [b"half"]
    assert checked_before_delivery == [b"half"]  # visible only once the check-back answered COMMIT
