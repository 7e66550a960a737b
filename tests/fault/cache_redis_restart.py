"""Fault run: Redis restarts empty (persistence off) under concurrent write-through and slow loaders.

The script starts its own ``redis-server`` through :mod:`kcons.testing` so it can restart it.
The source of truth is an in-process table (a version and a value per row, updated under a
lock: a commit). Writer threads commit a new version and write it through, some after a stall;
an invalidator thread applies each commit's tombstone after a short lag (retrying while Redis
is down, as the real invalidator does); reader threads ``get`` through slow loaders. Every
round, the classic hole is set up on purpose for a few rows: writer A commits v(n) and stalls,
writer B commits v(n+1) and writes it through, both tombstones arrive (refused as not newer),
then Redis restarts empty and A's write-through of v(n) comes in.

What is checked:

* a *stale read*: a read that returns a version older than the newest version whose
  invalidation or write-through Redis acknowledged before the read began;
* ``stale_after_quiescence``: after the writers and the invalidator are done, any row whose
  cached value is older than the table.

Prints one JSON object last (``{"name", "faults", "stale", "stale_after_quiescence", "ok", ...}``);
exit status 0 only when ``ok``.

    python tests/fault/cache_redis_restart.py            # 6 restarts
    python tests/fault/cache_redis_restart.py --quick    # 3 restarts, under half a minute
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import random
import sys
import threading
import time
from typing import Any

import redis

from kcons.cache import CacheSettings, CacheUnavailableError, ConsistentCache, Versioned
from kcons.testing.local import RedisServer

log = logging.getLogger("cache_redis_restart")


class Table:
    """The source of truth: per row, the committed version and its value."""

    def __init__(self, rows: int) -> None:
        self.lock = threading.Lock()
        self.rows = {i: 1 for i in range(rows)}

    def commit(self, row: int) -> int:
        """Commit the next version of ``row`` and return it."""
        with self.lock:
            self.rows[row] += 1
            return self.rows[row]

    def load(self, row: int) -> Versioned:
        with self.lock:
            version = self.rows[row]
        return Versioned(b"v%d" % version, version)


class Run:
    """Shared state of one run: the table, the cache, what Redis acknowledged, and the counters."""

    def __init__(self, args: argparse.Namespace, url: str) -> None:
        self.args = args
        self.table = Table(args.rows)
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
        self.cache = ConsistentCache(self.client, name="restart", settings=CacheSettings(prefix="restart"))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[int, int] = {}  # row -> newest version Redis acknowledged (tombstone or write-through)
        self.pending: list[tuple[float, int, int]] = []  # (due, row, version) invalidations
        self.pending_cv = threading.Condition(self.lock)
        names = ["reads", "stale_reads", "write_throughs", "write_throughs_applied", "write_throughs_refused"]
        self.counts = dict.fromkeys([*names, "unavailable", "invalidations", "stalled_writes"], 0)
        self.examples: list[dict[str, Any]] = []

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def ack(self, row: int, version: int) -> None:
        with self.lock:
            if version > self.acked.get(row, 0):
                self.acked[row] = version

    def committed(self, row: int, version: int) -> None:
        """Schedule the invalidation of this commit after a short lag (the outbox, Kafka, the invalidator)."""
        with self.pending_cv:
            heapq.heappush(self.pending, (time.monotonic() + random.uniform(0.0, 0.3), row, version))
            self.pending_cv.notify()

    def write_through(self, row: int, version: int, committed_at: float) -> None:
        self.count("write_throughs")
        try:
            applied = self.cache.write_through(f"row:{row}", b"v%d" % version, version, committed_at=committed_at)
        except CacheUnavailableError:
            self.count("unavailable")
            return
        if applied:
            self.count("write_throughs_applied")
            self.ack(row, version)
        else:
            self.count("write_throughs_refused")

    def load(self, key: str) -> Versioned:
        time.sleep(random.uniform(0.0, self.args.slow_load_s))  # a slow loader: widens the race window
        return self.table.load(int(key.split(":")[1]))


def writer(run: Run, seed: int) -> None:
    rng = random.Random(seed)
    while not run.stop.is_set():
        row = rng.randrange(run.args.rows)
        version = run.table.commit(row)
        committed_at = time.time()
        run.committed(row, version)
        if rng.random() < 0.1:
            time.sleep(rng.uniform(0.0, 1.0))  # a stalled writer
        run.write_through(row, version, committed_at)
        time.sleep(rng.uniform(0.0, 0.02))


def reader(run: Run, seed: int) -> None:
    rng = random.Random(seed)
    while not run.stop.is_set():
        row = rng.randrange(run.args.rows)
        with run.lock:
            floor = run.acked.get(row, 0)
        try:
            got = run.cache.get(f"row:{row}", run.load)
        except CacheUnavailableError:
            run.count("unavailable")
            time.sleep(0.05)
            continue
        run.count("reads")
        if got is not None and got.version < floor:
            run.count("stale_reads")
            with run.lock:
                if len(run.examples) < 5:
                    run.examples.append({"row": row, "read": got.version, "floor": floor})


def invalidator(run: Run) -> None:
    while True:
        with run.pending_cv:
            while not run.pending and not run.stop.is_set():
                run.pending_cv.wait(0.1)
            if not run.pending:
                return
            due, row, version = run.pending[0]
            wait = due - time.monotonic()
            if wait > 0:
                run.pending_cv.wait(min(wait, 0.1))
                continue
            heapq.heappop(run.pending)
        while True:  # an invalidation is retried until Redis acknowledges it, never skipped
            try:
                run.cache.invalidate(f"row:{row}", version)
                break
            except CacheUnavailableError:
                run.count("unavailable")
                time.sleep(0.05)
        run.count("invalidations")
        run.ack(row, version)


def set_up_the_hole(run: Run, rows: list[int]) -> list[tuple[int, int, float]]:
    """A commits v(n) and stalls; B commits v(n+1) and writes it through; both tombstones arrive late."""
    stalled = []
    for row in rows:
        run.cache.get(f"row:{row}", run.table.load)  # cached, so the write-throughs below have a history
        a_version = run.table.commit(row)
        a_committed_at = time.time()
        b_version = run.table.commit(row)
        run.write_through(row, b_version, time.time())
        for version in (a_version, b_version):
            run.cache.invalidate(f"row:{row}", version)  # refused as not newer: B's value is there
            run.ack(row, version)
        stalled.append((row, a_version, a_committed_at))
    return stalled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 restarts, under half a minute")
    parser.add_argument("--restarts", type=int, help="Redis restarts")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--slow-load-s", type=float, default=0.05, help="loaders sleep up to this long")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    restarts = args.restarts or (3 if args.quick else 6)
    random.seed(args.seed)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="cache_redis_restart %(message)s")
    logging.getLogger("kcons").setLevel(logging.ERROR)

    server = RedisServer().start()
    port = server.port
    run = Run(args, server.url)
    threads = [threading.Thread(target=writer, args=(run, args.seed + i), daemon=True) for i in range(args.writers)]
    seeds = [args.seed * 7 + i for i in range(args.readers)]
    threads += [threading.Thread(target=reader, args=(run, seed), daemon=True) for seed in seeds]
    inv = threading.Thread(target=invalidator, args=(run,), daemon=True)
    for t in (*threads, inv):
        t.start()
    hole_rows = 0
    try:
        for n in range(restarts):
            time.sleep(1.0)
            rows = random.sample(range(args.rows), min(5, args.rows))
            stalled = set_up_the_hole(run, rows)
            hole_rows += len(stalled)
            server.close()  # Redis restarts without persistence: entries, leases and floors are gone
            time.sleep(random.uniform(0.0, 0.3))
            server = RedisServer(port=port).start()
            log.info("restart %d: %d stalled write-throughs arrive now", n + 1, len(stalled))
            for row, version, committed_at in stalled:
                run.count("stalled_writes")
                run.write_through(row, version, committed_at)
        time.sleep(1.0)
        run.stop.set()
        for t in threads:
            t.join(30)
        inv.join(60)  # quiescence: every invalidation applied
        stale_after = 0
        for row, version in run.table.rows.items():
            entry = run.cache.peek(f"row:{row}")
            if entry is not None and not entry.is_tombstone and entry.version < version:
                stale_after += 1
    finally:
        run.stop.set()
        run.client.close()
        server.close()

    counts = run.counts
    result: dict[str, Any] = {
        "name": "cache_redis_restart",
        "runs": 1,
        "faults": restarts,
        "stale": counts["stale_reads"] + stale_after,
        "stale_reads": counts["stale_reads"],
        "stale_after_quiescence": stale_after,
        "stalled_write_throughs": hole_rows,
        **counts,
        "examples": run.examples,
        "settings": {
            "quick": args.quick, "rows": args.rows, "writers": args.writers, "readers": args.readers,
            "slow_load_s": args.slow_load_s, "seed": args.seed,
        },
    }
    result["ok"] = result["stale"] == 0 and counts["reads"] > 0 and counts["write_throughs_applied"] > 0
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
