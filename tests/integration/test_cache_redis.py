"""ConsistentCache on a real Redis: the Lua guard, leases, and concurrent misses."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

from kcons.cache import (
    CacheEntry,
    CacheSettings,
    CacheWrite,
    ConsistentCache,
    Versioned,
    WriteOp,
    WriteOutcome,
    guard_decides,
)
from kcons.cache.redis import RedisCacheBackend


def _cache(redis_client: Any, **settings: Any) -> ConsistentCache:
    return ConsistentCache(
        redis_client, name="test", settings=CacheSettings(prefix=f"t{uuid.uuid4().hex[:8]}", **settings)
    )


def test_lua_script_decides_exactly_like_the_pure_guard(redis_client: Any) -> None:
    cache = _cache(redis_client)
    rng = random.Random(7)
    model: dict[str, CacheEntry] = {}
    floors: dict[str, int] = {}
    for i in range(600):
        key = f"k{rng.randrange(4)}"
        op = rng.choice([WriteOp.SET, WriteOp.TOMBSTONE])
        version = rng.randrange(12)
        expect, stored = guard_decides(op, model.get(key), floors.get(key), version)
        result = cache.backend.write(CacheWrite(op, key, version, b"v%d" % i, 60_000))
        assert result.outcome is expect, (op, model.get(key), version)
        if stored is not None:
            model[key] = CacheEntry(version, None if stored is WriteOp.TOMBSTONE else b"v%d" % i)
            floors[key] = max(version, floors.get(key, 0))
        if i % 50 == 49:  # the entry is evicted: its floor still guards the key
            model.pop(key, None)
            redis_client.delete(cache.backend.keys(key)[0])  # type: ignore[attr-defined]
        assert cache.peek(key) == model.get(key)


def test_versions_beyond_float_precision_compare_exactly(redis_client: Any) -> None:
    cache = _cache(redis_client)
    big = 2**63 + 1
    assert cache.get("k", lambda key: Versioned(b"first", big - 2)) == Versioned(b"first", big - 2)
    assert cache.invalidate("k", big)
    assert not cache.write_through("k", b"old", big - 1)
    assert cache.write_through("k", b"new", big)
    assert cache.peek("k") == CacheEntry(big, b"new")


def test_concurrent_misses_cause_one_load(redis_client: Any) -> None:
    cache = _cache(redis_client, lease_wait_s=20.0)
    loads = 0
    lock = threading.Lock()
    barrier = threading.Barrier(16)
    results: list[Versioned | None] = []

    def loader(key: str) -> Versioned:
        nonlocal loads
        with lock:
            loads += 1
        time.sleep(0.3)
        return Versioned(b"row", 3)

    def read() -> None:
        barrier.wait()
        got = cache.get("hot", loader)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=read) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == 1
    assert results == [Versioned(b"row", 3)] * 16
    assert cache.peek("hot") == CacheEntry(3, b"row")


def test_a_fill_whose_lease_was_invalidated_is_refused(redis_client: Any) -> None:
    cache = _cache(redis_client)
    loading = threading.Event()
    proceed = threading.Event()

    def slow_old_loader(key: str) -> Versioned:
        loading.set()
        proceed.wait(10)
        return Versioned(b"old", 1)

    reader = threading.Thread(target=cache.get, args=("k", slow_old_loader))
    reader.start()
    assert loading.wait(10)
    assert cache.invalidate("k", 2)  # the writer's commit of version 2 is applied while the reader loads
    proceed.set()
    reader.join(10)
    assert cache.peek("k") == CacheEntry(2, None)
    assert cache.get("k", lambda key: Versioned(b"new", 2)) == Versioned(b"new", 2)
    assert cache.peek("k") == CacheEntry(2, b"new")


def test_a_fill_after_the_lease_expired_and_a_new_loader_took_over_is_refused(redis_client: Any) -> None:
    cache = _cache(redis_client, lease_ttl_s=0.2, lease_wait_s=0.0)
    backend = cache.backend
    assert isinstance(backend, RedisCacheBackend)
    assert backend.take_lease("k", "first", 200) is True
    time.sleep(0.3)
    assert backend.take_lease("k", "second", 5000) is True
    late = backend.write(CacheWrite(WriteOp.FILL, "k", 1, b"slow", 60_000, "first"))
    assert late.outcome is WriteOutcome.LEASE_LOST
    ok = backend.write(CacheWrite(WriteOp.FILL, "k", 1, b"fresh", 60_000, "second"))
    assert ok.outcome is WriteOutcome.APPLIED and cache.peek("k") == CacheEntry(1, b"fresh")


def test_waiters_that_time_out_read_through_without_filling(redis_client: Any) -> None:
    cache = _cache(redis_client, lease_wait_s=0.05)
    backend = cache.backend
    assert backend.take_lease("k", "someone-else", 10_000) is True
    got = cache.get("k", lambda key: Versioned(b"direct", 4))
    assert got == Versioned(b"direct", 4)
    assert cache.peek("k") is None


def test_a_failing_loader_releases_the_lease(redis_client: Any) -> None:
    cache = _cache(redis_client, lease_wait_s=0.0)

    def broken(key: str) -> Versioned:
        raise RuntimeError("db down")

    try:
        cache.get("k", broken)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the loader's error must propagate")
    assert cache.get("k", lambda key: Versioned(b"v", 1)) == Versioned(b"v", 1)
    assert cache.peek("k") == CacheEntry(1, b"v")


def test_values_and_tombstones_carry_bounded_ttls(redis_client: Any) -> None:
    cache = _cache(redis_client, value_ttl_s=100.0, tombstone_ttl_s=50.0)
    backend = cache.backend
    assert isinstance(backend, RedisCacheBackend)
    assert cache.get("a", lambda key: Versioned(b"w", 1)) == Versioned(b"w", 1)
    assert cache.write_through("a", b"x", 2)
    cache.invalidate("b", 1)
    assert 0 < redis_client.pttl(backend.keys("a")[0]) <= 100_000
    assert 0 < redis_client.pttl(backend.keys("b")[0]) <= 50_000


def test_absent_rows_are_not_cached(redis_client: Any) -> None:
    cache = _cache(redis_client)
    assert cache.get("missing", lambda key: None) is None
    assert cache.peek("missing") is None
    assert cache.get("missing", lambda key: Versioned(b"now", 1)) == Versioned(b"now", 1)


def test_batched_writes_survive_redis_losing_its_script_cache() -> None:
    import redis

    from kcons.testing.local import RedisServer

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        cache = ConsistentCache(client, name="flush")
        assert cache.get("b", lambda key: Versioned(b"w", 0)) == Versioned(b"w", 0)
        client.script_flush()
        results = cache.apply_writes([cache.tombstone_write("a", 2), cache.value_write("b", b"x", 1)])
        assert [r.outcome for r in results] == [WriteOutcome.APPLIED] * 2
        client.script_flush()
        assert cache.invalidate("b", 2)
        assert cache.peek("a") == CacheEntry(2, None) and cache.peek("b") == CacheEntry(2, None)
        client.close()


def test_lua_leases_and_fills_behave_like_the_reference_backend(redis_client: Any) -> None:
    from kcons.cache import MemoryCacheBackend

    redis_backend = _cache(redis_client).backend
    model = MemoryCacheBackend()
    rng = random.Random(3)
    tokens = ["a", "b", "c"]
    seen: set[tuple[str, str]] = set()
    for step in range(1500):
        key = f"k{rng.randrange(3)}"
        token = rng.choice(tokens)
        kind = rng.choice(["lease", "fill", "fill", "set", "tomb", "release"])
        stored = model.read(key)
        version = rng.randrange(8) if stored is None or rng.random() < 0.5 else stored.version + rng.randrange(2)
        if kind == "lease":
            got, want = redis_backend.take_lease(key, token, 60_000), model.take_lease(key, token, 60_000)
        elif kind == "release":
            redis_backend.release_lease(key, token)
            model.release_lease(key, token)
            got = want = None
        else:
            op = {"fill": WriteOp.FILL, "set": WriteOp.SET, "tomb": WriteOp.TOMBSTONE}[kind]
            w = CacheWrite(op, key, version, b"s%d" % step, 60_000, token if op is WriteOp.FILL else "")
            got, want = redis_backend.write(w).outcome, model.write(w).outcome
        assert got == want, (step, kind, key, token, version)
        assert redis_backend.read(key) == model.read(key), (step, kind, key)
        seen.add((kind, type(got).__name__ if kind == "lease" and not isinstance(got, bool) else str(got)))
    for expected in [
        ("lease", "True"), ("lease", "False"), ("lease", "CacheEntry"), ("fill", "WriteOutcome.APPLIED"),
        ("fill", "WriteOutcome.STALE"), ("fill", "WriteOutcome.LEASE_LOST"), ("tomb", "WriteOutcome.STALE"),
    ]:  # fmt: skip
        assert expected in seen, (expected, seen)


def test_a_client_that_decodes_responses_is_refused_at_construction(redis_url: str) -> None:
    import redis

    from kcons.errors import ConfigError

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ConsistentCache(client)
    except ConfigError as exc:
        assert exc.setting == "KCONS_REDIS_URL"
    else:
        raise AssertionError("a str-decoding client must be refused")
    finally:
        client.close()


def test_a_stalled_write_through_cannot_bring_an_old_version_back_after_redis_restarts_empty() -> None:
    import redis

    from kcons.testing.local import RedisServer

    server = RedisServer().start()
    port = server.port
    client = redis.Redis.from_url(server.url)
    try:
        cache = ConsistentCache(client, name="restart")
        keys = [f"item:{i}" for i in range(10)]
        for k in keys:
            assert cache.get(k, lambda key: Versioned(b"v1", 1)) == Versioned(b"v1", 1)
        started = time.time()  # writer A commits v2 of every key here, then stalls
        for k in keys:  # writer B commits v3 and writes it through; the tombstones for v2 and v3 come late
            assert cache.write_through(k, b"v3", 3)
            assert not cache.invalidate(k, 2) and not cache.invalidate(k, 3)
        server.close()  # Redis restarts without persistence: every entry, lease and floor is gone
        server = RedisServer(port=port).start()
        applied = [cache.write_through(k, b"v2", 2, committed_at=started) for k in keys]
        assert applied == [False] * 10
        assert all(cache.peek(k) == CacheEntry(2, None) for k in keys)  # a tombstone instead of the old value
        assert cache.get(keys[0], lambda key: Versioned(b"v3", 3)) == Versioned(b"v3", 3)
    finally:
        client.close()
        server.close()


def test_an_evicted_newer_value_still_refuses_an_older_write_through(redis_client: Any) -> None:
    cache = _cache(redis_client)
    assert cache.get("k", lambda key: Versioned(b"v1", 1)) == Versioned(b"v1", 1)
    assert cache.write_through("k", b"v3", 3)
    backend = cache.backend
    assert isinstance(backend, RedisCacheBackend)
    redis_client.delete(backend.keys("k")[0])  # eviction (or expiry) of the newer value alone
    assert not cache.write_through("k", b"v2", 2)
    assert not cache.invalidate("k", 2)
    assert cache.peek("k") is None
    assert cache.write_through("k", b"v4", 4)
    assert cache.peek("k") == CacheEntry(4, b"v4")


def test_write_through_to_a_key_redis_has_no_history_of_is_refused(redis_client: Any) -> None:
    cache = _cache(redis_client)
    assert not cache.write_through("new", b"v1", 1)
    assert cache.peek("new") == CacheEntry(1, None)  # a tombstone instead: the next read loads
    assert not cache.write_through("new", b"v2", 2)  # the history is younger than a tombstone TTL
    assert cache.peek("new") == CacheEntry(2, None)
    assert cache.write_through("new", b"v3", 3, committed_at=time.time() + 2)  # committed after the history began
    assert cache.peek("new") == CacheEntry(3, b"v3")
    assert cache.get("fresh", lambda key: Versioned(b"v1", 1)) == Versioned(b"v1", 1)  # a fill: history from now on
    assert cache.write_through("fresh", b"v2", 2)


def test_a_history_rebuilt_after_a_restart_by_a_lagging_invalidation_does_not_let_an_older_write_in() -> None:
    import redis

    from kcons.testing.local import RedisServer

    server = RedisServer().start()
    port = server.port
    client = redis.Redis.from_url(server.url)
    try:
        cache = ConsistentCache(client, name="lag")
        assert cache.get("k", lambda key: Versioned(b"v1", 1)) == Versioned(b"v1", 1)
        a_committed = time.time()  # writer A commits v4 and stalls
        assert cache.write_through("k", b"v5", 5, committed_at=time.time())  # B commits v5 and writes it
        server.close()
        server = RedisServer(port=port).start()
        assert cache.invalidate("k", 3)  # the invalidator, behind, rebuilds a history at v3
        assert not cache.write_through("k", b"v4", 4, committed_at=a_committed)
        assert cache.peek("k") == CacheEntry(4, None)
        assert cache.get("k", lambda key: Versioned(b"v5", 5)) == Versioned(b"v5", 5)
    finally:
        client.close()
        server.close()
