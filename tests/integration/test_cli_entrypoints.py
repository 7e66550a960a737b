"""The deployable entrypoints run as real processes: `kcons cache invalidator` applies events and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from kcons.cache import CacheSettings, ConsistentCache, Versioned
from kcons.envelope import Envelope


def test_cache_invalidator_command_tombstones_changed_keys_and_stops_on_sigterm(
    kafka_bootstrap: str, redis_url: str, unique_topic: Callable[..., str], make_producer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=2)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    cache = ConsistentCache(client, name=name, settings=CacheSettings(prefix=f"kcons:{name}"))  # rerunnable
    for i in range(20):
        assert cache.get(f"product:{i}", lambda key: Versioned(b"old", 1)) == Versioned(b"old", 1)

    env = {
        **os.environ,
        "KCONS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "KCONS_REDIS_URL": redis_url,
        "KCONS_CACHE_TOPICS": topic,
        "KCONS_CACHE_GROUP": f"g-{name}",
        "KCONS_CACHE_NAME": name,
        "KCONS_CACHE_PREFIX": f"kcons:{name}",
    }
    proc = subprocess.Popen([sys.executable, "-m", "kcons.cli", "cache", "invalidator"], env=env)
    try:
        producer = make_producer(**{"enable.idempotence": True, "acks": "all"})
        for i in range(20):
            ev = Envelope.of("product.updated", "product", str(i), {"price": i}, version=2)
            producer.produce(topic, ev.payload, key=ev.key, headers=ev.headers())
        assert producer.flush(30) == 0

        deadline = time.monotonic() + 60
        entries: list[Any] = []
        while time.monotonic() < deadline:
            entries = [cache.peek(f"product:{i}") for i in range(20)]
            if all(e is not None and e.version == 2 for e in entries):
                break
            assert proc.poll() is None, "the invalidator exited early"
            time.sleep(0.2)
        assert all(e is not None and e.version == 2 and e.is_tombstone for e in entries), entries
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        client.close()
    assert code == 0


def test_cache_invalidator_command_names_the_missing_setting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KCONS_")}
    env["KCONS_KAFKA_BOOTSTRAP"] = "127.0.0.1:9"
    env["KCONS_REDIS_URL"] = "redis://127.0.0.1:9/0"
    result = subprocess.run(
        [sys.executable, "-m", "kcons.cli", "cache", "invalidator"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "KCONS_CACHE_TOPICS" in result.stderr
