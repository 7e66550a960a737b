"""The advisory-lock lease backend: one holder, increasing tokens, freed when the holder dies or stops renewing."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest

from kcons.adapters.postgres import AdvisoryLockLeaseBackend
from kcons.lease import LeaseBackend

pytestmark = pytest.mark.integration


def test_one_holder_at_a_time_with_increasing_tokens(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    a, b = AdvisoryLockLeaseBackend(dsn), AdvisoryLockLeaseBackend(dsn)
    assert isinstance(a, LeaseBackend)
    try:
        first = a.acquire("outbox:x", "a", 10.0)
        assert first is not None
        assert b.acquire("outbox:x", "b", 10.0) is None
        assert b.acquire("outbox:other", "b", 10.0) is not None  # names are independent
        renewed = a.renew(first, 10.0)
        assert renewed is not None and renewed.token == first.token
        a.release(first)
        second = b.acquire("outbox:x", "b", 10.0)
        assert second is not None and second.token > first.token
        assert a.renew(first, 10.0) is None  # a released lease cannot be renewed
    finally:
        a.close()
        b.close()


def test_lease_is_lost_when_the_holding_session_is_terminated(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    a, b = AdvisoryLockLeaseBackend(dsn, application_name="lease-a"), AdvisoryLockLeaseBackend(dsn)
    try:
        lease = a.acquire("outbox:x", "a", 10.0)
        assert lease is not None
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'lease-a'")
        assert a.renew(lease, 10.0) is None
        taken = b.acquire("outbox:x", "b", 10.0)
        assert taken is not None and taken.token > lease.token
    finally:
        a.close()
        b.close()


def test_holder_that_stops_renewing_loses_the_lease_to_the_server_timeout(fresh_database: Callable[[], str]) -> None:
    """A paused holder (no renewals) is cut off by idle_session_timeout: no client clock involved."""
    dsn = fresh_database()
    a, b = AdvisoryLockLeaseBackend(dsn), AdvisoryLockLeaseBackend(dsn)
    try:
        lease = a.acquire("outbox:x", "a", 1.0)
        assert lease is not None
        taken = None
        deadline = time.monotonic() + 30
        while taken is None and time.monotonic() < deadline:
            taken = b.acquire("outbox:x", "b", 10.0)
            time.sleep(0.2)
        assert taken is not None and taken.token > lease.token
        assert a.renew(lease, 1.0) is None
    finally:
        a.close()
        b.close()
