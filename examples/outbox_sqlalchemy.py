"""The transactional outbox with SQLAlchemy: the order and its event commit together, the relay publishes it.

Run against `kcons dev up` (after `eval "$(kcons dev env)"`):  python examples/outbox_sqlalchemy.py
A rolled-back session publishes nothing.
"""

from __future__ import annotations

import json
import os
import threading
import uuid

import psycopg
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import kcons
from kcons import outbox

dsn = os.environ["KCONS_POSTGRES_DSN"]
bootstrap = os.environ["KCONS_KAFKA_BOOTSTRAP"]
topic = f"example-outbox-{uuid.uuid4().hex[:8]}"
table = f"outbox_{uuid.uuid4().hex[:8]}"
admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference until the topic exists
admin.create_topics([NewTopic(topic, 3)])[topic].result(30)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "example_orders"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    sku: Mapped[str] = mapped_column(String)


engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
Base.metadata.create_all(engine)
with psycopg.connect(dsn) as conn:
    outbox.install_schema(conn, table)  # what `kcons outbox init` does

placed = kcons.Envelope.of("order.placed", "order", "o-1", {"sku": "A1"}, version=1)
with Session(engine) as session, session.begin():
    session.add(Order(id=f"o-1-{uuid.uuid4().hex[:6]}", sku="A1"))
    outbox.add(session, placed, topic=topic, table=table)  # same transaction as the order

cancelled = kcons.Envelope.of("order.placed", "order", "o-2", {"sku": "B2"}, version=1)
with Session(engine) as session:
    session.begin()
    session.add(Order(id=f"o-2-{uuid.uuid4().hex[:6]}", sku="B2"))
    outbox.add(session, cancelled, topic=topic, table=table)
    session.rollback()  # the order and its event vanish together

settings = outbox.RelaySettings(dsn=dsn, kafka=kcons.KafkaSettings(bootstrap), table=table, name=table,
                                poll_interval_s=0.2)  # fmt: skip
relay = outbox.OutboxRelay.for_postgres(settings)
thread = threading.Thread(target=relay.run, daemon=True)
thread.start()

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
    if placed.id in seen:
        break
for _ in range(4):  # give a wrongly published rolled-back event the chance to show up
    for msg in consumer.consume(100, 0.5):
        env = kcons.read_envelope(msg.key(), msg.value(), msg.headers()) if msg.error() is None else None
        if env is not None:
            seen.add(env.id)
consumer.close()
relay.stop()
thread.join(30)
ok = placed.id in seen and cancelled.id not in seen
print(json.dumps({"example": "outbox_sqlalchemy", "published": placed.id in seen, "rolled_back_published":
                  cancelled.id in seen, "ok": ok}))  # fmt: skip
raise SystemExit(0 if ok else 1)
