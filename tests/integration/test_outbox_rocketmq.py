"""The outbox relay's RocketMQ sink on real PostgreSQL and RocketMQ 5: acknowledged, in order per aggregate."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest

from kcons.envelope import Envelope
from kcons.outbox import OutboxRelay, OutboxRow, RelaySettings, add, install_schema
from kcons.outbox.sinks.rocketmq import rocketmq_topic
from kcons.testing import running, wait_for
from kcons.testing.rocketmq import drain

pytestmark = [pytest.mark.integration]


def _relay(dsn: str, endpoints: str, topic: str, **kw: Any) -> OutboxRelay:
    hooks = {k: kw.pop(k) for k in ("before_commit", "on_published") if k in kw}
    settings = RelaySettings(dsn=dsn, kafka=None, sink="rocketmq", rocketmq_endpoints=endpoints, topic=topic,
                             poll_interval_s=0.2, **kw)  # fmt: skip
    return OutboxRelay.for_postgres(settings, **hooks)


@pytest.fixture
def outbox_db(fresh_database: Callable[[], str]) -> str:
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
    return dsn


@pytest.fixture
def fifo_topic(kcons_rocketmq: Any) -> tuple[str, str]:
    """A new FIFO topic (4 queues) and a new FIFO consumer group for it."""
    tag = uuid.uuid4().hex[:8]
    return kcons_rocketmq.create_topic(f"outbox-{tag}", "FIFO"), kcons_rocketmq.create_group(f"check-{tag}")


def _write(dsn: str, aggregates: int, versions: int, *, topic: str | None = None) -> list[Envelope]:
    events = [
        Envelope.of("AccountChanged", "account", f"acc-{a}", {"v": v}, version=v)
        for v in range(1, versions + 1)
        for a in range(aggregates)
    ]
    with psycopg.connect(dsn) as conn:
        for i in range(0, len(events), 25):  # several transactions
            for ev in events[i : i + 25]:
                add(conn, ev, topic=topic)
            conn.commit()
    return events


def _unpublished(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM kcons_outbox WHERE published_at IS NULL").fetchone()
        assert row is not None
        return int(row[0])


def _check_order(messages: Sequence[Any], events: Sequence[Envelope]) -> None:
    """Every event arrived, each aggregate's versions in order (first copies), key and group = aggregate."""
    seen: dict[str, list[int]] = {}
    ids: set[str] = set()
    for msg in messages:
        props = msg.properties
        agg = props["kcons-aggregate-id"]
        assert msg.keys == {agg} and msg.message_group == agg
        if props["kcons-id"] not in ids:
            ids.add(props["kcons-id"])
            seen.setdefault(agg, []).append(int(props["kcons-version"]))
    assert ids == {e.id for e in events}
    for agg, versions in seen.items():
        assert versions == sorted(versions), f"{agg} out of order: {versions}"


def test_rows_are_acknowledged_before_marked_and_arrive_in_order_per_aggregate(
    outbox_db: str, kcons_rocketmq: Any, fifo_topic: tuple[str, str]
) -> None:
    topic, group = fifo_topic
    events = _write(outbox_db, aggregates=10, versions=20)
    at_commit: list[tuple[int, int]] = []

    def before_commit(rows: Sequence[OutboxRow]) -> None:  # every acknowledgement is in; nothing marked yet
        at_commit.append((len(rows), _unpublished(outbox_db)))

    errors: list[BaseException] = []
    relay = _relay(outbox_db, kcons_rocketmq.endpoints, topic, batch_size=50, before_commit=before_commit)
    with running(relay, errors):
        wait_for("every row to be published", lambda: relay.published >= len(events) or bool(errors))
    assert not errors, errors
    assert at_commit[0] == (50, len(events))
    assert _unpublished(outbox_db) == 0
    messages = drain(kcons_rocketmq.endpoints, topic, group, want=len(events))
    assert len(messages) == len(events)
    _check_order(messages, events)


def test_row_topics_are_mapped_to_rocketmq_names_and_an_impossible_one_is_dead_lettered(
    outbox_db: str, kcons_rocketmq: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    topic = kcons_rocketmq.create_topic(rocketmq_topic(f"orders.{tag}"), "FIFO")
    group = kcons_rocketmq.create_group(f"check-{tag}")
    good = _write(outbox_db, aggregates=2, versions=3, topic=f"orders.{tag}")
    bad = Envelope.of("AccountChanged", "account", "acc-x", {"v": 1}, version=1)
    with psycopg.connect(outbox_db) as conn:
        add(conn, bad, topic="t" * 200)  # a Kafka topic name, too long for RocketMQ
    errors: list[BaseException] = []
    settings = RelaySettings(dsn=outbox_db, kafka=None, sink="rocketmq", rocketmq_endpoints=kcons_rocketmq.endpoints,
                             poll_interval_s=0.2)  # fmt: skip
    relay = OutboxRelay.for_postgres(settings)  # no topic override: each row's own topic, mapped
    with running(relay, errors):
        wait_for("the good rows to be published", lambda: relay.published >= len(good) or bool(errors))
    assert not errors, errors
    with psycopg.connect(outbox_db) as conn:
        dead = conn.execute("SELECT aggregateid, reason FROM kcons_outbox_dead").fetchall()
    assert len(dead) == 1 and dead[0][0] == "acc-x" and "RocketMQ" in dead[0][1]
    _check_order(drain(kcons_rocketmq.endpoints, topic, group, want=len(good)), good)


def test_relay_keeps_reconnecting_to_an_unreachable_proxy_and_stops_cleanly(outbox_db: str) -> None:
    events = _write(outbox_db, aggregates=2, versions=2)
    errors: list[BaseException] = []
    # A retry bound far shorter than the wait: only the unbounded reconnect of a SinkConnectionError survives it.
    with running(_relay(outbox_db, "127.0.0.1:1", "nowhere", retry_max_s=0.5), errors, join_s=15) as relay:
        time.sleep(3.0)
    assert not errors, errors
    assert relay.published == 0 and _unpublished(outbox_db) == len(events)
