"""Errors of the Raft metadata log, all children of the kcons hierarchy."""

from __future__ import annotations

from kcons.errors import DecodeError, KconsError, StoreError

__all__ = [
    "CorruptLogError",
    "FrameRejectedError",
    "NodeUnreachableError",
    "NotLeaderError",
    "OutcomeUnknownError",
    "ProposalDroppedError",
    "RaftError",
]


class RaftError(KconsError):
    """Root of the Raft errors."""


class NotLeaderError(RaftError):
    """This node cannot serve the request; ``leader`` is the id it believes leads (0: unknown)."""

    def __init__(self, leader: int, address: str | None = None) -> None:
        self.leader = leader
        self.address = address
        super().__init__(f"not the leader (leader hint: {leader or 'unknown'})")


class NodeUnreachableError(RaftError, ConnectionError):
    """A node could not be reached or dropped the connection (still an ``OSError`` for older callers)."""


class ProposalDroppedError(RaftError):
    """The proposal cannot be accepted now (leadership transfer, pending membership change)."""


class OutcomeUnknownError(RaftError):
    """A command may or may not have been applied (the node stopped or its log was replaced)."""


class CorruptLogError(StoreError):
    """The write-ahead log is damaged before its tail; recovery refuses to guess."""


class FrameRejectedError(DecodeError):
    """A transport frame was unauthenticated, replayed, oversized, out of range or malformed.

    It is dropped and counted in ``kcons_raft_frames_rejected_total{reason}`` with ``reason``
    (``auth``, ``replay``, ``handshake``, ``oversized``, ``range``, ``malformed``, ...).
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason
