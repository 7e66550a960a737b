"""Event ids of consumed messages (the dedup key) and the default dead-letter topic.

:func:`default_event_id` reads the ``kcons-id`` header, else Debezium's ``id`` header. A message
without either is identified by its position (``topic/partition/offset`` behind a reserved prefix
that no real id may carry, so the two kinds never collide), so a redelivery of the same record is
still a duplicate; an id header that cannot be decoded makes the message
poison (dead-lettered, never handled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kcons.consumer.plan import Entry
from kcons.envelope import POSITION_ID_PREFIX, event_id_header
from kcons.kafka.dlq import REASON_MAX, default_dlq_topic

__all__ = ["KeyFunction", "default_dlq_topic", "default_event_id", "entry_of", "position_id", "reason"]

#: ``key_fn(msg)``: a message's event id, None when it has none, DecodeError when it is unreadable.
KeyFunction = Callable[[Any], "str | None"]


def default_event_id(msg: Any) -> str | None:
    """The event id of a message by :func:`kcons.envelope.event_id_header` (the first ``kcons-id``,
    else Debezium's ``id``), or None.

    Raises DecodeError when the id header is not UTF-8 or uses the reserved position-id prefix,
    which makes the message poison.
    """
    found = event_id_header(msg.headers())
    return None if found is None else found[0]


def position_id(msg: Any) -> str:
    """A message's position as an id, ``<POSITION_ID_PREFIX>topic/partition/offset``: unique per record,
    the same on redelivery, and never equal to a real id (an id header may not use the prefix)."""
    return f"{POSITION_ID_PREFIX}{msg.topic()}/{msg.partition()}/{msg.offset()}"


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
