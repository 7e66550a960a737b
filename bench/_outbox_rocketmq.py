"""``bench/outbox.py --sink rocketmq``: the kcons relay against a naive polling loop on the same RocketMQ node.

baseline: ``SELECT ... ORDER BY position LIMIT 500 FOR UPDATE SKIP LOCKED``, send each row with
          the RocketMQ producer (synchronous ``send``, key and message group = aggregate id),
          ``DELETE`` the rows, commit; sleep when the table is empty.
kcons:    :class:`kcons.outbox.OutboxRelay` with the RocketMQ sink (``--sink rocketmq``): rows
          marked only after every send of the batch was acknowledged, an aggregate's next message
          sent after the previous one's acknowledgement, different aggregates in flight together.

Both send the same messages to FIFO topics of one local RocketMQ node (its own topic each), and are
measured with bench/outbox.py's saturation and steady (commit -> acknowledgement) runs.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from kcons.outbox import OutboxRelay, OutboxRow, RelaySettings, to_record
from kcons.outbox.sinks.rocketmq import rocketmq_message


class RocketPollingLoop:
    """The naive relay on RocketMQ: lock a batch with SKIP LOCKED, send each row and wait for it, delete, commit."""

    def __init__(self, dsn: str, endpoints: str, topic: str, batch: int = 500, idle_sleep_s: float = 0.05) -> None:
        from rocketmq import ClientConfiguration, Credentials, Producer

        self.dsn = dsn
        self.topic = topic
        self.batch = batch
        self.idle_sleep_s = idle_sleep_s
        self.producer = Producer(ClientConfiguration(endpoints, Credentials(), request_timeout=10), (topic,))
        self.producer.startup()
        self.published = 0
        self.acks: dict[str, float] = {}
        self.record_acks = False
        self._stop = threading.Event()

    def run(self) -> None:
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
                    self.producer.send(rocketmq_message(rec.topic, rec.value, rec.key, rec.headers))
                acked = time.time()
                positions = [r.position for r in rows]
                conn.execute("DELETE FROM kcons_outbox WHERE position = ANY(%s::bigint[])", (positions,))
                conn.commit()
                self.published += len(rows)
                if self.record_acks:
                    for row in rows:
                        self.acks[row.id] = acked
        self.producer.shutdown()

    def stop(self) -> None:
        self._stop.set()


class RocketRunner:
    """The kcons relay with the RocketMQ sink, recording acknowledgement times."""

    def __init__(self, dsn: str, endpoints: str, topic: str, batch: int) -> None:
        settings = RelaySettings(
            dsn=dsn, kafka=None, sink="rocketmq", rocketmq_endpoints=endpoints, topic=topic, batch_size=batch,
            poll_interval_s=1.0, holder=f"bench-{uuid.uuid4().hex[:6]}",
        )  # fmt: skip
        self.acks: dict[str, float] = {}
        self.record_acks = False
        self.relay = OutboxRelay.for_postgres(settings, on_published=self._on_published)

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


def measure(
    args: argparse.Namespace, server_dsn: str, server: Any, helpers: dict[str, Callable[..., Any]]
) -> dict[str, Any]:
    """Both relays side by side on one RocketMQ node (own database and FIFO topic each); saturation runs alternate."""
    make_db, drop_db, start, wait = helpers["make_db"], helpers["drop_db"], helpers["start"], helpers["wait"]
    saturation, steady = helpers["saturation"], helpers["steady"]
    kinds = ["baseline", "kcons"]
    dbs = {kind: make_db(server_dsn) for kind in kinds}
    topics = {kind: server.create_topic(f"bench-{kind}-{uuid.uuid4().hex[:8]}", "FIFO", queues=args.partitions)
              for kind in kinds}  # fmt: skip
    runners: dict[str, Any] = {
        "baseline": RocketPollingLoop(dbs["baseline"], server.endpoints, topics["baseline"]),
        "kcons": RocketRunner(dbs["kcons"], server.endpoints, topics["kcons"], args.batch),
    }
    threads = {kind: start(runner) for kind, runner in runners.items()}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    results: dict[str, Any] = {}
    try:
        wait(lambda: runners["kcons"].relay.is_leader, 60, "leadership")
        for kind, runner in runners.items():
            saturation(runner, dbs[kind], 500)  # warm-up: connections, producer, topic routes
        for _ in range(args.repeats):
            for kind, runner in runners.items():
                rates[kind].append(saturation(runner, dbs[kind], args.backlog))
        for kind, runner in runners.items():
            lat = steady(runner, dbs[kind], args.rate, args.seconds, args.writers)
            results[kind] = {"events_per_s": round(statistics.median(rates[kind]), 1),
                             "events_per_s_runs": [round(r, 1) for r in rates[kind]], **lat}  # fmt: skip
    finally:
        for kind, runner in runners.items():
            runner.stop()
            threads[kind].join(60)
            drop_db(server_dsn, dbs[kind])
    return results
