"""Outbox rows and how one becomes a Kafka record: pure logic, no I/O.

The record key is the aggregate id (one aggregate, one partition, in order); the headers are the
kcons envelope headers (``kcons-id``, ``kcons-type``, ...) plus the row's extra headers; the
topic is the row's own topic, else the relay's fixed topic, else Debezium's default
``outbox.event.<aggregatetype>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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

__all__ = [
    "DEBEZIUM_TOPIC_PREFIX",
    "OutboxRecord",
    "OutboxRow",
    "RecordTuple",
    "decode_headers",
    "encode_headers",
    "record_tuples",
    "row_from_select",
    "to_record",
]

DEBEZIUM_TOPIC_PREFIX = "outbox.event."

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
    """Read the ``headers`` column (a JSON text, a decoded dict from jsonb, or NULL)."""
    if raw is None or raw == "":
        return {}
    value = json.loads(raw) if isinstance(raw, str | bytes) else raw
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}


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

    This is the relay's hot loop: the common row (no extra headers) is built inline.
    """
    prefix = DEBEZIUM_TOPIC_PREFIX
    for row in rows:
        if row.headers:
            rec = to_record(row, fixed_topic)
            yield rec.topic, rec.value, rec.key, rec.headers, rec.timestamp_ms
            continue
        key = row.aggregateid.encode()
        headers: list[tuple[str, HeaderValue]] = [
            (HEADER_ID, row.id.encode()),
            (HEADER_TYPE, row.type.encode()),
            (HEADER_AGGREGATE_TYPE, row.aggregatetype.encode()),
            (HEADER_AGGREGATE_ID, key),
        ]
        if row.version is not None:
            headers.append((HEADER_VERSION, str(row.version).encode()))
        yield row.topic or fixed_topic or prefix + row.aggregatetype, row.payload, key, headers, row.created_ms


def row_from_select(r: Sequence[Any], age_s: float, read_at: float) -> OutboxRow:
    """Build an OutboxRow from a selected result row (the column order every outbox store selects in).

    ``read_at`` is ``time.time()`` when the rows were read: with the row's age (database clock)
    it gives the insert time on this host's clock, without trusting the two clocks to agree.
    """
    return OutboxRow(
        position=r[0],
        id=r[1],
        aggregatetype=r[2],
        aggregateid=r[3],
        type=r[4],
        payload=bytes(r[5]),
        topic=r[6],
        headers=decode_headers(r[7]),
        version=r[8],
        age_s=age_s,
        created_ms=int((read_at - age_s) * 1000),
    )
