"""Audit the guarantees where they run: a topic (duplicates, version order), an outbox table, a cache.

:mod:`kcons.audit.topic` checks a topic, :mod:`kcons.audit.outbox` an outbox table against its
topic, :mod:`kcons.audit.cache` samples a cache against its source. Every auditor is read-only:
the topic auditor reads with ``assign`` (no consumer group joined, moved or committed to), the
outbox auditor only SELECTs, the cache sampler only SCANs and GETs.
"""

from __future__ import annotations

from kcons.audit.cache import CacheAuditor, CacheAuditReport, SourceVersion, StaleEntry, sql_source
from kcons.audit.outbox import OutboxAuditRow, OutboxReport, audit_outbox, compare_outbox, read_outbox_rows
from kcons.audit.topic import (
    AggregateSplit,
    Duplicate,
    PartitionStats,
    TopicAuditor,
    TopicReport,
    VersionCheck,
    VersionViolation,
    audit_topic,
)
from kcons.kafka.reader import RangeSpec

__all__ = [
    "AggregateSplit",
    "CacheAuditReport",
    "CacheAuditor",
    "Duplicate",
    "OutboxAuditRow",
    "OutboxReport",
    "PartitionStats",
    "RangeSpec",
    "SourceVersion",
    "StaleEntry",
    "TopicAuditor",
    "TopicReport",
    "VersionCheck",
    "VersionViolation",
    "audit_outbox",
    "audit_topic",
    "compare_outbox",
    "read_outbox_rows",
    "sql_source",
]
