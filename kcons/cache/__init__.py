"""A read-through cache that never serves a value older than an applied invalidation.

Every cached value carries the version of the source row it was loaded from, and every write
to a cache key (fill, write-through, invalidation) passes one version guard, executed
atomically in Redis (``kcons/cache/cache_fill.lua``):

* an invalidation writes a *tombstone* with the new version; it applies only when that version
  is newer than what is stored (value or tombstone), so out-of-order or duplicated change
  events never move a key backwards;
* a fill or write-through applies only when its version is newer than a stored value, or at
  least the version of a stored tombstone (a tombstone at ``V`` says "``V`` is current").

A miss takes a *lease* (as in Facebook's memcache): one loader per key at a time; the others
wait up to ``lease_wait_s`` for its fill, then read through without filling. An invalidation
deletes the lease, so a loader that read the row before the writer committed can never fill
afterwards: the classic race ends with the new value or no value, never the old one.

**Strategies** (:class:`Strategy`), with their guarantees:

* ``VERSIONED_INVALIDATION`` (default): the writer commits the row and its outbox event in one
  transaction; :class:`CacheInvalidator` writes a tombstone with the row's version; the next
  reader loads the row under a lease. No read returns a version older than an invalidation
  already applied; a read may return the previous version only during the commit-to-
  invalidation lag. Safe under replays, eviction and invalidator crashes.
* ``WRITE_THROUGH``: the writer commits the row, then calls :meth:`ConsistentCache.write_through`
  with the new value and version, under the same guard. Concurrent writers cannot move the key
  backwards. A write-through never lands on a key Redis has no history of (a new key, or one
  whose state a restart without persistence, a flush or eviction took: its *floor*, the highest
  version written, which outlives the entry, is gone too); it is turned into a tombstone at its
  version and the next read loads under a lease, so a writer that stalled across a Redis
  restart cannot bring back an old version. If the writer dies between commit and cache write
  the cache keeps the previous version until an invalidation or the value TTL: run the
  invalidator as a backstop.
* ``WRITE_BEHIND``: the writer commits the row and its outbox event (carrying the new value)
  in one transaction; the invalidator writes the *value* instead of a tombstone. The loss
  window is zero (the event is durable with the row, and offsets commit only after Redis
  acknowledged). A key whose entry expired or was evicted keeps its floor for twice the entry's
  TTL, so an older event replayed after an invalidator crash is refused; on a key with no history
  at all the event's version is written as a tombstone (the next read loads the value).

**TTLs.** Values expire after ``value_ttl_s`` (bounds the damage of a lost invalidation).
Tombstones expire after ``tombstone_ttl_s``, which must exceed the longest a loader or a
write-through may take between reading/committing and writing to the cache: a fill carries a
lease (refused once invalidated, and a lease lives at most ``lease_ttl_s``), but a lease-less
write (write-through, write-behind replay) is guarded only by the tombstone's version, so the
tombstone must still be there when the late write arrives. The settings enforce
``tombstone_ttl_s > lease_ttl_s``, and :meth:`ConsistentCache.write_through` refuses writes
older than ``tombstone_ttl_s / 2`` when told the commit time.

Modules: :mod:`~kcons.cache.model` (versions, the guard, the backend protocol),
:mod:`~kcons.cache.memory` and :mod:`~kcons.cache.redis` (backends), :mod:`~kcons.cache.cache`
(the cache), :mod:`~kcons.cache.events` (change-event decoding), :mod:`~kcons.cache.invalidator`.
"""

from __future__ import annotations

from typing import Any

from kcons.cache.cache import CacheSettings, ConsistentCache, Loader
from kcons.cache.events import ChangeEvent, KeysFor, ValueFor, aggregate_key, decode_change_event, key_template
from kcons.cache.invalidator import AppliedInvalidation, CacheInvalidator, OnApplied, plan_writes
from kcons.cache.memory import MemoryCacheBackend
from kcons.cache.model import (
    CacheBackend,
    CacheEntry,
    CacheUnavailableError,
    CacheWrite,
    Strategy,
    Versioned,
    WriteOp,
    WriteOutcome,
    WriteResult,
    decode_entry,
    encode_entry,
    guard_accepts,
    guard_decides,
)

__all__ = [
    "AppliedInvalidation",
    "CacheBackend",
    "CacheEntry",
    "CacheInvalidator",
    "CacheSettings",
    "CacheUnavailableError",
    "CacheWrite",
    "ChangeEvent",
    "ConsistentCache",
    "KeysFor",
    "Loader",
    "MemoryCacheBackend",
    "OnApplied",
    "RedisCacheBackend",
    "Strategy",
    "ValueFor",
    "Versioned",
    "WriteOp",
    "WriteOutcome",
    "WriteResult",
    "aggregate_key",
    "cache_keys",
    "decode_change_event",
    "decode_entry",
    "encode_entry",
    "guard_accepts",
    "guard_decides",
    "key_template",
    "plan_writes",
]


def __getattr__(name: str) -> Any:
    """The Redis backend on first use, so importing the cache does not import redis-py."""
    if name in ("RedisCacheBackend", "cache_keys"):
        from kcons.cache import redis as _redis

        return getattr(_redis, name)
    raise AttributeError(f"module 'kcons.cache' has no attribute {name!r}")
