"""The outbox auditor: the outbox table (retention on: published rows kept, marked) against the topic.

What it reports, for the rows routed to the audited topic:

- **stuck**: committed rows not published after ``grace_s`` seconds (with their age). Rows younger
  than that are in flight and only counted.
- **missing**: rows marked published whose id is not on the topic (lost after the relay marked
  them, or the topic's retention already dropped them: audit a range the topic still holds).
- **excess copies**: ids on the topic more than ``max_copies`` times. At-least-once publishing
  re-publishes a batch when a relay crashes (or loses its lease, or its database connection)
  after Kafka acknowledged the batch and before the rows were marked; each such failure puts each
  row of its one in-flight batch on the topic at most once more. ``max_copies=2`` allows one such
  failure per row; raise it to ``1 + failures`` when several relay failures are known to have hit
  the same in-flight rows. Ids with 2..max_copies copies are counted as ``republished``.
- **version gaps / regressions** per aggregate in the table, in position (commit) order: a row
  deleted from the outbox before it was published leaves a gap in the aggregate's versions, which
  only ``versions="strict"`` can tell from a writer that skips versions (see
  :mod:`kcons.audit.topic` for the version promise); ``monotonic`` reports regressions only.

Rows of the table are read with one SELECT (nothing is written); the topic is read with
:func:`kcons.audit.topic.audit_topic`'s reader (assign, no group, no commits), from the oldest
row's insert time (the relay stamps each record with it) minus ``slack_s``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kcons.audit.topic import TopicAuditor, VersionCheck
from kcons.errors import ConfigError, TimeoutExceededError
from kcons.kafka.reader import RangeReader, RangeSpec
from kcons.outbox.rows import DEBEZIUM_TOPIC_PREFIX
from kcons.outbox.schema import DEFAULT_TABLE, validate_table

__all__ = ["OutboxAuditRow", "OutboxReport", "audit_outbox", "compare_outbox", "read_outbox_rows"]


@dataclass(frozen=True)
class OutboxAuditRow:
    """The columns of one outbox row the auditor needs."""

    id: str
    aggregatetype: str
    aggregateid: str
    version: int | None
    position: int
    age_s: float
    published: bool
    topic: str | None
    created_ms: int = 0


@dataclass
class OutboxReport:
    """What the outbox auditor found; ``violations`` is what makes ``kcons audit outbox`` fail."""

    topic: str
    rows: int
    published_rows: int
    in_flight: int
    topic_records: int
    stuck: int
    missing: int
    excess_copies: int
    republished: int
    gaps: int
    regressions: int
    not_in_table: int
    max_copies: int
    versions: str
    stuck_list: list[dict[str, Any]] = field(default_factory=list)
    missing_list: list[str] = field(default_factory=list)
    excess_list: list[dict[str, Any]] = field(default_factory=list)
    version_list: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True
    seconds: float = 0.0

    @property
    def violations(self) -> int:
        """Stuck + missing + ids over the copy bound + version gaps and regressions (+1 if the read was incomplete)."""
        return self.stuck + self.missing + self.excess_copies + self.gaps + self.regressions + (not self.complete)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return self.violations == 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["violations"] = self.violations
        out["ok"] = self.ok
        return out


def row_topic(row: OutboxAuditRow, relay_topic: str | None) -> str:
    """The topic the relay publishes ``row`` to (the same rule as :func:`kcons.outbox.rows.to_record`)."""
    return row.topic or relay_topic or DEBEZIUM_TOPIC_PREFIX + row.aggregatetype


def read_outbox_rows(conn: Any, table: str = DEFAULT_TABLE) -> list[OutboxAuditRow]:
    """Every row of the outbox table, in position order (one SELECT; psycopg 3 or sqlite3 connection)."""
    t = validate_table(table)
    if isinstance(conn, sqlite3.Connection):
        sql = (
            "SELECT id, aggregatetype, aggregateid, version, position, "
            "((julianday('now') - 2440587.5) * 86400.0) - created_at, published_at IS NOT NULL, topic, "
            f"CAST(created_at * 1000 AS INTEGER) FROM {t} ORDER BY position"
        )
        raw = conn.execute(sql).fetchall()
    else:
        sql = (
            "SELECT id::text, aggregatetype, aggregateid, version, position, "
            "extract(epoch FROM clock_timestamp() - created_at)::float8, published_at IS NOT NULL, topic, "
            f"(extract(epoch FROM created_at) * 1000)::bigint FROM {t} ORDER BY position"
        )
        with conn.cursor() as cur:
            cur.execute(sql)
            raw = cur.fetchall()
    return [
        OutboxAuditRow(str(r[0]), r[1], r[2], r[3], int(r[4]), float(r[5]), bool(r[6]), r[7], int(r[8] or 0))
        for r in raw
    ]


def compare_outbox(
    rows: Iterable[OutboxAuditRow],
    copies: Mapping[str, int],
    *,
    topic: str,
    topic_records: int = 0,
    grace_s: float = 60.0,
    max_copies: int = 2,
    versions: VersionCheck | str = VersionCheck.MONOTONIC,
    max_listed: int = 100,
) -> OutboxReport:
    """Compare outbox ``rows`` (already filtered to ``topic``) with ``copies`` (id -> times on the topic). Pure."""
    check = VersionCheck(versions)
    if max_copies < 1:
        raise ConfigError("--max-copies", f"must be >= 1, got {max_copies}")
    rows = list(rows)
    report = OutboxReport(
        topic=topic, rows=len(rows), published_rows=0, in_flight=0, topic_records=topic_records, stuck=0, missing=0,
        excess_copies=0, republished=0, gaps=0, regressions=0, not_in_table=0, max_copies=max_copies,
        versions=check.value,
    )  # fmt: skip
    last: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.published:
            report.published_rows += 1
            if row.id not in copies:
                report.missing += 1
                if len(report.missing_list) < max_listed:
                    report.missing_list.append(row.id)
        elif row.age_s > grace_s:
            report.stuck += 1
            if len(report.stuck_list) < max_listed:
                report.stuck_list.append({"id": row.id, "age_s": round(row.age_s, 1), "position": row.position})
        else:
            report.in_flight += 1
        if check is VersionCheck.OFF or row.version is None:
            continue
        key = (row.aggregatetype, row.aggregateid)
        previous = last.get(key)
        if previous is not None:
            kind = None
            if row.version <= previous:
                report.regressions += 1
                kind = "regression"
            elif check is VersionCheck.STRICT and row.version != previous + 1:
                report.gaps += 1
                kind = "gap"
            if kind is not None and len(report.version_list) < max_listed:
                report.version_list.append(
                    {"kind": kind, "aggregate": f"{key[0]}/{key[1]}", "previous": previous, "version": row.version,
                     "position": row.position}
                )  # fmt: skip
            last[key] = max(previous, row.version)
        else:
            last[key] = row.version
    ids = {row.id for row in rows}
    report.not_in_table = sum(1 for i in copies if i not in ids)
    for event_id, n in copies.items():
        if event_id not in ids or n < 2:
            continue
        if n > max_copies:
            report.excess_copies += 1
            if len(report.excess_list) < max_listed:
                report.excess_list.append({"id": event_id, "copies": n})
        else:
            report.republished += 1
    return report


def audit_outbox(
    conn: Any,
    kafka_config: Mapping[str, Any],
    topic: str,
    *,
    table: str = DEFAULT_TABLE,
    relay_topic: str | None = None,
    grace_s: float = 60.0,
    max_copies: int = 2,
    versions: VersionCheck | str = VersionCheck.MONOTONIC,
    isolation: str = "read_committed",
    slack_s: float = 60.0,
    idle_timeout_s: float = 30.0,
    max_listed: int = 100,
) -> OutboxReport:
    """Audit the outbox table behind ``conn`` (psycopg 3 or sqlite3) against ``topic``; read-only.

    Rows are matched to ``topic`` by the relay's routing rule: the row's own topic, else
    ``relay_topic`` (the relay's ``--topic``), else ``outbox.event.<aggregatetype>``.
    """
    started = time.monotonic()
    rows = [r for r in read_outbox_rows(conn, table) if row_topic(r, relay_topic) == topic]
    copies: dict[str, int] = {}
    records = 0
    complete = True
    if rows:
        oldest_ms = min((r.created_ms for r in rows if r.created_ms > 0), default=0)
        spec = RangeSpec(from_time_ms=max(0, oldest_ms - int(slack_s * 1000))) if oldest_ms else RangeSpec()
        auditor = TopicAuditor(topic, versions=VersionCheck.OFF, max_listed=0)
        with RangeReader(kafka_config, topic, spec, isolation=isolation, idle_timeout_s=idle_timeout_s) as reader:
            reader.plan()
            try:
                for batch in reader.batches():
                    auditor.feed(batch)
            except TimeoutExceededError:
                complete = False
        records = auditor.report().records
        copies = {i.decode("utf-8", "replace"): 1 for i in auditor.seen}
        for event_id, extra in auditor.extra_copies.items():
            copies[event_id.decode("utf-8", "replace")] += extra
    report = compare_outbox(
        rows, copies, topic=topic, topic_records=records, grace_s=grace_s, max_copies=max_copies,
        versions=versions, max_listed=max_listed,
    )  # fmt: skip
    report.complete = complete
    report.seconds = round(time.monotonic() - started, 3)
    return report
