"""The cache's model: versioned entries, the version guard every write passes, and the backend protocol.

Pure definitions (no I/O): the Redis and memory backends implement :class:`CacheBackend`, and
both decide with :func:`guard_accepts` (the Lua script implements exactly the same rule).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from kcons.errors import StoreError

__all__ = [
    "CLOCK_SKEW_S",
    "CacheBackend",
    "CacheEntry",
    "CacheUnavailableError",
    "CacheWrite",
    "Strategy",
    "Versioned",
    "WriteOp",
    "WriteOutcome",
    "WriteResult",
    "committed_ms",
    "decode_entry",
    "encode_entry",
    "guard_accepts",
    "guard_decides",
    "history_trusts",
]


#: How far a writer's clock may run ahead of the cache store's: a lease-less write's commit time
#: is moved back by this much before it is compared with the start of the key's history.
CLOCK_SKEW_S = 1.0


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
    #: a lease-less write to a key the store has no history of (new, or lost by a restart,
    #: flush or eviction): its value is not stored, because a newer version may have been
    #: stored and lost; a tombstone at its version is stored instead.
    NO_HISTORY = -2


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
    #: a lease-less SET: the source commit's wall-clock time in seconds, when known
    committed_at: float | None = None
    #: a lease-less SET without ``committed_at``: how old (ms) the key's history must be to store the value
    settle_ms: int = 0


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


def history_trusts(since_ms: int | None, write: CacheWrite, now_ms: int) -> bool:
    """May a lease-less SET store its value, given since when the store has kept the key's history?

    ``since_ms`` is None without history, 0 once a leased fill stored a value (nothing committed
    before a fill's load can be newer than it). Else the write's commit time (minus
    :data:`CLOCK_SKEW_S`) must not be before the history began, or, when unknown, the history
    must be ``write.settle_ms`` old: a value read before Redis lost a newer one must not land.
    """
    if since_ms is None:
        return False
    if since_ms == 0:
        return True
    if write.committed_at is not None:
        return committed_ms(write.committed_at) >= since_ms
    return now_ms - since_ms >= write.settle_ms


def committed_ms(committed_at: float) -> int:
    """A commit time as the Lua script compares it: milliseconds, moved back by the allowed clock skew."""
    return int((committed_at - CLOCK_SKEW_S) * 1000)


def guard_decides(
    op: WriteOp, stored: CacheEntry | None, floor: int | None, version: int, *, trusted: bool = True
) -> tuple[WriteOutcome, WriteOp | None]:
    """The whole guard (the Lua script implements exactly this), the fill's lease check aside:
    the outcome and what is stored (the op, a tombstone instead of a SET's value, or nothing).

    ``floor`` is the highest version an accepted write stored for the key, kept longer than the
    entry itself (None when the store has none). A write below the floor is stale even when the
    entry that held the newer version is gone. A lease-less SET that its key's history does not
    cover (``trusted`` False, see :func:`history_trusts`; always so without a floor) is
    NO_HISTORY: after a restart, flush or eviction the store cannot tell whether a newer version
    was stored and lost, so a tombstone at its version is stored instead of its value (when that
    tombstone is newer than the stored entry). A leased FILL needs no history: its loader read
    the source after the lease was taken, so it is at least as new as anything lost.
    """
    if not guard_accepts(op, stored, version) or (floor is not None and version < floor):
        return WriteOutcome.STALE, None
    if op is WriteOp.SET and (floor is None or not trusted):
        if stored is not None and version <= stored.version:
            return WriteOutcome.NO_HISTORY, None
        return WriteOutcome.NO_HISTORY, WriteOp.TOMBSTONE
    return WriteOutcome.APPLIED, op


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

