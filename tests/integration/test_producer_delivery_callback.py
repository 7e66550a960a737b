"""The user's delivery callback runs once per message on every path, whether kcons wraps a config or a Producer."""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer

from kcons.envelope import Envelope
from kcons.errors import ConfigError
from kcons.kafka.producer import IdempotentProducer, TransactionalProducer, wrap

pytestmark = pytest.mark.integration

MESSAGES = 64


def _write(producer: Any, path: str, topic: str) -> None:
    records = [(topic, f"m{i}".encode(), b"k", [("kcons-id", f"id-{i}".encode())], 0) for i in range(MESSAGES)]
    if path == "produce_all":
        assert producer.produce_all(records) == MESSAGES  # returns once all are acknowledged
        return
    if path == "enqueue_all":
        assert producer.enqueue_all(records) == MESSAGES
        return
    for i in range(MESSAGES):
        value = f"m{i}".encode()
        if path == "produce":
            producer.produce(topic, value, b"k")
        elif path == "send":
            producer.send(topic, Envelope.of("t", "agg", f"a{i}", {"i": i}, version=1))
        else:
            producer.enqueue(topic, value, b"k")


PATHS = [
    (False, "produce"),
    (False, "send"),
    (False, "produce_all"),
    (True, "produce"),
    (True, "send"),
    (True, "enqueue"),
    (True, "enqueue_all"),
]


@pytest.mark.parametrize(("transactional", "path"), PATHS, ids=[f"{'txn' if t else 'idem'}-{p}" for t, p in PATHS])
@pytest.mark.parametrize("given_as", ["config", "object"])
def test_user_delivery_callback_runs_once_per_message(
    kafka_bootstrap: str, unique_topic: Callable[..., str], transactional: bool, path: str, given_as: str
) -> None:
    topic = unique_topic()
    calls: collections.Counter[bytes] = collections.Counter()
    errors: list[Any] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        calls[msg.value()] += 1

    config: dict[str, Any] = {"bootstrap.servers": kafka_bootstrap, "linger.ms": 5, "enable.idempotence": True}
    if transactional:
        config["transactional.id"] = f"cb-{uuid.uuid4().hex[:10]}"
    if given_as == "config":
        producer = wrap({**config, "on_delivery": on_delivery})
    else:
        # The Producer's own callback is invisible to kcons: it is handed over with on_delivery=.
        producer = wrap(Producer({**config, "on_delivery": on_delivery}), on_delivery=on_delivery)
    assert isinstance(producer, TransactionalProducer if transactional else IdempotentProducer)
    try:
        if isinstance(producer, TransactionalProducer):
            with producer.transaction():
                _write(producer, path, topic)
        else:
            _write(producer, path, topic)
            producer.flush(30)
    finally:
        producer.close(10)
    assert not errors
    assert sum(calls.values()) == MESSAGES and set(calls.values()) == {1}


def test_delivery_callback_given_twice_is_refused(kafka_bootstrap: str) -> None:
    def cb(_err: Any, _msg: Any) -> None:
        pass

    with pytest.raises(ConfigError) as info:
        IdempotentProducer({"bootstrap.servers": kafka_bootstrap, "on_delivery": cb}, on_delivery=cb)
    assert info.value.setting == "on_delivery"
