"""`kcons audit topic` on real Kafka: planted duplicates and version gaps are reported (exit 1), a clean topic is not.

The auditor reads with assign(): no consumer group appears on the cluster and no offset is committed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from click.testing import CliRunner
from confluent_kafka import Producer

from kcons.audit import RangeSpec, audit_topic
from kcons.cli import main
from kcons.envelope import Envelope
from kcons.kafka.producer import IdempotentProducer, TransactionalProducer


def _events(aggregates: int, versions: int) -> list[Envelope]:
    return [
        Envelope.of("changed", "order", f"o{a}", {"v": v}, version=v)
        for v in range(1, versions + 1)
        for a in range(aggregates)
    ]


def _send_kcons(bootstrap: str, topic: str, events: list[Envelope]) -> None:
    producer = IdempotentProducer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    futures = [producer.send(topic, e) for e in events]
    producer.flush(30)
    for f in futures:
        f.result(30)
    producer.close()


def _send_raw(bootstrap: str, topic: str, events: list[Envelope]) -> None:
    """Behind kcons's back: a plain producer writing the same records (as a careless re-publisher would)."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for e in events:
        producer.produce(topic, e.payload, e.key, headers=e.headers())
    assert producer.flush(30) == 0


def _cli(bootstrap: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["audit", "topic", "--bootstrap", bootstrap, "--json", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output.strip().splitlines()[-1])


def test_a_clean_topic_written_by_kcons_reports_no_violation(
    kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str], kcons_kafka_admin: Any
) -> None:
    topic = kcons_unique_topic(partitions=3)
    _send_kcons(kcons_kafka_bootstrap, topic, _events(20, 10))
    groups_before = {g.group_id for g in kcons_kafka_admin.list_consumer_groups().result(30).valid}
    code, report = _cli(kcons_kafka_bootstrap, "--topic", topic, "--versions", "strict")
    assert code == 0, report
    assert report["ok"] and report["records"] == 200 and report["distinct_ids"] == 200
    assert report["duplicates"] == report["gaps"] == report["regressions"] == report["split_aggregates"] == 0
    assert sum(p["records"] for p in report["partitions"].values()) == 200
    groups_after = {g.group_id for g in kcons_kafka_admin.list_consumer_groups().result(30).valid}
    assert {g for g in groups_after - groups_before if g.startswith("kcons-audit")} == set()


def test_a_duplicate_written_by_a_raw_producer_is_reported_with_its_offsets(
    kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic(partitions=2)
    events = _events(5, 4)
    _send_kcons(kcons_kafka_bootstrap, topic, events)
    _send_raw(kcons_kafka_bootstrap, topic, [events[7]])
    code, report = _cli(kcons_kafka_bootstrap, "--topic", topic)
    assert code == 1
    assert report["duplicates"] == 1 and report["records"] == 21 and report["distinct_ids"] == 20
    (dup,) = report["duplicate_list"]
    assert dup["id"] == events[7].id and len(dup["copies"]) == 1
    assert dup["copies"][0][0] == dup["first"][0]  # same key, same partition
    assert dup["copies"][0][1] > dup["first"][1]


def test_a_version_gap_fails_strict_and_a_regression_fails_monotonic(
    kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic(partitions=1)
    planted = [Envelope.of("changed", "order", "o1", {}, version=v) for v in (1, 2, 4, 5)]
    planted += [Envelope.of("changed", "order", "o2", {}, version=v) for v in (1, 2, 3, 2)]
    _send_raw(kcons_kafka_bootstrap, topic, planted)
    code, strict = _cli(kcons_kafka_bootstrap, "--topic", topic, "--versions", "strict")
    assert code == 1 and strict["gaps"] == 1 and strict["regressions"] == 1
    kinds = {(v["kind"], v["aggregate"], v["previous"], v["version"]) for v in strict["version_list"]}
    assert kinds == {("gap", "order/o1", 2, 4), ("regression", "order/o2", 3, 2)}
    code, monotonic = _cli(kcons_kafka_bootstrap, "--topic", topic)
    assert code == 1 and monotonic["gaps"] == 0 and monotonic["regressions"] == 1
    code, off = _cli(kcons_kafka_bootstrap, "--topic", topic, "--versions", "off")
    assert code == 0 and off["ok"]


def test_an_aborted_duplicate_is_invisible_to_read_committed_and_reported_by_read_uncommitted(
    kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic(partitions=1)
    events = _events(3, 3)
    _send_kcons(kcons_kafka_bootstrap, topic, events)
    producer = TransactionalProducer(
        {"bootstrap.servers": kcons_kafka_bootstrap, "transactional.id": f"audit-{uuid.uuid4().hex[:8]}"}
    )
    producer.begin_transaction()
    producer.send(topic, events[0])
    producer.flush(30)
    producer.abort_transaction()
    producer.close()
    code, committed = _cli(kcons_kafka_bootstrap, "--topic", topic, "--isolation", "read_committed")
    assert code == 0 and committed["records"] == 9
    code, uncommitted = _cli(kcons_kafka_bootstrap, "--topic", topic, "--isolation", "read_uncommitted")
    assert code == 1 and uncommitted["duplicates"] == 1


def test_a_range_by_offsets_reads_only_that_range(
    kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic(partitions=1)
    events = _events(1, 10)
    _send_raw(kcons_kafka_bootstrap, topic, [*events, events[2]])  # the duplicate sits at offset 10
    report = audit_topic({"bootstrap.servers": kcons_kafka_bootstrap}, topic, RangeSpec(from_offset=3, to_offset=8))
    assert report.ok and report.records == 5 and report.ranges[0]["start"] == 3 and report.ranges[0]["end"] == 8
    code, summary = _cli(kcons_kafka_bootstrap, "--topic", topic, "--from-offset", "0")
    assert code == 1 and summary["duplicates"] == 1


def test_the_human_summary_names_the_violation(
    kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic(partitions=1)
    events = _events(2, 2)
    _send_raw(kcons_kafka_bootstrap, topic, [*events, events[1]])
    result = CliRunner().invoke(main, ["audit", "topic", "--bootstrap", kcons_kafka_bootstrap, "--topic", topic])
    assert result.exit_code == 1
    assert f"DUPLICATE {events[1].id}" in result.output and "FAILED" in result.output


def test_an_unknown_topic_is_a_usage_error(kcons_kafka_bootstrap: str) -> None:
    result = CliRunner().invoke(
        main, ["audit", "topic", "--bootstrap", kcons_kafka_bootstrap, "--topic", f"missing-{uuid.uuid4().hex[:8]}"]
    )
    assert result.exit_code == 2 and "--topic" in result.output


def test_max_rate_caps_the_read(kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]) -> None:
    topic = kcons_unique_topic(partitions=1)
    _send_raw(kcons_kafka_bootstrap, topic, _events(1, 300))
    report = audit_topic({"bootstrap.servers": kcons_kafka_bootstrap}, topic, batch_size=50, max_rate=200.0)
    assert report.ok and report.records == 300
    assert report.seconds >= 1.2  # 300 records at 200/s: 1.5 s, less the first batch's share
