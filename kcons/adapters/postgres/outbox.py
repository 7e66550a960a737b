"""The outbox table on PostgreSQL: where the relay reads unpublished rows and marks published ones.

Why publishing in ``position`` order over *committed* rows is gap-free and keeps each
aggregate's commit order (PostgreSQL):

* The relay never keeps a cursor ("rows after the last position I saw"). Each batch is the
  lowest-positioned rows with ``published_at IS NULL`` that are visible in a fresh snapshot,
  i.e. committed. A row whose transaction is still open is invisible in that snapshot and stays
  unpublished, so the next snapshot after its commit finds it, however low its position: the
  sequence-gap problem cannot occur, without any sleep. A rolled-back row is never visible.
* A transaction that is open when the snapshot is taken is in the snapshot's
  ``pg_snapshot_xip`` list (or at or above ``pg_snapshot_xmax``). A writer draws its row's
  position while holding the lock that serialises writers of the aggregate, so while it is open
  no other transaction can commit a *later* row of that aggregate: every visible row of the
  aggregate has a lower position than the open one. Publishing visible rows in position order
  therefore yields each aggregate's commit order.
* Ordering by transaction id (``xid8``) instead would be wrong: a transaction gets its xid at its
  first write, possibly before it waits for an aggregate's lock, so a lower xid can commit an
  aggregate's *later* event. Reading only ``txid < pg_snapshot_xmin(pg_current_snapshot())``
  would be gap-free too, but it would publish an aggregate's later event (low xid, committed)
  before an earlier one whose xid is still above the horizon, and one long-running transaction
  would stall the whole outbox. Here a long-running writer delays only its own rows (they are
  invisible until it commits); the ``kcons_outbox_oldest_unpublished_age_seconds`` metric shows
  rows waiting for the relay, not rows still inside open transactions.
* Reading fast without a cursor, which is where ``txid`` and the snapshot horizon serve: after
  a read the store keeps a hint ``(H, X)``, H the highest position returned and X the
  ``pg_snapshot_xmin`` of the read's snapshot. Invariant: an unpublished row at or below H that
  the read did not return was invisible to it, so its transaction was open in that snapshot or
  began after it, so its ``txid >= X``. The next read is one statement (one snapshot) taking
  (a) rows at or below H with ``txid >= X`` (index on ``txid``; normally only late commits) and
  (b) the lowest rows above H (index on ``position``, starting past the dead index entries of
  rows already deleted, which a plain ``ORDER BY position LIMIT n`` would walk every time). A
  batch that was not published clears the hint (:meth:`PostgresOutboxStore.forget_position`);
  more late rows than one batch fall back to a plain read.
* Position numbers come from an identity sequence with ``CACHE 1``; a cached sequence would hand
  out positions out of order across sessions and break the argument above.

Marking is fenced: the ``DELETE`` (or ``UPDATE ... published_at``) of published rows is one
statement together with an update of the fence row, and it changes nothing unless the relay's
lease token is the highest the fence has seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from kcons.errors import ConfigError, LeadershipLostError, StoreError
from kcons.outbox.rows import DEAD_ROW_FIELDS, OutboxRow, row_from_select
from kcons.outbox.schema import DEFAULT_TABLE, SCHEMA_VERSION, validate_table

__all__ = ["PostgresOutboxStore"]

log = logging.getLogger(__name__)


def _check_schema(exc: Exception, table: str) -> None:
    """Turn "the dead-letter table is missing" into a ConfigError that says what to run (not retried)."""
    import psycopg

    if isinstance(exc, psycopg.errors.UndefinedTable) and f"{table}_dead" in str(exc):
        raise ConfigError(
            "KCONS_OUTBOX_TABLE",
            f"{table}_dead does not exist: the outbox schema predates version {SCHEMA_VERSION}; "
            "run `kcons outbox init`",
        ) from None


class PostgresOutboxStore:
    """The outbox table on PostgreSQL via psycopg 3: work, mark, LISTEN and housekeeping connections."""

    #: :meth:`mark_published` has a connection of its own: it may run while :meth:`fetch` runs.
    concurrent_mark = True

    def __init__(
        self,
        dsn: str,
        table: str = DEFAULT_TABLE,
        *,
        application_name: str = "kcons-outbox-relay",
        session_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self.table = validate_table(table)
        self._app = application_name
        self._timeout_ms = max(1000, int(session_timeout_s * 1000))
        self._connect_timeout = max(1, int(connect_timeout_s))
        self._work: Any = None
        self._mark: Any = None
        self._listen: Any = None
        self._housekeeping: Any = None
        self._lock = threading.Lock()
        t = self.table
        # Column 10 says whether the row's aggregate is held by a dead row. Each read also asks,
        # in its own snapshot, whether the dead-letter table has any row (one index probe): when
        # it has none, which is the normal case, no row can be held and the read takes the
        # variant without the per-row check (see :meth:`fetch`).
        base_cols = (
            "position, id::text, aggregatetype, aggregateid, type, payload, topic, headers, version, "
            "extract(epoch FROM clock_timestamp() - created_at)::float8, "
        )
        any_dead = f"EXISTS (SELECT 1 FROM {t}_dead)"
        self._fetch_sql: dict[bool, str] = {}
        self._hinted_sql: dict[bool, str] = {}
        for held in (False, True):
            cols = base_cols + (
                f"(aggregatetype, aggregateid) IN (SELECT d.aggregatetype, d.aggregateid FROM {t}_dead d)"
                if held
                else "false"
            )
            # Column 11: whether the dead-letter table has rows (an InitPlan: evaluated once).
            self._fetch_sql[held] = (
                f"SELECT {cols}, ({any_dead}) FROM {t} WHERE published_at IS NULL ORDER BY position LIMIT %(limit)s"
            )
            # The hinted read (see the module docstring): unpublished committed rows at or below the
            # hint can only come from transactions that were open at the previous read (txid >= its
            # horizon); above the hint, the lowest positions. One statement, hence one snapshot, whose
            # xmin becomes the next horizon. Columns 11-13: late, xmin, any dead row.
            self._hinted_sql[held] = (
                f"WITH snap AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xmin, "
                f"{any_dead} AS dead) "
                f"SELECT u.*, snap.xmin, snap.dead FROM snap LEFT JOIN LATERAL ("
                # ``position + 0``: the late rows are found through the txid index, never by walking positions.
                f"(SELECT {cols}, 1 AS late FROM {t} WHERE published_at IS NULL AND position + 0 <= %(hint)s "
                f"AND txid >= %(horizon)s::xid8 LIMIT %(late_limit)s) "
                f"UNION ALL "
                f"(SELECT {cols}, 0 AS late FROM {t} WHERE published_at IS NULL AND position > %(hint)s "
                f"ORDER BY position LIMIT %(limit)s)"
                f") u ON true ORDER BY u.position"
            )
        #: Whether the last read saw rows in the dead-letter table (then reads check every row).
        self._dead_seen = True
        self._snapshot_sql = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"
        self._hint: tuple[int, int] | None = None  # (position, horizon xid)
        # One statement, one round trip, atomic: advance the fence, and only if that succeeded
        # delete (or mark) the published rows. Returns (fence rows updated, rows marked).
        fence = (
            f"WITH fence AS (UPDATE {t}_fence SET token = %(token)s, updated_at = now() "
            f"WHERE name = %(name)s AND token <= %(token)s RETURNING 1), "
        )
        self._delete_sql = (
            fence + f"done AS (DELETE FROM {t} WHERE position = ANY(%(positions)s::bigint[]) "
            f"AND published_at IS NULL AND EXISTS (SELECT 1 FROM fence) RETURNING 1) "
            f"SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM done)"
        )
        dead_cols = "position, id, aggregatetype, aggregateid, type, payload, txid, topic, headers, version, created_at"
        # Move poison rows (and rows held behind them) to the dead-letter table with their reasons,
        # fenced like the mark, in one statement.
        self._dead_letter_sql = (
            fence + "reasons AS (SELECT * FROM unnest(%(positions)s::bigint[], %(reasons)s::text[]) "
            "AS r(pos, reason)), "
            f"moved AS (INSERT INTO {t}_dead ({dead_cols}, reason) "
            f"SELECT {', '.join('o.' + c.strip() for c in dead_cols.split(','))}, reasons.reason "
            f"FROM {t} o JOIN reasons ON o.position = reasons.pos "
            f"WHERE o.published_at IS NULL AND EXISTS (SELECT 1 FROM fence) RETURNING position), "
            f"gone AS (DELETE FROM {t} WHERE position IN (SELECT position FROM moved) RETURNING 1) "
            f"SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM gone)"
        )
        back_cols = "position, id, aggregatetype, aggregateid, type, payload, topic, headers, version, created_at"
        # Put every dead row of one aggregate back into the outbox at its original position.
        self._requeue_sql = (
            f"WITH back AS (DELETE FROM {t}_dead WHERE aggregatetype = %(agg_type)s AND aggregateid = %(agg_id)s "
            f"RETURNING {back_cols}) "
            f"INSERT INTO {t} ({back_cols}) OVERRIDING SYSTEM VALUE SELECT {back_cols} FROM back ORDER BY position"
        )
        self._mark_sql = (
            fence + f"done AS (UPDATE {t} SET published_at = clock_timestamp() "
            f"WHERE position = ANY(%(positions)s::bigint[]) AND published_at IS NULL "
            f"AND EXISTS (SELECT 1 FROM fence) RETURNING 1) "
            f"SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM done)"
        )

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=self._connect_timeout,
            application_name=self._app,
            # A paused relay must not keep row or fence locks: the server ends its open transaction.
            # Every relay statement is built for index access (position, txid, fence key); a queue
            # table's statistics are always stale, so the planner is kept from scans of all rows.
            options=(
                f"-c idle_in_transaction_session_timeout={self._timeout_ms} "
                "-c enable_seqscan=off -c enable_bitmapscan=off -c plan_cache_mode=force_custom_plan"
            ),
        )

    def _usable(self, conn: Any) -> Any:
        """``conn`` if it is open, else a new connection (the broken one closed)."""
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._connect()
        return conn

    def _conn(self) -> Any:
        self._work = self._usable(self._work)
        return self._work

    def _mark_conn(self) -> Any:
        self._mark = self._usable(self._mark)
        return self._mark

    def _on_error(self) -> None:
        """Forget a connection that failed, so the next call reconnects."""
        if self._work is not None and (self._work.closed or self._work.broken):
            self._work.close()
            self._work = None

    def _on_mark_error(self) -> None:
        if self._mark is not None and (self._mark.closed or self._mark.broken):
            self._mark.close()
            self._mark = None

    def fetch(self, limit: int, exclude: Sequence[int] = ()) -> list[OutboxRow]:
        """The lowest-positioned committed, unpublished rows not in ``exclude`` (a fresh snapshot), in order.

        Assumes the rows it returns get published, or that :meth:`forget_position` is called: the
        next call starts above them, so the dead index entries of deleted rows are not rescanned.
        """
        conn = self._conn()
        # Rows in flight (``exclude``) lie at or below the hint; they are dropped here rather than
        # sent as an array parameter (cheaper for large batches).
        skip = set(exclude)
        hint = self._hint
        held = self._dead_seen
        try:
            with conn.cursor() as cur:
                if hint is None:
                    # The horizon is taken *before* the read: a row invisible to the read belongs to a
                    # transaction open at or started after this snapshot, so its txid >= this xmin.
                    row = cur.execute(self._snapshot_sql).fetchone()
                    horizon = int(row[0]) if row else 0
                    cur.execute(self._fetch_sql[held], {"limit": limit + len(skip)}, prepare=True, binary=True)
                    got = cur.fetchall()
                    dead = bool(got[0][11]) if got else held
                    raw = [r for r in got if r[0] not in skip][:limit]
                    overflow = False
                else:
                    late_limit = limit + 1 + len(skip)
                    params = {"hint": hint[0], "horizon": str(hint[1]), "limit": limit, "late_limit": late_limit}
                    cur.execute(self._hinted_sql[held], params, prepare=True, binary=True)
                    got = cur.fetchall()
                    horizon = int(got[0][12]) if got else hint[1]
                    dead = bool(got[0][13]) if got else held
                    # All late rows must be in hand (the late query has no order): a full LIMIT means maybe not.
                    overflow = sum(1 for r in got if r[11] == 1) >= late_limit
                    raw = [r for r in got if r[0] is not None and r[0] not in skip]
        except Exception as exc:
            self._on_error()
            _check_schema(exc, self.table)
            raise
        self._dead_seen = dead
        if dead and not held:
            # The dead-letter table has rows in this read's snapshot (put there by an earlier
            # leader, or by hand): read again with the per-row check. The hint is unchanged.
            return self.fetch(limit, exclude)
        if overflow:
            # More late rows than one batch (a huge transaction committed late): read plainly once.
            self._hint = None
            return self.fetch(limit, exclude)
        read_at = time.time()
        rows = [row_from_select(r, float(r[9]), read_at) for r in raw]
        top = rows[-1].position if rows else 0
        if hint is not None:
            top = max(top, hint[0])
        # Invariant for the next read: every unpublished row at or below ``top`` that is neither in
        # this batch nor in ``exclude`` was invisible to this read, so its txid >= ``horizon``.
        self._hint = (top, horizon) if top else None
        return rows

    def forget_position(self) -> None:
        """Scan from the lowest position on the next fetch (call when a fetched batch was not published)."""
        self._hint = None

    def claim_fence(self, name: str, token: int, holder: str) -> None:
        """Record ``token`` as the current leader's token; raise LeadershipLostError if a higher one exists."""
        conn = self._conn()
        try:
            row = conn.execute(
                f"INSERT INTO {self.table}_fence (name, token, holder) VALUES (%s, %s, %s) "
                f"ON CONFLICT (name) DO UPDATE SET token = EXCLUDED.token, holder = EXCLUDED.holder, "
                f"updated_at = now() WHERE {self.table}_fence.token <= EXCLUDED.token RETURNING token",
                (name, token, holder),
            ).fetchone()
        except Exception:
            self._on_error()
            raise
        if row is None:
            raise LeadershipLostError(f"fence {name}: a newer leader holds a token above {token}")

    def check_fence(self, name: str, token: int) -> None:
        """Raise LeadershipLostError if a token higher than ``token`` was recorded."""
        conn = self._conn()
        try:
            row = conn.execute(f"SELECT token FROM {self.table}_fence WHERE name = %s", (name,)).fetchone()
        except Exception:
            self._on_error()
            raise
        if row is not None and int(row[0]) > token:
            raise LeadershipLostError(f"fence {name}: token {row[0]} supersedes {token}")

    def mark_published(self, rows: Sequence[OutboxRow], *, name: str, token: int, retain: bool) -> None:
        """Delete or mark ``rows`` and advance the fence in one transaction; fenced tokens change nothing."""
        if not rows:
            return
        # The positions as one array literal: psycopg would dump a list element by element in Python.
        positions = "{" + ",".join([str(r.position) for r in rows]) + "}"
        params = {"token": token, "name": name, "positions": positions}
        conn = self._mark_conn()
        try:
            with conn.cursor() as cur:
                cur.execute(self._mark_sql if retain else self._delete_sql, params, prepare=True)
                result = cur.fetchone()
        except Exception:
            self._on_mark_error()
            raise
        if result is None or int(result[0]) == 0:
            raise LeadershipLostError(f"fence {name}: token {token} was superseded; rows left unmarked")

    def dead_letter(self, rows: Sequence[tuple[OutboxRow, str]], *, name: str, token: int) -> None:
        """Move ``rows`` (each with its reason) to ``<table>_dead`` in one transaction fenced by ``token``."""
        if not rows:
            return
        params = {
            "token": token,
            "name": name,
            "positions": [r.position for r, _ in rows],
            "reasons": [reason for _, reason in rows],
        }
        self._dead_seen = True  # the next read checks every row (even before it sees these in its snapshot)
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                cur.execute(self._dead_letter_sql, params)
                result = cur.fetchone()
        except Exception:
            self._on_error()
            raise
        if result is None or int(result[0]) == 0:
            raise LeadershipLostError(f"fence {name}: token {token} was superseded; poison rows left in place")

    def dead_rows(self, limit: int = 100) -> list[dict[str, Any]]:
        """The dead-letter table's rows (lowest position first), for operators."""
        cur = self._housekeeping_conn().execute(
            f"SELECT position, id::text, aggregatetype, aggregateid, type, topic, version, reason, "
            f"failed_at::text, octet_length(payload) FROM {self.table}_dead ORDER BY position LIMIT %s",
            (limit,),
        )
        return [dict(zip(DEAD_ROW_FIELDS, r, strict=True)) for r in cur.fetchall()]

    def resolve_dead(self, position: int, *, drop: bool) -> int:
        """Put the dead rows of the aggregate of ``position`` back into the outbox at their original
        positions (the aggregate's order), dropping the row at ``position`` first with ``drop``.

        Returns how many rows went back; raises StoreError when no dead row has that position.
        """
        conn = self._housekeeping_conn()
        with conn.transaction():
            row = conn.execute(
                f"SELECT aggregatetype, aggregateid FROM {self.table}_dead WHERE position = %s FOR UPDATE", (position,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no dead outbox row at position {position}")
            if drop:
                conn.execute(f"DELETE FROM {self.table}_dead WHERE position = %s", (position,))
            cur = conn.execute(self._requeue_sql, {"agg_type": row[0], "agg_id": row[1]})
            return int(cur.rowcount)

    def _listen_conn(self) -> Any:
        if self._listen is None or self._listen.closed or self._listen.broken:
            if self._listen is not None:
                self._listen.close()
            self._listen = None
            conn = self._connect()
            conn.execute(f'LISTEN "{self.table}"')
            self._listen = conn
        return self._listen

    def wait_for_change(self, timeout_s: float) -> bool:
        """Wait for a NOTIFY from the insert trigger, up to ``timeout_s``; falls back to a sleep if LISTEN fails."""
        import psycopg

        try:
            conn = self._listen_conn()
            woke = False
            for _ in conn.notifies(timeout=timeout_s, stop_after=1):
                woke = True
            if woke:  # drain what else is queued, without blocking
                for _ in conn.notifies(timeout=0):
                    pass
            return woke
        except psycopg.Error as exc:
            log.warning("outbox LISTEN connection failed (%s); polling instead", type(exc).__name__)
            if self._listen is not None:
                self._listen.close()
                self._listen = None
            time.sleep(min(timeout_s, 1.0))
            return False

    def _housekeeping_conn(self) -> Any:
        # Backlog samples and retention purges use their own connection (and thread), so a slow
        # count never holds up publishing; a statement timeout bounds them.
        import psycopg

        conn = self._housekeeping
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._housekeeping = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name=self._app,
                options="-c statement_timeout=10000",
            )
        return conn

    def backlog(self) -> tuple[int, float]:
        """(unpublished committed rows, age in seconds of the oldest one or 0)."""
        row = (
            self._housekeeping_conn()
            .execute(
                f"SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 "
                f"FROM {self.table} WHERE published_at IS NULL"
            )
            .fetchone()
        )
        assert row is not None
        return int(row[0]), float(row[1])

    def purge_published(self, older_than_s: float, limit: int = 10000) -> int:
        """Delete up to ``limit`` rows published more than ``older_than_s`` seconds ago."""
        cur = self._housekeeping_conn().execute(
            f"DELETE FROM {self.table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {self.table} "
            f"WHERE published_at < clock_timestamp() - make_interval(secs => %s) LIMIT %s))",
            (older_than_s, limit),
        )
        return int(cur.rowcount)

    def close(self) -> None:
        """Close every connection."""
        for conn in (self._work, self._mark, self._listen, self._housekeeping):
            if conn is not None:
                conn.close()
        self._work = self._mark = self._listen = self._housekeeping = None
