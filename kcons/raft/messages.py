"""Raft's value types: log entries, hard state, snapshots and the one message shape.

All are frozen dataclasses so the core can hand them to a driver without copying and a
driver cannot change what the core still refers to. Node ids are small positive integers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "ConfState",
    "Entry",
    "EntryKind",
    "HardState",
    "Message",
    "MsgType",
    "ReadState",
    "Snapshot",
    "SnapshotMeta",
]


class EntryKind(enum.IntEnum):
    """What an entry carries: application data, a leader's no-op, or a new voter set."""

    NORMAL = 0
    NOOP = 1
    CONFIG = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry; ``(index, term)`` identifies it across the cluster (log matching)."""

    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on stable storage before any message is sent: term, vote, commit."""

    term: int = 0
    vote: int = 0
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """The voter set; changed one server at a time through CONFIG entries."""

    voters: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot ends in the log and which voters were configured there."""

    index: int
    term: int
    voters: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state-machine image covering every entry up to ``meta.index``."""

    meta: SnapshotMeta
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the local state machine applied ``index``."""

    index: int
    context: bytes


class MsgType(enum.IntEnum):
    """The kinds of Raft message (etcd naming)."""

    APP = 1
    APP_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    PRE_VOTE = 5
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9
    TIMEOUT_NOW = 10
    READ_INDEX = 11
    READ_INDEX_RESP = 12


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft message; fields unused by a type stay at their defaults.

    ``index``/``log_term`` locate the entry preceding ``entries`` (APP), the candidate's last
    entry (VOTE, PRE_VOTE) or the acknowledged index (APP_RESP). ``hint`` is the rejecter's
    last index, ``context`` carries ReadIndex request ids and the leadership-transfer flag.
    """

    type: MsgType
    src: int
    dst: int
    term: int
    log_term: int = 0
    index: int = 0
    commit: int = 0
    entries: tuple[Entry, ...] = ()
    reject: bool = False
    hint: int = 0
    context: bytes = b""
    snapshot: Snapshot | None = field(default=None)
