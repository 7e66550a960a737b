"""CloudEvents Kafka binding (binary mode) on the envelope: written beside kcons headers, read alone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kcons.envelope import Envelope, event_id_header, read_envelope
from kcons.errors import DecodeError

CE_ONLY = [
    ("ce_specversion", b"1.0"), ("ce_id", b"evt-1"), ("ce_source", b"/billing"), ("ce_type", b"InvoicePaid"),
    ("ce_subject", b"inv-7"), ("content-type", b"application/json"),
]  # fmt: skip


def test_with_cloudevents_adds_the_binding_headers_and_ce_id_is_the_kcons_id() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    event = Envelope.of("OrderPlaced", "order", "o1", {"n": 1}).with_cloudevents("/orders", time=at)
    headers = dict(event.headers())
    assert headers["kcons-id"] == headers["ce_id"] == event.id.encode()
    assert headers["ce_specversion"] == b"1.0" and headers["ce_source"] == b"/orders"
    assert headers["ce_type"] == b"OrderPlaced" and headers["ce_subject"] == b"o1"
    assert headers["ce_time"] == b"2026-01-02T03:04:05.678Z"
    assert headers["content-type"] == b"application/json"
    back = read_envelope(event.key, event.payload, event.headers())
    assert back is not None and back.id == event.id and back.type == "OrderPlaced"
    assert back.extra_headers["ce_source"] == "/orders"


def test_with_cloudevents_needs_a_source() -> None:
    with pytest.raises(ValueError, match="source"):
        Envelope.of("T", "a", "1", b"").with_cloudevents("")


def test_a_cloudevents_only_record_is_read_with_ce_id_as_its_id() -> None:
    assert event_id_header(CE_ONLY) == ("evt-1", False)
    event = read_envelope(b"inv-7", b'{"paid":true}', CE_ONLY)
    assert event is not None
    assert (event.id, event.type, event.aggregate_id, event.json()) == ("evt-1", "InvoicePaid", "inv-7", {"paid": True})


def test_kcons_and_debezium_ids_win_over_ce_id() -> None:
    assert event_id_header([("ce_id", b"c"), ("kcons-id", b"k")]) == ("k", True)
    assert event_id_header([("ce_id", b"c"), ("id", b'"d"')]) == ("d", False)


def test_a_ce_id_without_specversion_is_not_a_cloudevent() -> None:
    with pytest.raises(DecodeError, match="ce_specversion"):
        read_envelope(b"k", b"", [("ce_id", b"evt-1")])
