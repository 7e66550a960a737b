"""The pytest plugin's raw client factories: real clients on the session broker, logs through logging."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest


def _poll_until_logged(client: Any, caplog: pytest.LogCaptureFixture, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(r.name == "kcons.librdkafka" for r in caplog.records):
        client.poll(0.1)


def test_made_producer_sends_librdkafka_logs_to_logging(
    kcons_make_producer: Callable[..., Any],
    kcons_unique_topic: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = kcons_unique_topic()
    caplog.set_level(logging.DEBUG, logger="kcons.librdkafka")
    producer = kcons_make_producer(debug="generic")
    producer.produce(topic, b"v", key=b"k")
    assert producer.flush(10) == 0
    _poll_until_logged(producer, caplog)
    assert any(r.name == "kcons.librdkafka" for r in caplog.records)


def test_made_consumer_reads_what_was_produced_and_logs_through_logging(
    kcons_make_producer: Callable[..., Any],
    kcons_make_consumer: Callable[..., Any],
    kcons_unique_topic: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = kcons_unique_topic()
    producer = kcons_make_producer()
    value = uuid.uuid4().hex.encode()
    producer.produce(topic, value)
    assert producer.flush(10) == 0
    caplog.set_level(logging.DEBUG, logger="kcons.librdkafka")
    consumer = kcons_make_consumer(debug="consumer")
    consumer.subscribe([topic])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got = msg.value()
    assert got == value
    assert any(r.name == "kcons.librdkafka" for r in caplog.records)
