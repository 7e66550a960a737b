"""The outbox table in a SQLite file: the relay's store for the embedded single-process case."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from kcons.errors import ConfigError, LeadershipLostError, StoreError
from kcons.outbox.rows import DEAD_ROW_FIELDS, OutboxRow, row_from_select
from kcons.outbox.schema import DEFAULT_TABLE, validate_table

__all__ = ["SqliteOutboxStore"]

log = logging.getLogger(__name__)

#: The columns a dead row keeps (the same as the outbox row's, minus published_at).
_COLS = "position, id, aggregatetype, aggregateid, type, payload, topic, headers, version, created_at"


def _age(created_at: Any, now: float) -> float:
    try:
        return max(0.0, now - float(created_at))
    except (TypeError, ValueError):  # a created_at that is not a number: the row's age is unknown
        return 0.0


class SqliteOutboxStore:
    """The outbox table in a SQLite file, for the embedded single-process case.

    SQLite serialises write transactions, so rowid (position) order is commit order; only
    committed rows are visible to the relay's connection. There is no NOTIFY: the relay polls
    ``PRAGMA data_version`` (cheap) every few milliseconds. Run one relay per database file.
    """

    def __init__(self, path: str, table: str = DEFAULT_TABLE, *, poll_s: float = 0.01) -> None:
        self._path = path
        self.table = validate_table(table)
        self._poll_s = poll_s
        self._db: sqlite3.Connection | None = None
        self._hk: sqlite3.Connection | None = None
        self._fence: dict[str, int] = {}
        self._data_version: int | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            # The relay owns this connection in its own thread; autocommit mode, explicit BEGIN for writes.
            self._db = sqlite3.connect(self._path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 30000")
        return self._db

    def fetch(self, limit: int, exclude: Sequence[int] = ()) -> list[OutboxRow]:
        """The lowest-positioned committed, unpublished rows not in ``exclude``, in position order."""
        now = time.time()
        skip = set(exclude)
        t = self.table
        try:
            cur = self._conn().execute(
                f"SELECT position, id, aggregatetype, aggregateid, type, payload, topic, headers, version, created_at, "
                f"(aggregatetype, aggregateid) IN (SELECT d.aggregatetype, d.aggregateid FROM {t}_dead d) "
                f"FROM {t} WHERE published_at IS NULL ORDER BY position LIMIT ?",
                (limit + len(skip),),
            )
        except sqlite3.OperationalError as exc:
            if f"no such table: {t}_dead" in str(exc):
                raise ConfigError(
                    "KCONS_OUTBOX_TABLE", f"{t}_dead does not exist: run `kcons outbox init --sqlite PATH`"
                ) from None
            raise
        rows = [row_from_select(r, _age(r[9], now), now) for r in cur.fetchall() if r[0] not in skip]
        return rows[:limit]

    def forget_position(self) -> None:
        """Nothing to forget: SQLite reads always start at the lowest position."""

    def claim_fence(self, name: str, token: int, holder: str) -> None:
        """Remember ``token`` (single process: kept in memory)."""
        if self._fence.get(name, 0) > token:
            raise LeadershipLostError(f"fence {name}: token {self._fence[name]} supersedes {token}")
        self._fence[name] = token

    def check_fence(self, name: str, token: int) -> None:
        """Raise LeadershipLostError if a higher token was claimed in this process."""
        if self._fence.get(name, 0) > token:
            raise LeadershipLostError(f"fence {name}: token {self._fence[name]} supersedes {token}")

    def mark_published(self, rows: Sequence[OutboxRow], *, name: str, token: int, retain: bool) -> None:
        """Delete or mark ``rows`` in one transaction."""
        self.check_fence(name, token)
        if not rows:
            return
        db = self._conn()
        params = [(r.position,) for r in rows]
        db.execute("BEGIN IMMEDIATE")
        try:
            if retain:
                db.executemany(
                    f"UPDATE {self.table} SET published_at = ((julianday('now') - 2440587.5) * 86400.0) "
                    f"WHERE position = ? AND published_at IS NULL",
                    params,
                )
            else:
                db.executemany(f"DELETE FROM {self.table} WHERE position = ? AND published_at IS NULL", params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def dead_letter(self, rows: Sequence[tuple[OutboxRow, str]], *, name: str, token: int) -> None:
        """Move ``rows`` (each with its reason) to ``<table>_dead`` in one transaction."""
        self.check_fence(name, token)
        if not rows:
            return
        t = self.table
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for row, reason in rows:
                db.execute(
                    f"INSERT INTO {t}_dead ({_COLS}, reason) SELECT {_COLS}, ? FROM {t} "
                    f"WHERE position = ? AND published_at IS NULL",
                    (reason, row.position),
                )
                db.execute(f"DELETE FROM {t} WHERE position = ? AND published_at IS NULL", (row.position,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def dead_rows(self, limit: int = 100) -> list[dict[str, Any]]:
        """The dead-letter table's rows (lowest position first), for operators."""
        cur = self._housekeeping_conn().execute(
            f"SELECT position, id, aggregatetype, aggregateid, type, topic, version, reason, failed_at, "
            f"length(payload) FROM {self.table}_dead ORDER BY position LIMIT ?",
            (limit,),
        )
        return [dict(zip(DEAD_ROW_FIELDS, r, strict=True)) for r in cur.fetchall()]

    def resolve_dead(self, position: int, *, drop: bool) -> int:
        """Put the dead rows of the aggregate of ``position`` back at their original positions (dropping
        the row at ``position`` first with ``drop``); returns how many went back."""
        t = self.table
        db = self._housekeeping_conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            found = f"SELECT aggregatetype, aggregateid FROM {t}_dead WHERE position = ?"
            row = db.execute(found, (position,)).fetchone()
            if row is None:
                raise StoreError(f"no dead outbox row at position {position}")
            if drop:
                db.execute(f"DELETE FROM {t}_dead WHERE position = ?", (position,))
            where = "aggregatetype = ? AND aggregateid = ?"
            back = f"INSERT INTO {t} ({_COLS}) SELECT {_COLS} FROM {t}_dead WHERE {where} ORDER BY position"
            cur = db.execute(back, row)
            db.execute(f"DELETE FROM {t}_dead WHERE {where}", row)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(cur.rowcount)

    def wait_for_change(self, timeout_s: float) -> bool:
        """Poll ``PRAGMA data_version`` until another connection commits, up to ``timeout_s``."""
        db = self._conn()
        deadline = time.monotonic() + timeout_s
        while True:
            row = db.execute("PRAGMA data_version").fetchone()
            version = int(row[0]) if row else 0
            if self._data_version is not None and version != self._data_version:
                self._data_version = version
                return True
            self._data_version = version
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self._poll_s, left))

    def _housekeeping_conn(self) -> sqlite3.Connection:
        if self._hk is None:
            self._hk = sqlite3.connect(self._path, timeout=30.0, isolation_level=None, check_same_thread=False)
        return self._hk

    def backlog(self) -> tuple[int, float]:
        """(unpublished rows, age in seconds of the oldest one or 0); own connection, for the housekeeping thread."""
        row = (
            self._housekeeping_conn()
            .execute(f"SELECT count(*), min(created_at) FROM {self.table} WHERE published_at IS NULL")
            .fetchone()
        )
        if row is None or row[1] is None:
            return 0, 0.0
        return int(row[0]), max(0.0, time.time() - float(row[1]))

    def purge_published(self, older_than_s: float, limit: int = 10000) -> int:
        """Delete up to ``limit`` rows published more than ``older_than_s`` seconds ago."""
        cutoff = time.time() - older_than_s
        cur = self._housekeeping_conn().execute(
            f"DELETE FROM {self.table} WHERE position IN (SELECT position FROM {self.table} "
            f"WHERE published_at IS NOT NULL AND published_at < ? LIMIT ?)",
            (cutoff, limit),
        )
        return int(cur.rowcount)

    def close(self) -> None:
        """Close the connections."""
        if self._hk is not None:
            self._hk.close()
            self._hk = None
        if self._db is not None:
            self._db.close()
            self._db = None
