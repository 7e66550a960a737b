"""RocketTransactionalOutbox on real PostgreSQL and RocketMQ 5: the message commits iff the database transaction does.

The crash cases run the publisher in a child process that dies at the chosen step; the broker's
check-back then reaches the test's own outbox (a producer of the same topic), which answers from
the outbox table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from kcons.envelope import Envelope
from kcons.outbox import install_schema
from kcons.outbox.rocketmq import CheckAnswer, RocketTransactionalOutbox
from kcons.testing import wait_for
from kcons.testing.rocketmq import drain

pytestmark = [pytest.mark.integration]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def outbox_db(fresh_database: Callable[[], str]) -> str:
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
        conn.execute("CREATE TABLE account (id text PRIMARY KEY, balance bigint NOT NULL)")
    return dsn


@pytest.fixture
def txn_topic(kcons_rocketmq: Any) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return kcons_rocketmq.create_topic(f"txn-{tag}", "TRANSACTION"), kcons_rocketmq.create_group(f"g-{tag}", fifo=False)


def _rows(dsn: str) -> list[tuple[str, bool]]:
    with psycopg.connect(dsn) as conn:
        return [(str(r[0]), r[1] is not None) for r in conn.execute("SELECT id, published_at FROM kcons_outbox")]


def _event(n: int = 1) -> Envelope:
    return Envelope.of("AccountOpened", "account", f"acc-{n}", {"n": n}, version=1)


def test_committed_transaction_delivers_its_event_and_keeps_its_row_as_published(
    outbox_db: str, kcons_rocketmq: Any, txn_topic: tuple[str, str]
) -> None:
    topic, group = txn_topic
    event = _event()
    outbox = RocketTransactionalOutbox(kcons_rocketmq.endpoints, outbox_db, [topic])
    with outbox, outbox.transaction(event) as conn:
        conn.execute("INSERT INTO account VALUES ('acc-1', 10)")
    got = drain(kcons_rocketmq.endpoints, topic, group, want=1, idle_s=1)
    assert [m.properties["kcons-id"] for m in got] == [event.id]
    assert got[0].keys == {"acc-1"} and got[0].body == event.payload
    assert _rows(outbox_db) == [(event.id, True)]  # marked published: a relay never sends it again


def test_failed_business_transaction_rolls_back_its_half_message(
    outbox_db: str, kcons_rocketmq: Any, txn_topic: tuple[str, str]
) -> None:
    topic, group = txn_topic
    with RocketTransactionalOutbox(kcons_rocketmq.endpoints, outbox_db, [topic]) as outbox:
        with pytest.raises(psycopg.errors.UniqueViolation), outbox.transaction(_event(1)) as conn:
            conn.execute("INSERT INTO account VALUES ('acc-1', 10)")
            conn.execute("INSERT INTO account VALUES ('acc-1', 20)")  # the business write fails
        ok = _event(2)
        with outbox.transaction(ok) as conn:
            conn.execute("INSERT INTO account VALUES ('acc-2', 5)")
    got = drain(kcons_rocketmq.endpoints, topic, group, want=1, idle_s=4)
    assert [m.properties["kcons-id"] for m in got] == [ok.id]
    assert _rows(outbox_db) == [(ok.id, True)]


def _child(endpoints: str, dsn: str, topic: str, event: Envelope, die: str) -> None:
    """Publish ``event`` in a child process that exits hard at ``die``: 'after_db_commit' or 'in_transaction'."""
    code = textwrap.dedent(f"""
        import dataclasses
        import os
        from kcons.envelope import Envelope
        from kcons.outbox.rocketmq import RocketTransactionalOutbox
        event = Envelope.of("AccountOpened", "account", {event.aggregate_id!r}, {{"n": 1}}, version=1)
        event = dataclasses.replace(event, id={event.id!r})
        hook = (lambda: os._exit(0)) if {die!r} == "after_db_commit" else None
        outbox = RocketTransactionalOutbox({endpoints!r}, {dsn!r}, [{topic!r}], before_message_commit=hook).start()
        with outbox.transaction(event) as conn:
            conn.execute("INSERT INTO account VALUES (%s, 1)", ({event.aggregate_id!r},))
            if {die!r} == "in_transaction":
                os._exit(0)
        os._exit(3)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(("die", "answer"), [("after_db_commit", CheckAnswer.COMMIT),
                                             ("in_transaction", CheckAnswer.ROLLBACK)])  # fmt: skip
def test_check_back_answers_from_the_outbox_table_after_the_publisher_died(
    outbox_db: str, kcons_rocketmq: Any, txn_topic: tuple[str, str], die: str, answer: CheckAnswer
) -> None:
    topic, group = txn_topic
    event = _event(7)
    with RocketTransactionalOutbox(kcons_rocketmq.endpoints, outbox_db, [topic]) as checker:
        _child(kcons_rocketmq.endpoints, outbox_db, topic, event, die)
        wait_for("the broker's check-back", lambda: any(e == event.id for e, _a in checker.answers), timeout=90)
        assert (event.id, answer) in checker.answers
        got = drain(kcons_rocketmq.endpoints, topic, group, want=1 if answer is CheckAnswer.COMMIT else 0,
                    idle_s=4, timeout=30)  # fmt: skip
    if answer is CheckAnswer.COMMIT:  # at least once: a half message checked twice can be committed twice
        assert {m.properties["kcons-id"] for m in got} == {event.id}
        assert _rows(outbox_db) == [(event.id, True)]
    else:
        assert got == []
        assert _rows(outbox_db) == []


def test_check_back_waits_for_an_open_transaction_holding_the_event_id(outbox_db: str, kcons_rocketmq: Any) -> None:
    outbox = RocketTransactionalOutbox(kcons_rocketmq.endpoints, outbox_db, ["unused"], check_lock_timeout_s=0.5)
    event = _event(3)
    with psycopg.connect(outbox_db) as writer:
        writer.execute(
            "INSERT INTO kcons_outbox (id, aggregatetype, aggregateid, type, payload) VALUES (%s, 'a', 'b', 'c', '')",
            (event.id,),
        )
        started = time.monotonic()
        assert outbox.check(event.id) is CheckAnswer.UNKNOWN  # still open: ask again later
        assert time.monotonic() - started >= 0.4
        writer.commit()
    assert outbox.check(event.id) is CheckAnswer.COMMIT
    assert outbox.check(str(uuid.uuid4())) is CheckAnswer.ROLLBACK
    outbox.close()
    assert len(_rows(outbox_db)) == 1  # the trial inserts never stay
