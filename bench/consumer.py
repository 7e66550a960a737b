"""Benchmark: IdempotentConsumer (Redis and memory dedup stores) against a raw confluent-kafka consumer.

All variants read the same pre-produced topic (every message carries a ``kcons-id`` header) with
a fresh consumer group, run the same trivial handler, and commit once per batch. kcons by default
sends the commit after the batch's effects and goes on (its ``async_commit``), so the baseline in
``ratio`` does the same (``commit(asynchronous=True)``); the ``sync_commit`` part compares both
waiting for every commit (the raw consumer with ``asynchronous=False``, kcons with
``async_commit=False``). Throughput is measured from the first to the last message (group
join excluded). Rounds alternate the order of the variants and the median of each is
reported; ``ratio`` = Redis store / baseline. ``redis_in_turn`` is the Redis store with
``claim_ahead=False`` (each batch's claim answered before the batch is handled), in the same
run. ``baseline_read_id`` is the baseline that also reads each message's ``kcons-id`` header
(what the id alone costs, apart from kcons).
``cpu_us_per_msg`` is this process's CPU time (Python and librdkafka's threads) per message over
the whole run, the steadier measure of cost.

Every variant gets ``fetch.queue.backoff.ms=--fetch-queue-backoff-ms`` (10 by default;
``-1`` keeps librdkafka's 1,000 ms). librdkafka compares the *whole* consumer queue with
``queued.min.messages`` before fetching a partition, and at its default backoff a raw consumer
that drained the prefetched messages then received nothing for 200-750 ms (seen on this
benchmark's topic in about one run of three: 149k msgs/s against 0.5-1.1 M without the stall),
which measured librdkafka's backoff instead of the consumers.

    python bench/consumer.py [--messages 200000] [--rounds 3] [--batch-size 500] [--partitions 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from _topics import BenchTopics
from confluent_kafka import Consumer, Producer

from kcons.adapters.memory import MemoryDedupStore
from kcons.adapters.redis import RedisDedupStore
from kcons.consumer import IdempotentConsumer
from kcons.envelope import new_event_id
from kcons.testing import start_stack

log = logging.getLogger("bench.consumer")


def fill(bootstrap: str, topic: str, messages: int, value_size: int) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000, "compression.type": "lz4"}
    )
    value = b"x" * value_size
    for i in range(messages):
        headers = [("kcons-id", new_event_id().encode())]
        while True:
            try:
                producer.produce(topic, value=value, key=str(i % 1000).encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("could not produce the benchmark data")


#: Consumer settings every variant shares (set from the command line).
SHARED_CONFIG: dict[str, Any] = {}


def consumer_config(bootstrap: str) -> dict[str, Any]:
    return {
        **SHARED_CONFIG,
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-{uuid.uuid4().hex[:10]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }


class Sink:
    """The trivial handler every variant runs: count messages and bytes."""

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.first_at = 0.0
        self.last_at = 0.0

    def __call__(self, msg: Any) -> None:
        if self.count == 0:
            self.first_at = time.perf_counter()
        self.count += 1
        self.bytes += len(msg.value())


def run_baseline(
    bootstrap: str, topic: str, messages: int, batch_size: int, *, asynchronous: bool = False, read_id: bool = False
) -> float:
    """The raw consumer: consume a batch, run the handler, commit the batch (waiting for it unless ``asynchronous``).

    ``read_id``: also read each message's ``kcons-id`` header, the least any dedup must do.
    """
    sink = Sink()
    ids: list[bytes] = []
    consumer = Consumer(consumer_config(bootstrap))
    consumer.subscribe([topic])
    deadline = time.monotonic() + 600
    try:
        while sink.count < messages and time.monotonic() < deadline:
            batch = consumer.consume(batch_size, 0.2)
            if not batch:
                continue
            for msg in batch:
                if msg.error() is None:
                    if read_id:
                        ids.append(dict(msg.headers())["kcons-id"])
                    sink(msg)
            ids.clear()
            consumer.commit(asynchronous=asynchronous)
        sink.last_at = time.perf_counter()
    finally:
        consumer.close()
    return sink.count / (sink.last_at - sink.first_at)


def run_kcons(
    bootstrap: str, topic: str, messages: int, batch_size: int, make_store: Callable[[str], Any], **kw: Any
) -> float:
    sink = Sink()
    cfg = consumer_config(bootstrap)
    consumer = IdempotentConsumer(cfg, [topic], sink, store=make_store(cfg["group.id"]), batch_size=batch_size, **kw)
    deadline = time.monotonic() + 600
    try:
        while sink.count < messages and time.monotonic() < deadline:
            consumer.poll_once()
        sink.last_at = time.perf_counter()
        if consumer.stats.duplicates:
            raise RuntimeError(f"unexpected duplicates in the benchmark data: {consumer.stats}")
    finally:
        consumer.close()
    return sink.count / (sink.last_at - sink.first_at)


def redis_cpu_s(client: Any) -> float:
    """The Redis server's CPU seconds so far (system + user, INFO cpu)."""
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--fetch-queue-backoff-ms", type=int, default=10, help="-1: librdkafka's default")
    parser.add_argument(
        "--variants", default="", help="comma-separated variants to run (default: all; the ratios' sides always run)"
    )
    args = parser.parse_args()
    if args.fetch_queue_backoff_ms >= 0:
        SHARED_CONFIG["fetch.queue.backoff.ms"] = args.fetch_queue_backoff_ms
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import redis

    with start_stack(kafka=True, redis=True, postgres=False) as stack, BenchTopics(stack.kafka_bootstrap) as topics:
        bootstrap = stack.kafka_bootstrap
        client = redis.Redis.from_url(stack.redis_url)
        topic = topics.new("bench-consumer", args.partitions)
        t0 = time.perf_counter()
        fill(bootstrap, topic, args.messages, args.value_size)
        log.warning("produced %d messages in %.1fs", args.messages, time.perf_counter() - t0)
        variants: dict[str, Callable[[], float]] = {
            "baseline": lambda: run_baseline(bootstrap, topic, args.messages, args.batch_size),
            "baseline_async_commit": lambda: run_baseline(
                bootstrap, topic, args.messages, args.batch_size, asynchronous=True
            ),
            "baseline_read_id": lambda: run_baseline(
                bootstrap, topic, args.messages, args.batch_size, asynchronous=True, read_id=True
            ),
            "redis": lambda: run_kcons(
                bootstrap, topic, args.messages, args.batch_size, lambda g: RedisDedupStore(client, namespace=g)
            ),
            # The same store with claim_ahead=False: each batch's claim answered before it is handled.
            "redis_in_turn": lambda: run_kcons(
                bootstrap,
                topic,
                args.messages,
                args.batch_size,
                lambda g: RedisDedupStore(client, namespace=g),
                claim_ahead=False,
            ),
            "memory": lambda: run_kcons(
                bootstrap, topic, args.messages, args.batch_size, lambda g: MemoryDedupStore(max_entries=1_000_000)
            ),
            # Like for like with the baseline's commit: wait for every commit (async_commit=False).
            "memory_sync_commit": lambda: run_kcons(
                bootstrap,
                topic,
                args.messages,
                args.batch_size,
                lambda g: MemoryDedupStore(max_entries=1_000_000),
                async_commit=False,
            ),
        }
        if args.variants:
            wanted = {"baseline", "baseline_async_commit", "baseline_read_id", "redis", "memory"}
            wanted.update(args.variants.split(","))
            variants = {name: run for name, run in variants.items() if name in wanted}
        results: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        redis_cpu: dict[str, list[float]] = {"redis": [], "redis_in_turn": []}  # Redis server CPU per message
        order = list(variants)
        for r in range(args.rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                server_before = redis_cpu_s(client)
                before = resource.getrusage(resource.RUSAGE_SELF)
                rate = variants[name]()
                after = resource.getrusage(resource.RUSAGE_SELF)
                used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                results[name].append(rate)
                cpu[name].append(used / args.messages * 1e6)
                if name in redis_cpu:
                    redis_cpu[name].append((redis_cpu_s(client) - server_before) / args.messages * 1e6)
                log.warning("round %d %s: %.0f msgs/s, %.2f us CPU/msg", r + 1, name, rate, cpu[name][-1])
        client.close()

    median = {name: statistics.median(rates) for name, rates in results.items()}

    def side(name: str) -> dict[str, Any]:
        return {
            "msgs_per_s": round(median[name]),
            "rounds": [round(x) for x in results[name]],
            "cpu_us_per_msg": round(statistics.median(cpu[name]), 2),
        }

    def ratio(name: str, base: str) -> float:
        return round(median[name] / median[base], 3)

    out = {
        "name": "consumer",
        "unit": "msgs/s",
        # The baseline commits the way kcons does by default (sent after the batch, not waited for):
        # like for like. The waiting variant of each is reported beside it.
        "baseline": side("baseline_async_commit"),
        "kcons": {"redis_store": side("redis"), "memory_store": side("memory")},
        # The Redis server's own CPU time (INFO used_cpu_sys + used_cpu_user deltas) per message
        # over the Redis store's runs: the store's cost on the shared cores, apart from this process.
        "redis_server_cpu_us_per_msg": round(statistics.median(redis_cpu["redis"]), 2),
        # claim_ahead=False (each batch's claim answered before the batch is handled), same store.
        "redis_in_turn": {
            **side("redis_in_turn"),
            "redis_server_cpu_us_per_msg": round(statistics.median(redis_cpu["redis_in_turn"]), 2),
            "ratio_vs_baseline_read_id": ratio("redis_in_turn", "baseline_read_id"),
        }
        if redis_cpu["redis_in_turn"]
        else None,
        "ratio": ratio("redis", "baseline_async_commit"),
        "ratio_memory": ratio("memory", "baseline_async_commit"),
        # The raw consumer that also reads every message's kcons-id header (the least a dedup
        # needs; librdkafka parses headers on first access): what the id alone costs, apart from kcons.
        "baseline_read_id": side("baseline_read_id"),
        "ratio_vs_baseline_read_id": {
            "redis_store": ratio("redis", "baseline_read_id"),
            "memory_store": ratio("memory", "baseline_read_id"),
        },
        "sync_commit": {
            "baseline": side("baseline"),
            "kcons_memory_store": side("memory_sync_commit"),
            "ratio_memory": ratio("memory_sync_commit", "baseline"),
        }
        if "memory_sync_commit" in results
        else None,
        "messages": args.messages,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "partitions": args.partitions,
        "value_size": args.value_size,
        "shared_consumer_config": SHARED_CONFIG,
        "handler": "count messages and bytes",
        "commit": "once per batch; ratio: both sides send it without waiting; sync_commit: both wait",
        "load_average_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
