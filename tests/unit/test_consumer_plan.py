"""The consumer's batch decision (kcons.consumer.plan) as tables: no Kafka, no store, no clock.

Each row is a batch (partition, event id or poison per message), the claim (ids now ours; ids
already done), the handler outcomes per id (in the order the handler meets them), and the
decision expected: what the handler is given, which ids are done, duplicates, dead letters,
holds, offsets committed and claims given back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kcons.consumer.plan import (
    OK,
    BatchPlan,
    DeadLetter,
    Decision,
    Entry,
    Hold,
    Outcome,
    Poison,
    abandon,
    after_dead_letters,
    all_new,
    hold_all,
)

PAUSE = 5.0
RETRY = Hold(-1, 30.0, "retry_later")
LOST = Hold(-1, -1.0, "claim_lost")


def batch(*spec: tuple[int, str | None] | tuple[int, str | None, str]) -> list[Entry]:
    """Entries on topic "t" from (partition, event id[, poison reason]); offsets count per partition from 0."""
    next_offset: dict[int, int] = {}
    out = []
    for item in spec:
        partition, event_id = item[0], item[1]
        poison = item[2] if len(item) > 2 else None  # type: ignore[misc]
        offset = next_offset.get(partition, 0)
        next_offset[partition] = offset + 1
        out.append(Entry("t", partition, offset, event_id, poison))
    return out


@dataclass
class Row:
    name: str
    entries: list[Entry]
    claimed: set[str]
    done: set[str] = field(default_factory=set)
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)  # per id, in order; default OK
    handled: list[str] = field(default_factory=list)  # ids given to the handler, in order
    expect: dict[str, Any] = field(default_factory=dict)  # Decision fields that must match


def run(
    entries: Sequence[Entry], claimed: set[str], done: set[str], outcomes: dict[str, list[Outcome]]
) -> tuple[list[str], Decision]:
    plan = BatchPlan(entries, frozenset(claimed), done, PAUSE)
    handled: list[str] = []
    queues = {k: list(v) for k, v in outcomes.items()}
    while (i := plan.next()) is not None:
        event_id = entries[i].event_id
        assert event_id is not None
        handled.append(event_id)
        queue = queues.get(event_id)
        plan.record(queue.pop(0) if queue else OK)
    return handled, plan.settle()


ROWS = [
    Row(
        "every message new: all handled, each partition committed past its last message",
        batch((0, "a"), (1, "b"), (0, "c")), {"a", "b", "c"},
        handled=["a", "b", "c"],
        expect={"done": ["a", "b", "c"], "commit": {("t", 0): 2, ("t", 1): 1}, "holds": {}, "release": set()},
    ),
    Row(
        "repeats in the batch and ids already done are dropped as duplicates and committed past",
        batch((0, "a"), (0, "b"), (0, "a"), (0, "c"), (0, "b")), {"a", "b"}, done={"c"},
        handled=["a", "b"],
        expect={"done": ["a", "b"], "duplicates": 3, "commit": {("t", 0): 5}},
    ),
    Row(
        "ids handled whose done records are not written yet count as done",
        batch((0, "pending"), (0, "new")), {"new"}, done={"pending"},
        handled=["new"], expect={"duplicates": 1, "commit": {("t", 0): 2}},
    ),
    Row(
        "a busy id holds its partition there (nothing after it runs) and the other partitions go on",
        batch((0, "busy"), (0, "after"), (1, "free")), {"after", "free"},
        handled=["free"],
        expect={
            "done": ["free"], "holds": {("t", 0): Hold(0, PAUSE, "busy")}, "commit": {("t", 1): 1},
            "deferred": 2, "release": {"after"},
        },
    ),
    Row(
        "a busy id after progress commits up to it",
        batch((0, "a"), (0, "busy"), (0, "b")), {"a", "b"},
        handled=["a"],
        expect={"commit": {("t", 0): 1}, "holds": {("t", 0): Hold(1, PAUSE, "busy")}, "release": {"b"}},
    ),
    Row(
        "a message that failed after its retries is dead-lettered with its claimed id and committed past",
        batch((0, "good"), (0, "bad"), (0, "good-2")), {"good", "bad", "good-2"},
        outcomes={"bad": [DeadLetter("ValueError: boom")]},
        handled=["good", "bad", "good-2"],
        expect={
            "done": ["good", "good-2"], "dead_letter": [Poison(1, "bad", "ValueError: boom")],
            "commit": {("t", 0): 3}, "release": {"bad"}, "holds": {},
        },
    ),
    Row(
        "a poison message (id not decodable) is dead-lettered without the handler",
        batch((0, None, "DecodeError: header kcons-id is not UTF-8"), (0, "ok")), {"ok"},
        handled=["ok"],
        expect={"dead_letter": [Poison(0, None, "DecodeError: header kcons-id is not UTF-8")], "commit": {("t", 0): 2}},
    ),
    Row(
        "retry later holds only that partition at the message, with the handler's pause",
        batch((0, "slow"), (0, "after"), (1, "fast")), {"slow", "after", "fast"},
        outcomes={"slow": [RETRY]},
        handled=["slow", "fast"],
        expect={
            "done": ["fast"], "holds": {("t", 0): Hold(0, 30.0, "retry_later")}, "commit": {("t", 1): 1},
            "deferred": 2, "release": {"slow", "after"},
        },
    ),
    Row(
        "a lost claim holds the partition with the default pause, keeping what was done before it",
        batch((0, "a"), (0, "lost"), (0, "c")), {"a", "lost", "c"},
        outcomes={"lost": [LOST]},
        handled=["a", "lost"],
        expect={"done": ["a"], "holds": {("t", 0): Hold(1, PAUSE, "claim_lost")}, "commit": {("t", 0): 1}},
    ),
    Row(
        "a dead-lettered id seen again later in the batch is a duplicate",
        batch((0, "bad"), (1, "bad")), {"bad"},
        outcomes={"bad": [DeadLetter("x")]},
        handled=["bad"],
        expect={"duplicates": 1, "commit": {("t", 0): 1, ("t", 1): 1}},
    ),
    Row(
        "an id held in one partition is handled where it repeats in another",
        batch((0, "x"), (1, "x")), {"x"},
        outcomes={"x": [RETRY, OK]},
        handled=["x", "x"],
        expect={"done": ["x"], "holds": {("t", 0): Hold(0, 30.0, "retry_later")}, "commit": {("t", 1): 1}},
    ),
    Row(
        "a poison message behind a busy one waits with its partition",
        batch((0, "busy"), (0, None, "bad")), set(),
        expect={"dead_letter": [], "deferred": 2, "holds": {("t", 0): Hold(0, PAUSE, "busy")}, "commit": {}},
    ),
    Row(
        "a poison message ahead of a busy one is dead-lettered, and the commit stops at the busy one",
        batch((0, None, "bad"), (0, "busy")), set(),
        expect={"dead_letter": [Poison(0, None, "bad")], "holds": {("t", 0): Hold(1, PAUSE, "busy")},
                "commit": {("t", 0): 1}},
    ),
    Row(
        "every new message answering retry later holds each partition at its first new message",
        batch((0, "dup"), (0, "a"), (0, "b"), (1, "c")), {"a", "b", "c"}, done={"dup"},
        outcomes={"a": [RETRY], "c": [RETRY]},
        handled=["a", "c"],
        expect={"done": [], "duplicates": 1, "commit": {("t", 0): 1},
                "holds": {("t", 0): Hold(1, 30.0, "retry_later"), ("t", 1): Hold(0, 30.0, "retry_later")}},
    ),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_batch_decision_table(row: Row) -> None:
    handled, decision = run(row.entries, row.claimed, row.done, row.outcomes)
    assert handled == row.handled
    for name, expected in row.expect.items():
        assert getattr(decision, name) == expected, name


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_fresh_lists_what_a_handler_that_never_fails_is_given(row: Row) -> None:
    plan = BatchPlan(row.entries, frozenset(row.claimed), row.done, PAUSE)
    handled, _ = run(row.entries, row.claimed, row.done, {})
    assert [row.entries[i].event_id for i in plan.fresh()] == handled


def test_an_unacknowledged_dead_letter_write_holds_its_partition_at_the_poison_message() -> None:
    entries = batch((0, "a"), (0, None, "bad"), (0, "c"), (1, None, "bad-too"))
    _handled, decision = run(entries, {"a", "c"}, set(), {})
    assert decision.commit == {("t", 0): 3, ("t", 1): 1}
    settled = after_dead_letters(decision, entries, acknowledged={1}, pause_s=PAUSE)
    assert settled.dead_lettered == 1
    assert settled.holds == {("t", 0): Hold(1, PAUSE, "dead_letter_failed")}
    assert settled.commit == {("t", 0): 1, ("t", 1): 1}, "the commit stops at the message not written"
    assert settled.deferred == 1


def test_a_store_outage_holds_every_partition_at_its_first_message_and_commits_nothing() -> None:
    decision = hold_all({("t", 0): 7, ("t", 1): 3}, count=5, pause_s=PAUSE, reason="store_error")
    assert decision.holds == {("t", 0): Hold(7, PAUSE, "store_error"), ("t", 1): Hold(3, PAUSE, "store_error")}
    assert decision.commit == {} and decision.done == [] and decision.deferred == 5


def test_an_abandoned_batch_keeps_what_was_done_gives_back_the_rest_and_rewinds_every_partition() -> None:
    decision = abandon(["a"], {"a", "b", "c"}, {("t", 0): 4}, 0.0, "interrupted")
    assert decision.done == ["a"] and decision.release == {"b", "c"}
    assert decision.commit == {} and decision.holds == {("t", 0): Hold(4, 0.0, "interrupted")}


def test_the_plan_refuses_steps_out_of_order() -> None:
    plan = BatchPlan(batch((0, "a"), (0, "b")), frozenset({"a", "b"}), (), PAUSE)
    with pytest.raises(RuntimeError):
        plan.record(OK)
    assert plan.next() == 0
    with pytest.raises(RuntimeError):
        plan.next()
    with pytest.raises(RuntimeError):
        plan.settle()
    plan.record(OK)
    with pytest.raises(RuntimeError):
        plan.settle()  # "b" is still to handle


@st.composite
def new_batches(draw: st.DrawFn) -> tuple[list[Entry], list[str]]:
    partitions = draw(st.lists(st.integers(0, 3), min_size=1, max_size=40))
    topics = draw(st.lists(st.sampled_from(["t", "u"]), min_size=len(partitions), max_size=len(partitions)))
    ids = [f"id-{i}" for i in range(len(partitions))]
    offsets: dict[tuple[str, int], int] = {}
    entries = []
    for topic, partition, event_id in zip(topics, partitions, ids, strict=True):
        offset = offsets.get((topic, partition), draw(st.integers(0, 1000)))
        offsets[(topic, partition)] = offset + 1
        entries.append(Entry(topic, partition, offset, event_id))
    return entries, ids


@given(new_batches())
def test_the_fast_paths_decision_equals_the_steps_with_every_outcome_ok(data: tuple[list[Entry], list[str]]) -> None:
    entries, ids = data
    ends = {(e.topic, e.partition): e.offset + 1 for e in entries}
    handled, decision = run(entries, set(ids), set(), {})
    assert handled == ids
    assert all_new(list(ids), ends) == decision


def test_the_plan_module_is_pure_it_imports_no_kafka_clock_io_or_logging() -> None:
    import ast
    from pathlib import Path

    import kcons.consumer.plan as plan_module

    tree = ast.parse(Path(plan_module.__file__).read_text())
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"__future__", "collections.abc", "dataclasses", "typing"}, imported
