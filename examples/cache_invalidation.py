"""A Redis cache kept consistent by change events: the outbox publishes the change, the invalidator applies it.

Run against `kcons dev up` (after `eval "$(kcons dev env)"`):  python examples/cache_invalidation.py
After a price change commits, the next read returns the new version (never the old one).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import psycopg
import redis
from confluent_kafka.admin import AdminClient, NewTopic

import kcons
from kcons import outbox
from kcons.cache import CacheInvalidator, ConsistentCache, Versioned

dsn = os.environ["KCONS_POSTGRES_DSN"]
bootstrap = os.environ["KCONS_KAFKA_BOOTSTRAP"]
suffix = uuid.uuid4().hex[:8]
topic, table = f"example-products-{suffix}", f"outbox_{suffix}"
admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference until the topic exists
admin.create_topics([NewTopic(topic, 3)])[topic].result(30)

with psycopg.connect(dsn) as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS example_products (sku TEXT PRIMARY KEY, price INT, version BIGINT)")
    conn.execute("INSERT INTO example_products VALUES (%s, 100, 1)", (f"sku-{suffix}",))
    conn.commit()
    outbox.install_schema(conn, table)
sku = f"sku-{suffix}"

cache = ConsistentCache(redis.Redis.from_url(os.environ["KCONS_REDIS_URL"]), name=f"example-{suffix}")


def load(key: str) -> Versioned | None:
    """Read-through loader: the row and its version."""
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT price, version FROM example_products WHERE sku = %s", (key.split(":")[1],)).fetchone()
    return None if row is None else Versioned(str(row[0]).encode(), int(row[1]))


first = cache.get(f"product:{sku}", load)  # miss: loads version 1 and fills

# The writer: update the row and write its change event in the same transaction.
with psycopg.connect(dsn) as conn:
    version = conn.execute(
        "UPDATE example_products SET price = 120, version = version + 1 WHERE sku = %s RETURNING version", (sku,)
    ).fetchone()[0]  # type: ignore[index]
    outbox.add(conn, kcons.Envelope.of("product.changed", "product", sku, {"price": 120}, version=version),
               topic=topic, table=table)  # fmt: skip
    conn.commit()

stop = threading.Event()
relay = outbox.OutboxRelay.for_postgres(
    outbox.RelaySettings(dsn=dsn, kafka=kcons.KafkaSettings(bootstrap), table=table, name=table, poll_interval_s=0.2)
)
invalidator = CacheInvalidator(cache)  # default keys: "<aggregate type>:<aggregate id>" = product:<sku>
threads = [
    threading.Thread(target=relay.run, daemon=True),
    threading.Thread(
        target=invalidator.run,
        args=({"bootstrap.servers": bootstrap, "group.id": f"ex-{suffix}"}, [topic]),
        kwargs={"stop": stop},
        daemon=True,
    ),
]
for t in threads:
    t.start()

deadline = time.monotonic() + 60
entry = cache.peek(f"product:{sku}")
while time.monotonic() < deadline and (entry is None or entry.version < version):
    time.sleep(0.1)
    entry = cache.peek(f"product:{sku}")
after = cache.get(f"product:{sku}", load)
relay.stop()
stop.set()
for t in threads:
    t.join(30)
ok = (
    first is not None
    and first.version == 1
    and after is not None
    and after.version == version
    and after.value == b"120"
)
print(json.dumps({"example": "cache_invalidation", "before": first.version if first else None,
                  "after": after.version if after else None, "ok": ok}))  # fmt: skip
raise SystemExit(0 if ok else 1)
