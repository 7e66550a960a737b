"""Outbox rows and how one becomes a Kafka record: pure logic, no I/O.

The record key is the aggregate id (one aggregate, one partition, in order); the headers are the
kcons envelope headers (``kcons-id``, ``kcons-type``, ...) plus the row's extra headers; the
topic is the row's own topic, else the relay's fixed topic, else Debezium's default
``outbox.event.<aggregatetype>``.

A row that cannot become a Kafka record (headers that are not a JSON object of scalar values, a
payload that is not bytes, a topic name Kafka refuses, a column of the wrong type) is *poison*:
:func:`decode_row` raises :class:`~kcons.errors.DecodeError` naming the row, and the stores
return it with :attr:`OutboxRow.poison` set, so the relay moves it to the dead-letter table
instead of stopping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kcons.envelope import (
    HEADER_AGGREGATE_ID,
    HEADER_AGGREGATE_TYPE,
    HEADER_ID,
    HEADER_TRACEPARENT,
    HEADER_TYPE,
    HEADER_VERSION,
    Envelope,
    HeaderValue,
)
from kcons.errors import DecodeError

__all__ = [
    "DEAD_ROW_FIELDS",
    "DEBEZIUM_TOPIC_PREFIX",
    "OutboxRecord",
    "OutboxRow",
    "RecordTuple",
    "decode_headers",
    "decode_row",
    "encode_headers",
    "poison_reason",
    "record_tuples",
    "row_from_select",
    "to_record",
]

DEBEZIUM_TOPIC_PREFIX = "outbox.event."

#: The fields of a dead-letter table row as the stores' ``dead_rows`` list them (the payload's size, not its bytes).
DEAD_ROW_FIELDS = (
    "position", "id", "aggregatetype", "aggregateid", "type", "topic", "version", "reason", "failed_at",
    "payload_bytes",
)  # fmt: skip

#: (topic, value, key, headers, timestamp in epoch ms or 0): what the relay hands to ``Producer.produce``.
RecordTuple = tuple[str, bytes, bytes, list[tuple[str, HeaderValue]], int]


@dataclass(slots=True)
class OutboxRow:
    """One unpublished outbox row as the relay reads it."""

    position: int
    id: str
    aggregatetype: str
    aggregateid: str
    type: str
    payload: bytes
    topic: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    version: int | None = None
    age_s: float = 0.0  # seconds since the row was inserted, when it was read (database clock)
    #: Insert time in epoch milliseconds on the relay's clock (read time minus ``age_s``), 0 if
    #: unknown. It becomes the Kafka record timestamp, so lag measured from the record's
    #: timestamp (e.g. the cache invalidation lag) includes the time the event waited in the outbox.
    created_ms: int = 0
    #: Why this row cannot be published (set by the store when :func:`decode_row` refused it), else None.
    poison: str | None = None
    #: True when its aggregate has a row in the dead-letter table: held back to keep the aggregate's order.
    held: bool = False

    def envelope(self) -> Envelope:
        """The event this row carries."""
        extra = dict(self.headers)
        traceparent = extra.pop(HEADER_TRACEPARENT, None)
        return Envelope(
            id=self.id,
            type=self.type,
            aggregate_type=self.aggregatetype,
            aggregate_id=self.aggregateid,
            payload=self.payload,
            version=self.version,
            traceparent=traceparent,
            extra_headers=extra,
        )


@dataclass(frozen=True)
class OutboxRecord:
    """A Kafka record built from an outbox row."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, HeaderValue]]
    timestamp_ms: int = 0  # 0: the producer stamps the produce time


def encode_headers(event: Envelope) -> str | None:
    """The ``headers`` column for an event: its extra headers and traceparent as a JSON object."""
    extra: dict[str, str] = dict(event.extra_headers)
    if event.traceparent:
        extra[HEADER_TRACEPARENT] = event.traceparent
    if not extra:
        return None
    return json.dumps(extra, separators=(",", ":"), sort_keys=True)


def decode_headers(raw: Any) -> dict[str, str]:
    """Read the ``headers`` column (a JSON text, a decoded dict from jsonb, or NULL).

    Raises DecodeError for anything but a JSON object of text, number or boolean values (null
    values are dropped): a JSON array, a nested value or bad JSON is never dropped silently.
    """
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str | bytes | bytearray):
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DecodeError(f"headers are not valid JSON: {type(exc).__name__}") from None
    else:
        value = raw
    if not isinstance(value, dict):
        raise DecodeError(f"headers must be a JSON object, got {type(value).__name__}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if v is None:
            continue
        if isinstance(v, bool):
            out[str(k)] = "true" if v else "false"
        elif isinstance(v, str | int | float):
            out[str(k)] = str(v)
        else:
            raise DecodeError(f"header {str(k)[:60]!r} has a {type(v).__name__} value; expected text")
    return out


#: Topic names Kafka accepts (and "." or ".." it does not).
_TOPIC = re.compile(r"\A[A-Za-z0-9._-]{1,249}\Z")


def poison_reason(row: OutboxRow, fixed_topic: str | None = None) -> str | None:
    """Why ``row`` cannot be published, naming it; None when it can (decoding problems, then its topic name)."""
    if row.poison is not None:
        return row.poison
    topic = row.topic or fixed_topic or DEBEZIUM_TOPIC_PREFIX + row.aggregatetype
    if _TOPIC.match(topic) is None or topic in (".", ".."):
        return f"outbox row position={row.position} id={row.id}: invalid Kafka topic name {topic[:80]!r}"
    return None


def to_record(row: OutboxRow, fixed_topic: str | None = None) -> OutboxRecord:
    """Build the Kafka record for ``row``: key = aggregate id, the same headers as ``row.envelope().headers()``."""
    topic = row.topic or fixed_topic or DEBEZIUM_TOPIC_PREFIX + row.aggregatetype
    key = row.aggregateid.encode()
    headers: list[tuple[str, HeaderValue]] = [
        (HEADER_ID, row.id.encode()),
        (HEADER_TYPE, row.type.encode()),
        (HEADER_AGGREGATE_TYPE, row.aggregatetype.encode()),
        (HEADER_AGGREGATE_ID, key),
    ]
    if row.version is not None:
        headers.append((HEADER_VERSION, str(row.version).encode()))
    if row.headers:  # rare path: let the envelope order traceparent and extra headers
        headers = row.envelope().headers()
    return OutboxRecord(topic=topic, key=key, value=row.payload, headers=headers, timestamp_ms=row.created_ms)


def record_tuples(rows: Iterable[OutboxRow], fixed_topic: str | None = None) -> Iterator[RecordTuple]:
    """The Kafka records of ``rows`` as tuples, the same as :func:`to_record` but without per-row objects.

    This is the relay's hot loop: the common row (no extra headers) is built inline, and the
    ``kcons-type`` and ``kcons-aggregate-type`` headers (few distinct values) are built once per
    value and shared between records (confluent-kafka only reads them).
    """
    prefix = DEBEZIUM_TOPIC_PREFIX
    types: dict[str, tuple[str, HeaderValue]] = {}
    agg_types: dict[str, tuple[str, HeaderValue]] = {}
    for row in rows:
        if row.headers:
            rec = to_record(row, fixed_topic)
            yield rec.topic, rec.value, rec.key, rec.headers, rec.timestamp_ms
            continue
        key = row.aggregateid.encode()
        type_header = types.get(row.type)
        if type_header is None:
            type_header = types[row.type] = (HEADER_TYPE, row.type.encode())
        agg_type = row.aggregatetype
        agg_type_header = agg_types.get(agg_type)
        if agg_type_header is None:
            agg_type_header = agg_types[agg_type] = (HEADER_AGGREGATE_TYPE, agg_type.encode())
        headers: list[tuple[str, HeaderValue]] = [
            (HEADER_ID, row.id.encode()),
            type_header,
            agg_type_header,
            (HEADER_AGGREGATE_ID, key),
        ]
        if row.version is not None:
            headers.append((HEADER_VERSION, str(row.version).encode()))
        yield row.topic or fixed_topic or prefix + agg_type, row.payload, key, headers, row.created_ms


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise DecodeError(f"column {column} is {type(value).__name__}, not text")
    return value


#: The headers of a row without extra headers (shared, read-only).
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def decode_row(r: Sequence[Any], age_s: float, read_at: float) -> OutboxRow:
    """Build an OutboxRow from a selected result row (the column order every outbox store selects in).

    ``read_at`` is ``time.time()`` when the rows were read: with the row's age (database clock)
    it gives the insert time on this host's clock, without trusting the two clocks to agree.
    Column 10, when selected, says whether the row's aggregate is held by a dead row. Raises
    DecodeError naming the row's position and id when a column cannot be used (see the module
    docstring).
    """
    # The common row, accepted by exact types alone (what the column checks below would conclude):
    # this runs for every row the relay reads, so it makes no call it can avoid.
    if type(r) is not tuple or len(r) < 10:
        return _decode_checked(r, age_s, read_at)
    position, id_, agg_type, agg_id, type_, payload, topic, headers, version = r[:9]
    if (
        type(position) is int
        and type(id_) is str
        and type(agg_type) is str
        and type(agg_id) is str
        and type(type_) is str
        and type(payload) is bytes
        and headers is None
        and (topic is None or type(topic) is str)
        and (version is None or type(version) is int)
    ):
        held = len(r) > 10 and bool(r[10])
        created_ms = int((read_at - age_s) * 1000)
        return OutboxRow(
            position, id_, agg_type, agg_id, type_, payload, topic, _NO_HEADERS, version, age_s, created_ms, None, held
        )
    return _decode_checked(r, age_s, read_at)


def _decode_checked(r: Sequence[Any], age_s: float, read_at: float) -> OutboxRow:
    """:func:`decode_row` with every column checked (rows with headers, odd types, or poison)."""
    try:
        position = r[0]
        if not isinstance(position, int) or isinstance(position, bool):
            raise DecodeError(f"column position is {type(position).__name__}, not an integer")
        payload = r[5]
        if isinstance(payload, str):
            raise DecodeError("payload is TEXT, not bytes (store the encoded bytes in a BLOB/bytea)")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise DecodeError(f"payload is {type(payload).__name__}, not bytes")
        topic = r[6]
        if topic is not None and not isinstance(topic, str):
            raise DecodeError(f"column topic is {type(topic).__name__}, not text")
        version = r[8]
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise DecodeError(f"column version is {type(version).__name__}, not an integer")
        return OutboxRow(
            position=position,
            id=_text(r[1], "id"),
            aggregatetype=_text(r[2], "aggregatetype"),
            aggregateid=_text(r[3], "aggregateid"),
            type=_text(r[4], "type"),
            payload=bytes(payload),
            topic=topic,
            headers=decode_headers(r[7]),
            version=version,
            age_s=age_s,
            created_ms=int((read_at - age_s) * 1000),
            held=bool(r[10]) if len(r) > 10 else False,
        )
    except DecodeError as exc:
        raise DecodeError(f"outbox row position={_safe(r, 0)} id={_safe(r, 1)}: {exc}") from None
    except (IndexError, TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(
            f"outbox row position={_safe(r, 0)} id={_safe(r, 1)}: unreadable ({type(exc).__name__})"
        ) from None


def _safe(r: Sequence[Any], i: int) -> str:
    try:
        return str(r[i])[:64]
    except Exception:  # a row that is not even a sequence: name what we can
        return "?"


def row_from_select(r: Sequence[Any], age_s: float, read_at: float) -> OutboxRow:
    """:func:`decode_row`, except that a row it refuses comes back with ``poison`` set (never raises
    for a row's content), so the relay can move it to the dead-letter table and go on."""
    try:
        return decode_row(r, age_s, read_at)
    except DecodeError as exc:
        position = r[0] if len(r) > 0 and isinstance(r[0], int) else -1
        return OutboxRow(
            position=position,
            id=_safe(r, 1),
            aggregatetype=r[2] if len(r) > 2 and isinstance(r[2], str) else _safe(r, 2),
            aggregateid=r[3] if len(r) > 3 and isinstance(r[3], str) else _safe(r, 3),
            type="",
            payload=b"",
            age_s=age_s,
            poison=str(exc),
            held=bool(r[10]) if len(r) > 10 else False,
        )
