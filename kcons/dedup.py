"""The dedup-store protocol and the dedup policy shared by the consumer and its adapters.

A :class:`DedupStore` answers "claim these event ids" atomically for a whole batch. A claim is
two-phase: *in progress* under a lease (so a crashed worker's claim expires and another worker
takes the event over), then *done*, kept for a bounded retention TTL. Ids that are done are
duplicates and are dropped; ids that another worker holds under an unexpired lease are *busy*
and must be retried later (never dropped: the other worker may still crash).

The SQL stores also implement :class:`TransactionalDedupStore`: ``complete_in`` records *done*
on the caller's own connection inside the caller's open transaction, and only for claims this
store instance still owns. The effect and the dedup record then commit or roll back together,
and a worker whose claim was taken over cannot commit a second effect: exactly-once effects.

What a store can do beyond the base protocol is *declared* by the store as a
:class:`StoreCapabilities` ``capabilities`` attribute (batch claims that tell done from busy, the
pipelined complete-and-claim call, transactional ``complete_in``, in-process) and read once, by
:func:`capabilities_of`, when a consumer is built; a store that declares nothing is inspected
once against the protocols below.

Implementations: :mod:`kcons.adapters.memory`, :mod:`kcons.adapters.redis`,
:mod:`kcons.adapters.postgres`, :mod:`kcons.adapters.sqlite`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kcons.config import check_identifier, check_range
from kcons.errors import ConfigError, StoreError
from kcons.ids import MAX_ID_LENGTH as MAX_ID_LENGTH  # re-exported: the stores check ids against it
from kcons.ids import storage_id

__all__ = [
    "DEFAULT_RETENTION_S",
    "MAX_LEASE_S",
    "MAX_RETENTION_S",
    "AheadDedupStore",
    "BatchDedupStore",
    "ClaimLostError",
    "ClaimResult",
    "DedupStore",
    "PipelinedDedupStore",
    "SqlDedupStore",
    "StoreCapabilities",
    "TransactionalDedupStore",
    "capabilities_of",
    "check_lease",
    "new_owner_token",
    "storage_id",
    "validate_namespace",
]

#: How long a *done* record is kept by default: one week, longer than any sane redelivery window.
DEFAULT_RETENTION_S = 7 * 24 * 3600.0
#: Upper bound of the retention TTL (bounded TTLs: a store never grows without limit).
MAX_RETENTION_S = 90 * 24 * 3600.0
#: Upper bound of a claim lease.
MAX_LEASE_S = 24 * 3600.0



class ClaimLostError(StoreError):
    """A claim this worker held was taken over by another worker after its lease expired."""


@dataclass(frozen=True)
class ClaimResult:
    """Outcome of claiming a batch: ``claimed`` are now ours, ``done`` are duplicates, ``busy`` are held elsewhere.

    An id that is in neither ``claimed`` nor ``done`` counts as busy: the safe answer when a
    store cannot tell (for example a row inserted concurrently by another worker).
    """

    claimed: frozenset[str]
    done: frozenset[str] = field(default_factory=frozenset)
    busy: frozenset[str] = field(default_factory=frozenset)


@runtime_checkable
class DedupStore(Protocol):
    """Remembers which event ids were handled, with a lease on ids being handled right now."""

    def claim(self, ids: Sequence[str], lease_s: float) -> set[str]:
        """Atomically for the batch: ids neither done nor held under an unexpired lease become ours and are returned."""
        ...

    def complete(self, ids: Sequence[str]) -> None:
        """Mark ids done; they stay duplicates for the retention TTL."""
        ...

    def release(self, ids: Sequence[str]) -> None:
        """Give back our in-progress claims after a failure, so the ids can be claimed again at once."""
        ...


@runtime_checkable
class BatchDedupStore(DedupStore, Protocol):
    """A store that also tells duplicates (done) from ids busy in another worker."""

    def claim_batch(self, ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Like :meth:`claim`, and report which of the others are done and which are busy."""
        ...


@runtime_checkable
class PipelinedDedupStore(BatchDedupStore, Protocol):
    """A store that records one batch done and claims the next in a single call (one round trip per batch)."""

    def complete_and_claim(self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Mark ``done_ids`` done, then claim ``ids`` like :meth:`claim_batch`, in one call."""
        ...


@runtime_checkable
class AheadDedupStore(PipelinedDedupStore, Protocol):
    """A networked store whose pipelined call can be sent now and answered later (claim ahead)."""

    def send_complete_and_claim(
        self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float
    ) -> Callable[[], ClaimResult]:
        """Send :meth:`complete_and_claim` now; the returned function waits for its answer (call it once).

        Calls run in the order they are sent (an earlier call's done records are written before a
        later call claims), and their answers are read in that order.
        """
        ...


@runtime_checkable
class TransactionalDedupStore(DedupStore, Protocol):
    """A SQL store whose *done* record can commit inside the caller's own transaction."""

    def complete_in(self, conn: Any, ids: Sequence[str]) -> None:
        """Record ids done on ``conn`` inside its open transaction; ClaimLostError if a claim is no longer ours."""
        ...

    def transaction(self, conn: Any) -> AbstractContextManager[Any]:
        """Open a transaction on ``conn`` (a savepoint when one is already open); commit on exit, roll back on error."""
        ...


class SqlDedupStore(BatchDedupStore, TransactionalDedupStore, Protocol):
    """A SQL dedup store (PostgreSQL, SQLite): batch claims and done records inside the caller's transaction."""


@dataclass(frozen=True)
class StoreCapabilities:
    """What a dedup store can do beyond :class:`DedupStore`, declared by the store (``capabilities`` attribute).

    ``batch_claim``: :meth:`BatchDedupStore.claim_batch` (tells done ids from busy ones; without
    it every unclaimed id counts as busy). ``pipelined``: :meth:`PipelinedDedupStore.complete_and_claim`
    (one round trip per batch). ``transactional``: :class:`TransactionalDedupStore` (done records
    in the caller's DB transaction). ``in_process``: calls cost no network round trip (nothing to
    overlap them with). ``claim_ahead``: :meth:`AheadDedupStore.send_complete_and_claim` (the
    consumer claims the next batch while it handles the current one).
    """

    batch_claim: bool = False
    pipelined: bool = False
    transactional: bool = False
    in_process: bool = False
    claim_ahead: bool = False


_NEEDS = {
    "batch_claim": ("claim_batch",),
    "pipelined": ("claim_batch", "complete_and_claim"),
    "transactional": ("complete_in", "transaction"),
    "claim_ahead": ("claim_batch", "complete_and_claim", "send_complete_and_claim"),
}


def capabilities_of(store: DedupStore) -> StoreCapabilities:
    """The store's declared capabilities, checked against its methods (ConfigError("store") when one is missing).

    A store that declares none (a user's own) is inspected against the protocols instead, once.
    """
    declared = getattr(store, "capabilities", None)
    if declared is None:
        return StoreCapabilities(
            batch_claim=isinstance(store, BatchDedupStore),
            pipelined=isinstance(store, PipelinedDedupStore),
            transactional=isinstance(store, TransactionalDedupStore),
        )
    if not isinstance(declared, StoreCapabilities):
        raise ConfigError("store", f"capabilities must be a StoreCapabilities, got {type(declared).__name__}")
    for name, methods in _NEEDS.items():
        missing = [m for m in methods if getattr(declared, name) and not callable(getattr(store, m, None))]
        if missing:
            raise ConfigError("store", f"declares {name} but has no {', '.join(missing)}")
    return declared


def new_owner_token() -> str:
    """A random token that identifies one store instance as the holder of its claims."""
    return uuid.uuid4().hex


def validate_namespace(setting: str, namespace: str) -> str:
    """Check a dedup namespace (normally the consumer group id): 1-200 safe characters."""
    return check_identifier(setting, namespace, kind="key", max_length=200)


def check_lease(lease_s: float) -> float:
    """Validate a lease length in seconds (bounded, positive)."""
    return check_range("lease_s", float(lease_s), 0.001, MAX_LEASE_S)


def check_retention(setting: str, retention_s: float) -> float:
    """Validate a retention TTL in seconds (bounded, at least one second)."""
    return check_range(setting, float(retention_s), 1.0, MAX_RETENTION_S)


def unique_in_order(ids: Sequence[str]) -> list[str]:
    """The ids without repeats, first occurrence first."""
    return list(dict.fromkeys(ids))


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
