"""The in-memory Raft log: appending, conflicts, stable and applied marks, compaction."""

from __future__ import annotations

import pytest

from kcons.raft.log import RaftLog
from kcons.raft.messages import Entry


def ents(*terms: int, start: int = 1) -> list[Entry]:
    return [Entry(t, start + n, data=f"{t}/{start + n}".encode()) for n, t in enumerate(terms)]


def test_append_after_matching_prefix_and_commit_is_bounded_by_last_new_entry() -> None:
    log = RaftLog()
    assert log.maybe_append(0, 0, 5, ents(1, 1)) == 2
    assert log.last_index() == 2
    assert log.committed == 2  # min(leader commit 5, last new index 2)


def test_mismatching_previous_term_is_refused() -> None:
    log = RaftLog(entries=ents(1, 1))
    assert log.maybe_append(2, 2, 0, ents(2, start=3)) is None
    assert log.last_index() == 2


def test_conflicting_suffix_is_replaced() -> None:
    log = RaftLog(entries=ents(1, 1, 2, 2))
    assert log.maybe_append(2, 1, 0, ents(3, start=3)) == 3
    assert [e.term for e in log.entries] == [1, 1, 3]
    assert log.unstable_from == 3  # the replaced suffix must be persisted again
    assert [e.index for e in log.unstable()] == [3]


def test_stale_shorter_append_does_not_truncate_matching_entries() -> None:
    log = RaftLog(entries=ents(1, 1, 1, 1))
    assert log.maybe_append(1, 1, 0, ents(1, start=2)) == 2
    assert log.last_index() == 4


def test_overwriting_a_committed_entry_is_a_bug() -> None:
    log = RaftLog(entries=ents(1, 1, 1))
    log.commit_to(3)
    with pytest.raises(AssertionError):
        log.append(ents(2, start=2))


def test_entries_are_applied_only_once_committed_and_persisted() -> None:
    log = RaftLog()
    log.maybe_append(0, 0, 3, ents(1, 1, 1))
    assert log.next_to_apply() == []  # committed but not on local disk yet
    log.stable_to(2, 1)
    assert [e.index for e in log.next_to_apply()] == [1, 2]
    log.applied_to(2)
    log.stable_to(3, 1)
    assert [e.index for e in log.next_to_apply()] == [3]


def test_stable_to_ignores_an_acknowledgement_for_a_replaced_entry() -> None:
    log = RaftLog()
    log.maybe_append(0, 0, 0, ents(1, 1))
    log.stable_to(2, 7)
    assert log.stable_index() == 0
    log.stable_to(2, 1)
    assert log.stable_index() == 2


def test_compaction_keeps_the_boundary_term_and_slices_after_it() -> None:
    log = RaftLog(entries=ents(1, 1, 2, 2, 3))
    log.stable_to(5, 3)
    log.commit_to(4)
    log.applied_to(4)
    log.compact(3)
    assert (log.snap_index, log.snap_term) == (3, 2)
    assert log.term(3) == 2
    assert log.term(2) is None
    assert [e.index for e in log.slice(1, 6)] == [4, 5]


def test_compaction_beyond_applied_is_refused() -> None:
    log = RaftLog(entries=ents(1, 1))
    with pytest.raises(AssertionError):
        log.compact(2)


def test_up_to_date_compares_last_term_then_length() -> None:
    log = RaftLog(entries=ents(1, 2, 2))
    assert log.is_up_to_date(1, 3)
    assert log.is_up_to_date(3, 2)
    assert not log.is_up_to_date(2, 2)
    assert not log.is_up_to_date(10, 1)


def test_slice_stops_at_byte_budget_but_returns_at_least_one_entry() -> None:
    big = [Entry(1, i, data=b"x" * 100) for i in range(1, 11)]
    log = RaftLog(entries=big)
    assert len(log.slice(1, 11, max_bytes=300)) == 2
    assert len(log.slice(1, 11, max_bytes=1)) == 1
