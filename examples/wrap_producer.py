"""Wrap an existing confluent-kafka producer config with kcons and write exactly-once transactions.

Run against `kcons dev up` (after `eval "$(kcons dev env)"`):  python examples/wrap_producer.py
The committed transaction is visible to read_committed consumers; the aborted one never is.
"""

from __future__ import annotations

import json
import os
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

import kcons

bootstrap = os.environ["KCONS_KAFKA_BOOTSTRAP"]
topic = f"example-orders-{uuid.uuid4().hex[:8]}"
admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference until the topic exists
plain_topic = topic + "-plain"
for created in admin.create_topics([NewTopic(topic, 3), NewTopic(plain_topic, 1)]).values():
    created.result(30)

# The config dict your service already has: librdkafka names, unchanged.
existing_config = {
    "bootstrap.servers": bootstrap,
    "linger.ms": 5,
    "transactional.id": f"example-{uuid.uuid4().hex[:6]}",
}
producer = kcons.wrap_transactional(existing_config)  # typed; kcons.wrap() picks it from transactional.id

committed = [kcons.Envelope.of("order.placed", "order", f"o{i}", {"n": i}, version=1) for i in range(10)]
with producer.transaction():
    for event in committed:
        producer.send(topic, event)

aborted = kcons.Envelope.of("order.placed", "order", "o-bad", {"n": -1}, version=1)
try:
    with producer.transaction():
        producer.send(topic, aborted)
        raise RuntimeError("business rule failed: the transaction aborts")
except RuntimeError:
    pass
producer.close()

# Or wrap the Producer object your service already has. Its own delivery callback is invisible to
# kcons (whose per-message callbacks would replace it): hand it over, and it runs once per message.
delivered: list[bytes] = []


def on_delivery(err: object, msg: object) -> None:
    delivered.append(msg.value())  # type: ignore[attr-defined]


existing_producer = Producer({
    "bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True, "acks": "all",
    "on_delivery": on_delivery,
})  # fmt: skip
# kcons cannot read a Producer's config: trust_config=True says you checked idempotence and acks=all
# (without it, an UnverifiedConfigWarning reminds you).
idempotent = kcons.wrap_idempotent(existing_producer, on_delivery=on_delivery, trust_config=True)
for i in range(5):
    idempotent.produce(plain_topic, f"p{i}".encode(), b"k")
idempotent.close()

consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"example-{uuid.uuid4().hex[:6]}",
                     "auto.offset.reset": "earliest", "isolation.level": "read_committed"})  # fmt: skip
consumer.subscribe([topic])
seen: set[str] = set()
for _ in range(60):
    for msg in consumer.consume(100, 0.5):
        if msg.error() is None:
            env = kcons.read_envelope(msg.key(), msg.value(), msg.headers())
            if env is not None:
                seen.add(env.id)
    if len(seen) >= len(committed):
        break
consumer.close()
once_each = sorted(delivered) == [f"p{i}".encode() for i in range(5)]
ok = seen == {e.id for e in committed} and aborted.id not in seen and once_each
report = {"example": "wrap_producer", "committed_seen": len(seen), "aborted_seen": aborted.id in seen}
print(json.dumps({**report, "delivery_callbacks": len(delivered), "ok": ok}))
raise SystemExit(0 if ok else 1)
