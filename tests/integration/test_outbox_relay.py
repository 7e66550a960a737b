"""The outbox relay on real PostgreSQL and Kafka: nothing lost, nothing rolled back, order per aggregate, one leader."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest

from kcons.config import KafkaSettings
from kcons.envelope import Envelope, read_envelope
from kcons.outbox import OutboxRelay, OutboxRow, RelaySettings, add, install_schema

pytestmark = [pytest.mark.integration, pytest.mark.backends]


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


def _relay(dsn: str, bootstrap: str, topic: str, **kw: Any) -> OutboxRelay:
    hooks = {k: kw.pop(k) for k in ("before_commit", "on_published") if k in kw}
    settings = RelaySettings(dsn=dsn, kafka=KafkaSettings(bootstrap), topic=topic, poll_interval_s=0.5, **kw)
    return OutboxRelay.for_postgres(settings, **hooks)


def _read_all(make_consumer: Callable[..., Any], topic: str, want: int, settle_s: float = 2.0) -> list[Envelope]:
    """Read ``topic`` as a read_committed consumer until ``want`` events arrived and nothing more comes."""
    consumer = make_consumer(isolation_level="read_committed")
    consumer.subscribe([topic])
    got: list[Envelope] = []
    deadline = time.monotonic() + 60
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        msgs = consumer.consume(1000, 0.2)
        for msg in msgs:
            assert msg.error() is None, msg.error()
            env = read_envelope(msg.key(), msg.value(), msg.headers())
            assert env is not None
            got.append(env)
        if msgs:
            quiet_since = time.monotonic()
        elif len(got) >= want and time.monotonic() - quiet_since > settle_s:
            break
    return got


@pytest.fixture
def outbox_db(fresh_database: Callable[[], str]) -> str:
    dsn = fresh_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
        conn.execute("CREATE TABLE accounts (id text PRIMARY KEY, version bigint NOT NULL)")
    return dsn


def _event(aggregate: str, version: int | None = None, **payload: Any) -> Envelope:
    return Envelope.of("AccountChanged", "account", aggregate, payload or {"v": version}, version=version)


def _unpublished(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM kcons_outbox WHERE published_at IS NULL").fetchone()
        assert row is not None
        return int(row[0])


def test_rolled_back_business_transaction_publishes_nothing(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=3)
    kept, dropped = _event("a-1", 1), _event("a-2", 1)
    with psycopg.connect(outbox_db) as conn:
        add(conn, dropped)
        conn.rollback()
        add(conn, kept)
        conn.commit()
    with _running(_relay(outbox_db, kafka_bootstrap, topic)) as relay:
        _wait_for("the committed event to be published", lambda: relay.published >= 1)
    got = _read_all(make_consumer, topic, want=1)
    assert [e.id for e in got] == [kept.id]
    assert _unpublished(outbox_db) == 0


def test_published_record_carries_the_row_insert_time_as_its_timestamp(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    from confluent_kafka import TIMESTAMP_CREATE_TIME

    topic = unique_topic(partitions=1)
    before_ms = int(time.time() * 1000)
    with psycopg.connect(outbox_db) as conn:
        add(conn, _event("a-1", 1))
        conn.commit()
    time.sleep(1.5)  # the event waits in the outbox: its timestamp must be the insert, not the publish
    with _running(_relay(outbox_db, kafka_bootstrap, topic)) as relay:
        _wait_for("the event to be published", lambda: relay.published >= 1)
    published_ms = int(time.time() * 1000)
    consumer = make_consumer()
    consumer.subscribe([topic])
    msg = None
    deadline = time.monotonic() + 30
    while msg is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
    assert msg is not None and msg.error() is None
    kind, ts = msg.timestamp()
    assert kind == TIMESTAMP_CREATE_TIME
    # Insert time within clock-reading slack (the age comes from PostgreSQL, the rest from this host).
    assert before_ms - 50 <= ts <= before_ms + 1000, (before_ms, ts, published_ms)


def test_transaction_that_commits_after_a_later_one_was_published_is_still_published(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic()
    early, late = _event("slow", 1), _event("fast", 1)
    slow = psycopg.connect(outbox_db)
    try:
        add(slow, early)  # lower xid and lower position, still uncommitted
        slow_row = slow.execute("SELECT txid::text::bigint, position FROM kcons_outbox WHERE id = %s", (early.id,))
        slow_xid, slow_pos = slow_row.fetchone() or (0, 0)
        with psycopg.connect(outbox_db) as fast:
            add(fast, late)
            fast_xid, fast_pos = fast.execute(
                "SELECT txid::text::bigint, position FROM kcons_outbox WHERE id = %s", (late.id,)
            ).fetchone() or (0, 0)
            fast.commit()
        assert slow_xid < fast_xid and slow_pos < fast_pos
        with _running(_relay(outbox_db, kafka_bootstrap, topic)) as relay:
            _wait_for("the later transaction's event", lambda: relay.published == 1)
            slow.commit()  # commits out of id order, after a higher position was already published
            _wait_for("the earlier transaction's event", lambda: relay.published == 2)
    finally:
        slow.close()
    got = _read_all(make_consumer, topic, want=2)
    assert [e.id for e in got] == [late.id, early.id]


def test_aggregate_events_follow_lock_order_even_when_xid_order_differs(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    """An older transaction that waits for the aggregate lock publishes after the younger one that held it."""
    topic = unique_topic()
    with psycopg.connect(outbox_db) as conn:
        conn.execute("INSERT INTO accounts VALUES ('acc', 0)")
        conn.commit()
    older = psycopg.connect(outbox_db)
    younger = psycopg.connect(outbox_db)
    done = threading.Event()
    older_result: list[int] = []

    def bump(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("UPDATE accounts SET version = version + 1 WHERE id = 'acc' RETURNING version").fetchone()
        assert row is not None
        version = int(row[0])
        add(conn, _event("acc", version))
        return version

    try:
        older_xid = older.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        younger_xid = younger.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        assert older_xid is not None and younger_xid is not None and older_xid[0] < younger_xid[0]
        assert bump(younger) == 1

        def older_work() -> None:
            older_result.append(bump(older))  # blocks until `younger` commits
            older.commit()
            done.set()

        worker = threading.Thread(target=older_work, daemon=True)
        worker.start()
        _wait_for(
            "the older transaction to wait on the aggregate lock",
            lambda: _lock_waiters(outbox_db) >= 1,
        )
        younger.commit()
        assert done.wait(30)
        worker.join(10)
    finally:
        older.close()
        younger.close()
    assert older_result == [2]
    with _running(_relay(outbox_db, kafka_bootstrap, topic)) as relay:
        _wait_for("both events", lambda: relay.published == 2)
    got = _read_all(make_consumer, topic, want=2)
    assert [e.version for e in got] == [1, 2]


def _lock_waiters(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
        assert row is not None
        return int(row[0])


def test_per_aggregate_order_holds_under_concurrent_writers_and_small_batches(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=4)
    aggregates = [f"acc-{i}" for i in range(8)]
    with psycopg.connect(outbox_db) as conn:
        for a in aggregates:
            conn.execute("INSERT INTO accounts VALUES (%s, 0)", (a,))
        conn.commit()
    per_writer = 60

    def writer(seed: int) -> None:
        import random

        rnd = random.Random(seed)
        with psycopg.connect(outbox_db) as conn:
            for _ in range(per_writer):
                for a in sorted(rnd.sample(aggregates, 2)):  # sorted: no deadlocks
                    row = conn.execute(
                        "UPDATE accounts SET version = version + 1 WHERE id = %s RETURNING version", (a,)
                    ).fetchone()
                    assert row is not None
                    add(conn, _event(a, int(row[0])))
                conn.commit()

    with _running(_relay(outbox_db, kafka_bootstrap, topic, batch_size=25)) as relay:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = 4 * per_writer * 2
        _wait_for("every event", lambda: relay.published >= total)
    got = _read_all(make_consumer, topic, want=total)
    assert len({e.id for e in got}) == total
    seen: dict[str, list[int]] = {}
    for e in got:
        assert e.version is not None
        seen.setdefault(e.aggregate_id, []).append(e.version)
    for versions in seen.values():
        assert versions == list(range(1, len(versions) + 1))


def test_two_relays_elect_one_leader_and_publish_each_event_once(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic(partitions=2)
    a = _relay(outbox_db, kafka_bootstrap, topic, holder="relay-a", batch_size=50)
    b = _relay(outbox_db, kafka_bootstrap, topic, holder="relay-b", batch_size=50)
    both_led = 0
    with _running(a), _running(b):
        _wait_for("a leader", lambda: a.is_leader or b.is_leader)
        with psycopg.connect(outbox_db) as conn:
            for i in range(300):
                add(conn, _event(f"k{i % 7}", i))
                if i % 10 == 9:
                    conn.commit()
                both_led += int(a.is_leader and b.is_leader)
        _wait_for("every event", lambda: a.published + b.published >= 300)
    assert both_led == 0
    assert sorted([a.published, b.published]) == [0, 300]
    got = _read_all(make_consumer, topic, want=300)
    assert len(got) == 300 and len({e.id for e in got}) == 300


def test_leader_cut_off_mid_batch_cannot_publish_after_a_new_leader_took_over(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    """The old leader's Kafka transaction is fenced by the new leader; its batch never becomes visible."""
    topic = unique_topic()
    events = [_event(f"k{i % 3}", i) for i in range(20)]
    with psycopg.connect(outbox_db) as conn:
        for e in events:
            add(conn, e)
        conn.commit()
    in_commit, resume = threading.Event(), threading.Event()

    def stall_first_commit(rows: Sequence[OutboxRow]) -> None:
        if not in_commit.is_set():
            in_commit.set()
            assert resume.wait(60)

    # A long TTL: the old leader still believes it leads when it resumes, so the Kafka fence must stop it.
    old = _relay(outbox_db, kafka_bootstrap, topic, holder="relay-old", lease_ttl_s=60.0,
                 before_commit=stall_first_commit)  # fmt: skip
    new = _relay(outbox_db, kafka_bootstrap, topic, holder="relay-new", lease_ttl_s=60.0)
    with _running(old):
        assert in_commit.wait(60), "old leader never reached its commit"
        with _running(new):
            with psycopg.connect(outbox_db, autocommit=True) as admin:
                cut = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE %s",
                    ("kcons-outbox:default:relay-old%",),
                ).fetchone()
            assert cut is not None and cut[0] >= 1
            _wait_for("the new leader to publish everything", lambda: new.published == 20)
            assert old.is_leader  # by its own clock: only fencing can stop it now
            resume.set()
            _wait_for("the old leader to step down", lambda: not old.is_leader)
    assert old.published == 0
    got = _read_all(make_consumer, topic, want=20)
    assert sorted(e.id for e in got) == sorted(e.id for e in events)  # each exactly once: the old batch is aborted
    assert _unpublished(outbox_db) == 0


@pytest.mark.parametrize("batches_before", [0, 1])
def test_a_new_leaders_publisher_fences_each_transactional_producer_of_the_old_one(
    kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any], batches_before: int
) -> None:
    """The batches alternate between two transactional ids; a new leader's start fences the old leader on both."""
    from kcons.errors import LeadershipLostError
    from kcons.outbox.publisher import KafkaBatchPublisher

    topic = unique_topic()
    events = {name: _event(name, 1) for name in ("old", "zombie", "new-0", "new-1")}

    def batch(name: str) -> list[Any]:
        e = events[name]
        return [(topic, e.payload, e.key, list(e.headers()), 0)]

    tid = f"kcons-test-fence-{uuid.uuid4().hex[:8]}"
    old = KafkaBatchPublisher({"bootstrap.servers": kafka_bootstrap}, transactional_id=tid)
    new = KafkaBatchPublisher({"bootstrap.servers": kafka_bootstrap}, transactional_id=tid)
    try:
        old.start()  # the old leader took the lead first
        for _ in range(batches_before):  # the old leader's next batch goes through its other producer
            old.publish(batch("old"))
        new.start()
        with pytest.raises(LeadershipLostError):
            old.publish(batch("zombie"))
        new.publish(batch("new-0"))
        new.publish(batch("new-1"))
    finally:
        old.close()
        new.close()
    got = [e.aggregate_id for e in _read_all(make_consumer, topic, want=2 + batches_before)]
    assert got == ["old"] * batches_before + ["new-0", "new-1"]


def test_retention_mode_marks_rows_instead_of_deleting_them(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic()
    with psycopg.connect(outbox_db) as conn:
        for i in range(5):
            add(conn, _event("r", i))
        conn.commit()
    with _running(_relay(outbox_db, kafka_bootstrap, topic, retention_s=3600.0)) as relay:
        _wait_for("the events", lambda: relay.published == 5)
    with psycopg.connect(outbox_db) as conn:
        row = conn.execute("SELECT count(*), count(published_at) FROM kcons_outbox").fetchone()
    assert row == (5, 5)


def test_relay_resumes_after_its_database_connections_are_cut(
    outbox_db: str, kafka_bootstrap: str, unique_topic: Callable[..., str], make_consumer: Callable[..., Any]
) -> None:
    topic = unique_topic()
    with _running(_relay(outbox_db, kafka_bootstrap, topic, holder="relay-x", lease_ttl_s=3.0)) as relay:
        for round_ in range(3):
            with psycopg.connect(outbox_db) as conn:
                for i in range(10):
                    add(conn, _event(f"c{i % 2}", round_ * 10 + i))
                conn.commit()
            _wait_for("this round's events", lambda r=round_: relay.published >= (r + 1) * 10)  # type: ignore[misc]
            with psycopg.connect(outbox_db, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
                    ("kcons-outbox:default:relay-x%",),
                )
    got = _read_all(make_consumer, topic, want=30)
    assert {e.id for e in got} == {e.id for e in got} and len({e.id for e in got}) == 30
    assert _unpublished(outbox_db) == 0


def test_event_ids_are_unique_in_the_outbox(outbox_db: str) -> None:
    event = _event("dup", 1)
    with psycopg.connect(outbox_db) as conn:
        add(conn, event)
        with pytest.raises(psycopg.errors.UniqueViolation):
            add(conn, Envelope(id=event.id, type="x", aggregate_type="y", aggregate_id="z", payload=b""))
        conn.rollback()
    assert uuid.UUID(event.id).version == 7


def test_marking_with_a_superseded_token_changes_nothing(outbox_db: str) -> None:
    from kcons.adapters.postgres import PostgresOutboxStore
    from kcons.errors import LeadershipLostError

    with psycopg.connect(outbox_db) as conn:
        for i in range(3):
            add(conn, _event("f", i))
        conn.commit()
    store = PostgresOutboxStore(outbox_db)
    try:
        store.claim_fence("default", 5, "new-leader")
        with pytest.raises(LeadershipLostError):
            store.claim_fence("default", 4, "old-leader")
        rows = store.fetch(10)
        assert [r.version for r in rows] == [0, 1, 2]
        with pytest.raises(LeadershipLostError):
            store.mark_published(rows, name="default", token=4, retain=False)
        assert _unpublished(outbox_db) == 3
        store.forget_position()  # what the relay does when a batch was not marked
        rows = store.fetch(10)
        assert [r.version for r in rows] == [0, 1, 2]
        store.mark_published(rows, name="default", token=5, retain=False)
        assert store.fetch(10) == [] and _unpublished(outbox_db) == 0
    finally:
        store.close()


def test_hinted_reads_find_late_commits_below_the_hint_and_fall_back_when_they_overflow(outbox_db: str) -> None:
    from kcons.adapters.postgres import PostgresOutboxStore

    store = PostgresOutboxStore(outbox_db)
    slow = psycopg.connect(outbox_db)
    try:
        with psycopg.connect(outbox_db) as conn:
            for i in range(6):
                add(conn, _event("h", i))
            conn.commit()
            store.claim_fence("n", 1, "me")
            first = store.fetch(3)
            store.mark_published(first, name="n", token=1, retain=False)
            assert [r.version for r in store.fetch(3)] == [3, 4, 5]  # hinted: above the first batch
            store.forget_position()  # as after a failed publish: the same rows come back
            for i in range(5):
                add(slow, _event("late", 100 + i))  # open: positions below what comes next
            add(conn, _event("h", 6))
            conn.commit()
            batch = store.fetch(3)
            assert [r.version for r in batch] == [3, 4, 5]
            store.mark_published(batch, name="n", token=1, retain=False)
            batch = store.fetch(3)
            assert [r.version for r in batch] == [6]
            store.mark_published(batch, name="n", token=1, retain=False)
            slow.commit()  # five late rows below the hint: more than a batch of 3
            batch = store.fetch(3)
            assert [r.version for r in batch] == [100, 101, 102]
            store.mark_published(batch, name="n", token=1, retain=False)
            batch = store.fetch(3)
            assert [r.version for r in batch] == [103, 104]
            store.mark_published(batch, name="n", token=1, retain=False)
            assert store.fetch(3) == []
    finally:
        slow.close()
        store.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_interleavings_of_writers_and_reads_return_each_committed_row_once(outbox_db: str, seed: int) -> None:
    """A model check of the hinted read against real transactions: open, insert, commit or roll back, read, mark."""
    import random

    from kcons.adapters.postgres import PostgresOutboxStore

    rnd = random.Random(seed)
    store = PostgresOutboxStore(outbox_db)
    store.claim_fence("n", 1, "me")
    conns = [psycopg.connect(outbox_db) for _ in range(4)]
    pending: list[list[str]] = [[] for _ in conns]
    committed: set[str] = set()
    rolled_back: set[str] = set()
    seen: list[str] = []

    def read(limit: int) -> None:
        batch = store.fetch(limit)
        assert [r.position for r in batch] == sorted(r.position for r in batch)
        seen.extend(r.id for r in batch)
        if batch and rnd.random() < 0.1:
            store.forget_position()  # a failed publish: the rows stay and must come back
            seen[len(seen) - len(batch) :] = []
            return
        store.mark_published(batch, name="n", token=1, retain=False)

    try:
        for _ in range(400):
            op = rnd.random()
            i = rnd.randrange(len(conns))
            if op < 0.5:
                event = _event(f"m{i}", len(pending[i]))
                add(conns[i], event)
                pending[i].append(event.id)
            elif op < 0.7 and pending[i]:
                conns[i].commit()
                committed.update(pending[i])
                pending[i] = []
            elif op < 0.75 and pending[i]:
                conns[i].rollback()
                rolled_back.update(pending[i])
                pending[i] = []
            else:
                read(rnd.randint(1, 6))
        for i, conn in enumerate(conns):
            conn.commit()
            committed.update(pending[i])
        for _ in range(1000):
            if len(seen) >= len(committed):
                break
            read(7)
        assert store.fetch(100) == []
    finally:
        for conn in conns:
            conn.close()
        store.close()
    assert len(seen) == len(set(seen))  # never returned twice once marked
    assert set(seen) == committed
    assert not set(seen) & rolled_back
