"""The cache sampler on real Redis (PostgreSQL as a source): a value written behind kcons's back is reported
stale after the lag bound (exit 1, metrics); a mismatch fixed within the bound is not; a clean cache is clean."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY

from kcons.audit.cache import CacheAuditor
from kcons.cache import CacheSettings, ConsistentCache, Versioned
from kcons.cli import main


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def prefix() -> str:
    return f"audit-{uuid.uuid4().hex[:8]}"


def _fill(client: Any, prefix: str, source: dict[str, int]) -> ConsistentCache:
    cache = ConsistentCache(client, name="audit-test", settings=CacheSettings(prefix=prefix))
    for key, version in source.items():
        got = cache.get(key, lambda k=key, v=version: Versioned(f"value-{k}".encode(), v))
        assert got is not None and got.version == version
    return cache


def _metric(name: str, cache: str) -> float:
    value = REGISTRY.get_sample_value(name, {"cache": cache})
    return value or 0.0


def test_a_cache_filled_by_kcons_from_the_source_is_consistent(kcons_redis_client: Any, prefix: str) -> None:
    source = {f"item:{i}": i + 1 for i in range(30)}
    _fill(kcons_redis_client, prefix, source)
    auditor = CacheAuditor(kcons_redis_client, source.get, prefix=prefix, name="clean", sample=50, lag_bound_s=0)
    report = auditor.check_once()
    assert report.checked == 30 and report.stale == 0 and report.ratio == 0.0


def test_a_value_written_behind_kcons_back_is_stale_only_after_the_lag_bound(
    kcons_redis_client: Any, prefix: str
) -> None:
    source = {f"item:{i}": 5 for i in range(10)}
    cache = _fill(kcons_redis_client, prefix, source)
    data_key, _ = cache.backend.keys("item:3")  # type: ignore[attr-defined]
    kcons_redis_client.set(data_key, b"v2:old value")  # an old version, not through the guard script
    source["item:4"] = 6  # a change whose invalidation is on its way
    clock = Clock()
    checked_before = _metric("kcons_cache_audit_checked_total", "planted")
    auditor = CacheAuditor(
        kcons_redis_client, source.get, prefix=prefix, name="planted", sample=100, lag_bound_s=5.0, clock=clock
    )
    report = auditor.check_once()
    assert report.checked == 8 and report.suspects_pending == 2 and report.stale == 0  # not yet: within the bound
    cache.invalidate("item:4", 6)  # the invalidation arrives within the bound
    clock.now = 6.0
    report = auditor.check_once()
    assert report.stale == 1 and report.suspects_pending == 0
    (stale,) = report.stale_list
    assert (stale.key, stale.cached_after, stale.source_first) == ("item:3", 2, 5)
    # Round 2 decided the two suspects and sampled the eight other keys again.
    assert report.checked == 18
    assert _metric("kcons_cache_audit_checked_total", "planted") - checked_before == 18
    assert _metric("kcons_cache_audit_stale_total", "planted") >= 1
    assert _metric("kcons_cache_audit_inconsistency_ratio", "planted") == pytest.approx(1 / 18)


def test_a_deleted_row_still_cached_and_a_forged_newer_version_are_stale(kcons_redis_client: Any, prefix: str) -> None:
    source: dict[str, int] = {"a": 1, "b": 1, "c": 1}
    cache = _fill(kcons_redis_client, prefix, source)
    del source["a"]  # deleted at the source; no tombstone ever written
    kcons_redis_client.set(cache.backend.keys("b")[0], b"v9:forged")  # type: ignore[attr-defined]
    clock = Clock()
    auditor = CacheAuditor(kcons_redis_client, source.get, prefix=prefix, name="forged", lag_bound_s=1.0, clock=clock)
    auditor.check_once()
    clock.now = 2.0
    report = auditor.settle(sleep=lambda s: None)
    assert report.stale == 2 and {s.key for s in report.stale_list} == {"a", "b"}


def test_keys_with_braces_and_percent_are_sampled_by_their_own_name(kcons_redis_client: Any, prefix: str) -> None:
    source = {"odd{key}%": 3}
    _fill(kcons_redis_client, prefix, source)
    seen: list[str] = []

    def version(key: str) -> int | None:
        seen.append(key)
        return source.get(key)

    report = CacheAuditor(kcons_redis_client, version, prefix=prefix, lag_bound_s=0).check_once()
    assert seen == ["odd{key}%"] and report.checked == 1 and report.stale == 0


def test_the_cli_with_a_sql_source_exits_1_on_a_stale_entry_and_0_on_a_clean_cache(
    kcons_redis_client: Any,
    kcons_redis_url: str,
    kcons_fresh_database: Callable[[], str],
    prefix: str,
) -> None:
    dsn = kcons_fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id text PRIMARY KEY, version bigint NOT NULL)")
        for i in range(5):
            conn.execute("INSERT INTO items VALUES (%s, 4)", (f"item:{i}",))
    cache = _fill(kcons_redis_client, prefix, {f"item:{i}": 4 for i in range(5)})
    args = ["audit", "cache", "--redis", kcons_redis_url, "--dsn", dsn, "--prefix", prefix, "--name", "cli",
            "--source", "SELECT version FROM items WHERE id = %s", "--rounds", "1", "--interval", "0",
            "--lag-bound", "0.5", "--json"]  # fmt: skip
    clean = CliRunner().invoke(main, args)
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.output.strip().splitlines()[-1])["checked"] == 5
    kcons_redis_client.set(cache.backend.keys("item:2")[0], b"v3:stale")  # type: ignore[attr-defined]
    stale = CliRunner().invoke(main, args)
    assert stale.exit_code == 1, stale.output
    report = json.loads(stale.output.strip().splitlines()[-1])
    assert report["stale"] == 1 and report["stale_list"][0]["key"] == "item:2"
