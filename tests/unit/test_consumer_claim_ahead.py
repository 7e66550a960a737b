"""Claim ahead: the consumer sends the next batch's claim before it handles the current batch.

A store stand-in answers like the Redis store (its own in-progress claims are claimed again) and
runs each call either when it is sent or only when its answer is read (a slow store), so both
orders of the two batches' store work are covered. The outcome must be the one of the consumer
that claims each batch just before handling it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import tenacity
from confluent_kafka import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from test_consumer_logic import FakeKafka, FakeProducer, commits_after_done_records, generated_behaviour, make

from kcons.adapters.memory import MemoryDedupStore
from kcons.consumer import IdempotentConsumer, RetryLater, default_event_id
from kcons.dedup import ClaimResult, StoreCapabilities
from kcons.errors import ConfigError, StoreError


class AheadStore(MemoryDedupStore):
    """A memory store with the claim-ahead call; its own in-progress claims are claimed again (as Redis does).

    ``slow``: a call runs only when its answer is read. ``fail_answers``: that many answers fail.
    Every call that runs is written to ``journal``.
    """

    capabilities = StoreCapabilities(batch_claim=True, pipelined=True, claim_ahead=True)

    def __init__(self, journal: list[str] | None = None, *, slow: bool = True) -> None:
        super().__init__()
        self.journal = journal if journal is not None else []
        self.slow = slow
        self.mine: set[str] = set()
        self.fail_answers = 0
        self.fail_calls: set[int] = set()  # the numbers of the claim-ahead calls that fail (1 = the first)
        self.calls = 0
        self.fail_retry = False
        self.in_flight = 0
        self.most_in_flight = 0

    def claim_batch(self, ids: Sequence[str], lease_s: float) -> ClaimResult:
        own = [i for i in ids if i in self.mine]
        if own:
            MemoryDedupStore.release(self, own)  # our own claim: taken again
        result = super().claim_batch(ids, lease_s)
        self.mine |= result.claimed
        return result

    def complete_and_claim(self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float) -> ClaimResult:
        if self.fail_retry:
            self.fail_retry = False
            raise StoreError("store still down")
        self.journal.append(f"store done={sorted(done_ids)} claim={sorted(ids)}")
        return super().complete_and_claim(done_ids, ids, lease_s)

    def complete(self, ids: Sequence[str]) -> None:
        self.journal.append(f"store done={sorted(ids)}")
        super().complete(ids)
        self.mine.difference_update(ids)

    def release(self, ids: Sequence[str]) -> None:
        self.journal.append(f"store release={sorted(ids)}")
        super().release(ids)
        self.mine.difference_update(ids)

    def send_complete_and_claim(
        self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float
    ) -> Callable[[], ClaimResult]:
        done_ids, ids = list(done_ids), list(ids)
        self.journal.append(f"send claim={sorted(ids)}")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)

        def run() -> ClaimResult:
            self.calls += 1
            if self.fail_answers or self.calls in self.fail_calls:
                self.fail_answers = max(0, self.fail_answers - 1)
                if self.calls % 3 == 0:  # every third failing call ran, and its answer was lost
                    self.complete_and_claim(done_ids, ids, lease_s)
                self.fail_retry = self.calls % 2 == 0  # even calls: the retry fails too (the batch is held)
                raise StoreError("store down")
            return self.complete_and_claim(done_ids, ids, lease_s)

        if not self.slow:
            try:
                result = run()
            except StoreError as exc:
                error = exc

                def failed() -> ClaimResult:
                    self.in_flight -= 1
                    raise error

                return failed

            def ready() -> ClaimResult:
                self.in_flight -= 1
                return result

            return ready

        def answer() -> ClaimResult:
            self.in_flight -= 1
            return run()

        return answer

    def state(self, event_id: str) -> str:
        entry = self._entries.get(event_id)
        if entry is None:
            return "absent"
        return "claimed" if event_id in self.mine else "done"


def ahead(kafka: FakeKafka, handler: Callable[[Any], None], store: AheadStore, **kw: Any) -> IdempotentConsumer:
    return make(kafka, handler, store=store, **kw)


def ids_of(seen: list[Any]) -> list[str]:
    return [default_event_id(m) or "" for m in seen]


def test_claim_ahead_is_on_for_a_store_that_declares_it_and_refused_for_one_that_does_not() -> None:
    kafka = FakeKafka(partitions=1)
    consumer = ahead(kafka, lambda m: None, AheadStore())
    assert consumer._claim_ahead  # type: ignore[attr-defined]
    assert not make(FakeKafka(), lambda m: None, store=AheadStore(), claim_ahead=False)._claim_ahead  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as err:
        make(FakeKafka(), lambda m: None, store=MemoryDedupStore(), claim_ahead=True)
    assert err.value.setting == "claim_ahead"


@pytest.mark.parametrize("slow", [True, False])
def test_the_next_batch_is_claimed_before_the_current_one_is_handled(slow: bool) -> None:
    kafka = FakeKafka(partitions=1)
    store = AheadStore(kafka.journal, slow=slow)
    for i in range(6):
        kafka.add(0, f"e{i}")
    consumer = ahead(kafka, lambda m: kafka.journal.append(f"handle {m.offset()}"), store, batch_size=2)
    for _ in range(4):
        consumer.poll_once()
    consumer.close()
    journal = kafka.journal
    assert store.most_in_flight == 2, "the next batch's call is sent before the current one's answer is read"
    assert journal.index("send claim=['e2', 'e3']") < journal.index("handle 0")
    assert [e for e in journal if e.startswith("handle")] == [f"handle {i}" for i in range(6)]
    assert kafka.committed_offsets() == {0: 6}
    assert all(store.state(f"e{i}") == "done" for i in range(6))


@pytest.mark.parametrize("slow", [True, False])
def test_offsets_are_committed_only_after_their_done_records_are_written(slow: bool) -> None:
    kafka = FakeKafka(partitions=1)
    store = AheadStore(kafka.journal, slow=slow)
    for i in range(12):
        kafka.add(0, f"e{i}")
    consumer = ahead(kafka, lambda m: None, store, batch_size=3)
    for _ in range(6):
        consumer.poll_once()
    consumer.close()
    assert commits_after_done_records(kafka.journal) >= 2
    assert kafka.committed_offsets() == {0: 12}


@pytest.mark.parametrize("slow", [True, False])
def test_an_id_in_two_consecutive_batches_is_handled_once(slow: bool) -> None:
    kafka = FakeKafka(partitions=2)
    for event_id in ["a", "b"]:
        kafka.add(0, event_id)
    for event_id in ["a", "c"]:  # "a" again, claimed before the first batch finished
        kafka.add(1, event_id)
    seen: list[Any] = []
    store = AheadStore(slow=slow)
    consumer = ahead(kafka, seen.append, store, batch_size=2)
    for _ in range(5):
        consumer.poll_once()
    consumer.close()
    assert sorted(ids_of(seen)) == ["a", "b", "c"]
    assert kafka.committed_offsets() == {0: 2, 1: 2}
    assert consumer.stats.duplicates == 1


def test_an_id_the_batch_before_failed_on_is_not_handled_ahead_of_its_retry() -> None:
    kafka = FakeKafka(partitions=2)
    kafka.add(0, "x", value=b"later")  # rewinds partition 0 once
    kafka.add(1, "x")  # the same id, read ahead while the first copy is not done
    seen: list[tuple[int, int]] = []
    later: set[tuple[int, int]] = set()

    def handler(msg: Any) -> None:
        if msg.value() == b"later" and (msg.partition(), msg.offset()) not in later:
            later.add((msg.partition(), msg.offset()))
            raise RetryLater(0)
        seen.append((msg.partition(), msg.offset()))

    store = AheadStore()
    consumer = ahead(kafka, handler, store, batch_size=1)
    for _ in range(6):
        consumer.poll_once()
    consumer.close()
    assert len(seen) == 1, "one of the two copies of x is handled, once"
    assert kafka.committed_offsets() == {0: 1, 1: 1}
    assert store.state("x") == "done"


def test_a_read_ahead_batch_loses_the_messages_of_a_partition_rewound_by_the_batch_before() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, "a", value=b"later")
    kafka.add(0, "b")
    kafka.add(0, "c")
    attempts: list[str] = []
    failed_once: set[str] = set()

    def handler(msg: Any) -> None:
        event_id = default_event_id(msg) or ""
        attempts.append(event_id)
        if msg.value() == b"later" and event_id not in failed_once:
            failed_once.add(event_id)
            raise RetryLater(0)

    store = AheadStore(kafka.journal)
    consumer = ahead(kafka, handler, store, batch_size=1)
    consumer.poll_once()  # "a" is rewound; "b" was read ahead and its claim sent
    assert attempts == ["a"]
    consumer.poll_once()  # "b" is dropped and given back when its answer comes
    assert "store release=['b']" in kafka.journal
    assert attempts == ["a"]
    for _ in range(6):
        consumer.poll_once()
    consumer.close()
    assert attempts == ["a", "a", "b", "c"], "in order, nothing skipped"
    assert kafka.committed_offsets() == {0: 3}


def test_a_revocation_during_the_read_ahead_leaves_the_current_batchs_revoked_messages_to_the_new_owner() -> None:
    class RevokeOnReadAhead(FakeKafka):
        """Revokes partition 1 during the second read (the read ahead of the first batch)."""

        def __init__(self) -> None:
            super().__init__(partitions=2)
            self.reads = 0

        def poll(self, timeout: float) -> Any:
            self.reads += 1
            if self.reads == 2:
                self.callbacks["on_revoke"](self, [TopicPartition("t", 1)])
                del self.logs[1]
            return super().poll(timeout)

    kafka = RevokeOnReadAhead()
    kafka.add(0, "a")
    kafka.add(1, "b")
    kafka.add(0, "c")
    seen: list[Any] = []
    store = AheadStore(kafka.journal)
    consumer = ahead(kafka, seen.append, store, batch_size=2)
    consumer.poll_once()
    consumer.poll_once()
    consumer.close()
    assert ids_of(seen) == ["a", "c"], "the revoked partition's message is left to its new owner"
    assert store.state("b") == "absent", "its claim was given back"
    assert kafka.committed_offsets() == {0: 2}


def test_close_gives_back_the_claims_of_the_batch_read_ahead_and_writes_the_done_records_it_carries() -> None:
    kafka = FakeKafka(partitions=1)
    for event_id in ["a", "b", "c", "d"]:
        kafka.add(0, event_id)
    store = AheadStore(kafka.journal)
    consumer = ahead(kafka, lambda m: None, store, batch_size=2)
    consumer.poll_once()  # handles a, b; c, d were read ahead and their claim sent
    consumer.close()
    assert [store.state(i) for i in "abcd"] == ["done", "done", "absent", "absent"]
    assert kafka.committed_offsets() == {0: 2}


def test_a_failed_answer_holds_the_batch_and_commits_nothing_past_the_done_records_it_carried() -> None:
    kafka = FakeKafka(partitions=1)
    for i in range(6):
        kafka.add(0, f"e{i}")
    store = AheadStore(kafka.journal)
    seen: list[Any] = []
    consumer = ahead(kafka, seen.append, store, batch_size=2)
    consumer.poll_once()  # e0, e1 handled; e2, e3 sent
    store.fail_answers = 1  # the answer for e2, e3 fails; the retry works
    consumer.poll_once()
    store.fail_answers = 2  # the next answer and its retry fail: the batch is held
    consumer.poll_once()
    for _ in range(4):
        consumer.poll_once()
    consumer.close()
    assert sorted(ids_of(seen)) == [f"e{i}" for i in range(6)]
    assert kafka.committed_offsets() == {0: 6}
    assert all(store.state(f"e{i}") == "done" for i in range(6))
    commits_after_done_records(kafka.journal)


# A generated log drained by a consumer with claim ahead (slow or fast store) or without: which copy
# of a repeated id is handled may differ (the batches interleave differently), what must hold may not.
MESSAGE = st.tuples(
    st.integers(0, 2),  # partition
    st.one_of(st.none(), st.sampled_from([f"id-{i}" for i in range(8)]), st.just("\xff")),  # id (\xff: poison)
    st.sampled_from([b"ok", b"ok", b"ok", b"boom", b"decode", b"later"]),  # handler behaviour
)
Log = list[tuple[int, str | None, bytes]]


def _drain(log: Log, done_before: list[str], *, claim: str, size: int, fail: set[int] | None = None) -> None:
    """Drain ``log`` and check the outcome: every message decided once, one effect per id, nothing left claimed.

    ``fail``: the claim-ahead calls that fail (the store is down for them, retries included).
    """
    kafka = FakeKafka(partitions=3)
    store = AheadStore(slow=claim == "slow")
    store.fail_calls = fail or set()
    if done_before:
        store.complete(done_before)
    effects: list[tuple[int, int]] = []
    behave = generated_behaviour()

    def effect(msg: Any) -> None:
        behave(msg)
        effects.append((msg.partition(), msg.offset()))

    by_position: dict[tuple[int, int], tuple[str | None, bytes]] = {}
    for partition, event_id, value in log:
        by_position[(partition, len(kafka.logs[partition]))] = (event_id, value)
        if event_id == "\xff":
            kafka.add(partition, None, value, headers=[("kcons-id", b"\xff")])
        else:
            kafka.add(partition, event_id, value)
    producer = FakeProducer()
    policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none(), reraise=True)
    consumer = make(
        kafka, effect, store=store, retry=policy, producer_factory=producer, batch_size=size,
        claim_ahead=claim != "off",
    )  # fmt: skip
    for _ in range(len(log) * 3 + 6):
        consumer.poll_once()
    consumer.close()

    assert kafka.committed_offsets() == {p: len(m) for p, m in kafka.logs.items() if m}, "every message decided"
    lettered = Counter((int(dict(s["headers"])["kcons-dlq-partition"]), int(dict(s["headers"])["kcons-dlq-offset"]))
                       for s in producer.sent)  # fmt: skip
    assert all(n == 1 for n in lettered.values()), "no message dead-lettered twice"
    done_ids: set[str] = set(done_before)
    for position, (event_id, value) in sorted(by_position.items()):
        if event_id is None or event_id == "\xff":  # identified by position, or poison
            fails = event_id == "\xff" or value in (b"boom", b"decode")
            assert lettered[position] == int(fails) and effects.count(position) == int(not fails), position
    per_id = Counter(by_position[p][0] for p in effects)
    for event_id in {i for i, _ in by_position.values() if i is not None and i != "\xff"}:
        copies = [v for i, v in by_position.values() if i == event_id]
        can = event_id not in done_before and any(v in (b"ok", b"later") for v in copies)
        assert per_id[event_id] <= int(can), f"{event_id}: {per_id[event_id]} effects"
        if can and not per_id[event_id]:  # the event was dead-lettered (a copy failed): no effect
            assert any(lettered[p] for p, (i, _) in by_position.items() if i == event_id), f"{event_id} lost"
        if per_id[event_id]:
            done_ids.add(event_id)
    stored = {k for k in store._entries if store.state(k) == "done" and not k.startswith("\x1e")}  # type: ignore[attr-defined]
    assert stored == done_ids, "done: the ids with an effect (and those done before), not a position id"
    assert not store.mine, "no claim left behind"
    assert store.in_flight == 0


@settings(max_examples=200, deadline=None)
@given(
    log=st.lists(MESSAGE, min_size=1, max_size=14),
    done_before=st.lists(st.sampled_from([f"id-{i}" for i in range(8)]), max_size=2),
    size=st.integers(1, 4),
    claim=st.sampled_from(["slow", "fast", "off"]),
    fail=st.sets(st.integers(1, 12), max_size=4),
)
def test_every_message_is_decided_once_and_every_id_has_one_effect_with_or_without_claim_ahead(
    log: Log, done_before: list[str], size: int, claim: str, fail: set[int]
) -> None:
    _drain(log, done_before, claim=claim, size=size, fail=fail)


def test_a_fatal_error_while_reading_ahead_leaves_the_claimed_batch_for_close_to_give_back() -> None:
    class FailingRead(FakeKafka):
        def __init__(self) -> None:
            super().__init__(partitions=1)
            self.reads = 0

        def poll(self, timeout: float) -> Any:
            self.reads += 1
            if self.reads == 2:
                raise RuntimeError("the read ahead failed")
            return super().poll(timeout)

    kafka = FailingRead()
    kafka.add(0, "a")
    store = AheadStore(kafka.journal)
    consumer = ahead(kafka, lambda m: None, store)
    with pytest.raises(RuntimeError):
        consumer.poll_once()
    consumer.close()
    assert store.in_flight == 0 and store.state("a") == "absent", "its answer was taken and its claim given back"
    assert kafka.commits == []
