"""Pure-logic tests of the processor's configuration and outputs."""

from __future__ import annotations

from typing import Any

import pytest

from kcons.envelope import HEADER_ID, Envelope
from kcons.errors import ConfigError
from kcons.processor import Output, TransactionalProcessor, check_consumer_config

BASE = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ({"group.id": ""}, "group.id"),
        ({"enable.auto.commit": True}, "enable.auto.commit"),
        ({"enable.auto.commit": "true"}, "enable.auto.commit"),
        ({"isolation.level": "read_uncommitted"}, "isolation.level"),
    ],
)
def test_consumer_settings_that_break_exactly_once_are_rejected(override: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_consumer_config({**BASE, **override})
    assert info.value.setting == setting


def test_consumer_config_is_forced_to_read_committed_without_auto_commit() -> None:
    cfg = check_consumer_config({**BASE, "auto.offset.reset": "earliest"})
    assert cfg["isolation.level"] == "read_committed"
    assert cfg["enable.auto.commit"] is False
    assert cfg["enable.auto.offset.store"] is False
    assert cfg["auto.offset.reset"] == "earliest"


def test_processor_without_a_transactional_id_is_rejected_before_connecting() -> None:
    with pytest.raises(ConfigError) as info:
        TransactionalProcessor(BASE, {"bootstrap.servers": "127.0.0.1:1"}, ["in"], lambda m: [])
    assert info.value.setting == "transactional.id"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_timeout_s": 0}, "batch_timeout_s"),
        ({"commit_interval_s": 0}, "commit_interval_s"),
        ({"commit_interval_s": 61}, "commit_interval_s"),
        ({"commit_max_records": 0}, "commit_max_records"),
    ],
)
def test_processor_batch_bounds_are_validated(kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        TransactionalProcessor(
            BASE, {"bootstrap.servers": "127.0.0.1:1"}, ["in"], lambda m: [], transactional_id="w", **kwargs
        )
    assert info.value.setting == setting


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "topics="])
def test_processor_rejects_a_single_string_as_topic_list(keyword: bool) -> None:
    with pytest.raises(ConfigError) as info:
        if keyword:
            TransactionalProcessor(BASE, PRODUCER, topics="in", handler=lambda m: [], transactional_id="w")
        else:
            TransactionalProcessor(BASE, PRODUCER, "in", lambda m: [], transactional_id="w")
    assert info.value.setting == "topics"


PRODUCER = {"bootstrap.servers": "127.0.0.1:1"}


@pytest.mark.parametrize(
    ("old", "new"), [({"input_topics": "in"}, "topics"), ({"batch_max": 0}, "batch_size")], ids=["topics", "batch"]
)
def test_deprecated_processor_argument_names_still_work_and_warn(old: dict[str, Any], new: str) -> None:
    args: tuple[Any, ...] = (BASE, PRODUCER) if "input_topics" in old else (BASE, PRODUCER, ["in"])
    # The values are invalid on purpose: the error names the new setting, proving the alias reached it.
    with pytest.warns(DeprecationWarning, match=f"use {new}="), pytest.raises(ConfigError) as info:
        TransactionalProcessor(*args, handler=lambda m: [], transactional_id="w", **old)
    assert info.value.setting == new


def test_a_setting_given_under_both_names_is_rejected() -> None:
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError) as info:
        TransactionalProcessor(BASE, PRODUCER, ["a"], lambda m: [], input_topics=["b"], transactional_id="w")
    assert info.value.setting == "topics"
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError) as info:
        TransactionalProcessor(BASE, PRODUCER, ["a"], lambda m: [], batch_size=5, batch_max=5, transactional_id="w")
    assert info.value.setting == "batch_size"


def test_processor_without_topics_or_handler_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        TransactionalProcessor(BASE, PRODUCER, [], lambda m: [], transactional_id="w")
    assert info.value.setting == "topics"
    with pytest.raises(ConfigError) as info:
        TransactionalProcessor(BASE, PRODUCER, ["in"], transactional_id="w")
    assert info.value.setting == "handler"


def test_event_output_carries_the_envelope_key_and_headers() -> None:
    env = Envelope.of("Created", "order", "42", {"n": 1}, version=3)
    out = Output.event("orders", env)
    assert out.key == b"42"
    assert out.value == env.payload
    assert out.headers is not None
    assert dict(out.headers)[HEADER_ID] == env.id.encode()
