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
    guard_accepts,
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
    for i in range(600):
        key = f"k{rng.randrange(4)}"
        op = rng.choice([WriteOp.SET, WriteOp.TOMBSTONE])
        version = rng.randrange(12)
        expect = guard_accepts(op, model.get(key), version)
        result = cache.backend.write(CacheWrite(op, key, version, b"v%d" % i, 60_000))
        assert (result.outcome is WriteOutcome.APPLIED) == expect, (op, model.get(key), version)
        if expect:
            model[key] = CacheEntry(version, None if op is WriteOp.TOMBSTONE else b"v%d" % i)
        assert cache.peek(key) == model.get(key)


def test_versions_beyond_float_precision_compare_exactly(redis_client: Any) -> None:
    cache = _cache(redis_client)
    big = 2**63 + 1
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
    cache.write_through("a", b"x", 1)
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
        client.script_flush()
        results = cache.apply_writes([cache.tombstone_write("a", 2), cache.value_write("b", b"x", 1)])
        assert [r.outcome for r in results] == [WriteOutcome.APPLIED, WriteOutcome.APPLIED]
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
