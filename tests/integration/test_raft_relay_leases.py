"""The outbox relay taking its leadership from a Raft lease (real Raft processes, PostgreSQL, Kafka)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kcons.adapters.raft import RaftLeaseBackend
from kcons.config import KafkaSettings
from kcons.envelope import Envelope, read_envelope
from kcons.outbox import OutboxRelay, RelaySettings, add, install_schema
from kcons.raft.cluster import LocalRaftCluster

pytestmark = pytest.mark.integration

SECRET = b"relay-lease-secret-0123456789"


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def _running(relay: OutboxRelay) -> Iterator[OutboxRelay]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(60)
        assert not thread.is_alive(), "relay did not stop"
    assert not errors, errors


def test_relays_lead_by_raft_lease_publish_each_event_once_and_hand_over(
    tmp_path: Path,
    fresh_database: Callable[[], str],
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_consumer: Callable[..., Any],
) -> None:
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
    topic = unique_topic(partitions=2)
    with LocalRaftCluster(3, tmp_path, SECRET) as cluster, cluster.client() as ca, cluster.client() as cb:

        def relay(holder: str, client: Any) -> OutboxRelay:
            settings = RelaySettings(
                dsn=dsn, kafka=KafkaSettings(kafka_bootstrap), topic=topic, holder=holder, poll_interval_s=0.3
            )
            return OutboxRelay.for_postgres(settings, leases=RaftLeaseBackend(client))

        a, b = relay("relay-a", ca), relay("relay-b", cb)
        both_led = 0
        stacks = {"relay-a": contextlib.ExitStack(), "relay-b": contextlib.ExitStack()}
        try:
            stacks["relay-a"].enter_context(_running(a))
            stacks["relay-b"].enter_context(_running(b))
            _wait_for("a leader", lambda: a.is_leader or b.is_leader)
            with psycopg.connect(dsn) as conn:
                for i in range(100):
                    add(conn, Envelope.of("Changed", "thing", f"t{i % 5}", {"i": i}, version=i))
                    if i % 10 == 9:
                        conn.commit()
                    both_led += int(a.is_leader and b.is_leader)
            _wait_for("the first events", lambda: a.published + b.published >= 100)
            leader, other = (a, b) if a.published else (b, a)
            assert other.published == 0
            stacks[leader.holder].close()  # the leader stops and releases its Raft lease
            with psycopg.connect(dsn) as conn:
                for i in range(100, 150):
                    add(conn, Envelope.of("Changed", "thing", f"t{i % 5}", {"i": i}, version=i))
                conn.commit()
            _wait_for("the other relay to take over", lambda: other.published >= 50)
        finally:
            for st in stacks.values():
                st.close()
    assert both_led == 0
    consumer = make_consumer(isolation_level="read_committed")
    consumer.subscribe([topic])
    got: list[Envelope] = []
    deadline = time.monotonic() + 60
    while len(got) < 150 and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.5):
            assert msg.error() is None
            env = read_envelope(msg.key(), msg.value(), msg.headers())
            assert env is not None
            got.append(env)
    assert len(got) == 150 and len({e.id for e in got}) == 150
