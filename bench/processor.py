"""Benchmark: TransactionalProcessor (exactly-once) against a raw at-least-once consume-produce-commit loop.

Both sides read the same pre-produced input topic (each with its own consumer group) and copy
every record to their own output topic, in batches of the same size. The baseline is the
usual at-least-once loop with plain confluent-kafka clients: ``consume`` a batch, ``produce``
each output with an idempotent producer, ``flush``, then ``commit`` the offsets synchronously.
kcons is :class:`kcons.processor.TransactionalProcessor` (read_committed, reads of the same
size, one transaction with the offsets inside every ``--commit-interval-s``).
Throughput is measured from the first consumed record to the
last commit, so group joins do not count; rounds are interleaved and the best of each side
counts. The last line of output is one JSON object (see docs/architecture.md, "Benchmarks and fault runs").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from typing import Any

from _topics import BenchTopics
from confluent_kafka import Consumer, Message, Producer

from kcons.processor import Output, ProcessorStats, TransactionalProcessor
from kcons.testing import start_stack

log = logging.getLogger("bench.processor")


def fill_input(bootstrap: str, topic: str, n: int, size: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    payload = os.urandom(size)
    for i in range(n):
        while True:
            try:
                producer.produce(topic, payload, str(i % 1000).encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("input not fully written")


def run_baseline(bootstrap: str, topic_in: str, n: int, batch: int) -> dict[str, Any]:
    """At-least-once: consume a batch, produce, flush, commit synchronously."""
    topic_out = f"{topic_in}-base-out"
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-base-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    failed = [0]

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed[0] += 1

    consumer.subscribe([topic_in])
    done = 0
    batches = 0
    first: float | None = None
    while done < n:
        msgs = [m for m in consumer.consume(batch, 1.0) if m.error() is None]
        if not msgs:
            continue
        if first is None:
            first = time.perf_counter()
        for m in msgs:
            while True:
                try:
                    producer.produce(topic_out, m.value(), m.key(), on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)
        if producer.flush(60):
            raise RuntimeError("baseline flush timed out")
        consumer.commit(asynchronous=False)
        done += len(msgs)
        batches += 1
    elapsed = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    if failed[0]:
        raise RuntimeError(f"baseline: {failed[0]} deliveries failed")
    return {"records": done, "seconds": round(elapsed, 3), "msgs_per_s": round(done / elapsed, 1), "batches": batches}


def run_kcons(bootstrap: str, topic_in: str, n: int, batch: int, commit_interval_s: float) -> dict[str, Any]:
    """TransactionalProcessor copying each record, reading ``batch`` at a time, committing every interval."""
    topic_out = f"{topic_in}-kcons-out"
    group = f"bench-kcons-{uuid.uuid4().hex[:8]}"
    first: list[float] = []
    last: list[float] = []

    def handler(m: Message) -> list[Output]:
        if not first:
            first.append(time.perf_counter())
        return [Output(topic_out, m.value(), m.key())]

    def on_commit(_stats: ProcessorStats) -> None:
        last[:] = [time.perf_counter()]

    proc = TransactionalProcessor(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest"},
        {"bootstrap.servers": bootstrap, "linger.ms": 5},
        [topic_in],
        handler,
        batch_size=batch,
        commit_interval_s=commit_interval_s,
        transactional_id=f"{group}-worker",
        on_commit=on_commit,
    )
    stats = proc.run(max_records=n)
    elapsed = last[0] - first[0]
    return {
        "records": stats.records,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(stats.records / elapsed, 1),
        "transactions": stats.transactions,
        "rewinds": stats.rewinds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--commit-interval-s", type=float, default=0.1)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    rounds: dict[str, list[dict[str, Any]]] = {"baseline": [], "kcons": []}
    with start_stack(redis=False, postgres=False) as stack, BenchTopics(stack.kafka_bootstrap) as topics:
        topic_in = topics.new("bench-proc-in", args.partitions, settle_s=0.5)
        # The output topics the two loops write (auto-created by the broker): deleted with the rest.
        topics.adopt(f"{topic_in}-base-out", f"{topic_in}-kcons-out")
        fill_input(stack.kafka_bootstrap, topic_in, args.records, args.size)
        for rnd in range(args.repeat):
            base = run_baseline(stack.kafka_bootstrap, topic_in, args.records, args.batch)
            kc = run_kcons(stack.kafka_bootstrap, topic_in, args.records, args.batch, args.commit_interval_s)
            log.info("round %d: baseline %s kcons %s", rnd, base, kc)
            rounds["baseline"].append(base)
            rounds["kcons"].append(kc)

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return max(runs, key=lambda r: float(r["msgs_per_s"]))

    baseline, kcons = best(rounds["baseline"]), best(rounds["kcons"])
    out = {
        "name": "processor",
        "baseline": baseline,
        "kcons": kcons,
        "ratio": round(kcons["msgs_per_s"] / baseline["msgs_per_s"], 3),
        "unit": "msgs/s",
        "records": args.records,
        "size": args.size,
        "batch": args.batch,
        "commit_interval_s": args.commit_interval_s,
        "partitions": args.partitions,
        "repeat": args.repeat,
        "all_rounds": rounds,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
