"""The Redis store's id format key (``<root>:v``) against workers of different ages in one namespace."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from kcons.adapters.redis import RedisDedupStore

pytestmark = [pytest.mark.integration]


def test_a_worker_started_after_the_format_key_expired_reads_the_same_fields_as_an_older_one(
    redis_url: str,
) -> None:
    """A long-lived worker asked the namespace's format once (compact). The group then idles past the
    retention, so every key expires, ``:v`` included; the worker's next write recreates the buckets but
    not ``:v``. A worker started now finds data and no ``:v``, takes the namespace for an old text one,
    and looks the same UUID up under another field: an id the first worker did is handled again."""
    client = redis.Redis.from_url(redis_url)
    namespace = f"fmt-{uuid.uuid4().hex[:8]}"
    old = RedisDedupStore(client, namespace, retention_s=1.0)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert old.claim([first], lease_s=0.1) == {first}
    old.complete([first])
    deadline = time.monotonic() + 10
    while client.exists(f"{old.root}:v", f"{old.root}:r") and time.monotonic() < deadline:
        time.sleep(0.1)  # idle: the namespace's keys expire
    assert not client.exists(f"{old.root}:v", f"{old.root}:r")
    assert old.claim([second], lease_s=30) == {second}
    old.complete([second])
    new = RedisDedupStore(client, namespace, retention_s=1.0)
    assert new.claim_batch([second], lease_s=30).done == {second}, "a done id claimed again by a newer worker"
