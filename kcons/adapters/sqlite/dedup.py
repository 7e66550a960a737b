"""SQLite dedup store (stdlib ``sqlite3``): the PostgreSQL store's semantics in an embedded file.

Claims run in ``BEGIN IMMEDIATE`` transactions on the store's own connection, so they are
atomic per batch across threads and processes sharing the file. :meth:`SqliteDedupStore.complete_in`
writes the *done* records on the caller's connection inside the caller's transaction (only for
claims this store still owns), so the effect and the dedup record commit together.
Times are Unix seconds from the wall clock, which all processes on one host share.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

from kcons.config import check_identifier
from kcons.dedup import (
    DEFAULT_RETENTION_S,
    ClaimLostError,
    ClaimResult,
    StoreCapabilities,
    check_lease,
    check_retention,
    chunks,
    new_owner_token,
    validate_namespace,
)
from kcons.errors import StoreError
from kcons.ids import storage_id
from kcons.metrics import observe_dedup_store

__all__ = ["SQLITE_DEDUP_SCHEMA_SQL", "SqliteDedupStore"]

_CHUNK = 500  # stays below SQLite's bound-parameter limit

#: DDL of the dedup table; ``{table}`` is replaced by the configured table name.
SQLITE_DEDUP_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS {table} (
    namespace  TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    state      INTEGER NOT NULL,   -- 0 in progress (lease), 1 done (retention)
    owner      TEXT,
    expires_at REAL    NOT NULL,   -- Unix seconds
    PRIMARY KEY (namespace, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at);
"""


class SqliteDedupStore:
    """Dedup store in an SQLite database file; ``complete_in`` gives exactly-once effects with the caller's transaction.

    ``database`` is a file path (use the same file for the caller's connection when using
    ``complete_in``). ``namespace`` should be the consumer group id.
    """

    capabilities = StoreCapabilities(batch_claim=True, transactional=True)

    def __init__(
        self,
        database: str,
        namespace: str,
        *,
        table: str = "kcons_dedup",
        retention_s: float = DEFAULT_RETENTION_S,
        busy_timeout_s: float = 30.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ns = validate_namespace("namespace", namespace)
        self._table = check_identifier("table", table, kind="sql", max_length=63)
        self._retention = check_retention("retention_s", retention_s)
        self._owner = owner or new_owner_token()
        self._clock = clock
        self._lock = threading.Lock()
        self._latency = observe_dedup_store("sqlite")
        self._conn = sqlite3.connect(database, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        with self._lock:
            self._conn.executescript(SQLITE_DEDUP_SCHEMA_SQL.format(table=table))

    @property
    def owner(self) -> str:
        """The token that marks this instance's claims."""
        return self._owner

    def claim(self, ids: Sequence[str], lease_s: float) -> set[str]:
        """Claim the ids that are neither done nor held under another owner's unexpired lease."""
        return set(self.claim_batch(ids, lease_s).claimed)

    def claim_batch(self, ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Claim new ids for ``lease_s`` seconds in one write transaction; report the done and busy others."""
        lease = check_lease(lease_s)
        originals = {storage_id(i): i for i in ids}
        if not originals:
            return ClaimResult(frozenset())
        started = time.perf_counter()
        claimed: list[str] = []
        done: list[str] = []
        busy: list[str] = []
        t = self._table
        with self._write("claim") as conn:
            now = self._clock()
            current: dict[str, tuple[int, str | None, float]] = {}
            for part in chunks(list(originals), _CHUNK):
                marks = ",".join("?" * len(part))
                rows = conn.execute(
                    f"SELECT id, state, owner, expires_at FROM {t} WHERE namespace = ? AND id IN ({marks})",
                    [self._ns, *part],
                )
                current.update((r[0], (r[1], r[2], r[3])) for r in rows)
            for sid, original in originals.items():
                row = current.get(sid)
                if row is None or row[2] <= now or (row[0] == 0 and row[1] == self._owner):
                    claimed.append(sid)
                elif row[0] == 1:
                    done.append(original)
                else:
                    busy.append(original)
            conn.executemany(
                f"INSERT INTO {t} (namespace, id, state, owner, expires_at) VALUES (?, ?, 0, ?, ?) "
                "ON CONFLICT (namespace, id) DO UPDATE SET state = 0, owner = excluded.owner, "
                "expires_at = excluded.expires_at",
                [(self._ns, sid, self._owner, now + lease) for sid in claimed],
            )
        self._latency["claim"].observe(time.perf_counter() - started)
        return ClaimResult(frozenset(originals[s] for s in claimed), frozenset(done), frozenset(busy))

    def complete(self, ids: Sequence[str]) -> None:
        """Mark ids done for the retention TTL on the store's own connection."""
        if not ids:
            return
        started = time.perf_counter()
        with self._write("complete") as conn:
            expires = self._clock() + self._retention
            conn.executemany(
                f"INSERT INTO {self._table} (namespace, id, state, owner, expires_at) VALUES (?, ?, 1, NULL, ?) "
                "ON CONFLICT (namespace, id) DO UPDATE SET state = 1, owner = NULL, expires_at = excluded.expires_at",
                [(self._ns, sid, expires) for sid in {storage_id(i) for i in ids}],
            )
        self._latency["complete"].observe(time.perf_counter() - started)

    def complete_in(self, conn: sqlite3.Connection, ids: Sequence[str]) -> None:
        """Mark our claims done on ``conn`` inside its open transaction; ClaimLostError if one is not ours."""
        wanted = sorted({storage_id(i) for i in ids})
        if not wanted:
            return
        started = time.perf_counter()
        expires = self._clock() + self._retention
        changed = 0
        for part in chunks(wanted, _CHUNK):
            marks = ",".join("?" * len(part))
            cur = conn.execute(
                f"UPDATE {self._table} SET state = 1, owner = NULL, expires_at = ? "
                f"WHERE namespace = ? AND id IN ({marks}) AND state = 0 AND owner = ?",
                [expires, self._ns, *part, self._owner],
            )
            changed += cur.rowcount
        self._latency["complete"].observe(time.perf_counter() - started)
        if changed != len(wanted):
            raise ClaimLostError(f"{len(wanted) - changed} of {len(wanted)} claims are no longer held by this worker")

    @contextlib.contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """A transaction on the caller's ``conn`` (a savepoint when one is open); commit on exit, roll back on error."""
        if conn.in_transaction:
            name = f"kcons_{uuid.uuid4().hex[:12]}"
            conn.execute(f"SAVEPOINT {name}")
            try:
                yield conn
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                raise
            conn.execute(f"RELEASE {name}")
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def release(self, ids: Sequence[str]) -> None:
        """Delete our own in-progress claims; done ids and other owners' claims are untouched."""
        if not ids:
            return
        started = time.perf_counter()
        with self._write("release") as conn:
            conn.executemany(
                f"DELETE FROM {self._table} WHERE namespace = ? AND id = ? AND state = 0 AND owner = ?",
                [(self._ns, sid, self._owner) for sid in {storage_id(i) for i in ids}],
            )
        self._latency["release"].observe(time.perf_counter() - started)

    def purge_expired(self) -> int:
        """Delete expired rows (they already count as absent); returns how many."""
        with self._write("purge") as conn:
            return conn.execute(f"DELETE FROM {self._table} WHERE expires_at < ?", [self._clock() - 1.0]).rowcount

    def close(self) -> None:
        """Close the store's connection."""
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _write(self, op: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite dedup {op} failed: {exc}") from exc
            try:
                yield self._conn
            except sqlite3.Error as exc:
                self._conn.rollback()
                raise StoreError(f"sqlite dedup {op} failed: {exc}") from exc
            except BaseException:
                self._conn.rollback()
                raise
            try:
                self._conn.commit()
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite dedup {op} failed: {exc}") from exc
