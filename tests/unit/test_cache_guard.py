"""The version guard and the packed entry format, as pure functions."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from kcons.cache import (
    CacheEntry,
    CacheSettings,
    CacheUnavailableError,
    CacheWrite,
    WriteOp,
    decode_entry,
    encode_entry,
    guard_accepts,
)
from kcons.cache.redis import RedisCacheBackend, cache_keys
from kcons.errors import ConfigError


def test_anything_applies_to_an_empty_key() -> None:
    for op in WriteOp:
        assert guard_accepts(op, None, 0)


def test_tombstone_needs_a_strictly_newer_version() -> None:
    assert guard_accepts(WriteOp.TOMBSTONE, CacheEntry(5, b"x"), 6)
    assert not guard_accepts(WriteOp.TOMBSTONE, CacheEntry(5, b"x"), 5)
    assert not guard_accepts(WriteOp.TOMBSTONE, CacheEntry(5, None), 5)
    assert not guard_accepts(WriteOp.TOMBSTONE, CacheEntry(5, None), 4)


def test_fill_of_the_tombstoned_version_is_accepted_but_older_is_refused() -> None:
    tomb = CacheEntry(7, None)
    assert guard_accepts(WriteOp.FILL, tomb, 7)
    assert guard_accepts(WriteOp.SET, tomb, 8)
    assert not guard_accepts(WriteOp.FILL, tomb, 6)
    assert not guard_accepts(WriteOp.SET, tomb, 6)


def test_value_is_replaced_only_by_a_newer_value() -> None:
    value = CacheEntry(7, b"v7")
    assert not guard_accepts(WriteOp.FILL, value, 7)
    assert not guard_accepts(WriteOp.SET, value, 6)
    assert guard_accepts(WriteOp.SET, value, 8)


@given(st.lists(st.tuples(st.sampled_from(list(WriteOp)), st.integers(0, 20)), max_size=40))
def test_the_stored_version_never_moves_backwards(ops: list[tuple[WriteOp, int]]) -> None:
    stored: CacheEntry | None = None
    for op, version in ops:
        before = -1 if stored is None else stored.version
        if guard_accepts(op, stored, version):
            stored = CacheEntry(version, None if op is WriteOp.TOMBSTONE else b"v%d" % version)
        assert stored is None or stored.version >= before


@given(st.permutations([1, 2, 3, 4, 5, 6]), st.lists(st.integers(1, 6), max_size=6))
def test_reordered_and_duplicated_tombstones_end_at_the_newest(order: list[int], dups: list[int]) -> None:
    stored: CacheEntry | None = None
    for version in [*order, *dups]:
        if guard_accepts(WriteOp.TOMBSTONE, stored, version):
            stored = CacheEntry(version, None)
    assert stored == CacheEntry(6, None)


@given(st.integers(0, 2**70), st.one_of(st.none(), st.binary(max_size=50)))
def test_packed_entries_round_trip(version: int, value: bytes | None) -> None:
    entry = CacheEntry(version, value)
    assert decode_entry(encode_entry(entry)) == entry


def test_data_and_lease_keys_share_one_cluster_slot_even_with_braces_in_the_key() -> None:
    from redis.crc import key_slot

    for key in ["user:1", "a{b}c", "}{", "%7B", "{x}"]:
        data, lease = cache_keys("kcons:cache", key)
        assert key_slot(data.encode()) == key_slot(lease.encode())
        assert data.count("{") == 1 and data.count("}") == 1
    assert cache_keys("p", "a{b}")[0] != cache_keys("p", "a%7Bb%7D")[0]


def test_tombstone_ttl_must_outlive_the_lease() -> None:
    with pytest.raises(ConfigError) as exc:
        CacheSettings(tombstone_ttl_s=5, lease_ttl_s=10)
    assert exc.value.setting == "KCONS_CACHE_TOMBSTONE_TTL_S"


def test_settings_come_from_the_environment_and_bad_values_name_the_setting() -> None:
    s = CacheSettings.from_env({"KCONS_CACHE_VALUE_TTL_S": "60", "KCONS_CACHE_PREFIX": "app"})
    assert s.value_ttl_s == 60 and s.prefix == "app"
    with pytest.raises(ConfigError) as exc:
        CacheSettings.from_env({"KCONS_CACHE_LEASE_WAIT_S": "soon"})
    assert exc.value.setting == "KCONS_CACHE_LEASE_WAIT_S"
    with pytest.raises(ConfigError):
        CacheSettings(prefix="a{b}")


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
        redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.BusyLoadingError("LOADING"),
        redis.ConnectionError("refused"),
    ],
    ids=["readonly-replica", "oom", "tryagain", "loading", "down"],
)
def test_redis_refusing_writes_for_now_is_cache_unavailable_not_a_bad_event(error: Exception) -> None:
    """Transient refusals must make the invalidator retry (RetryLater), never dead-letter a good event."""

    class RefusingScript:
        sha = "0" * 40

        def __call__(self, **_: object) -> object:
            raise error

    class RefusingClient:
        def register_script(self, _source: str) -> RefusingScript:
            return RefusingScript()

        def get(self, _key: str) -> bytes:
            raise error

    backend = RedisCacheBackend(RefusingClient(), prefix="p")
    with pytest.raises(CacheUnavailableError):
        backend.write(CacheWrite(WriteOp.TOMBSTONE, "k", 3, b"", 1000))
    with pytest.raises(CacheUnavailableError):
        backend.read("k")
