"""The outbox relay's RabbitMQ sink on real PostgreSQL and RabbitMQ: confirmed, in order per aggregate, nothing lost."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pika
import psycopg
import pytest

from kcons.envelope import Envelope
from kcons.errors import SinkUnavailableError
from kcons.outbox import OutboxRelay, OutboxRow, RelaySettings, add, install_schema
from kcons.outbox.sinks.rabbitmq import HEADER_TOPIC, declare_hash_queues
from kcons.testing import running, wait_for
from kcons.testing.rabbitmq import RabbitMqServer, drain

pytestmark = [pytest.mark.integration]


def _relay(dsn: str, amqp_url: str, exchange: str, **kw: Any) -> OutboxRelay:
    hooks = {k: kw.pop(k) for k in ("before_commit", "on_published") if k in kw}
    settings = RelaySettings(dsn=dsn, kafka=None, sink="rabbitmq", amqp_url=amqp_url, amqp_exchange=exchange,
                             poll_interval_s=0.2, **kw)  # fmt: skip
    return OutboxRelay.for_postgres(settings, **hooks)


@pytest.fixture
def outbox_db(fresh_database: Callable[[], str]) -> str:
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
    return dsn


@pytest.fixture
def topology(amqp_url: str) -> Iterator[tuple[str, list[str]]]:
    """A fresh consistent-hash exchange with 4 quorum queues bound to it (deleted afterwards)."""
    tag = uuid.uuid4().hex[:8]
    exchange, queues = f"outbox-{tag}", [f"outbox-{tag}-{i}" for i in range(4)]
    declare_hash_queues(amqp_url, exchange, queues)
    yield exchange, queues
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    for q in queues:
        ch.queue_delete(q)
    ch.exchange_delete(exchange)
    conn.close()


def _write(dsn: str, aggregates: int, versions: int, first: int = 1) -> list[Envelope]:
    events = [
        Envelope.of("AccountChanged", "account", f"acc-{a}", {"v": v}, version=v)
        for v in range(first, first + versions)
        for a in range(aggregates)
    ]
    with psycopg.connect(dsn) as conn:
        for i in range(0, len(events), 25):  # several transactions
            for ev in events[i : i + 25]:
                add(conn, ev)
            conn.commit()
    return events


def _drain(amqp_url: str, queues: Sequence[str]) -> dict[str, list[tuple[Any, Any]]]:
    """Every message in each queue, in queue order: (properties, body)."""
    return {q: drain(amqp_url, q) for q in queues}


def _depth(amqp_url: str, queues: Sequence[str]) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    total = sum(ch.queue_declare(q, passive=True).method.message_count for q in queues)
    conn.close()
    return int(total)


def _unpublished(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM kcons_outbox WHERE published_at IS NULL").fetchone()
        assert row is not None
        return int(row[0])


def _check_order(drained: dict[str, list[tuple[Any, Any]]], events: list[Envelope], *, one_queue: bool = True) -> None:
    """Each aggregate lives in one queue (unless ``one_queue`` is false: then per queue), its versions
    in order (first copies), every event present."""
    home: dict[str, str] = {}
    seen: dict[tuple[str, str], list[int]] = {}
    ids: set[str] = set()
    for queue, messages in drained.items():
        for props, _body in messages:
            headers = props.headers
            assert props.delivery_mode == 2
            assert props.message_id == headers["kcons-id"]
            assert headers[HEADER_TOPIC] == "outbox.event.account"
            agg = headers["kcons-aggregate-id"]
            assert not one_queue or home.setdefault(agg, queue) == queue, f"{agg} split over queues"
            if props.message_id not in ids:
                ids.add(props.message_id)
                seen.setdefault((queue, agg), []).append(int(headers["kcons-version"]))
    assert ids == {e.id for e in events}
    for agg, versions in seen.items():
        assert versions == sorted(versions), f"{agg} out of order: {versions}"


def test_rows_are_confirmed_before_marked_and_arrive_in_order_per_aggregate(
    outbox_db: str, amqp_url: str, topology: tuple[str, list[str]]
) -> None:
    exchange, queues = topology
    events = _write(outbox_db, aggregates=10, versions=20)
    at_commit: list[tuple[int, int, int]] = []

    def before_commit(rows: Sequence[OutboxRow]) -> None:  # every confirm is in; nothing marked yet
        at_commit.append((len(rows), _depth(amqp_url, queues), _unpublished(outbox_db)))

    errors: list[BaseException] = []
    with running(_relay(outbox_db, amqp_url, exchange, before_commit=before_commit), errors) as relay:
        wait_for("every row to be published", lambda: relay.published >= len(events) or bool(errors))
    assert not errors, errors
    first_batch, depth, unpublished = at_commit[0]
    assert depth == first_batch and unpublished == len(events)
    assert _unpublished(outbox_db) == 0
    drained = _drain(amqp_url, queues)
    assert sum(len(m) for m in drained.values()) == len(events)
    assert sum(1 for m in drained.values() if m) > 1  # the aggregates spread over the queues
    _check_order(drained, events)


def test_unroutable_publish_fails_the_batch_and_leaves_the_rows_unpublished(outbox_db: str, amqp_url: str) -> None:
    lonely = f"unbound-{uuid.uuid4().hex[:8]}"  # an exchange with no queue bound: every publish is returned
    events = _write(outbox_db, aggregates=3, versions=2)
    errors: list[BaseException] = []
    with running(_relay(outbox_db, amqp_url, lonely, retry_max_s=1.0), errors) as relay:
        wait_for("the relay to give up", lambda: bool(errors), timeout=30)
    assert isinstance(errors[0], SinkUnavailableError) and "unroutable" in str(errors[0])
    assert relay.published == 0 and _unpublished(outbox_db) == len(events)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().exchange_delete(lonely)
    conn.close()


def test_relay_restart_loses_nothing(outbox_db: str, amqp_url: str, topology: tuple[str, list[str]]) -> None:
    exchange, queues = topology
    events = _write(outbox_db, aggregates=5, versions=30)
    errors: list[BaseException] = []
    relays: list[OutboxRelay] = []
    first = _relay(outbox_db, amqp_url, exchange, batch_size=20, on_published=lambda rows, _t: relays[0].stop())
    relays.append(first)
    with running(first, errors):
        wait_for("the first relay to stop after one batch", lambda: first.stopping)
    assert not errors, errors
    assert 0 < _unpublished(outbox_db) < len(events)  # stopped mid-way
    with running(_relay(outbox_db, amqp_url, exchange, batch_size=20), errors):
        wait_for("the rest to be published", lambda: _unpublished(outbox_db) == 0 or bool(errors))
    assert not errors, errors
    drained = _drain(amqp_url, queues)
    assert sum(len(m) for m in drained.values()) >= len(events)  # at-least-once: copies allowed, no gaps
    _check_order(drained, events)


@pytest.fixture(scope="module")
def own_node() -> Iterator[RabbitMqServer]:
    """A RabbitMQ node of this module alone: its tests kill it."""
    with RabbitMqServer() as server:
        yield server


def test_relay_waits_out_a_broker_restart_and_resends_what_was_not_confirmed(
    outbox_db: str, own_node: RabbitMqServer
) -> None:
    url = own_node.url
    tag = uuid.uuid4().hex[:8]
    exchange, queues = f"restart-{tag}", [f"restart-{tag}-{i}" for i in range(3)]
    declare_hash_queues(url, exchange, queues)  # quorum queues: confirmed messages survive the kill
    # Settle them with a clean restart, as long-lived queues are: on RabbitMQ 3.10 a quorum queue
    # declared moments before a kill -9 can come back empty and never confirm again.
    own_node.stop()
    own_node.start()
    before = _write(outbox_db, aggregates=4, versions=10)
    errors: list[BaseException] = []
    # A retry bound shorter than the outage (3 s + the restart): only an unbounded reconnect survives it.
    relay = _relay(outbox_db, url, exchange, batch_size=10, retry_max_s=3.0)
    with running(relay, errors):
        wait_for("the first rows to be published", lambda: _unpublished(outbox_db) == 0 or bool(errors))
        own_node.kill()
        during = _write(outbox_db, aggregates=4, versions=5, first=11)
        time.sleep(3.0)
        assert not errors, errors
        assert _unpublished(outbox_db) == len(during)  # nothing confirmed, nothing marked
        own_node.start()
        wait_for("the rows written during the outage", lambda: _unpublished(outbox_db) == 0 or bool(errors), 120)
    assert not errors, errors
    # The confirmed rows survived the kill, the rest was sent after it: every id, in order per queue.
    # (The consistent-hash exchange rebuilds its ring when the node restarts and may then route an
    # aggregate to another queue: order holds per queue, not across that move.)
    _check_order(_drain(url, queues), before + during, one_queue=False)


def test_relay_stopped_during_a_broker_outage_returns_without_error(
    outbox_db: str, own_node: RabbitMqServer
) -> None:
    url = own_node.url
    tag = uuid.uuid4().hex[:8]
    declare_hash_queues(url, f"stop-{tag}", [f"stop-{tag}-0"])
    _write(outbox_db, aggregates=2, versions=2)
    own_node.kill()  # the relay only ever sees connections refused
    try:
        errors: list[BaseException] = []
        with running(_relay(outbox_db, url, f"stop-{tag}", retry_max_s=0.5), errors, join_s=15) as relay:
            time.sleep(2.0)
        assert not errors, errors
        assert relay.published == 0 and _unpublished(outbox_db) == 4
    finally:
        own_node.start()
