"""The relay loop's decisions, with in-memory stand-ins for the store, the publisher and the lease backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from kcons.errors import (
    LeadershipLostError,
    RetriableKafkaError,
    SinkConnectionError,
    SinkRowError,
    SinkUnavailableError,
)
from kcons.lease import Lease
from kcons.outbox.relay import OutboxRelay
from kcons.outbox.rows import OutboxRecord, OutboxRow


class MemoryStore:
    def __init__(self, n: int) -> None:
        self.rows = [
            OutboxRow(position=i, id=f"id-{i}", aggregatetype="a", aggregateid=f"k{i % 3}", type="t", payload=b"")
            for i in range(n)
        ]
        self.fence: dict[str, int] = {}
        self.fetches = 0
        self.forgets = 0
        self.fail_marks = 0
        self.marked: list[int] = []
        self.dead: list[tuple[int, str]] = []
        self.held: set[str] = set()  # aggregates with a dead row: fetch flags their rows, as the SQL stores do

    def dead_letter(self, rows: Sequence[tuple[OutboxRow, str]], *, name: str, token: int) -> None:
        self.check_fence(name, token)
        gone = {r.position for r, _ in rows}
        self.dead.extend((r.position, reason) for r, reason in rows)
        self.held.update(r.aggregateid for r, _ in rows)
        self.rows = [r for r in self.rows if r.position not in gone]

    def fetch(self, limit: int, exclude: Sequence[int] = ()) -> list[OutboxRow]:
        self.fetches += 1
        for r in self.rows:
            r.held = r.aggregateid in self.held
        return [r for r in self.rows if r.position not in set(exclude)][:limit]

    def forget_position(self) -> None:
        self.forgets += 1

    def claim_fence(self, name: str, token: int, holder: str) -> None:
        if self.fence.get(name, 0) > token:
            raise LeadershipLostError("newer token")
        self.fence[name] = token

    def check_fence(self, name: str, token: int) -> None:
        if self.fence.get(name, 0) > token:
            raise LeadershipLostError("newer token")

    def mark_published(self, rows: Sequence[OutboxRow], *, name: str, token: int, retain: bool) -> None:
        if self.fail_marks:
            self.fail_marks -= 1
            raise LeadershipLostError("fenced")
        self.check_fence(name, token)
        done = {r.position for r in rows}
        self.marked.extend(sorted(done))
        self.rows = [r for r in self.rows if r.position not in done]

    def wait_for_change(self, timeout_s: float) -> bool:
        time.sleep(min(timeout_s, 0.01))
        return False

    def backlog(self) -> tuple[int, float]:
        return len(self.rows), 0.0

    def purge_published(self, older_than_s: float, limit: int = 10000) -> int:
        return 0

    def close(self) -> None:
        pass


class MemoryPublisher:
    mode = "transactional"

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: list[str] = []
        self.starts = 0
        self.resets = 0

    def start(self) -> None:
        self.starts += 1

    def publish(self, records: Iterable[Any], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        if self.failures:
            self.failures -= 1
            raise RetriableKafkaError("broker away")
        if still_leader is not None and not still_leader():
            raise LeadershipLostError("lease lost")
        for rec in records:
            headers = rec.headers if isinstance(rec, OutboxRecord) else rec[3]
            self.sent.append(dict(headers)["kcons-id"].decode())  # type: ignore[union-attr]

    def reset(self) -> None:
        self.resets += 1

    def wait_txn_gap(self) -> None:
        """No broker here: nothing to wait for between transactions."""

    def close(self, timeout: float = 5.0) -> None:
        pass


class MemoryLeases:
    def __init__(self, grant: bool = True) -> None:
        self.grant = grant
        self.token = 0
        self.released: list[int] = []

    def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        if not self.grant:
            return None
        self.token += 1
        return Lease(name, holder, self.token, time.monotonic() + ttl_s)

    def renew(self, lease: Lease, ttl_s: float) -> Lease | None:
        return Lease(lease.name, lease.holder, lease.token, time.monotonic() + ttl_s)

    def release(self, lease: Lease) -> None:
        self.released.append(lease.token)


def _relay(store: MemoryStore, pub: MemoryPublisher, leases: MemoryLeases, **kw: Any) -> OutboxRelay:
    return OutboxRelay(store, pub, leases=leases, batch_size=4, poll_interval_s=0.02, **kw)  # type: ignore[arg-type]


def _run_until(relay: OutboxRelay, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.005)
    relay.stop()
    t.join(10)
    if errors:
        raise errors[0]


def test_failed_publish_is_retried_and_rows_are_marked_only_after_success() -> None:
    store, pub, leases = MemoryStore(10), MemoryPublisher(failures=2), MemoryLeases()
    relay = _relay(store, pub, leases)
    _run_until(relay, lambda: not store.rows)
    assert store.marked == list(range(10))
    assert pub.sent == [f"id-{i}" for i in range(10)]  # the failed attempts sent nothing that was marked
    assert relay.published == 10


def test_fenced_mark_makes_the_relay_step_down_and_republish_under_a_new_token() -> None:
    store, pub, leases = MemoryStore(4), MemoryPublisher(), MemoryLeases()
    store.fail_marks = 1
    relay = _relay(store, pub, leases)
    _run_until(relay, lambda: not store.rows)
    assert leases.released[0] == 1 and leases.token >= 2  # stepped down, then led again
    assert pub.sent == [f"id-{i}" for i in range(4)] * 2  # at-least-once: the unmarked batch went out again
    assert store.marked == list(range(4))


def test_standby_never_reads_the_outbox() -> None:
    store, pub, leases = MemoryStore(4), MemoryPublisher(), MemoryLeases(grant=False)
    relay = _relay(store, pub, leases)
    _run_until(relay, lambda: False, timeout=0.5)
    assert store.fetches == 0 and pub.sent == [] and not relay.is_leader


def test_relay_gives_up_after_the_retry_bound() -> None:
    store, pub, leases = MemoryStore(4), MemoryPublisher(failures=10**6), MemoryLeases()
    relay = _relay(store, pub, leases, retry_max_s=0.3)
    with pytest.raises(RetriableKafkaError):
        _run_until(relay, lambda: False, timeout=10)
    assert store.marked == []


def test_expired_lease_is_not_leadership() -> None:
    store, pub, leases = MemoryStore(0), MemoryPublisher(), MemoryLeases()
    relay = _relay(store, pub, leases, lease_ttl_s=1.0)
    relay._lease = Lease("outbox:default", relay.holder, 1, time.monotonic() - 0.01)
    assert not relay.is_leader
    relay._lease = Lease("outbox:default", relay.holder, 1, time.monotonic() + 1.0)
    assert relay.is_leader


class FailingSink(MemoryPublisher):
    """A non-Kafka sink whose first publishes fail with the given error."""

    mode = "confirms"

    def __init__(self, error: Exception, failures: int) -> None:
        super().__init__()
        self.error = error
        self.failing = failures

    def publish(self, records: Iterable[Any], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        if self.failing:
            self.failing -= 1
            raise self.error
        super().publish(records, still_leader=still_leader, before_commit=before_commit)


def test_unavailable_sink_is_retried_and_rows_are_marked_only_after_its_confirm() -> None:
    store, leases = MemoryStore(6), MemoryLeases()
    sink = FailingSink(SinkUnavailableError("broker nacked"), failures=2)
    relay = _relay(store, sink, leases)  # type: ignore[arg-type]
    _run_until(relay, lambda: not store.rows)
    assert sink.sent == [f"id-{i}" for i in range(6)]
    assert store.marked == list(range(6))


class OutageSink(FailingSink):
    """A sink whose broker is unreachable for ``outage_s``, then nacks ``nacks`` publishes, then confirms."""

    def __init__(self, outage_s: float, nacks: int) -> None:
        super().__init__(SinkUnavailableError("nacked"), failures=nacks)
        self.until = time.monotonic() + outage_s

    def publish(self, records: Iterable[Any], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        if time.monotonic() < self.until:
            raise SinkConnectionError("connection refused")
        super().publish(records, still_leader=still_leader, before_commit=before_commit)


def test_unreachable_broker_is_waited_out_past_the_retry_bound_and_the_bound_restarts_when_it_is_back() -> None:
    store, leases = MemoryStore(6), MemoryLeases()
    sink = OutageSink(outage_s=4.0, nacks=2)  # an outage longer than the bound, then nacks while queues recover
    relay = _relay(store, sink, leases, retry_max_s=2.5)  # type: ignore[arg-type]
    _run_until(relay, lambda: not store.rows, timeout=20)
    assert sink.sent == [f"id-{i}" for i in range(6)]  # nothing of the failed attempts counted
    assert store.marked == list(range(6))


def test_relay_still_gives_up_when_a_reachable_broker_keeps_refusing() -> None:
    store, leases = MemoryStore(4), MemoryLeases()
    sink = OutageSink(outage_s=0.3, nacks=10**6)
    relay = _relay(store, sink, leases, retry_max_s=0.3)  # type: ignore[arg-type]
    with pytest.raises(SinkUnavailableError, match="nacked"):
        _run_until(relay, lambda: False, timeout=20)
    assert store.marked == []


def test_stop_during_an_outage_ends_the_relay_without_an_error() -> None:
    store, leases = MemoryStore(4), MemoryLeases()
    sink = OutageSink(outage_s=3600, nacks=0)
    relay = _relay(store, sink, leases, retry_max_s=0.1)  # type: ignore[arg-type]
    started = time.monotonic()
    _run_until(relay, lambda: time.monotonic() - started > 0.5, timeout=5)  # raises if run() raised
    assert store.marked == [] and relay.stopping


class RefusingSink(MemoryPublisher):
    """A non-Kafka sink that can never publish one row (a permanent, per-row failure)."""

    mode = "confirms"

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused

    def publish(self, records: Iterable[Any], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        batch = list(records)
        for i, rec in enumerate(batch):
            if dict(rec[3])["kcons-id"] == self.refused.encode():
                raise SinkRowError(self.refused, i, "too large")
        super().publish(batch, still_leader=still_leader, before_commit=before_commit)


def test_a_row_the_sink_refuses_for_good_is_dead_lettered_and_every_other_row_published() -> None:
    store, leases = MemoryStore(7), MemoryLeases()
    sink = RefusingSink("id-2")
    relay = _relay(store, sink, leases)  # type: ignore[arg-type]
    _run_until(relay, lambda: not store.rows, timeout=10)
    assert [p for p, _ in store.dead] == [2, 5]  # id-2, and id-5 of the same aggregate held behind it
    assert "id=id-2" in store.dead[0][1] and "SinkRowError" in store.dead[0][1], store.dead
    assert store.dead[1][1].startswith("held:"), store.dead
    assert sorted(store.marked) == [0, 1, 3, 4, 6]
    assert relay.dead_lettered == 2
