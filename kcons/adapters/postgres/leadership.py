"""Relay leadership on PostgreSQL: a lease backend on a session-level advisory lock.

:class:`AdvisoryLockLeaseBackend` implements :class:`kcons.lease.LeaseBackend`. A lease is a
session-level advisory lock held by a dedicated connection; it is exclusive for as long as that
session lives. The session is configured with ``idle_session_timeout`` and
``idle_in_transaction_session_timeout`` equal to the lease TTL, so when the holder stops
renewing (crash, SIGSTOP, network cut) the *server* ends the session and frees the lock; no
client clock is trusted. Each grant increments a fencing token in ``kcons_lease_tokens``; the
relay writes that token into its fence row in the same transaction that marks published rows,
so a former leader holding a lower token can no longer mark anything.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kcons.config import redact
from kcons.lease import Lease

__all__ = ["AdvisoryLockLeaseBackend", "advisory_key"]

log = logging.getLogger(__name__)

_TOKENS_DDL = """
CREATE TABLE IF NOT EXISTS kcons_lease_tokens (
    name       text        PRIMARY KEY,
    token      bigint      NOT NULL,
    holder     text        NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now()
)
"""


def advisory_key(name: str) -> str:
    """The text whose 64-bit hash is the advisory-lock key of lease ``name``."""
    return f"kcons-lease:{name}"


class AdvisoryLockLeaseBackend:
    """Leases as PostgreSQL session advisory locks, one connection per held lease.

    Exclusive while the holding session lives; freed by the server within ``ttl_s`` after the
    holder stops renewing. Tokens strictly increase per lease name (a row in ``kcons_lease_tokens``
    updated while holding the lock).
    """

    def __init__(self, dsn: str, *, connect_timeout_s: float = 5.0, application_name: str = "kcons-lease") -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._application_name = application_name
        self._conns: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _connect(self, ttl_s: float) -> Any:
        import psycopg

        ttl_ms = max(1000, int(ttl_s * 1000))
        return psycopg.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=max(1, int(self._connect_timeout_s)),
            application_name=self._application_name,
            options=f"-c idle_session_timeout={ttl_ms} -c idle_in_transaction_session_timeout={ttl_ms}",
        )

    def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the advisory lock for ``name`` if it is free and return a lease with a new token."""
        import psycopg

        key = (name, holder)
        with self._lock:
            old = self._conns.pop(key, None)
        if old is not None:
            old.close()
        try:
            conn = self._connect(ttl_s)
        except psycopg.OperationalError as exc:
            log.warning("lease %s: cannot connect to %s: %s", name, redact(self._dsn), type(exc).__name__)
            return None
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (advisory_key(name),)).fetchone()
            if not row or not row[0]:
                conn.close()
                return None
            with conn.transaction():
                conn.execute(_TOKENS_DDL)
                got = conn.execute(
                    "INSERT INTO kcons_lease_tokens (name, token, holder) VALUES (%s, 1, %s) "
                    "ON CONFLICT (name) DO UPDATE SET token = kcons_lease_tokens.token + 1, "
                    "holder = EXCLUDED.holder, granted_at = now() RETURNING token",
                    (name, holder),
                ).fetchone()
            assert got is not None
            token = int(got[0])
        except psycopg.Error as exc:
            log.warning("lease %s: acquiring failed: %s", name, type(exc).__name__)
            conn.close()
            return None
        with self._lock:
            self._conns[key] = conn
        log.info("lease %s granted to %s with token %d", name, holder, token)
        return Lease(name=name, holder=holder, token=token, expires_at=time.monotonic() + ttl_s)

    def renew(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Prove the holding session is alive and still holds the lock; None when it was lost."""
        import psycopg

        started = time.monotonic()
        with self._lock:
            conn = self._conns.get((lease.name, lease.holder))
        if conn is None or conn.closed:
            return None
        try:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0)",
                (advisory_key(lease.name),),
            ).fetchone()
        except psycopg.Error as exc:
            log.warning("lease %s: renewal failed (%s): leadership lost", lease.name, type(exc).__name__)
            self._drop(lease)
            return None
        if not row or int(row[0]) == 0:
            self._drop(lease)
            return None
        # The lease lasts ttl from the moment the renewal was *sent*: the server cannot have ended
        # the session earlier than ttl after this query.
        return Lease(name=lease.name, holder=lease.holder, token=lease.token, expires_at=started + ttl_s)

    def release(self, lease: Lease) -> None:
        """Unlock and close the holding session (closing alone would free the lock too)."""
        with self._lock:
            conn = self._conns.pop((lease.name, lease.holder), None)
        if conn is None:
            return
        try:
            if not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (advisory_key(lease.name),))
        except Exception as exc:  # releasing is best effort: closing the session frees the lock anyway
            log.debug("lease %s: unlock failed: %s", lease.name, type(exc).__name__)
        finally:
            conn.close()

    def _drop(self, lease: Lease) -> None:
        with self._lock:
            conn = self._conns.pop((lease.name, lease.holder), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close every held session (their locks are freed)."""
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for conn in conns:
            conn.close()
