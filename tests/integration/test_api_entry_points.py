"""Typed producer entry points, the unverified-config warning, envelope handlers and CloudEvents, on real Kafka."""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer

from kcons import (
    Envelope,
    IdempotentConsumer,
    IdempotentProducer,
    TransactionalProducer,
    UnverifiedConfigWarning,
    with_envelope,
    with_envelopes,
    wrap,
    wrap_idempotent,
    wrap_transactional,
)
from kcons.adapters.memory import MemoryDedupStore
from kcons.consumer import DLQ_REASON_HEADER
from kcons.errors import ConfigError

pytestmark = pytest.mark.integration


def _consumer_config(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": f"g-{uuid.uuid4().hex[:10]}",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
    }


def _drive(consumer: IdempotentConsumer, until: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"not reached in {timeout_s}s; stats {consumer.stats}"
        consumer.poll_once()


def _send(producer: Any, topic: str, event: Envelope) -> None:
    """Send one event and wait for its acknowledgement."""
    future = producer.send(topic, event)
    producer.flush()
    future.result(0)


def _read(make_consumer: Callable[..., Any], topic: str, expected: int) -> list[Any]:
    reader = make_consumer()
    reader.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + 30
    while len(out) < expected and time.monotonic() < deadline:
        out += [m for m in reader.consume(100, 0.5) if m.error() is None]
    return out


def test_wrapping_a_producer_object_as_idempotent_warns_unless_trusted(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic()
    with pytest.warns(UnverifiedConfigWarning, match="acks=all"):
        loose = wrap(Producer({"bootstrap.servers": kafka_bootstrap, "acks": 1}))
    assert isinstance(loose, IdempotentProducer)
    loose.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trusted = wrap(Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True}), trust_config=True)
        typed = wrap_idempotent(
            Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True}), trust_config=True
        )
    assert isinstance(trusted, IdempotentProducer) and isinstance(typed, IdempotentProducer)
    _send(typed, topic, Envelope.of("Placed", "order", "o1", {"n": 1}))
    trusted.close()
    typed.close()
    with pytest.warns(UnverifiedConfigWarning):
        wrap_idempotent(Producer({"bootstrap.servers": kafka_bootstrap})).close()


def test_typed_entry_points_return_their_class_or_name_the_missing_setting(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic()
    with pytest.raises(ConfigError) as missing:
        wrap_transactional({"bootstrap.servers": kafka_bootstrap})
    assert missing.value.setting == "transactional.id"
    with pytest.raises(ConfigError) as extra:
        wrap_idempotent({"bootstrap.servers": kafka_bootstrap, "transactional.id": "x"})
    assert extra.value.setting == "transactional.id"
    with pytest.raises(ConfigError):
        wrap_idempotent({"bootstrap.servers": kafka_bootstrap, "acks": 1})  # a dict is checked
    txn = wrap_transactional({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{uuid.uuid4().hex}"})
    assert isinstance(txn, TransactionalProducer)
    with txn.transaction():
        txn.send(topic, Envelope.of("Placed", "order", "o1", {"n": 1}))
    txn.close()
    idem = wrap_idempotent({"bootstrap.servers": kafka_bootstrap})
    _send(idem, topic, Envelope.of("Placed", "order", "o2", {"n": 2}))
    idem.close()
    assert len(_read(make_consumer, topic, 2)) == 2


def test_envelope_handler_gets_decoded_events_and_undecodable_messages_are_dead_lettered(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_producer: Callable[..., Any],
    make_consumer: Callable[..., Any],
) -> None:  # fmt: skip
    topic = unique_topic()
    dlq = unique_topic()
    producer = wrap_idempotent({"bootstrap.servers": kafka_bootstrap})
    first = Envelope.of("Placed", "order", "o1", {"n": 1}, version=1)
    _send(producer, topic, first)
    _send(producer, topic, first)  # a duplicate: handled once
    producer.close()
    raw = make_producer()
    raw.produce(topic, value=b"no id", key=b"o9")
    raw.produce(topic, value=b"{}", key=b"o9", headers=[("kcons-id", b"x"), ("kcons-version", b"not-a-number")])
    assert raw.flush(30) == 0
    seen: list[tuple[Envelope, int]] = []
    consumer = IdempotentConsumer(
        _consumer_config(kafka_bootstrap), [topic],
        with_envelope(lambda event, msg: seen.append((event, msg.offset()))),
        store=MemoryDedupStore(), dlq_topic=lambda _t: dlq,
    )  # fmt: skip
    try:
        _drive(consumer, lambda: consumer.stats.dead_lettered >= 2 and len(seen) >= 1)
    finally:
        consumer.close()
    assert [(e.id, e.type, e.aggregate_id, e.version, e.json()) for e, _ in seen] == [
        (first.id, "Placed", "o1", 1, {"n": 1})
    ]
    dead = _read(make_consumer, dlq, 2)
    reasons = sorted(dict(m.headers())[DLQ_REASON_HEADER].decode() for m in dead)
    assert len(reasons) == 2 and all(r.startswith("DecodeError") for r in reasons), reasons
    assert any("no event id" in r for r in reasons)


def test_envelope_batch_handler_gets_event_message_pairs_in_order(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic()
    producer = wrap_idempotent({"bootstrap.servers": kafka_bootstrap})
    events = [Envelope.of("Placed", "order", "o1", {"n": n}, version=n) for n in range(5)]
    for e in events:
        producer.send(topic, e)
    producer.flush()
    producer.close()
    got: list[str] = []

    def handle(pairs: list[tuple[Envelope, Any]]) -> None:
        assert all(e.id == dict(m.headers())["kcons-id"].decode() for e, m in pairs)
        got.extend(e.id for e, _ in pairs)

    consumer = IdempotentConsumer(
        _consumer_config(kafka_bootstrap), [topic], None, batch_handler=with_envelopes(handle), store=MemoryDedupStore()
    )
    try:
        _drive(consumer, lambda: len(got) >= 5)
    finally:
        consumer.close()
    assert got == [e.id for e in events]


def test_cloudevents_headers_are_written_and_cloudevents_only_records_are_read_and_deduplicated(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_producer: Callable[..., Any],
    make_consumer: Callable[..., Any],
) -> None:  # fmt: skip
    topic = unique_topic()
    producer = wrap_idempotent({"bootstrap.servers": kafka_bootstrap})
    event = Envelope.of("OrderPlaced", "order", "o1", {"n": 1}, version=3).with_cloudevents("/orders-service")
    _send(producer, topic, event)
    producer.close()
    (msg,) = _read(make_consumer, topic, 1)
    headers = {k: v.decode() for k, v in msg.headers()}
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_id"] == headers["kcons-id"] == event.id
    assert headers["ce_source"] == "/orders-service" and headers["ce_type"] == "OrderPlaced"
    assert headers["ce_subject"] == "o1" and headers["content-type"] == "application/json"
    assert headers["ce_time"].endswith("Z") and "T" in headers["ce_time"]
    # A record from a CloudEvents producer (no kcons headers), sent twice: one event, handled once.
    ce_headers = [("ce_specversion", b"1.0"), ("ce_id", b"evt-42"), ("ce_source", b"/billing"),
                  ("ce_type", b"InvoicePaid"), ("ce_subject", b"inv-7"),
                  ("content-type", b"application/json")]  # fmt: skip
    raw = make_producer()
    for _ in range(2):
        raw.produce(topic, value=b'{"paid":true}', key=b"inv-7", headers=ce_headers)
    assert raw.flush(30) == 0
    seen: list[Envelope] = []
    consumer = IdempotentConsumer(
        _consumer_config(kafka_bootstrap), [topic], with_envelope(lambda e, _m: seen.append(e)),
        store=MemoryDedupStore(),
    )
    try:
        _drive(consumer, lambda: consumer.stats.consumed >= 3)
    finally:
        consumer.close()
    assert [(e.id, e.type) for e in seen] == [(event.id, "OrderPlaced"), ("evt-42", "InvoicePaid")]
    cloud = seen[1]
    assert cloud.aggregate_id == "inv-7" and cloud.json() == {"paid": True}
    assert cloud.extra_headers["ce_source"] == "/billing"
