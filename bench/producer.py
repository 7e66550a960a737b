"""Benchmark: kcons TransactionalProducer (commit every 100 ms) against the raw idempotent confluent-kafka producer.

Every side sends the same number of messages of the same size to a fresh topic of the same
shape on the same broker, interleaved over ``--repeat`` rounds in a rotating order; the best
round of each side counts (noise from other processes only ever slows a round down). Sides:

* ``baseline``: a plain ``confluent_kafka.Producer`` with ``enable.idempotence=true`` and a
  delivery callback that counts failures;
* ``kcons`` (the one in ``ratio``): :class:`kcons.kafka.producer.TransactionalProducer` with its
  defaults (a ``kcons-id`` header per message), writing with ``enqueue`` (a failed delivery
  fails the commit) and committing every ``--commit-ms`` milliseconds;
* ``kcons_no_ids``: the same with ``event_ids=False`` (what the per-message event id costs);
* ``kcons_futures``: the same with ``produce`` (a future per message);
* ``idempotent_futures``: :class:`kcons.kafka.producer.IdempotentProducer` with ``produce`` (a
  future per message, no transactions), flushed at the end;
* ``raw_transactional``: the raw confluent-kafka transactional producer, same commit interval
  (what Kafka transactions themselves cost, apart from kcons);
* ``baseline_id_header``: the baseline plus one ``kcons-id`` header per message (what one
  header per record costs librdkafka and the broker, apart from kcons).

A warm-up run of the baseline per size precedes the first round and is not measured.

Every side runs the same loop: chunks of ``POLL_EVERY`` messages, one call per message (plus
the ``BufferError`` retry the raw producer needs), then ``poll(0)``; the transactional sides
check their commit interval between chunks. No side pays for loop bookkeeping another does not.

The last line of output is one JSON object (see docs/architecture.md, "Benchmarks and fault runs").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from _topics import BenchTopics
from confluent_kafka import Producer

from kcons.kafka.producer import IdempotentProducer, TransactionalProducer, fast_event_id
from kcons.testing import start_stack

log = logging.getLogger("bench.producer")


#: Messages per chunk: each side serves its delivery reports (``poll(0)``) between chunks.
POLL_EVERY = 256


def _chunks(n: int) -> Iterator[range]:
    """The message numbers 0..n-1 in chunks of POLL_EVERY: the loop every side runs."""
    for low in range(0, n, POLL_EVERY):
        yield range(low, min(low + POLL_EVERY, n))


def _rates(n: int, elapsed: float, cpu: float) -> dict[str, Any]:
    """Throughput, and the process's CPU time per message (librdkafka's threads included): the
    second is steadier than the first on a machine that other processes load."""
    return {"msgs": n, "seconds": round(elapsed, 3), "msgs_per_s": round(n / elapsed, 1),
            "cpu_us_per_msg": round(cpu / n * 1e6, 3)}  # fmt: skip


def _common(bootstrap: str, linger_ms: int) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "linger.ms": linger_ms, "enable.idempotence": True, "acks": "all"}


def _warm(p: Producer, topic: str) -> None:
    """Deliver one record before the clock starts: an idempotent producer gets its producer id
    asynchronously after it is made, and a round that started before it had waited up to 0.4 s
    for it (measured: 2 of 8 baseline rounds). The transactional sides get theirs in
    ``init_transactions``, before their clocks start."""
    p.produce(topic, b"warm-up")
    if p.flush(30):
        raise RuntimeError("the warm-up record was not acknowledged within 30 s")


def _produce_raw(p: Producer, topic: str, payload: bytes, chunk: range, id_header: bool) -> None:
    """One chunk through a raw producer, waiting out a full local queue as its users must."""
    for i in chunk:
        key = str(i % 1000).encode()
        while True:
            try:
                if id_header:
                    p.produce(topic, payload, key, headers={"kcons-id": fast_event_id()})
                else:
                    p.produce(topic, payload, key)
                break
            except BufferError:
                p.poll(0.01)


def run_baseline(
    bootstrap: str, topic: str, n: int, payload: bytes, linger_ms: int, *, id_header: bool = False
) -> dict[str, Any]:
    """The raw idempotent producer: produce n messages and flush.

    With ``id_header`` every message also gets a ``kcons-id`` header (a UUIDv7 from the same
    generator kcons uses): what the per-event header costs librdkafka and the broker, apart from kcons.
    """
    failed = [0]

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed[0] += 1

    p = Producer({**_common(bootstrap, linger_ms), "on_delivery": on_delivery})
    p.list_topics(topic, timeout=10)
    _warm(p, topic)
    start, cpu_start = time.perf_counter(), time.process_time()
    for chunk in _chunks(n):
        _produce_raw(p, topic, payload, chunk, id_header)
        p.poll(0)
    left = p.flush(120)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if left or failed[0]:
        raise RuntimeError(f"baseline lost messages: {left} unflushed, {failed[0]} failed")
    return {**_rates(n, elapsed, cpu)}


def run_raw_transactional(
    bootstrap: str, topic: str, n: int, payload: bytes, linger_ms: int, commit_ms: int
) -> dict[str, Any]:
    """Reference point (not the baseline): the raw confluent-kafka transactional producer, same commit interval."""
    failed = [0]

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed[0] += 1

    p = Producer(
        {
            **_common(bootstrap, linger_ms),
            "transactional.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
            "retry.backoff.ms": 10,
            "on_delivery": on_delivery,
        }
    )
    p.init_transactions(30)
    p.list_topics(topic, timeout=10)
    interval = commit_ms / 1000.0
    transactions = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    chunks = _chunks(n)
    chunk = next(chunks, None)
    while chunk is not None:
        p.begin_transaction()
        txn_end = time.perf_counter() + interval
        while chunk is not None:
            _produce_raw(p, topic, payload, chunk, False)
            p.poll(0)
            chunk = next(chunks, None)
            if time.perf_counter() >= txn_end:
                break
        p.commit_transaction(60)
        transactions += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if failed[0]:
        raise RuntimeError(f"raw transactional lost messages: {failed[0]} failed")
    return {**_rates(n, elapsed, cpu), "transactions": transactions}


def run_kcons(
    bootstrap: str,
    topic: str,
    n: int,
    payload: bytes,
    linger_ms: int,
    commit_ms: int,
    *,
    futures_mode: bool = False,
    event_ids: bool = True,
) -> dict[str, Any]:
    """TransactionalProducer, one transaction per commit interval.

    Default: ``enqueue`` (no per-message future; a failed delivery fails the commit). With
    ``futures_mode``: ``produce``, one future per message, all checked at the end.
    """
    p = TransactionalProducer(
        {**_common(bootstrap, linger_ms), "transactional.id": f"bench-{uuid.uuid4().hex[:8]}"}, event_ids=event_ids
    )
    p.raw.list_topics(topic, timeout=10)
    interval = commit_ms / 1000.0
    futures = []
    transactions = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    chunks = _chunks(n)
    chunk = next(chunks, None)
    while chunk is not None:
        with p.transaction():
            txn_end = time.perf_counter() + interval
            while chunk is not None:
                if futures_mode:
                    for i in chunk:
                        futures.append(p.produce(topic, payload, str(i % 1000).encode()))
                else:
                    for i in chunk:
                        p.enqueue(topic, payload, str(i % 1000).encode())
                p.poll(0)
                chunk = next(chunks, None)
                if time.perf_counter() >= txn_end:
                    break
        transactions += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    failed = sum(1 for f in futures if f.exception(0) is not None)
    p.close()
    if failed:
        raise RuntimeError(f"kcons lost messages: {failed} failed")
    return {
        **_rates(n, elapsed, cpu),
        "transactions": transactions,
    }


def run_idempotent_futures(bootstrap: str, topic: str, n: int, payload: bytes, linger_ms: int) -> dict[str, Any]:
    """IdempotentProducer.produce: one future per message, all checked after the final flush."""
    p = IdempotentProducer(_common(bootstrap, linger_ms))
    p.raw.list_topics(topic, timeout=10)
    _warm(p.raw, topic)
    futures = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for chunk in _chunks(n):
        for i in chunk:
            futures.append(p.produce(topic, payload, str(i % 1000).encode()))
        p.poll(0)
    p.flush(120)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    failed = sum(1 for f in futures if f.exception(0) is not None)
    p.close()
    if failed:
        raise RuntimeError(f"kcons idempotent lost messages: {failed} failed")
    return {**_rates(n, elapsed, cpu)}


SIDES = (
    "baseline",
    "kcons",
    "kcons_no_ids",
    "kcons_futures",
    "idempotent_futures",
    "raw_transactional",
    "baseline_id_header",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--sizes", default="1024,100", help="comma-separated payload sizes in bytes")
    # Rounds per side (the best counts): a round takes under a second, and on two shared cores a
    # round of either side is often twice as slow as its best, several rounds in a row (one run of
    # five rounds had a single quiet one); nine give each side a fair chance of a quiet one.
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured baseline runs per size before round 0")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--commit-ms", type=int, default=100)
    parser.add_argument(
        "--sides", default=",".join(SIDES), help="comma-separated sides to run (baseline and kcons always run)"
    )
    args = parser.parse_args(argv)
    sides = tuple(s for s in SIDES if s in {"baseline", "kcons", *args.sides.split(",")})
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]

    results: dict[int, dict[str, list[dict[str, Any]]]] = {s: {side: [] for side in sides} for s in sizes}
    with start_stack(redis=False, postgres=False) as stack, BenchTopics(stack.kafka_bootstrap) as topics:

        def new_topic() -> str:  # a fresh topic per run, its leaders known before the clock starts
            return topics.new("bench-prod", args.partitions, settle_s=0.5)

        bootstrap, n, linger, commit = stack.kafka_bootstrap, args.messages, args.linger_ms, args.commit_ms
        for rnd in range(args.repeat):
            for size in sizes:
                payload = os.urandom(size)
                runs: dict[str, Callable[[str], dict[str, Any]]] = {
                    "baseline": lambda t, p=payload: run_baseline(bootstrap, t, n, p, linger),
                    "kcons": lambda t, p=payload: run_kcons(bootstrap, t, n, p, linger, commit),
                    "kcons_no_ids": lambda t, p=payload: run_kcons(bootstrap, t, n, p, linger, commit, event_ids=False),
                    "kcons_futures": lambda t, p=payload: run_kcons(
                        bootstrap, t, n, p, linger, commit, futures_mode=True
                    ),
                    "idempotent_futures": lambda t, p=payload: run_idempotent_futures(bootstrap, t, n, p, linger),
                    "raw_transactional": lambda t, p=payload: run_raw_transactional(bootstrap, t, n, p, linger, commit),
                    "baseline_id_header": lambda t, p=payload: run_baseline(bootstrap, t, n, p, linger, id_header=True),
                }
                if rnd == 0:
                    for _ in range(args.warmup):  # the broker's JIT and page cache warm up; not measured
                        run_baseline(bootstrap, new_topic(), n, payload, linger)
                # Rotate the order every round so that no side always runs right after the same neighbour.
                shift = (rnd * 2 + sizes.index(size)) % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    result = runs[side](new_topic())
                    log.info("round %d size %d %s: %s", rnd, size, side, result)
                    results[size][side].append(result)

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return max(runs, key=lambda r: float(r["msgs_per_s"]))

    table = {side: {f"{s}B": best(results[s][side]) for s in sizes} for side in sides}
    ratios = {
        side: {f"{s}B": round(table[side][f"{s}B"]["msgs_per_s"] / table["baseline"][f"{s}B"]["msgs_per_s"], 3)
               for s in sizes}
        for side in sides if side != "baseline"
    }  # fmt: skip
    same_shape = None
    futures_same_shape: dict[str, dict[str, float]] | None = None
    futures_cpu_same_shape: dict[str, dict[str, float]] | None = None
    if "baseline_id_header" in sides:
        rate = {side: {s: table[side][f"{s}B"]["msgs_per_s"] for s in sizes} for side in sides}
        same_shape = {f"{s}B": round(rate["kcons"][s] / rate["baseline_id_header"][s], 3) for s in sizes}
        futures_same_shape = {
            side: {f"{s}B": round(rate[side][s] / rate["baseline_id_header"][s], 3) for s in sizes}
            for side in ("kcons_futures", "idempotent_futures")
            if side in sides
        }
        # The same comparison in CPU per message (baseline's over kcons's: above 1 means kcons costs less).
        cpu = {side: {s: min(r["cpu_us_per_msg"] for r in results[s][side]) for s in sizes} for side in sides}
        futures_cpu_same_shape = {
            side: {f"{s}B": round(cpu["baseline_id_header"][s] / cpu[side][s], 3) for s in sizes}
            for side in ("kcons_futures", "idempotent_futures")
            if side in sides
        }
    out = {
        "name": "producer",
        "baseline": table["baseline"],
        "kcons": table["kcons"],
        "ratio": ratios["kcons"][f"{sizes[0]}B"],
        "ratios": ratios,
        # kcons against raw records of the same shape (one kcons-id header each): kcons's own cost.
        "ratio_vs_baseline_id_header": same_shape,
        # produce() with a future per message (TransactionalProducer and IdempotentProducer) against
        # the same raw records: what a user of wrap() gets.
        "futures_ratio_vs_baseline_id_header": futures_same_shape,
        "futures_cpu_ratio_vs_baseline_id_header": futures_cpu_same_shape,
        "load_average": os.getloadavg(),
        "other_sides": {side: table[side] for side in sides if side not in ("baseline", "kcons")},
        "unit": "msgs/s",
        "messages": args.messages,
        "sizes": sizes,
        "repeat": args.repeat,
        "partitions": args.partitions,
        "linger_ms": args.linger_ms,
        "commit_ms": args.commit_ms,
        "all_rounds": results,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
