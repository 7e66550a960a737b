"""Worker processes of the cache fault run (``cache_race.py``) and the cache benchmark.

Roles (first argument):

* ``relay``: the kcons outbox relay publishing the ``items`` outbox to ``--topic``; with
  ``--published-log`` it records when each row's batch was committed to Kafka (its
  ``on_published`` hook, wall clock).
* ``writer``: ``--threads`` threads update random rows of ``items`` (version + 1) and add the
  change event to the outbox in the same transaction, at about ``--rate`` writes per second.
* ``reader``: reads random keys through ``ConsistentCache`` with a PostgreSQL loader and checks
  every answer: before each read it takes the key's *floor*, the highest version whose
  invalidation the invalidator reported applied; an answer older than its floor, or whose value
  does not match its version, is stale.
* ``invalidator``: ``CacheInvalidator`` (through ``IdempotentConsumer``); after Redis acknowledged
  each event it raises the key's floor (a Redis hash). Static group membership lets a restarted
  process take over the partitions at once.

Every role stops on SIGTERM and prints one JSON line with its counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import psycopg
import redis

from kcons.cache import (
    AppliedInvalidation,
    CacheEntry,
    CacheInvalidator,
    CacheSettings,
    CacheWrite,
    ChangeEvent,
    ConsistentCache,
    Versioned,
    WriteOp,
    WriteOutcome,
    WriteResult,
    encode_entry,
)
from kcons.cache.redis import RedisCacheBackend
from kcons.config import KafkaSettings
from kcons.envelope import Envelope
from kcons.outbox import OutboxRelay, RelaySettings, add
from kcons.runtime import freeze_startup_heap

log = logging.getLogger("cache_worker")

# Raise a hash field to a new value only if it is higher (floors never go down).
RAISE_FLOOR = """
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


def cache_settings(args: argparse.Namespace) -> CacheSettings:
    """The cache settings every process of one run shares."""
    return CacheSettings(
        prefix=args.prefix, lease_ttl_s=2.0, tombstone_ttl_s=60.0, lease_wait_s=0.05, value_ttl_s=600.0
    )


def floor_key(args: argparse.Namespace) -> str:
    """The Redis hash of applied floors (a hash tag of its own)."""
    return f"{args.prefix}:floors"


def item_key(event: ChangeEvent) -> list[str]:
    """Map an item event to its cache key."""
    return [f"item:{event.aggregate_id}"]


def pick_id(rng: random.Random, rows: int) -> int:
    """Skewed choice: a fifth of the rows take most of the traffic, to provoke races."""
    hot = max(1, rows // 5)
    return rng.randrange(hot) + 1 if rng.random() < 0.8 else rng.randrange(rows) + 1


def run_relay(args: argparse.Namespace, stop: threading.Event) -> dict[str, Any]:
    settings = RelaySettings(
        dsn=os.environ["KCONS_POSTGRES_DSN"],
        kafka=KafkaSettings(os.environ["KCONS_KAFKA_BOOTSTRAP"]),
        topic=args.topic,
        name=args.prefix.replace(":", "-"),
        mode=args.relay_mode,
        lease_ttl_s=5.0,
    )  # the documented polling default (1 s): the insert trigger's NOTIFY wakes the relay, not the poll
    published: list[tuple[Any, float]] = []

    def on_published(rows: Any, _acked: float) -> None:
        published.append((rows, time.time()))  # wall clock, comparable with the writer's commit times

    relay = OutboxRelay.for_postgres(settings, on_published=on_published if args.published_log else None)

    def stop_on_signal() -> None:
        stop.wait()
        relay.stop()

    threading.Thread(target=stop_on_signal, daemon=True).start()
    freeze_startup_heap()  # as `kcons outbox relay` does
    relay.run()
    if args.published_log:
        with open(args.published_log, "w") as f:
            json.dump([(r.aggregateid, r.version, t) for rows, t in published for r in rows], f)
    return {"role": "relay", "published": relay.published}


def run_writer(args: argparse.Namespace, stop: threading.Event) -> dict[str, Any]:
    dsn = os.environ["KCONS_POSTGRES_DSN"]
    counts = {"writes": 0, "errors": 0}
    lock = threading.Lock()
    commit_log: list[tuple[int, int, float]] = []

    # Every thread connects first and they all start writing together: connecting (a server
    # process per connection) is start-up work, not part of the steady writing being measured.
    ready = threading.Barrier(args.threads)

    def body(seed: int) -> None:
        rng = random.Random(seed)
        interval = args.threads / args.rate if args.rate > 0 else 0.0
        with psycopg.connect(dsn) as conn:
            try:
                ready.wait(60.0)
            except threading.BrokenBarrierError:
                log.warning("a writer thread did not connect in time; starting anyway")
            stop.wait(interval * (seed % 1000) / args.threads)  # the threads' writes spread over one interval
            next_at = time.monotonic()
            while not stop.is_set():
                item = pick_id(rng, args.rows)
                try:
                    with conn.transaction():
                        row = conn.execute(
                            "UPDATE items SET version = version + 1, name = 'v' || (version + 1) "
                            "WHERE id = %s RETURNING version",
                            (item,),
                        ).fetchone()
                        assert row is not None
                        version = int(row[0])
                        event = Envelope.of(
                            "ItemUpdated", "item", str(item), {"v": version}, version=version,
                            headers={"kcons-committed-at": f"{time.time():.6f}"},
                        )  # fmt: skip
                        add(conn, event)
                    committed = time.time()
                    with lock:
                        counts["writes"] += 1
                        if args.commit_log:
                            commit_log.append((item, version, committed))
                except psycopg.Error as exc:
                    log.warning("write failed: %s", exc)
                    with lock:
                        counts["errors"] += 1
                    conn.rollback()
                if interval:
                    next_at += interval
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        stop.wait(delay)
                    elif delay < -1.0:  # more than a second behind: give up catching up
                        next_at = time.monotonic()

    threads = [threading.Thread(target=body, args=(args.seed * 1000 + i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if args.commit_log:
        with open(args.commit_log, "w") as f:
            json.dump(commit_log, f)
    return {"role": "writer", **counts}


class UnguardedFills(RedisCacheBackend):
    """Negative control only: fills overwrite the key with a plain SET, skipping the lease and the version guard."""

    def write(self, write: CacheWrite) -> WriteResult:
        if write.op is not WriteOp.FILL:
            return super().write(write)
        self._client.set(self.keys(write.key)[0], encode_entry(CacheEntry(write.version, write.value)), px=write.ttl_ms)
        return WriteResult(WriteOutcome.APPLIED, write.version)


def run_reader(args: argparse.Namespace, stop: threading.Event) -> dict[str, Any]:
    client = redis.Redis.from_url(os.environ["KCONS_REDIS_URL"])
    settings = cache_settings(args)
    backend = UnguardedFills(client, prefix=settings.prefix) if args.unguarded_fills else None
    cache = ConsistentCache(client, name="fault", settings=settings, backend=backend)
    floors = floor_key(args)
    rng = random.Random(args.seed)
    counts = {"reads": 0, "hits": 0, "loads": 0, "stale": 0, "mismatched": 0, "absent": 0}
    examples: list[dict[str, Any]] = []
    with psycopg.connect(os.environ["KCONS_POSTGRES_DSN"], autocommit=True) as conn:

        def loader(key: str) -> Versioned | None:
            counts["loads"] += 1
            row = conn.execute("SELECT name, version FROM items WHERE id = %s", (int(key.split(":")[1]),)).fetchone()
            if rng.random() < 0.1:  # a slow loader now and then: the write and its invalidation overtake it
                time.sleep(rng.uniform(0.02, 0.3))
            return None if row is None else Versioned(str(row[0]).encode(), int(row[1]))

        while not stop.is_set():
            item = pick_id(rng, args.rows)
            key = f"item:{item}"
            raw_floor = client.hget(floors, str(item))
            floor = int(raw_floor) if raw_floor is not None else -1
            loads_before = counts["loads"]
            got = cache.get(key, loader)
            counts["reads"] += 1
            if counts["reads"] % 1000 == 0:
                client.incrby(f"{args.prefix}:reads", 1000)
            if counts["loads"] == loads_before:
                counts["hits"] += 1
            if got is None:
                counts["absent"] += 1
                continue
            if got.version < floor:
                counts["stale"] += 1
                if len(examples) < 5:
                    examples.append({"key": key, "version": got.version, "floor": floor})
            if got.value != b"v%d" % got.version:
                counts["mismatched"] += 1
    client.close()
    from prometheus_client import REGISTRY

    for reason in ("version", "lease"):
        value = REGISTRY.get_sample_value("kcons_cache_fills_rejected_total", {"cache": "fault", "reason": reason})
        counts[f"fills_rejected_{reason}"] = int(value or 0)
    return {"role": "reader", **counts, "examples": examples}


def run_invalidator(args: argparse.Namespace, stop: threading.Event) -> dict[str, Any]:
    client = redis.Redis.from_url(os.environ["KCONS_REDIS_URL"])
    cache = ConsistentCache(client, name="fault", settings=cache_settings(args))
    raise_floor = client.register_script(RAISE_FLOOR)
    floors = floor_key(args)
    counts = {"applied": 0}
    applied_log: list[tuple[str, int, float]] = []

    def on_applied(batch: Any) -> None:
        argv: list[Any] = []
        for a in batch:
            assert isinstance(a, AppliedInvalidation)
            argv += [a.event.aggregate_id, a.version]
        if not args.no_floors:
            raise_floor(keys=[floors], args=argv)
            client.incrby(f"{args.prefix}:applied", len(batch))
        counts["applied"] += len(batch)
        if args.applied_log is not None:
            now = time.time()
            applied_log.extend((a.event.aggregate_id, a.version, now) for a in batch)

    invalidator = CacheInvalidator(cache, item_key, on_applied=on_applied, retry_after_s=0.2)
    config = {
        "bootstrap.servers": os.environ["KCONS_KAFKA_BOOTSTRAP"],
        "group.id": f"{args.prefix}-invalidator",
        "group.instance.id": f"{args.prefix}-invalidator-0",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }
    freeze_startup_heap()  # as `kcons cache invalidator` does
    invalidator.run(config, [args.topic], stop=stop, batched=args.batched)  # both loops are exercised
    client.close()
    if args.applied_log is not None:
        with open(args.applied_log, "w") as f:
            json.dump(applied_log, f)
    return {"role": "invalidator", "batched": args.batched, **counts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["relay", "writer", "reader", "invalidator"])
    parser.add_argument("--topic", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--relay-mode", default="transactional")
    parser.add_argument("--commit-log", default=None)
    parser.add_argument("--applied-log", default=None)
    parser.add_argument("--published-log", default=None, help="relay: when each row's batch was committed to Kafka")
    parser.add_argument("--batched", action="store_true", help="invalidator: the batched loop")
    parser.add_argument("--no-floors", action="store_true", help="benchmark: do not record floors")
    parser.add_argument("--unguarded-fills", action="store_true", help="negative control: break the fill guard")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{args.role} %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    runner = {"relay": run_relay, "writer": run_writer, "reader": run_reader, "invalidator": run_invalidator}
    result = runner[args.role](args, stop)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
