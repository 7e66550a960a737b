"""Pure-logic tests of the producer: unsafe settings are refused, safe ones are forced, event ids are UUIDv7."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message

from kcons.errors import ConfigError, DeliveryError
from kcons.kafka.futures import DeliveryFuture
from kcons.kafka.producer import IdempotentProducer, _kafka_exception_of, check_producer_config, fast_event_id, wrap

BASE = {"bootstrap.servers": "127.0.0.1:1"}


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ({"enable.idempotence": False}, "enable.idempotence"),
        ({"enable.idempotence": "false"}, "enable.idempotence"),
        ({"acks": 1}, "acks"),
        ({"acks": "0"}, "acks"),
        ({"request.required.acks": "1"}, "request.required.acks"),
        ({"max.in.flight.requests.per.connection": 6}, "max.in.flight.requests.per.connection"),
        ({"retries": 0}, "retries"),
        ({"message.send.max.retries": "0"}, "message.send.max.retries"),
    ],
)
def test_unsafe_setting_is_rejected_naming_the_property(override: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_producer_config({**BASE, **override}, transactional=False)
    assert info.value.setting == setting


def test_transactions_without_transactional_id_are_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        check_producer_config(BASE, transactional=True)
    assert info.value.setting == "transactional.id"


def test_transactional_id_on_an_idempotent_producer_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        IdempotentProducer({**BASE, "transactional.id": "x"})
    assert info.value.setting == "transactional.id"


def test_missing_bootstrap_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        check_producer_config({}, transactional=False)
    assert info.value.setting == "bootstrap.servers"


def test_safe_config_forces_idempotence_and_acks_all_and_keeps_the_rest() -> None:
    cfg = check_producer_config({**BASE, "acks": -1, "linger.ms": 7, "enable.idempotence": "true"}, transactional=False)
    assert cfg["enable.idempotence"] is True
    assert cfg["acks"] == "all"
    assert cfg["linger.ms"] == 7


def test_request_required_acks_alias_is_replaced_by_acks_all() -> None:
    cfg = check_producer_config({**BASE, "request.required.acks": "all"}, transactional=False)
    assert "request.required.acks" not in cfg
    assert cfg["acks"] == "all"


def test_wrap_of_a_config_without_transactional_id_is_idempotent() -> None:
    producer = wrap(dict(BASE))
    try:
        assert type(producer) is IdempotentProducer
    finally:
        producer.close(0.1)


def test_produce_after_close_raises_instead_of_queueing() -> None:
    from kcons.errors import FatalKafkaError

    producer = IdempotentProducer(dict(BASE))
    producer.close(0.1)
    with pytest.raises(FatalKafkaError):
        producer.produce("t", b"v")


def test_close_fails_the_futures_of_unacknowledged_messages() -> None:
    from kcons.errors import DeliveryError

    producer = IdempotentProducer(dict(BASE), close_timeout_s=1.0)
    fut = producer.produce("t", b"v")
    producer.close(0.1)
    assert isinstance(fut.exception(timeout=5), DeliveryError)


def test_event_ids_are_uuid7_unique_and_increasing() -> None:
    ids = [fast_event_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for raw in (ids[0], ids[-1]):
        parsed = uuid.UUID(raw.decode())
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed).encode() == raw


def test_event_ids_from_many_threads_are_unique_and_increase_within_each_thread() -> None:
    per_thread: list[list[bytes]] = [[] for _ in range(4)]

    def draw(out: list[bytes]) -> None:
        for _ in range(30_000):  # more than 4096 per millisecond at times: the sequence borrows ahead
            out.append(fast_event_id())

    threads = [threading.Thread(target=draw, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for out in per_thread for i in out]
    assert len(set(everything)) == len(everything) == 120_000
    for out in per_thread:
        assert out == sorted(out)


def test_event_ids_follow_the_clock_borrow_ahead_when_it_stands_still_and_stay_in_order_when_it_goes_back() -> None:
    from kcons.ids import _event_id_source

    gen = _event_id_source()
    now = [1_700_000_000_123_456_789]

    def clock() -> int:
        return now[0]

    def ms_of(raw: bytes) -> int:
        return uuid.UUID(raw.decode()).int >> 80

    first = gen(clock)
    assert ms_of(first) == now[0] // 1_000_000
    same_ms = [gen(clock) for _ in range(5000)]  # more than the 4096 sequence numbers of one millisecond
    assert ms_of(same_ms[4094]) == now[0] // 1_000_000
    assert ms_of(same_ms[-1]) == now[0] // 1_000_000 + 1  # borrowed the next millisecond
    now[0] -= 5_000_000  # the clock goes back 5 ms
    back = [gen(clock) for _ in range(10)]
    now[0] += 20_000_000  # and then well ahead
    ahead = gen(clock)
    assert ms_of(ahead) == now[0] // 1_000_000
    everything = [first, *same_ms, *back, ahead]
    assert everything == sorted(everything)
    assert len(set(everything)) == len(everything)
    for raw in everything[::997]:
        parsed = uuid.UUID(raw.decode())
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122 and str(parsed).encode() == raw


def test_a_bare_system_error_from_flush_is_read_as_the_fatal_error_reported_before_it() -> None:
    producer = IdempotentProducer(dict(BASE), close_timeout_s=1.0)
    bare = SystemError("<method 'flush' of 'cimpl.Producer' objects> returned NULL without setting an exception")
    assert producer._client.exception_behind(bare) is None  # nothing reported: the SystemError stays as it is
    fenced = KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True)
    producer._client._on_error(fenced)
    behind = producer._client.exception_behind(bare)
    assert behind is not None and behind.args[0].code() == KafkaError._FENCED
    producer.close(0.1)


def test_a_serializing_producer_is_rejected_by_name() -> None:
    from confluent_kafka import SerializingProducer

    with pytest.raises(TypeError, match="SerializingProducer"):
        wrap(SerializingProducer(dict(BASE)))


def test_fatal_error_hidden_behind_a_system_error_is_found() -> None:
    kexc = KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    try:
        try:
            raise kexc
        except KafkaException as inner:
            raise SystemError("returned a result with an exception set") from inner
    except SystemError as outer:
        assert _kafka_exception_of(outer) is kexc
    assert _kafka_exception_of(ValueError("x")) is None


def test_state_error_inside_a_transaction_is_abortable_and_outside_it_is_not() -> None:
    from kcons.errors import ErrorClass, classify_kafka_error

    err = KafkaError(KafkaError._STATE, "Unable to produce message")
    assert classify_kafka_error(err, in_transaction=True) is ErrorClass.ABORTABLE
    assert classify_kafka_error(err) is ErrorClass.PERMANENT


def test_a_cancelled_future_does_not_break_the_delivery_of_the_others() -> None:
    producer = IdempotentProducer({"bootstrap.servers": "127.0.0.1:9"}, close_timeout_s=0.5)
    tracker = producer._tracker
    cancelled, failed_cancelled, kept = (DeliveryFuture(tracker) for _ in range(3))
    tracker.pending.update((cancelled, failed_cancelled, kept))
    assert cancelled.cancel() and failed_cancelled.cancel()
    report = Message(topic="t", partition=0, offset=3, key=None, value=b"v", timestamp=(1, 1_700_000_000_000))
    cancelled(None, report)
    err = KafkaError(KafkaError._MSG_TIMED_OUT, "timed out")
    failed_cancelled(err, report)
    kept(None, report)
    assert cancelled.cancelled() and failed_cancelled.cancelled() and kept.result(0).offset() == 3
    producer.close(0.1)


def test_producer_futures_are_built_like_the_public_constructor() -> None:
    """produce() fills a future's slots itself (no __init__ call per message): the same state as the constructor."""
    producer = IdempotentProducer({"bootstrap.servers": "127.0.0.1:9"}, close_timeout_s=0.5)
    fut = producer.produce("t", b"value", b"key", block=False)
    event_id = fut._headers
    assert isinstance(event_id, bytes)
    built = DeliveryFuture(producer._tracker, b"value", "t", b"key", event_id)
    assert {s: getattr(fut, s) for s in _set_slots(fut)} == {s: getattr(built, s) for s in _set_slots(built)}
    assert type(fut) is DeliveryFuture and fut in producer._tracker.pending
    producer.close(0.1)
    assert isinstance(fut.exception(0), DeliveryError)


def _set_slots(obj: object) -> list[str]:
    return [s for s in type(obj).__slots__ if hasattr(obj, s)]


@pytest.mark.parametrize("event_ids", [True, False])
@pytest.mark.parametrize("as_dict", [False, True])
def test_result_headers_are_those_sent_even_when_the_caller_reuses_its_headers(event_ids: bool, as_dict: bool) -> None:
    """The Message of result() carries the headers produce() sent, not what the caller's list or dict holds later."""
    producer = IdempotentProducer({"bootstrap.servers": "127.0.0.1:9"}, close_timeout_s=0.5, event_ids=event_ids)
    sent: list[tuple[str, bytes | str | None]] = [("kcons-id", b"0190-caller-id"), ("trace", b"one")]
    headers: Any = dict(sent) if as_dict else list(sent)
    fut = producer.produce("t", b"v", headers=headers, block=False)
    if as_dict:
        headers["trace"] = b"two"  # the caller reuses its headers for the next message
        headers["extra"] = b"x"
    else:
        headers[1] = ("trace", b"two")
        headers.append(("extra", b"x"))
    fut(None, Message(topic="t", partition=0, offset=7, key=None, value=b"v", timestamp=(1, 1_700_000_000_000)))
    assert fut.result(0).headers() == sent
    producer.close(0.1)


class _CountingRaw:
    """The raw producer with its produce calls counted.

    ``len()`` of a raw producer also counts queued error events (connection refused to the
    unreachable test bootstrap), so it cannot tell whether a message went to librdkafka.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.produced = 0

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.produced += 1
        self.raw.produce(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _counting_producer() -> tuple[IdempotentProducer, _CountingRaw]:
    producer = IdempotentProducer({"bootstrap.servers": "127.0.0.1:9"}, close_timeout_s=0.5)
    counting = _CountingRaw(producer._client.raw)
    producer._client.raw = counting  # type: ignore[assignment]
    return producer, counting


class _SwappedDuringAdd(set[Any]):
    """The pending set as another thread's fail_pending leaves it: swapped out (and drained) around ``add``."""

    def __init__(self, tracker: Any, *, fail_first: bool) -> None:
        super().__init__()
        self.tracker = tracker
        self.fail_first = fail_first  # True: the swap drains the set before the add lands; False: after it

    def add(self, item: Any) -> None:
        if not self.fail_first:
            super().add(item)
        self.tracker.fail_pending(lambda: DeliveryError("aborted by another thread"))
        if self.fail_first:
            super().add(item)


def test_a_future_registered_while_another_thread_swaps_the_pending_set_still_completes() -> None:
    """produce() racing fail_pending: a future added to the set just swapped out is registered again and completes."""
    producer, counting = _counting_producer()
    tracker = producer._tracker
    tracker.pending = _SwappedDuringAdd(tracker, fail_first=True)
    fut = producer.produce("t", b"value", block=False)
    assert not fut.done() and fut in tracker.pending  # in the set the next fail_pending (or its report) settles
    assert counting.produced == 1
    producer.close(0.1)
    assert isinstance(fut.exception(0), DeliveryError)


def test_a_future_failed_by_a_concurrent_abort_before_it_was_produced_is_not_produced() -> None:
    """produce() racing fail_pending that failed the future first: it stays failed and nothing goes to librdkafka."""
    producer, counting = _counting_producer()
    tracker = producer._tracker
    tracker.pending = _SwappedDuringAdd(tracker, fail_first=False)
    fut = producer.produce("t", b"value", block=False)
    assert "aborted by another thread" in str(fut.exception(0))
    assert counting.produced == 0 and not tracker.pending
    producer.close(0.1)
