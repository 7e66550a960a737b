"""Fault-run writer: commits outbox events in business transactions (some rolled back, some long-running).

Each transaction locks 1-3 aggregates in sorted order (``UPDATE accounts ... RETURNING version``),
adds one event per aggregate carrying the new version, then commits or rolls back. Writes one JSON
object to ``--out``: the ids that committed, that rolled back, and whose commit outcome is unknown.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import psycopg

from kcons.envelope import Envelope
from kcons.outbox import add


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--events", type=int, required=True, help="committed events to write")
    ap.add_argument("--aggregates", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True, help="spread the writes over this many seconds")
    ap.add_argument("--rollback-rate", type=float, default=0.08)
    ap.add_argument("--long-rate", type=float, default=0.004)
    ap.add_argument("--out", required=True, help="write the result JSON here (a pipe could fill up and block)")
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    names = [f"agg-{i:04d}" for i in range(args.aggregates)]
    committed: list[str] = []
    rolled_back: list[str] = []
    unknown: list[str] = []
    long_running = 0
    start = time.monotonic()
    with psycopg.connect(args.dsn) as conn:
        while len(committed) < args.events:
            # Pace: stay on the straight line from 0 to `events` over `duration` seconds.
            due = start + args.duration * len(committed) / args.events
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            ids: list[str] = []
            for agg in sorted(rnd.sample(names, rnd.randint(1, 3))):
                row = conn.execute(
                    "UPDATE accounts SET version = version + 1 WHERE id = %s RETURNING version", (agg,)
                ).fetchone()
                assert row is not None
                event = Envelope.of("AccountChanged", "account", agg, {"v": int(row[0])}, version=int(row[0]))
                add(conn, event)
                ids.append(event.id)
            if rnd.random() < args.rollback_rate:
                conn.rollback()
                rolled_back.extend(ids)
                continue
            if rnd.random() < args.long_rate:
                long_running += 1
                time.sleep(rnd.uniform(0.5, 2.0))  # holds its locks and its xid open meanwhile
            try:
                conn.commit()
            except psycopg.OperationalError:
                unknown.extend(ids)
                continue
            committed.extend(ids)
    result = {"committed": committed, "rolled_back": rolled_back, "unknown": unknown, "long": long_running}
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
