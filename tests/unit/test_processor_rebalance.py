"""Rebalance logic of the processor, without a broker: revoked partitions leave the unprocessed batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TopicPartition

from kcons.processor import TransactionalProcessor


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
    return proc


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
