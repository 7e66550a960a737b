"""The offset ledger and the pause schedule (kcons.kafka.ledger, kcons.kafka.pauses) against a stand-in consumer."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from kcons.kafka.ledger import OffsetLedger
from kcons.kafka.pauses import PauseSchedule


class Commits:
    """Records commits, seeks, pauses and resumes; every partition of topic "t" is assigned."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[int, int], bool]] = []
        self.seeks: list[tuple[int, int]] = []
        self.paused: set[int] = set()

    def commit(self, offsets: list[Any], asynchronous: bool) -> list[Any]:
        self.sent.append(({tp.partition: tp.offset for tp in offsets}, asynchronous))
        return offsets

    def assignment(self) -> list[Any]:
        return [TopicPartition("t", p) for p in range(4)]

    def seek(self, tp: Any) -> None:
        self.seeks.append((tp.partition, tp.offset))

    def pause(self, tps: list[Any]) -> None:
        self.paused |= {tp.partition for tp in tps}

    def resume(self, tps: list[Any]) -> None:
        self.paused -= {tp.partition for tp in tps}


def ledger(asynchronous: bool = True) -> tuple[OffsetLedger, Commits]:
    kafka = Commits()
    book = OffsetLedger(asynchronous=asynchronous)
    book.attach(kafka)
    return book, kafka


def test_offsets_awaiting_done_records_are_committed_only_once_those_are_written() -> None:
    book, kafka = ledger()
    book.decide({("t", 0): 5}, awaiting_done=True)
    book.decide({("t", 1): 2})
    book.commit()
    assert kafka.sent == [({1: 2}, True)], "only the offsets whose done records are written"
    book.decide({("t", 0): 9}, awaiting_done=True)
    book.flush()
    assert 0 not in kafka.sent[-1][0]
    book.done_recorded()
    book.commit()
    assert kafka.sent[-1] == ({0: 9}, True)


def test_flush_commits_synchronously_and_repeats_asynchronous_commits_not_answered() -> None:
    book, kafka = ledger()
    book.decide({("t", 0): 3})
    book.commit()
    book.decide({("t", 1): 4})
    book.flush()
    assert kafka.sent == [({0: 3}, True), ({0: 3, 1: 4}, False)]
    book.flush()
    assert len(kafka.sent) == 2, "nothing left to settle"


def test_a_failed_commit_is_merged_into_the_next_unless_a_newer_one_superseded_it() -> None:
    book, kafka = ledger()
    book.decide({("t", 0): 3})
    book.commit()
    book.on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT), [TopicPartition("t", 0, 3)])
    book.decide({("t", 1): 1})
    book.commit()
    assert kafka.sent[-1] == ({0: 3, 1: 1}, True)
    book.decide({("t", 0): 7})
    book.commit()
    book.on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT), [TopicPartition("t", 0, 3)])  # older than 7
    book.decide({("t", 2): 1})
    book.commit()
    assert kafka.sent[-1] == ({2: 1}, True)


def test_commits_within_the_interval_wait_for_the_next_one_and_flush_sends_at_once() -> None:
    kafka = Commits()
    now = [100.0]
    book = OffsetLedger(min_interval_s=0.5, clock=lambda: now[0])
    book.attach(kafka)
    book.decide({("t", 0): 3})
    assert book.commit_due
    book.commit()
    assert kafka.sent == [({0: 3}, True)], "the first commit goes out at once"
    now[0] += 0.2
    book.decide({("t", 0): 5})
    book.decide({("t", 1): 2})
    assert not book.commit_due
    book.commit()
    assert len(kafka.sent) == 1, "within the interval nothing is sent"
    now[0] += 0.3
    assert book.commit_due
    book.commit()
    assert kafka.sent[-1] == ({0: 5, 1: 2}, True), "the waiting offsets go with the next commit"
    now[0] += 0.1
    book.decide({("t", 2): 7})
    book.flush()
    assert kafka.sent[-1][1] is False and kafka.sent[-1][0][2] == 7, "flush does not wait for the interval"


def test_an_interval_never_lets_awaiting_offsets_out_before_their_done_records() -> None:
    kafka = Commits()
    book = OffsetLedger(min_interval_s=0.5, clock=lambda: 0.0)
    book.attach(kafka)
    book.decide({("t", 0): 4}, awaiting_done=True)
    assert not book.commit_due
    book.flush()
    assert kafka.sent == [], "awaiting offsets stay out, interval or not"
    book.done_recorded()
    assert book.commit_due
    book.commit()
    assert kafka.sent == [({0: 4}, True)]


def test_forgotten_partitions_are_never_committed() -> None:
    book, kafka = ledger(asynchronous=False)
    book.decide({("t", 0): 3, ("t", 1): 4}, awaiting_done=True)
    book.forget([("t", 0)])
    book.done_recorded()
    book.flush()
    assert kafka.sent == [({1: 4}, False)]
    assert book.uncommitted == 0


def test_a_held_partition_is_rewound_paused_and_resumed_when_due() -> None:
    now = [100.0]
    kafka = Commits()
    pauses = PauseSchedule(clock=lambda: now[0])
    pauses.attach(kafka)
    pauses.hold(("t", 1), 7, 2.0)
    pauses.hold(("t", 2), 3, 0.0)  # rewind only
    assert kafka.seeks == [(1, 7), (2, 3)] and kafka.paused == {1} and pauses.paused == [("t", 1)]
    now[0] = 101.0
    pauses.resume_due()
    assert kafka.paused == {1}
    now[0] = 102.0
    pauses.resume_due()
    assert kafka.paused == set() and len(pauses) == 0
    pauses.hold(("t", 3), 1, 5.0)
    pauses.release([("t", 3)])
    assert pauses.paused == [] and kafka.paused == set()


def test_a_partition_held_when_revoked_is_not_paused_when_assigned_back() -> None:
    """librdkafka keeps a partition's pause across a rebalance (the fake's ``paused`` outlives the
    assignment, as librdkafka's does): revoked while held, then assigned back, it must be read again."""
    now = [100.0]
    kafka = Commits()
    pauses = PauseSchedule(clock=lambda: now[0])
    pauses.attach(kafka)
    pauses.hold(("t", 1), 7, 60.0)
    pauses.hold(("t", 2), 3, 60.0)
    pauses.release([("t", 1), ("t", 3)])  # revoked: 1 (held) and 3 (not held)
    assert kafka.paused == {2} and pauses.paused == [("t", 2)]
    kafka.paused.add(1)  # as if that resume had not reached librdkafka (e.g. the partition was lost)
    pauses.start([("t", 1)])  # assigned back
    assert kafka.paused == {2} and pauses.paused == [("t", 2)]
    now[0] = 161.0
    pauses.resume_due()
    assert kafka.paused == set() and len(pauses) == 0
