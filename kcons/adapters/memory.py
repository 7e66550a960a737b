"""In-process adapters: a dedup store and a lease backend for one process.

:class:`MemoryDedupStore` is a bounded LRU of ids with lease and retention TTLs. Fast and
dependency-free, for a single consumer process (tests, caches of idempotent effects). It forgets
everything when the process exits, and when it is full it evicts the least recently written ids
first, so it bounds memory at the price of dedup memory. :class:`SingleProcessLease` is the lease
backend of a relay that is the only one of its outbox (the SQLite case).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from itertools import islice

from kcons.config import check_range
from kcons.dedup import DEFAULT_RETENTION_S, ClaimResult, StoreCapabilities, check_lease, check_retention
from kcons.lease import Lease
from kcons.metrics import observe_dedup_store

__all__ = ["MemoryDedupStore", "SingleProcessLease"]

_IN_PROGRESS = 0
_DONE = 1


class MemoryDedupStore:
    """Dedup store in a bounded LRU: claims expire after their lease, done ids after ``retention_s``.

    Thread-safe. Atomic per batch because the whole batch is claimed under one lock. At most
    ``max_entries`` ids are kept; the oldest written are evicted first.
    """

    #: Batch and pipelined claims; in-process calls (the consumer does not overlap them with its offset commits).
    capabilities = StoreCapabilities(batch_claim=True, pipelined=True, in_process=True)

    def __init__(
        self,
        max_entries: int = 1_000_000,
        retention_s: float = DEFAULT_RETENTION_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = check_range("max_entries", int(max_entries), 1, 1 << 40)
        self._retention = check_retention("retention_s", retention_s)
        self._clock = clock
        self._lock = threading.Lock()
        # id -> (state, expires_at); order = least recently written first (a plain dict keeps
        # insertion order, and its bulk update runs in C).
        self._entries: dict[str, tuple[int, float]] = {}
        self._latency = observe_dedup_store("memory")

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, ids: Sequence[str], lease_s: float) -> set[str]:
        """Claim the ids that are neither done nor held under an unexpired lease."""
        return set(self.claim_batch(ids, lease_s).claimed)

    def claim_batch(self, ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Claim new ids for ``lease_s`` seconds; report the done and busy others."""
        lease = check_lease(lease_s)
        started = time.perf_counter()
        claimed: set[str] = set()
        done: list[str] = []
        busy: list[str] = []
        entries = self._entries
        get = entries.get
        with self._lock:
            now = self._clock()
            lease_entry = (_IN_PROGRESS, now + lease)
            if entries.keys().isdisjoint(ids):  # the common case, in C: every id is new
                entries.update(dict.fromkeys(ids, lease_entry))
                self._evict()
                self._latency["claim"].observe(time.perf_counter() - started)
                return ClaimResult(frozenset(ids))
            for event_id in ids:
                entry = get(event_id)
                if entry is None:
                    entries[event_id] = lease_entry  # new keys go to the end: most recent
                    claimed.add(event_id)
                elif entry[1] > now:
                    if entry[0] == _DONE:
                        done.append(event_id)
                    elif event_id not in claimed:  # a repeat within the batch is not busy
                        busy.append(event_id)
                else:  # expired: claim again, as the most recent entry
                    del entries[event_id]
                    entries[event_id] = lease_entry
                    claimed.add(event_id)
            self._evict()
        self._latency["claim"].observe(time.perf_counter() - started)
        return ClaimResult(frozenset(claimed), frozenset(done), frozenset(busy))

    def complete_and_claim(self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Mark ``done_ids`` done, then claim ``ids`` (the consumer's one-call-per-batch path)."""
        if done_ids:
            self.complete(done_ids)
        return self.claim_batch(ids, lease_s)

    def complete(self, ids: Sequence[str]) -> None:
        """Mark ids done until ``retention_s`` from now."""
        started = time.perf_counter()
        entries = self._entries
        with self._lock:
            done_entry = (_DONE, self._clock() + self._retention)
            # Ids are completed shortly after their claim put them at the end: no reordering needed.
            entries.update(dict.fromkeys(ids, done_entry))
            self._evict()
        self._latency["complete"].observe(time.perf_counter() - started)

    def release(self, ids: Sequence[str]) -> None:
        """Forget in-progress claims (done ids stay done)."""
        started = time.perf_counter()
        with self._lock:
            for event_id in ids:
                entry = self._entries.get(event_id)
                if entry is not None and entry[0] == _IN_PROGRESS:
                    del self._entries[event_id]
        self._latency["release"].observe(time.perf_counter() - started)

    def _evict(self) -> None:
        excess = len(self._entries) - self._max
        if excess > 0:  # the least recently written, in one pass over the front
            for event_id in list(islice(self._entries, excess)):
                del self._entries[event_id]


class SingleProcessLease:
    """A lease backend for exactly one relay process (the SQLite case): always granted, never lost."""

    def __init__(self) -> None:
        self._token = 0
        self._lock = threading.Lock()

    def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Grant the lease with the next token."""
        with self._lock:
            self._token += 1
            return Lease(name=name, holder=holder, token=self._token, expires_at=time.monotonic() + ttl_s)

    def renew(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Extend the lease."""
        return Lease(name=lease.name, holder=lease.holder, token=lease.token, expires_at=time.monotonic() + ttl_s)

    def release(self, lease: Lease) -> None:
        """Nothing to release."""
