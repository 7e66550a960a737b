"""The in-memory dedup store: claim semantics, leases, retention and the LRU bound."""

from __future__ import annotations

import threading

import pytest

from kcons.adapters.memory import MemoryDedupStore
from kcons.dedup import BatchDedupStore, DedupStore, storage_id, validate_namespace
from kcons.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_store_implements_both_protocols() -> None:
    store = MemoryDedupStore()
    assert isinstance(store, DedupStore)
    assert isinstance(store, BatchDedupStore)


def test_new_ids_are_claimed_and_a_second_claim_sees_them_busy() -> None:
    store = MemoryDedupStore()
    assert store.claim(["a", "b"], lease_s=10) == {"a", "b"}
    result = store.claim_batch(["a", "b", "c"], lease_s=10)
    assert result.claimed == {"c"}
    assert result.busy == {"a", "b"}
    assert result.done == frozenset()


def test_completed_ids_are_duplicates_until_retention_expires() -> None:
    clock = Clock()
    store = MemoryDedupStore(retention_s=60, clock=clock)
    store.claim(["a"], lease_s=5)
    store.complete(["a"])
    clock.now += 59
    assert store.claim_batch(["a"], lease_s=5).done == {"a"}
    clock.now += 2
    assert store.claim(["a"], lease_s=5) == {"a"}


def test_an_expired_lease_lets_another_worker_claim() -> None:
    clock = Clock()
    store = MemoryDedupStore(clock=clock)
    assert store.claim(["a"], lease_s=5) == {"a"}
    clock.now += 4.9
    assert store.claim(["a"], lease_s=5) == set()
    clock.now += 0.2
    assert store.claim(["a"], lease_s=5) == {"a"}


def test_release_makes_an_id_claimable_at_once_but_never_forgets_done_ids() -> None:
    store = MemoryDedupStore()
    store.claim(["a", "b"], lease_s=30)
    store.complete(["b"])
    store.release(["a", "b"])
    assert store.claim(["a"], lease_s=30) == {"a"}
    assert store.claim_batch(["b"], lease_s=30).done == {"b"}


def test_a_repeated_id_within_one_batch_is_claimed_once_and_not_busy() -> None:
    store = MemoryDedupStore()
    result = store.claim_batch(["a", "a", "b"], lease_s=30)
    assert result.claimed == {"a", "b"}
    assert result.busy == frozenset()


def test_the_store_is_bounded_and_evicts_the_oldest_ids_first() -> None:
    store = MemoryDedupStore(max_entries=3)
    for i in range(5):
        store.claim([f"id{i}"], lease_s=30)
        store.complete([f"id{i}"])
    assert len(store) == 3
    assert store.claim(["id0", "id1"], lease_s=30) == {"id0", "id1"}
    assert store.claim_batch(["id4"], lease_s=30).done == {"id4"}


def test_concurrent_claims_of_the_same_ids_never_overlap() -> None:
    store = MemoryDedupStore()
    ids = [f"e{i}" for i in range(2000)]
    won: list[set[str]] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = store.claim(ids, lease_s=30)
        with lock:
            won.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    union: set[str] = set()
    for part in won:
        assert not union & part
        union |= part
    assert union == set(ids)


def test_bad_settings_fail_at_construction_naming_the_setting() -> None:
    with pytest.raises(ConfigError) as err:
        MemoryDedupStore(max_entries=0)
    assert err.value.setting == "max_entries"
    with pytest.raises(ConfigError) as err:
        MemoryDedupStore(retention_s=10**12)
    assert err.value.setting == "retention_s"
    with pytest.raises(ConfigError):
        MemoryDedupStore().claim(["a"], lease_s=0)


def test_long_ids_are_stored_by_digest_and_namespaces_are_validated() -> None:
    long_id = "x" * 5000
    assert storage_id("short") == "short"
    assert storage_id(long_id).startswith("sha256:") and len(storage_id(long_id)) < 80
    assert storage_id(long_id) != storage_id(long_id + "y")
    assert validate_namespace("namespace", "orders-group.v1") == "orders-group.v1"
    with pytest.raises(ConfigError):
        validate_namespace("namespace", "bad key}{")
