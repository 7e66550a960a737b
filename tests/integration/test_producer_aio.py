"""The asyncio API against a real broker: same transactional guarantees as the synchronous one."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Message, Producer

from kcons.aio import AsyncIdempotentProducer, AsyncTransactionalProcessor, AsyncTransactionalProducer
from kcons.envelope import HEADER_ID, Envelope
from kcons.processor import Output

pytestmark = pytest.mark.integration


def read_values(bootstrap: str, topic: str, isolation: str, expect: int, idle_s: float = 3.0) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"verify-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": isolation,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    last = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msgs = [m for m in consumer.consume(500, 0.2) if m.error() is None]
        if msgs:
            values.extend(m.value() for m in msgs)
            last = time.monotonic()
        elif len(values) >= expect and time.monotonic() - last > idle_s:
            break
    consumer.close()
    return values


def test_async_transaction_commits_on_success_and_aborts_on_exception(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=2)

    async def scenario() -> list[Message]:
        producer = await AsyncTransactionalProducer.create(
            {"bootstrap.servers": kafka_bootstrap, "linger.ms": 5}, transactional_id=f"tx-{uuid.uuid4().hex}"
        )
        async with producer.transaction():
            pending = [producer.produce_nowait(topic, f"ok-{i}", key=str(i)) for i in range(10)]
            event = await producer.enqueue(topic, b"event", key=b"k")
            await producer.enqueue_in_transaction(topic, b"bulk", key=b"k")
        delivered = list(await asyncio.gather(*pending, event))
        with pytest.raises(RuntimeError):
            async with producer.transaction():
                for i in range(10):
                    producer.produce_nowait(topic, f"aborted-{i}")
                await producer.flush()
                raise RuntimeError("unit of work failed")
        await producer.close()
        return delivered

    delivered = asyncio.run(scenario())
    assert len(delivered) == 11 and all(m.error() is None for m in delivered)
    committed = read_values(kafka_bootstrap, topic, "read_committed", 12)
    uncommitted = read_values(kafka_bootstrap, topic, "read_uncommitted", 22)
    assert sorted(committed) == sorted([f"ok-{i}".encode() for i in range(10)] + [b"event", b"bulk"])
    assert len(uncommitted) == 22 and sum(v.startswith(b"aborted") for v in uncommitted) == 10


def test_async_run_in_transaction_reruns_after_an_abortable_error(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    small = unique_topic(config={"max.message.bytes": "100000"})
    runs: list[int] = []

    async def scenario() -> int:
        producer = await AsyncTransactionalProducer.create(
            {"bootstrap.servers": kafka_bootstrap}, transactional_id=f"tx-{uuid.uuid4().hex}"
        )

        async def work(p: AsyncTransactionalProducer) -> int:
            runs.append(1)
            p.produce_nowait(small, b"x" * (300_000 if len(runs) == 1 else 5))
            return len(runs)

        result = await producer.run_in_transaction(work, attempts=5)
        await producer.close()
        return result

    assert asyncio.run(scenario()) >= 2
    assert read_values(kafka_bootstrap, small, "read_committed", 1) == [b"x" * 5]


def test_async_idempotent_produce_awaits_acknowledgement_with_envelope_headers(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic()

    async def scenario() -> Message:
        async with await AsyncIdempotentProducer.create({"bootstrap.servers": kafka_bootstrap}) as producer:
            return await producer.send(topic, Envelope.of("Created", "order", "7", {"a": 1}))

    msg = asyncio.run(scenario())
    assert msg.error() is None and msg.offset() == 0 and msg.key() == b"7"
    consumer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is not None and m.error() is None:
            got = m
    consumer.close()
    assert got is not None and HEADER_ID in dict(got.headers() or [])


def test_async_processor_with_an_async_handler_is_exactly_once_across_a_handler_error(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    n = 600
    topic_in, topic_out = unique_topic(partitions=2), unique_topic(partitions=2)
    raw = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(n):
        raw.produce(topic_in, str(i).encode(), f"k{i % 11}".encode())
    assert raw.flush(30) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"
    failed: list[int] = []

    async def handler(msg: Message) -> list[Output]:
        await asyncio.sleep(0)
        if int(msg.value()) == 300 and not failed:
            failed.append(1)
            raise ValueError("async handler failed on 300")
        return [Output(topic_out, msg.value(), msg.key())]

    def make() -> Any:
        return AsyncTransactionalProcessor.create(
            {"bootstrap.servers": kafka_bootstrap, "group.id": group, "auto.offset.reset": "earliest"},
            {"bootstrap.servers": kafka_bootstrap, "linger.ms": 5},
            [topic_in],
            handler,
            transactional_id=f"w-{group}",
            batch_size=100,
        )

    async def scenario() -> int:
        first = await make()
        with pytest.raises(ValueError, match="300"):
            await first.run()
        done = first.stats.records
        second = await make()
        await second.run(max_records=n - done)
        return done + second.stats.records

    assert asyncio.run(scenario()) == n
    counts = collections.Counter(int(v) for v in read_values(kafka_bootstrap, topic_out, "read_committed", n))
    assert sorted(counts) == list(range(n))
    assert set(counts.values()) == {1}


def test_async_processor_dead_letters_an_input_whose_handler_raises_decode_error(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    from confluent_kafka.admin import AdminClient

    from kcons.errors import DecodeError
    from kcons.testing.plugin import create_topic

    n = 200
    topic_in, topic_out = unique_topic(partitions=1), unique_topic(partitions=1)
    create_topic(AdminClient({"bootstrap.servers": kafka_bootstrap}), f"{topic_in}.dlq", 1)
    raw = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(n):
        raw.produce(topic_in, str(i).encode(), b"k")
    assert raw.flush(30) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"

    async def handler(msg: Message) -> list[Output]:
        if int(msg.value()) == 50:
            raise DecodeError("not an order")
        return [Output(topic_out, msg.value(), msg.key())]

    async def scenario() -> Any:
        proc = await AsyncTransactionalProcessor.create(
            {"bootstrap.servers": kafka_bootstrap, "group.id": group},
            {"bootstrap.servers": kafka_bootstrap, "linger.ms": 5},
            topics=[topic_in],
            handler=handler,
            transactional_id=f"w-{group}",
        )
        return await proc.run(max_records=n)

    stats = asyncio.run(scenario())
    assert stats.records == n and stats.dead_lettered == 1
    values = read_values(kafka_bootstrap, topic_out, "read_committed", n - 1)
    assert sorted(int(v) for v in values) == [i for i in range(n) if i != 50]
    assert read_values(kafka_bootstrap, f"{topic_in}.dlq", "read_committed", 1) == [b"50"]
