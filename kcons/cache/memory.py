"""An in-process cache backend with the same guard and lease rules as Redis (tests, single processes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from kcons.cache.model import (
    CacheEntry,
    CacheWrite,
    WriteOp,
    WriteOutcome,
    WriteResult,
    guard_decides,
    history_trusts,
)

__all__ = ["MemoryCacheBackend"]


class MemoryCacheBackend:
    """An in-process :class:`CacheBackend` with the same guard and lease rules (for tests and single processes)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._data: dict[str, tuple[CacheEntry, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._floors: dict[str, tuple[int, int, float]] = {}  # key -> (floor, since ms, expiry)

    def _entry(self, key: str) -> CacheEntry | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._data[key]
            return None
        return item[0]

    def _lease(self, key: str) -> str | None:
        item = self._leases.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._leases[key]
            return None
        return item[0]

    def _floor(self, key: str) -> tuple[int, int] | None:
        item = self._floors.get(key)
        if item is None:
            return None
        if item[2] <= self._clock():
            del self._floors[key]
            return None
        return item[0], item[1]

    def forget(self) -> None:
        """Drop every entry, lease and floor, as a Redis restart without persistence does."""
        with self._lock:
            self._data.clear()
            self._leases.clear()
            self._floors.clear()

    def read(self, key: str) -> CacheEntry | None:
        """The stored entry, or None."""
        with self._lock:
            return self._entry(key)

    def take_lease(self, key: str, token: str, ttl_ms: int) -> CacheEntry | bool:
        """A cached value when there is one; else whether the lease was taken."""
        with self._lock:
            entry = self._entry(key)
            if entry is not None and not entry.is_tombstone:
                return entry
            if self._lease(key) is not None:
                return False
            self._leases[key] = (token, self._clock() + ttl_ms / 1000)
            return True

    def release_lease(self, key: str, token: str) -> None:
        """Drop the lease if ``token`` still holds it."""
        with self._lock:
            if self._lease(key) == token:
                del self._leases[key]

    def write(self, write: CacheWrite) -> WriteResult:
        """Apply one guarded write."""
        with self._lock:
            return self._write(write)

    def write_many(self, writes: Sequence[CacheWrite]) -> list[WriteResult]:
        """Apply guarded writes in order."""
        with self._lock:
            return [self._write(w) for w in writes]

    def _write(self, w: CacheWrite) -> WriteResult:
        stored = self._entry(w.key)
        stored_version = None if stored is None else stored.version
        if w.op is WriteOp.FILL:
            if self._lease(w.key) != w.token:
                return WriteResult(WriteOutcome.LEASE_LOST, stored_version)
            del self._leases[w.key]
        floor, since = self._floor(w.key) or (None, None)
        now_ms = int(self._wall() * 1000)
        trusted = w.op is not WriteOp.SET or history_trusts(since, w, now_ms)
        outcome, kind = guard_decides(w.op, stored, floor, w.version, trusted=trusted)
        if kind is None:
            return WriteResult(outcome, stored_version)
        now = self._clock()
        expires = now + w.ttl_ms / 1000
        kept = self._floors.get(w.key)
        if kind is WriteOp.FILL:
            since = 0
        elif since is None:
            since = now_ms
        top = w.version if floor is None else max(floor, w.version)
        self._floors[w.key] = (top, since, max(now + 2 * w.ttl_ms / 1000, kept[2] if kept else 0.0))
        if kind is WriteOp.TOMBSTONE:
            self._data[w.key] = (CacheEntry(w.version, None), expires)
            self._leases.pop(w.key, None)
        else:
            self._data[w.key] = (CacheEntry(w.version, w.value), expires)
        return WriteResult(outcome, w.version)
