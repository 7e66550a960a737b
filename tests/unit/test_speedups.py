"""The optional C extension (kcons.kafka._speedups) against the Python classes it stands for.

The futures and producer unit tests run on whichever classes are in use (the C ones when the
extension is built, as in CI); one test here runs them again on the Python classes. The others
pin what only the C path does: produce() in C for the common case, futures the garbage collector
does not track, and a fallback to the Python method for everything else.
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from confluent_kafka import Message

from kcons import ids
from kcons.errors import DeliveryError
from kcons.kafka import futures
from kcons.kafka.futures import DeliveryFuture, DeliveryTracker
from kcons.kafka.producer import IdempotentProducer, _ProducerBase

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = {"bootstrap.servers": "127.0.0.1:9"}
needs_c = pytest.mark.skipif(not futures.ACCELERATED, reason="the C extension is not built here (CI requires it)")


@pytest.fixture
def producer() -> Iterator[IdempotentProducer]:
    """A producer whose broker is unreachable: produce() queues, nothing is delivered, close() fails the rest."""
    made = IdempotentProducer(dict(UNREACHABLE), close_timeout_s=0.5)
    yield made
    made.close(0.1)


def _report(offset: int = 7, partition: int = 2) -> Message:
    stamp = (1, 1_700_000_000_123)
    return Message(topic="t", partition=partition, offset=offset, key=b"k", value=b"copy", timestamp=stamp)


def test_ci_builds_the_c_extension() -> None:
    """CI installs with a compiler: the C path is what its tests and benchmarks exercise."""
    if os.environ.get("CI") != "true":
        pytest.skip("outside CI an install without a compiler keeps the Python classes")
    assert futures.ACCELERATED, "kcons.kafka._speedups was not built (see the pip install output)"
    assert type(ids.fast_event_id).__name__ == "builtin_function_or_method", "kcons._idgen was not built"


def test_a_pure_python_setting_that_is_not_a_boolean_fails_at_import_naming_it() -> None:
    run = subprocess.run(
        [sys.executable, "-c", "import kcons.ids"],
        env={**os.environ, "KCONS_PURE_PYTHON": "nan"}, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0
    assert "ConfigError" in run.stderr and "KCONS_PURE_PYTHON" in run.stderr and "'nan'" in run.stderr


def test_the_futures_and_producer_tests_pass_on_the_python_classes() -> None:
    """The Python classes stay the reference: the same tests, with KCONS_PURE_PYTHON=1."""
    tests = ["test_kafka_futures.py", "test_producer_config.py", "test_kafka_layer.py", "test_envelope.py"]
    env = {**os.environ, "KCONS_PURE_PYTHON": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", "from kcons.kafka import futures; from kcons import ids;"
         "print(futures.ACCELERATED, type(ids.fast_event_id).__name__)"],
        env=env, capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert probe.stdout.split() == ["False", "function"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"tests/unit/{t}" for t in tests)],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


UUID7_TEXT = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@needs_c
def test_the_event_ids_are_the_c_generator_with_the_python_ones_layout() -> None:
    """One generator for the package: the C one when built, drawing ids laid out as the Python one's."""
    from kcons import _idgen  # type: ignore[attr-defined]

    assert ids.fast_event_id is _idgen.event_id
    python_source = ids._event_id_source()
    c_ids = [ids.fast_event_id() for _ in range(10_000)]  # more than 4096: at least one borrowed millisecond
    py_ids = [python_source() for _ in range(10_000)]
    for drawn in (c_ids, py_ids):
        assert all(UUID7_TEXT.fullmatch(i) for i in drawn)
        assert len(set(drawn)) == len(drawn) and drawn == sorted(drawn)
        # Within one millisecond the ids differ only in the three sequence digits, counting up by one;
        # a new millisecond starts at 000 with new random bits.
        for before, after in itertools.pairwise(drawn):
            if after[:13] == before[:13]:
                assert after[:15] + after[18:] == before[:15] + before[18:]
                assert int(after[15:18], 16) == int(before[15:18], 16) + 1
            else:
                assert after[15:18] == b"000" and after[19:] != before[19:]
    now_ms = time.time_ns() // 1_000_000
    first_ms = uuid.UUID(c_ids[0].decode()).int >> 80
    assert now_ms - 1_000 < first_ms <= now_ms + 50


def _ids_of_a_forked_child(draw: Callable[[], bytes], n: int) -> list[bytes]:
    """``n`` ids drawn by a child forked now (each id is 36 bytes)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: draw, report, leave without running the parent's cleanup
        try:
            os.write(write_end, b"".join(draw() for _ in range(n)))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return [data[i : i + 36] for i in range(0, len(data), 36)]


def test_a_forked_child_does_not_draw_its_parents_ids() -> None:
    """The Python generator, with the clock held still: parent and child are in the same millisecond."""
    source = ids._event_id_source()
    now = time.time_ns()
    source(lambda: now)  # the parent's millisecond has started
    child = _ids_of_a_forked_child(lambda: source(lambda: now), 3)  # type: ignore[call-arg]
    parent = [source(lambda: now) for _ in range(3)]  # type: ignore[call-arg]
    assert len(child) == 3 and not set(child) & set(parent)


@needs_c
def test_a_forked_child_does_not_draw_its_parents_ids_from_the_c_generator() -> None:
    last = ids.fast_event_id()
    child = _ids_of_a_forked_child(ids.fast_event_id, 3)
    parent = [ids.fast_event_id() for _ in range(3)]
    assert len(child) == 3 and not set(child) & set(parent)
    assert child[0][15:18] == b"000" and child[0][19:] != last[19:]  # a millisecond of its own


@needs_c
def test_produce_is_the_c_path_and_its_futures_are_not_tracked_by_the_collector(producer: IdempotentProducer) -> None:
    assert type(producer.produce).__name__ == "FastProduce"
    fut = producer.produce("t", b"v", b"k")
    assert type(fut) is DeliveryFuture and fut in producer._tracker.pending
    assert not gc.is_tracked(fut)
    fut(None, _report())  # the delivery report, as confluent-kafka calls it
    assert not gc.is_tracked(fut) and fut not in producer._tracker.pending
    msg = fut.result(0)
    assert (msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value()) == ("t", 2, 7, b"k", b"v")
    assert msg.timestamp() == (1, 1_700_000_000_123)
    assert msg.headers() == [("kcons-id", fut._headers)]


@needs_c
def test_keyword_arguments_of_the_common_case_stay_on_the_c_path(producer: IdempotentProducer) -> None:
    fut = producer.produce("t", b"v", key=b"k", partition=1, headers=None, on_delivery=None, block=True)
    assert not gc.is_tracked(fut) and fut._key == b"k"
    # headers of the caller's, or block=False: the Python method (its futures are tracked at first)
    with_headers = producer.produce("t", b"v", b"k", headers=[("a", b"1")])
    assert gc.is_tracked(with_headers)
    assert with_headers._headers[1] == ("a", b"1")  # type: ignore[index]
    with pytest.raises(TypeError):
        producer.produce("t", b"v", b"k", key=b"again")  # type: ignore[misc]
    with pytest.raises(TypeError):
        producer.produce("t")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        producer.produce("t", b"v", b"k", unknown=1)  # type: ignore[call-arg]


@needs_c
def test_a_value_the_raw_producer_refuses_raises_and_leaves_nothing_pending(producer: IdempotentProducer) -> None:
    with pytest.raises(TypeError):
        producer.produce("t", 12345)  # type: ignore[arg-type]
    assert not producer._tracker.pending


@needs_c
def test_a_future_that_links_a_callback_is_tracked_so_its_cycle_is_collected(producer: IdempotentProducer) -> None:
    fut = producer.produce("t", b"v")
    seen: list[DeliveryFuture] = []
    fut.add_done_callback(seen.append)  # a standard future whose callback refers back to fut
    assert gc.is_tracked(fut)
    fut(None, _report())
    assert seen == [fut]
    marker = _Marker()
    fut.add_done_callback(lambda f, m=marker: f)  # type: ignore[misc]
    probe = weakref.ref(marker)
    del fut, seen, marker
    gc.collect()
    assert probe() is None


class _Marker:
    """An object to watch with a weak reference."""


@needs_c
def test_a_producer_dropped_with_messages_pending_is_collected() -> None:
    producer = IdempotentProducer(dict(UNREACHABLE), close_timeout_s=0.5)
    futs = [producer.produce("t", b"v") for _ in range(3)]
    assert all(not gc.is_tracked(f) for f in futs)
    probe = weakref.ref(producer)
    del producer
    gc.collect()
    assert probe() is None
    for fut in futs:
        fut(None, _report())  # a late report after the producer is gone settles nothing and does not fail
        assert not fut.done()


@needs_c
def test_a_subclass_that_overrides_produce_keeps_its_own() -> None:
    class Counting(IdempotentProducer):
        calls = 0

        def produce(self, *args: object, **kwargs: object) -> DeliveryFuture:  # type: ignore[override]
            Counting.calls += 1
            return super().produce(*args, **kwargs)  # type: ignore[arg-type]

    producer = Counting(dict(UNREACHABLE), close_timeout_s=0.5)
    try:
        producer.produce("t", b"v")
        assert Counting.calls == 1
    finally:
        producer.close(0.1)


@needs_c
def test_closing_fails_what_the_c_path_produced() -> None:
    producer = IdempotentProducer(dict(UNREACHABLE), close_timeout_s=0.5)
    fut = producer.produce("t", b"v")
    producer.close(0.1)
    assert isinstance(fut.exception(0), DeliveryError)
    with pytest.raises(Exception, match="closed"):
        producer.produce("t", b"v")


@needs_c
def test_turning_event_ids_off_after_construction_is_respected(producer: IdempotentProducer) -> None:
    assert isinstance(producer.produce("t", b"v")._headers, bytes)
    producer.event_ids = False
    assert producer.produce("t", b"v")._headers is None
    producer.event_ids = True
    assert isinstance(producer.produce("t", b"v")._headers, bytes)


@needs_c
def test_a_patch_of_produce_on_the_class_reaches_instances_made_before_it(producer: IdempotentProducer) -> None:
    with mock.patch.object(IdempotentProducer, "produce", return_value="patched") as patched:
        assert producer.produce("t", b"v") == "patched"
    patched.assert_called_once_with("t", b"v")
    assert type(producer.produce).__name__ == "FastProduce"


@needs_c
def test_produce_is_a_method_descriptor_that_calls_the_c_path_with_the_instance(producer: IdempotentProducer) -> None:
    """The interpreter calls ``produce(instance, *args)`` on it (no bound object per call): the same
    C path as ``instance.produce``; on the class it is the Python function, called with the instance."""
    descriptor = _ProducerBase.__dict__["produce"]
    assert type(descriptor).__name__ == "FastMethod"
    fut = descriptor(producer, "t", b"v", b"k")
    assert type(fut) is type(producer.produce("t", b"v"))
    assert fut._topic == "t" and fut._key == b"k" and isinstance(fut._headers, bytes)
    assert descriptor.__get__(None, IdempotentProducer) is descriptor.__func__ is _ProducerBase.produce
    python_fut = IdempotentProducer.produce(producer, "t", b"v", headers={"h": b"1"})
    assert python_fut._topic == "t"
    with pytest.raises(TypeError):
        descriptor()


@needs_c
def test_a_report_to_a_future_with_unset_slots_settles_it() -> None:
    tracker = DeliveryTracker(lambda *_: None)
    bare = DeliveryFuture.__new__(DeliveryFuture)
    bare._tracker = tracker
    tracker.pending.add(bare)
    bare(None, _report())
    assert bare._outcome is not None and bare not in tracker.pending
    built = DeliveryFuture(tracker, b"v", "t", b"k")
    tracker.pending.add(built)
    del built._topic
    built(None, _report())
    assert built.done()


@needs_c
def test_a_future_holding_a_container_is_tracked_even_while_the_container_is_not() -> None:
    """An empty dict is untracked until it holds a container: the future must not count on that."""
    tracker = DeliveryTracker(lambda *_: None)
    value: dict[str, object] = {}
    assert not gc.is_tracked(value)
    fut = futures.speedups.new_future(tracker, value, "t", b"k", None)
    assert gc.is_tracked(fut)
    assert not gc.is_tracked(futures.speedups.new_future(tracker, b"v", "t", b"k", b"id"))


@needs_c
def test_the_pending_set_has_the_set_operations_the_tracker_uses() -> None:
    tracker = DeliveryTracker(lambda *_: None)
    pending = tracker.pending
    assert type(pending).__name__ == "PendingSet" and not pending and len(pending) == 0
    a, b, c = (DeliveryFuture(tracker, b"v", "t", b"k") for _ in range(3))
    pending.add(a)
    pending.update([b, c, a])  # a second add of a member changes nothing
    assert len(pending) == 3 and a in pending and list(pending) == [a, b, c]
    pending.remove(b)
    assert b not in pending and list(pending) == [a, c]
    with pytest.raises(KeyError):
        pending.remove(b)
    pending.discard(b)
    assert pending.pop() is a and pending.pop() is c
    with pytest.raises(KeyError):
        pending.pop()
    with pytest.raises(TypeError):
        pending.add("not a future")  # type: ignore[arg-type]
    other = DeliveryTracker(lambda *_: None)
    other.pending.add(a)
    with pytest.raises(RuntimeError):
        pending.add(a)  # a future is pending in one tracker at most
    assert other.fail_pending(lambda: DeliveryError("aborted")) == 1 and isinstance(a.exception(0), DeliveryError)


@needs_c
def test_iterating_the_pending_set_while_a_collection_changes_it_gives_every_member_once() -> None:
    """Listing the members allocates, which may run a collection whose finalizers add or take futures."""
    tracker = DeliveryTracker(lambda *_: None)
    pending = tracker.pending
    pending.update(DeliveryFuture(tracker, b"v", "t", b"k") for _ in range(50))

    class Grows:
        def __del__(self) -> None:
            pending.update(DeliveryFuture(tracker, b"v", "t", b"k") for _ in range(10))

    old = gc.get_threshold()
    try:
        gc.set_threshold(1)
        for _ in range(20):
            cycle = Grows()
            cycle.self = cycle  # type: ignore[attr-defined]
            del cycle
            members = list(pending)
            assert len(members) == len(set(map(id, members))) and all(type(m) is DeliveryFuture for m in members)
    finally:
        gc.set_threshold(*old)
