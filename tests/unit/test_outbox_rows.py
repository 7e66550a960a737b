"""Outbox rows become Kafka records with the kcons envelope: key = aggregate id, same headers, routed topic."""

from __future__ import annotations

import sqlite3

import pytest

from kcons.envelope import Envelope, read_envelope
from kcons.errors import ConfigError
from kcons.outbox.rows import OutboxRow, decode_headers, encode_headers, to_record
from kcons.outbox.schema import postgres_ddl, sqlite_ddl, validate_table


def _row(**kw: object) -> OutboxRow:
    base: dict[str, object] = {
        "position": 7, "id": "01a20921-3e2e-738d-bc72-e5a9853c95f5", "aggregatetype": "order",
        "aggregateid": "o-1", "type": "Paid", "payload": b'{"a":1}', "version": 3,
    }  # fmt: skip
    base.update(kw)
    return OutboxRow(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "row",
    [
        _row(),
        _row(version=None),
        _row(headers={"traceparent": "00-abc-def-01", "tenant": "t1"}),
    ],
)
def test_record_headers_are_the_envelope_headers(row: OutboxRow) -> None:
    rec = to_record(row, "fixed")
    assert rec.headers == row.envelope().headers()
    assert rec.key == b"o-1" and rec.value == b'{"a":1}'
    back = read_envelope(rec.key, rec.value, rec.headers)
    assert back is not None
    assert (back.id, back.type, back.aggregate_type, back.aggregate_id, back.version) == (
        row.id, "Paid", "order", "o-1", row.version,
    )  # fmt: skip
    assert back.traceparent == row.headers.get("traceparent")


def test_topic_is_row_topic_then_fixed_topic_then_debezium_default() -> None:
    assert to_record(_row(topic="own"), "fixed").topic == "own"
    assert to_record(_row(), "fixed").topic == "fixed"
    assert to_record(_row(), None).topic == "outbox.event.order"


def test_headers_column_round_trips_extra_headers_and_traceparent() -> None:
    event = Envelope.of("T", "A", "1", {}, traceparent="00-1-2-01", headers={"x": "y"})
    raw = encode_headers(event)
    assert raw is not None
    assert decode_headers(raw) == {"traceparent": "00-1-2-01", "x": "y"}
    assert decode_headers({"x": "y", "n": None}) == {"x": "y"}  # jsonb arrives as a dict
    assert decode_headers(None) == {} and encode_headers(Envelope.of("T", "A", "1", {})) is None


@pytest.mark.parametrize("bad", ["", "Outbox", "x;drop table y", "a-b", "1abc", "x" * 60])
def test_table_names_that_are_not_plain_identifiers_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_table(bad)
    assert info.value.setting == "KCONS_OUTBOX_TABLE"


def test_postgres_ddl_keeps_debezium_columns_and_a_commit_position() -> None:
    ddl = postgres_ddl("my_outbox")
    for column in ("id ", "aggregatetype", "aggregateid", "type ", "payload", "position", "txid", "xid8",
                   "pg_current_xact_id()", "created_at", "published_at", "my_outbox_fence", "pg_notify"):  # fmt: skip
        assert column in ddl
    assert "{table}" not in ddl


def test_sqlite_ddl_is_idempotent_and_creates_the_outbox_table() -> None:
    db = sqlite3.connect(":memory:")
    db.executescript(sqlite_ddl())
    db.executescript(sqlite_ddl())
    cols = [r[1] for r in db.execute("PRAGMA table_info(kcons_outbox)")]
    assert cols[:6] == ["position", "id", "aggregatetype", "aggregateid", "type", "payload"]


def test_relay_fast_path_builds_the_same_records_as_to_record() -> None:
    from kcons.outbox.rows import record_tuples

    rows = [_row(), _row(version=None), _row(topic="own"), _row(headers={"traceparent": "00-a-b-01", "x": "y"})]
    for fixed in (None, "fixed"):
        fast = list(record_tuples(rows, fixed))
        slow = [to_record(r, fixed) for r in rows]
        assert fast == [(r.topic, r.value, r.key, r.headers, r.timestamp_ms) for r in slow]
