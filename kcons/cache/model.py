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
    "CacheBackend",
    "CacheEntry",
    "CacheUnavailableError",
    "CacheWrite",
    "Strategy",
    "Versioned",
    "WriteOp",
    "WriteOutcome",
    "WriteResult",
    "decode_entry",
    "encode_entry",
    "guard_accepts",
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

