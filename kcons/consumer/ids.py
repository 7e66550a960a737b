"""Event ids of consumed messages (the dedup key) and the default dead-letter topic.

:func:`default_event_id` reads the ``kcons-id`` header, else Debezium's ``id`` header. A message
without either is identified by its position (``topic/partition/offset``), so a redelivery of
the same record is still a duplicate; an id header that cannot be decoded makes the message
poison (dead-lettered, never handled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kcons.consumer.plan import Entry
from kcons.envelope import HEADER_ID
from kcons.errors import DecodeError
from kcons.kafka.dlq import REASON_MAX, default_dlq_topic

__all__ = ["KeyFunction", "default_dlq_topic", "default_event_id", "entry_of", "position_id", "reason"]

#: ``key_fn(msg)``: a message's event id, None when it has none, DecodeError when it is unreadable.
KeyFunction = Callable[[Any], "str | None"]


def default_event_id(msg: Any) -> str | None:
    """The event id of a message: the ``kcons-id`` header, else Debezium's ``id`` header, else None.

    Raises DecodeError when the id header is not UTF-8, which makes the message poison.
    """
    headers = msg.headers()
    if not headers:
        return None
    debezium: Any = None
    for name, value in headers:
        if name == HEADER_ID:
            if value:
                try:
                    return value.decode() if type(value) is bytes else _decode_id(value, HEADER_ID)
                except UnicodeDecodeError:
                    raise DecodeError(f"header {HEADER_ID} is not UTF-8") from None
            return None
        if name == "id" and debezium is None:
            debezium = value
    if debezium is not None:
        text = _decode_id(debezium, "id")
        if text is not None and len(text) >= 2 and text[0] == '"' and text[-1] == '"':
            text = text[1:-1] or None  # Debezium's JSON header converter quotes strings
        return text
    return None


def _decode_id(value: Any, header: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"header {header} is not UTF-8") from None
    return text or None


def position_id(msg: Any) -> str:
    """A message's position as an id, ``topic/partition/offset``: unique per record, the same on redelivery."""
    return f"{msg.topic()}/{msg.partition()}/{msg.offset()}"


def entry_of(msg: Any, key_fn: KeyFunction) -> tuple[Entry, bool]:
    """The message as the batch decision sees it, and True when its id fell back to its position."""
    try:
        event_id = key_fn(msg)
    except Exception as exc:  # an id that cannot be read makes the message poison
        return Entry(msg.topic(), msg.partition(), msg.offset(), None, reason(exc)), False
    if event_id is None:
        return Entry(msg.topic(), msg.partition(), msg.offset(), position_id(msg)), True
    return Entry(msg.topic(), msg.partition(), msg.offset(), event_id), False


def reason(exc: BaseException) -> str:
    """An exception as a dead-letter reason: ``Type: message``, at most the dead-letter header's length."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."
