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
