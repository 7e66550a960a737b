"""The kcons event envelope: Kafka headers that make every event deduplicable and ordered.

Every event kcons produces carries ``kcons-id`` (a UUIDv7, unique per event, the dedup key),
``kcons-type``, ``kcons-aggregate-type``, ``kcons-aggregate-id``, ``kcons-version`` (the
source row's version, monotonic per aggregate) and ``traceparent`` when the caller has one.
The record key is the aggregate id, so one aggregate's events share a partition and stay in
order. :func:`read_envelope` also accepts Debezium's outbox event-router shape (event id in
the ``id`` header, key = aggregate id, value = payload).

CloudEvents: :meth:`Envelope.with_cloudevents` adds the Kafka protocol binding's binary-mode
headers (``ce_specversion``, ``ce_id`` = ``kcons-id``, ``ce_source``, ``ce_type``, ``ce_time``,
``ce_subject`` = aggregate id, ``content-type``), so CloudEvents consumers read kcons events;
:func:`read_envelope` reads records that carry only those headers (``ce_id`` is then the id).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from kcons.errors import DecodeError
from kcons.ids import new_event_id, uuid7

__all__ = [
    "CE_ID",
    "CE_SOURCE",
    "CE_SPECVERSION",
    "CE_TIME",
    "CE_TYPE",
    "HEADER_AGGREGATE_ID",
    "HEADER_AGGREGATE_TYPE",
    "HEADER_ID",
    "HEADER_TRACEPARENT",
    "HEADER_TYPE",
    "HEADER_VERSION",
    "POSITION_ID_PREFIX",
    "Envelope",
    "Headers",
    "event_id_header",
    "headers_to_dict",
    "new_event_id",
    "read_envelope",
    "uuid7",
]

HEADER_ID = "kcons-id"
HEADER_TYPE = "kcons-type"
HEADER_AGGREGATE_TYPE = "kcons-aggregate-type"
HEADER_AGGREGATE_ID = "kcons-aggregate-id"
HEADER_VERSION = "kcons-version"
HEADER_TRACEPARENT = "traceparent"
#: CloudEvents Kafka protocol binding (binary content mode) headers.
CE_SPECVERSION = "ce_specversion"
CE_ID = "ce_id"
CE_SOURCE = "ce_source"
CE_TYPE = "ce_type"
CE_TIME = "ce_time"
CE_SUBJECT = "ce_subject"
CE_CONTENT_TYPE = "content-type"
CLOUDEVENTS_SPECVERSION = "1.0"
KCONS_HEADERS = frozenset(
    {HEADER_ID, HEADER_TYPE, HEADER_AGGREGATE_TYPE, HEADER_AGGREGATE_ID, HEADER_VERSION, HEADER_TRACEPARENT}
)

#: Kafka headers as confluent-kafka takes and returns them (a list of pairs, or a dict).
HeaderValue = str | bytes | None
Headers = Sequence[tuple[str, HeaderValue]] | Mapping[str, HeaderValue]

def _text(value: HeaderValue) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("a header value is not valid UTF-8") from None
    return value


def headers_to_dict(headers: Headers | None) -> dict[str, str | None]:
    """Decode headers to text; for a repeated name the FIRST value wins, the rule every kcons reader follows.

    The consumer's id fast path reads the first ``kcons-id`` header, so the envelope, the cache's
    decoder and the dedup key all agree on which of two repeated headers counts.
    """
    if not headers:
        return {}
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str | None] = {}
    for name, value in pairs:
        text = _text(value)
        if name not in out:
            out[name] = text
    return out


#: Prefix of the ids the consumer makes for messages without an id header (``topic/partition/offset``).
#: It starts with a control character that no UUID or Debezium id holds, and an id header starting
#: with it is refused (DecodeError), so a made-up id can never equal a real one.
POSITION_ID_PREFIX = "\x1ekafka:"


def _id_text(value: Any, header: str) -> str | None:
    if value is None:
        return None
    if type(value) is bytes:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"header {header} is not UTF-8") from None
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = bytes(value).decode("utf-8")
        except (TypeError, ValueError):
            raise DecodeError(f"header {header} is not UTF-8 bytes") from None
    if text.startswith(POSITION_ID_PREFIX):
        raise DecodeError(f"header {header} starts with the prefix reserved for position ids")
    return text or None


def event_id_header(headers: Headers | None) -> tuple[str, bool] | None:
    """The event id of a record's headers and whether it is a kcons id, or None when it has none.

    THE rule, used by the consumer's dedup key and by :func:`read_envelope`: the first ``kcons-id``
    header when it is non-empty, else the first Debezium ``id`` header (the quotes of Debezium's
    JSON header converter removed), else the first CloudEvents ``ce_id`` header. Raises
    DecodeError when the id header is not UTF-8 or uses the reserved :data:`POSITION_ID_PREFIX`.
    """
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    debezium: Any = None
    cloudevent: Any = None
    seen_kcons = seen_debezium = seen_ce = False
    for name, value in pairs:
        if name == HEADER_ID and not seen_kcons:
            seen_kcons = True
            text = _id_text(value, HEADER_ID)
            if text is not None:
                return text, True
        elif name == "id" and not seen_debezium:
            seen_debezium = True
            debezium = value
        elif name == CE_ID and not seen_ce:
            seen_ce = True
            cloudevent = value
    if seen_debezium:
        text = _id_text(debezium, "id")
        if text is not None and len(text) >= 2 and text[0] == '"' and text[-1] == '"':
            text = text[1:-1] or None
        if text is not None:
            return text, False
    if seen_ce:
        text = _id_text(cloudevent, CE_ID)
        if text is not None:
            return text, False
    return None


@dataclass(frozen=True)
class Envelope:
    """One event with its identity, aggregate, version and payload."""

    type: str
    aggregate_type: str
    aggregate_id: str
    payload: bytes
    version: int | None = None
    id: str = field(default_factory=new_event_id)
    traceparent: str | None = None
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        type: str,
        aggregate_type: str,
        aggregate_id: str,
        payload: Any,
        *,
        version: int | None = None,
        traceparent: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Build an envelope, encoding a non-bytes payload as compact JSON."""
        if isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            data = payload.encode()
        else:
            data = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return cls(
            type=type,
            aggregate_type=aggregate_type,
            aggregate_id=str(aggregate_id),
            payload=data,
            version=version,
            traceparent=traceparent,
            extra_headers=dict(headers or {}),
        )

    @property
    def key(self) -> bytes:
        """The Kafka record key: the aggregate id, so an aggregate's events stay in order."""
        return self.aggregate_id.encode()

    def headers(self) -> list[tuple[str, HeaderValue]]:
        """The Kafka headers of this event, kcons headers first, then the caller's."""
        out: list[tuple[str, HeaderValue]] = [
            (HEADER_ID, self.id.encode()),
            (HEADER_TYPE, self.type.encode()),
            (HEADER_AGGREGATE_TYPE, self.aggregate_type.encode()),
            (HEADER_AGGREGATE_ID, self.aggregate_id.encode()),
        ]
        if self.version is not None:
            out.append((HEADER_VERSION, str(self.version).encode()))
        if self.traceparent:
            out.append((HEADER_TRACEPARENT, self.traceparent.encode()))
        out.extend((k, v.encode()) for k, v in self.extra_headers.items() if k not in KCONS_HEADERS)
        return out

    def with_cloudevents(
        self, source: str, *, time: datetime | None = None, content_type: str = "application/json"
    ) -> Envelope:
        """A copy that also carries the CloudEvents Kafka binding's headers (binary content mode).

        ``ce_id`` is the kcons id (one dedup key for both worlds), ``ce_type`` the event type,
        ``ce_subject`` the aggregate id, ``ce_time`` ``time`` (default: now, UTC) in RFC 3339.
        ``source`` is the CloudEvents source, a URI-reference naming the producing system.
        """
        if not source:
            raise ValueError("a CloudEvents source is required (a URI-reference, e.g. /orders-service)")
        when = (time or datetime.now(UTC)).astimezone(UTC)
        ce = {
            CE_SPECVERSION: CLOUDEVENTS_SPECVERSION,
            CE_ID: self.id,
            CE_SOURCE: source,
            CE_TYPE: self.type,
            CE_TIME: when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            CE_SUBJECT: self.aggregate_id,
            CE_CONTENT_TYPE: content_type,
        }
        return replace(self, extra_headers={**self.extra_headers, **ce})

    def json(self) -> Any:
        """Decode the payload as JSON (raises DecodeError if it is not)."""
        try:
            return json.loads(self.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"payload is not JSON: {exc}") from None


def _parse_version(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DecodeError(f"{HEADER_VERSION} header is not an integer: {raw[:40]!r}") from None


def _debezium_payload(value: bytes) -> bytes:
    """Unwrap a JSON-converter ``{"schema": ..., "payload": ...}`` value; else return it as is."""
    stripped = value.lstrip()
    if not stripped.startswith(b"{") or b'"schema"' not in stripped:
        return value
    try:
        doc = json.loads(value)
    except ValueError:
        return value
    if isinstance(doc, dict) and set(doc) == {"schema", "payload"}:
        inner = doc["payload"]
        if isinstance(inner, str):
            return inner.encode()
        return json.dumps(inner, separators=(",", ":")).encode()
    return value


def read_envelope(
    key: bytes | str | None,
    value: bytes | None,
    headers: Headers | None,
    *,
    topic: str | None = None,
) -> Envelope | None:
    """Read an event from a Kafka record, or return None if it carries no event id.

    Understands kcons headers and Debezium's outbox event-router shape (header ``id``; the
    aggregate type is taken from an ``aggregatetype`` header, else from a topic named
    ``outbox.event.<aggregatetype>``). Raises DecodeError for malformed headers.
    """
    found = event_id_header(headers)
    if found is None:
        return None
    event_id, is_kcons = found
    h = headers_to_dict(headers)
    payload = value if value is not None else b""
    key_text = _text(key)
    if is_kcons:
        return Envelope(
            id=event_id,
            type=h.get(HEADER_TYPE) or "",
            aggregate_type=h.get(HEADER_AGGREGATE_TYPE) or "",
            aggregate_id=h.get(HEADER_AGGREGATE_ID) or key_text or "",
            version=_parse_version(h.get(HEADER_VERSION)),
            payload=payload,
            traceparent=h.get(HEADER_TRACEPARENT),
            extra_headers={k: v for k, v in h.items() if k not in KCONS_HEADERS and v is not None},
        )
    if h.get("id") is None and h.get(CE_ID) is not None:  # a CloudEvent (Kafka binding, binary mode)
        if h.get(CE_SPECVERSION) is None:
            raise DecodeError(f"a {CE_ID} header without {CE_SPECVERSION}: not a CloudEvent")
        return Envelope(
            id=event_id,
            type=h.get(CE_TYPE) or "",
            aggregate_type="",
            aggregate_id=h.get(CE_SUBJECT) or key_text or "",
            payload=payload,
            traceparent=h.get(HEADER_TRACEPARENT),
            extra_headers={k: v for k, v in h.items() if k not in KCONS_HEADERS and v is not None},
        )
    # Debezium outbox event router
    agg_type = h.get("aggregatetype") or h.get("aggregateType") or ""
    if not agg_type and topic and topic.startswith("outbox.event."):
        agg_type = topic[len("outbox.event.") :]
    return Envelope(
        id=event_id,
        type=h.get("type") or h.get("eventType") or "",
        aggregate_type=agg_type,
        aggregate_id=key_text.strip('"') if key_text else "",
        version=_parse_version(h.get("version")),
        payload=_debezium_payload(payload),
        traceparent=h.get(HEADER_TRACEPARENT),
    )
