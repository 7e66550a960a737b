"""The outbox comparison (pure) and the SQLite row reader."""

from __future__ import annotations

import sqlite3
import time

from kcons.audit.outbox import OutboxAuditRow, compare_outbox, read_outbox_rows, row_topic
from kcons.envelope import Envelope
from kcons.outbox import add, install_schema


def row(i: int, version: int | None, *, published: bool = True, age: float = 0.0, agg: str = "a") -> OutboxAuditRow:
    return OutboxAuditRow(f"id{i}", "account", agg, version, i, age, published, None)


def test_clean_rows_and_topic_report_nothing() -> None:
    rows = [row(i, i) for i in range(1, 5)]
    report = compare_outbox(rows, {f"id{i}": 1 for i in range(1, 5)}, topic="t", versions="strict")
    assert report.ok and report.published_rows == 4


def test_each_kind_of_violation_is_counted() -> None:
    rows = [row(1, 1), row(2, 2), row(4, 4), row(5, 3, agg="a"), row(6, 1, published=False, age=120, agg="b"),
            row(7, 2, published=False, age=1, agg="b")]  # fmt: skip
    copies = {"id1": 3, "id2": 2, "id4": 1, "other": 1}  # id5 marked published, not on the topic
    report = compare_outbox(rows, copies, topic="t", versions="strict", grace_s=60, max_copies=2)
    assert (report.stuck, report.in_flight, report.missing, report.excess_copies, report.republished) == (1, 1, 1, 1, 1)
    assert (report.gaps, report.regressions, report.not_in_table) == (1, 1, 1)
    assert report.violations == 5 and not report.ok


def test_routing_follows_the_relay_rule() -> None:
    r = row(1, 1)
    assert row_topic(r, None) == "outbox.event.account"
    assert row_topic(r, "fixed") == "fixed"


def test_sqlite_rows_are_read_in_position_order_with_their_age() -> None:
    conn = sqlite3.connect(":memory:")
    install_schema(conn)
    for v in (1, 2):
        add(conn, Envelope.of("changed", "account", "a", {}, version=v), topic="t")
    conn.commit()
    conn.execute("UPDATE kcons_outbox SET published_at = created_at WHERE version = 1")
    rows = read_outbox_rows(conn)
    assert [(r.version, r.published, r.topic) for r in rows] == [(1, True, "t"), (2, False, "t")]
    assert all(0 <= r.age_s < 60 for r in rows)
    assert abs(rows[0].created_ms - time.time() * 1000) < 60_000
