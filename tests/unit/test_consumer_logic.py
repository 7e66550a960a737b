"""The consumer's commit decision, retries and dead-letter logic, against an in-memory stand-in for Kafka.

These pin down pure decision logic (which offsets are committed, when, and what is rewound and
paused). The same behaviours run against real Kafka, Redis and PostgreSQL in tests/integration.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st

from kcons.adapters.memory import MemoryDedupStore
from kcons.consumer import (
    DLQ_OFFSET_HEADER,
    DLQ_PARTITION_HEADER,
    DLQ_REASON_HEADER,
    DLQ_SOURCE_HEADER,
    DLQ_TOPIC_HEADER,
    IdempotentConsumer,
    RetryLater,
    default_event_id,
)
from kcons.dedup import ClaimResult
from kcons.errors import ConfigError, DecodeError, StoreError


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes, headers: list[Any] | None) -> None:
        self._t, self._p, self._o, self._v, self._h = topic, partition, offset, value, headers

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return self._v

    def key(self) -> bytes:
        return b"k"

    def headers(self) -> list[Any] | None:
        return self._h

    def error(self) -> None:
        return None


class FakeKafka:
    """A log per partition, positions, pauses and a commit journal; assigns everything at the first consume."""

    def __init__(self, partitions: int = 2) -> None:
        self.logs: dict[int, list[FakeMessage]] = {p: [] for p in range(partitions)}
        self.position = dict.fromkeys(self.logs, 0)
        self.paused: set[int] = set()
        self.commits: list[dict[int, int]] = []
        self.journal: list[str] = []
        self.config: dict[str, Any] = {}
        self.callbacks: dict[str, Callable[..., None]] = {}
        self.assigned = False

    def add(self, partition: int, event_id: str | None, value: bytes = b"v", headers: list[Any] | None = None) -> None:
        hs = list(headers or [])
        if event_id is not None:
            hs.append(("kcons-id", event_id.encode()))
        log = self.logs[partition]
        log.append(FakeMessage("t", partition, len(log), value, hs))

    # confluent_kafka.Consumer surface
    def __call__(self, config: dict[str, Any]) -> FakeKafka:
        self.config = config
        return self

    def subscribe(self, topics: list[str], **callbacks: Callable[..., None]) -> None:
        self.callbacks = callbacks

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        from confluent_kafka import TopicPartition

        if not self.assigned:
            self.assigned = True
            self.callbacks["on_assign"](self, [TopicPartition("t", p) for p in self.logs])
        out: list[FakeMessage] = []
        for p, log in self.logs.items():
            if p in self.paused:
                continue
            while self.position[p] < len(log) and len(out) < n:
                out.append(log[self.position[p]])
                self.position[p] += 1
        return out

    def poll(self, timeout: float) -> FakeMessage | None:
        got = self.consume(1, timeout)
        return got[0] if got else None

    def seek(self, tp: Any) -> None:
        self.position[tp.partition] = tp.offset

    def pause(self, tps: list[Any]) -> None:
        self.paused |= {tp.partition for tp in tps}

    def resume(self, tps: list[Any]) -> None:
        self.paused -= {tp.partition for tp in tps}

    def commit(self, offsets: list[Any], asynchronous: bool) -> list[Any]:
        self.commits.append({tp.partition: tp.offset for tp in offsets})
        self.journal.append("commit " + ",".join(f"{tp.partition}:{tp.offset}" for tp in offsets))
        return offsets

    def assignment(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition("t", p) for p in self.logs]

    def close(self) -> None:
        self.journal.append("close")

    def committed_offsets(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for c in self.commits:
            out.update(c)
        return out


class FakeProducer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[dict[str, Any]] = []
        self._pending: list[Callable[..., None]] = []

    def __call__(self, config: dict[str, Any]) -> FakeProducer:
        return self

    def produce(
        self, topic: str, value: bytes, key: bytes, headers: list[Any], on_delivery: Callable[..., None]
    ) -> None:
        self.sent.append({"topic": topic, "value": value, "headers": headers})
        self._pending.append(on_delivery)

    def flush(self, timeout: float) -> int:
        err = type(
            "Err", (), {"str": lambda _s: "broker down", "name": lambda _s: "_TRANSPORT", "fatal": lambda _s: False}
        )()
        for cb in self._pending:
            cb(err if self.fail else None, None)
        self._pending.clear()
        return 0

    def poll(self, timeout: float) -> int:
        return 0


class JournalStore(MemoryDedupStore):
    """A memory store that records its calls into the fake broker's journal (to check ordering)."""

    def __init__(self, journal: list[str]) -> None:
        super().__init__()
        self.journal = journal
        self.fail_claims = 0

    def complete_and_claim(self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float) -> ClaimResult:
        if self.fail_claims:
            self.fail_claims -= 1
            raise StoreError("store down")
        self.journal.append(f"store done={sorted(done_ids)} claim={sorted(ids)}")
        return super().complete_and_claim(done_ids, ids, lease_s)

    def complete(self, ids: Sequence[str]) -> None:
        self.journal.append(f"store done={sorted(ids)}")
        super().complete(ids)


def commits_after_done_records(journal: list[str]) -> int:
    """Check that each "commit 0:N" of the journal comes after the done records of e0..e(N-1); count them."""
    recorded: set[str] = set()
    commits = 0
    for entry in journal:
        if entry.startswith("store done="):
            recorded |= set(ast.literal_eval(entry.split("done=")[1].split(" claim=")[0]))
        elif entry.startswith("commit 0:"):
            upto = int(entry.split(":")[1])
            assert {f"e{i}" for i in range(upto)} <= recorded, f"{entry} before its done records"
            commits += 1
    return commits


def make(kafka: FakeKafka, handler: Callable[[Any], None], store: Any = None, **kw: Any) -> IdempotentConsumer:
    kw.setdefault("producer_factory", FakeProducer())
    return IdempotentConsumer(
        {"bootstrap.servers": "127.0.0.1:9", "group.id": "g"},
        kw.pop("topics_override", ["t"]),
        handler,
        store=store if store is not None else MemoryDedupStore(),
        consumer_factory=kafka,
        pause_s=0,
        store_retry=tenacity.Retrying(stop=tenacity.stop_after_attempt(1), reraise=True),
        **kw,
    )


def failing_on_boom(calls: list[int]) -> Callable[[Any], None]:
    """A handler that records each attempt's offset and fails on the value b"boom"."""

    def handler(msg: Any) -> None:
        calls.append(msg.offset())
        if msg.value() == b"boom":
            raise ValueError("boom")

    return handler


def test_default_event_id_reads_kcons_and_debezium_headers_and_rejects_bad_bytes() -> None:
    assert default_event_id(FakeMessage("t", 0, 0, b"", [("kcons-id", b"abc")])) == "abc"
    assert default_event_id(FakeMessage("t", 0, 0, b"", [("id", b'"dbz-1"')])) == "dbz-1"
    assert default_event_id(FakeMessage("t", 0, 0, b"", [("id", b"dbz-2"), ("kcons-id", b"k")])) == "k"
    assert default_event_id(FakeMessage("t", 0, 0, b"", None)) is None
    assert default_event_id(FakeMessage("t", 0, 0, b"", [("kcons-id", b"")])) is None
    with pytest.raises(DecodeError):
        default_event_id(FakeMessage("t", 0, 0, b"", [("kcons-id", b"\xff")]))


def test_bad_configuration_fails_at_construction_naming_the_setting() -> None:
    kafka = FakeKafka()
    with pytest.raises(ConfigError) as err:
        IdempotentConsumer({"bootstrap.servers": "x:1"}, ["t"], print, store=MemoryDedupStore())
    assert err.value.setting == "group.id"
    for kw, setting in [({"batch_size": 0}, "batch_size"), ({"retry": object()}, "retry"), ({"lease_s": 0}, "lease_s")]:
        with pytest.raises(ConfigError) as err:
            make(kafka, print, **kw)
        assert err.value.setting == setting


def test_auto_commit_is_forced_off_and_the_users_config_is_otherwise_kept() -> None:
    kafka = FakeKafka()
    IdempotentConsumer(
        {"bootstrap.servers": "h:1", "group.id": "g", "enable.auto.commit": True, "fetch.min.bytes": 7},
        ["t"], print, store=MemoryDedupStore(), consumer_factory=kafka,
    )  # fmt: skip
    assert kafka.config["enable.auto.commit"] is False
    assert kafka.config["fetch.min.bytes"] == 7


def test_offsets_are_committed_only_after_their_messages_are_recorded_done() -> None:
    kafka = FakeKafka(partitions=1)
    store = JournalStore(kafka.journal)
    consumer = make(kafka, lambda m: kafka.journal.append(f"handle {m.offset()}"), store=store)
    for batch in range(4):
        for i in range(3):
            kafka.add(0, f"e{batch * 3 + i}")
        consumer.poll_once()
    consumer.close()
    assert commits_after_done_records(kafka.journal) >= 2
    assert kafka.committed_offsets() == {0: 12}
    assert kafka.journal.index("handle 0") < kafka.journal.index(
        "store done=['e0', 'e1', 'e2'] claim=['e3', 'e4', 'e5']"
    )


def test_repeats_in_a_batch_and_done_ids_are_dropped_without_running_the_handler() -> None:
    kafka = FakeKafka(partitions=1)
    for event_id in ["a", "b", "a", "c", "b"]:
        kafka.add(0, event_id)
    seen: list[int] = []
    consumer = make(kafka, lambda m: seen.append(m.offset()))
    consumer.poll_once()
    kafka.add(0, "c")
    consumer.poll_once()
    consumer.close()
    assert seen == [0, 1, 3]
    assert consumer.stats.duplicates == 3
    assert kafka.committed_offsets() == {0: 6}


def test_a_busy_id_holds_its_partition_and_the_other_partitions_go_on() -> None:
    kafka = FakeKafka(partitions=2)
    kafka.add(0, "busy")
    kafka.add(0, "after-busy")
    kafka.add(1, "free")
    store = MemoryDedupStore()
    store.claim(["busy"], lease_s=60)  # another worker of the same store holds it
    seen: list[str] = []
    consumer = make(kafka, lambda m: seen.append(default_event_id(m) or ""), store=store)
    consumer.poll_once()
    consumer.poll_once()
    assert seen == ["free"]
    assert kafka.position[0] == 0, "rewound to the busy message"
    store.release(["busy"])
    consumer.poll_once()
    consumer.close()
    assert seen == ["free", "busy", "after-busy"]
    assert kafka.committed_offsets() == {0: 2, 1: 1}


def test_the_failed_first_attempt_counts_toward_the_retry_policy_then_the_message_is_dead_lettered() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, "bad", b"boom", headers=[("trace", b"x")])
    kafka.add(0, "good")
    calls: list[int] = []
    producer = FakeProducer()
    handler = failing_on_boom(calls)

    policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none(), reraise=True)
    consumer = make(kafka, handler, retry=policy, producer_factory=producer)
    consumer.poll_once()
    consumer.close()
    assert calls == [0, 0, 0, 1]
    assert len(producer.sent) == 1
    sent = producer.sent[0]
    assert sent["topic"] == "t.dlq" and sent["value"] == b"boom"
    headers = dict(sent["headers"])
    assert headers["trace"] == b"x" and headers["kcons-id"] == b"bad"
    assert headers[DLQ_SOURCE_HEADER] == b"t/0/0"
    assert headers[DLQ_REASON_HEADER] == b"ValueError: boom"
    assert (headers[DLQ_TOPIC_HEADER], headers[DLQ_PARTITION_HEADER], headers[DLQ_OFFSET_HEADER]) == (b"t", b"0", b"0")
    assert kafka.committed_offsets() == {0: 2}


def test_decode_errors_go_to_the_dead_letter_topic_without_retries() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, None, b"x", headers=[("kcons-id", b"\xfe")])
    kafka.add(0, "ok", b"decode-me")
    calls: list[bytes] = []

    def handler(msg: Any) -> None:
        calls.append(msg.value())
        raise DecodeError("payload is not JSON")

    producer = FakeProducer()
    consumer = make(kafka, handler, producer_factory=producer)
    consumer.poll_once()
    consumer.close()
    assert calls == [b"decode-me"]
    assert [dict(s["headers"])[DLQ_REASON_HEADER].split(b":")[0] for s in producer.sent] == [b"DecodeError"] * 2
    assert consumer.stats.dead_lettered == 2


def test_a_failed_dead_letter_write_keeps_the_offset_and_rewinds_to_the_poison_message() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, "a")
    kafka.add(0, "poison", b"poison")
    kafka.add(0, "c")

    def handler(msg: Any) -> None:
        if msg.value() == b"poison":
            raise DecodeError("poison")

    consumer = make(kafka, handler, producer_factory=FakeProducer(fail=True))
    consumer.poll_once()
    consumer.close()
    assert kafka.committed_offsets() == {0: 1}
    assert kafka.position[0] == 1
    assert consumer.stats.dead_lettered == 0


def test_retry_later_rewinds_and_pauses_only_that_partition() -> None:
    kafka = FakeKafka(partitions=2)
    kafka.add(0, "slow")
    kafka.add(1, "fast")
    refusals = [RetryLater(30.0)]

    def handler(msg: Any) -> None:
        if msg.partition() == 0 and refusals:
            raise refusals.pop()

    consumer = make(kafka, handler)
    consumer.poll_once()
    assert consumer.paused_partitions == [("t", 0)]
    assert kafka.paused == {0} and kafka.position[0] == 0
    consumer.close()
    assert kafka.committed_offsets() == {1: 1}


def test_a_store_outage_rewinds_every_partition_and_nothing_is_handled_or_committed() -> None:
    kafka = FakeKafka(partitions=2)
    kafka.add(0, "a")
    kafka.add(1, "b")
    store = JournalStore(kafka.journal)
    store.fail_claims = 1
    seen: list[str] = []
    consumer = make(kafka, lambda m: seen.append(default_event_id(m) or ""), store=store)
    assert consumer.poll_once() == 0
    assert seen == [] and kafka.commits == []
    assert kafka.position == {0: 0, 1: 0}
    consumer.poll_once()
    consumer.close()
    assert sorted(seen) == ["a", "b"]
    assert kafka.committed_offsets() == {0: 1, 1: 1}


def test_messages_without_an_id_are_deduplicated_by_position() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, None, b"x")
    seen: list[int] = []
    consumer = make(kafka, lambda m: seen.append(m.offset()))
    consumer.poll_once()
    kafka.seek(type("TP", (), {"partition": 0, "offset": 0})())  # a redelivery of the same record
    consumer.poll_once()
    consumer.close()
    assert seen == [0]
    assert consumer.stats.fallback_ids == 2 and consumer.stats.duplicates == 1


def test_revocation_writes_deferred_done_records_and_commits_them() -> None:
    from confluent_kafka import TopicPartition

    kafka = FakeKafka(partitions=1)
    kafka.add(0, "e")
    store = JournalStore(kafka.journal)
    consumer = make(kafka, lambda m: None, store=store)
    consumer.poll_once()
    assert kafka.commits == []
    kafka.callbacks["on_revoke"](kafka, [TopicPartition("t", 0)])
    assert kafka.journal.index("store done=['e']") < kafka.journal.index("commit 0:1")


def test_run_stops_after_max_messages_and_on_stop() -> None:
    kafka = FakeKafka(partitions=1)
    for i in range(10):
        kafka.add(0, f"e{i}")
    consumer = make(kafka, lambda m: None, batch_size=3)
    consumer.run(max_messages=5)
    assert 5 <= consumer.stats.handled < 10
    consumer.stop()
    consumer.run()
    consumer.close()


def test_the_consumer_metrics_count_consumed_duplicates_errors_dead_letters_and_store_latency() -> None:
    from prometheus_client import REGISTRY

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    names = [
        "kcons_consumer_consumed_total",
        "kcons_consumer_duplicates_dropped_total",
        "kcons_consumer_handler_errors_total",
        "kcons_consumer_dead_lettered_total",
        "kcons_consumer_fallback_ids_total",
        "kcons_consumer_batch_duration_seconds_count",
    ]
    latency = ("kcons_dedup_store_latency_seconds_count", {"store": "memory", "op": "claim"})
    group = {"group": "g"}  # every kcons_consumer_* metric carries the consumer group
    before = {n: value(n, group) for n in names} | {"latency": value(*latency)}
    kafka = FakeKafka(partitions=1)
    kafka.add(0, "a")
    kafka.add(0, "a")
    kafka.add(0, None, b"no id")
    kafka.add(0, "bad", b"bad")

    def handler(msg: Any) -> None:
        if msg.value() == b"bad":
            raise DecodeError("bad")

    consumer = make(kafka, handler)
    consumer.poll_once()
    consumer.close()
    delta = {n: value(n, group) - before[n] for n in names}
    assert delta == {
        "kcons_consumer_consumed_total": 4,
        "kcons_consumer_duplicates_dropped_total": 1,
        "kcons_consumer_handler_errors_total": 1,
        "kcons_consumer_dead_lettered_total": 1,
        "kcons_consumer_fallback_ids_total": 1,
        "kcons_consumer_batch_duration_seconds_count": 1,
    }
    assert value(*latency) - before["latency"] >= 1


def test_two_consumers_in_one_process_are_told_apart_by_their_group_label() -> None:
    from prometheus_client import REGISTRY

    def consumed(group: str) -> float:
        return REGISTRY.get_sample_value("kcons_consumer_consumed_total", {"group": group}) or 0.0

    before = {g: consumed(g) for g in ("orders-g", "billing-g")}
    consumers = []
    for group, n in (("orders-g", 3), ("billing-g", 1)):
        kafka = FakeKafka(partitions=1)
        for i in range(n):
            kafka.add(0, f"{group}-{i}")
        consumer = IdempotentConsumer(
            {"bootstrap.servers": "127.0.0.1:9", "group.id": group}, ["t"], lambda msg: None,
            store=MemoryDedupStore(), consumer_factory=kafka, producer_factory=FakeProducer(),
        )  # fmt: skip
        consumers.append(consumer)
    for consumer in consumers:
        consumer.poll_once()
        consumer.close()
    assert consumed("orders-g") - before["orders-g"] == 3
    assert consumed("billing-g") - before["billing-g"] == 1


def test_health_turns_bad_while_the_dedup_store_stays_down_and_recovers_with_it() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, "a")
    store = JournalStore(kafka.journal)
    store.fail_claims = 2
    consumer = make(kafka, lambda m: None, store=store)
    assert consumer.health()[0]
    consumer.poll_once()
    assert consumer.health(store_outage_s=30)[0], "a short outage is tolerated"
    healthy, detail = consumer.health(store_outage_s=0)
    assert not healthy and "store_failing_s" in detail
    consumer.poll_once()
    consumer.poll_once()
    assert consumer.health(store_outage_s=0)[0]
    consumer.close()
    assert not consumer.health()[0]


class OneCallPerStep:
    """A batch store without the pipelined call: every batch's offsets are committed right after it."""

    def __init__(self) -> None:
        self.inner = MemoryDedupStore()

    def claim(self, ids: Sequence[str], lease_s: float) -> set[str]:
        return self.inner.claim(ids, lease_s)

    def claim_batch(self, ids: Sequence[str], lease_s: float) -> ClaimResult:
        return self.inner.claim_batch(ids, lease_s)

    def complete(self, ids: Sequence[str]) -> None:
        self.inner.complete(ids)

    def release(self, ids: Sequence[str]) -> None:
        self.inner.release(ids)


def test_a_failed_asynchronous_commit_is_retried_unless_a_newer_commit_supersedes_it() -> None:
    from confluent_kafka import KafkaError, TopicPartition

    kafka = FakeKafka(partitions=2)
    for i in range(3):
        kafka.add(0, f"a{i}")
    kafka.add(1, "b0")
    consumer = make(kafka, lambda _m: None, store=OneCallPerStep(), batch_size=10)
    assert consumer.poll_once() == 4
    assert kafka.commits[-1] == {0: 3, 1: 1}
    on_commit = kafka.config["on_commit"]
    # The broker reports that commit failed: both offsets go into the next commit.
    on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT), [TopicPartition("t", 0, 3), TopicPartition("t", 1, 1)])
    kafka.add(0, "a3")
    assert consumer.poll_once() == 1
    assert kafka.commits[-1] == {0: 4, 1: 1}
    # An older failure arriving after a newer commit was sent is superseded, not retried.
    on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT), [TopicPartition("t", 0, 3)])
    kafka.add(1, "b1")
    assert consumer.poll_once() == 1
    assert kafka.commits[-1] == {1: 2}
    consumer.close()


def test_idle_and_close_commit_synchronously_and_sync_mode_never_commits_asynchronously() -> None:
    for async_commit in (True, False):
        kafka = FakeKafka(partitions=1)
        modes: list[bool] = []
        original = kafka.commit

        def commit(offsets: list[Any], asynchronous: bool, original: Any = original, modes: list[bool] = modes) -> Any:
            modes.append(asynchronous)
            return original(offsets, asynchronous)

        kafka.commit = commit  # type: ignore[method-assign]
        kafka.add(0, "x")
        consumer = make(kafka, lambda _m: None, store=OneCallPerStep(), async_commit=async_commit)
        consumer.poll_once()
        kafka.add(0, "y")
        consumer.poll_once()
        consumer.close()
        assert modes and modes[-1] is False  # close settles synchronously
        assert any(modes) is async_commit


def test_a_poll_that_just_went_idle_commits_without_waiting_and_a_longer_idle_stretch_settles_synchronously(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kcons.consumer import driver

    kafka = FakeKafka(partitions=1)
    sent: list[tuple[bool, dict[int, int]]] = []
    original = kafka.commit

    def commit(offsets: list[Any], asynchronous: bool) -> Any:
        sent.append((asynchronous, {tp.partition: tp.offset for tp in offsets}))
        return original(offsets, asynchronous)

    kafka.commit = commit  # type: ignore[method-assign]
    kafka.add(0, "x")
    # A long commit interval: the batch's offset stays ready until the consumer goes idle.
    consumer = make(kafka, lambda _m: None, store=OneCallPerStep(), commit_interval_s=60.0)
    assert consumer.poll_once() == 1
    kafka.add(0, "y")
    assert consumer.poll_once() == 1
    assert sent == [(True, {0: 1})]  # the first batch's commit; the second one waits for the interval
    assert consumer.poll_once() == 0  # just idle: sent at once, without waiting for the broker
    assert sent[-1] == (True, {0: 2})
    assert consumer.poll_once() == 0  # still idle, nothing new: nothing sent
    assert len(sent) == 2
    monkeypatch.setattr(driver, "IDLE_SETTLE_S", 0.0)
    assert consumer.poll_once() == 0  # idle long enough: the asynchronous commits are settled synchronously
    assert sent[-1] == (False, {0: 2})
    consumer.close()
    assert kafka.committed_offsets() == {0: 2}


def make_batched(kafka: FakeKafka, batch_handler: Callable[[list[Any]], None], **kw: Any) -> IdempotentConsumer:
    kw.setdefault("producer_factory", FakeProducer())
    return IdempotentConsumer(
        {"bootstrap.servers": "127.0.0.1:9", "group.id": "g"},
        ["t"],
        None,
        batch_handler=batch_handler,
        store=kw.pop("store", None) or MemoryDedupStore(),
        consumer_factory=kafka,
        pause_s=0,
        store_retry=tenacity.Retrying(stop=tenacity.stop_after_attempt(1), reraise=True),
        **kw,
    )


def test_a_batch_handler_gets_each_batchs_new_messages_once_in_order_without_duplicates() -> None:
    kafka = FakeKafka(partitions=1)
    for event_id in ["a", "b", "a", "c", "b"]:
        kafka.add(0, event_id)
    batches: list[list[str]] = []
    consumer = make_batched(kafka, lambda msgs: batches.append([default_event_id(m) or "" for m in msgs]))
    consumer.poll_once()
    kafka.add(0, "c")
    kafka.add(0, "d")
    consumer.poll_once()
    consumer.close()
    assert batches == [["a", "b", "c"], ["d"]]
    assert consumer.stats.duplicates == 3 and consumer.stats.handled == 4
    assert kafka.committed_offsets() == {0: 7}


def test_a_failed_batch_is_handled_one_message_at_a_time_and_only_the_bad_one_is_dead_lettered() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, "good-1")
    kafka.add(0, "bad", b"boom")
    kafka.add(0, "good-2")
    calls: list[list[int]] = []
    producer = FakeProducer()

    def batch_handler(msgs: list[Any]) -> None:
        calls.append([m.offset() for m in msgs])
        if any(m.value() == b"boom" for m in msgs):
            raise ValueError("boom")

    policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none(), reraise=True)
    consumer = make_batched(kafka, batch_handler, retry=policy, producer_factory=producer)
    consumer.poll_once()
    consumer.close()
    # The whole batch once, then one message at a time: the bad one twice (the retry policy), then dead-lettered.
    assert calls == [[0, 1, 2], [0], [1], [1], [2]]
    assert [dict(s["headers"])["kcons-id"] for s in producer.sent] == [b"bad"]
    assert consumer.stats.handled == 2 and consumer.stats.dead_lettered == 1
    assert kafka.committed_offsets() == {0: 3}


def test_a_batch_handler_never_gets_messages_behind_a_busy_id_and_retry_later_rewinds_the_batch() -> None:
    kafka = FakeKafka(partitions=2)
    kafka.add(0, "busy")
    kafka.add(0, "after-busy")
    kafka.add(1, "free-1")
    kafka.add(1, "free-2")
    store = MemoryDedupStore()
    store.claim(["busy"], lease_s=60)  # another worker holds it
    down = [True]
    calls = [0]
    batches: list[list[str]] = []

    def batch_handler(msgs: list[Any]) -> None:
        calls[0] += 1
        if down[0]:
            raise RetryLater(0, "downstream saturated")
        batches.append([default_event_id(m) or "" for m in msgs])

    consumer = make_batched(kafka, batch_handler, store=store)
    consumer.poll_once()  # the batch asks to retry later: held whole, not retried message by message
    assert calls == [1] and batches == [] and kafka.committed_offsets().get(1, 0) == 0
    assert kafka.position[1] == 0, "rewound to the first message of the partition"
    down[0] = False
    consumer.poll_once()
    assert batches == [["free-1", "free-2"]]
    store.release(["busy"])
    consumer.poll_once()
    consumer.close()
    assert batches == [["free-1", "free-2"], ["busy", "after-busy"]]
    assert kafka.committed_offsets() == {0: 2, 1: 2}


def test_exactly_one_of_handler_and_batch_handler_is_accepted() -> None:
    kafka = FakeKafka()
    for handler, batch_handler in [(None, None), (print, print)]:
        with pytest.raises(ConfigError) as err:
            IdempotentConsumer(
                {"bootstrap.servers": "h:1", "group.id": "g"}, ["t"], handler,
                batch_handler=batch_handler, store=MemoryDedupStore(), consumer_factory=kafka,
            )  # fmt: skip
        assert err.value.setting == "handler"


def test_a_failure_mid_batch_keeps_what_was_done_before_it_and_counts_its_first_attempt() -> None:
    kafka = FakeKafka(partitions=1)
    for event_id, value in [("a", b"ok"), ("b", b"boom"), ("c", b"ok")]:
        kafka.add(0, event_id, value)
    calls: list[int] = []
    producer = FakeProducer()
    handler = failing_on_boom(calls)

    policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none(), reraise=True)
    consumer = make(kafka, handler, retry=policy, producer_factory=producer)
    consumer.poll_once()
    consumer.close()
    assert calls == [0, 1, 1, 2]
    assert [dict(s["headers"])["kcons-id"] for s in producer.sent] == [b"b"]
    assert consumer.stats.handled == 2 and kafka.committed_offsets() == {0: 3}


def test_messages_of_a_partition_revoked_between_poll_and_consume_are_not_handled() -> None:
    from confluent_kafka import TopicPartition

    class RevokingKafka(FakeKafka):
        """Revokes partition 1 while the second read of a batch runs."""

        def __init__(self) -> None:
            super().__init__(partitions=2)
            self.revoke_next_consume = False

        def consume(self, n: int, timeout: float) -> list[FakeMessage]:
            out = super().consume(n, timeout)
            if self.revoke_next_consume and n > 1:
                self.revoke_next_consume = False
                self.callbacks["on_revoke"](self, [TopicPartition("t", 1)])
                del self.logs[1]
            return out

        def poll(self, timeout: float) -> FakeMessage | None:
            got = super().consume(1, timeout)
            self.revoke_next_consume = True
            return got[0] if got else None

    kafka = RevokingKafka()
    kafka.add(0, "a")
    kafka.add(1, "b")
    seen: list[str] = []
    consumer = make(kafka, lambda m: seen.append(default_event_id(m) or ""))
    consumer.poll_once()
    consumer.close()
    assert seen == ["a"], "the revoked partition's message is left to its new owner"
    assert kafka.committed_offsets() == {0: 1}


def test_a_batch_retry_later_still_dead_letters_the_poison_message_before_the_hold() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, None, headers=[("kcons-id", b"\xff")])  # an id that is not UTF-8: poison
    kafka.add(0, "fresh")
    producer = FakeProducer()

    def batch_handler(msgs: list[Any]) -> None:
        raise RetryLater(0, "downstream saturated")

    consumer = make_batched(kafka, batch_handler, producer_factory=producer)
    consumer.poll_once()
    assert len(producer.sent) == 1, "the poison message ahead of the held one is dead-lettered"
    assert kafka.position[0] == 1 and kafka.committed_offsets().get(0, 0) <= 1
    consumer.close()
    assert kafka.committed_offsets() == {0: 1}


def test_an_interrupt_mid_batch_records_the_messages_handled_before_it_done() -> None:
    kafka = FakeKafka(partitions=2)
    for i in range(6):
        kafka.add(i % 2, f"id-{i}", b"stop" if i == 3 else b"ok")
    handled: list[str] = []

    def handler(msg: Any) -> None:
        if msg.value() == b"stop":
            raise KeyboardInterrupt
        handled.append(dict(msg.headers())["kcons-id"].decode())

    store = MemoryDedupStore()
    consumer = make(kafka, handler, store=store)
    with pytest.raises(KeyboardInterrupt):
        consumer.poll_once()
    assert handled, "the batch reached the interrupting message"
    # What ran before the interrupt is done in the store; the rest is claimable again at once.
    result = store.claim_batch([f"id-{i}" for i in range(6)], lease_s=30)
    assert result.done == set(handled)
    assert result.claimed == {f"id-{i}" for i in range(6)} - set(handled)


def test_the_batch_fast_path_falls_back_per_message_for_other_headers_and_many_topics() -> None:
    from kcons.kafka.messages import end_offsets as _end_offsets
    from kcons.kafka.messages import header_ids as _header_ids

    a = FakeMessage("a", 0, 5, b"", [("kcons-id", b"x")])
    b = FakeMessage("a", 1, 7, b"", [("kcons-id", b"y")])
    c = FakeMessage("b", 0, 9, b"", [("kcons-id", b"z")])
    later = FakeMessage("a", 0, 6, b"", [("kcons-id", b"w")])
    assert _header_ids([a, b]) == ["x", "y"]
    assert _header_ids([a, FakeMessage("a", 0, 1, b"", [("other", b"1"), ("kcons-id", b"q")])]) is None
    assert _header_ids([a, FakeMessage("a", 0, 1, b"", None)]) is None
    assert _header_ids([a, FakeMessage("a", 0, 1, b"", [("kcons-id", b"")])]) is None
    assert _header_ids([a, FakeMessage("a", 0, 1, b"", [("kcons-id", "text")])]) is None
    assert _header_ids([a, FakeMessage("a", 0, 1, b"", [("kcons-id", b"\xff")])]) is None
    assert _end_offsets([a, b, later]) == {("a", 0): 7, ("a", 1): 8}
    assert _end_offsets([a, c, later]) == {("a", 0): 7, ("b", 0): 10}


class FailingComplete(OneCallPerStep):
    """A batch store whose done records fail while ``down`` is set (claims still work)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    def complete(self, ids: Sequence[str]) -> None:
        if self.down:
            raise StoreError("store down while recording done")
        super().complete(ids)


def test_no_offset_is_committed_past_a_handled_id_whose_done_record_failed_until_it_is_written() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, "a")
    store = FailingComplete()
    seen: list[str] = []
    consumer = make(kafka, lambda m: seen.append(default_event_id(m) or ""), store=store)
    consumer.poll_once()
    assert seen == ["a"] and kafka.commits == [], "handled, not recorded: not committed"
    kafka.add(0, "b")
    kafka.seek(type("TP", (), {"partition": 0, "offset": 0})())  # "a" is redelivered meanwhile
    consumer.poll_once()
    assert seen == ["a", "b"], "the unrecorded id still counts as done locally"
    assert kafka.commits == [], "nothing is committed past the unrecorded done id"
    consumer.poll_once()  # idle: the flush cannot write it either
    assert kafka.commits == []
    store.down = False
    consumer.poll_once()  # written before the batch, then the idle flush commits everything
    consumer.close()
    assert kafka.committed_offsets() == {0: 2}
    assert store.inner.claim_batch(["a", "b"], lease_s=30).done == {"a", "b"}


def test_a_bare_string_topic_is_rejected_instead_of_read_as_letters() -> None:
    with pytest.raises(ConfigError) as err:
        make(FakeKafka(), print, topics_override="orders")
    assert err.value.setting == "topics"


def test_the_transactional_consumer_checks_every_setting_before_it_connects() -> None:
    from kcons.adapters.sqlite import SqliteDedupStore
    from kcons.consumer import TransactionalIdempotentConsumer

    connects: list[int] = []

    def connect() -> Any:
        connects.append(1)
        raise AssertionError("connect() must not run before the settings are checked")

    cases: list[tuple[dict[str, Any], str]] = [
        ({"group.id": ""}, "group.id"),
        ({"batch_size": 0}, "batch_size"),
        ({"topics": "orders"}, "topics"),
        ({"batch_handler": print}, "batch_handler"),
        ({"store": MemoryDedupStore()}, "store"),
        ({"dlq_producer_config": {"acks": 1}}, "acks"),
    ]
    for override, setting in cases:
        kw = dict(override)
        cfg = {"bootstrap.servers": "h:1", "group.id": kw.pop("group.id", "g")}
        topics = kw.pop("topics", ["t"])
        store = kw.pop("store") if "store" in kw else SqliteDedupStore(":memory:", namespace="g")
        with pytest.raises(ConfigError) as err:
            TransactionalIdempotentConsumer(
                cfg, topics, lambda _m, _c: None, store=store, connect=connect, consumer_factory=FakeKafka(), **kw
            )
        assert err.value.setting == setting
    assert connects == []
    import sqlite3

    conn = sqlite3.connect(":memory:", isolation_level=None)
    consumer = TransactionalIdempotentConsumer(
        {"bootstrap.servers": "h:1", "group.id": "g"}, ["t"], lambda _m, _c: None,
        store=SqliteDedupStore(":memory:", namespace="g"), connect=lambda: connects.append(1) or conn,
        consumer_factory=FakeKafka(), producer_factory=FakeProducer(),
    )  # fmt: skip
    assert connects == [1] and consumer.connection is conn, "valid settings: connected once"


def test_without_a_store_every_message_is_new_and_poison_is_dead_lettered_while_the_rest_is_applied() -> None:
    kafka = FakeKafka(partitions=2)
    kafka.add(0, "same", b"1")
    kafka.add(0, "same", b"bad")
    kafka.add(0, "same", b"2")
    kafka.add(1, None, b"3")
    applied: list[bytes] = []

    def batch_handler(msgs: list[Any]) -> None:
        if any(m.value() == b"bad" for m in msgs):
            raise DecodeError("not a change event")
        applied.extend(m.value() for m in msgs)

    producer = FakeProducer()
    consumer = IdempotentConsumer(
        {"bootstrap.servers": "127.0.0.1:9", "group.id": "g"}, ["t"], None, batch_handler=batch_handler,
        store=None, consumer_factory=kafka, producer_factory=producer, pause_s=0,
    )  # fmt: skip
    consumer.poll_once()
    consumer.close()
    assert sorted(applied) == [b"1", b"2", b"3"], "repeated ids are not deduplicated without a store"
    assert [s["value"] for s in producer.sent] == [b"bad"]
    assert dict(producer.sent[0]["headers"])[DLQ_REASON_HEADER].startswith(b"DecodeError")
    assert consumer.stats.duplicates == 0 and consumer.stats.fallback_ids == 0
    assert kafka.committed_offsets() == {0: 3, 1: 1}


def test_store_capabilities_are_read_from_the_declaration_and_checked_against_the_methods() -> None:
    from kcons.dedup import StoreCapabilities, capabilities_of

    assert capabilities_of(MemoryDedupStore()) == StoreCapabilities(batch_claim=True, pipelined=True, in_process=True)
    assert capabilities_of(OneCallPerStep()) == StoreCapabilities(batch_claim=True)  # undeclared: inspected

    class Boasting(OneCallPerStep):
        capabilities = StoreCapabilities(batch_claim=True, pipelined=True)

    with pytest.raises(ConfigError) as err:
        make(FakeKafka(), print, store=Boasting())
    assert err.value.setting == "store" and "complete_and_claim" in str(err.value)


# One generated batch, run twice (fast path on and off) against the same stand-ins: same handler
# calls, same commits, same positions and pauses, same dead letters, same store state, same stats.
MESSAGE = st.tuples(
    st.integers(0, 2),  # partition
    st.one_of(st.none(), st.sampled_from([f"id-{i}" for i in range(12)]), st.just("\xff")),  # id (\xff: poison)
    st.sampled_from([b"ok", b"ok", b"ok", b"boom", b"decode", b"later"]),  # handler behaviour
)


Batches = list[list[tuple[int, str | None, bytes]]]


def generated_behaviour() -> Callable[[Any], None]:
    """The generated messages' handler: b"boom" fails, b"decode" is poison, b"later" asks once to be retried later."""
    later: set[tuple[int, int]] = set()

    def behave(msg: Any) -> None:
        if msg.value() == b"boom":
            raise ValueError("boom")
        if msg.value() == b"decode":
            raise DecodeError("bad payload")
        if msg.value() == b"later" and (msg.partition(), msg.offset()) not in later:
            later.add((msg.partition(), msg.offset()))
            raise RetryLater(0)

    return behave


def _outcome_run(batches: Batches, done_before: list[str], busy: list[str], *, batched: bool, fast: bool) -> Any:
    kafka = FakeKafka(partitions=3)
    store = MemoryDedupStore()
    if done_before:
        store.complete(done_before)
    if busy:
        store.claim(busy, lease_s=60)  # held by another worker: busy
    calls: list[tuple[int, int]] = []
    behave = generated_behaviour()

    def effect(msg: Any) -> None:
        calls.append((msg.partition(), msg.offset()))
        behave(msg)

    def batch_handler(msgs: list[Any]) -> None:
        for msg in msgs:
            effect(msg)

    producer = FakeProducer()
    policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none(), reraise=True)
    consumer = (
        make_batched(kafka, batch_handler, store=store, retry=policy, producer_factory=producer)
        if batched
        else make(kafka, effect, store=store, retry=policy, producer_factory=producer)
    )
    consumer._fast_path = fast  # type: ignore[attr-defined]
    for batch in batches:
        for partition, event_id, value in batch:
            if event_id == "\xff":
                kafka.add(partition, None, value, headers=[("kcons-id", b"\xff")])
            else:
                kafka.add(partition, event_id, value)
        consumer.poll_once()
    consumer.poll_once()
    consumer.close()
    return {
        "calls": calls,
        "commits": kafka.commits,
        "positions": kafka.position,
        "paused": kafka.paused,
        "dead_letters": [(s["topic"], s["value"], dict(s["headers"])["kcons-dlq-offset"]) for s in producer.sent],
        "stats": consumer.stats,
        "store": sorted((k, v[0]) for k, v in store._entries.items()),  # type: ignore[attr-defined]
    }


@settings(max_examples=150, deadline=None)
@given(
    batches=st.lists(st.lists(MESSAGE, min_size=1, max_size=8), min_size=1, max_size=3),
    done_before=st.lists(st.sampled_from([f"id-{i}" for i in range(12)]), max_size=2),
    busy=st.lists(st.sampled_from([f"id-{i}" for i in range(12)]), max_size=1),
    batched=st.booleans(),
)
def test_the_fast_path_and_the_general_path_give_the_same_outcome(
    batches: Batches, done_before: list[str], busy: list[str], batched: bool
) -> None:
    fast = _outcome_run(batches, done_before, busy, batched=batched, fast=True)
    general = _outcome_run(batches, done_before, busy, batched=batched, fast=False)
    assert fast == general


def test_a_real_id_that_looks_like_a_position_never_makes_an_id_less_message_a_duplicate() -> None:
    kafka = FakeKafka(partitions=1)
    kafka.add(0, "t/0/1", value=b"real")  # a real id spelled like the position of the next message
    kafka.add(0, None, value=b"id-less")  # offset 1 of topic t: its made-up id must differ
    handled: list[bytes] = []
    consumer = make(kafka, lambda m: handled.append(m.value()))
    consumer.poll_once()
    consumer.close()
    assert handled == [b"real", b"id-less"]
    assert kafka.committed_offsets() == {0: 2}


def test_an_id_header_with_the_reserved_position_prefix_is_poison_not_a_collision() -> None:
    from kcons.envelope import POSITION_ID_PREFIX

    kafka = FakeKafka(partitions=1)
    kafka.add(0, None, value=b"id-less")
    kafka.add(0, POSITION_ID_PREFIX + "t/0/0", value=b"forged")
    producer = FakeProducer()
    handled: list[bytes] = []
    consumer = make(kafka, lambda m: handled.append(m.value()), producer_factory=producer)
    consumer.poll_once()
    consumer.close()
    assert handled == [b"id-less"]
    assert [m["value"] for m in producer.sent] == [b"forged"]


def test_the_consumer_and_the_envelope_take_the_first_of_two_kcons_id_headers() -> None:
    from kcons.envelope import read_envelope

    headers = [("kcons-id", b"first"), ("kcons-type", b"t"), ("kcons-id", b"second")]
    msg = FakeMessage("t", 0, 0, b"v", headers)
    assert default_event_id(msg) == "first"
    env = read_envelope(b"k", b"v", headers)
    assert env is not None and env.id == "first"
    late = [("kcons-type", b"t"), ("kcons-id", b"first"), ("kcons-id", b"second")]  # not the fast path
    assert default_event_id(FakeMessage("t", 0, 0, b"v", late)) == "first"
    env = read_envelope(b"k", b"v", late)
    assert env is not None and env.id == "first"
