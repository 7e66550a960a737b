"""The relay's port to an outbox table: the :class:`OutboxStore` protocol.

Implementations: :class:`kcons.adapters.postgres.outbox.PostgresOutboxStore` (whose module
docstring gives the argument why publishing committed rows in position order is gap-free and
keeps each aggregate's commit order) and :class:`kcons.adapters.sqlite.outbox.SqliteOutboxStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kcons.outbox.rows import OutboxRow

__all__ = ["OutboxStore"]


class OutboxStore(Protocol):
    """The relay's view of an outbox table."""

    def fetch(self, limit: int, exclude: Sequence[int] = ()) -> list[OutboxRow]:
        """The lowest-positioned committed, unpublished rows not in ``exclude``, in position order."""
        ...

    def forget_position(self) -> None:
        """Drop any read-position hint: the next fetch scans from the lowest position (after a failure)."""
        ...

    def claim_fence(self, name: str, token: int, holder: str) -> None:
        """Record ``token`` as the current leader's; raise LeadershipLostError if a higher one exists."""
        ...

    def check_fence(self, name: str, token: int) -> None:
        """Raise LeadershipLostError if a token higher than ``token`` was recorded."""
        ...

    def mark_published(self, rows: Sequence[OutboxRow], *, name: str, token: int, retain: bool) -> None:
        """Delete (or, with ``retain``, mark) ``rows`` in one transaction fenced by ``token``."""
        ...

    def dead_letter(self, rows: Sequence[tuple[OutboxRow, str]], *, name: str, token: int) -> None:
        """Move ``rows`` (each with its reason) to ``<table>_dead`` in one transaction fenced by ``token``."""
        ...

    def wait_for_change(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for new rows (LISTEN/NOTIFY or polling); True if woken early."""
        ...

    def backlog(self) -> tuple[int, float]:
        """(unpublished committed rows, age in seconds of the oldest one or 0)."""
        ...

    def purge_published(self, older_than_s: float, limit: int = 10000) -> int:
        """Delete up to ``limit`` rows published more than ``older_than_s`` ago; returns the count."""
        ...

    def close(self) -> None:
        """Close connections."""
        ...
