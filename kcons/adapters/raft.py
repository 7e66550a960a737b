"""A :class:`kcons.lease.LeaseBackend` on the Raft metadata store, for outbox relay leadership.

Grants go through the Raft log, so at most one holder has a lease name at any time in the
cluster's view, and each grant's fencing token (the log index of the grant) is larger than every
earlier token of any lease. Clock assumption: the cluster measures expiry on the leader's wall
clock (stamped into the command), while the holder measures it on its own monotonic clock *from
before it sent the request*; so as long as clocks advance at roughly the same rate the holder
believes it holds the lease no longer than the cluster does. A leader change to a node whose
clock is ahead can shorten a lease: the fencing token is what keeps a former holder out, and the
outbox relay checks it in the same database transaction that publishes.
"""

from __future__ import annotations

import time
from dataclasses import replace

from kcons.errors import KconsError, StoreError
from kcons.lease import Lease
from kcons.raft.client import RaftClient

__all__ = ["RaftLeaseBackend"]


class RaftLeaseBackend:
    """Leases with TTL and fencing tokens held in the Raft KV store (implements LeaseBackend)."""

    def __init__(self, client: RaftClient) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"RaftLeaseBackend({self.client!r})"

    def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take ``name`` if free or expired; None while another holder has it."""
        started = time.monotonic()
        try:
            answer = self.client.acquire_lease(name, holder, ttl_s)
        except KconsError as exc:
            raise StoreError(f"raft lease acquire failed: {exc}") from exc
        if not answer.get("ok"):
            return None
        return Lease(name=name, holder=holder, token=int(answer["token"]), expires_at=started + ttl_s)

    def renew(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Extend ``lease``; None when it expired or was taken (its token no longer matches)."""
        started = time.monotonic()
        try:
            ok = self.client.renew_lease(lease.name, lease.token, ttl_s)
        except KconsError as exc:
            raise StoreError(f"raft lease renew failed: {exc}") from exc
        return replace(lease, expires_at=started + ttl_s) if ok else None

    def release(self, lease: Lease) -> None:
        """Give ``lease`` up so another holder can take it at once (no-op if already lost)."""
        try:
            self.client.release_lease(lease.name, lease.token)
        except KconsError as exc:
            raise StoreError(f"raft lease release failed: {exc}") from exc
