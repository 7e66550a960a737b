"""Fuzzing the event decoders: the envelope reader, the cache's change-event decoder and the outbox row
decoder. Every input decodes or raises the typed DecodeError / PoisonMessageError, never another exception."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kcons.cache.events import decode_change_event
from kcons.envelope import event_id_header, headers_to_dict, read_envelope
from kcons.errors import DecodeError, PoisonMessageError
from kcons.outbox.rows import _decode_checked, decode_headers, decode_row, poison_reason, record_tuples, row_from_select

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TYPED = (DecodeError, PoisonMessageError)

header_names = st.sampled_from(
    ["kcons-id", "kcons-type", "kcons-version", "kcons-aggregate-id", "kcons-aggregate-type", "kcons-committed-at",
     "id", "version", "type", "aggregatetype", "traceparent", "x"]
)  # fmt: skip
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["-1", "0", "1", "9" * 30, "1e3", "nan", '"q"', "", " 7", "\x1ekafka:t/0/1"]),
)
header_values = st.one_of(st.none(), texts, texts.map(str.encode), st.binary(max_size=20))
headers = st.one_of(
    st.none(),
    st.lists(st.tuples(header_names, header_values), max_size=6),
    st.dictionaries(header_names, header_values, max_size=6),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def debezium_values(draw: st.DrawFn) -> bytes:
    """JSON change events near the Debezium shape (op, before/after, source, a schema/payload wrapper)."""
    row = draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(["id", "version", "name"]), json_scalars)))
    doc: dict[str, Any] = {
        "op": draw(st.one_of(st.sampled_from(["c", "u", "d", "r", "t", "m", "x"]), json_scalars)),
        "before": row if draw(st.booleans()) else draw(json_values),
        "after": row if draw(st.booleans()) else draw(json_values),
        "source": draw(st.one_of(st.dictionaries(st.sampled_from(["table", "ts_ms"]), json_scalars), json_values)),
    }
    for name in draw(st.lists(st.sampled_from(list(doc)), max_size=2)):
        doc.pop(name, None)
    if draw(st.booleans()):
        doc = {"schema": draw(json_values), "payload": doc}
        if draw(st.booleans()):
            doc["extra"] = 1
    text = json.dumps(doc, allow_nan=True)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut]
    return text.encode()


json_docs = json_values.map(lambda v: json.dumps(v).encode())
values = st.one_of(st.none(), st.binary(max_size=40), debezium_values(), json_docs)
keys = st.one_of(st.none(), st.binary(max_size=10), st.text(max_size=10))


@FUZZ
@given(keys, values, headers, st.one_of(st.none(), st.sampled_from(["t", "outbox.event.order", "outbox.event."])))
def test_the_envelope_reader_decodes_or_raises_decode_error(key: Any, value: Any, hs: Any, topic: Any) -> None:
    try:
        env = read_envelope(key, value, hs, topic=topic)
    except TYPED:
        return
    if env is not None:
        found = event_id_header(hs)
        assert found is not None and found[0] == env.id  # the same id the consumer deduplicates by
    with contextlib.suppress(*TYPED):
        headers_to_dict(hs)


@FUZZ
@given(keys, values, headers, st.one_of(st.none(), st.integers(-(2**63), 2**63)))
def test_the_change_event_decoder_decodes_or_raises_decode_error(key: Any, value: Any, hs: Any, ts: Any) -> None:
    try:
        event = decode_change_event(key, value, hs, topic="db.public.items", timestamp_ms=ts)
    except TYPED:
        return
    if event is not None:
        assert isinstance(event.version, int) and event.version >= 0


column_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(), st.text(max_size=12), st.binary(max_size=12)
)
header_columns = st.one_of(
    st.none(), st.text(max_size=20), st.binary(max_size=20), json_values, json_values.map(json.dumps),
    json_values.map(lambda v: json.dumps(v).encode()),
)  # fmt: skip


@st.composite
def selected_rows(draw: st.DrawFn) -> tuple[Any, ...]:
    """A selected outbox row: mostly well-typed columns, any of which may be of another type."""
    good: list[Any] = [
        draw(st.integers(1, 2**40)), draw(st.uuids().map(str)), draw(st.text(max_size=10)),
        draw(st.text(max_size=10)), draw(st.text(max_size=10)), draw(st.binary(max_size=20)),
        draw(st.one_of(st.none(), st.text(max_size=260))), draw(header_columns),
        draw(st.one_of(st.none(), st.integers(-5, 2**62))), draw(st.floats(0, 1e6)), draw(st.booleans()),
    ]  # fmt: skip
    for i in draw(st.lists(st.integers(0, len(good) - 1), max_size=3)):
        good[i] = draw(column_values)
    return tuple(good[: draw(st.integers(0, len(good)))]) if draw(st.integers(0, 9)) == 0 else tuple(good)


@FUZZ
@given(selected_rows(), st.one_of(st.none(), st.text(max_size=30)))
def test_the_outbox_row_decoder_decodes_or_raises_decode_error_naming_the_row(r: Any, fixed: Any) -> None:
    try:
        row = decode_row(r, 0.0, 1e9)
    except TYPED as exc:
        assert "outbox row position=" in str(exc)
        marked = row_from_select(r, 0.0, 1e9)  # the stores' wrapper: a poison row for the relay, never a raise
        assert marked.poison is not None and poison_reason(marked, fixed) == marked.poison
        return
    reason = poison_reason(row, fixed)
    if reason is None:
        (record,) = record_tuples([row], fixed)  # a row that passes is a record Kafka can take
        assert isinstance(record[1], bytes) and all(isinstance(v, bytes) for _, v in record[3])
    else:
        assert f"position={row.position}" in reason


@FUZZ
@given(selected_rows(), st.floats(0, 1e6))
def test_the_outbox_row_decoders_fast_path_gives_what_the_checked_path_gives(r: Any, age: float) -> None:
    try:
        checked = _decode_checked(r, age, 2e9)
    except DecodeError:
        with contextlib.suppress(DecodeError):
            decode_row(r, age, 2e9)
            raise AssertionError(f"the fast path accepted a row the checked path refuses: {r!r}") from None
        return
    assert decode_row(r, age, 2e9) == checked


def test_the_fast_path_takes_the_common_row_as_the_checked_path_would() -> None:
    r = (7, "id-7", "order", "o-1", "Paid", b"{}", None, None, 3, 0.25, True)
    assert decode_row(r, 0.25, 100.0) == _decode_checked(r, 0.25, 100.0)
    assert decode_row(r, 0.25, 100.0).held and decode_row(r, 0.25, 100.0).created_ms == 99750


@FUZZ
@given(header_columns)
def test_the_outbox_headers_column_decodes_to_text_or_raises_decode_error(raw: Any) -> None:
    try:
        decoded = decode_headers(raw)
    except TYPED:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in decoded.items())
