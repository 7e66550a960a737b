"""Consumed messages: the one rule for their errors, and fast accessors for C-level loops over a batch.

:func:`check_consumed` is the rule every part that consumes (consumer, processor, cache
invalidator) applies to what ``poll``/``consume`` returned: end-of-partition events are
dropped, a fatal or fencing error is raised as its typed kcons exception, any other error is
logged and dropped (librdkafka recovers from it by itself); the messages are returned in order.

The accessors read a batch with ``map`` over the Message type's own methods when every message
is a confluent-kafka ``Message`` (the common case, several times faster than a Python loop), and
by method name otherwise (test doubles, wrapped messages), with the same results.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, Message

from kcons.envelope import HEADER_ID, POSITION_ID_PREFIX
from kcons.errors import ErrorClass, classify_kafka_error, kafka_error_to_exception

__all__ = ["TP", "Access", "access", "check_consumed", "end_offsets", "header_ids"]

log = logging.getLogger(__name__)

#: A topic partition as a plain tuple: ``(topic, partition)``.
TP = tuple[str, int]

_PARTITION_EOF = KafkaError._PARTITION_EOF


class Access:
    """Per-message accessors (``error``, ``headers``, ``topic``, ``partition``, ``offset``) for ``map``."""

    def __init__(self, get: Callable[[str], Callable[[Any], Any]]) -> None:
        self.error = get("error")
        self.headers = get("headers")
        self.key = get("key")
        self.value = get("value")
        self.topic = get("topic")
        self.partition = get("partition")
        self.offset = get("offset")


NATIVE = Access(lambda name: getattr(Message, name))
BY_NAME = Access(operator.methodcaller)
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)
_RESERVED = operator.methodcaller("startswith", POSITION_ID_PREFIX)


def access(msgs: list[Any]) -> Access:
    """The fast accessors when every message is a confluent-kafka Message, else the generic ones."""
    return NATIVE if list(map(type, msgs)).count(Message) == len(msgs) else BY_NAME


def check_consumed(msgs: list[Any], operation: str = "consume") -> list[Any]:
    """The messages of ``msgs`` that carry data, in order; raise on a fatal or fencing consumer error.

    The one rule for consumed messages: an end-of-partition event is dropped; an error that
    classifies as fatal or fenced (:func:`kcons.errors.classify_kafka_error`) is raised as the
    typed exception (:class:`~kcons.errors.FatalKafkaError`...), because the consumer cannot go
    on; any other error is logged and dropped, since librdkafka retries it by itself and no
    data is attached to it. A batch without errors is returned as it is (no copy).
    """
    if not msgs:
        return msgs
    # ``any`` (errors are KafkaError objects, always true) rather than ``count(None)``: comparing a
    # KafkaError with None raises inside confluent-kafka.
    if not any(map(access(msgs).error, msgs)):
        return msgs  # the common case: no error, no copy
    out = []
    for msg in msgs:
        err = msg.error()
        if err is None:
            out.append(msg)
        elif err.code() == _PARTITION_EOF:
            continue
        elif classify_kafka_error(err) in (ErrorClass.FATAL, ErrorClass.FENCED):
            raise kafka_error_to_exception(err, operation)
        else:
            log.warning("%s reported %s (%s); continuing", operation, err.str(), err.name())
    return out


def header_ids(msgs: list[Any]) -> list[str] | None:
    """Every message's id when each one's first header is a non-empty UTF-8 ``kcons-id`` without the
    reserved position-id prefix, else None (the same ids :func:`kcons.envelope.event_id_header` reads).

    The common case (kcons producers write that header first), read with C-level loops; None
    means "read the ids one message at a time".
    """
    try:
        firsts = list(map(_FIRST, map(access(msgs).headers, msgs)))  # TypeError/IndexError: no headers
        if list(map(_FIRST, firsts)).count(HEADER_ID) != len(firsts):
            return None
        ids: list[str] = list(map(bytes.decode, map(_SECOND, firsts)))  # TypeError: not bytes
    except (TypeError, IndexError, UnicodeDecodeError):
        return None
    if "" in ids or any(map(_RESERVED, ids)):
        return None  # read one at a time: an empty id falls back, a reserved prefix is poison
    return ids


def end_offsets(msgs: list[Any]) -> dict[TP, int]:
    """Per partition, the offset after its last message in ``msgs`` (messages are in order per partition)."""
    get = access(msgs)
    topics = set(map(get.topic, msgs))
    if len(topics) == 1:  # one topic: index the last message of each partition by partition alone
        (topic,) = topics
        last = dict(zip(map(get.partition, msgs), range(len(msgs)), strict=True))
        return {(topic, partition): msgs[i].offset() + 1 for partition, i in last.items()}
    ends = dict(
        zip(zip(map(get.topic, msgs), map(get.partition, msgs), strict=True), map(get.offset, msgs), strict=True)
    )
    return {tp: offset + 1 for tp, offset in ends.items()}
