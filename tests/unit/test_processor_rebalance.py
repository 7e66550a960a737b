"""Rebalance logic of the processor, without a broker: revoked partitions leave the unprocessed batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from kcons.errors import AbortableTransactionError
from kcons.processor import ProcessorStats, TransactionalProcessor, _OpenTransaction


@dataclass
class FakeMessage:
    t: str
    p: int
    o: int

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o


@dataclass
class FakeProducer:
    in_transaction: bool = False
    closed: bool = False
    aborted: list[str] = field(default_factory=list)

    def abort_transaction(self, *, reason: str) -> None:
        self.aborted.append(reason)
        self.in_transaction = False


def bare_processor(producer: FakeProducer, buffered: list[Any]) -> TransactionalProcessor:
    proc = TransactionalProcessor.__new__(TransactionalProcessor)
    proc.producer = producer  # type: ignore[assignment]
    proc._buffer = buffered
    proc._revoked_in_call = set()
    proc._assigned_in_call = set()
    proc._aborted_in_call = False
    proc._leaving = set()
    proc._open = None
    return proc


@dataclass
class FailingCommitProducer(FakeProducer):
    def send_offsets(self, offsets: list[Any], metadata: Any, timeout: float) -> None:
        pass

    def commit_transaction(self) -> None:
        self.in_transaction = False
        raise AbortableTransactionError("a message of the transaction failed delivery; it was aborted")


@dataclass
class CommittingProducer(FakeProducer):
    committed: list[list[tuple[str, int, int]]] = field(default_factory=list)
    offsets: list[tuple[str, int, int]] = field(default_factory=list)

    def send_offsets(self, offsets: list[Any], metadata: Any, timeout: float) -> None:
        self.offsets = [(tp.topic, tp.partition, tp.offset) for tp in offsets]

    def commit_transaction(self) -> None:
        self.committed.append(self.offsets)
        self.in_transaction = False


@dataclass
class FakeConsumer:
    assigned: list[Any] = field(default_factory=list)

    def consumer_group_metadata(self) -> object:
        return object()

    def assignment(self) -> list[Any]:
        return self.assigned


def test_revoked_partitions_records_are_dropped_from_the_unprocessed_batch_in_place() -> None:
    buffered: list[Any] = [
        FakeMessage("a", 0, 1),
        FakeMessage("a", 1, 5),
        FakeMessage("b", 0, 7),
        FakeMessage("a", 0, 2),
    ]
    batch = buffered
    proc = bare_processor(FakeProducer(), buffered)
    proc._on_revoke(None, [TopicPartition("a", 0)])  # type: ignore[arg-type]
    assert [(m.t, m.p, m.o) for m in batch] == [("a", 1, 5), ("b", 0, 7)]  # the list being filled shrinks


def test_lost_partitions_are_dropped_like_revoked_ones() -> None:
    buffered: list[Any] = [FakeMessage("a", 0, 1), FakeMessage("a", 1, 5)]
    proc = bare_processor(FakeProducer(), buffered)
    proc._on_lost(None, [TopicPartition("a", 1)])  # type: ignore[arg-type]
    assert [(m.t, m.p) for m in buffered] == [("a", 0)]


def test_a_transaction_open_at_revocation_is_aborted_before_partitions_move() -> None:
    producer = FakeProducer(in_transaction=True)
    proc = bare_processor(producer, [])
    proc._on_revoke(None, [TopicPartition("a", 0)])  # type: ignore[arg-type]
    assert producer.aborted == ["revoked"] and not producer.in_transaction


def test_records_returned_by_the_consume_call_that_revoked_their_partition_are_dropped() -> None:
    proc = bare_processor(FakeProducer(), [])
    proc._on_revoke(None, [TopicPartition("a", 0)])  # type: ignore[arg-type]
    returned: list[Any] = [FakeMessage("a", 0, 9), FakeMessage("a", 1, 3)]
    kept = proc._after_rebalance_in_call(returned)  # type: ignore[arg-type]
    assert [(m.t, m.p) for m in kept] == [("a", 1)]


def test_a_partition_revoked_and_assigned_again_in_one_call_is_rewound_not_mixed() -> None:
    buffered: list[Any] = [FakeMessage("a", 0, 1), FakeMessage("a", 1, 5)]
    proc = bare_processor(FakeProducer(), buffered)
    rewound: list[tuple[str, set[tuple[str, int]] | None]] = []
    proc._rewind = lambda reason, only=None: rewound.append((reason, only))  # type: ignore[method-assign]
    proc._on_revoke(None, [TopicPartition("a", 0), TopicPartition("a", 1)])  # type: ignore[arg-type]
    proc._on_assign(None, [TopicPartition("a", 0)])  # type: ignore[arg-type]
    kept = proc._after_rebalance_in_call([FakeMessage("a", 0, 1), FakeMessage("a", 0, 2)])  # type: ignore[list-item]
    assert kept == [] and buffered == []
    assert rewound == [("reassigned", {("a", 0)})]


def test_a_transaction_aborted_by_a_loss_rewinds_the_partitions_that_stay_and_drops_their_records() -> None:
    producer = FakeProducer(in_transaction=True)
    proc = bare_processor(producer, [])
    proc.consumer = FakeConsumer([TopicPartition("a", 1), TopicPartition("b", 0)])  # type: ignore[assignment]
    rewound: list[tuple[str, set[tuple[str, int]] | None]] = []
    proc._rewind = lambda reason, only=None: rewound.append((reason, only))  # type: ignore[method-assign]
    proc._open = _OpenTransaction(0.0, {("a", 0): 3, ("a", 1): 6}, records=4)
    proc._on_lost(None, [TopicPartition("a", 0)])  # type: ignore[arg-type]
    proc._on_assign(None, [TopicPartition("b", 0)])  # type: ignore[arg-type]
    kept = proc._after_rebalance_in_call([FakeMessage("a", 1, 6), FakeMessage("b", 0, 0)])  # type: ignore[list-item]
    assert producer.aborted == ["lost"] and proc._open is None
    # a[1] had records in the aborted transaction: rewound; b[0] was just assigned at its committed offset.
    assert rewound == [("rebalanced", {("a", 1)})]
    assert [(m.t, m.p) for m in kept] == [("b", 0)]


def test_a_transaction_open_at_a_revocation_commits_before_the_partitions_move() -> None:
    producer = CommittingProducer(in_transaction=True)
    proc = bare_processor(producer, [])
    proc.consumer = FakeConsumer([])  # type: ignore[assignment]
    proc.stats = ProcessorStats()
    proc.on_commit = None
    proc.commit_timeout_s = 1.0
    proc._open = _OpenTransaction(0.0, {("a", 0): 3}, records=3, outputs=3)
    proc._on_revoke(None, [TopicPartition("a", 0)])  # type: ignore[arg-type]
    assert producer.committed == [[("a", 0, 3)]] and producer.aborted == []
    assert proc._open is None and proc.stats.records == 3 and not proc._aborted_in_call


@pytest.mark.parametrize(
    ("opened_ago", "records", "committed", "max_records", "due"),
    [
        (0.0, 10, 0, None, False),
        (0.2, 10, 0, None, True),  # the interval ran out
        (0.0, 100, 0, None, True),  # the transaction holds commit_max_records
        (0.0, 10, 90, 100, True),  # run(max_records=100) is reached with this transaction
        (0.0, 10, 80, 100, False),
    ],
)
def test_the_open_transaction_commits_after_its_interval_or_its_record_limit(
    opened_ago: float, records: int, committed: int, max_records: int | None, due: bool
) -> None:
    proc = bare_processor(FakeProducer(), [])
    proc.commit_interval_s = 0.1
    proc.commit_max_records = 100
    proc.stats = ProcessorStats(records=committed)
    proc._open = _OpenTransaction(time.monotonic() - opened_ago, records=records)
    assert proc._commit_due(max_records) is due


def test_a_transaction_whose_commit_aborts_is_rewound_and_not_counted_as_committed() -> None:
    proc = bare_processor(FailingCommitProducer(in_transaction=True), [])
    proc.consumer = FakeConsumer()  # type: ignore[assignment]
    proc.stats = ProcessorStats()
    proc.on_commit = None
    proc.commit_timeout_s = 1.0
    rewound: list[str] = []
    proc._rewind = lambda reason, only=None: rewound.append(reason)  # type: ignore[method-assign]
    proc._open = _OpenTransaction(0.0, {("a", 0): 11}, records=11, outputs=11)
    proc._commit_open()
    assert rewound == ["aborted"] and proc._open is None
    assert proc.stats == ProcessorStats()  # nothing counted: run(max_records=...) must not stop early


def test_a_partition_assigned_and_revoked_again_in_one_call_is_dropped_not_rewound() -> None:
    proc = bare_processor(FakeProducer(), [])
    rewound: list[tuple[str, set[tuple[str, int]] | None]] = []
    proc._rewind = lambda reason, only=None: rewound.append((reason, only))  # type: ignore[method-assign]
    proc._on_revoke(None, [TopicPartition("a", 2), TopicPartition("a", 3)])  # type: ignore[arg-type]
    proc._on_assign(None, [TopicPartition("a", 0), TopicPartition("a", 2)])  # type: ignore[arg-type]
    proc._on_revoke(None, [TopicPartition("a", 0), TopicPartition("a", 2)])  # type: ignore[arg-type]
    kept = proc._after_rebalance_in_call([FakeMessage("a", 2, 280), FakeMessage("a", 0, 5)])  # type: ignore[list-item]
    assert kept == [] and rewound == []  # a partition no longer assigned cannot be sought


def test_a_commit_failing_in_the_revoke_callback_drops_the_reads_records_of_the_partitions_that_stay() -> None:
    """The failed commit rewound every partition: records the read returned before the callback would come twice."""
    proc = bare_processor(FailingCommitProducer(in_transaction=True), [])
    proc.consumer = FakeConsumer([TopicPartition("a", 1)])  # type: ignore[assignment]
    proc.stats = ProcessorStats()
    proc.on_commit = None
    proc.commit_timeout_s = 1.0
    rewound: list[tuple[str, set[tuple[str, int]] | None]] = []
    proc._rewind = lambda reason, only=None: rewound.append((reason, only))  # type: ignore[method-assign]
    proc._open = _OpenTransaction(0.0, {("a", 0): 3, ("a", 1): 6}, records=4)
    proc._on_revoke(None, [TopicPartition("a", 0)])  # type: ignore[arg-type]
    kept = proc._after_rebalance_in_call([FakeMessage("a", 1, 6), FakeMessage("a", 1, 7)])  # type: ignore[list-item]
    assert kept == [] and proc._open is None and proc.stats.records == 0
    assert rewound[0] == ("aborted", None) and ("rebalanced", {("a", 1)}) in rewound


@dataclass
class SeekingConsumer(FakeConsumer):
    sought: list[tuple[str, int, int]] = field(default_factory=list)

    def committed(self, partitions: list[Any], timeout: float) -> list[Any]:
        return [TopicPartition(tp.topic, tp.partition, 5) for tp in partitions]

    def seek(self, tp: Any) -> None:
        self.sought.append((tp.topic, tp.partition, tp.offset))


def test_a_commit_failing_in_the_revoke_callback_seeks_only_the_partitions_that_stay() -> None:
    """A seek of a leaving partition would outlive its revocation and act when it is assigned back."""
    consumer = SeekingConsumer([TopicPartition("a", 0), TopicPartition("a", 1)])
    proc = bare_processor(FailingCommitProducer(in_transaction=True), [])
    proc.consumer = consumer  # type: ignore[assignment]
    proc.stats = ProcessorStats()
    proc.on_commit = None
    proc.commit_timeout_s = 1.0
    proc.rewind_timeout_s = 1.0
    proc._reset_offset = 0
    proc._open = _OpenTransaction(0.0, {("a", 0): 3, ("a", 1): 6}, records=4)
    proc._on_revoke(None, [TopicPartition("a", 0)])  # type: ignore[arg-type]
    assert consumer.sought == [("a", 1, 5)] and proc._aborted_in_call and proc._leaving == set()
