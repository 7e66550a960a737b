"""PostgreSQL dedup store (psycopg 3): a table of claims, and *done* records inside the caller's transaction.

Claims run on the store's own autocommit connection (or a connection from a pool the caller
passes in), so other workers see them at once. :meth:`PostgresDedupStore.complete_in` runs on
the caller's connection inside the caller's open transaction and only for claims this store
still owns: the handler's effect and the dedup record commit together or not at all, and a
worker whose lease was taken over fails instead of committing a second effect. Its row lock
also makes a concurrent takeover wait for the transaction and then see the id done.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kcons.config import check_identifier, redact
from kcons.dedup import (
    DEFAULT_RETENTION_S,
    ClaimLostError,
    ClaimResult,
    StoreCapabilities,
    check_lease,
    check_retention,
    new_owner_token,
    validate_namespace,
)
from kcons.errors import StoreError
from kcons.ids import storage_id
from kcons.metrics import observe_dedup_store

log = logging.getLogger(__name__)

__all__ = ["DEDUP_SCHEMA_SQL", "PostgresDedupStore", "dedup_schema_sql"]


#: DDL of the dedup table; ``{table}`` is replaced by the configured table name.
DEDUP_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS {table} (
    namespace  text        NOT NULL,
    id         text        NOT NULL,
    state      smallint    NOT NULL,   -- 0 in progress (lease), 1 done (retention)
    owner      text,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at);
"""

_CLAIM = """
WITH wanted AS (SELECT unnest(%(ids)s::text[]) AS id),
claimed AS (
    INSERT INTO {table} AS d (namespace, id, state, owner, expires_at)
    SELECT %(ns)s, wanted.id, 0, %(owner)s, now() + %(lease)s * interval '1 second' FROM wanted
    ON CONFLICT (namespace, id) DO UPDATE
        SET state = 0, owner = excluded.owner, expires_at = excluded.expires_at
        WHERE d.expires_at <= now() OR (d.state = 0 AND d.owner = excluded.owner)
    RETURNING d.id
)
SELECT id, 1 FROM claimed
UNION ALL
SELECT d.id, CASE WHEN d.state = 1 THEN 0 ELSE 2 END FROM {table} d
 WHERE d.namespace = %(ns)s AND d.id = ANY(%(ids)s::text[]) AND d.id NOT IN (SELECT id FROM claimed)
"""

_COMPLETE = """
INSERT INTO {table} AS d (namespace, id, state, owner, expires_at)
SELECT %(ns)s, unnest(%(ids)s::text[]), 1, NULL, now() + %(retention)s * interval '1 second'
ON CONFLICT (namespace, id) DO UPDATE SET state = 1, owner = NULL, expires_at = excluded.expires_at
"""

_COMPLETE_OWNED = """
UPDATE {table} SET state = 1, owner = NULL, expires_at = now() + %(retention)s * interval '1 second'
 WHERE namespace = %(ns)s AND id = ANY(%(ids)s::text[]) AND state = 0 AND owner = %(owner)s
"""

_RELEASE = """
DELETE FROM {table} WHERE namespace = %(ns)s AND id = ANY(%(ids)s::text[]) AND state = 0 AND owner = %(owner)s
"""

_PURGE = """
DELETE FROM {table} WHERE ctid IN (
    SELECT ctid FROM {table} WHERE expires_at < now() - interval '1 second' LIMIT %(limit)s
)
"""


def dedup_schema_sql(table: str = "kcons_dedup") -> str:
    """The DDL of the dedup table, for migrations."""
    return DEDUP_SCHEMA_SQL.format(table=check_identifier("table", table, kind="sql", max_length=63))


class PostgresDedupStore:
    """Dedup store on a PostgreSQL table; ``complete_in`` gives exactly-once effects with the caller's transaction.

    ``conninfo`` is a libpq DSN/URL (the store keeps one autocommit connection and reconnects
    when it breaks) or a ``psycopg_pool.ConnectionPool`` the caller owns. ``namespace`` should
    be the consumer group id. Expired rows are deleted in small slices every ``purge_every_s``.
    """

    capabilities = StoreCapabilities(batch_claim=True, transactional=True)

    def __init__(
        self,
        conninfo: Any,
        namespace: str,
        *,
        table: str = "kcons_dedup",
        retention_s: float = DEFAULT_RETENTION_S,
        create_schema: bool = True,
        purge_every_s: float = 60.0,
        owner: str | None = None,
    ) -> None:
        self._ns = validate_namespace("namespace", namespace)
        self._table = check_identifier("table", table, kind="sql", max_length=63)
        self._retention = check_retention("retention_s", retention_s)
        self._owner = owner or new_owner_token()
        self._pool = None if isinstance(conninfo, str) else conninfo
        self._dsn = conninfo if isinstance(conninfo, str) else None
        self._conn: Any = None
        self._lock = threading.Lock()
        self._purge_every = purge_every_s
        self._next_purge = time.monotonic() + purge_every_s
        self._latency = observe_dedup_store("postgres")
        self._sql = {
            name: text.format(table=self._table)
            for name, text in {
                "claim": _CLAIM,
                "complete": _COMPLETE,
                "complete_owned": _COMPLETE_OWNED,
                "release": _RELEASE,
                "purge": _PURGE,
            }.items()
        }
        if create_schema:
            self.create_schema()

    @property
    def owner(self) -> str:
        """The token that marks this instance's claims."""
        return self._owner

    @property
    def table(self) -> str:
        """The dedup table's name."""
        return self._table

    def create_schema(self) -> None:
        """Create the dedup table and its index if they do not exist."""
        with self._connection("create_schema") as conn:
            conn.execute(dedup_schema_sql(self._table))

    def claim(self, ids: Sequence[str], lease_s: float) -> set[str]:
        """Claim the ids that are neither done nor held under another owner's unexpired lease."""
        return set(self.claim_batch(ids, lease_s).claimed)

    def claim_batch(self, ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Claim new ids for ``lease_s`` seconds in one statement; report the done and busy others.

        Ids are claimed in sorted order so two workers claiming overlapping batches lock rows in
        the same order and cannot deadlock.
        """
        lease = check_lease(lease_s)
        originals = {storage_id(i): i for i in ids}
        if not originals:
            return ClaimResult(frozenset())
        params = {"ids": sorted(originals), "ns": self._ns, "owner": self._owner, "lease": lease}
        started = time.perf_counter()
        with self._connection("claim") as conn:
            rows = conn.execute(self._sql["claim"], params).fetchall()
            self._maybe_purge(conn)
        self._latency["claim"].observe(time.perf_counter() - started)
        claimed: list[str] = []
        done: list[str] = []
        busy: list[str] = []
        for sid, code in rows:
            target = claimed if code == 1 else done if code == 0 else busy
            target.append(originals[sid])
        return ClaimResult(frozenset(claimed), frozenset(done), frozenset(busy))

    def complete(self, ids: Sequence[str]) -> None:
        """Mark ids done for the retention TTL on the store's own connection."""
        if not ids:
            return
        params = {"ids": sorted({storage_id(i) for i in ids}), "ns": self._ns, "retention": self._retention}
        started = time.perf_counter()
        with self._connection("complete") as conn:
            conn.execute(self._sql["complete"], params)
        self._latency["complete"].observe(time.perf_counter() - started)

    def complete_in(self, conn: Any, ids: Sequence[str]) -> None:
        """Mark our claims done on the caller's ``conn``, inside its open transaction.

        Raises :class:`~kcons.dedup.ClaimLostError` when a claim is no longer ours (its lease
        expired and another worker took it, or it was done meanwhile): the caller must roll
        back, so the effect is never committed twice.
        """
        wanted = sorted({storage_id(i) for i in ids})
        if not wanted:
            return
        params = {"ids": wanted, "ns": self._ns, "retention": self._retention, "owner": self._owner}
        started = time.perf_counter()
        cur = conn.execute(self._sql["complete_owned"], params)
        self._latency["complete"].observe(time.perf_counter() - started)
        if cur.rowcount != len(wanted):
            lost = len(wanted) - cur.rowcount
            raise ClaimLostError(f"{lost} of {len(wanted)} claims are no longer held by this worker")

    def transaction(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """A psycopg transaction on ``conn`` (a savepoint when one is open); commit on exit, roll back on error."""
        return conn.transaction()  # type: ignore[no-any-return]

    def release(self, ids: Sequence[str]) -> None:
        """Delete our own in-progress claims; done ids and other owners' claims are untouched."""
        if not ids:
            return
        params = {"ids": sorted({storage_id(i) for i in ids}), "ns": self._ns, "owner": self._owner}
        started = time.perf_counter()
        with self._connection("release") as conn:
            conn.execute(self._sql["release"], params)
        self._latency["release"].observe(time.perf_counter() - started)

    def purge_expired(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` expired rows (they already count as absent); returns how many."""
        with self._connection("purge") as conn:
            return int(conn.execute(self._sql["purge"], {"limit": limit}).rowcount)

    def close(self) -> None:
        """Close the store's own connection (a pool passed in stays open)."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def _maybe_purge(self, conn: Any) -> None:
        if self._purge_every <= 0 or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self._purge_every
        try:
            conn.execute(self._sql["purge"], {"limit": 1000})
        except Exception:  # purging is housekeeping; a failure must not fail the claim
            log.warning("purging expired dedup rows from %s failed", self._table, exc_info=True)

    @contextlib.contextmanager
    def _connection(self, op: str) -> Iterator[Any]:
        import psycopg

        try:
            if self._pool is not None:
                with self._pool.connection() as conn:
                    if not conn.autocommit:
                        with conn.transaction():
                            yield conn
                    else:
                        yield conn
                return
            with self._lock:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    assert self._dsn is not None
                    self._conn = psycopg.connect(self._dsn, autocommit=True)
                yield self._conn
        except psycopg.Error as exc:
            where = redact(self._dsn) if self._dsn else "pool"
            raise StoreError(f"postgres dedup {op} failed ({where}): {type(exc).__name__}: {exc}") from exc
