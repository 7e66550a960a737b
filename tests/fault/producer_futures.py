"""Fault run: TransactionalProducer.produce() futures while a broker of a 3-broker cluster is hard-killed.

One producer writes ids 0..n-1 (value = the id) in transactions of random size through
``produce()``, keeping every future. Some transactions are aborted by the application on purpose;
a transaction that fails (abortable error, timeout) is retried with its ids in a new one; one whose
outcome is unknown (IndefiniteOutcomeError) is not retried and its ids are counted apart. Mid-run
a broker is SIGKILLed and restarted. The output is then read with a read_committed consumer.

Checks (all must be 0): ``lost`` (a committed id not in the output), ``duplicates`` (an id more than
once), ``unexpected`` (an id in the output that no committed or unknown-outcome transaction had),
``unsettled`` (a future still pending at the end: every future must complete), ``mismatched`` (a
committed id whose future did not resolve to the record's partition and offset). It runs on the
C path of produce() when kcons.kafka._speedups is built (``accelerated`` in the result says which).
Prints one JSON object last; exit status 0 only when ok.

    python tests/fault/producer_futures.py           # full: 3 brokers, 30,000 ids, 1 broker kill
    python tests/fault/producer_futures.py --quick   # one broker, 3,000 ids, no broker kill
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import random
import sys
import threading
import time
import uuid
from typing import Any

from _kafka import kafka_for_run
from confluent_kafka.admin import AdminClient

from kcons.errors import IndefiniteOutcomeError, KafkaOperationError, TimeoutExceededError
from kcons.kafka import futures as kfutures
from kcons.kafka.futures import DeliveryFuture
from kcons.kafka.producer import TransactionalProducer
from kcons.kafka.reader import RangeReader, RangeSpec
from kcons.testing.plugin import create_topic

log = logging.getLogger("producer_futures")


class _Abort(Exception):
    """The application aborts this transaction on purpose."""


def read_positions(bootstrap: str, topic: str) -> list[tuple[int, int, bytes | None]]:
    """Every (partition, offset, value) of ``topic`` visible to read_committed, up to its last stable offset."""
    with RangeReader({"bootstrap.servers": bootstrap}, topic, RangeSpec(), isolation="read_committed") as reader:
        reader.plan()
        return [(m.partition(), m.offset(), m.value()) for batch in reader.batches() for m in batch]


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as services:
        bootstrap, cluster = kafka_for_run(services, args.brokers)
        admin = AdminClient({"bootstrap.servers": bootstrap})
        run_id = uuid.uuid4().hex[:8]
        topic = create_topic(admin, f"futures-{run_id}", args.partitions, replication=3 if cluster else 1)
        config = {"bootstrap.servers": bootstrap, "transactional.id": f"futures-{run_id}", "linger.ms": 5}
        producer = TransactionalProducer(dict(config), commit_timeout_s=30)

        all_futures: list[DeliveryFuture] = []
        committed: dict[int, DeliveryFuture] = {}  # id -> the future of the transaction that committed it
        unknown: set[int] = set()  # ids of transactions whose outcome is unknown (not retried)
        retry: collections.deque[int] = collections.deque()
        next_id = 0
        counts = collections.Counter[str]()
        broker_down = threading.Event()

        def broker_fault() -> None:
            assert cluster is not None
            time.sleep(args.kill_after_s)
            node = rng.randrange(cluster.size)
            log.info("SIGKILL broker %d", node + 1)
            cluster.kill_node(node)
            broker_down.set()
            time.sleep(args.broker_down_s)
            log.info("restarting broker %d", node + 1)
            cluster.restart_node(node)
            broker_down.clear()
            counts["broker_kills"] += 1

        fault = threading.Thread(target=broker_fault, daemon=True) if cluster else None
        if fault is not None:
            fault.start()
        deadline = time.monotonic() + args.max_seconds
        while (next_id < args.records or retry) and time.monotonic() < deadline:
            size = rng.randint(1, args.batch)
            batch = [retry.popleft() for _ in range(min(len(retry), size))]
            while len(batch) < size and next_id < args.records:
                batch.append(next_id)
                next_id += 1
            futs: dict[int, DeliveryFuture] = {}
            try:
                with producer.transaction():
                    for i in batch:
                        futs[i] = producer.produce(topic, str(i).encode(), f"k{i % 97}".encode())
                        all_futures.append(futs[i])
                    if rng.random() < args.abort_p:
                        raise _Abort
                committed.update(futs)
                counts["commits"] += 1
            except _Abort:
                retry.extend(batch)
                counts["app_aborts"] += 1
            except IndefiniteOutcomeError as exc:
                log.warning("outcome unknown for %d ids: %s", len(batch), exc)
                unknown.update(batch)
                counts["unknown_outcomes"] += 1
            except (KafkaOperationError, TimeoutExceededError) as exc:
                if producer.closed:  # fatal or fenced: a new producer with the same transactional.id
                    log.warning("producer closed (%s); making a new one", exc)
                    producer = TransactionalProducer(dict(config), commit_timeout_s=30)
                    counts["new_producers"] += 1
                else:
                    log.info("transaction failed (%s); its %d ids are retried", type(exc).__name__, len(batch))
                retry.extend(batch)
                counts["failed_transactions"] += 1
                time.sleep(0.2)
        if fault is not None:
            fault.join(timeout=300)
        producer.close()

        records = read_positions(bootstrap, topic)
    seen: collections.defaultdict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    unexpected = 0
    for partition, offset, value in records:
        try:
            seen[int(value or b"")].append((partition, offset))
        except ValueError:
            unexpected += 1
    lost = sum(1 for i in committed if i not in seen)
    duplicates = sum(len(where) - 1 for where in seen.values() if len(where) > 1)
    unexpected += sum(1 for i in seen if i not in committed and i not in unknown)
    unsettled = sum(1 for f in all_futures if not f.done())
    mismatched = 0
    for i, fut in committed.items():
        exc = fut.exception(0) if fut.done() else None
        msg = fut.result(0) if fut.done() and exc is None else None
        if msg is None or [(msg.partition(), msg.offset())] != seen.get(i, [])[:1]:
            mismatched += 1
    faults = counts["broker_kills"] + counts["app_aborts"] + counts["failed_transactions"]
    ok = (
        not (lost or duplicates or unexpected or unsettled or mismatched)
        and len(committed) + len(unknown) == args.records
        and (cluster is None or counts["broker_kills"] == 1)
    )
    return {
        "name": "producer_futures",
        "runs": 1,
        "faults": faults,
        "sent": args.records,
        "committed": len(committed),
        "unknown_outcome": len(unknown),
        "futures": len(all_futures),
        "lost": lost,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "unsettled": unsettled,
        "mismatched": mismatched,
        **{k: counts[k] for k in ("commits", "app_aborts", "failed_transactions", "new_producers", "broker_kills")},
        "accelerated": kfutures.ACCELERATED,
        "seed": args.seed,
        "ok": ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one broker, no broker kill, 3,000 ids")
    ap.add_argument("--records", type=int)
    ap.add_argument("--brokers", type=int, choices=[1, 3])
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--batch", type=int, default=400, help="most ids per transaction (each takes 1..batch)")
    ap.add_argument("--abort-p", type=float, default=0.1, help="share of transactions the application aborts")
    ap.add_argument("--kill-after-s", type=float, default=4.0)
    ap.add_argument("--broker-down-s", type=float, default=8.0)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    args = ap.parse_args(argv)
    args.records = args.records or (3_000 if args.quick else 30_000)
    args.brokers = args.brokers or (1 if args.quick else 3)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
