"""Benchmark: the kcons outbox relay against a plain batched polling loop, in the same run.

baseline: ``SELECT ... ORDER BY position LIMIT 500 FOR UPDATE SKIP LOCKED``, produce each row,
          ``flush()``, ``DELETE`` the rows, commit; sleep when the table is empty.
kcons:    :class:`kcons.outbox.OutboxRelay` (advisory-lock leader, LISTEN/NOTIFY wake-up,
          gap-free committed-row batches, fenced mark), transactional mode (its default).
kcons_idempotent: the same relay in idempotent mode (no Kafka transaction per batch; weaker
          fencing of a paused former leader), reported alongside, not used for ``ratio``.

Both publish the same records (key = aggregate id, kcons envelope headers) with the same
producer settings. Two measurements each:

* saturation: a backlog of ``--backlog`` committed rows appears in one commit; events/s until
  the table is empty (median of ``--repeats`` runs, baseline and kcons alternating; each run
  starts from a vacuumed table);
* steady: ``--writers`` separate writer processes commit one event per transaction, together
  ``--rate`` events/s for ``--seconds``; latency from each writer commit to the Kafka acknowledgement of that event
  (both on this host's wall clock), p50 and p99.

``ratio`` = kcons events/s / baseline events/s at saturation. ``latency_p99_ms`` = the kcons
relay's commit -> Kafka ack p99 in ``--mode`` (transactional by default) at ``--rate`` (issue 17's
relay row: target 25 ms). Prints one JSON object last.

``--sink rocketmq`` runs the same comparison on a local RocketMQ node (bench/_outbox_rocketmq.py):
the naive loop sends each row synchronously, the relay through its RocketMQ sink.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kcons.config import KafkaSettings
from kcons.envelope import Envelope
from kcons.outbox import OutboxRelay, OutboxRow, RelaySettings, add, install_schema, to_record
from kcons.testing import start_stack

log = logging.getLogger("bench.outbox")

PRODUCER_SETTINGS = {"linger.ms": 2, "batch.num.messages": 10000, "compression.type": "lz4"}
PAYLOAD = json.dumps({"amount": 1234, "currency": "EUR", "note": "x" * 60}).encode()


# ------------------------------------------------------------------------------ writers


def steady_writer(dsn: str, rate: float, seconds: float, out_path: str) -> None:
    """Commit one event per transaction at ``rate``/s; write (id, commit wall time) pairs as JSON to ``out_path``."""
    out: list[tuple[str, float]] = []
    total = int(rate * seconds)
    with psycopg.connect(dsn) as conn:
        start = time.monotonic()
        for i in range(total):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            event = Envelope.of("Paid", "order", f"agg-{i % 500}", PAYLOAD, version=i)
            add(conn, event)
            conn.commit()
            out.append((event.id, time.time()))
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


def prefill(dsn: str, n: int) -> float:
    """Insert ``n`` events in one transaction; return the wall time of the commit."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO kcons_outbox (id, aggregatetype, aggregateid, type, payload, version) "
            "SELECT gen_random_uuid(), 'order', 'agg-' || (i %% 1000), 'Paid', %s, i FROM generate_series(1, %s) i",
            (PAYLOAD, n),
        )
        conn.commit()
        return time.time()


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM kcons_outbox").fetchone()
        return int(row[0]) if row else -1


# ----------------------------------------------------------------------------- baseline


class PollingLoop:
    """The naive relay: lock a batch with SKIP LOCKED, produce, flush, delete, commit."""

    def __init__(self, dsn: str, bootstrap: str, topic: str, batch: int = 500, idle_sleep_s: float = 0.05) -> None:
        from confluent_kafka import Producer

        self.dsn = dsn
        self.topic = topic
        self.batch = batch
        self.idle_sleep_s = idle_sleep_s
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", **PRODUCER_SETTINGS}
        )
        self.published = 0
        self.acks: dict[str, float] = {}
        self.record_acks = False
        self._stop = threading.Event()

    def run(self) -> None:
        errors: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        with psycopg.connect(self.dsn) as conn:
            while not self._stop.is_set():
                raw = conn.execute(
                    "SELECT position, id::text, aggregatetype, aggregateid, type, payload, topic, headers, version "
                    "FROM kcons_outbox ORDER BY position LIMIT %s FOR UPDATE SKIP LOCKED",
                    (self.batch,),
                ).fetchall()
                if not raw:
                    conn.commit()
                    self._stop.wait(self.idle_sleep_s)
                    continue
                rows = [
                    OutboxRow(position=r[0], id=r[1], aggregatetype=r[2], aggregateid=r[3], type=r[4],
                              payload=bytes(r[5]), topic=r[6], version=r[8])
                    for r in raw
                ]  # fmt: skip
                for row in rows:
                    rec = to_record(row, self.topic)
                    self.producer.produce(rec.topic, rec.value, rec.key, headers=rec.headers, on_delivery=delivered)
                self.producer.flush()
                if errors:
                    raise RuntimeError(f"delivery failed: {errors[0]}")
                acked = time.time()
                positions = [r.position for r in rows]
                conn.execute("DELETE FROM kcons_outbox WHERE position = ANY(%s::bigint[])", (positions,))
                conn.commit()
                self.published += len(rows)
                if self.record_acks:
                    for row in rows:
                        self.acks[row.id] = acked

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------------- runs


class KconsRunner:
    """The kcons relay in a thread, recording acknowledgement times."""

    def __init__(self, dsn: str, bootstrap: str, topic: str, mode: str, batch: int) -> None:
        settings = RelaySettings(
            dsn=dsn,
            kafka=KafkaSettings(bootstrap, PRODUCER_SETTINGS),
            topic=topic,
            mode=mode,
            batch_size=batch,
            poll_interval_s=1.0,
            holder=f"bench-{uuid.uuid4().hex[:6]}",
        )
        self.acks: dict[str, float] = {}
        self.record_acks = False
        self.relay = OutboxRelay.for_postgres(settings, on_published=self._on_published)
        self.thread = threading.Thread(target=self.relay.run, daemon=True)

    def _on_published(self, rows: Sequence[OutboxRow], _acked_monotonic: float) -> None:
        if self.record_acks:
            now = time.time()
            for row in rows:
                self.acks[row.id] = now

    @property
    def published(self) -> int:
        return self.relay.published

    def run(self) -> None:
        self.relay.run()

    def stop(self) -> None:
        self.relay.stop()


def _start(runner: Any) -> threading.Thread:
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return thread


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.002)


def vacuum(dsn: str) -> None:
    """Reclaim the rows earlier runs deleted, so that every run starts from the same clean table.

    A queue table's deleted rows stay in its index until vacuumed; whether autovacuum happened
    to run between two runs moved the baseline loop (which scans from the lowest position)
    between 45k and 9k events/s on the same machine.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM kcons_outbox")


def saturation(runner: Any, dsn: str, n: int) -> float:
    """Events/s for draining a backlog of ``n`` rows committed at once (the table vacuumed first)."""
    vacuum(dsn)
    base = runner.published
    committed = prefill(dsn, n)
    _wait(lambda: runner.published >= base + n, 600, "draining the backlog")
    return n / (time.time() - committed)


def steady(runner: Any, dsn: str, rate: float, seconds: float, writers: int) -> dict[str, float]:
    """Commit→ack latency percentiles at a steady ``rate`` (spread over ``writers`` processes)."""
    runner.acks.clear()
    runner.record_acks = True
    with tempfile.TemporaryDirectory(prefix="kcons-bench-") as tmp:
        outs = [os.path.join(tmp, f"writer-{i}.json") for i in range(writers)]
        argv = [sys.executable, os.path.abspath(__file__), "--steady-writer", dsn, str(rate / writers), str(seconds)]
        procs = [subprocess.Popen([*argv, out]) for out in outs]
        for proc in procs:
            if proc.wait(timeout=seconds * 4 + 120) != 0:
                raise RuntimeError(f"steady writer failed with {proc.returncode}")
        commits: list[tuple[str, float]] = []
        for out in outs:
            with open(out, encoding="utf-8") as f:
                commits.extend((i, t) for i, t in json.load(f))
    commits.sort(key=lambda c: c[1])
    _wait(lambda: all(i in runner.acks for i, _ in commits[-50:]), 120, "the steady events")
    _wait(lambda: _count(dsn) == 0, 120, "the steady backlog")
    runner.record_acks = False
    lat = sorted((runner.acks[i] - t) * 1000 for i, t in commits if i in runner.acks)
    missing = sum(1 for i, _ in commits if i not in runner.acks)
    achieved = len(commits) / (commits[-1][1] - commits[0][1]) if len(commits) > 1 else 0.0
    return {
        "p50_ms": round(statistics.median(lat), 2),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 2),
        "max_ms": round(lat[-1], 2),
        "events": len(commits),
        "achieved_rate": round(achieved, 1),
        "missing": missing,
    }


def _make_db(server_dsn: str) -> str:
    name = f"kcons_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(server_dsn)
    params["dbname"] = name
    dsn = make_conninfo("", **params)
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
    return dsn


def _drop_db(server_dsn: str, dsn: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{conninfo_to_dict(dsn)["dbname"]}" WITH (FORCE)')


def measure(args: argparse.Namespace, server_dsn: str, bootstrap: str) -> dict[str, dict[str, Any]]:
    """Both relays side by side (each on its own database and topic); saturation runs alternate."""
    from _topics import BenchTopics

    kinds = ["baseline", "kcons"] + (["kcons_idempotent"] if args.also_idempotent else [])
    dbs = {kind: _make_db(server_dsn) for kind in kinds}
    topics = BenchTopics(bootstrap)
    runners: dict[str, Any] = {
        "baseline": PollingLoop(
            dbs["baseline"], bootstrap, topics.new("bench-outbox", args.partitions), batch=500,
            idle_sleep_s=args.baseline_idle_sleep,
        ),
        "kcons": KconsRunner(
            dbs["kcons"], bootstrap, topics.new("bench-outbox", args.partitions), args.mode, args.batch
        ),
    }  # fmt: skip
    if args.also_idempotent:
        runners["kcons_idempotent"] = KconsRunner(
            dbs["kcons_idempotent"], bootstrap, topics.new("bench-outbox", args.partitions), "idempotent", args.batch
        )
    threads = {kind: _start(runner) for kind, runner in runners.items()}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind in kinds[1:]:
            _wait(lambda k=kind: runners[k].relay.is_leader, 60, "leadership")
        for kind, runner in runners.items():
            saturation(runner, dbs[kind], 2000)  # warm-up: connections, producer, topic metadata
        for _ in range(args.repeats):
            for kind, runner in runners.items():
                rates[kind].append(saturation(runner, dbs[kind], args.backlog))
        for kind, runner in runners.items():
            lat = steady(runner, dbs[kind], args.rate, args.seconds, args.writers)
            results[kind] = {
                "events_per_s": round(statistics.median(rates[kind]), 1),
                "events_per_s_runs": [round(r, 1) for r in rates[kind]],
                **lat,
            }
    finally:
        for kind, runner in runners.items():
            runner.stop()
            threads[kind].join(60)
            _drop_db(server_dsn, dbs[kind])
        topics.drop()
    return results


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--steady-writer":
        steady_writer(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backlog", type=int, default=100_000, help="rows in the saturation backlog")
    ap.add_argument("--repeats", type=int, default=3, help="alternating saturation runs; the median is reported")
    ap.add_argument("--rate", type=float, default=1000.0, help="steady events/s for the latency run")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of the latency run")
    ap.add_argument("--writers", type=int, default=2, help="writer processes sharing the steady rate")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2000, help="kcons relay batch size")
    ap.add_argument("--mode", default="transactional", choices=["transactional", "idempotent"])
    ap.add_argument("--baseline-idle-sleep", type=float, default=0.05)
    ap.add_argument(
        "--no-idempotent", dest="also_idempotent", action="store_false",
        help="skip the extra kcons_idempotent measurement (the relay in idempotent mode)",
    )  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--sink", choices=("kafka", "rocketmq", "rabbitmq"), default="kafka",
                    help="the broker both relays publish to")  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.backlog, args.repeats, args.seconds = 20_000, 2, 5.0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.sink == "rocketmq":
        main_rocketmq(args)
        return
    if args.sink == "rabbitmq":
        main_rabbitmq(args)
        return
    with start_stack(redis=False) as stack:
        results = measure(args, stack.postgres_dsn, stack.kafka_bootstrap)
    baseline, kcons = results["baseline"], results["kcons"]
    extra = {"kcons_idempotent": results["kcons_idempotent"]} if "kcons_idempotent" in results else {}
    print(
        json.dumps(
            {
                "name": "outbox",
                "baseline": baseline,
                "kcons": kcons,
                **extra,
                "ratio": round(kcons["events_per_s"] / baseline["events_per_s"], 3),
                "latency_p99_ms": kcons["p99_ms"],
                "latency_p50_ms": kcons["p50_ms"],
                "latency_mode": args.mode,
                "unit": "events/s at saturation (latency: ms from DB commit to Kafka ack at a steady rate)",
                "backlog": args.backlog,
                "repeats": args.repeats,
                "rate": args.rate,
                "seconds": args.seconds,
                "writers": args.writers,
                "partitions": args.partitions,
                "kcons_batch": args.batch,
                "kcons_mode": args.mode,
                "baseline_batch": 500,
                "baseline_idle_sleep_s": args.baseline_idle_sleep,
                "producer": PRODUCER_SETTINGS,
            }
        )
    )


def main_rocketmq(args: argparse.Namespace) -> None:
    """``--sink rocketmq``: the same runs on a local RocketMQ node; prints one JSON object."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _outbox_rocketmq import measure as measure_rocketmq

    from kcons.testing.rocketmq import RocketMqServer

    if "--backlog" not in sys.argv:  # smaller than Kafka's: the naive loop sends one message per round trip
        args.backlog = 5_000 if args.quick else 20_000
    helpers = _sink_helpers()
    with start_stack(kafka=False, redis=False) as stack, RocketMqServer() as server:
        results = measure_rocketmq(args, stack.postgres_dsn, server, helpers)
    _print_sink_result(args, "rocketmq", results, "ms from DB commit to RocketMQ acknowledgement")


def main_rabbitmq(args: argparse.Namespace) -> None:
    """``--sink rabbitmq``: the same runs on a RabbitMQ node (KCONS_AMQP_URL or a local one); prints one JSON object."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _outbox_rabbitmq import measure as measure_rabbitmq

    from kcons.testing import start_rabbitmq

    if "--backlog" not in sys.argv:  # smaller than Kafka's: the naive loop waits for one confirm per message
        args.backlog = 5_000 if args.quick else 20_000
    helpers = _sink_helpers()
    url, close = start_rabbitmq()
    try:
        with start_stack(kafka=False, redis=False) as stack:
            results = measure_rabbitmq(args, stack.postgres_dsn, url, helpers)
    finally:
        close()
    _print_sink_result(args, "rabbitmq", results, "ms from DB commit to RabbitMQ publisher confirm")


def _sink_helpers() -> dict[str, Any]:
    """What the sink modules (bench/_outbox_*.py) measure with: this script's databases and runs."""
    return {"make_db": _make_db, "drop_db": _drop_db, "start": _start, "wait": _wait,
            "saturation": saturation, "steady": steady}  # fmt: skip


def _print_sink_result(args: argparse.Namespace, sink: str, results: dict[str, Any], latency: str) -> None:
    baseline, kcons = results["baseline"], results["kcons"]
    print(json.dumps({
        "name": "outbox", "sink": sink, "baseline": baseline, "kcons": kcons,
        "ratio": round(kcons["events_per_s"] / baseline["events_per_s"], 3),
        "latency_p99_ms": kcons.get("p99_ms"),
        "unit": f"events/s at saturation (latency: {latency} at a steady rate)",
        "backlog": args.backlog, "repeats": args.repeats, "rate": args.rate, "seconds": args.seconds,
        "writers": args.writers, "partitions": args.partitions, "kcons_batch": args.batch, "baseline_batch": 500,
        "load_average": os.getloadavg(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
