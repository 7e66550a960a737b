"""Handler adapters: give a handler the decoded event instead of the raw Kafka message.

``IdempotentConsumer(config, topics, with_envelope(handle), store=...)`` calls
``handle(event, msg)`` with the :class:`~kcons.envelope.Envelope` read from the message (kcons
headers, Debezium's outbox shape or a CloudEvent). A message that cannot be read as an event (no
id header, malformed headers) raises DecodeError before the handler runs: the consumer treats it
as poison and dead-letters it at once, as for any DecodeError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kcons.envelope import Envelope, read_envelope
from kcons.errors import DecodeError

__all__ = ["EnvelopeBatchHandler", "EnvelopeHandler", "decode", "with_envelope", "with_envelopes"]

#: ``handler(event, msg)``: the decoded event and the message it came from.
EnvelopeHandler = Callable[[Envelope, Any], None]
#: ``batch_handler(pairs)``: the batch's (event, msg) pairs, in order.
EnvelopeBatchHandler = Callable[[list[tuple[Envelope, Any]]], None]


def decode(msg: Any) -> Envelope:
    """The event of a consumed message; DecodeError (poison) when it carries none or is malformed."""
    event = read_envelope(msg.key(), msg.value(), msg.headers(), topic=msg.topic())
    if event is None:
        raise DecodeError("no event id header (kcons-id, Debezium id or ce_id): not an event")
    return event


def with_envelope(handler: EnvelopeHandler) -> Callable[[Any], None]:
    """A per-message handler calling ``handler(event, msg)`` with the decoded envelope."""

    def handle(msg: Any) -> None:
        handler(decode(msg), msg)

    handle.__name__ = getattr(handler, "__name__", "handle")
    handle.__doc__ = handler.__doc__
    return handle


def with_envelopes(batch_handler: EnvelopeBatchHandler) -> Callable[[Sequence[Any]], None]:
    """A batch handler calling ``batch_handler([(event, msg), ...])``.

    One undecodable message fails the batch; the consumer then goes one message at a time and
    dead-letters only that one.
    """

    def handle(msgs: Sequence[Any]) -> None:
        batch_handler([(decode(m), m) for m in msgs])

    handle.__name__ = getattr(batch_handler, "__name__", "handle")
    return handle
