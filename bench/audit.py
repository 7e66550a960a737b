"""Benchmark: `kcons audit topic` (kcons.audit.audit_topic) against a raw confluent-kafka loop over the same records.

Both read the same pre-produced topic (``--messages`` records of ``--value-size`` bytes, each with
the kcons envelope headers, as the outbox relay writes them) with ``assign()`` from the beginning
to the end, with the same consumer config (kcons.kafka.reader.reader_config, which the audit's
reader uses) and the same consume batch size. The baseline only reads each record's value and
headers (``for msg in consumer.consume(n): msg.value(); msg.headers()``); the audit does the whole
check (duplicates, versions strict, partitions) and reads the headers too.

The audit raises the garbage collector's young threshold while it reads (the header lists and
tuples confluent-kafka builds per record are containers the collector would rescan);
``baseline_gc`` is the same raw loop under that same setting, so ``ratio_cpu_same_gc`` says what
the checks cost with the collector's share taken out of the comparison.

Each round runs every variant once, in a rotated order (each variant takes each place in turn),
with a full collection before each run. Per run: wall-clock records/s and this process's CPU time
(user + system from getrusage: Python and librdkafka's threads) per record. Reported: medians;
``ratio`` = audit / baseline records/s (wall clock); ``ratio_cpu`` = baseline / audit CPU µs per
record, the steadier measure on a shared machine; ``paired`` = the median of the per-round ratios
(runs of one round are close in time, so they share the machine's load); the load average
before and after.

    python bench/audit.py [--messages 1000000] [--value-size 100] [--partitions 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from _topics import BenchTopics
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from kcons.audit import VersionCheck, audit_topic
from kcons.audit.topic import _fewer_collections as fewer_collections  # the audit's own GC setting
from kcons.envelope import Envelope
from kcons.kafka.reader import reader_config
from kcons.testing import start_stack

log = logging.getLogger("bench.audit")
BATCH = 10_000


def fill(bootstrap: str, topic: str, messages: int, value_size: int, aggregates: int) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000, "compression.type": "lz4"}
    )
    value = b"x" * value_size
    versions: dict[int, int] = {}
    for i in range(messages):
        a = i % aggregates
        versions[a] = versions.get(a, 0) + 1
        env = Envelope("changed", "order", f"order-{a}", value, version=versions[a])
        while True:
            try:
                producer.produce(topic, value, env.key, headers=env.headers())
                break
            except BufferError:
                producer.poll(0.1)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0


def raw(bootstrap: str, topic: str, partitions: int, messages: int) -> int:
    """Read every record's value and headers, from the beginning, until ``messages`` were read."""
    consumer = Consumer(reader_config({"bootstrap.servers": bootstrap}, "read_committed"))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    read = 0
    try:
        while read < messages:
            for msg in consumer.consume(BATCH, 1.0):
                if msg.error() is not None:
                    continue
                msg.value()
                msg.headers()
                read += 1
    finally:
        consumer.close()
    return read


def raw_same_gc(bootstrap: str, topic: str, partitions: int, messages: int) -> int:
    """:func:`raw` under the garbage collector setting the audit reads with."""
    with fewer_collections():
        return raw(bootstrap, topic, partitions, messages)


def kcons_audit(bootstrap: str, topic: str, messages: int) -> int:
    report = audit_topic(
        {"bootstrap.servers": bootstrap}, topic, versions=VersionCheck.STRICT, batch_size=BATCH, idle_timeout_s=60
    )
    assert report.ok and report.records == messages, report.as_dict()
    return report.records


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """(records/s, CPU µs per record) of one run, after a full collection (no garbage charged to it)."""
    gc.collect()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return n / dt, cpu / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--aggregates", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    with start_stack(kafka=True, redis=False, postgres=False) as stack, BenchTopics(stack.kafka_bootstrap) as topics:
        bootstrap = stack.kafka_bootstrap
        topic = topics.new("bench-audit", args.partitions)
        t0 = time.perf_counter()
        fill(bootstrap, topic, args.messages, args.value_size, args.aggregates)
        log.info("produced %d records in %.1fs", args.messages, time.perf_counter() - t0)
        variants: dict[str, Callable[[], int]] = {
            "baseline": lambda: raw(bootstrap, topic, args.partitions, args.messages),
            "baseline_gc": lambda: raw_same_gc(bootstrap, topic, args.partitions, args.messages),
            "kcons": lambda: kcons_audit(bootstrap, topic, args.messages),
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        names = list(variants)
        load_before = os.getloadavg()
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                results[name].append(timed(variants[name]))
                rate, cpu = results[name][-1]
                log.info("round %d %s: %.0f records/s, %.3f CPU us/record", r, name, rate, cpu)
        load_after = os.getloadavg()

    def summary(name: str) -> dict[str, Any]:
        rates = [x[0] for x in results[name]]
        cpus = [x[1] for x in results[name]]
        return {
            "records_per_s": round(statistics.median(rates)),
            "runs": [round(x) for x in rates],
            "cpu_us_per_msg": round(statistics.median(cpus), 3),
            "cpu_runs": [round(x, 3) for x in cpus],
        }

    def paired(base: str, wall: bool) -> float:
        """Median over rounds of that round's ratio (both runs of a round share the machine's load)."""
        pairs = zip(results[base], results["kcons"], strict=True)
        return round(statistics.median(k[0] / b[0] if wall else b[1] / k[1] for b, k in pairs), 3)

    out: dict[str, Any] = {
        "name": "audit",
        "baseline": summary("baseline"),
        "baseline_gc": summary("baseline_gc"),
        "kcons": summary("kcons"),
        "unit": "records/s",
        "settings": {
            "messages": args.messages,
            "value_size": args.value_size,
            "partitions": args.partitions,
            "aggregates": args.aggregates,
            "rounds": args.rounds,
            "batch": BATCH,
            "versions": "strict",
            "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after],
        },
    }
    k = out["kcons"]
    out["ratio"] = round(k["records_per_s"] / out["baseline"]["records_per_s"], 3)
    out["ratio_same_gc"] = round(k["records_per_s"] / out["baseline_gc"]["records_per_s"], 3)
    out["ratio_cpu"] = round(out["baseline"]["cpu_us_per_msg"] / k["cpu_us_per_msg"], 3)
    out["ratio_cpu_same_gc"] = round(out["baseline_gc"]["cpu_us_per_msg"] / k["cpu_us_per_msg"], 3)
    out["paired"] = {
        "ratio": paired("baseline", True),
        "ratio_cpu": paired("baseline", False),
        "ratio_same_gc": paired("baseline_gc", True),
        "ratio_cpu_same_gc": paired("baseline_gc", False),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
