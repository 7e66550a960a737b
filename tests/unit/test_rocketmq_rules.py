"""RocketMQ pure rules: topic names, send waves per aggregate, the check-back answer, message groups as partitions."""

from __future__ import annotations

import pytest

from kcons.consumer.rocketmq import group_partitions
from kcons.outbox.rocketmq import CheckAnswer, answer_for
from kcons.outbox.sinks.rocketmq import _waves, rocketmq_topic


@pytest.mark.parametrize(
    ("topic", "expected"),
    [("outbox.event.order", "outbox_event_order"), ("orders", "orders"), ("a-b_c", "a-b_c")],
)
def test_outbox_topics_map_to_rocketmq_names(topic: str, expected: str) -> None:
    assert rocketmq_topic(topic) == expected


@pytest.mark.parametrize("topic", ["", "t" * 128, "a b", "ä"])
def test_names_rocketmq_cannot_take_are_refused(topic: str) -> None:
    with pytest.raises(ValueError, match="not a RocketMQ topic name"):
        rocketmq_topic(topic)


def _rec(key: bytes) -> tuple[str, bytes, bytes, list[tuple[str, bytes]], int]:
    return ("t", b"", key, [], 0)


def test_waves_hold_one_record_per_aggregate_in_batch_order() -> None:
    batch = [_rec(k) for k in (b"a", b"b", b"a", b"c", b"a", b"b")]
    assert _waves(batch) == [[0, 1, 3], [2, 5], [4]]


def test_records_without_an_aggregate_each_form_their_own_group() -> None:
    assert _waves([_rec(b""), _rec(b""), _rec(b"a")]) == [[0, 1, 2]]


@pytest.mark.parametrize(
    ("trial_inserted", "answer"),
    [(False, CheckAnswer.COMMIT), (True, CheckAnswer.ROLLBACK), (None, CheckAnswer.UNKNOWN)],
)
def test_check_back_commits_only_a_committed_row(trial_inserted: bool | None, answer: CheckAnswer) -> None:
    assert answer_for(trial_inserted) is answer


def test_each_message_group_is_one_partition_and_a_lone_message_its_own() -> None:
    parts = group_partitions(["a", None, "b", "a", None, "b"])
    assert parts[0] == parts[3] and parts[2] == parts[5]
    assert len({parts[0], parts[1], parts[2], parts[4]}) == 4
