"""Majority arithmetic that every Raft decision rests on."""

from __future__ import annotations

from kcons.raft.quorum import VoteResult, committed_index, has_quorum, majority, vote_result


def test_majority_is_more_than_half() -> None:
    assert [majority(n) for n in range(0, 8)] == [0, 1, 2, 2, 3, 3, 4, 4]


def test_committed_index_is_the_highest_index_a_majority_holds() -> None:
    assert committed_index((1, 2, 3), {1: 5, 2: 3, 3: 1}) == 3
    assert committed_index((1, 2, 3, 4, 5), {1: 9, 2: 9, 3: 2, 4: 7, 5: 1}) == 7
    assert committed_index((1, 2, 3, 4), {1: 4, 2: 4, 3: 1, 4: 1}) == 1


def test_committed_index_counts_missing_voters_as_zero_and_ignores_non_voters() -> None:
    assert committed_index((1, 2, 3), {1: 8, 9: 8}) == 0
    assert committed_index((1, 2, 3), {1: 8, 2: 6, 9: 100}) == 6
    assert committed_index((), {1: 5}) == 0


def test_vote_result_wins_at_majority_and_loses_when_majority_impossible() -> None:
    voters = (1, 2, 3, 4, 5)
    assert vote_result(voters, {1: True, 2: True}) is VoteResult.PENDING
    assert vote_result(voters, {1: True, 2: True, 3: True}) is VoteResult.WON
    assert vote_result(voters, {1: True, 2: False, 3: False}) is VoteResult.PENDING
    assert vote_result(voters, {1: True, 2: False, 3: False, 4: False}) is VoteResult.LOST


def test_votes_from_non_voters_do_not_count() -> None:
    assert vote_result((1, 2, 3), {1: True, 7: True, 8: True}) is VoteResult.PENDING


def test_has_quorum_needs_a_majority_of_voters() -> None:
    assert has_quorum((1, 2, 3), {1, 2})
    assert not has_quorum((1, 2, 3), {1, 9})
    assert not has_quorum((1, 2, 3, 4), {1, 2})
