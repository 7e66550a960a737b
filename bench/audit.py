"""Benchmark: `kcons audit topic` (kcons.audit.audit_topic) against a raw confluent-kafka loop over the same records.

Both read the same pre-produced topic (``--messages`` records of ``--value-size`` bytes, each with
the kcons envelope headers, as the outbox relay writes them) with ``assign()`` from the beginning
to the high watermark, with the same consumer settings and batch size. The baseline only reads
each record's value and headers (``for msg in consumer.consume(n): msg.value(); msg.headers()``);
``baseline_map`` reads them with ``map`` over the Message methods (the fastest pure read).
The audit does the whole check (duplicates, versions strict, partitions). Rounds alternate the
order; medians are reported; ``ratio`` = audit / baseline (per-message loop) and ``ratio_vs_map``
= audit / baseline_map. ``cpu_us_per_msg`` is this process's CPU time per record (Python and
librdkafka's threads) and ``ratio_cpu`` = baseline's / audit's, the steadier measure when the
machine is shared.

    python bench/audit.py [--messages 1000000] [--value-size 100] [--partitions 4] [--rounds 3]
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

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kcons.audit import VersionCheck, audit_topic
from kcons.envelope import Envelope
from kcons.testing import start_stack

log = logging.getLogger("bench.audit")
BATCH = 10_000


def create_topic(bootstrap: str, partitions: int) -> str:
    name = f"bench-audit-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(60)
    return name


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


def _consumer(bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "fetch.queue.backoff.ms": 10,
        }
    )


def raw(bootstrap: str, topic: str, partitions: int, messages: int, use_map: bool) -> int:
    """Read every record's value and headers, from the beginning, until ``messages`` were read."""
    consumer = _consumer(bootstrap)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    read = 0
    try:
        while read < messages:
            msgs = consumer.consume(BATCH, 1.0)
            if use_map:
                data = [m for m in msgs if m.error() is None] if any(map(Message.error, msgs)) else msgs
                list(map(Message.value, data))
                list(map(Message.headers, data))
                read += len(data)
            else:
                for msg in msgs:
                    if msg.error() is not None:
                        continue
                    msg.value()
                    msg.headers()
                    read += 1
    finally:
        consumer.close()
    return read


def kcons_audit(bootstrap: str, topic: str, messages: int) -> int:
    report = audit_topic({"bootstrap.servers": bootstrap}, topic, versions=VersionCheck.STRICT, batch_size=BATCH)
    assert report.ok and report.records == messages, report.as_dict()
    return report.records


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """(records/s, CPU µs per record) of one run."""
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
    with start_stack(kafka=True, redis=False, postgres=False) as stack:
        bootstrap = stack.kafka_bootstrap
        topic = create_topic(bootstrap, args.partitions)
        t0 = time.perf_counter()
        fill(bootstrap, topic, args.messages, args.value_size, args.aggregates)
        log.info("produced %d records in %.1fs", args.messages, time.perf_counter() - t0)
        variants: dict[str, Callable[[], int]] = {
            "baseline": lambda: raw(bootstrap, topic, args.partitions, args.messages, use_map=False),
            "baseline_map": lambda: raw(bootstrap, topic, args.partitions, args.messages, use_map=True),
            "kcons": lambda: kcons_audit(bootstrap, topic, args.messages),
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else reversed(names):
                results[name].append(timed(variants[name]))
                log.info("round %d %s: %.0f records/s", r, name, results[name][-1][0])

    def summary(name: str) -> dict[str, Any]:
        rates = [x[0] for x in results[name]]
        return {
            "records_per_s": round(statistics.median(rates)),
            "runs": [round(x) for x in rates],
            "cpu_us_per_msg": round(statistics.median(x[1] for x in results[name]), 3),
        }

    out = {
        "name": "audit",
        "baseline": summary("baseline"),
        "baseline_map": summary("baseline_map"),
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
        },
    }
    k = out["kcons"]["records_per_s"]
    out["ratio"] = round(k / out["baseline"]["records_per_s"], 3)
    out["ratio_vs_map"] = round(k / out["baseline_map"]["records_per_s"], 3)
    # CPU time per record is far steadier than wall-clock throughput on a shared machine.
    out["ratio_cpu"] = round(out["baseline"]["cpu_us_per_msg"] / out["kcons"]["cpu_us_per_msg"], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
