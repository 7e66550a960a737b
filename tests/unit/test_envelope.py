"""The envelope makes every event deduplicable (UUIDv7 id) and routable (key = aggregate id)."""

from __future__ import annotations

import itertools
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kcons.envelope import (
    HEADER_ID,
    HEADER_VERSION,
    Envelope,
    read_envelope,
    uuid7,
)
from kcons.errors import DecodeError


def test_uuid7_has_version_7_and_rfc_variant() -> None:
    u = uuid7()
    assert u.version == 7
    assert u.variant == uuid.RFC_4122


def test_uuid7_ids_strictly_increase_within_a_process() -> None:
    ids = [uuid7().int for _ in range(20_000)]
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_uuid7_embeds_the_current_millisecond() -> None:
    import time

    before = time.time_ns() // 1_000_000
    u = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= u.int >> 80 <= after + 1


def test_headers_carry_identity_aggregate_version_and_trace() -> None:
    env = Envelope.of("order.created", "order", 42, {"total": 3}, version=7, traceparent="00-ab-cd-01")
    h = dict(env.headers())
    assert h[HEADER_ID] == env.id.encode()
    assert h["kcons-type"] == b"order.created"
    assert h["kcons-aggregate-type"] == b"order"
    assert h["kcons-aggregate-id"] == b"42"
    assert h[HEADER_VERSION] == b"7"
    assert h["traceparent"] == b"00-ab-cd-01"
    assert env.key == b"42"
    assert json.loads(env.payload) == {"total": 3}


def test_caller_headers_cannot_override_kcons_headers() -> None:
    env = Envelope.of("t", "a", "1", b"x", headers={"kcons-id": "forged", "tenant": "acme"})
    names = [n for n, _ in env.headers()]
    assert names.count("kcons-id") == 1
    assert dict(env.headers())["kcons-id"] == env.id.encode()
    assert dict(env.headers())["tenant"] == b"acme"


@given(
    type_=st.text(min_size=1, max_size=20),
    agg=st.text(min_size=1, max_size=20),
    version=st.one_of(st.none(), st.integers(min_value=0, max_value=2**62)),
    payload=st.binary(max_size=64),
)
def test_envelope_round_trips_through_kafka_headers(type_: str, agg: str, version: int | None, payload: bytes) -> None:
    env = Envelope(type=type_, aggregate_type="agg", aggregate_id=agg, payload=payload, version=version)
    back = read_envelope(env.key, env.payload, env.headers())
    assert back == env


def test_message_without_an_id_yields_none() -> None:
    assert read_envelope(b"k", b"v", [("other", b"1")]) is None
    assert read_envelope(None, None, None) is None


def test_malformed_version_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="kcons-version"):
        read_envelope(b"k", b"v", [(HEADER_ID, b"x"), (HEADER_VERSION, b"seven")])


def test_non_utf8_header_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        read_envelope(b"k", b"v", [(HEADER_ID, b"\xff\xfe")])


def test_debezium_outbox_router_shape_is_accepted() -> None:
    value = json.dumps({"schema": {"type": "string"}, "payload": '{"sku":"A1"}'}).encode()
    env = read_envelope(b'"order-9"', value, [("id", b"5f0c"), ("type", b"OrderCreated")], topic="outbox.event.order")
    assert env is not None
    assert (env.id, env.type, env.aggregate_type, env.aggregate_id) == ("5f0c", "OrderCreated", "order", "order-9")
    assert json.loads(env.payload) == {"sku": "A1"}


def test_headers_may_be_given_as_a_dict() -> None:
    env = read_envelope(b"k", b"v", {HEADER_ID: b"abc", HEADER_VERSION: "3"})
    assert env is not None and env.id == "abc" and env.version == 3
