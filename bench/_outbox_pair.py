"""The comparison every ``bench/outbox.py --sink`` other than Kafka runs: two relays side by side on one broker."""

from __future__ import annotations

import abc
import argparse
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kcons.outbox import OutboxRelay, OutboxRow, RelaySettings


def lock_batch(conn: Any, limit: int) -> list[OutboxRow]:
    """The naive loops' read: the lowest ``limit`` rows, locked with SKIP LOCKED (gaps and order not handled)."""
    raw = conn.execute(
        "SELECT position, id::text, aggregatetype, aggregateid, type, payload, topic, headers, version "
        "FROM kcons_outbox ORDER BY position LIMIT %s FOR UPDATE SKIP LOCKED",
        (limit,),
    ).fetchall()
    return [
        OutboxRow(position=r[0], id=r[1], aggregatetype=r[2], aggregateid=r[3], type=r[4],
                  payload=bytes(r[5]), topic=r[6], version=r[8])
        for r in raw
    ]  # fmt: skip


def delete_batch(conn: Any, rows: Sequence[OutboxRow]) -> None:
    """Delete the naive loop's published rows and commit."""
    conn.execute("DELETE FROM kcons_outbox WHERE position = ANY(%s::bigint[])", ([r.position for r in rows],))
    conn.commit()


class NaiveLoop(abc.ABC):
    """The naive relay: lock a batch with SKIP LOCKED, publish it row by row (``publish_rows``), delete, commit."""

    def __init__(self, dsn: str, batch: int = 500, idle_sleep_s: float = 0.05) -> None:
        self.dsn = dsn
        self.batch = batch
        self.idle_sleep_s = idle_sleep_s
        self.published = 0
        self.acks: dict[str, float] = {}
        self.record_acks = False
        self._stop = threading.Event()

    @abc.abstractmethod
    def publish_rows(self, rows: Sequence[OutboxRow]) -> None:
        """Publish ``rows`` and return when the broker acknowledged every one."""

    def idle(self) -> None:
        """Wait a little when the table is empty."""
        self._stop.wait(self.idle_sleep_s)

    def close(self) -> None:  # noqa: B027 - a hook: loops without a client to close keep it empty
        """Close the broker client (on the loop's thread)."""

    def run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.dsn) as conn:
                while not self._stop.is_set():
                    rows = lock_batch(conn, self.batch)
                    if not rows:
                        conn.commit()
                        self.idle()
                        continue
                    self.publish_rows(rows)
                    acked = time.time()
                    delete_batch(conn, rows)
                    self.published += len(rows)
                    if self.record_acks:
                        for row in rows:
                            self.acks[row.id] = acked
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()


class RelayRunner:
    """The kcons relay for ``settings``, recording when each row's batch was acknowledged (wall clock)."""

    def __init__(self, settings: RelaySettings) -> None:
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


def measure_pair(
    args: argparse.Namespace,
    server_dsn: str,
    runners_for: Callable[[dict[str, str]], dict[str, Any]],
    ready: Callable[[dict[str, Any]], bool],
    helpers: dict[str, Callable[..., Any]],
) -> dict[str, Any]:
    """Baseline and kcons on their own databases (``runners_for(dbs)`` builds them); saturation runs alternate.

    Each result: the median saturation rate over ``args.repeats`` runs, the runs, and the steady
    run's commit -> acknowledgement latencies at ``args.rate``.
    """
    make_db, drop_db, start, wait = helpers["make_db"], helpers["drop_db"], helpers["start"], helpers["wait"]
    saturation, steady = helpers["saturation"], helpers["steady"]
    kinds = ["baseline", "kcons"]
    dbs = {kind: make_db(server_dsn) for kind in kinds}
    runners = runners_for(dbs)
    threads = {kind: start(runner) for kind, runner in runners.items()}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    results: dict[str, Any] = {}
    try:
        wait(lambda: ready(runners), 60, "leadership")
        for kind, runner in runners.items():
            saturation(runner, dbs[kind], 500)  # warm-up: connections, producer, routes
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
