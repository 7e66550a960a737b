"""DeliveryFuture keeps the concurrent.futures.Future contract, including waiters racing the delivery thread.

Pure Python (no broker): run on every supported Python version.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import pytest
from confluent_kafka import Message

from kcons.errors import DeliveryError
from kcons.kafka.futures import CallbackDeliveryFuture, DeliveryFuture, DeliveryTracker


def _report(value: bytes | None = b"v", offset: int = 7, partition: int = 2) -> Message:
    """A delivery report as confluent-kafka hands it over: its own copies of the key and value."""
    copy = None if value is None else bytes(bytearray(value))
    return Message(
        topic="t", partition=partition, offset=offset, key=b"k", value=copy, timestamp=(1, 1_700_000_000_000 + offset)
    )


def _future(tracker: DeliveryTracker, value: object = b"v", headers: Any = None) -> DeliveryFuture:
    """A future as the producer makes it for topic "t", key b"k", registered as pending."""
    fut = DeliveryFuture(tracker, value, "t", b"k", headers)
    tracker.pending.add(fut)
    return fut


def test_result_set_before_anyone_waits_is_returned() -> None:
    fut = DeliveryFuture()
    fut.set_result("msg")  # type: ignore[arg-type]
    assert fut.done() and fut.result(0) == "msg"


def test_exception_set_before_anyone_waits_is_raised() -> None:
    fut = DeliveryFuture()
    fut.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        fut.result(0)


def test_setting_twice_is_refused_on_both_paths() -> None:
    fast = DeliveryFuture()
    fast.set_result(1)  # type: ignore[arg-type]
    with pytest.raises(concurrent.futures.InvalidStateError):
        fast.set_result(2)  # type: ignore[arg-type]
    slow = DeliveryFuture()
    assert not slow.done()  # creates the condition: the standard path from here on
    slow.set_result(1)  # type: ignore[arg-type]
    with pytest.raises(concurrent.futures.InvalidStateError):
        slow.set_exception(ValueError())


def test_pending_result_times_out() -> None:
    with pytest.raises(concurrent.futures.TimeoutError):
        DeliveryFuture().result(0.01)


def test_done_callbacks_run_whether_added_before_or_after_the_result() -> None:
    seen: list[Any] = []
    before = DeliveryFuture()
    before.add_done_callback(lambda f: seen.append(("before", f.result())))
    before.set_result("a")  # type: ignore[arg-type]
    after = DeliveryFuture()
    after.set_result("b")  # type: ignore[arg-type]
    after.add_done_callback(lambda f: seen.append(("after", f.result())))
    assert seen == [("before", "a"), ("after", "b")]


def test_waiters_racing_the_setter_never_miss_the_result() -> None:
    for _ in range(300):
        futs = [DeliveryFuture() for _ in range(8)]
        got: list[Any] = []
        barrier = threading.Barrier(len(futs) + 1)

        def wait(f: DeliveryFuture, barrier: threading.Barrier, got: list[Any]) -> None:
            barrier.wait()
            got.append(f.result(timeout=5))

        threads = [threading.Thread(target=wait, args=(f, barrier, got)) for f in futs]
        for t in threads:
            t.start()
        barrier.wait()
        for i, f in enumerate(futs):
            f.set_result(i)  # type: ignore[arg-type]
        for t in threads:
            t.join(10)
        assert sorted(got) == list(range(len(futs)))


def test_concurrent_futures_wait_and_asyncio_wrap_future_work() -> None:
    futs = [DeliveryFuture() for _ in range(3)]
    threading.Timer(0.01, lambda: [f.set_result(i) for i, f in enumerate(futs)]).start()  # type: ignore[func-returns-value]
    done, not_done = concurrent.futures.wait([f.as_future() for f in futs], timeout=5)
    assert len(done) == 3 and not not_done
    assert sorted(f.result() for f in done) == [0, 1, 2]

    async def awaited() -> Any:
        fut = DeliveryFuture()
        threading.Timer(0.01, fut.set_result, args=("x",)).start()
        return await asyncio.wrap_future(fut.as_future())

    assert asyncio.run(awaited()) == "x"


def test_as_future_of_a_finished_future_carries_its_outcome_and_is_always_the_same_object() -> None:
    ok, failed = DeliveryFuture(), DeliveryFuture()
    ok.set_result("m")  # type: ignore[arg-type]
    failed.set_exception(ValueError("no"))
    assert ok.as_future() is ok.as_future() and ok.as_future().result(0) == "m"
    assert isinstance(failed.as_future().exception(0), ValueError)
    assert failed.done() and isinstance(failed.exception(0), ValueError)


def test_cancelling_the_asyncio_wrapper_cancels_the_delivery_future_and_a_late_report_is_refused() -> None:
    fut = DeliveryFuture()

    async def cancel_it() -> None:
        wrapped = asyncio.wrap_future(fut.as_future())
        wrapped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wrapped

    asyncio.run(cancel_it())
    assert fut.cancelled() and fut.done()
    with pytest.raises(concurrent.futures.InvalidStateError):
        fut.set_result("late")  # type: ignore[arg-type]
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(0)


def test_a_done_callback_receives_the_delivery_future_itself() -> None:
    fut = DeliveryFuture()
    seen: list[Any] = []
    fut.add_done_callback(seen.append)
    fut.set_exception(ValueError("x"))
    assert seen == [fut]


def test_nothing_of_concurrent_futures_private_state_is_touched() -> None:
    import inspect

    import kcons.kafka.futures as module

    source = inspect.getsource(module)
    for private in ("_base", "_waiters", "_condition", "_state", "_FINISHED", "_PENDING"):
        assert private not in source, private


def test_the_future_is_its_own_delivery_callback_and_settles_once() -> None:
    reports: list[tuple[Any, Any, Any, Any]] = []
    tracker = DeliveryTracker(lambda fut, err, msg, cb: reports.append((fut, err, msg, cb)))
    fut = _future(tracker)
    fut(None, _report(offset=7))
    fut(None, _report(offset=8))  # a second report is ignored
    assert fut.result(0).offset() == 7 and tracker.delivered == 1 and not tracker.pending
    assert reports == [], "a plain success is settled by the future itself"
    assert fut._tracker is None, "the producer is released once delivered"


def test_a_failure_or_a_user_callback_goes_to_the_tracker_which_settles_the_future() -> None:
    def on_report(fut: DeliveryFuture, err: Any, msg: Any, cb: Any) -> None:
        fut.settle(None, ValueError(err)) if err is not None else fut.settle(msg)
        if cb is not None:
            cb(err, msg)

    tracker = DeliveryTracker(on_report)
    seen: list[Any] = []
    failed = _future(tracker)
    called = CallbackDeliveryFuture(tracker, b"v", lambda err, msg: seen.append(msg.offset()), "t", b"k")
    tracker.pending.add(called)
    failed("boom", _report(offset=1))  # type: ignore[arg-type]
    called(None, _report(offset=2))
    assert isinstance(failed.exception(0), ValueError) and called.result(0).offset() == 2 and seen == [2]


def test_a_report_after_the_pending_futures_were_failed_is_ignored() -> None:
    tracker = DeliveryTracker(lambda *a: None)
    futs = [_future(tracker) for _ in range(3)]
    futs[0](None, _report(offset=0))
    assert tracker.fail_pending(lambda: RuntimeError("aborted")) == 2
    futs[1](None, _report(offset=1))
    assert futs[0].result(0).offset() == 0
    assert all(isinstance(f.exception(0), RuntimeError) for f in futs[1:])
    with pytest.raises(concurrent.futures.InvalidStateError):
        futs[2].set_result(_report())


def test_reports_racing_fail_pending_settle_every_future_exactly_once() -> None:
    report = _report()
    for _ in range(50):
        tracker = DeliveryTracker(lambda *a: None)
        futs = [_future(tracker) for _ in range(2000)]
        waiter = futs[-1].as_future()  # one linked future in the race too
        barrier = threading.Barrier(2)

        def deliver(barrier: threading.Barrier = barrier, futs: list[DeliveryFuture] = futs) -> None:
            barrier.wait()
            for f in futs:
                f(None, report)

        t = threading.Thread(target=deliver)
        t.start()
        barrier.wait()
        failed = tracker.fail_pending(lambda: RuntimeError("aborted"))
        t.join(10)
        outcomes = [f.exception(0) for f in futs]
        assert sum(1 for e in outcomes if e is not None) == failed
        assert tracker.delivered == len(futs) - failed
        assert waiter.done()


def test_a_waiter_linking_while_the_report_arrives_always_gets_the_outcome() -> None:
    for _ in range(300):
        tracker = DeliveryTracker(lambda *a: None)
        futs = [_future(tracker) for _ in range(8)]
        got: list[Any] = []
        barrier = threading.Barrier(len(futs) + 1)

        def wait(f: DeliveryFuture, barrier: threading.Barrier, got: list[Any]) -> None:
            barrier.wait()
            got.append(f.as_future().result(timeout=5))

        threads = [threading.Thread(target=wait, args=(f, barrier, got)) for f in futs]
        for t in threads:
            t.start()
        barrier.wait()
        for i, f in enumerate(futs):
            f(None, _report(offset=i))
        for t in threads:
            t.join(10)
        assert sorted(m.offset() for m in got) == list(range(len(futs)))
        assert all(f.result(0) is f.as_future().result(0) for f in futs), "one Message per future"


def test_a_future_nobody_waits_on_links_no_standard_future() -> None:
    fut = DeliveryFuture()
    fut.set_result("m")  # type: ignore[arg-type]
    assert fut.done() and fut.result(0) == "m" and fut.exception(0) is None
    assert fut._future is None, "reading a known outcome needs no Condition"
    seen: list[Any] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    other = DeliveryFuture()
    threading.Timer(0.1, lambda: other.set_result("b")).start()  # type: ignore[arg-type]
    done = [f.result() for f in concurrent.futures.as_completed([fut.as_future(), other.as_future()], timeout=5)]
    assert done == ["m", "b"] and seen == ["m"]


def test_a_delivered_future_keeps_no_report_and_builds_one_message_with_the_produced_value() -> None:
    tracker = DeliveryTracker(lambda *a: None)
    produced = b"x" * 1024
    fut = _future(tracker, produced, headers=b"the-id")
    report = _report(produced)
    fut(None, report)
    assert fut._outcome is not report and fut._tracker is None, "the report is not kept, nor the producer"
    msg = fut.result(0)
    assert msg is fut.result(0) and msg is fut.as_future().result(0), "the same Message on every call"
    assert msg.value() is produced, "the produced bytes, not the report's copy"
    assert (msg.topic(), msg.partition(), msg.offset(), msg.key()) == ("t", 2, 7, b"k")
    assert msg.timestamp() == report.timestamp() and msg.error() is None
    assert msg.headers() == [("kcons-id", b"the-id")], "the id alone stands for the one kcons-id header"


def test_a_str_value_key_and_headers_come_back_as_kafka_stores_them() -> None:
    tracker = DeliveryTracker(lambda *a: None)
    fut = DeliveryFuture(tracker, "text", "t", "ключ", [("a", "é"), ("b", b"\x00"), ("c", None)])
    tracker.pending.add(fut)
    fut(None, _report(b"text"))
    msg = fut.result(0)
    assert msg.value() == b"text" and msg.key() == "ключ".encode(), "str is sent UTF-8 encoded"
    assert msg.headers() == [("a", "é".encode()), ("b", b"\x00"), ("c", None)]
    as_dict = DeliveryFuture(tracker, None, "t", None, {"kcons-id": b"i", "x": "y"})
    tracker.pending.add(as_dict)
    as_dict(None, _report(None))
    got = as_dict.result(0)
    assert got.headers() == [("kcons-id", b"i"), ("x", b"y")] and got.value() is None and got.key() is None


def test_a_delivered_future_records_a_log_append_timestamp_as_reported() -> None:
    tracker = DeliveryTracker(lambda *a: None)
    fut = _future(tracker)
    fut(None, Message(topic="t", partition=0, offset=1, key=b"k", value=b"v", timestamp=(2, 1_800_000_000_000)))
    assert fut.result(0).timestamp() == (2, 1_800_000_000_000)


def test_a_future_with_a_user_callback_is_settled_by_the_tracker_once_and_the_callback_runs_once() -> None:
    calls: list[Any] = []

    def on_report(fut: DeliveryFuture, err: Any, msg: Any, cb: Any) -> None:
        fut.settle(msg)
        cb(err, msg)

    tracker = DeliveryTracker(on_report)
    produced = b"payload"
    fut = CallbackDeliveryFuture(tracker, produced, lambda err, msg: calls.append((err, msg.value())))
    tracker.pending.add(fut)
    fut(None, _report(produced))
    fut(None, _report(produced, offset=8))  # a second report is ignored
    assert calls == [(None, produced)] and fut.result(0).offset() == 7
    assert calls[0][1] is produced, "the callback sees the produced value too"


def test_a_failed_future_does_not_hold_its_value() -> None:
    tracker = DeliveryTracker(lambda fut, err, msg, cb: fut.settle(None, RuntimeError(err)))
    fut = DeliveryFuture(tracker, b"v")
    tracker.pending.add(fut)
    fut("boom", _report(b"v"))  # type: ignore[arg-type]
    assert isinstance(fut.exception(0), RuntimeError) and fut._value is None


def test_futures_failed_by_the_tracker_release_their_values_and_the_tracker_holds_nothing() -> None:
    tracker = DeliveryTracker(lambda *a: None)
    futs = [DeliveryFuture(tracker, b"v%d" % i) for i in range(100)]
    tracker.pending.update(futs)
    assert tracker.fail_pending(lambda: RuntimeError("aborted")) == 100
    assert not tracker.pending
    assert all(isinstance(f.exception(0), RuntimeError) and f._value is None for f in futs)


class _UnreadableReport:
    """A delivery report whose fields cannot be read."""

    def partition(self) -> int:
        raise RuntimeError("unreadable report")


def test_a_success_report_that_cannot_be_read_fails_the_future_instead_of_leaving_it_pending() -> None:
    tracker = DeliveryTracker(lambda fut, err, msg, cb: fut.settle(msg))
    fut = _future(tracker)
    with pytest.raises(RuntimeError, match="unreadable"):
        fut(None, _UnreadableReport())  # type: ignore[arg-type]
    assert fut.done() and fut not in tracker.pending
    assert isinstance(fut.exception(0), DeliveryError)
