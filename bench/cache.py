"""Benchmark: ConsistentCache hit path against a plain Redis GET, and commit-to-invalidation latency.

1. **Hit path.** The same client reads the same key holding a value of ``--value-size`` bytes:
   the baseline is ``redis.Redis.get`` of a plain key, kcons is ``ConsistentCache.get`` (one GET
   of the packed entry, decode, metrics). The two sides alternate in short chunks so that both
   see the same noise from other processes; ``ratio`` is kcons reads per second over baseline
   reads per second, over all chunks (``best_chunk_ratio`` compares the best chunk of each).
2. **Commit to invalidation.** Writer threads update rows at ``--rate`` writes per second, each
   with its change event added to the kcons outbox in the same transaction (every thread
   connects before the first write, so start-up work is outside the measured window); the
   outbox relay (default polling, woken by the outbox trigger's NOTIFY) publishes to Kafka;
   the relay and invalidator processes freeze their start-up heap as the ``kcons`` commands
   do; two ``CacheInvalidator`` processes write tombstones, one on the batched
   path (no dedup store) and one through ``IdempotentConsumer`` with a dedup store, each in its
   own consumer group and Redis prefix, reading the same records at the same time. Latency per
   write = Redis acknowledged the tombstone - the writer's commit returned (same machine clock).
   A plain ``read_committed`` consumer on the same topic records when each event became
   readable from Kafka (commit-to-consumable): the relay's and Kafka's share, reported apart as
   ``kafka_commit_to_consumable_p99_ms``; ``invalidator_share_p99_ms`` is consumable-to-invalidated.
   Kafka's share is split at the moment the relay's transaction commit returned (its
   ``on_published`` hook): ``kafka_share_p99_ms.commit_to_relay_committed`` (waiting in the
   outbox, the relay's read, produce and commit) and ``kafka_share_p99_ms.relay_committed_to_consumable``
   (the broker's transaction markers and the read_committed fetch).

The last line of output is one JSON object (see docs/architecture.md, "Benchmarks and fault runs").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis
from _topics import BenchTopics
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kcons.cache import CacheSettings, ConsistentCache, Versioned
from kcons.envelope import read_envelope
from kcons.outbox import install_schema
from kcons.runtime import freeze_startup_heap
from kcons.testing import child_env, start_stack

log = logging.getLogger("bench.cache")
WORKER = Path(__file__).resolve().parents[1] / "tests" / "fault" / "_cache_worker.py"


def hit_path(redis_url: str, rounds: int, ops: int, value_size: int) -> dict[str, Any]:
    """Reads per second of a plain GET and of ConsistentCache.get on a hit, best of ``rounds`` each."""
    client = redis.Redis.from_url(redis_url)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    cache = ConsistentCache(client, name="bench", settings=CacheSettings(prefix=prefix))
    value = os.urandom(value_size)
    assert cache.get("item:1", lambda key: Versioned(value, 1)) == Versioned(value, 1)
    plain_key = f"{prefix}:plain"
    client.set(plain_key, b"v1:" + value)
    get = client.get

    def loader(key: str) -> Any:
        raise AssertionError("the benchmark key must always hit")

    # Alternate short chunks so both sides see the same noise; totals give the ratio, best chunks the peak.
    chunk = max(100, min(1000, ops // 10))
    chunks = max(1, ops // chunk)
    base: list[float] = []
    kc: list[float] = []
    base_time = kc_time = 0.0
    for _ in range(rounds * chunks):
        started = time.perf_counter()
        for _ in range(chunk):
            get(plain_key)
        elapsed = time.perf_counter() - started
        base_time += elapsed
        base.append(chunk / elapsed)
        started = time.perf_counter()
        for _ in range(chunk):
            cache.get("item:1", loader)
        elapsed = time.perf_counter() - started
        kc_time += elapsed
        kc.append(chunk / elapsed)
    total = rounds * chunks * chunk
    client.delete(plain_key)
    client.close()
    return {
        "baseline": {"reads_per_s": round(total / base_time), "best_chunk_reads_per_s": round(max(base))},
        "kcons": {"reads_per_s": round(total / kc_time), "best_chunk_reads_per_s": round(max(kc))},
        "ratio": round(base_time / kc_time, 3),
        "best_chunk_ratio": round(max(kc) / max(base), 3),
        "reads_per_side": total,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)

    return {"count": len(ordered), "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0)}


def _spawn(role: str, env: dict[str, str], common: list[str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), role, *common, *extra], env=env, text=True)


def _stop(proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail_topic(
    bootstrap: str,
    topic: str,
    stop: threading.Event,
    seen: dict[tuple[str, int], float],
) -> None:
    """The reference: when each event became readable from Kafka (read_committed).

    A plain consumer doing nothing else: its figure is the relay's and Kafka's part (outbox read,
    transaction commit, broker, fetch), apart from the invalidator's.
    """
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-tail-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    try:
        while not stop.is_set():
            msg = consumer.poll(0.05)
            if msg is None or msg.error() is not None:
                continue
            now = time.time()
            env = read_envelope(msg.key(), msg.value(), msg.headers())
            if env is not None and env.version is not None:
                seen.setdefault((env.aggregate_id, env.version), now)
    finally:
        consumer.close()


def _applied_times(path: Path) -> dict[tuple[str, int], float]:
    """When each (aggregate id, version) was first applied, from an invalidator's applied log."""
    applied: dict[tuple[str, int], float] = {}
    for i, v, t in json.loads(path.read_text()):
        applied.setdefault((str(i), int(v)), float(t))
    return applied


def invalidation_latency(
    stack: Any, rate: float, seconds: float, rows: int, threads: int, relay_mode: str, modes: list[str]
) -> dict[str, Any]:
    """Commit-to-invalidated latency through outbox, relay, Kafka and each invalidator at ``rate`` writes/s.

    One writer, one relay and one topic; every invalidator in ``modes`` (``batched``,
    ``idempotent_consumer``) and the plain reference consumer read the same records at the same
    time (each invalidator in its own group and Redis prefix), so the paths are compared on the
    very same events and the same machine noise.
    """
    name = f"bench_cache_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(stack.postgres_dsn)
    params["dbname"] = name
    dsn = make_conninfo("", **params)
    workdir = Path(tempfile.mkdtemp(prefix="kcons-bench-cache-"))
    topics = BenchTopics(stack.kafka_bootstrap)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            install_schema(conn)
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, version bigint NOT NULL, name text NOT NULL)")
            conn.execute("INSERT INTO items SELECT g, 1, 'v1' FROM generate_series(1, %s) g", (rows,))
        topic = topics.new("bench-cache", 3, replication_factor=-1)
        prefix = f"benchinv{uuid.uuid4().hex[:6]}"
        env = child_env(stack, {"KCONS_POSTGRES_DSN": dsn})
        common = ["--topic", topic, "--rows", str(rows)]
        commit_log = workdir / "commits.json"
        applied_logs = {mode: workdir / f"applied-{mode}.json" for mode in modes}
        tail_seen: dict[tuple[str, int], float] = {}
        tail_stop = threading.Event()
        freeze_startup_heap()  # the reference consumer's process, like the services: no full collection mid-run
        tail = threading.Thread(target=_tail_topic, args=(stack.kafka_bootstrap, topic, tail_stop, tail_seen))
        tail.start()
        published_log = workdir / "published.json"
        relay_args = ["--relay-mode", relay_mode, "--published-log", str(published_log)]
        relay = _spawn("relay", env, [*common, "--prefix", prefix], *relay_args)
        invalidators = [
            _spawn(
                "invalidator",
                env,
                [*common, "--prefix", f"{prefix}{n}"],
                "--no-floors",
                "--applied-log",
                str(applied_logs[mode]),
                *(["--batched"] if mode == "batched" else []),
            )
            for n, mode in enumerate(modes)
        ]
        time.sleep(8.0)  # relay leadership and consumer groups settle before the clock starts
        writer = _spawn(
            "writer",
            env,
            [*common, "--prefix", prefix],
            "--rate",
            str(rate),
            "--threads",
            str(threads),
            "--commit-log",
            str(commit_log),
        )
        time.sleep(seconds)
        _stop(writer)
        time.sleep(5.0)  # drain
        for proc in invalidators:
            _stop(proc)
        _stop(relay)
        tail_stop.set()
        tail.join(30)
        commits = {(str(i), int(v)): float(t) for i, v, t in json.loads(commit_log.read_text())}
        ref = [tail_seen[k] - t for k, t in commits.items() if k in tail_seen]
        published: dict[tuple[str, int], float] = {}
        for i, v, t in json.loads(published_log.read_text()):
            published.setdefault((str(i), int(v)), float(t))
        out: dict[str, Any] = {
            "writes": len(commits),
            # Over the span of the commits: the writer process's start-up is not writing time.
            "writes_per_s": round((len(commits) - 1) / (max(commits.values()) - min(commits.values())), 1),
            "commit_to_consumable_reference": _percentiles(ref),
            # Kafka's share split where the relay's commit_transaction returned.
            "commit_to_relay_committed": _percentiles([published[k] - t for k, t in commits.items() if k in published]),
            "relay_committed_to_consumable": _percentiles(
                [tail_seen[k] - published[k] for k in commits if k in published and k in tail_seen]
            ),
        }
        for mode in modes:
            applied = _applied_times(applied_logs[mode])
            lat = [applied[k] - t for k, t in commits.items() if k in applied]
            after_kafka = [applied[k] - tail_seen[k] for k in commits if k in applied and k in tail_seen]
            if os.environ.get("KCONS_BENCH_DEBUG"):
                first = min(commits.values())
                for k, t in sorted(commits.items(), key=lambda kv: kv[1])[:: max(1, len(commits) // 20)]:
                    print(
                        f"{mode} t+{t - first:6.2f}s commit->applied {1000 * (applied.get(k, float('nan')) - t):8.1f}"
                        f" ms commit->consumable {1000 * (tail_seen.get(k, float('nan')) - t):8.1f} ms",
                        file=sys.stderr,
                    )
            out[mode] = {
                "invalidated": len(lat),
                "commit_to_invalidated": _percentiles(lat),
                # The invalidator's own part, per event: consumable (seen by the reference) -> applied.
                # Both consumers race for the same records, so some values are negative.
                "consumable_to_invalidated": _percentiles(after_kafka),
            }
        return out
    finally:
        topics.drop()
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=20_000, help="reads per round and side")
    parser.add_argument("--value-size", type=int, default=256)
    parser.add_argument("--rate", type=float, default=1000.0, help="writes per second for the latency part")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the latency part")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8, help="writer threads")
    parser.add_argument("--relay-mode", choices=["transactional", "idempotent"], default="transactional")
    parser.add_argument("--invalidator", choices=["both", "idempotent", "batched"], default="both")
    parser.add_argument("--latency-only", action="store_true", help="skip the hit-path part")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.ops, args.seconds = 3, 3000, 5.0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    modes = {"both": ["batched", "idempotent_consumer"], "idempotent": ["idempotent_consumer"], "batched": ["batched"]}
    load_before = os.getloadavg()[0]
    with start_stack() as stack:
        hits = None if args.latency_only else hit_path(stack.redis_url, args.rounds, args.ops, args.value_size)
        latency = invalidation_latency(
            stack, args.rate, args.seconds, args.rows, args.threads, args.relay_mode, modes[args.invalidator]
        )
    ref = latency["commit_to_consumable_reference"]
    paths = {mode: latency[mode] for mode in modes[args.invalidator]}
    p99 = {mode: lat["commit_to_invalidated"].get("p99_ms") for mode, lat in paths.items()}
    result = {
        "name": "cache",
        "baseline": {
            "hit_path": hits["baseline"] if hits else None,
            "commit_to_consumable": ref,
            "commit_to_relay_committed": latency["commit_to_relay_committed"],
            "relay_committed_to_consumable": latency["relay_committed_to_consumable"],
        },
        "kcons": {
            "hit_path": hits["kcons"] if hits else None,
            "invalidation": paths,
            "writes": latency["writes"],
            "writes_per_s": latency["writes_per_s"],
        },
        "ratio": hits["ratio"] if hits else None,
        "best_chunk_ratio": hits["best_chunk_ratio"] if hits else None,
        # Source commit -> Redis invalidated, per path (both paths read the same records at the same
        # time); and, apart, source commit -> consumable from Kafka (read_committed) measured by a
        # plain consumer on those records: the relay's and Kafka's share, which no invalidator
        # setting can remove.
        "commit_to_invalidated_p99_ms": p99,
        "kafka_commit_to_consumable_p99_ms": ref.get("p99_ms"),
        "kafka_share_p99_ms": {
            "commit_to_relay_committed": latency["commit_to_relay_committed"].get("p99_ms"),
            "relay_committed_to_consumable": latency["relay_committed_to_consumable"].get("p99_ms"),
        },
        "invalidator_share_p99_ms": {
            mode: lat["consumable_to_invalidated"].get("p99_ms") for mode, lat in paths.items()
        },
        "target_met": {mode: v is not None and v <= 50 for mode, v in p99.items()},
        "unit": "reads/s (hit path); latency in ms",
        "targets": {"ratio": ">= 0.8", "commit_to_invalidated_p99_ms": "<= 50 at 1000 writes/s, on both paths"},
        "rounds": args.rounds,
        "ops": args.ops,
        "value_size": args.value_size,
        "rate": args.rate,
        "seconds": args.seconds,
        "rows": args.rows,
        "writer_threads": args.threads,
        "relay_mode": args.relay_mode,
        "cpus": os.cpu_count(),
        "load_average_1m": {"start": round(load_before, 1), "end": round(os.getloadavg()[0], 1)},
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
