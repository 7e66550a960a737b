"""ConsistentCache on a real 3-node Redis Cluster: data and lease keys share a slot, so the one script works."""

from __future__ import annotations

import threading
from typing import Any

from kcons.cache import CacheEntry, CacheSettings, ConsistentCache, Versioned


def test_fill_invalidate_and_batched_writes_work_across_cluster_slots(redis_cluster: Any) -> None:
    cache = ConsistentCache(redis_cluster, name="cluster", settings=CacheSettings(prefix="kc"))
    keys = [f"user:{i}" for i in range(40)]  # spread over the three nodes
    for k in keys:
        assert cache.get(k, lambda key: Versioned(key.encode(), 1)) == Versioned(k.encode(), 1)
    results = cache.apply_writes([cache.tombstone_write(k, 2) for k in keys] + [cache.tombstone_write(keys[0], 1)])
    assert [r.outcome.name for r in results] == ["APPLIED"] * 40 + ["STALE"]
    assert all(cache.peek(k) == CacheEntry(2, None) for k in keys)
    assert not cache.write_through(keys[1], b"old", 1)
    assert cache.write_through(keys[1], b"new", 2)
    assert cache.peek(keys[1]) == CacheEntry(2, b"new")


def test_invalidated_lease_refuses_the_fill_on_a_cluster(redis_cluster: Any) -> None:
    cache = ConsistentCache(redis_cluster, name="cluster", settings=CacheSettings(prefix="kc2"))
    loading, proceed = threading.Event(), threading.Event()

    def slow(key: str) -> Versioned:
        loading.set()
        proceed.wait(10)
        return Versioned(b"old", 1)

    reader = threading.Thread(target=cache.get, args=("order:{7}", slow))
    reader.start()
    assert loading.wait(10)
    assert cache.invalidate("order:{7}", 2)
    proceed.set()
    reader.join(10)
    assert cache.peek("order:{7}") == CacheEntry(2, None)
