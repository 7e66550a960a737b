"""A read-through cache that never serves a value older than an applied invalidation.

Every cached value carries the version of the source row it was loaded from, and every write
to a cache key (fill, write-through, invalidation) passes one version guard, executed
atomically in Redis (``kcons/adapters/cache_fill.lua``):

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
  backwards. If the writer dies between commit and cache write the cache keeps the previous
  version until an invalidation or the value TTL: run the invalidator as a backstop.
* ``WRITE_BEHIND``: the writer commits the row and its outbox event (carrying the new value)
  in one transaction; the invalidator writes the *value* instead of a tombstone. The loss
  window is zero (the event is durable with the row, and offsets commit only after Redis
  acknowledged). A key whose entry expired or was evicted loses its version, so an older event
  replayed after an invalidator crash can briefly set an older value until the newer one is
  replayed too (replays cover only the uncommitted tail, seconds): keep TTLs far above that,
  use ``noeviction``, or ``VERSIONED_INVALIDATION`` (tombstones carry no value) when it matters.

**Invalidator loops.** :meth:`CacheInvalidator.run` consumes with a plain consumer that applies
each polled batch in one pipelined Redis round trip (default), or through
:class:`~kcons.consumer.IdempotentConsumer` (``batched=False``: one round trip per event, its
dedup store and dead-letter handling). Both commit offsets only after Redis acknowledged, send
malformed events to ``<topic>.dlq``, and retry an unreachable Redis instead of skipping.
Commit-to-applied lag is measured from the ``kcons-committed-at`` header (epoch seconds) when
the writer sets one, else from the Kafka record timestamp (the kcons outbox relay stamps each
record with its outbox row's insert time, so the time spent in the outbox counts).

**TTLs.** Values expire after ``value_ttl_s`` (bounds the damage of a lost invalidation).
Tombstones expire after ``tombstone_ttl_s``, which must exceed the longest a loader or a
write-through may take between reading/committing and writing to the cache: a fill carries a
lease (refused once invalidated, and a lease lives at most ``lease_ttl_s``), but a lease-less
write (write-through, write-behind replay) is guarded only by the tombstone's version, so the
tombstone must still be there when the late write arrives. The settings enforce
``tombstone_ttl_s > lease_ttl_s``, and :meth:`ConsistentCache.write_through` refuses writes
older than ``tombstone_ttl_s / 2`` when told the commit time.
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
import secrets
import signal
import string
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import click
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
    wait_fixed,
)

from kcons import metrics
from kcons.config import check_range, env_float, env_str
from kcons.envelope import Envelope, HeaderValue, headers_to_dict, read_envelope
from kcons.errors import ConfigError, DecodeError, StoreError

if TYPE_CHECKING:
    from kcons.consumer import IdempotentConsumer

log = logging.getLogger(__name__)

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
    "MemoryCacheBackend",
    "Strategy",
    "Versioned",
    "WriteOp",
    "WriteOutcome",
    "WriteResult",
    "aggregate_key",
    "cache_cli",
    "decode_change_event",
    "guard_accepts",
    "key_template",
    "plan_writes",
]


class CacheUnavailableError(StoreError):
    """The cache store could not be reached; the invalidator retries, readers may fall back to the loader."""


class Strategy(enum.Enum):
    """How source changes reach the cache (see the module docstring for the guarantees)."""

    VERSIONED_INVALIDATION = "versioned-invalidation"
    WRITE_THROUGH = "write-through"
    WRITE_BEHIND = "write-behind"


class WriteOp(enum.Enum):
    """A guarded cache write: a leased fill, a lease-less set, or a tombstone."""

    FILL = "fill"
    SET = "set"
    TOMBSTONE = "tomb"


class WriteOutcome(enum.Enum):
    """What the guard decided."""

    APPLIED = 1
    STALE = 0
    LEASE_LOST = -1


class Versioned(NamedTuple):
    """A value and the version of the source row it came from (a tuple: cheap on the hit path)."""

    value: bytes
    version: int


class CacheEntry(NamedTuple):
    """What Redis holds for a key: a value, or a tombstone (``value is None``), with its version."""

    version: int
    value: bytes | None

    @property
    def is_tombstone(self) -> bool:
        """True when the key was invalidated at ``version`` and holds no value."""
        return self.value is None


@dataclass(frozen=True, slots=True)
class CacheWrite:
    """One guarded write to one key; ``ttl_ms`` bounds how long it stays."""

    op: WriteOp
    key: str
    version: int
    value: bytes = b""
    ttl_ms: int = 0
    token: str = ""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The guard's decision and the version stored afterwards (None when the key is empty)."""

    outcome: WriteOutcome
    stored_version: int | None


def guard_accepts(op: WriteOp, stored: CacheEntry | None, version: int) -> bool:
    """The version guard (the Lua script implements exactly this): may ``op`` at ``version`` apply?

    A tombstone needs a version newer than anything stored; a value needs one newer than a
    stored value, or at least as new as a stored tombstone.
    """
    if stored is None:
        return True
    if op is WriteOp.TOMBSTONE:
        return version > stored.version
    if stored.is_tombstone:
        return version >= stored.version
    return version > stored.version


def encode_entry(entry: CacheEntry) -> bytes:
    """The packed Redis form: ``v<version>:<value>`` or ``t<version>:``."""
    if entry.value is None:
        return b"t%d:" % entry.version
    return b"v%d:" % entry.version + entry.value


def decode_entry(raw: bytes) -> CacheEntry:
    """Parse the packed Redis form written by the script."""
    colon = raw.index(58, 1)  # b":"
    if raw[0] == 0x76:  # b"v"
        return CacheEntry(int(raw[1:colon]), raw[colon + 1 :])
    return CacheEntry(int(raw[1:colon]), None)


@runtime_checkable
class CacheBackend(Protocol):
    """Storage of versioned entries with leases; every write passes :func:`guard_accepts` atomically."""

    def read(self, key: str) -> CacheEntry | None:
        """The stored entry, or None."""
        ...

    def take_lease(self, key: str, token: str, ttl_ms: int) -> CacheEntry | bool:
        """A cached value when there is one; else True if the lease was taken, False if held by another."""
        ...

    def release_lease(self, key: str, token: str) -> None:
        """Drop the lease if ``token`` still holds it."""
        ...

    def write(self, write: CacheWrite) -> WriteResult:
        """Apply one guarded write."""
        ...

    def write_many(self, writes: Sequence[CacheWrite]) -> list[WriteResult]:
        """Apply guarded writes in one round trip, in order; returns after the store acknowledged."""
        ...


class MemoryCacheBackend:
    """An in-process :class:`CacheBackend` with the same guard and lease rules (for tests and single processes)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._data: dict[str, tuple[CacheEntry, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}

    def _entry(self, key: str) -> CacheEntry | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._data[key]
            return None
        return item[0]

    def _lease(self, key: str) -> str | None:
        item = self._leases.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._leases[key]
            return None
        return item[0]

    def read(self, key: str) -> CacheEntry | None:
        """The stored entry, or None."""
        with self._lock:
            return self._entry(key)

    def take_lease(self, key: str, token: str, ttl_ms: int) -> CacheEntry | bool:
        """A cached value when there is one; else whether the lease was taken."""
        with self._lock:
            entry = self._entry(key)
            if entry is not None and not entry.is_tombstone:
                return entry
            if self._lease(key) is not None:
                return False
            self._leases[key] = (token, self._clock() + ttl_ms / 1000)
            return True

    def release_lease(self, key: str, token: str) -> None:
        """Drop the lease if ``token`` still holds it."""
        with self._lock:
            if self._lease(key) == token:
                del self._leases[key]

    def write(self, write: CacheWrite) -> WriteResult:
        """Apply one guarded write."""
        with self._lock:
            return self._write(write)

    def write_many(self, writes: Sequence[CacheWrite]) -> list[WriteResult]:
        """Apply guarded writes in order."""
        with self._lock:
            return [self._write(w) for w in writes]

    def _write(self, w: CacheWrite) -> WriteResult:
        stored = self._entry(w.key)
        stored_version = None if stored is None else stored.version
        if w.op is WriteOp.FILL:
            if self._lease(w.key) != w.token:
                return WriteResult(WriteOutcome.LEASE_LOST, stored_version)
            del self._leases[w.key]
        if not guard_accepts(w.op, stored, w.version):
            return WriteResult(WriteOutcome.STALE, stored_version)
        expires = self._clock() + w.ttl_ms / 1000
        if w.op is WriteOp.TOMBSTONE:
            self._data[w.key] = (CacheEntry(w.version, None), expires)
            self._leases.pop(w.key, None)
        else:
            self._data[w.key] = (CacheEntry(w.version, w.value), expires)
        return WriteResult(WriteOutcome.APPLIED, w.version)


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
        if not self.prefix or any(c in self.prefix for c in "{} "):
            raise ConfigError("KCONS_CACHE_PREFIX", "must be non-empty without braces or spaces")

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
    guard; a fill whose lease was invalidated meanwhile is refused.
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
            from kcons.adapters.redis_cache import RedisCacheBackend

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
        """Write-through after the DB commit: store ``value`` at ``version`` unless a newer one is stored.

        ``committed_at`` (``time.time()`` of the commit) lets the cache refuse a write that
        arrives so late that the tombstone guarding it may have expired; returns True if applied.
        """
        if committed_at is not None and time.time() - committed_at > self.settings.tombstone_ttl_s / 2:
            log.warning("write-through for a key is too late (older than tombstone_ttl/2); invalidating instead")
            self.invalidate(key, version)
            return False
        result = self.backend.write(CacheWrite(WriteOp.SET, key, version, value, self._value_ttl_ms))
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

    def value_write(self, key: str, value: bytes, version: int) -> CacheWrite:
        """The guarded lease-less value write for ``key`` at ``version`` (write-behind, for batching)."""
        return CacheWrite(WriteOp.SET, key, version, value, self._value_ttl_ms)

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


# --- change events ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeEvent:
    """A source-row change, normalised from a kcons envelope, a Debezium change event or a Debezium outbox event.

    ``version`` is the row's version after the change (for deletes: newer than the last
    version); ``value`` is the new payload when the event carries one (write-behind);
    ``committed_at`` is the source commit time in seconds since the epoch when known.
    """

    source: str
    aggregate_type: str
    aggregate_id: str
    op: str
    version: int
    value: bytes | None = None
    after: Mapping[str, Any] | None = None
    before: Mapping[str, Any] | None = None
    committed_at: float | None = None
    event_id: str | None = None
    envelope: Envelope | None = field(default=None, repr=False)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    stripped = raw.lstrip()
    if not stripped.startswith(b"{"):
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _unwrap(doc: dict[str, Any]) -> dict[str, Any]:
    if set(doc) == {"schema", "payload"} and isinstance(doc["payload"], dict):
        return doc["payload"]
    return doc


def _int_version(raw: Any, what: str) -> int:
    if isinstance(raw, bool) or raw is None:
        raise DecodeError(f"{what} is missing or not an integer")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise DecodeError(f"{what} is not an integer: {str(raw)[:40]!r}") from None
    if value < 0:
        raise DecodeError(f"{what} is negative")
    return value


def _key_text(key: bytes | str | None) -> str:
    if key is None:
        return ""
    raw = key if isinstance(key, bytes) else key.encode()
    doc = _json_object(raw)
    if doc is not None:
        doc = _unwrap(doc)
        if len(doc) == 1:
            return str(next(iter(doc.values())))
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)
    text = raw.decode("utf-8", errors="replace")
    return text.strip('"')


def decode_change_event(
    key: bytes | str | None,
    value: bytes | None,
    headers: Sequence[tuple[str, HeaderValue]] | Mapping[str, HeaderValue] | None,
    *,
    topic: str | None = None,
    timestamp_ms: int | None = None,
    version_field: str = "version",
) -> ChangeEvent | None:
    """Normalise a Kafka record into a :class:`ChangeEvent`; None for records that change nothing.

    Understands kcons outbox envelopes (``kcons-version`` header; the commit time is the
    ``kcons-committed-at`` header in epoch seconds when the writer sets one, else the Kafka
    record timestamp), Debezium outbox events
    (``id`` header, ``version`` header) and Debezium change events (``before``/``after``/``op``/
    ``source``, optionally wrapped in ``{"schema", "payload"}``), whose version is
    ``after[version_field]``, or ``before[version_field] + 1`` for deletes. Debezium
    tombstones (null value), heartbeats and truncates give None. Raises DecodeError when a
    change event has no usable version (the invalidator then dead-letters it).
    """
    h = headers_to_dict(headers)
    commit_hint = h.get("kcons-committed-at")
    env = read_envelope(key, value, headers, topic=topic)
    if env is not None:
        if env.version is None:
            raise DecodeError(f"event {env.id} has no version (kcons-version or version header)")
        committed: float | None = None
        if commit_hint:
            try:
                committed = float(commit_hint)
            except ValueError:
                committed = None
        if committed is None and timestamp_ms is not None and timestamp_ms > 0:
            committed = timestamp_ms / 1000
        return ChangeEvent(
            source="kcons" if h.get("kcons-id") else "debezium-outbox",
            aggregate_type=env.aggregate_type,
            aggregate_id=env.aggregate_id,
            op=env.type,
            version=env.version,
            value=env.payload,
            committed_at=committed,
            event_id=env.id,
            envelope=env,
        )
    if value is None:
        return None  # Debezium's delete tombstone: the preceding 'd' event carried the change
    doc = _json_object(value)
    if doc is None:
        raise DecodeError("record is neither a kcons/Debezium outbox event nor a Debezium change event")
    doc = _unwrap(doc)
    op = doc.get("op")
    if not isinstance(op, str) or ("after" not in doc and "before" not in doc):
        return None  # heartbeat, schema change or other non-row record
    before, after = doc.get("before"), doc.get("after")
    if op == "t" or (before is None and after is None):
        log.warning("ignoring a Debezium %r event without a row (truncate or message)", op)
        return None
    source = doc.get("source") if isinstance(doc.get("source"), dict) else {}
    assert isinstance(source, dict)
    if isinstance(after, dict):
        version = _int_version(after.get(version_field), f"after.{version_field}")
    elif isinstance(before, dict):
        version = _int_version(before.get(version_field), f"before.{version_field} of a delete") + 1
    else:
        raise DecodeError("Debezium event has non-object before/after")
    table = str(source.get("table") or "")
    schema = source.get("schema")
    ts = source.get("ts_ms") or doc.get("ts_ms")
    return ChangeEvent(
        source="debezium",
        aggregate_type=f"{schema}.{table}" if schema and table else table,
        aggregate_id=_key_text(key),
        op=op,
        version=version,
        value=json.dumps(after, separators=(",", ":"), sort_keys=True).encode() if isinstance(after, dict) else None,
        after=after if isinstance(after, dict) else None,
        before=before if isinstance(before, dict) else None,
        committed_at=float(ts) / 1000 if isinstance(ts, int | float) and ts > 0 else None,
        event_id=f"{source.get('lsn', '')}:{table}:{_key_text(key)}" if source.get("lsn") is not None else None,
    )


def aggregate_key(event: ChangeEvent) -> list[str]:
    """The default key mapping: ``"<aggregate type>:<aggregate id>"``."""
    return [f"{event.aggregate_type}:{event.aggregate_id}"]


KeysFor = Callable[[ChangeEvent], Iterable[str]]
ValueFor = Callable[[ChangeEvent], "bytes | None"]


def plan_writes(
    cache: ConsistentCache,
    event: ChangeEvent,
    keys_for: KeysFor,
    strategy: Strategy = Strategy.VERSIONED_INVALIDATION,
    value_for: ValueFor | None = None,
) -> list[CacheWrite]:
    """The guarded writes one change event causes: tombstones, or new values for write-behind.

    Deletes always write tombstones. For write-behind the value is ``value_for(event)`` (default:
    the event's payload); an event without a value falls back to a tombstone.
    """
    writes: list[CacheWrite] = []
    value: bytes | None = None
    if strategy is Strategy.WRITE_BEHIND and event.op not in {"d", "delete", "deleted"}:
        value = value_for(event) if value_for is not None else event.value
    for key in keys_for(event):
        if value is None:
            writes.append(cache.tombstone_write(key, event.version))
        else:
            writes.append(cache.value_write(key, value, event.version))
    return writes


@dataclass(frozen=True, slots=True)
class AppliedInvalidation:
    """One cache write caused by a change event, after Redis acknowledged it."""

    key: str
    version: int
    outcome: WriteOutcome
    event: ChangeEvent


OnApplied = Callable[[Sequence[AppliedInvalidation]], None]


class CacheInvalidator:
    """Applies change events to a :class:`ConsistentCache` under the version guard.

    Each event is decoded (:func:`decode_change_event`), mapped to keys with ``keys_for``, and
    written as a tombstone (``VERSIONED_INVALIDATION``) or as its new value (``WRITE_BEHIND``).
    :meth:`apply_records` returns only after Redis acknowledged every write, so a Kafka loop that
    commits offsets afterwards never loses an invalidation; replays are harmless because the
    guard never moves a key's version backwards. ``on_applied`` is called after each batch.
    """

    def __init__(
        self,
        cache: ConsistentCache,
        keys_for: KeysFor = aggregate_key,
        *,
        strategy: Strategy = Strategy.VERSIONED_INVALIDATION,
        value_for: ValueFor | None = None,
        version_field: str = "version",
        on_applied: OnApplied | None = None,
        retry_after_s: float = 0.5,
    ) -> None:
        check_range("retry_after_s", retry_after_s, 0.0, 3600.0)
        if strategy is Strategy.WRITE_THROUGH:
            raise ConfigError(
                "strategy",
                "write-through is done by the writer (ConsistentCache.write_through); the invalidator "
                "applies VERSIONED_INVALIDATION or WRITE_BEHIND",
            )
        self.cache = cache
        self.keys_for = keys_for
        self.strategy = strategy
        self.value_for = value_for
        self.version_field = version_field
        self.on_applied = on_applied
        self.retry_after_s = retry_after_s

    def decode(self, message: Any) -> ChangeEvent | None:
        """Decode a confluent-kafka ``Message`` (raises DecodeError for a malformed change event)."""
        ts_type, ts = message.timestamp() if hasattr(message, "timestamp") else (0, None)
        return decode_change_event(
            message.key(),
            message.value(),
            message.headers(),
            topic=message.topic(),
            timestamp_ms=ts if ts_type else None,
            version_field=self.version_field,
        )

    def apply_events(self, events: Sequence[ChangeEvent]) -> list[AppliedInvalidation]:
        """Write the cache changes of ``events`` in one Redis round trip; returns once acknowledged."""
        writes: list[CacheWrite] = []
        owners: list[ChangeEvent] = []
        for event in events:
            for w in plan_writes(self.cache, event, self.keys_for, self.strategy, self.value_for):
                writes.append(w)
                owners.append(event)
        results = self.cache.apply_writes(writes, [e.committed_at for e in owners])
        applied = [
            AppliedInvalidation(w.key, w.version, r.outcome, e) for w, r, e in zip(writes, results, owners, strict=True)
        ]
        if applied and self.on_applied is not None:
            self.on_applied(applied)
        return applied

    def apply_records(self, messages: Sequence[Any]) -> list[AppliedInvalidation]:
        """Decode and apply a batch of Kafka records; records that change nothing are skipped."""
        events = [e for e in (self.decode(m) for m in messages) if e is not None]
        return self.apply_events(events)

    def handle(self, message: Any) -> None:
        """Apply one Kafka record (a per-message IdempotentConsumer handler); returns once Redis acknowledged.

        A malformed change event raises DecodeError (the consumer dead-letters it); an
        unreachable Redis raises RetryLater, so the partition is rewound and paused, never
        skipped: the offset is committed only after the invalidation is applied.
        """
        self.handle_batch([message])

    def handle_batch(self, messages: list[Any]) -> None:
        """Apply a batch of Kafka records in one Redis round trip (the IdempotentConsumer batch handler).

        Raises like :meth:`handle`: DecodeError for a malformed change event (the consumer then
        retries the batch one record at a time and dead-letters that record), RetryLater when
        Redis is unreachable (the batch is rewound, never skipped).
        """
        from kcons.consumer import RetryLater

        events = [e for e in (self.decode(m) for m in messages) if e is not None]
        if not events:
            return
        try:
            self.apply_events(events)
        except CacheUnavailableError as exc:
            raise RetryLater(self.retry_after_s, f"cache unavailable: {exc}") from exc

    def consumer(
        self, config: Mapping[str, Any], topics: Sequence[str], *, store: Any = None, **kwargs: Any
    ) -> IdempotentConsumer:
        """An :class:`~kcons.consumer.IdempotentConsumer` that feeds this invalidator.

        ``config`` is a confluent-kafka consumer config (``group.id`` required);
        ``isolation.level`` defaults to ``read_committed`` (aborted relay transactions are never
        applied) and ``auto.offset.reset`` to ``earliest``. The dedup ``store`` defaults to an
        in-memory one (100,000 ids): the version guard already makes re-applying an event harmless, so the
        store only saves Redis round trips. Other keyword arguments go to the consumer.
        """
        from kcons.adapters.memory import MemoryDedupStore
        from kcons.consumer import IdempotentConsumer

        merged: dict[str, Any] = {"isolation.level": "read_committed", "auto.offset.reset": "earliest"}
        merged.update(config)
        kwargs.setdefault("batch_timeout_s", 0.05)
        return IdempotentConsumer(
            merged,
            topics,
            None,
            batch_handler=self.handle_batch,
            store=store if store is not None else MemoryDedupStore(max_entries=100_000),
            **kwargs,
        )

    def run(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        stop: threading.Event | None = None,
        batched: bool = True,
        store: Any = None,
        **kwargs: Any,
    ) -> None:
        """Consume ``topics`` until ``stop`` is set; offsets commit only after Redis acknowledged the invalidations.

        By default through :meth:`run_batched` (one pipelined Redis round trip per polled batch);
        with ``batched=False`` through :meth:`consumer` (IdempotentConsumer with
        :meth:`handle_batch`: one Redis round trip per consumed batch too, plus its dedup store
        and its retry and dead-letter handling). Both give the same guarantees; the batched loop
        skips the dedup store, since replays are harmless under the version guard.
        """
        if batched:
            self.run_batched(config, topics, stop=stop, **kwargs)
            return
        consumer = self.consumer(config, topics, store=store, **kwargs)
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                consumer.poll_once()
        finally:
            consumer.close()

    def run_batched(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        stop: threading.Event | None = None,
        max_batch: int = 1000,
        poll_s: float = 0.05,
        redis_retry_s: float = 300.0,
        dlq_topic: Callable[[str], str] = lambda topic: f"{topic}.dlq",
        dlq_timeout_s: float = 30.0,
    ) -> None:
        """The high-throughput loop: each polled batch is applied in one pipelined Redis round trip.

        Same guarantees as the IdempotentConsumer path: a batch's offsets are committed only
        after Redis acknowledged all of its writes (and the dead-letter topic acknowledged its
        malformed events, with ``kcons-dlq-reason``/``kcons-dlq-source`` headers). An unreachable
        Redis is retried with backoff for up to ``redis_retry_s``, then the error propagates with
        the batch uncommitted (the next process replays it). No dedup store is needed: replays
        are harmless under the version guard.
        """
        from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

        from kcons.errors import kafka_error_to_exception

        check_range("max_batch", max_batch, 1, 100_000)
        if not config.get("group.id"):
            raise ConfigError("group.id", "the invalidator needs a consumer group (group.id)")
        merged: dict[str, Any] = {"isolation.level": "read_committed", "auto.offset.reset": "earliest"}
        merged.update(config)
        merged["enable.auto.commit"] = False
        stop = stop or threading.Event()
        retrying = Retrying(
            stop=stop_after_delay(redis_retry_s) | stop_when_event_set(stop),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception_type(CacheUnavailableError),
            reraise=True,
        )
        dlq: Any = None
        consumer = Consumer(merged)
        try:
            consumer.subscribe(list(topics))
            while not stop.is_set():
                first = consumer.poll(poll_s)
                if first is None:
                    continue
                batch = [first, *consumer.consume(max_batch - 1, 0)] if max_batch > 1 else [first]
                records: list[Any] = []
                for msg in batch:
                    err = msg.error()
                    if err is None:
                        records.append(msg)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        if err.fatal():
                            raise kafka_error_to_exception(err, "invalidator consume")
                        log.warning("invalidator consume reported %s", err.str())
                if not records:
                    continue
                events: list[ChangeEvent] = []
                poison: list[tuple[Any, str]] = []
                for msg in records:
                    try:
                        event = self.decode(msg)
                    except DecodeError as exc:
                        poison.append((msg, f"DecodeError: {exc}"[:1000]))
                        continue
                    if event is not None:
                        events.append(event)
                retrying(self.apply_events, events)
                if poison:
                    if dlq is None:
                        shared = ("bootstrap.servers", "security.", "ssl.", "sasl.", "client.id")
                        dlq_config = {k: v for k, v in merged.items() if k.startswith(shared)}
                        dlq_config.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5})
                        dlq = Producer(dlq_config)
                    _dead_letter(dlq, poison, dlq_topic, dlq_timeout_s)
                last: dict[tuple[str, int], int] = {}
                for msg in records:
                    tp = (str(msg.topic()), int(msg.partition() or 0))
                    last[tp] = max(last.get(tp, -1), int(msg.offset() or 0))
                offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
                consumer.commit(offsets=offsets, asynchronous=True)
        finally:
            try:
                consumer.close()  # commits nothing more: offsets were committed batch by batch
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the invalidator's consumer failed: %s", exc)
            if dlq is not None:
                dlq.flush(5)


def _dead_letter(
    producer: Any, poison: Sequence[tuple[Any, str]], topic_of: Callable[[str], str], timeout: float
) -> None:
    """Write malformed change events to their dead-letter topics; raise unless all were acknowledged."""
    from kcons.errors import DeliveryError

    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err.str()))

    for msg, reason in poison:
        headers = list(msg.headers() or [])
        headers.append(("kcons-dlq-reason", reason.encode("utf-8", "replace")))
        headers.append(("kcons-dlq-source", f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()))
        producer.produce(
            topic_of(str(msg.topic())), key=msg.key(), value=msg.value(), headers=headers, on_delivery=delivered
        )
    remaining = producer.flush(timeout)
    if remaining or failures:
        raise DeliveryError(f"{remaining + len(failures)} dead-letter writes were not acknowledged")
    log.error("dead-lettered %d malformed change events", len(poison))


# --- command line (``kcons cache``; the lead mounts ``cache_cli`` under the ``kcons`` command) ----


def key_template(template: str) -> KeysFor:
    """A key mapping from a format string over the event's fields, e.g. ``"{aggregate_type}:{aggregate_id}"``."""
    fields = {"source", "aggregate_type", "aggregate_id", "op", "version"}
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        raise ConfigError("--key-template", f"is not a valid format string: {exc}") from None
    unknown = names - fields
    if unknown or not names:
        raise ConfigError("--key-template", f"may use only {sorted(fields)}, got {sorted(unknown) or 'no field'}")

    def keys(event: ChangeEvent) -> list[str]:
        return [template.format(**{name: getattr(event, name) for name in names})]

    return keys


def _import_function(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError("--keys", f"expected module:function, got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("--keys", f"cannot import {spec!r}: {exc}") from None
    if not callable(target):
        raise ConfigError("--keys", f"{spec!r} is not callable")
    return target


@click.group("cache")
def cache_cli() -> None:
    """Versioned Redis cache: run the invalidator, inspect entries."""


@cache_cli.command("invalidator")
@click.option(
    "--topic", "topics", multiple=True, help="Change-event topic (repeatable; or comma-separated $KCONS_CACHE_TOPICS)."
)
@click.option(
    "--group",
    envvar="KCONS_CACHE_GROUP",
    default="kcons-cache-invalidator",
    show_default=True,
    help="Kafka consumer group of the invalidator replicas ($KCONS_CACHE_GROUP).",
)
@click.option(
    "--keys", "keys_spec", envvar="KCONS_CACHE_KEYS", help="module:function mapping a ChangeEvent to its cache keys."
)
@click.option("--key-template", "template", default="{aggregate_type}:{aggregate_id}", show_default=True)
@click.option(
    "--strategy",
    type=click.Choice([Strategy.VERSIONED_INVALIDATION.value, Strategy.WRITE_BEHIND.value]),
    default=Strategy.VERSIONED_INVALIDATION.value,
    show_default=True,
)
@click.option("--version-field", default="version", show_default=True, help="Debezium row column holding the version.")
@click.option(
    "--idempotent-consumer",
    "per_event",
    is_flag=True,
    help="Use the IdempotentConsumer loop (one round trip per event).",
)
@click.option("--name", envvar="KCONS_CACHE_NAME", default="default", show_default=True, help="Cache name.")
@click.option("--metrics-port", envvar="KCONS_METRICS_PORT", type=int, help="Serve /metrics and /healthz on this port.")
@click.option("--metrics-host", envvar="KCONS_METRICS_HOST", default="127.0.0.1", show_default=True)
def invalidator_command(
    topics: tuple[str, ...],
    group: str,
    keys_spec: str | None,
    template: str,
    strategy: str,
    version_field: str,
    per_event: bool,
    name: str,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Apply change events to the cache until SIGTERM; settings from KCONS_KAFKA_*, KCONS_REDIS_*, KCONS_CACHE_*."""
    import os

    import redis

    from kcons.config import KafkaSettings, RedisSettings, redact
    from kcons.errors import KconsError
    from kcons.metrics import MetricsServer

    if not topics:
        topics = tuple(t.strip() for t in os.environ.get("KCONS_CACHE_TOPICS", "").split(",") if t.strip())
    try:
        if not topics:
            raise ConfigError("KCONS_CACHE_TOPICS", "no change-event topic given (--topic or KCONS_CACHE_TOPICS)")
        kafka = KafkaSettings.from_env()
        redis_settings = RedisSettings.from_env()
        settings = CacheSettings.from_env()
        keys_for: KeysFor = _import_function(keys_spec) if keys_spec else key_template(template)
    except KconsError as exc:
        raise click.ClickException(str(exc)) from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = redis.Redis.from_url(redis_settings.url, socket_timeout=redis_settings.socket_timeout_s)
    cache = ConsistentCache(client, name=name, settings=settings)
    inv = CacheInvalidator(cache, keys_for, strategy=Strategy(strategy), version_field=version_field)
    stop = threading.Event()

    def health() -> tuple[bool, str]:
        return (not stop.is_set(), f"redis {redact(redis_settings.url)}")

    server = (
        MetricsServer(metrics_port, metrics_host, health_checks=[("invalidator", health)]) if metrics_port else None
    )
    if server is not None:
        server.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info(
        "cache invalidator on %s (group %s, %s)",
        ",".join(topics),
        group,
        "idempotent-consumer" if per_event else "batched",
    )
    try:
        inv.run(kafka.client_config(**{"group.id": group}), list(topics), stop=stop, batched=not per_event)
    except KconsError as exc:
        log.error("invalidator failed: %s", exc)
        sys.exit(1)
    finally:
        if server is not None:
            server.stop()
        client.close()


@cache_cli.command("peek")
@click.argument("key")
@click.option("--prefix", default=None, help="Key prefix (default: $KCONS_CACHE_PREFIX or kcons:cache).")
def peek_command(key: str, prefix: str | None) -> None:
    """Print what Redis holds for KEY: its version and whether it is a value or a tombstone."""
    import redis

    from kcons.adapters.redis_cache import RedisCacheBackend
    from kcons.config import RedisSettings
    from kcons.errors import KconsError

    try:
        redis_settings = RedisSettings.from_env()
        settings = CacheSettings.from_env()
    except KconsError as exc:
        raise click.ClickException(str(exc)) from None
    client = redis.Redis.from_url(redis_settings.url, socket_timeout=redis_settings.socket_timeout_s)
    try:
        entry = RedisCacheBackend(client, prefix=prefix or settings.prefix).read(key)
    finally:
        client.close()
    if entry is None:
        click.echo(json.dumps({"key": key, "present": False}))
    else:
        click.echo(
            json.dumps(
                {"key": key, "present": True, "version": entry.version, "tombstone": entry.is_tombstone,
                 "bytes": 0 if entry.value is None else len(entry.value)}
            )
        )  # fmt: skip
