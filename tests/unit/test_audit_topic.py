"""The topic auditor finds duplicates, version regressions and gaps and split aggregates; fast path = slow path."""

from __future__ import annotations

import gc
import random
import uuid
from dataclasses import asdict
from typing import Any

import pytest

from kcons.audit import TopicAuditor, VersionCheck
from kcons.audit import topic as topic_module
from kcons.envelope import Envelope
from kcons.errors import ConfigError


class Msg:
    """A consumed record with confluent-kafka's Message methods."""

    def __init__(self, partition: int, offset: int, headers: Any, key: bytes | None = None) -> None:
        self._p, self._o, self._h, self._k = partition, offset, headers, key

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def headers(self) -> Any:
        return self._h

    def key(self) -> bytes | None:
        return self._k


def event(
    aggregate: str, version: int | None, event_id: str | None = None, kind: str = "order", trace: bool = False
) -> list[Any]:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" if trace else None
    env = Envelope.of("changed", kind, aggregate, b"x", version=version, traceparent=traceparent)
    if event_id is not None:
        env = Envelope(
            env.type, env.aggregate_type, env.aggregate_id, env.payload, env.version, event_id, traceparent=traceparent
        )
    return env.headers()


class Log:
    """Builds records partition by partition with increasing offsets."""

    def __init__(self) -> None:
        self.next: dict[int, int] = {}
        self.msgs: list[Msg] = []

    def add(self, partition: int, headers: Any, skip: int = 0) -> Msg:
        """Append a record; ``skip`` offsets are left out before it (as a transaction marker does)."""
        offset = self.next.get(partition, 0) + skip
        self.next[partition] = offset + 1
        msg = Msg(partition, offset, headers, key=b"k")
        self.msgs.append(msg)
        return msg


def audit(msgs: list[Msg], versions: str = "monotonic", *, slow: bool = False, batch: int = 7) -> TopicAuditor:
    auditor = TopicAuditor("t", versions=versions)
    for i in range(0, len(msgs), batch):
        if slow:
            auditor._feed_slow(msgs[i : i + batch])
        else:
            auditor.feed(msgs[i : i + batch])
    return auditor


def test_a_clean_log_reports_no_violation_and_takes_the_fast_path() -> None:
    log = Log()
    for v in range(1, 11):
        for a in range(5):
            log.add(a % 2, event(f"a{a}", v))
    auditor = audit(log.msgs, "strict")
    report = auditor.report()
    assert report.ok and report.records == 50 and report.distinct_ids == 50
    assert auditor.slow_batches == 0 and auditor.fast_batches > 0
    assert report.partitions[0].records == 30 and report.partitions[1].records == 20


def test_a_duplicate_id_is_reported_with_the_offsets_of_both_copies() -> None:
    log = Log()
    dup_id = str(uuid.uuid4())
    log.add(0, event("a", 1, dup_id))
    for v in range(2, 20):
        log.add(0, event("a", v))
    log.add(1, event("a", 1, dup_id))  # a copy in another partition
    report = audit(log.msgs).report()
    assert report.duplicates == 1 and report.duplicate_ids == 1
    (dup,) = report.duplicate_list
    assert dup.id == dup_id and dup.first == (0, 0) and dup.copies == [(1, 0)]
    assert report.regressions == 0  # a copy is a duplicate, not a regression
    assert not report.ok


def test_a_version_gap_is_a_violation_only_when_versions_are_strict() -> None:
    log = Log()
    for v in (1, 2, 3, 5, 6):
        log.add(0, event("a", v))
    strict = audit(log.msgs, "strict").report()
    assert strict.gaps == 1 and not strict.ok
    (gap,) = strict.version_list
    assert (gap.kind, gap.aggregate, gap.previous, gap.version, gap.offset) == ("gap", "order/a", 3, 5, 3)
    assert audit(log.msgs, "monotonic").report().ok


def test_a_version_that_does_not_rise_is_a_regression() -> None:
    log = Log()
    for v in (1, 2, 3, 2, 4):
        log.add(0, event("a", v))
    report = audit(log.msgs, "monotonic").report()
    assert report.regressions == 1 and report.version_list[0].offset == 3
    assert audit(log.msgs, "off").report().ok


def test_a_regression_across_batches_is_found() -> None:
    log = Log()
    for v in range(1, 8):
        log.add(0, event("a", v))
    log.add(0, event("a", 7))  # first record of the second batch of 7
    report = audit(log.msgs, batch=7).report()
    assert report.regressions == 1


def test_an_aggregate_in_two_partitions_is_reported() -> None:
    log = Log()
    log.add(0, event("a", 1))
    log.add(0, event("b", 1))
    log.add(1, event("a", 2))
    report = audit(log.msgs).report()
    assert report.split_aggregates == 1 and report.split_list[0].partitions == [0, 1]


def test_records_without_kcons_headers_are_counted_not_checked() -> None:
    log = Log()
    log.add(0, None)
    log.add(0, [("other", b"1")])
    log.add(0, event("a", None))
    log.add(0, event("a", 1))
    report = audit(log.msgs).report()
    assert report.without_kcons_headers == 2 and report.without_version == 1
    assert report.ok


def test_same_id_in_one_batch_is_a_duplicate() -> None:
    log = Log()
    same = str(uuid.uuid4())
    log.add(0, event("a", 1, same))
    log.add(0, event("a", 1, same))
    assert audit(log.msgs).report().duplicates == 1


def test_an_unknown_version_check_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--versions"):
        TopicAuditor("t", versions="sometimes")


@pytest.mark.parametrize("check", [c.value for c in VersionCheck])
@pytest.mark.parametrize("seed", range(40))
def test_the_fast_path_reports_exactly_what_the_record_by_record_path_reports(seed: int, check: str) -> None:
    rng = random.Random(seed)
    log = Log()
    versions: dict[str, int] = {}
    ids: list[str] = []
    for _ in range(rng.randrange(20, 200)):
        a = f"a{rng.randrange(8)}"
        part = int(a[1:]) % 3 if rng.random() > 0.02 else 3  # now and then an aggregate in a stray partition
        step = 1 if rng.random() > 0.05 else rng.choice([0, 2, -1])
        versions[a] = versions.get(a, 0) + step
        roll = rng.random()
        kind = "order" if int(a[1:]) % 2 else "user"  # same id, other type: another aggregate
        trace = rng.random() < 0.2  # a sixth header on some records
        if roll < 0.03 and ids:
            headers = event(a, versions[a], rng.choice(ids), kind, trace)  # a duplicate id
        elif roll < 0.05:
            headers = None
        else:
            eid = str(uuid.uuid4())
            ids.append(eid)
            headers = event(a, versions[a], eid, kind, trace)
        log.add(part, headers, skip=1 if rng.random() < 0.05 else 0)
    batch = rng.randrange(1, 30)
    fast = audit(log.msgs, check, batch=batch).report()
    slow = audit(log.msgs, check, slow=True, batch=batch).report()
    assert asdict(fast) == asdict(slow)


def test_the_first_copy_of_an_id_that_is_part_of_other_ids_is_located_exactly() -> None:
    log = Log()
    for v, eid in enumerate(["111", "11", "1", "211"], start=1):
        log.add(0, event("a", v, eid))
    log.add(0, event("a", 9, "1"))
    auditor = audit(log.msgs, batch=4)
    assert auditor.fast_batches == 1
    (dup,) = auditor.report().duplicate_list
    assert dup.first == (0, 2) and dup.copies == [(0, 4)]


def test_records_with_more_headers_than_the_kcons_five_take_the_fast_path() -> None:
    log = Log()
    for v in range(1, 8):
        log.add(0, event("a", v, trace=v % 2 == 0) + [("tenant", b"t1")] * (v % 3))
    auditor = audit(log.msgs, "strict", batch=7)
    assert auditor.report().ok and auditor.fast_batches == 1


def test_an_aggregate_id_header_before_its_place_is_read_as_the_slow_path_reads_it() -> None:
    # The first kcons-aggregate-id wins: here it names another aggregate than the one at position 3.
    log = Log()
    for name in ("a", "c", "d"):
        headers = event(name, 1)
        headers[1] = ("kcons-aggregate-id", b"b")  # in kcons-type's place
        log.add(0, headers)
    fast = audit(log.msgs, "monotonic", batch=3)
    report = fast.report()
    assert report.regressions == 2 and {v.aggregate for v in report.version_list} == {"order/b"}
    assert asdict(report) == asdict(audit(log.msgs, "monotonic", slow=True, batch=3).report())


def test_a_duplicate_is_located_in_a_batch_over_partitions_with_offset_gaps() -> None:
    log = Log()
    dup_id = str(uuid.uuid4())
    log.add(0, event("a", 1), skip=3)
    log.add(1, event("b", 1), skip=5)
    log.add(1, event("b", 2, dup_id), skip=2)
    log.add(0, event("a", 2), skip=1)
    log.add(2, event("c", 1, dup_id))
    auditor = audit(log.msgs, batch=4)
    assert auditor.fast_batches == 1
    (dup,) = auditor.report().duplicate_list
    assert dup.first == (1, 8) and dup.copies == [(2, 0)]


def test_reading_raises_the_young_collection_threshold_and_restores_it() -> None:
    before = gc.get_threshold()
    with topic_module._fewer_collections():
        with topic_module._fewer_collections():  # a second read at the same time
            assert gc.get_threshold()[0] >= topic_module._READ_THRESHOLD
        assert gc.get_threshold()[0] >= topic_module._READ_THRESHOLD
    assert gc.get_threshold() == before


def test_the_highest_version_of_a_batch_is_what_the_next_batch_is_checked_against() -> None:
    log = Log()
    for name, v in (("a", 1), ("b", 1), ("a", 3), ("a", 7), ("a", 7), ("a", 8)):
        log.add(0, event(name, v))
    auditor = audit(log.msgs, "monotonic", batch=4)
    report = auditor.report()
    assert auditor.fast_batches == 1 and report.regressions == 1
    assert (report.version_list[0].previous, report.version_list[0].offset) == (7, 4)
