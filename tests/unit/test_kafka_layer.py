"""kcons.kafka's pure parts: config checks, bounded close, consumed-message rule, batch source, DLQ bookkeeping."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError

from kcons.errors import ConfigError, FatalKafkaError, KafkaOperationError, ProducerFencedError
from kcons.ids import MAX_ID_LENGTH, fast_event_id, new_event_id, storage_id, uuid7
from kcons.kafka.client import (
    check_consumer_config,
    check_producer_config,
    close_bounded,
    shared_client_config,
)
from kcons.kafka.dlq import (
    DLQ_OFFSET_HEADER,
    DLQ_PARTITION_HEADER,
    DLQ_REASON_HEADER,
    DLQ_SOURCE_HEADER,
    DLQ_TOPIC_HEADER,
    DeadLetterWriter,
    dead_letter_config,
    dead_letter_headers,
)
from kcons.kafka.loop import BatchSource
from kcons.kafka.messages import BY_NAME, NATIVE, access, check_consumed, end_offsets, header_ids


class FakeMsg:
    """A consumed message as a test double (not a confluent-kafka Message: read by method name)."""

    def __init__(self, topic: str, partition: int, offset: int, *, error: Any = None, headers: Any = None) -> None:
        self._t, self._p, self._o, self._e, self._h = topic, partition, offset, error, headers

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def error(self) -> Any:
        return self._e

    def headers(self) -> Any:
        return self._h

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v" + str(self._o).encode()


def eof() -> KafkaError:
    return KafkaError(KafkaError._PARTITION_EOF)


# --- client -------------------------------------------------------------------------------


def test_consumer_config_check_names_the_bad_property() -> None:
    base = {"bootstrap.servers": "b:9092", "group.id": "g"}
    with pytest.raises(ConfigError) as info:
        check_consumer_config({**base, "enable.auto.commit": "true"})
    assert info.value.setting == "enable.auto.commit"
    with pytest.raises(ConfigError) as info:
        check_consumer_config({"bootstrap.servers": "b:9092"})
    assert info.value.setting == "group.id"
    cfg = check_consumer_config(base)
    assert cfg["isolation.level"] == "read_committed" and cfg["enable.auto.commit"] is False


def test_producer_config_check_forces_idempotence_and_acks_all() -> None:
    cfg = check_producer_config({"bootstrap.servers": "b:9092", "request.required.acks": -1}, transactional=False)
    assert cfg["enable.idempotence"] is True and cfg["acks"] == "all" and "request.required.acks" not in cfg


def test_shared_client_config_keeps_connection_and_security_only() -> None:
    source = {
        "bootstrap.servers": "b:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "ssl.ca.location": "/ca",
        "client.id": "app",
        "group.id": "g",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    }
    assert shared_client_config(source) == {
        "bootstrap.servers": "b:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "ssl.ca.location": "/ca",
        "client.id": "app",
    }


def test_close_bounded_returns_after_the_bound_when_close_hangs() -> None:
    release = threading.Event()
    started = time.monotonic()
    assert close_bounded(release.wait, 0.2, "test client") is False
    assert time.monotonic() - started < 2.0
    release.set()


def test_close_bounded_reports_a_finished_close_and_swallows_its_error() -> None:
    calls: list[int] = []

    def close() -> None:
        calls.append(1)
        raise RuntimeError("already closed")

    assert close_bounded(close, 5.0, "test client") is True
    assert calls == [1]


# --- messages -------------------------------------------------------------------------------


def test_check_consumed_returns_a_clean_batch_as_it_is() -> None:
    msgs: list[Any] = [FakeMsg("t", 0, i) for i in range(3)]
    assert check_consumed(msgs) is msgs


def test_check_consumed_drops_end_of_partition_and_transient_errors_keeping_order() -> None:
    msgs: list[Any] = [
        FakeMsg("t", 0, 0),
        FakeMsg("t", 0, -1, error=eof()),
        FakeMsg("t", 1, 5),
        FakeMsg("t", 1, -1, error=KafkaError(KafkaError._TRANSPORT)),
        FakeMsg("t", 0, 1),
    ]
    assert [(m.partition(), m.offset()) for m in check_consumed(msgs)] == [(0, 0), (1, 5), (0, 1)]


def test_check_consumed_raises_a_fatal_error_as_its_typed_exception() -> None:
    fatal = KafkaError(KafkaError._FATAL, "broken", fatal=True)
    with pytest.raises(FatalKafkaError):
        check_consumed([FakeMsg("t", 0, 0), FakeMsg("t", 0, -1, error=fatal)])


def test_check_consumed_raises_fencing_as_fenced_not_as_a_warning() -> None:
    fenced = KafkaError(KafkaError._FENCED, "fenced by a newer instance")
    with pytest.raises(ProducerFencedError):
        check_consumed([FakeMsg("t", 0, -1, error=fenced)])


def test_accessors_by_name_for_test_doubles() -> None:
    msgs: list[Any] = [FakeMsg("t", 0, 0)]
    assert access(msgs) is BY_NAME
    assert access([]) is NATIVE


def test_header_ids_read_the_first_kcons_id_header_of_every_message_or_give_up() -> None:
    a, b = new_event_id(), new_event_id()
    good: list[Any] = [FakeMsg("t", 0, 0, headers=[("kcons-id", a.encode())]),
                       FakeMsg("t", 0, 1, headers=[("kcons-id", b.encode()), ("x", b"1")])]  # fmt: skip
    assert header_ids(good) == [a, b]
    assert header_ids([*good, FakeMsg("t", 0, 2, headers=None)]) is None
    assert header_ids([*good, FakeMsg("t", 0, 2, headers=[("other", b"x")])]) is None
    assert header_ids([FakeMsg("t", 0, 2, headers=[("kcons-id", b"")])]) is None
    assert header_ids([FakeMsg("t", 0, 2, headers=[("kcons-id", b"\xff")])]) is None


def test_end_offsets_give_the_offset_after_each_partitions_last_message() -> None:
    one_topic: list[Any] = [FakeMsg("t", 0, 3), FakeMsg("t", 1, 7), FakeMsg("t", 0, 4)]
    assert end_offsets(one_topic) == {("t", 0): 5, ("t", 1): 8}
    two_topics: list[Any] = [FakeMsg("a", 0, 3), FakeMsg("b", 0, 9), FakeMsg("a", 0, 4)]
    assert end_offsets(two_topics) == {("a", 0): 5, ("b", 0): 10}


# --- the batch source -----------------------------------------------------------------------


class TP:
    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition


class FakeConsumer:
    """poll/consume over a scripted queue; ``revoke_during_consume`` revokes partition 1 inside consume()."""

    def __init__(self, msgs: list[Any], *, revoke_during_consume: bool = False) -> None:
        self.queue = list(msgs)
        self.assigned = {("t", 0), ("t", 1)}
        self.revoke_during_consume = revoke_during_consume
        self.callbacks: dict[str, Any] = {}
        self.calls: list[tuple[str, float]] = []

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def poll(self, timeout: float) -> Any:
        self.calls.append(("poll", timeout))
        return self.queue.pop(0) if self.queue else None

    def consume(self, n: int, timeout: float) -> list[Any]:
        self.calls.append(("consume", timeout))
        if self.revoke_during_consume:
            self.assigned.discard(("t", 1))
            self.callbacks["on_revoke"](self, [TP("t", 1)])
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def assignment(self) -> list[TP]:
        return [TP(t, p) for t, p in sorted(self.assigned)]


def test_batch_source_waits_for_the_first_message_then_takes_only_what_is_fetched() -> None:
    consumer = FakeConsumer([FakeMsg("t", 0, i) for i in range(5)])
    source = BatchSource(consumer, batch_size=3, timeout_s=0.7)
    assert [m.offset() for m in source.poll()] == [0, 1, 2]
    assert consumer.calls == [("poll", 0.7), ("consume", 0)]
    assert [m.offset() for m in source.poll()] == [3, 4]
    assert source.poll() == []


def test_batch_source_drops_messages_of_a_partition_revoked_while_reading_and_forwards_the_callback() -> None:
    consumer = FakeConsumer(
        [FakeMsg("t", 0, 0), FakeMsg("t", 1, 0), FakeMsg("t", 0, 1), FakeMsg("t", 1, 1)], revoke_during_consume=True
    )
    revoked: list[list[Any]] = []
    source = BatchSource(consumer, batch_size=10, timeout_s=0.1)
    source.subscribe(["t"], on_revoke=lambda _c, parts: revoked.append(parts))
    batch = source.poll()
    assert [(m.partition(), m.offset()) for m in batch] == [(0, 0), (0, 1)]
    assert len(revoked) == 1 and source.rebalances == 1


def test_batch_source_applies_the_consumed_message_rule() -> None:
    consumer = FakeConsumer([FakeMsg("t", 0, 0), FakeMsg("t", 0, -1, error=eof()), FakeMsg("t", 0, 1)])
    source = BatchSource(consumer, batch_size=10, timeout_s=0.1)
    assert [m.offset() for m in source.poll()] == [0, 1]


def test_batch_source_of_one_never_calls_consume() -> None:
    consumer = FakeConsumer([FakeMsg("t", 0, 0), FakeMsg("t", 0, 1)])
    source = BatchSource(consumer, batch_size=1, timeout_s=0.1)
    assert [m.offset() for m in source.poll()] == [0]
    assert [c for c, _ in consumer.calls] == ["poll"]


# --- dead-letter writer ---------------------------------------------------------------------


class FakeProducer:
    """Acknowledges every produce except those to topics in ``failing``; ``silent`` topics never answer."""

    def __init__(self, config: dict[str, Any], failing: set[str] = frozenset(), silent: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.config = config
        self.failing, self.silent = failing, silent
        self.pending: list[tuple[Any, str]] = []
        self.records: list[dict[str, Any]] = []
        self.closed = False

    def produce(self, topic: str, *, value: Any, key: Any, headers: Any, on_delivery: Any) -> None:
        self.records.append({"topic": topic, "value": value, "key": key, "headers": headers})
        if topic not in self.silent:
            self.pending.append((on_delivery, topic))

    def poll(self, _timeout: float) -> int:
        return self.flush(0)

    def flush(self, _timeout: float) -> int:
        pending, self.pending = self.pending, []
        for cb, topic in pending:
            cb(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if topic in self.failing else None, None)
        return sum(1 for r in self.records if r["topic"] in self.silent)

    def close(self) -> None:
        self.closed = True


def test_dead_letter_headers_keep_the_originals_and_add_reason_and_position() -> None:
    msg = FakeMsg("orders", 2, 41, headers=[("kcons-id", b"abc"), ("trace", b"t")])
    headers = dead_letter_headers(msg, "DecodeError: bad json")
    assert headers[:2] == [("kcons-id", b"abc"), ("trace", b"t")]
    extra = dict(headers[2:])
    assert extra == {
        DLQ_REASON_HEADER: b"DecodeError: bad json",
        DLQ_SOURCE_HEADER: b"orders/2/41",
        DLQ_TOPIC_HEADER: b"orders",
        DLQ_PARTITION_HEADER: b"2",
        DLQ_OFFSET_HEADER: b"41",
    }


def test_dead_letter_reason_is_bounded() -> None:
    reason = dict(dead_letter_headers(FakeMsg("t", 0, 0), "x" * 5000))[DLQ_REASON_HEADER]
    assert isinstance(reason, bytes) and len(reason) == 1000 and reason.endswith(b"...")


def test_dead_letter_producer_is_idempotent_with_acks_all_and_the_source_connection() -> None:
    cfg = dead_letter_config(
        {"bootstrap.servers": "b:9092", "group.id": "g", "sasl.username": "u"}, {"linger.ms": 50}
    )
    assert cfg["enable.idempotence"] is True and cfg["acks"] == "all"
    assert cfg["sasl.username"] == "u" and cfg["linger.ms"] == 50 and "group.id" not in cfg
    with pytest.raises(ConfigError) as info:
        dead_letter_config({"bootstrap.servers": "b:9092"}, {"acks": 1})
    assert info.value.setting == "acks"


def test_dead_letter_writer_reports_which_writes_were_acknowledged() -> None:
    made: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        made.append(FakeProducer(config, failing={"bad.dlq"}, silent={"slow.dlq"}))
        return made[-1]

    writer = DeadLetterWriter({"bootstrap.servers": "b:9092"}, timeout_s=0.5, producer_factory=factory)
    poison = [(FakeMsg("ok", 0, 1), "r1"), (FakeMsg("bad", 0, 2), "r2"), (FakeMsg("slow", 0, 3), "r3"),
              (FakeMsg("ok", 0, 4), "r4")]  # fmt: skip
    report = writer.write(poison)
    assert report.total == 4 and report.acknowledged == 2 and not report.ok
    assert [report.is_acknowledged(i) for i in range(4)] == [True, False, False, True]
    assert "MSG_SIZE_TOO_LARGE" in report.failed[1]
    assert report.failed[2] == "not acknowledged in time"
    assert [r["topic"] for r in made[0].records] == ["ok.dlq", "bad.dlq", "slow.dlq", "ok.dlq"]
    assert writer.write([]).ok
    writer.close(0.1)
    assert made[0].closed


def test_dead_letter_writer_makes_one_producer_and_reuses_it() -> None:
    made: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        made.append(FakeProducer(config))
        return made[-1]

    writer = DeadLetterWriter({"bootstrap.servers": "b:9092"}, producer_factory=factory)
    assert writer.write([(FakeMsg("a", 0, 0), "r")]).ok
    assert writer.write([(FakeMsg("a", 0, 1), "r")]).ok
    assert len(made) == 1


# --- ids ------------------------------------------------------------------------------------


def test_all_id_forms_come_from_the_one_generator_and_increase() -> None:
    ids = [fast_event_id().decode(), new_event_id(), str(uuid7()), fast_event_id().decode()]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert all(uuid.UUID(i).version == 7 for i in ids)


def test_storage_id_keeps_a_short_id_and_hashes_a_long_one() -> None:
    short = "x" * MAX_ID_LENGTH
    assert storage_id(short) == short
    hashed = storage_id(short + "y")
    assert hashed.startswith("sha256:") and len(hashed) == len("sha256:") + 64
    assert storage_id(short + "y") == hashed


def test_failed_consume_call_raises_the_typed_error() -> None:
    from confluent_kafka import KafkaException

    class Broken(FakeConsumer):
        def poll(self, timeout: float) -> Any:
            raise KafkaException(KafkaError(KafkaError._FATAL, "gone", fatal=True))

    with pytest.raises(KafkaOperationError):
        BatchSource(Broken([]), batch_size=2, timeout_s=0.1).poll()
