"""Change events: kcons envelopes, Debezium outbox events and Debezium change events, normalised.

:func:`decode_change_event` is the one decoder; it raises :class:`~kcons.errors.DecodeError` for a
record that claims to be a change event but cannot be applied, so the invalidator dead-letters it.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kcons.envelope import Envelope, HeaderValue, headers_to_dict, read_envelope
from kcons.errors import ConfigError, DecodeError

log = logging.getLogger(__name__)

__all__ = ["ChangeEvent", "KeysFor", "ValueFor", "aggregate_key", "decode_change_event", "key_template"]


@dataclass(frozen=True)
class ChangeEvent:
    """A source-row change, normalised from a kcons envelope, a Debezium change event or a Debezium outbox event.

    ``version`` is the row's version after the change (for deletes: newer than the last
    version); ``value`` is the new payload when the event carries one (write-behind);
    ``committed_at`` is the source commit time in seconds since the epoch when known.
    """

    source: str
    aggregate_type: str
    aggregate_id: str
    op: str
    version: int
    value: bytes | None = None
    after: Mapping[str, Any] | None = None
    before: Mapping[str, Any] | None = None
    committed_at: float | None = None
    event_id: str | None = None
    envelope: Envelope | None = field(default=None, repr=False)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    stripped = raw.lstrip()
    if not stripped.startswith(b"{"):
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _unwrap(doc: dict[str, Any]) -> dict[str, Any]:
    if set(doc) == {"schema", "payload"} and isinstance(doc["payload"], dict):
        return doc["payload"]
    return doc


#: Debezium ops that carry a row (create, update, delete, snapshot read) and ops that carry none.
_ROW_OPS = frozenset({"c", "u", "d", "r"})
_ROWLESS_OPS = frozenset({"t", "m"})  # truncate, logical-decoding message


def _unwrap_value(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The change event inside a JSON-converter ``{"schema", "payload"}`` value (strict: no other keys)."""
    if "schema" not in doc or "payload" not in doc:
        return doc
    extra = sorted(set(doc) - {"schema", "payload"})
    if extra:
        names = ", ".join(repr(k[:40]) for k in extra[:5])
        raise DecodeError(f"a schema/payload value has other keys too ({names}): not a JSON-converter record")
    payload = doc["payload"]
    if payload is None:
        return None  # a tombstone written with a schema
    if not isinstance(payload, dict):
        raise DecodeError(f"the payload of a schema/payload value is a {type(payload).__name__}, not an object")
    return payload


def _int_version(raw: Any, what: str) -> int:
    if isinstance(raw, bool) or raw is None:
        raise DecodeError(f"{what} is missing or not an integer")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise DecodeError(f"{what} is not an integer: {str(raw)[:40]!r}") from None
    if value < 0:
        raise DecodeError(f"{what} is negative")
    return value


def _key_text(key: bytes | str | None) -> str:
    if key is None:
        return ""
    raw = key if isinstance(key, bytes) else key.encode()
    doc = _json_object(raw)
    if doc is not None:
        doc = _unwrap(doc)
        if len(doc) == 1:
            return str(next(iter(doc.values())))
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)
    text = raw.decode("utf-8", errors="replace")
    return text.strip('"')


def decode_change_event(
    key: bytes | str | None,
    value: bytes | None,
    headers: Sequence[tuple[str, HeaderValue]] | Mapping[str, HeaderValue] | None,
    *,
    topic: str | None = None,
    timestamp_ms: int | None = None,
    version_field: str = "version",
) -> ChangeEvent | None:
    """Normalise a Kafka record into a :class:`ChangeEvent`; None for records that change nothing.

    Understands kcons outbox envelopes (``kcons-version`` header; the commit time is the
    ``kcons-committed-at`` header in epoch seconds when the writer sets one, else the Kafka
    record timestamp), Debezium outbox events
    (``id`` header, ``version`` header) and Debezium change events (``before``/``after``/``op``/
    ``source``, optionally wrapped in ``{"schema", "payload"}``), whose version is
    ``after[version_field]``, or ``before[version_field] + 1`` for deletes. Debezium
    tombstones (null value), heartbeats, schema changes, truncates and messages give None.
    Raises DecodeError (the invalidator then dead-letters the record, never skips it) for a
    change event that cannot be applied: no usable or a negative version, an ``op`` that is
    missing, null, not a string or unknown, a row op without a row, a ``{"schema",
    "payload"}`` wrapper with other keys or a non-object payload, or a value that is not JSON.
    """
    h = headers_to_dict(headers)
    commit_hint = h.get("kcons-committed-at")
    env = read_envelope(key, value, headers, topic=topic)
    if env is not None:
        if env.version is None:
            raise DecodeError(f"event {env.id} has no version (kcons-version or version header)")
        if env.version < 0:
            raise DecodeError(f"event {env.id} has a negative version ({env.version}): versions start at 0")
        committed: float | None = None
        if commit_hint:
            try:
                committed = float(commit_hint)
            except ValueError:
                committed = None
        if committed is None and timestamp_ms is not None and timestamp_ms > 0:
            committed = timestamp_ms / 1000
        return ChangeEvent(
            source="kcons" if h.get("kcons-id") else "debezium-outbox",
            aggregate_type=env.aggregate_type,
            aggregate_id=env.aggregate_id,
            op=env.type,
            version=env.version,
            value=env.payload,
            committed_at=committed,
            event_id=env.id,
            envelope=env,
        )
    if value is None:
        return None  # Debezium's delete tombstone: the preceding 'd' event carried the change
    doc = _json_object(value)
    if doc is None:
        raise DecodeError("record is neither a kcons/Debezium outbox event nor a Debezium change event")
    unwrapped = _unwrap_value(doc)
    if unwrapped is None:
        return None
    doc = unwrapped
    if "op" not in doc and "before" not in doc and "after" not in doc:
        return None  # heartbeat, schema change or transaction marker: no row changed
    op = doc.get("op")
    if not isinstance(op, str) or op not in _ROW_OPS | _ROWLESS_OPS:
        shown = repr(op[:10]) if isinstance(op, str) else ("missing" if "op" not in doc else type(op).__name__)
        raise DecodeError(f"Debezium change event has no valid op (c, u, d, r, t or m): {shown}")
    before, after = doc.get("before"), doc.get("after")
    if op in _ROWLESS_OPS:
        log.warning("ignoring a Debezium %r event: it changes no row (truncate or message)", op)
        return None
    if before is None and after is None:
        raise DecodeError(f"Debezium {op!r} event carries neither before nor after")
    source = doc.get("source") if isinstance(doc.get("source"), dict) else {}
    assert isinstance(source, dict)
    if isinstance(after, dict):
        version = _int_version(after.get(version_field), f"after.{version_field}")
    elif isinstance(before, dict):
        version = _int_version(before.get(version_field), f"before.{version_field} of a delete") + 1
    else:
        raise DecodeError("Debezium event has non-object before/after")
    table = str(source.get("table") or "")
    schema = source.get("schema")
    ts = source.get("ts_ms") or doc.get("ts_ms")
    return ChangeEvent(
        source="debezium",
        aggregate_type=f"{schema}.{table}" if schema and table else table,
        aggregate_id=_key_text(key),
        op=op,
        version=version,
        value=json.dumps(after, separators=(",", ":"), sort_keys=True).encode() if isinstance(after, dict) else None,
        after=after if isinstance(after, dict) else None,
        before=before if isinstance(before, dict) else None,
        committed_at=float(ts) / 1000 if isinstance(ts, int | float) and ts > 0 else None,
        event_id=f"{source.get('lsn', '')}:{table}:{_key_text(key)}" if source.get("lsn") is not None else None,
    )


def aggregate_key(event: ChangeEvent) -> list[str]:
    """The default key mapping: ``"<aggregate type>:<aggregate id>"``."""
    return [f"{event.aggregate_type}:{event.aggregate_id}"]


KeysFor = Callable[[ChangeEvent], Iterable[str]]
ValueFor = Callable[[ChangeEvent], "bytes | None"]


def key_template(template: str) -> KeysFor:
    """A key mapping from a format string over the event's fields, e.g. ``"{aggregate_type}:{aggregate_id}"``."""
    fields = {"source", "aggregate_type", "aggregate_id", "op", "version"}
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        raise ConfigError("--key-template", f"is not a valid format string: {exc}") from None
    unknown = names - fields
    if unknown or not names:
        raise ConfigError("--key-template", f"may use only {sorted(fields)}, got {sorted(unknown) or 'no field'}")

    def keys(event: ChangeEvent) -> list[str]:
        return [template.format(**{name: getattr(event, name) for name in names})]

    return keys

