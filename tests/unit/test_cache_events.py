"""Decoding change events (kcons envelopes, Debezium change and outbox events) and planning cache writes."""

from __future__ import annotations

import json

import pytest

from kcons.cache import (
    CacheInvalidator,
    ConsistentCache,
    MemoryCacheBackend,
    Strategy,
    WriteOp,
    aggregate_key,
    decode_change_event,
    plan_writes,
)
from kcons.envelope import Envelope
from kcons.errors import ConfigError, DecodeError


def _debezium(op: str, before: dict[str, object] | None, after: dict[str, object] | None) -> dict[str, object]:
    return {
        "before": before,
        "after": after,
        "op": op,
        "ts_ms": 1700000000500,
        "source": {"schema": "public", "table": "items", "ts_ms": 1700000000123, "lsn": 42},
    }


def test_kcons_envelope_gives_aggregate_version_and_payload() -> None:
    env = Envelope.of("ItemUpdated", "item", "7", {"name": "x"}, version=12)
    event = decode_change_event(env.key, env.payload, env.headers(), timestamp_ms=1700000000000)
    assert event is not None
    assert (event.source, event.aggregate_type, event.aggregate_id, event.version) == ("kcons", "item", "7", 12)
    assert event.value == env.payload and event.event_id == env.id
    assert event.committed_at == 1700000000.0
    assert aggregate_key(event) == ["item:7"]


def test_commit_time_header_wins_over_the_record_timestamp() -> None:
    env = Envelope.of("T", "item", "7", {}, version=1, headers={"kcons-committed-at": "1700000001.25"})
    event = decode_change_event(env.key, env.payload, env.headers(), timestamp_ms=1700000009000)
    assert event is not None and event.committed_at == 1700000001.25


def test_event_without_a_version_is_a_decode_error() -> None:
    env = Envelope.of("T", "item", "7", {})
    with pytest.raises(DecodeError):
        decode_change_event(env.key, env.payload, env.headers())


def test_debezium_update_takes_the_version_from_after() -> None:
    value = json.dumps(_debezium("u", {"id": 3, "version": 4}, {"id": 3, "version": 5})).encode()
    event = decode_change_event(b'{"id": 3}', value, None)
    assert event is not None
    assert (event.source, event.aggregate_type, event.aggregate_id, event.op, event.version) == (
        "debezium", "public.items", "3", "u", 5,
    )  # fmt: skip
    assert event.committed_at == pytest.approx(1700000000.123)
    assert event.after == {"id": 3, "version": 5}


def test_debezium_event_wrapped_with_its_schema_is_unwrapped() -> None:
    inner = _debezium("c", None, {"id": 3, "version": 1})
    key = json.dumps({"schema": {"type": "struct"}, "payload": {"id": 3}}).encode()
    value = json.dumps({"schema": {"type": "struct"}, "payload": inner}).encode()
    event = decode_change_event(key, value, None)
    assert event is not None and event.aggregate_id == "3" and event.version == 1


def test_debezium_delete_is_one_version_past_the_last_row() -> None:
    value = json.dumps(_debezium("d", {"id": 3, "version": 9}, None)).encode()
    event = decode_change_event(b'{"id":3}', value, None)
    assert event is not None and event.version == 10 and event.value is None


def test_debezium_delete_without_the_old_version_is_a_decode_error() -> None:
    value = json.dumps(_debezium("d", {"id": 3}, None)).encode()
    with pytest.raises(DecodeError):
        decode_change_event(b'{"id":3}', value, None)


def test_debezium_tombstones_heartbeats_and_truncates_change_nothing() -> None:
    assert decode_change_event(b'{"id":3}', None, None) is None
    assert decode_change_event(b"k", json.dumps({"ts_ms": 1}).encode(), None) is None
    assert decode_change_event(None, json.dumps(_debezium("t", None, None)).encode(), None) is None


def test_negative_kcons_version_is_a_decode_error() -> None:
    env = Envelope.of("T", "item", "7", {}, version=1)
    headers = [(k, b"-1" if k == "kcons-version" else v) for k, v in env.headers()]
    with pytest.raises(DecodeError, match="negative version"):
        decode_change_event(env.key, env.payload, headers)


@pytest.mark.parametrize(
    "op_fields",
    [{"op": None}, {"op": 1}, {"op": 2.5}, {"op": ["u"]}, {}, {"op": "x"}, {"op": ""}],
    ids=["null", "int", "float", "list", "missing", "unknown", "empty"],
)
def test_debezium_row_event_without_a_valid_op_is_a_decode_error(op_fields: dict[str, object]) -> None:
    doc = _debezium("u", {"id": 3, "version": 4}, {"id": 3, "version": 5})
    del doc["op"]
    doc.update(op_fields)
    with pytest.raises(DecodeError, match="op"):
        decode_change_event(b'{"id":3}', json.dumps(doc).encode(), None)


def test_debezium_op_without_a_row_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="op"):
        decode_change_event(b"k", json.dumps({"op": None, "ts_ms": 1}).encode(), None)
    with pytest.raises(DecodeError, match="neither before nor after"):
        decode_change_event(b"k", json.dumps(_debezium("u", None, None)).encode(), None)


def test_schema_payload_wrapper_with_another_key_is_a_decode_error() -> None:
    inner = _debezium("u", {"id": 3, "version": 4}, {"id": 3, "version": 5})
    value = json.dumps({"schema": {"type": "struct"}, "payload": inner, "extra": 1}).encode()
    with pytest.raises(DecodeError, match="other keys"):
        decode_change_event(b'{"id":3}', value, None)


def test_schema_payload_wrapper_around_a_non_object_is_a_decode_error() -> None:
    value = json.dumps({"schema": {"type": "string"}, "payload": "u"}).encode()
    with pytest.raises(DecodeError, match="not an object"):
        decode_change_event(b"k", value, None)


def test_debezium_schema_changes_and_messages_change_nothing() -> None:
    ddl = {"source": {"table": "items"}, "ddl": "ALTER TABLE items ADD c int", "tableChanges": []}
    assert decode_change_event(b"k", json.dumps(ddl).encode(), None) is None
    message = {"op": "m", "ts_ms": 1, "message": {"prefix": "p", "content": "eA=="}}
    assert decode_change_event(b"k", json.dumps(message).encode(), None) is None
    assert decode_change_event(b"k", json.dumps({"schema": None, "payload": None}).encode(), None) is None


def test_debezium_outbox_event_uses_its_id_and_version_headers() -> None:
    headers = [("id", b"0190b6c4-0000-7000-8000-000000000001"), ("version", b"3"), ("type", b"Upd")]
    event = decode_change_event(b"42", b'{"a":1}', headers, topic="outbox.event.order")
    assert event is not None
    assert (event.source, event.aggregate_type, event.aggregate_id, event.version) == (
        "debezium-outbox", "order", "42", 3,
    )  # fmt: skip


def test_garbage_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_change_event(b"k", b"not json", None)


def test_invalidation_plans_a_tombstone_per_key_and_write_behind_plans_values() -> None:
    cache = ConsistentCache(backend=MemoryCacheBackend())
    env = Envelope.of("Upd", "item", "7", {"n": 1}, version=4)
    event = decode_change_event(env.key, env.payload, env.headers())
    assert event is not None

    def two_keys(e: object) -> list[str]:
        return ["item:7", "item-list"]

    tombs = plan_writes(cache, event, two_keys)
    assert [(w.op, w.key, w.version) for w in tombs] == [
        (WriteOp.TOMBSTONE, "item:7", 4), (WriteOp.TOMBSTONE, "item-list", 4),
    ]  # fmt: skip
    values = plan_writes(cache, event, aggregate_key, Strategy.WRITE_BEHIND)
    assert [(w.op, w.value, w.version) for w in values] == [(WriteOp.SET, env.payload, 4)]


def test_write_behind_deletes_still_write_tombstones() -> None:
    cache = ConsistentCache(backend=MemoryCacheBackend())
    value = json.dumps(_debezium("d", {"id": 3, "version": 9}, None)).encode()
    event = decode_change_event(b'{"id":3}', value, None)
    assert event is not None
    (w,) = plan_writes(cache, event, aggregate_key, Strategy.WRITE_BEHIND)
    assert (w.op, w.version) == (WriteOp.TOMBSTONE, 10)


def test_invalidator_refuses_write_through_which_belongs_to_the_writer() -> None:
    with pytest.raises(ConfigError):
        CacheInvalidator(ConsistentCache(backend=MemoryCacheBackend()), strategy=Strategy.WRITE_THROUGH)


def test_invalidator_applies_out_of_order_and_duplicate_events_without_going_backwards() -> None:
    seen: list[int] = []
    cache = ConsistentCache(backend=MemoryCacheBackend())
    inv = CacheInvalidator(cache, on_applied=lambda batch: seen.extend(a.version for a in batch))
    events = []
    for v in [3, 1, 3, 5, 2, 5, 4]:
        env = Envelope.of("Upd", "item", "1", {}, version=v)
        e = decode_change_event(env.key, env.payload, env.headers())
        assert e is not None
        events.append(e)
    inv.apply_events(events[:3])
    first = cache.peek("item:1")
    assert first is not None and first.version == 3
    inv.apply_events(events[3:4])
    inv.apply_events(events[4:])
    entry = cache.peek("item:1")
    assert entry is not None and entry.version == 5 and entry.is_tombstone
    assert seen == [3, 1, 3, 5, 2, 5, 4]


def test_key_template_formats_event_fields_and_rejects_unknown_ones() -> None:
    from kcons.cache import key_template

    env = Envelope.of("Upd", "item", "7", {}, version=4)
    event = decode_change_event(env.key, env.payload, env.headers())
    assert event is not None
    assert key_template("{aggregate_type}:{aggregate_id}")(event) == ["item:7"]
    assert key_template("v{version}/{aggregate_id}")(event) == ["v4/7"]
    with pytest.raises(ConfigError):
        key_template("{payload}")
    with pytest.raises(ConfigError):
        key_template("no fields")


@pytest.mark.parametrize("group", [" ", "  ", " g"])
def test_invalidator_command_names_a_blank_or_padded_group_instead_of_starting(group: str) -> None:
    from click.testing import CliRunner

    from kcons.cli.cache import cache_cli

    env = {"KCONS_CACHE_GROUP": group, "KCONS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "KCONS_REDIS_URL": "redis://127.0.0.1:1"}
    result = CliRunner().invoke(cache_cli, ["invalidator", "--topic", "t"], env=env)
    assert result.exit_code == 2 and "KCONS_CACHE_GROUP" in result.output, result.output
