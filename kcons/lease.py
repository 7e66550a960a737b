"""The lease-backend protocol: exclusive, expiring leadership with fencing tokens.

The outbox relay takes its leadership through this protocol. Implementations: PostgreSQL
advisory locks (``kcons.adapters.postgres.leadership``), a Raft lease (``kcons.adapters.raft``)
and the single-process lease (``kcons.adapters.memory``). A fencing
token strictly increases with every new grant of a lease name, so a resource that remembers
the highest token it has seen can refuse a paused former holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Lease", "LeaseBackend"]


@dataclass(frozen=True)
class Lease:
    """A granted lease: who holds ``name``, with which fencing token, until when (monotonic seconds)."""

    name: str
    holder: str
    token: int
    expires_at: float


@runtime_checkable
class LeaseBackend(Protocol):
    """Grants one holder at a time a named lease for ``ttl_s`` seconds."""

    def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease if it is free or expired; None when another holder has it."""
        ...

    def renew(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Extend a held lease; None when it was lost (expired and taken, or revoked)."""
        ...

    def release(self, lease: Lease) -> None:
        """Give the lease up early so another holder can take it at once."""
        ...
