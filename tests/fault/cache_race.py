"""Fault run: readers use ConsistentCache while writers update rows through the outbox and the invalidator is SIGKILLed.

Writer processes update rows of ``items`` (version + 1) and add each change event to the kcons
outbox in the same transaction; the outbox relay publishes them to Kafka; one invalidator
process (``CacheInvalidator``) writes versioned tombstones to
Redis and is SIGKILLed and restarted at random (restarts alternate between the IdempotentConsumer
loop and the batched loop, so both are killed mid-work). Reader processes read through ``ConsistentCache``
with a PostgreSQL loader (some loads are slowed down to widen the classic race window).

What is checked, precisely:

* a *stale read*: a read that returns a version older than the key's *floor* taken just before
  the read began, where the floor is the highest version whose invalidation the invalidator had
  already applied (it raises the floor only after Redis acknowledged the tombstone); or a value
  whose content does not match its version;
* after quiescence (writers stopped, outbox drained, invalidator caught up): any key whose
  cached value is older than the database row is stale;
* ``lost``: rows whose last version's invalidation was never applied after quiescence.

Prints one JSON object last; exit status 0 only when ``ok``.

    python tests/fault/cache_race.py            # full: >= 100,000 reads checked, >= 10 kills
    python tests/fault/cache_race.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kcons.cache import CacheSettings
from kcons.cache.redis import RedisCacheBackend
from kcons.outbox import install_schema
from kcons.testing import child_env, start_stack

log = logging.getLogger("cache_race")
WORKER = Path(__file__).resolve().parent / "_cache_worker.py"


def _spawn(role: str, env: dict[str, str], common: list[str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), role, *common, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if role == "invalidator" else None,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
    """SIGTERM a worker and read its JSON line."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    lines = [line for line in (out or "").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"exit": proc.returncode}


def _create_database(admin_dsn: str) -> tuple[str, str]:
    name = f"cache_race_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = name
    return name, make_conninfo("", **params)


def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=-1)])[name].result(60)


def _wait(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return bool(check())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run for CI (under a minute)")
    parser.add_argument("--duration", type=float, help="seconds of load (at least; runs on until reads and kills)")
    parser.add_argument("--kills", type=int, help="minimum invalidator SIGKILLs")
    parser.add_argument("--max-duration", type=float, help="stop the load after this many seconds regardless")
    parser.add_argument("--min-reads", type=int, help="minimum reads checked")
    parser.add_argument("--readers", type=int, help="reader processes")
    parser.add_argument("--rate", type=float, help="writes per second (all writer threads)")
    parser.add_argument("--rows", type=int, help="rows in the items table")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--negative-control", action="store_true",
        help="readers fill without lease and guard: the run must then report stale reads (checks the checker)",
    )  # fmt: skip
    args = parser.parse_args()
    quick = args.quick
    duration = args.duration or (10.0 if quick else 60.0)
    kills_wanted = args.kills if args.kills is not None else (3 if quick else 12)
    min_reads = args.min_reads or (3_000 if quick else 100_000)
    readers = args.readers or (1 if quick else 2)
    rate = args.rate or (40.0 if quick else 100.0)
    rows = args.rows or (40 if quick else 200)
    rng = random.Random(args.seed)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="cache_race %(message)s")

    with start_stack() as stack:
        db_name, dsn = _create_database(stack.postgres_dsn)
        prefix = f"race{uuid.uuid4().hex[:8]}"
        topic = f"cache-race-{uuid.uuid4().hex[:8]}"
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                install_schema(conn)
                conn.execute("CREATE TABLE items (id int PRIMARY KEY, version bigint NOT NULL, name text NOT NULL)")
                conn.execute("INSERT INTO items SELECT g, 1, 'v1' FROM generate_series(1, %s) g", (rows,))
            _create_topic(stack.kafka_bootstrap, topic, 3)
            env = child_env(stack, {"KCONS_POSTGRES_DSN": dsn})
            common = ["--topic", topic, "--prefix", prefix, "--rows", str(rows)]
            r = redis.Redis.from_url(stack.redis_url)

            relay = _spawn("relay", env, common)
            invalidator = _spawn("invalidator", env, common)
            writer = _spawn("writer", env, common, "--rate", str(rate), "--threads", "4", "--seed", str(args.seed))
            broken = ["--unguarded-fills"] if args.negative_control else []
            reader_procs = [
                _spawn("reader", env, common, "--seed", str(args.seed * 7 + i), *broken) for i in range(readers)
            ]
            started = time.monotonic()
            kills = 0
            modes = [1, 0]  # invalidator processes started: IdempotentConsumer loop, batched loop
            max_duration = args.max_duration or duration * 4
            while True:
                elapsed = time.monotonic() - started
                reads_so_far = int(r.get(f"{prefix}:reads") or 0)
                if elapsed >= duration and kills >= kills_wanted and reads_so_far >= min_reads:
                    break
                if elapsed >= max_duration:
                    log.info("stopping at the time bound with %d reads and %d kills", reads_so_far, kills)
                    break
                # Kill only an invalidator that is at work: wait until it applied something, then a random delay.
                applied_before = int(r.get(f"{prefix}:applied") or 0)
                if not _wait(lambda before=applied_before: int(r.get(f"{prefix}:applied") or 0) > before, 60):
                    log.info("the invalidator applied nothing for 60s")
                time.sleep(rng.uniform(0.2, 2.0))
                if invalidator.poll() is not None:
                    log.info("invalidator exited by itself with %s; restarting", invalidator.returncode)
                else:
                    invalidator.send_signal(signal.SIGKILL)
                    invalidator.wait()
                    kills += 1
                time.sleep(rng.uniform(0.0, 1.0))
                modes[kills % 2] += 1
                invalidator = _spawn("invalidator", env, common, *(["--batched"] if kills % 2 else []))
                log.info("kill %d at %.1fs; %d reads so far", kills, elapsed, reads_so_far)
                for p in (relay, writer, *reader_procs):
                    if p.poll() is not None:
                        raise SystemExit(f"a worker died unexpectedly (exit {p.returncode})")

            load_seconds = time.monotonic() - started
            writer_result = _finish(writer)
            reader_results = [_finish(p) for p in reader_procs]
            # Quiescence: the outbox drains, then every row's last version's invalidation is applied.
            with psycopg.connect(dsn, autocommit=True) as conn:

                def drained() -> bool:
                    row = conn.execute("SELECT count(*) FROM kcons_outbox").fetchone()
                    return row is not None and int(row[0]) == 0

                outbox_drained = _wait(drained, 120)
                db_versions = {int(i): int(v) for i, v in conn.execute("SELECT id, version FROM items").fetchall()}
                db_names = {int(i): str(n) for i, n in conn.execute("SELECT id, name FROM items").fetchall()}

            def lagging() -> list[int]:
                floors = {int(k): int(v) for k, v in r.hgetall(f"{prefix}:floors").items()}
                return [i for i, v in db_versions.items() if v > 1 and floors.get(i, -1) < v]

            _wait(lambda: not lagging(), 120)
            lost = len(lagging())
            backend = RedisCacheBackend(r, prefix=CacheSettings(prefix=prefix).prefix)
            stale_after = 0
            for item, version in db_versions.items():
                entry = backend.read(f"item:{item}")
                if entry is None or entry.is_tombstone:
                    continue
                if entry.version < version or entry.value != db_names[item].encode():
                    stale_after += 1
            invalidator_result = _finish(invalidator)
            relay_result = _finish(relay)
            r.close()
        finally:
            with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    reads = sum(int(x.get("reads", 0)) for x in reader_results)
    stale_reads = sum(int(x.get("stale", 0)) + int(x.get("mismatched", 0)) for x in reader_results)
    sent = int(writer_result.get("writes", 0))
    result: dict[str, Any] = {
        "name": "cache_race",
        "runs": 1,
        "faults": kills,
        "sent": sent,
        "lost": lost,
        "stale": stale_reads + stale_after,
        "stale_reads": stale_reads,
        "stale_after_quiescence": stale_after,
        "reads": reads,
        "hits": sum(int(x.get("hits", 0)) for x in reader_results),
        "loads": sum(int(x.get("loads", 0)) for x in reader_results),
        "fills_rejected_version": sum(int(x.get("fills_rejected_version", 0)) for x in reader_results),
        "fills_rejected_lease": sum(int(x.get("fills_rejected_lease", 0)) for x in reader_results),
        "invalidations_applied_last_process": invalidator_result.get("applied"),
        "relay_published_rows": relay_result.get("published"),
        "invalidator_processes": {"idempotent_consumer": modes[0], "batched": modes[1]},
        "outbox_drained": outbox_drained,
        "examples": [e for x in reader_results for e in x.get("examples", [])][:5],
        "settings": {
            "quick": quick, "duration_s": duration, "load_seconds": round(load_seconds, 1),
            "readers": readers, "rate": rate, "rows": rows,
            "min_reads": min_reads, "min_kills": kills_wanted, "seed": args.seed,
            "negative_control": args.negative_control, "load_average_1m_end": round(os.getloadavg()[0], 1),
        },
    }  # fmt: skip
    result["ok"] = (
        stale_reads == 0
        and stale_after == 0
        and lost == 0
        and outbox_drained
        and reads >= min_reads
        and kills >= kills_wanted
        and sent > 0
    )
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
