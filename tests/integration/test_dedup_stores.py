"""Dedup stores on real Redis and PostgreSQL (and an SQLite file): claims, leases, retention, atomicity."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from redis.crc import key_slot

from kcons.adapters.postgres import PostgresDedupStore, dedup_schema_sql
from kcons.adapters.redis import RedisDedupStore
from kcons.adapters.sqlite import SqliteDedupStore
from kcons.dedup import BatchDedupStore, ClaimLostError, TransactionalDedupStore
from kcons.errors import StoreError

pytestmark = [pytest.mark.integration, pytest.mark.backends]

StoreFactory = Callable[..., Any]


@pytest.fixture
def namespace() -> str:
    return f"ns-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pg_dsn(fresh_database: Callable[[], str]) -> str:
    return fresh_database()


@pytest.fixture(params=["redis", "postgres", "sqlite"])
def make_store(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> Iterator[StoreFactory]:
    """Factory of stores of one kind sharing a namespace (each call is another worker)."""
    made: list[Any] = []

    def make(**kw: Any) -> Any:
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            store: Any = RedisDedupStore(redis.Redis.from_url(url), namespace=namespace, **kw)
        elif request.param == "postgres":
            store = PostgresDedupStore(request.getfixturevalue("pg_dsn"), namespace=namespace, **kw)
        else:
            store = SqliteDedupStore(str(tmp_path / "dedup.db"), namespace=namespace, **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        if hasattr(store, "close"):
            store.close()


def test_a_batch_claim_returns_new_ids_and_tells_done_from_busy(make_store: StoreFactory) -> None:
    first, second = make_store(), make_store()
    assert isinstance(first, BatchDedupStore)
    assert first.claim(["a", "b", "c"], lease_s=30) == {"a", "b", "c"}
    first.complete(["a"])
    result = second.claim_batch(["a", "b", "d"], lease_s=30)
    assert result.claimed == {"d"}
    assert result.done == {"a"}
    assert result.busy == {"b"}


def test_a_released_claim_can_be_claimed_at_once_by_another_worker(make_store: StoreFactory) -> None:
    first, second = make_store(), make_store()
    first.claim(["x", "y"], lease_s=60)
    second.release(["x"])  # not second's claim: nothing happens
    assert second.claim(["x"], lease_s=60) == set()
    first.release(["x"])
    assert second.claim(["x", "y"], lease_s=60) == {"x"}


def test_an_expired_lease_lets_another_worker_take_the_id_over(make_store: StoreFactory) -> None:
    first, second = make_store(), make_store()
    assert first.claim(["slow"], lease_s=0.3) == {"slow"}
    assert second.claim(["slow"], lease_s=5) == set()
    time.sleep(0.6)
    assert second.claim(["slow"], lease_s=5) == {"slow"}


def test_done_ids_stay_duplicates_for_the_retention_ttl_only(make_store: StoreFactory) -> None:
    store = make_store(retention_s=1.0)
    store.claim(["r"], lease_s=30)
    store.complete(["r"])
    assert store.claim_batch(["r"], lease_s=30).done == {"r"}
    time.sleep(1.3)
    assert store.claim(["r"], lease_s=30) == {"r"}


def test_concurrent_claims_of_overlapping_batches_never_hand_an_id_to_two_workers(make_store: StoreFactory) -> None:
    stores = [make_store() for _ in range(3)]
    ids = [f"id-{i}" for i in range(600)]
    won: dict[int, set[str]] = {}

    def worker(n: int) -> None:
        mine: set[str] = set()
        for start in range(0, 600, 100):
            chunk = ids[start : start + 150]
            mine |= stores[n].claim(chunk if n % 2 == 0 else list(reversed(chunk)), lease_s=60)
        won[n] = mine

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set().union(*won.values()) == set(ids)
    assert sum(len(v) for v in won.values()) == len(ids)


def test_long_and_odd_ids_are_deduplicated_like_any_other(make_store: StoreFactory) -> None:
    store = make_store()
    odd = ["x" * 5000, "line\nbreak", "ünïcødé", "sp ace", "{braces}"]
    assert store.claim(odd, lease_s=30) == set(odd)
    store.complete(odd)
    assert store.claim_batch(odd, lease_s=30).done == set(odd)


def test_redis_claims_a_batch_in_one_script_call_with_every_key_in_one_slot_and_bounded(
    redis_url: str, namespace: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    store = RedisDedupStore(client, namespace=namespace, retention_s=3600)
    ids = [f"e{i}" for i in range(500)]
    store.claim(["warm-up"], lease_s=1)  # loads the script once

    def evalsha_calls() -> int:
        stats = client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    before = evalsha_calls()
    store.claim_batch(ids, lease_s=30)
    store.complete_and_claim(ids, [f"n{i}" for i in range(500)], lease_s=30)
    assert evalsha_calls() - before == 2, "one round trip per batch"
    keys = [k.decode() for k in client.scan_iter(match=f"{store.root}:*")]
    assert any(":b:" in k for k in keys), "the batch was recorded done with one key for its claim call"
    assert any(":h:" in k for k in keys), "the ids are fields of a bucket hash"
    assert len({key_slot(k.encode()) for k in keys}) == 1, "one hash slot for the whole namespace"
    bound_ms = (3600 + store.bucket_s + 30) * 1000
    ttls = [client.pttl(k) for k in keys]
    assert all(0 < t <= bound_ms for t in ttls), "every key expires within the documented bound"
    assert store.claim_batch(ids, lease_s=30).done == set(ids)


def test_redis_errors_surface_as_store_errors(namespace: str) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from kcons.testing.local import free_port

    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    store = RedisDedupStore(dead, namespace=namespace)
    with pytest.raises(StoreError):
        store.claim(["a"], lease_s=1)


def test_postgres_complete_in_commits_with_the_callers_transaction_or_not_at_all(pg_dsn: str, namespace: str) -> None:
    store = PostgresDedupStore(pg_dsn, namespace=namespace)
    assert isinstance(store, TransactionalDedupStore)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE effects (id text)")
        store.claim(["kept", "rolled"], lease_s=30)
        with store.transaction(conn):
            conn.execute("INSERT INTO effects VALUES ('kept')")
            store.complete_in(conn, ["kept"])
        with pytest.raises(RuntimeError), store.transaction(conn):
            conn.execute("INSERT INTO effects VALUES ('rolled')")
            store.complete_in(conn, ["rolled"])
            raise RuntimeError("handler failed after writing")
        assert conn.execute("SELECT id FROM effects").fetchall() == [("kept",)]
    result = PostgresDedupStore(pg_dsn, namespace=namespace).claim_batch(["kept", "rolled"], lease_s=30)
    assert result.done == {"kept"}
    assert result.busy == {"rolled"}, "the rolled-back id is still only claimed (in progress), not done"


def test_postgres_complete_in_fails_for_a_claim_another_worker_took_over(pg_dsn: str, namespace: str) -> None:
    slow, fast = PostgresDedupStore(pg_dsn, namespace=namespace), PostgresDedupStore(pg_dsn, namespace=namespace)
    slow.claim(["e"], lease_s=0.2)
    time.sleep(0.4)
    assert fast.claim(["e"], lease_s=30) == {"e"}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(ClaimLostError), slow.transaction(conn):
            slow.complete_in(conn, ["e"])
        with fast.transaction(conn):
            fast.complete_in(conn, ["e"])
    assert slow.claim_batch(["e"], lease_s=30).done == {"e"}


def test_postgres_takeover_waits_for_an_open_transaction_then_sees_the_id_done(pg_dsn: str, namespace: str) -> None:
    owner, other = PostgresDedupStore(pg_dsn, namespace=namespace), PostgresDedupStore(pg_dsn, namespace=namespace)
    owner.claim(["t"], lease_s=0.2)
    time.sleep(0.4)  # the lease expired, but the owner is still finishing its transaction
    results: list[Any] = []
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with owner.transaction(conn):
            owner.complete_in(conn, ["t"])
            thread = threading.Thread(target=lambda: results.append(other.claim_batch(["t"], lease_s=30)))
            thread.start()
            thread.join(1.0)
            assert thread.is_alive(), "the takeover waits on the row lock of the open transaction"
        thread.join(30)
    # The waiting claim must not take the id; its statement snapshot predates the commit, so it may
    # still call it busy (retried later, never dropped). The next claim sees it done.
    assert results[0].claimed == frozenset()
    assert "t" in results[0].done | results[0].busy
    assert other.claim_batch(["t"], lease_s=30).done == {"t"}


def test_postgres_schema_is_shipped_and_expired_rows_are_purged(pg_dsn: str, namespace: str) -> None:
    assert "CREATE TABLE IF NOT EXISTS my_dedup" in dedup_schema_sql("my_dedup")
    store = PostgresDedupStore(pg_dsn, namespace=namespace, table="my_dedup", retention_s=1.0)
    store.claim(["old"], lease_s=30)
    store.complete(["old"])
    time.sleep(2.2)
    assert store.purge_expired() == 1
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM my_dedup").fetchone() == (0,)


def test_sqlite_complete_in_commits_with_the_callers_transaction_or_not_at_all(tmp_path: Path, namespace: str) -> None:
    path = str(tmp_path / "app.db")
    store = SqliteDedupStore(path, namespace=namespace)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE effects (id TEXT)")
    conn.commit()
    store.claim(["kept", "rolled"], lease_s=30)
    with store.transaction(conn):
        conn.execute("INSERT INTO effects VALUES ('kept')")
        store.complete_in(conn, ["kept"])
    with pytest.raises(RuntimeError), store.transaction(conn):
        conn.execute("INSERT INTO effects VALUES ('rolled')")
        store.complete_in(conn, ["rolled"])
        raise RuntimeError("handler failed after writing")
    assert conn.execute("SELECT id FROM effects").fetchall() == [("kept",)]
    other = SqliteDedupStore(path, namespace=namespace)
    with pytest.raises(ClaimLostError), other.transaction(conn):
        other.complete_in(conn, ["rolled"])
    result = other.claim_batch(["kept", "rolled"], lease_s=30)
    assert result.done == {"kept"} and result.busy == {"rolled"}


def test_completing_an_id_this_worker_never_claimed_or_claimed_long_ago_still_marks_it_done(
    make_store: StoreFactory,
) -> None:
    worker, other = make_store(), make_store()
    worker.claim(["old"], lease_s=60)
    for i in range(70):  # many claim calls later: the Redis store no longer tracks "old"'s claim
        worker.claim([f"filler-{i}"], lease_s=60)
    worker.complete(["old", "never-claimed"])
    assert other.claim_batch(["old", "never-claimed"], lease_s=60).done == {"old", "never-claimed"}


def _redis_store(redis_url: str, namespace: str, **kw: Any) -> RedisDedupStore:
    return RedisDedupStore(redis.Redis.from_url(redis_url), namespace=namespace, **kw)


def test_redis_a_claim_whose_release_failed_is_not_turned_done_by_completing_its_siblings(
    redis_url: str, namespace: str
) -> None:
    worker = _redis_store(redis_url, namespace)
    other = _redis_store(redis_url, namespace)
    assert worker.claim(["a", "b", "c"], lease_s=0.5) == {"a", "b", "c"}
    script = worker._script

    def failing(keys: list[str], args: list[Any]) -> Any:
        if str(args[0]).startswith("release"):
            raise redis.ConnectionError("connection lost")
        return script(keys=keys, args=args)

    worker._script = failing
    with pytest.raises(StoreError):
        worker.release(["b"])
    worker.complete(["a", "c"])
    result = other.claim_batch(["a", "b", "c"], lease_s=30)
    assert result.done == {"a", "c"}
    assert result.busy == {"b"}, "b is still only claimed (in progress), never done"
    time.sleep(0.7)
    assert other.claim(["b"], lease_s=30) == {"b"}, "once its lease expires, b is redelivered work"


def test_redis_takeover_of_an_expired_claim_written_in_an_older_bucket(redis_url: str, namespace: str) -> None:
    slow = _redis_store(redis_url, namespace, retention_s=1.0)
    fast = _redis_store(redis_url, namespace, retention_s=1.0)
    assert slow.bucket_s <= 0.5
    assert slow.claim(["t"], lease_s=0.3) == {"t"}
    time.sleep(0.7)  # the lease expired, and the current bucket is a newer one
    assert fast.claim(["t"], lease_s=30) == {"t"}
    holders = [k for k in fast._client.scan_iter(match=f"{fast.root}:h:*") if fast._client.hexists(k, "t")]
    assert len(holders) == 1, "the takeover moved the claim to the current bucket"
    assert slow.claim_batch(["t"], lease_s=30).busy == {"t"}
    fast.complete(["t"])
    assert slow.claim_batch(["t"], lease_s=30).done == {"t"}


def test_redis_a_claim_completed_after_its_lease_is_still_recorded_done(redis_url: str, namespace: str) -> None:
    worker = _redis_store(redis_url, namespace)
    other = _redis_store(redis_url, namespace)
    assert worker.claim(["late", "sibling"], lease_s=0.2) == {"late", "sibling"}
    time.sleep(0.4)
    worker.complete(["late"])  # its bucket's TTL was set for a completion within the lease
    result = other.claim_batch(["late", "sibling"], lease_s=30)
    assert result.done == {"late"}
    assert result.claimed == {"sibling"}


def test_redis_ids_in_two_buckets_are_all_found(redis_url: str, namespace: str) -> None:
    store = _redis_store(redis_url, namespace, retention_s=1.0)
    other = _redis_store(redis_url, namespace, retention_s=1.0)
    first = [f"a{i}" for i in range(300)]
    second = [f"b{i}" for i in range(300)]
    assert store.claim(first, lease_s=30) == set(first)
    store.complete(first[:200])
    time.sleep(store.bucket_s + 0.05)
    result = store.complete_and_claim(first[200:], second + first[:10], lease_s=30)
    assert result.claimed == set(second)
    assert result.done == set(first[:10])
    buckets = list(store._client.scan_iter(match=f"{store.root}:h:*"))
    assert len(buckets) >= 2  # 3 when the partial completion's "d" fields landed in a bucket of their own
    seen = other.claim_batch(first + second, lease_s=30)
    assert seen.done == set(first)
    assert seen.busy == set(second)


def test_redis_store_works_on_a_3_node_redis_cluster(redis_cluster: Any, namespace: str) -> None:
    first = RedisDedupStore(redis_cluster, namespace=namespace, retention_s=3600)
    second = RedisDedupStore(redis_cluster, namespace=namespace, retention_s=3600)
    ids = [f"c{i}" for i in range(1000)]
    assert first.claim(ids[:600], lease_s=30) == set(ids[:600])
    result = second.complete_and_claim([], ids, lease_s=30)
    assert result.claimed == set(ids[600:]) and result.busy == set(ids[:600])
    first.complete(ids[:600])
    second.release(ids[600:])
    again = second.claim_batch(ids, lease_s=30)
    assert again.done == set(ids[:600]) and again.claimed == set(ids[600:])
    node = redis_cluster.get_node_from_key(first.root)
    keys = list(redis_cluster.scan_iter(match=f"{first.root}:*", target_nodes=node))
    assert keys and {key_slot(k) for k in keys} == {key_slot(first.root.encode())}


def test_redis_two_claims_in_flight_are_answered_in_order_and_carry_their_done_records(
    redis_url: str, namespace: str
) -> None:
    worker = _redis_store(redis_url, namespace)
    other = _redis_store(redis_url, namespace)
    assert worker.claim(["d1", "d2"], lease_s=30) == {"d1", "d2"}
    first = worker.send_complete_and_claim(["d1", "d2"], ["a", "b"], lease_s=30)
    second = worker.send_complete_and_claim([], ["b", "c", "d1"], lease_s=30)  # sent before the first's answer
    assert first().claimed == {"a", "b"}
    answer = second()
    assert answer.claimed == {"b", "c"}, "its own claim of b is claimed again"
    assert answer.done == {"d1"}, "the first call's done records were written before the second ran"
    seen = other.claim_batch(["a", "b", "c", "d1", "d2"], lease_s=30)
    assert seen.done == {"d1", "d2"} and seen.busy == {"a", "b", "c"}
    worker.complete(["a", "b", "c"])
    assert other.claim_batch(["a", "b", "c"], lease_s=30).done == {"a", "b", "c"}


def test_redis_a_claim_sent_ahead_fails_as_a_store_error_when_redis_goes_away(namespace: str) -> None:
    dead = RedisDedupStore(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5), namespace=namespace)
    with pytest.raises(StoreError) as err:
        dead.send_complete_and_claim([], ["x"], lease_s=30)()
    assert "ConnectionError" in str(err.value)


def test_redis_an_id_completed_while_a_call_in_flight_claims_it_again_is_done(redis_url: str, namespace: str) -> None:
    worker = _redis_store(redis_url, namespace)
    other = _redis_store(redis_url, namespace)
    assert worker.claim(["x"], lease_s=30) == {"x"}
    again = worker.send_complete_and_claim([], ["x", "y"], lease_s=30)  # its own claim of x, taken again
    done = worker.send_complete_and_claim(["x"], [], lease_s=30)  # x done while that call is in flight
    assert again().claimed == {"x", "y"}
    done()
    assert other.claim_batch(["x"], lease_s=30).done == {"x"}
    assert worker.claim_batch(["x"], lease_s=30).done == {"x"}, "not handed out again, even to its own worker"


def test_redis_reads_claims_and_done_bits_written_in_the_previous_layout(redis_url: str, namespace: str) -> None:
    store = _redis_store(redis_url, namespace, retention_s=3600)
    store.claim(["warm-up"], lease_s=30)  # creates the current bucket and registers it
    client = store._client
    bucket = next(k for k in client.scan_iter(match=f"{store.root}:h:*"))
    # the previous layout: a field held "<tag>:<index>", and :b:<tag> was a bitmap of done indices
    client.hset(bucket, mapping={"old-done": "oldtag:1", "old-open": "oldtag:2", "\noldtag": "someone-else|1"})
    client.set(f"{store.root}:b:oldtag", bytes([0b01000000]), px=60_000)  # bit 1 set: index 1 is done
    result = store.claim_batch(["old-done", "old-open", "new"], lease_s=30)
    assert result.done == {"old-done"}
    assert result.claimed == {"old-open", "new"}, "an expired claim of the old layout is taken over"
    assert store.describe("old-done") == ("done", None, None)


def test_redis_a_new_namespace_keeps_uuids_as_16_bytes_and_tells_every_other_id_apart(
    redis_url: str, namespace: str
) -> None:
    store = _redis_store(redis_url, namespace)
    other = _redis_store(redis_url, namespace)
    lower = str(uuid.uuid4())
    ids = [lower, lower.upper(), "sixteen-chars-id", "\u00e9t\u00e9-" + "x" * 10, "", "a\nb", "x" * 300, "plain"]
    assert len("sixteen-chars-id") == 16 and len(("\u00e9t\u00e9-" + "x" * 10).encode()) == 16
    assert store.claim(ids, lease_s=30) == set(ids), "an uppercase UUID is another id than its lowercase form"
    store.complete(ids)
    extra = str(uuid.uuid4())
    assert other.claim_batch([*ids, extra], lease_s=30).done == set(ids)
    client = store._client
    (bucket,) = list(client.scan_iter(match=f"{store.root}:h:*"))
    fields = set(client.hkeys(bucket))
    assert uuid.UUID(lower).bytes in fields, "a canonical UUID is kept as its 16 bytes"
    assert lower.upper().encode() in fields and b"plain" in fields
    uuids = {uuid.UUID(lower).bytes, uuid.UUID(extra).bytes}
    assert all(len(f) != 16 for f in fields - uuids if not f.startswith(b"\n")), "no other field is 16 bytes long"
    assert client.get(f"{store.root}:v") == b"2"
    assert store.describe(lower) == ("done", None, None)


def test_redis_a_namespace_with_data_from_before_compact_ids_keeps_text_ids(redis_url: str, namespace: str) -> None:
    older = _redis_store(redis_url, namespace)
    older._format = b"1"  # a release that wrote UUIDs as text (and no format key)
    ids = [str(uuid.uuid4()) for _ in range(50)]
    older.claim(ids, lease_s=30)
    older.complete(ids)
    client = older._client
    client.delete(f"{older.root}:v")
    newer = _redis_store(redis_url, namespace)
    assert newer.claim_batch([*ids, "fresh"], lease_s=30).done == set(ids)
    assert client.get(f"{newer.root}:v") == b"1", "text ids kept while the namespace holds older data"


def test_redis_calls_sent_ahead_run_in_the_order_they_were_sent(redis_url: str, namespace: str) -> None:
    worker = _redis_store(redis_url, namespace)
    assert worker.claim(["x"], lease_s=30) == {"x"}
    many = [str(uuid.uuid4()) for _ in range(20_000)]  # a request Redis reads in several pieces
    first = worker.send_complete_and_claim(["x"], many, lease_s=30)  # records x done
    second = worker.send_complete_and_claim([], ["x"], lease_s=30)  # sent right after: must run after
    assert first().claimed == set(many)
    assert second().done == {"x"}, "the later call ran first and took the worker's own claim of x again"
