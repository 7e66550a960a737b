"""TransactionalProcessor against a real broker: exactly-once through commits, kills, rebalances and errors."""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from kcons.processor import Output, ProcessorStats, TransactionalProcessor

pytestmark = pytest.mark.integration

WORKER = Path(__file__).resolve().parents[1] / "fault" / "_eos_worker.py"


def produce_inputs(bootstrap: str, topic: str, ids: range) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for i in ids:
        producer.produce(topic, str(i).encode(), f"k{i % 37}".encode())
    assert producer.flush(30) == 0


def read_committed_values(bootstrap: str, topic: str, expect: int, idle_s: float = 3.0) -> list[bytes]:
    """Every value in ``topic`` visible to read_committed (waits for ``expect``, then ``idle_s`` of quiet)."""
    return [m.value() for m in read_committed_messages(bootstrap, topic, expect, idle_s)]


def read_committed_messages(bootstrap: str, topic: str, expect: int, idle_s: float = 3.0) -> list[Message]:
    """Every record in ``topic`` visible to read_committed (waits for ``expect``, then ``idle_s`` of quiet)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"verify-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    values: list[Message] = []
    last = time.monotonic()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        msgs = consumer.consume(500, 0.2)
        got = [m for m in msgs if m.error() is None]
        if got:
            values.extend(got)
            last = time.monotonic()
        elif len(values) >= expect and time.monotonic() - last > idle_s:
            break
    consumer.close()
    return values


def count_uncommitted(bootstrap: str, topic: str, partitions: int) -> int:
    """Offsets used in ``topic``: its records, committed, aborted or still open, plus transaction markers."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm-{uuid.uuid4().hex}"})
    total = 0
    for p in range(partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        total += high - low
    consumer.close()
    return total


def assert_exactly_once(values: list[bytes], n: int) -> None:
    counts = collections.Counter(int(v) for v in values)
    lost = [i for i in range(n) if counts[i] == 0]
    dups = {i: c for i, c in counts.items() if c > 1}
    unexpected = [i for i in counts if not 0 <= i < n]
    assert (lost[:10], dups, unexpected) == ([], {}, [])
    assert len(values) == n


def processor(
    bootstrap: str,
    group: str,
    tid: str,
    topic_in: str,
    handler: Callable[[Message], Any],
    consumer_extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TransactionalProcessor:
    return TransactionalProcessor(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            **(consumer_extra or {}),
        },
        {"bootstrap.servers": bootstrap, "linger.ms": 5},
        [topic_in],
        handler,
        transactional_id=tid,
        **kwargs,
    )


def copy_to(topic_out: str) -> Callable[[Message], list[Output]]:
    return lambda m: [Output(topic_out, m.value(), m.key())]


def test_processor_commits_each_input_once_with_its_offsets(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic_in, topic_out = unique_topic(partitions=3), unique_topic(partitions=3)
    produce_inputs(kafka_bootstrap, topic_in, range(1500))
    group = f"g-{uuid.uuid4().hex[:8]}"
    from prometheus_client import REGISTRY

    records_before = REGISTRY.get_sample_value("kcons_processor_records_total") or 0.0
    batches_before = REGISTRY.get_sample_value("kcons_processor_batch_size_count") or 0.0
    proc = processor(kafka_bootstrap, group, f"w-{group}", topic_in, copy_to(topic_out), batch_size=200)
    stats = proc.run(max_records=1500)
    assert stats.records == 1500 and stats.outputs == 1500 and stats.rewinds == 0
    assert (REGISTRY.get_sample_value("kcons_processor_records_total") or 0.0) - records_before == 1500
    batches = (REGISTRY.get_sample_value("kcons_processor_batch_size_count") or 0.0) - batches_before
    assert batches == stats.transactions
    assert_exactly_once(read_committed_values(kafka_bootstrap, topic_out, 1500), 1500)

    def lag_series() -> dict[str, float]:
        return {
            sample.labels["partition"]: sample.value
            for metric in REGISTRY.collect()
            if metric.name == "kcons_processor_lag"
            for sample in metric.samples
            if sample.labels["group"] == group and sample.labels["topic"] == topic_in
        }

    assert lag_series() == {}  # run() closed the processor: it owns no partition, its series are gone

    # The offsets were committed in the transactions: a new consumer in the group starts at the end.
    check = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "isolation.level": "read_committed"})
    committed = check.committed([TopicPartition(topic_in, p) for p in range(3)], timeout=10)
    check.close()
    assert sum(tp.offset for tp in committed) == 1500


def test_a_new_group_processes_the_input_written_before_it_started_and_installs_no_signal_handler(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic_in, topic_out = unique_topic(partitions=2), unique_topic(partitions=2)
    produce_inputs(kafka_bootstrap, topic_in, range(300))  # all of it before the processor exists
    group = f"g-{uuid.uuid4().hex[:8]}"
    handlers: set[Any] = set()

    def copy(m: Message) -> list[Output]:
        handlers.add(signal.getsignal(signal.SIGTERM))
        return [Output(topic_out, m.value(), m.key())]

    before = signal.getsignal(signal.SIGTERM)
    proc = TransactionalProcessor(  # no auto.offset.reset: the processor's default applies
        {"bootstrap.servers": kafka_bootstrap, "group.id": group},
        {"bootstrap.servers": kafka_bootstrap, "linger.ms": 5},
        topics=[topic_in],
        handler=copy,
        batch_size=100,
        transactional_id=f"w-{group}",
    )
    stats = proc.run(max_records=300)
    assert stats.records == 300
    assert_exactly_once(read_committed_values(kafka_bootstrap, topic_out, 300), 300)
    assert handlers == {before}  # run() left SIGTERM as it found it (the program decides, not the library)


def test_poison_inputs_are_dead_lettered_in_the_transaction_and_the_processor_goes_on(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    from confluent_kafka.admin import AdminClient

    from kcons.errors import DecodeError, PoisonMessageError
    from kcons.testing.plugin import create_topic

    n = 400
    topic_in, topic_out = unique_topic(partitions=2), unique_topic(partitions=2)
    create_topic(AdminClient({"bootstrap.servers": kafka_bootstrap}), f"{topic_in}.dlq", 1)
    produce_inputs(kafka_bootstrap, topic_in, range(n))
    group = f"g-{uuid.uuid4().hex[:8]}"

    def handler(m: Message) -> Any:
        i = int(m.value())
        if i % 100 == 7:
            raise DecodeError(f"input {i} is not an order")
        if i % 100 == 8:
            yield Output(topic_out, b"partial", m.key())  # a poison input's earlier outputs are not written
            raise PoisonMessageError(f"input {i} cannot be applied")
        yield Output(topic_out, m.value(), m.key())

    proc = processor(kafka_bootstrap, group, f"w-{group}", topic_in, handler, batch_size=100)
    stats = proc.run(max_records=n)
    assert stats.records == n and stats.dead_lettered == 8
    poison = {i for i in range(n) if i % 100 in (7, 8)}
    values = read_committed_values(kafka_bootstrap, topic_out, n - len(poison))
    assert sorted(int(v) for v in values) == sorted(set(range(n)) - poison)
    dead = read_committed_messages(kafka_bootstrap, f"{topic_in}.dlq", len(poison))
    assert sorted(int(m.value()) for m in dead) == sorted(poison)
    reasons = {int(m.value()): dict(m.headers())["kcons-dlq-reason"].decode() for m in dead}
    assert reasons[7] == "DecodeError: input 7 is not an order"
    assert reasons[8] == "PoisonMessageError: input 8 cannot be applied"
    assert all(dict(m.headers())["kcons-dlq-topic"] == topic_in.encode() for m in dead)


def test_processor_lag_is_reported_per_owned_partition_and_dropped_on_close(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    import threading

    from prometheus_client import REGISTRY

    topic_in, topic_out = unique_topic(partitions=3), unique_topic(partitions=3)
    produce_inputs(kafka_bootstrap, topic_in, range(600))
    group = f"g-{uuid.uuid4().hex[:8]}"
    proc = processor(kafka_bootstrap, group, f"w-{group}", topic_in, copy_to(topic_out), batch_size=100)

    def lag_series() -> dict[str, float]:
        return {
            sample.labels["partition"]: sample.value
            for metric in REGISTRY.collect()
            if metric.name == "kcons_processor_lag"
            for sample in metric.samples
            if sample.labels["group"] == group and sample.labels["topic"] == topic_in
        }

    worker = threading.Thread(target=proc.run)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and lag_series() != {"0": 0.0, "1": 0.0, "2": 0.0}:
            time.sleep(0.2)
        assert proc.stats.records == 600
        assert lag_series() == {"0": 0.0, "1": 0.0, "2": 0.0}  # caught up, one series per owned partition
    finally:
        proc.stop()
        worker.join(60)
    assert lag_series() == {}


def test_processor_killed_mid_batch_replays_without_duplicates(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    n = 1200
    topic_in, topic_out = unique_topic(partitions=2), unique_topic(partitions=2)
    produce_inputs(kafka_bootstrap, topic_in, range(n))
    group = f"g-{uuid.uuid4().hex[:8]}"
    argv = [
        sys.executable, str(WORKER), "--bootstrap", kafka_bootstrap, "--input", topic_in, "--output", topic_out,
        "--group", group, "--transactional-id", f"w-{group}", "--batch-size", "300", "--batch-timeout-s", "5",
        "--delay-ms", "4",
    ]  # fmt: skip

    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert first.stdout is not None
    try:
        for line in first.stdout:  # wait for one committed batch, then kill inside the next one
            if line.startswith("committed"):
                break
        # Kill once records of the open transaction are in the log (written but not committed).
        deadline = time.monotonic() + 30
        while count_uncommitted(kafka_bootstrap, topic_out, 2) <= 300 + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait(10)
    in_log = count_uncommitted(kafka_bootstrap, topic_out, 2)
    assert in_log > 300 + 2, "the kill did not land inside an open transaction"

    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        values = read_committed_values(kafka_bootstrap, topic_out, n)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    assert second.returncode == 0
    assert_exactly_once(values, n)


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_rebalancing_between_two_workers_keeps_exactly_once(
    kafka_bootstrap: str, unique_topic: Callable[..., str], strategy: str
) -> None:
    n = 3000
    topic_in, topic_out = unique_topic(partitions=4), unique_topic(partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    done: dict[str, ProcessorStats] = {}
    errors: list[BaseException] = []

    def slow_copy(m: Message) -> list[Output]:
        time.sleep(0.001)
        return [Output(topic_out, m.value(), m.key())]

    def run(name: str, proc: TransactionalProcessor) -> None:
        try:
            done[name] = proc.run()
        except BaseException as exc:
            errors.append(exc)

    extra = {"partition.assignment.strategy": strategy}
    a = processor(kafka_bootstrap, group, f"{group}-a", topic_in, slow_copy, batch_size=50, consumer_extra=extra)
    b = processor(kafka_bootstrap, group, f"{group}-b", topic_in, slow_copy, batch_size=50, consumer_extra=extra)
    producer_thread = threading.Thread(target=produce_inputs, args=(kafka_bootstrap, topic_in, range(n)))
    producer_thread.start()
    ta = threading.Thread(target=run, args=("a", a))
    ta.start()
    while a.stats.records < 300:
        time.sleep(0.05)
    tb = threading.Thread(target=run, args=("b", b))  # B joins: partitions move from A to B mid-stream
    tb.start()
    while b.stats.records < 300:
        time.sleep(0.05)
    a.stop()  # A leaves: its partitions move back to B
    ta.join(60)
    producer_thread.join(60)
    values = read_committed_values(kafka_bootstrap, topic_out, n)
    b.stop()
    tb.join(60)
    assert errors == []
    assert done["a"].records > 0 and done["b"].records > 0
    assert done["a"].records + done["b"].records == n
    assert_exactly_once(values, n)


def test_a_commit_failing_at_a_cooperative_revocation_rewinds_and_keeps_exactly_once(
    kafka_bootstrap: str, unique_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """The commit made in the revoke callback fails (an output the broker refuses): it aborts and rewinds.

    The partition that stays is rewound and what the read returned for it before the callback is
    dropped (handled, it would come again from the rewind). The leaving one is not sought: when it
    came back to this member, the seek made during its revocation made it read its records twice
    (their outputs committed twice, in some runs: the test cannot force that timing).
    """
    caplog.set_level(logging.INFO, logger="kcons.processor")
    for _attempt in range(3):  # until the revocation comes while the first transaction is open
        caplog.clear()
        values, n = _revoke_while_the_commit_must_fail(kafka_bootstrap, unique_topic)
        events = [r.getMessage() for r in caplog.records]
        revoked = next((i for i, e in enumerate(events) if e.startswith("revoked ")), len(events))
        aborted = next(i for i, e in enumerate(events) if e.startswith("transaction aborted"))
        counts = collections.Counter(values)
        assert {v: c for v, c in counts.items() if c > 1} == {}
        assert len(counts) == n
        if revoked < aborted:
            return
    pytest.fail("the revocation never came while the failing transaction was open")


def _revoke_while_the_commit_must_fail(
    kafka_bootstrap: str, unique_topic: Callable[..., str], n: int = 300_000
) -> tuple[list[bytes], int]:
    """A processor's first transaction holds an output the broker refuses when another member takes a partition."""
    topic_in, topic_out = unique_topic(partitions=2), unique_topic(partitions=1)
    refusing = unique_topic(partitions=1, config={"max.message.bytes": "1000"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50, "queue.buffering.max.messages": n})
    for i in range(n):
        producer.produce(topic_in, b"v", partition=i % 2)
        if i % 50_000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"
    poisoned: list[bool] = []
    procs: list[TransactionalProcessor] = []

    def handler(m: Message) -> list[Output]:
        if procs[0].stats.rewinds == 0:  # the first transaction: one record the broker refuses, then nothing
            if not poisoned:
                poisoned.append(True)
                return [Output(refusing, b"x" * 5000)]
            return []
        return [Output(topic_out, f"{m.partition()}:{m.offset()}".encode())]

    extra = {"heartbeat.interval.ms": 200, "partition.assignment.strategy": "cooperative-sticky"}
    # A transaction commits only when a read finds nothing: the first is open when the revocation comes.
    proc = processor(
        kafka_bootstrap, group, f"{group}-a", topic_in, handler, consumer_extra=extra,
        batch_size=50_000, commit_interval_s=60, commit_max_records=10**8,
    )  # fmt: skip
    procs.append(proc)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            proc.run(max_records=n)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    other = Consumer({**proc._consumer_config, "enable.auto.commit": False})
    try:
        while not poisoned and worker.is_alive():
            time.sleep(0.01)
        other.subscribe([topic_in])  # a partition moves to it: the revoke callback's commit fails
        deadline = time.monotonic() + 30
        while proc.stats.rewinds == 0 and time.monotonic() < deadline:
            other.poll(0.1)
    finally:
        other.close()  # it commits nothing: its partition comes back
    worker.join(120)
    assert errors == [] and proc.stats.rewinds >= 1
    return read_committed_values(kafka_bootstrap, topic_out, n, 1.0), n


def test_handler_error_aborts_the_batch_and_a_restart_resumes_exactly_once(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    n = 500
    topic_in, topic_out = unique_topic(partitions=1), unique_topic(partitions=1)
    produce_inputs(kafka_bootstrap, topic_in, range(n))
    group = f"g-{uuid.uuid4().hex[:8]}"
    failed_once: list[int] = []

    def flaky(m: Message) -> list[Output]:
        value = int(m.value())
        if value == 250 and not failed_once:
            failed_once.append(value)
            raise ValueError("handler failed on 250")
        return [Output(topic_out, m.value(), m.key())]

    first = processor(kafka_bootstrap, group, f"w-{group}", topic_in, flaky, batch_size=100, commit_max_records=100)
    with pytest.raises(ValueError, match="250"):
        first.run()
    # The open transaction holding 250 was aborted; those before it (100-199 records each) committed.
    assert 0 < first.stats.records <= 250
    second = processor(kafka_bootstrap, group, f"w-{group}", topic_in, flaky, batch_size=100)
    second.run(max_records=n - first.stats.records)
    assert_exactly_once(read_committed_values(kafka_bootstrap, topic_out, n), n)


def test_failed_output_delivery_aborts_rewinds_and_retries_the_batch(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    n = 400
    topic_in = unique_topic(partitions=2)
    topic_out = unique_topic(partitions=2, config={"max.message.bytes": "100000"})
    produce_inputs(kafka_bootstrap, topic_in, range(n))
    group = f"g-{uuid.uuid4().hex[:8]}"
    oversized: list[int] = []

    def sometimes_too_big(m: Message) -> list[Output]:
        value = int(m.value())
        if value == 123 and len(oversized) < 1:
            oversized.append(value)  # the broker refuses this record: the whole batch must abort
            return [Output(topic_out, m.value() + b" " * 300_000, m.key())]
        return [Output(topic_out, m.value(), m.key())]

    proc = processor(kafka_bootstrap, group, f"w-{group}", topic_in, sometimes_too_big, batch_size=50)
    stats = proc.run(max_records=n)
    assert stats.rewinds >= 1
    assert_exactly_once(read_committed_values(kafka_bootstrap, topic_out, n), n)


def test_sigterm_stops_a_worker_after_its_current_batch(kafka_bootstrap: str, unique_topic: Callable[..., str]) -> None:
    topic_in, topic_out = unique_topic(partitions=1), unique_topic(partitions=1)
    produce_inputs(kafka_bootstrap, topic_in, range(200))
    group = f"g-{uuid.uuid4().hex[:8]}"
    argv = [
        sys.executable, str(WORKER), "--bootstrap", kafka_bootstrap, "--input", topic_in, "--output", topic_out,
        "--group", group, "--transactional-id", f"w-{group}", "--batch-size", "50",
    ]  # fmt: skip
    worker = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ))
    assert worker.stdout is not None
    lines = []
    for line in worker.stdout:
        lines.append(line.split())
        if line.startswith("committed") and int(line.split()[1]) >= 200:
            break
    worker.send_signal(signal.SIGTERM)
    rest, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0
    assert rest.split()[:2] == ["stopped", "200"]
    assert_exactly_once(read_committed_values(kafka_bootstrap, topic_out, 200), 200)
