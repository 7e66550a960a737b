"""Majority arithmetic: quorum size, the committed index of a voter set, vote outcomes.

Small pure functions so that the rules everything else rests on can be tested on their own.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

__all__ = ["VoteResult", "committed_index", "has_quorum", "majority", "vote_result"]


class VoteResult(enum.Enum):
    """Outcome of an election so far."""

    WON = "won"
    LOST = "lost"
    PENDING = "pending"


def majority(voters: int) -> int:
    """The smallest number of voters that forms a quorum: floor(n/2) + 1 (0 voters: 0)."""
    return voters // 2 + 1 if voters > 0 else 0


def committed_index(voters: Collection[int], match: Mapping[int, int]) -> int:
    """The highest index that a majority of ``voters`` has (absent voters count as 0).

    Every index at or below the result is stored on a quorum; the core still commits it only
    when the entry there is of the leader's current term (Raft section 5.4.2).
    """
    if not voters:
        return 0
    indexes = sorted((match.get(v, 0) for v in voters), reverse=True)
    return indexes[majority(len(indexes)) - 1]


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    """WON once a majority granted, LOST once a majority can no longer grant, else PENDING."""
    need = majority(len(voters))
    granted = sum(1 for v in voters if votes.get(v) is True)
    rejected = sum(1 for v in voters if votes.get(v) is False)
    if granted >= need:
        return VoteResult.WON
    if len(voters) - rejected < need:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: Collection[int], present: Collection[int]) -> bool:
    """True when the voters in ``present`` form a majority of ``voters``."""
    return sum(1 for v in voters if v in present) >= majority(len(voters))
