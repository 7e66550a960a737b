"""DeadLetterWriter on real Kafka: the dead-letter record keeps key, value and headers, and says why and where from."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from kcons.kafka.dlq import (
    DLQ_OFFSET_HEADER,
    DLQ_PARTITION_HEADER,
    DLQ_REASON_HEADER,
    DLQ_SOURCE_HEADER,
    DLQ_TOPIC_HEADER,
    DeadLetterWriter,
)

pytestmark = pytest.mark.integration


def test_poison_message_lands_in_the_dead_letter_topic_with_reason_and_position(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    make_consumer: Callable[..., Any],
) -> None:
    source = unique_topic(partitions=2)
    dlq = unique_topic(prefix="dlq")
    producer = make_producer()
    producer.produce(source, value=b"not json", key=b"order-7", partition=1, headers=[("kcons-id", b"id-7")])
    assert producer.flush(30) == 0

    reader = make_consumer()
    reader.subscribe([source])
    deadline = time.monotonic() + 30
    msg = None
    while msg is None or msg.error() is not None:
        assert time.monotonic() < deadline, "the source message was not consumed"
        msg = reader.poll(1.0)

    writer = DeadLetterWriter({"bootstrap.servers": kafka_bootstrap, "group.id": "ignored"}, topic_of=lambda _t: dlq)
    try:
        report = writer.write([(msg, "DecodeError: expected JSON")])
    finally:
        writer.close(10)
    assert report.ok and report.is_acknowledged(0)

    check = make_consumer()
    check.subscribe([dlq])
    deadline = time.monotonic() + 30
    record = None
    while record is None or record.error() is not None:
        assert time.monotonic() < deadline, "the dead-letter record was not read back"
        record = check.poll(1.0)
    assert record.key() == b"order-7" and record.value() == b"not json"
    headers = record.headers()
    assert headers[0] == ("kcons-id", b"id-7")  # the original headers come first, unchanged
    named = dict(headers)
    assert named[DLQ_REASON_HEADER] == b"DecodeError: expected JSON"
    assert named[DLQ_TOPIC_HEADER] == source.encode()
    assert named[DLQ_PARTITION_HEADER] == b"1"
    assert named[DLQ_OFFSET_HEADER] == str(msg.offset()).encode()
    assert named[DLQ_SOURCE_HEADER] == f"{source}/1/{msg.offset()}".encode()


def test_unreachable_dead_letter_topic_is_reported_unacknowledged(kafka_bootstrap: str) -> None:
    class Msg:
        def topic(self) -> str:
            return "t"

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return 3

        def headers(self) -> None:
            return None

        def key(self) -> bytes:
            return b"k"

        def value(self) -> bytes:
            return b"v"

    # A topic name Kafka refuses: the write can never be acknowledged, and the report says so.
    writer = DeadLetterWriter(
        {"bootstrap.servers": kafka_bootstrap}, topic_of=lambda _t: "bad topic name!", timeout_s=5.0
    )
    try:
        report = writer.write([(Msg(), "poison")])
    finally:
        writer.close(2)
    assert not report.ok and not report.is_acknowledged(0)
