"""The read-through :class:`ConsistentCache` and its :class:`CacheSettings` (TTLs, lease timing)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_fixed

from kcons import metrics
from kcons.cache.model import CacheBackend, CacheEntry, CacheWrite, Versioned, WriteOp, WriteOutcome, WriteResult
from kcons.config import check_identifier, check_range, env_float, env_str
from kcons.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["CacheSettings", "ConsistentCache", "Loader"]


@dataclass(frozen=True)
class CacheSettings:
    """TTLs and lease timing of a :class:`ConsistentCache`, in seconds; validated at construction."""

    value_ttl_s: float = 3600.0
    tombstone_ttl_s: float = 300.0
    lease_ttl_s: float = 10.0
    lease_wait_s: float = 0.25
    lease_poll_s: float = 0.005
    prefix: str = "kcons:cache"

    def __post_init__(self) -> None:
        check_range("KCONS_CACHE_VALUE_TTL_S", self.value_ttl_s, 0.001, 365 * 86400.0)
        check_range("KCONS_CACHE_TOMBSTONE_TTL_S", self.tombstone_ttl_s, 0.001, 365 * 86400.0)
        check_range("KCONS_CACHE_LEASE_TTL_S", self.lease_ttl_s, 0.001, 86400.0)
        check_range("KCONS_CACHE_LEASE_WAIT_S", self.lease_wait_s, 0.0, 3600.0)
        check_range("KCONS_CACHE_LEASE_POLL_S", self.lease_poll_s, 0.0001, 60.0)
        if self.tombstone_ttl_s <= self.lease_ttl_s:
            raise ConfigError(
                "KCONS_CACHE_TOMBSTONE_TTL_S",
                f"must be longer than the lease TTL ({self.lease_ttl_s}s): a tombstone must outlive the slowest "
                "loader that may still try to fill",
            )
        check_identifier("KCONS_CACHE_PREFIX", self.prefix, kind="key", max_length=200)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CacheSettings:
        """Build from ``KCONS_CACHE_*`` variables (defaults for the unset ones)."""
        d = cls()
        return cls(
            value_ttl_s=env_float("KCONS_CACHE_VALUE_TTL_S", d.value_ttl_s, environ=environ),
            tombstone_ttl_s=env_float("KCONS_CACHE_TOMBSTONE_TTL_S", d.tombstone_ttl_s, environ=environ),
            lease_ttl_s=env_float("KCONS_CACHE_LEASE_TTL_S", d.lease_ttl_s, environ=environ),
            lease_wait_s=env_float("KCONS_CACHE_LEASE_WAIT_S", d.lease_wait_s, environ=environ),
            lease_poll_s=env_float("KCONS_CACHE_LEASE_POLL_S", d.lease_poll_s, environ=environ),
            prefix=env_str("KCONS_CACHE_PREFIX", d.prefix, environ) or d.prefix,
        )


Loader = Callable[[str], "Versioned | None"]


def _still_busy(result: CacheEntry | bool) -> bool:
    return result is False


def _gave_up(state: RetryCallState) -> CacheEntry | bool:
    return False


class ConsistentCache:
    """Read-through cache over Redis whose reads never go behind an applied invalidation.

    ``get`` returns the cached value on a hit (one Redis GET). On a miss it takes the key's
    lease and loads; concurrent misses of the same key wait up to ``lease_wait_s`` for that
    one load, then read through without filling. Fills and write-throughs pass the version
    guard; a fill whose lease was invalidated meanwhile is refused, and a write-through to a
    key Redis has no history of (new, or lost to a restart, flush or eviction) is refused.

    ``name`` labels the metrics only; keys are namespaced by ``settings.prefix``, which the
    cache's readers and its invalidator must share.
    """

    def __init__(
        self,
        redis_client: Any = None,
        *,
        name: str = "default",
        settings: CacheSettings | None = None,
        backend: CacheBackend | None = None,
    ) -> None:
        self.settings = settings or CacheSettings()
        self.name = name
        if backend is None:
            if redis_client is None:
                raise ConfigError("KCONS_REDIS_URL", "ConsistentCache needs a redis client or a backend")
            from kcons.cache.redis import RedisCacheBackend

            backend = RedisCacheBackend(redis_client, prefix=self.settings.prefix)
        self.backend: CacheBackend = backend
        self._read = backend.read
        self._value_ttl_ms = max(1, int(self.settings.value_ttl_s * 1000))
        self._tomb_ttl_ms = max(1, int(self.settings.tombstone_ttl_s * 1000))
        self._lease_ttl_ms = max(1, int(self.settings.lease_ttl_s * 1000))
        self._hits = metrics.CACHE_HITS.labels(name)
        self._misses = metrics.CACHE_MISSES.labels(name)
        self._rejected_version = metrics.CACHE_FILLS_REJECTED.labels(name, "version")
        self._rejected_lease = metrics.CACHE_FILLS_REJECTED.labels(name, "lease")
        self._lease_timeouts = metrics.CACHE_LEASE_TIMEOUTS.labels(name)
        self._inv_applied = metrics.CACHE_INVALIDATIONS.labels(name, "applied")
        self._inv_stale = metrics.CACHE_INVALIDATIONS.labels(name, "stale")
        self._lag = metrics.CACHE_INVALIDATION_LAG.labels(name)
        self._waiter = Retrying(
            stop=stop_after_delay(self.settings.lease_wait_s),
            wait=wait_fixed(self.settings.lease_poll_s),
            retry=retry_if_result(_still_busy),
            retry_error_callback=_gave_up,
            reraise=True,
        )

    def get(self, key: str, loader: Loader) -> Versioned | None:
        """The value of ``key``: cached, else loaded (once per key across concurrent misses) and filled.

        Never returns a version older than an invalidation applied before the call began, given
        a loader that reads the source of truth (the primary database, not a lagging replica).
        Returns None when the loader finds no row (nothing is cached for absent rows). Raises
        CacheUnavailableError when Redis cannot be reached (callers may then call the loader).
        """
        entry = self._read(key)
        if entry is not None and entry.value is not None:
            self._hits.inc()
            return Versioned(entry.value, entry.version)
        self._misses.inc()
        token = secrets.token_hex(8)
        taken = self.backend.take_lease(key, token, self._lease_ttl_ms)
        if taken is False and self.settings.lease_wait_s > 0:
            taken = self._waiter.copy()(self.backend.take_lease, key, token, self._lease_ttl_ms)
        if isinstance(taken, CacheEntry):
            assert taken.value is not None
            return Versioned(taken.value, taken.version)
        if taken is False:  # another loader is still at it: read through, do not fill
            self._lease_timeouts.inc()
            return loader(key)
        try:
            loaded = loader(key)
        except BaseException:
            self.backend.release_lease(key, token)
            raise
        if loaded is None:
            self.backend.release_lease(key, token)
            return None
        result = self.backend.write(
            CacheWrite(WriteOp.FILL, key, loaded.version, loaded.value, self._value_ttl_ms, token)
        )
        if result.outcome is WriteOutcome.STALE:
            self._rejected_version.inc()
        elif result.outcome is WriteOutcome.LEASE_LOST:
            self._rejected_lease.inc()
        return loaded

    def peek(self, key: str) -> CacheEntry | None:
        """What the cache holds for ``key`` (value or tombstone), without loading."""
        return self._read(key)

    def write_through(self, key: str, value: bytes, version: int, *, committed_at: float | None = None) -> bool:
        """Write-through after the DB commit: store ``value`` at ``version`` unless a newer one is or was stored.

        Refused (False) when a newer version is stored, when the key's floor (the highest
        version written, kept longer than the entry) is newer, and when Redis's history of the
        key does not reach back to the commit (a new key, or its state lost by a restart without
        persistence, a flush or eviction, and rebuilt since): the writer's value may be older
        than a lost one, so a tombstone at ``version`` is stored instead and the next read loads
        from the source under a lease. ``committed_at`` (``time.time()`` of the commit) is
        compared with the start of that history (allowing :data:`~kcons.cache.model.CLOCK_SKEW_S`
        of clock skew); without it the history must be one tombstone TTL old. It also lets the
        cache refuse a write that arrives so late that the tombstone guarding it may have
        expired. Returns True if the value was stored.
        """
        if committed_at is not None and time.time() - committed_at > self.settings.tombstone_ttl_s / 2:
            log.warning("write-through for a key is too late (older than tombstone_ttl/2); invalidating instead")
            self.invalidate(key, version)
            return False
        result = self.backend.write(self.value_write(key, value, version, committed_at=committed_at))
        return result.outcome is WriteOutcome.APPLIED

    def invalidate(self, key: str, version: int) -> bool:
        """Write a tombstone at ``version`` (newer versions only); returns True if applied."""
        result = self.backend.write(CacheWrite(WriteOp.TOMBSTONE, key, version, b"", self._tomb_ttl_ms))
        applied = result.outcome is WriteOutcome.APPLIED
        (self._inv_applied if applied else self._inv_stale).inc()
        return applied

    def tombstone_write(self, key: str, version: int) -> CacheWrite:
        """The guarded tombstone write for ``key`` at ``version`` (for batching)."""
        return CacheWrite(WriteOp.TOMBSTONE, key, version, b"", self._tomb_ttl_ms)

    def value_write(self, key: str, value: bytes, version: int, *, committed_at: float | None = None) -> CacheWrite:
        """The guarded lease-less value write for ``key`` at ``version`` (write-through, write-behind).

        Without ``committed_at`` the key's history must be one tombstone TTL old (see
        :func:`~kcons.cache.model.history_trusts`), else a tombstone is written instead.
        """
        return CacheWrite(
            WriteOp.SET, key, version, value, self._value_ttl_ms, committed_at=committed_at, settle_ms=self._tomb_ttl_ms
        )

    def apply_writes(
        self, writes: Sequence[CacheWrite], committed_at: Sequence[float | None] = ()
    ) -> list[WriteResult]:
        """Apply invalidation writes in one round trip; counts them and observes the commit-to-applied lag."""
        if not writes:
            return []
        results = self.backend.write_many(writes)
        now = time.time()
        for i, result in enumerate(results):
            (self._inv_applied if result.outcome is WriteOutcome.APPLIED else self._inv_stale).inc()
            ts = committed_at[i] if i < len(committed_at) else None
            if ts is not None:
                self._lag.observe(max(0.0, now - ts))
        return results

