"""An idempotent consumer with the PostgreSQL dedup store: each payment's effect commits exactly once.

Run against `kcons dev up` (after `eval "$(kcons dev env)"`):  python examples/consumer_postgres.py
The effect (a row in `example_payments`) and the dedup record commit in one transaction, so
the 20 re-sent duplicates change nothing.
"""

from __future__ import annotations

import json
import os
import uuid

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

import kcons
from kcons.adapters.postgres import PostgresDedupStore
from kcons.consumer import TransactionalIdempotentConsumer

dsn = os.environ["KCONS_POSTGRES_DSN"]
bootstrap = os.environ["KCONS_KAFKA_BOOTSTRAP"]
topic = f"example-payments-{uuid.uuid4().hex[:8]}"
group = f"example-payments-{uuid.uuid4().hex[:6]}"
admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference until the topic exists
admin.create_topics([NewTopic(topic, 3)])[topic].result(30)

with psycopg.connect(dsn, autocommit=True) as setup:
    setup.execute("CREATE TABLE IF NOT EXISTS example_payments (event_id TEXT, amount INT, grp TEXT)")

events = [kcons.Envelope.of("payment.received", "account", f"acct-{i % 7}", {"amount": i}) for i in range(100)]
producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
for event in events + events[:20]:  # the last 20 are resends of the same event ids
    producer.produce(topic, event.payload, key=event.key, headers=event.headers())
producer.flush(30)


def apply_payment(msg: object, tx: psycopg.Connection) -> None:
    """The side effect, inside the transaction that also records the event id as done."""
    env = kcons.read_envelope(msg.key(), msg.value(), msg.headers())  # type: ignore[attr-defined]
    assert env is not None
    tx.execute("INSERT INTO example_payments VALUES (%s, %s, %s)", (env.id, json.loads(env.payload)["amount"], group))


consumer = TransactionalIdempotentConsumer(
    {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest"},
    [topic],
    apply_payment,
    store=PostgresDedupStore(dsn, group),
    connection=psycopg.connect(dsn, autocommit=True),
)
consumer.run(max_messages=len(events) + 20, idle_timeout_s=30)
consumer.close()

with psycopg.connect(dsn) as conn:
    rows, distinct = conn.execute(
        "SELECT count(*), count(DISTINCT event_id) FROM example_payments WHERE grp = %s", (group,)
    ).fetchone()  # type: ignore[misc]
ok = rows == distinct == len(events)
print(json.dumps({"example": "consumer_postgres", "effects": rows, "distinct": distinct, "sent": len(events) + 20,
                  "ok": ok}))  # fmt: skip
raise SystemExit(0 if ok else 1)
