"""ConsistentCache's lease logic over the in-process backend (same guard and lease rules as the Lua script)."""

from __future__ import annotations

import time

import pytest

from kcons.cache import (
    CacheEntry,
    CacheSettings,
    CacheWrite,
    ConsistentCache,
    MemoryCacheBackend,
    Versioned,
    WriteOp,
    WriteOutcome,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cache(clock: Clock | None = None, **settings: float) -> ConsistentCache:
    backend = MemoryCacheBackend(clock or Clock())
    return ConsistentCache(backend=backend, settings=CacheSettings(**settings))  # type: ignore[arg-type]


def test_miss_loads_fills_and_then_hits_without_loading() -> None:
    cache = _cache()
    calls: list[str] = []

    def loader(key: str) -> Versioned:
        calls.append(key)
        return Versioned(b"row", 1)

    assert cache.get("k", loader) == Versioned(b"row", 1)
    assert cache.get("k", loader) == Versioned(b"row", 1)
    assert calls == ["k"]


def test_invalidation_during_a_load_refuses_the_fill() -> None:
    cache = _cache()

    def loader(key: str) -> Versioned:
        assert cache.invalidate(key, 2)  # the writer's invalidation lands while this reader loads
        return Versioned(b"old", 1)

    assert cache.get("k", loader) == Versioned(b"old", 1)
    assert cache.peek("k") == CacheEntry(2, None)


def test_a_fill_needs_the_lease_it_took() -> None:
    backend = MemoryCacheBackend(Clock())
    assert backend.take_lease("k", "a", 1000) is True
    assert backend.take_lease("k", "b", 1000) is False
    assert backend.write(CacheWrite(WriteOp.FILL, "k", 1, b"x", 1000, "b")).outcome is WriteOutcome.LEASE_LOST
    assert backend.write(CacheWrite(WriteOp.FILL, "k", 1, b"x", 1000, "a")).outcome is WriteOutcome.APPLIED
    assert backend.take_lease("k", "c", 1000) == CacheEntry(1, b"x")


def test_values_leases_and_tombstones_expire() -> None:
    clock = Clock()
    backend = MemoryCacheBackend(clock)
    assert backend.take_lease("k", "a", 1000) is True
    clock.now = 1.5
    assert backend.take_lease("k", "b", 1000) is True  # the first lease expired
    backend.write(CacheWrite(WriteOp.TOMBSTONE, "t", 3, b"", 2000))
    clock.now = 4.0
    assert backend.read("t") is None


def test_a_failing_loader_gives_the_lease_back() -> None:
    cache = _cache(lease_wait_s=0.0)

    def broken(key: str) -> Versioned:
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError):
        cache.get("k", broken)
    assert cache.get("k", lambda key: Versioned(b"v", 1)) == Versioned(b"v", 1)
    assert cache.peek("k") == CacheEntry(1, b"v")


def test_too_late_write_through_invalidates_instead_of_writing() -> None:
    cache = _cache(tombstone_ttl_s=60.0)
    assert cache.get("k", lambda key: Versioned(b"v4", 4)) == Versioned(b"v4", 4)
    assert cache.write_through("k", b"v5", 5)
    assert not cache.write_through("k", b"v6", 6, committed_at=0.0)  # committed in 1970: far too late
    assert cache.peek("k") == CacheEntry(6, None)


def test_after_the_store_forgets_everything_a_stalled_write_through_stores_a_tombstone_not_its_value() -> None:
    wall = Clock()
    wall.now = time.time()  # the store's clock: commit times are compared with it
    backend = MemoryCacheBackend(Clock(), wall=wall)
    cache = ConsistentCache(backend=backend, settings=CacheSettings(tombstone_ttl_s=300.0))
    assert cache.get("k", lambda key: Versioned(b"v1", 1)) == Versioned(b"v1", 1)
    a_committed = wall.now  # A commits v2 and stalls
    assert cache.write_through("k", b"v3", 3, committed_at=wall.now)
    backend.forget()  # Redis restarted without persistence
    wall.now += 5
    assert cache.invalidate("k", 1)  # a lagging invalidation rebuilds a history at v1
    assert not cache.write_through("k", b"v2", 2, committed_at=a_committed)
    assert cache.peek("k") == CacheEntry(2, None)
    assert not cache.write_through("k", b"v2", 2)  # no commit time: the history is younger than a tombstone TTL
    wall.now += 301
    assert cache.write_through("k", b"v4", 4)
    assert cache.write_through("k", b"v5", 5, committed_at=wall.now)
    assert cache.peek("k") == CacheEntry(5, b"v5")
