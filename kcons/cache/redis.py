"""The Redis :class:`~kcons.cache.model.CacheBackend`: one registered Lua script guards every write.

Key layout, Redis Cluster safe: the data key ``<prefix>:{<key>}`` holds the packed entry
(``v<version>:<value>`` or ``t<version>:``), the lease key ``<prefix>:{<key>}:lease`` holds the
loader's token and the floor key ``<prefix>:{<key>}:floor`` the highest version written (it
outlives the entry, so a lost entry still refuses older writes); the shared hash tag ``{<key>}``
puts all three in one slot, so the script may touch them atomically. Braces and ``%`` in user
keys are percent-escaped so the tag stays intact.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

from kcons.cache.model import (
    CacheEntry,
    CacheUnavailableError,
    CacheWrite,
    WriteOp,
    WriteOutcome,
    WriteResult,
    committed_ms,
    decode_entry,
)
from kcons.errors import ConfigError, StoreError

__all__ = ["RedisCacheBackend", "cache_keys"]

#: Errors that say "Redis cannot take this write now" (down, loading, a replica during failover,
#: out of memory, a cluster resharding): CacheUnavailableError, so the invalidator retries the
#: batch later instead of dead-lettering change events that are fine.
_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # type: ignore[attr-defined]  # in redis-py, not in its stubs
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)

_SCRIPT = resources.files("kcons.cache").joinpath("cache_fill.lua").read_text(encoding="utf-8")
_OUTCOMES = {
    1: WriteOutcome.APPLIED,
    0: WriteOutcome.STALE,
    -1: WriteOutcome.LEASE_LOST,
    -2: WriteOutcome.NO_HISTORY,
}


def _escape(key: str) -> str:
    if "{" in key or "}" in key or "%" in key:
        return key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return key


def cache_keys(prefix: str, key: str) -> tuple[str, str]:
    """The data key and the lease key of ``key``; they share the hash tag ``{<key>}``."""
    data = f"{prefix}:{{{_escape(key)}}}"
    return data, data + ":lease"


class RedisCacheBackend:
    """Versioned entries and fill leases in Redis (standalone or Cluster), guarded by ``cache_fill.lua``.

    Takes a redis-py ``Redis`` or ``RedisCluster`` client (its connection pool is reused, never
    created per call); the client must return bytes (``decode_responses=False``).
    """

    def __init__(self, client: Any, *, prefix: str = "kcons:cache") -> None:
        kwargs: dict[str, Any] = {}
        get_kwargs = getattr(client, "get_connection_kwargs", None)
        if callable(get_kwargs):
            kwargs = get_kwargs()
        if kwargs.get("decode_responses"):
            raise ConfigError("KCONS_REDIS_URL", "the cache needs a Redis client with decode_responses=False")
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_SCRIPT)
        self._get = client.get
        self._cluster = type(client).__name__ == "RedisCluster" or hasattr(client, "get_nodes")

    def keys(self, key: str) -> tuple[str, str]:
        """The Redis data and lease keys of ``key``."""
        return cache_keys(self._prefix, key)

    def _script_keys(self, key: str) -> tuple[str, str, str]:
        """The data, lease and floor keys of ``key``, as the script takes them."""
        data, lease = cache_keys(self._prefix, key)
        return data, lease, data + ":floor"

    def read(self, key: str) -> CacheEntry | None:
        """The stored entry, or None (one GET)."""
        if "{" in key or "}" in key or "%" in key:
            key = _escape(key)
        try:
            raw = self._get(f"{self._prefix}:{{{key}}}")
        except _UNAVAILABLE as exc:
            raise CacheUnavailableError(f"redis read failed: {type(exc).__name__}") from exc
        if raw is None:
            return None
        colon = raw.index(58, 1)  # decode_entry, inlined: this is the hit path
        if raw[0] == 0x76:
            return CacheEntry(int(raw[1:colon]), raw[colon + 1 :])
        return CacheEntry(int(raw[1:colon]), None)

    def take_lease(self, key: str, token: str, ttl_ms: int) -> CacheEntry | bool:
        """A cached value when there is one; else True if the lease was taken, False if held by another."""
        try:
            code, raw = self._script(keys=self._script_keys(key), args=["lease", "", "", ttl_ms, token, "", 0])
        except _UNAVAILABLE as exc:
            raise CacheUnavailableError(f"redis lease failed: {type(exc).__name__}") from exc
        if code == 2:
            return decode_entry(raw)
        return bool(code == 1)

    def release_lease(self, key: str, token: str) -> None:
        """Drop the lease if ``token`` still holds it."""
        try:
            self._script(keys=self._script_keys(key), args=["release", "", "", 0, token, "", 0])
        except _UNAVAILABLE as exc:
            raise CacheUnavailableError(f"redis lease release failed: {type(exc).__name__}") from exc

    def write(self, write: CacheWrite) -> WriteResult:
        """Apply one guarded write."""
        args = _args(write)
        try:
            return _result(self._script(keys=self._script_keys(write.key), args=args))
        except _UNAVAILABLE as exc:
            raise CacheUnavailableError(f"redis write failed: {type(exc).__name__}") from exc

    def write_many(self, writes: Sequence[CacheWrite]) -> list[WriteResult]:
        """Apply guarded writes in order: one pipelined round trip (standalone), one call each (cluster)."""
        if len(writes) == 1 or self._cluster:
            # redis-py's cluster pipelines refuse EVALSHA: on a cluster each write is its own call.
            return [self.write(w) for w in writes]
        commands = [(*self._script_keys(w.key), *_args(w)) for w in writes]
        try:
            try:
                replies = self._pipelined(commands)
            except redis.exceptions.NoScriptError:
                # Redis lost its script cache (restart, failover, SCRIPT FLUSH): load it and run the batch
                # again; re-applying the writes that did run is harmless because of the version guard.
                self._client.script_load(_SCRIPT)
                replies = self._pipelined(commands)
        except _UNAVAILABLE as exc:
            raise CacheUnavailableError(f"redis pipeline failed: {type(exc).__name__}") from exc
        return [_result(r) for r in replies]

    def _pipelined(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """EVALSHA every command in one round trip (no SCRIPT EXISTS check per batch)."""
        pipe = self._client.pipeline(transaction=False)
        sha = self._script.sha
        for command in commands:
            pipe.evalsha(sha, 3, *command)
        return list(pipe.execute(raise_on_error=True))


def _args(w: CacheWrite) -> list[Any]:
    if w.version < 0:
        raise StoreError("cache versions must be non-negative integers")
    if w.ttl_ms <= 0:
        raise StoreError("cache writes need a positive TTL")
    if w.op is WriteOp.FILL and not w.token:
        raise StoreError("a fill needs its lease token")
    committed = "" if w.committed_at is None else str(committed_ms(w.committed_at))
    return [w.op.value, str(w.version), w.value, w.ttl_ms, w.token, committed, w.settle_ms]


def _result(reply: Any) -> WriteResult:
    code, raw = reply
    stored = int(raw) if raw not in (b"", "", None) else None
    return WriteResult(_OUTCOMES[int(code)], stored)
