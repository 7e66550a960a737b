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
    [({"batch_max": 0}, "batch_max"), ({"batch_timeout_s": 0}, "batch_timeout_s")],
)
def test_processor_batch_bounds_are_validated(kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        TransactionalProcessor(
            BASE, {"bootstrap.servers": "127.0.0.1:1"}, ["in"], lambda m: [], transactional_id="w", **kwargs
        )
    assert info.value.setting == setting


def test_processor_rejects_a_single_string_as_topic_list() -> None:
    with pytest.raises(ConfigError) as info:
        TransactionalProcessor(BASE, {"bootstrap.servers": "127.0.0.1:1"}, "in", lambda m: [], transactional_id="w")
    assert info.value.setting == "input_topics"


def test_event_output_carries_the_envelope_key_and_headers() -> None:
    env = Envelope.of("Created", "order", "42", {"n": 1}, version=3)
    out = Output.event("orders", env)
    assert out.key == b"42"
    assert out.value == env.payload
    assert out.headers is not None
    assert dict(out.headers)[HEADER_ID] == env.id.encode()
