"""``kcons demo``: a small shop that shows the three guarantees end to end, with faults injected.

What runs:

* **writers** (threads here) place orders: the order row and its ``order.placed`` event are
  written in one business transaction through the outbox; a few transactions roll back on
  purpose and must never be published;
* the **outbox relay** (a child process) publishes committed events to Kafka; it is
  SIGKILLed once mid-run and restarted;
* the **inventory consumer** (a child process, :class:`~kcons.consumer.TransactionalIdempotentConsumer`)
  decrements stock once per order: the stock update, its dedup record and a ``stock.changed``
  outbox event commit in one transaction; it is SIGKILLed once and restarted, and duplicates of
  already-delivered orders are re-sent to Kafka on purpose;
* the **cache invalidator** (a thread here) applies ``stock.changed`` events to a Redis cache
  of stock under the version guard, while **readers** (threads) read stock through
  :class:`~kcons.cache.ConsistentCache` and count every stale read.

The report checks: every committed order published and applied exactly once, none of the
rolled-back ones, final stock equal to what the orders imply, no stale read, and a final cache
that agrees with the database. Its last line is one JSON object; the exit status is non-zero
if any guarantee failed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kcons.config import redact
from kcons.envelope import Envelope

log = logging.getLogger(__name__)

__all__ = ["DemoOptions", "Worker", "open_worker", "run_demo"]

ORDERS_TOPIC = "kcons-demo-{run}.orders"
STOCK_TOPIC = "kcons-demo-{run}.stock"
INITIAL_STOCK = 1_000_000

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS demo_products (sku TEXT PRIMARY KEY, stock BIGINT NOT NULL, version BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS demo_orders (id TEXT PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS demo_applied (order_id TEXT NOT NULL)",
]


@dataclass(frozen=True)
class DemoOptions:
    """How big the demo is and where it runs."""

    orders: int = 3000
    products: int = 20
    rate: float = 250.0
    readers: int = 2
    duplicates: float = 0.05
    rollback: float = 0.03
    postgres: bool = False
    timeout_s: float = 240.0
    seed: int = 7


@dataclass
class _Shared:
    """State the parent's threads share, behind one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    applied_version: dict[str, int] = field(default_factory=dict)
    committed: list[Envelope] = field(default_factory=list)
    rolled_back: set[str] = field(default_factory=set)
    orders_topic: str = ""
    stock_topic: str = ""
    reads: int = 0
    stale: int = 0
    stale_examples: list[str] = field(default_factory=list)
    resent: int = 0


# --------------------------------------------------------------------------- databases


class _Database:
    """The shop's database: SQLite (embedded default) or PostgreSQL, with the same tables."""

    def __init__(self, postgres_dsn: str | None, workdir: Path) -> None:
        self.postgres_dsn = postgres_dsn
        self.sqlite_path = str(workdir / "shop.db")

    @property
    def kind(self) -> str:
        return "postgres" if self.postgres_dsn else "sqlite"

    @property
    def location(self) -> str:
        return self.postgres_dsn or self.sqlite_path

    def connect(self) -> Any:
        """A new connection: psycopg (autocommit off) or sqlite3 (explicit transactions)."""
        if self.postgres_dsn:
            import psycopg

            return psycopg.connect(self.postgres_dsn)
        conn = sqlite3.connect(self.sqlite_path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextlib.contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        """One business transaction: commit on success, roll back on error."""
        if self.postgres_dsn:
            with conn.transaction():
                yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def q(self, sql: str) -> str:
        """Translate ``?`` placeholders for psycopg."""
        return sql.replace("?", "%s") if self.postgres_dsn else sql

    def setup(self, products: int) -> None:
        """Create the shop's tables, the outbox, and the products with their initial stock."""
        from kcons.outbox import install_schema

        conn = self.connect()
        try:
            with self.transaction(conn):
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                for i in range(products):
                    conn.execute(self.q("INSERT INTO demo_products VALUES (?, ?, 1)"), (f"sku-{i}", INITIAL_STOCK))
            install_schema(conn)
            if self.postgres_dsn:
                conn.commit()
        finally:
            conn.close()

    def scalar(self, sql: str) -> Any:
        conn = self.connect()
        try:
            row = conn.execute(sql).fetchone()
            if self.postgres_dsn:
                conn.rollback()
            return row[0] if row else None
        finally:
            conn.close()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            out = [tuple(r) for r in conn.execute(sql).fetchall()]
            if self.postgres_dsn:
                conn.rollback()
            return out
        finally:
            conn.close()


# --------------------------------------------------------------------------- child processes


class Worker(Protocol):
    """A demo child process's main object: ``run`` works until ``stop``, then closes what it opened."""

    def run(self) -> None: ...

    def stop(self) -> None: ...


WORKER_ROLES = ("relay", "consumer")
WORKER_KINDS = ("sqlite", "postgres")


def open_worker(role: str, kind: str, db_location: str, bootstrap: str, run: str) -> Worker:
    """The relay or the inventory consumer of demo run ``run``; the caller runs it and wires signals."""
    if role == "relay":
        return _open_relay(kind, db_location, bootstrap)
    return _open_consumer(kind, db_location, bootstrap, run)


class _ClosingWorker:
    """A consumer as a :class:`Worker`: ``run`` closes it (commits, leaves the group) on return."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer

    def run(self) -> None:
        try:
            self._consumer.run()
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._consumer.stop()


def _open_relay(kind: str, db_location: str, bootstrap: str) -> Worker:
    from kcons.config import KafkaSettings
    from kcons.outbox import OutboxRelay, RelaySettings

    kafka = KafkaSettings(bootstrap)
    if kind == "sqlite":
        relay = OutboxRelay.for_sqlite(db_location, kafka, mode="transactional", batch_size=500)
    else:
        settings = RelaySettings(
            dsn=db_location, kafka=kafka, name="kcons-demo", poll_interval_s=0.05, lease_ttl_s=3.0, batch_size=500
        )
        relay = OutboxRelay.for_postgres(settings)
    return relay


def _open_consumer(kind: str, db_location: str, bootstrap: str, run: str) -> Worker:
    from kcons.consumer import TransactionalIdempotentConsumer
    from kcons.outbox import add

    db = _Database(db_location if kind == "postgres" else None, Path(db_location).parent)
    group = f"kcons-demo-{run}-inventory"
    store: Any
    if kind == "sqlite":
        from kcons.adapters.sqlite import SqliteDedupStore

        store = SqliteDedupStore(db_location, group)
        conn = db.connect()
    else:
        import psycopg

        from kcons.adapters.postgres import PostgresDedupStore

        store = PostgresDedupStore(db_location, group)
        conn = psycopg.connect(db_location, autocommit=True)

    def handle(msg: Any, tx: Any) -> None:
        order = json.loads(msg.value())
        update = (
            "UPDATE demo_products SET stock = stock - ?, version = version + 1 WHERE sku = ? RETURNING stock, version"
        )
        row = tx.execute(db.q(update), (order["qty"], order["sku"])).fetchone()
        tx.execute(db.q("INSERT INTO demo_applied (order_id) VALUES (?)"), (order["id"],))
        stock, version = int(row[0]), int(row[1])
        event = Envelope.of("stock.changed", "stock", order["sku"], {"stock": stock}, version=version)
        add(tx, event, topic=STOCK_TOPIC.format(run=run))

    consumer = TransactionalIdempotentConsumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            # Static membership: a restarted worker takes its partitions back at once instead of
            # waiting for the killed member's session to time out.
            "group.instance.id": f"{group}-1",
            "session.timeout.ms": 10000,
        },
        [ORDERS_TOPIC.format(run=run)],
        handle,
        store=store,
        connection=conn,
        lease_s=5.0,
        batch_size=200,
        batch_timeout_s=0.05,
    )
    return _ClosingWorker(consumer)


class _Child:
    """A worker subprocess of the demo that can be killed and restarted."""

    def __init__(self, role: str, db: _Database, bootstrap: str, logdir: Path, run: str) -> None:
        self.role = role
        self.argv = [sys.executable, "-m", "kcons.cli", "demo-worker", role, "--kind", db.kind, "--db", db.location,
                     "--bootstrap", bootstrap, "--run", run]  # fmt: skip
        self.log_path = logdir / f"{role}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        """Start the worker in a process group of its own: a terminal's Ctrl-C reaches only the demo,
        which then stops the worker's whole group itself."""
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, process_group=0)  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_and_restart(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self.kills += 1
        self.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM the worker's process group, SIGKILL it after ``timeout_s``; True if it was running."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)
        return True

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


# --------------------------------------------------------------------------- the parent's threads


def _writer(db: _Database, opts: DemoOptions, shared: _Shared, rng: random.Random, stop: threading.Event) -> None:
    from kcons.outbox import add

    conn = db.connect()
    interval = 1.0 / opts.rate
    next_at = time.monotonic()
    try:
        for n in range(opts.orders):
            if stop.is_set():
                return
            order_id = f"order-{n}-{uuid.uuid4().hex[:6]}"
            sku = f"sku-{rng.randrange(opts.products)}"
            qty = rng.randint(1, 5)
            event = Envelope.of("order.placed", "order", order_id, {"id": order_id, "sku": sku, "qty": qty}, version=1)
            roll_back = rng.random() < opts.rollback
            try:
                with db.transaction(conn):
                    conn.execute(db.q("INSERT INTO demo_orders VALUES (?, ?, ?)"), (order_id, sku, qty))
                    add(conn, event, topic=shared.orders_topic)
                    if roll_back:
                        raise _Rollback
            except _Rollback:
                with shared.lock:
                    shared.rolled_back.add(event.id)
            else:
                with shared.lock:
                    shared.committed.append(event)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        conn.close()


class _Rollback(Exception):
    """Raised inside a business transaction to roll it back on purpose."""


def _resender(bootstrap: str, opts: DemoOptions, shared: _Shared, rng: random.Random, stop: threading.Event) -> None:
    """Re-send copies (same kcons-id) of already committed orders straight to Kafka."""
    from kcons.kafka import Producer
    from kcons.kafka.client import with_logger

    producer = Producer(with_logger({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"}))
    want = int(opts.orders * opts.duplicates)
    while shared.resent < want and not stop.is_set():
        with shared.lock:
            pool = shared.committed[-200:]
        if len(pool) < 10:
            time.sleep(0.1)
            continue
        event = rng.choice(pool)
        producer.produce(shared.orders_topic, event.payload, key=event.key, headers=event.headers())
        producer.poll(0)
        with shared.lock:
            shared.resent += 1
        time.sleep(max(0.001, 1.0 / max(opts.rate * opts.duplicates * 2, 1.0)))
    producer.flush(30)


def _reader(db: _Database, cache: Any, opts: DemoOptions, shared: _Shared, stop: threading.Event, seed: int) -> None:
    from kcons.cache import Versioned

    rng = random.Random(seed)
    conn = db.connect()

    def load(key: str) -> Versioned | None:
        sku = key.split(":", 1)[1]
        row = conn.execute(db.q("SELECT stock, version FROM demo_products WHERE sku = ?"), (sku,)).fetchone()
        if db.postgres_dsn:
            conn.rollback()
        return None if row is None else Versioned(str(row[0]).encode(), int(row[1]))

    try:
        while not stop.is_set():
            key = f"stock:sku-{rng.randrange(opts.products)}"
            with shared.lock:
                floor = shared.applied_version.get(key, 0)
            got = cache.get(key, load)
            with shared.lock:
                shared.reads += 1
                if got is not None and got.version < floor:
                    shared.stale += 1
                    if len(shared.stale_examples) < 5:
                        shared.stale_examples.append(f"{key}: read v{got.version} after v{floor} was applied")
    finally:
        conn.close()


# --------------------------------------------------------------------------- the run


def _count_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> tuple[int, set[str]]:
    """Read a whole topic read_committed; returns (records, distinct kcons-ids)."""
    from kcons.envelope import read_envelope
    from kcons.kafka import Consumer, TopicPartition
    from kcons.kafka.client import with_logger

    consumer = Consumer(with_logger({"bootstrap.servers": bootstrap, "isolation.level": "read_committed",
                                     "group.id": f"kcons-demo-audit-{uuid.uuid4().hex[:6]}",
                                     "enable.auto.commit": False}))  # fmt: skip
    try:
        md = consumer.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p) for p in md.topics[topic].partitions]
        starts, ends = {}, {}
        for tp in parts:
            starts[tp.partition], ends[tp.partition] = consumer.get_watermark_offsets(tp, timeout=10)
        # From the first offset still there (0 unless retention removed records): a fixed 0 would
        # fall back to auto.offset.reset (latest) once it is gone, and read nothing.
        consumer.assign([TopicPartition(topic, tp.partition, starts[tp.partition]) for tp in parts])
        records = 0
        ids: set[str] = set()
        done: set[int] = {p for p, h in ends.items() if h == starts[p]}  # empty partitions
        deadline = time.monotonic() + timeout_s
        while len(done) < len(parts) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                env = read_envelope(msg.key(), msg.value(), msg.headers())
                records += 1
                if env is not None:
                    ids.add(env.id)
                partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
                if offset + 1 >= ends[partition]:
                    done.add(partition)
            for tp in consumer.position(parts):
                if tp.offset >= ends[tp.partition]:
                    done.add(tp.partition)
        return records, ids
    finally:
        consumer.close()


class _Teardown:
    """What a demo run started, stopped in reverse order at the end however it ends, and named in one line."""

    def __init__(self) -> None:
        self.stopped: list[str] = []
        self.stop_threads = threading.Event()
        self.threads: list[threading.Thread] = []
        self.children: list[_Child] = []

    def run(self) -> None:
        """Stop the threads and the worker processes (their process groups); services and files follow."""
        self.stop_threads.set()
        for child in self.children:
            pid = child.proc.pid if child.proc is not None else 0
            if child.stop():
                self.stopped.append(f"{child.role} worker (pid {pid})")
        for t in self.threads:
            t.join(30)
        if any(t.is_alive() for t in self.threads):
            log.warning("demo threads still running after 30s: %s", [t.name for t in self.threads if t.is_alive()])
        gc.collect()  # drop finished clients before the services stop

    def summary(self) -> str:
        return "stopped: " + (", ".join(self.stopped) if self.stopped else "nothing was running")


def _services_started(postgres: bool) -> list[str]:
    """The services :func:`kcons.testing.start_stack` starts (rather than reuses from ``KCONS_*``)."""
    from kcons.config import env_str

    wanted = [("kafka", "KCONS_KAFKA_BOOTSTRAP"), ("redis", "KCONS_REDIS_URL")]
    if postgres:
        wanted.append(("postgres", "KCONS_POSTGRES_DSN"))
    return [name for name, var in wanted if not env_str(var)]


def run_demo(opts: DemoOptions, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run the shop with faults and return the report (``ok`` is True only if every guarantee held).

    Whatever ends the run (its end, an error, :class:`kcons.cli.signals.Interrupted` from a signal),
    the worker processes, the threads, the services it started and its temporary directory are
    stopped and removed, and one ``stopped: ...`` line names them through ``progress``.
    """
    teardown = _Teardown()
    try:
        return _run_demo(opts, progress, teardown)
    finally:
        progress(teardown.summary())


def _run_demo(opts: DemoOptions, progress: Callable[[str], None], teardown: _Teardown) -> dict[str, Any]:

    from kcons.testing import start_stack

    started = time.monotonic()
    services = _services_started(opts.postgres)
    tmp = ""
    try:
        with (
            start_stack(kafka=True, redis=True, postgres=opts.postgres) as stack,
            tempfile.TemporaryDirectory(prefix="kcons-demo-") as tmp,
        ):
            try:
                return _run_shop(opts, progress, teardown, stack, Path(tmp), started)
            finally:
                teardown.run()
    finally:
        teardown.stopped += services
        if tmp:
            teardown.stopped.append(f"removed {tmp}")


def _run_shop(
    opts: DemoOptions, progress: Callable[[str], None], teardown: _Teardown, stack: Any, workdir: Path, started: float
) -> dict[str, Any]:
    import redis

    from kcons.cache import CacheInvalidator, CacheSettings, ConsistentCache
    from kcons.testing.plugin import create_topic

    where = f"kafka {stack.kafka_bootstrap}, redis {redact(stack.redis_url)}"
    progress(f"services up in {time.monotonic() - started:.1f}s: {where}"
             + (", postgres" if opts.postgres else ", sqlite outbox"))  # fmt: skip
    pg_dsn = _fresh_pg_database(stack.postgres_dsn) if opts.postgres else None
    db = _Database(pg_dsn, workdir)
    db.setup(opts.products)
    from kcons.kafka import AdminClient
    from kcons.kafka.client import with_logger

    admin = AdminClient(with_logger({"bootstrap.servers": stack.kafka_bootstrap}))
    run = uuid.uuid4().hex[:8]
    shared = _Shared(orders_topic=ORDERS_TOPIC.format(run=run), stock_topic=STOCK_TOPIC.format(run=run))
    for topic in (shared.orders_topic, shared.stock_topic):
        create_topic(admin, topic, partitions=3)

    client = redis.Redis.from_url(stack.redis_url)
    # Keys of this run only: a previous run's entries (and their version floors) on the same Redis
    # hold higher versions of the same products and would refuse this run's writes.
    cache = ConsistentCache(client, name=f"kcons-demo-{run}", settings=CacheSettings(prefix=f"kcons-demo:{run}"))

    def on_applied(applied: Any) -> None:
        with shared.lock:
            for a in applied:
                if a.version > shared.applied_version.get(a.key, 0):
                    shared.applied_version[a.key] = a.version

    group = f"kcons-demo-{run}-cache"
    inv_config = {"bootstrap.servers": stack.kafka_bootstrap, "group.id": group}
    invalidator = CacheInvalidator(cache, lambda e: [f"stock:{e.aggregate_id}"], on_applied=on_applied)
    stop_all = teardown.stop_threads
    inv_thread = threading.Thread(
        target=invalidator.run,
        args=(inv_config, [shared.stock_topic]),
        kwargs={"stop": stop_all},
        name="kcons-demo-invalidator",
        daemon=True,
    )
    relay = _Child("relay", db, stack.kafka_bootstrap, workdir, run)
    consumer = _Child("consumer", db, stack.kafka_bootstrap, workdir, run)
    writer = threading.Thread(target=_writer, args=(db, opts, shared, random.Random(opts.seed + 1), stop_all),
                              name="kcons-demo-writer", daemon=True)  # fmt: skip
    resender = threading.Thread(
        target=_resender, args=(stack.kafka_bootstrap, opts, shared, random.Random(opts.seed + 2), stop_all),
        name="kcons-demo-resender", daemon=True,
    )  # fmt: skip
    readers = [
        threading.Thread(target=_reader, args=(db, cache, opts, shared, stop_all, opts.seed + 10 + i), daemon=True)
        for i in range(opts.readers)
    ]
    teardown.children += [relay, consumer]
    teardown.threads += [writer, resender, *readers, inv_thread]
    inv_thread.start()
    relay.start()
    consumer.start()
    t_write = time.monotonic()
    for t in (writer, resender, *readers):
        t.start()

    killed_relay = killed_consumer = False
    deadline = started + opts.timeout_s
    last_progress = 0.0
    quiet = False
    while time.monotonic() < deadline:
        with shared.lock:
            written = len(shared.committed) + len(shared.rolled_back)
        if not killed_relay and written >= opts.orders * 0.3:
            relay.kill_and_restart()
            killed_relay = True
            progress("fault: relay SIGKILLed and restarted")
        if not killed_consumer and written >= opts.orders * 0.6:
            consumer.kill_and_restart()
            killed_consumer = True
            progress("fault: inventory consumer SIGKILLed and restarted")
        for child in (relay, consumer):
            if not child.alive():
                raise RuntimeError(f"demo {child.role} exited on its own; see {child.log_path}")
        backlog = int(db.scalar("SELECT count(*) FROM kcons_outbox") or 0)
        applied = int(db.scalar("SELECT count(*) FROM demo_applied") or 0)
        now = time.monotonic()
        if now - last_progress >= 2.0:
            last_progress = now
            with shared.lock:
                counts = f"resent {shared.resent} reads {shared.reads} stale {shared.stale}"
            progress(f"[{now - started:5.1f}s] orders {written}/{opts.orders} outbox backlog {backlog} "
                     f"applied {applied} {counts}")  # fmt: skip
        if not writer.is_alive() and not resender.is_alive() and backlog == 0:
            with shared.lock:
                committed_n = len(shared.committed)
            caught_up = applied >= committed_n and _cache_caught_up(db, shared)
            if caught_up:
                quiet = True
                break
        time.sleep(0.25)
    elapsed_pipeline = time.monotonic() - t_write
    teardown.run()

    report = _report(db, stack.kafka_bootstrap, cache, shared, opts, quiet, elapsed_pipeline)
    report["faults"] = {
        "relay_kills": relay.kills,
        "consumer_kills": consumer.kills,
        "resent": shared.resent,
    }
    report["database"] = db.kind
    report["seconds"] = round(time.monotonic() - started, 1)
    client.close()
    return report


def _fresh_pg_database(dsn: str) -> str:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"kcons_demo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    return make_conninfo("", **params)


def _cache_caught_up(db: _Database, shared: _Shared) -> bool:
    versions = {f"stock:{sku}": int(v) for sku, v in db.rows("SELECT sku, version FROM demo_products")}
    with shared.lock:
        return all(v == 1 or shared.applied_version.get(k, 0) >= v for k, v in versions.items())


def _report(
    db: _Database, bootstrap: str, cache: Any, shared: _Shared, opts: DemoOptions, quiet: bool, elapsed: float
) -> dict[str, Any]:
    from kcons.cache import Versioned

    with shared.lock:
        committed = {e.id: e for e in shared.committed}
        rolled_back = set(shared.rolled_back)
    records, published_ids = _count_topic(bootstrap, shared.orders_topic)
    lost = len(set(committed) - published_ids)
    phantom = len(rolled_back & published_ids)
    applied_rows = db.rows("SELECT order_id, count(*) FROM demo_applied GROUP BY order_id")
    applied_ids = {r[0] for r in applied_rows}
    duplicate_effects = sum(int(r[1]) - 1 for r in applied_rows)
    committed_orders = {json.loads(e.payload)["id"]: json.loads(e.payload) for e in committed.values()}
    not_applied = len(set(committed_orders) - applied_ids)
    expected: dict[str, int] = {}
    for order in committed_orders.values():
        expected[order["sku"]] = expected.get(order["sku"], 0) + int(order["qty"])
    stock_rows = {sku: (int(stock), int(version)) for sku, stock, version in db.rows(
        "SELECT sku, stock, version FROM demo_products")}  # fmt: skip
    stock_mismatch = sum(1 for sku, (stock, _v) in stock_rows.items() if stock != INITIAL_STOCK - expected.get(sku, 0))
    final_stale = 0
    for sku, (stock, version) in stock_rows.items():
        got = cache.get(f"stock:{sku}", lambda _k, s=stock, v=version: Versioned(str(s).encode(), v))
        if got is None or got.version != version or got.value != str(stock).encode():
            final_stale += 1
    report: dict[str, Any] = {
        "name": "kcons-demo",
        "orders_committed": len(committed),
        "orders_rolled_back": len(rolled_back),
        "published": len(published_ids & set(committed)),
        "kafka_records": records,
        "duplicates_dropped": records - len(published_ids),
        "lost": lost + not_applied,
        "phantom": phantom,
        "duplicate_effects": duplicate_effects,
        "stock_mismatches": stock_mismatch,
        "reads": shared.reads,
        "stale": shared.stale + final_stale,
        "stale_examples": shared.stale_examples,
        "quiesced": quiet,
        "throughput_orders_per_s": round(len(committed) / elapsed, 1) if elapsed > 0 else 0.0,
    }
    report["ok"] = (
        quiet and lost == 0 and not_applied == 0 and phantom == 0 and duplicate_effects == 0
        and stock_mismatch == 0 and report["stale"] == 0 and len(committed) > 0
    )  # fmt: skip
    return report
