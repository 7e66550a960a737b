"""The relay's RocketMQ 5 sink: a batch returns only after the broker acknowledged every message.

Client: the official ``rocketmq-python-client`` (gRPC to a RocketMQ 5 proxy), ``kcons[rocketmq]``.

What each message carries and why:

* topic = the row's topic (the relay's routing rule) with every ``.`` replaced by ``_``
  (:func:`rocketmq_topic`: RocketMQ names allow ``[%a-zA-Z0-9_-]``, up to 127 characters), so
  ``outbox.event.order`` goes to ``outbox_event_order``. It must exist with
  ``message.type=FIFO``. A row whose topic is still not a RocketMQ name (too long) can never be
  published here and is dead-lettered by the relay (a :class:`~kcons.errors.SinkRowError`), like a
  body over the broker's 4 MiB limit.
* message key = the aggregate id, and **message group = the aggregate id**: the client puts a
  group on one queue, the broker keeps it there in send order, and a FIFO consumer group
  delivers it in that order, one message at a time.
* the envelope's ``kcons-*`` headers as user properties (text), so a consumer dedupes by
  ``kcons-id`` and orders by ``kcons-version`` exactly as on Kafka.

Failures: a proxy that does not accept a TCP connection, or an acknowledgement that does not
come within ``ack_timeout_s``, is a :class:`~kcons.errors.SinkConnectionError` (the relay
reconnects until the broker is back, without a retry bound); any other failed send is a
:class:`~kcons.errors.SinkUnavailableError` (retried within the relay's bound).

Order: within a batch, the messages of one aggregate are sent one after the other, each only
after the previous one was acknowledged; messages of different aggregates are in flight together
("waves": the first record of every aggregate, then the second, ...). A failed send fails the
batch, nothing is marked, and the relay sends the whole batch again: duplicates are possible,
reordering within an aggregate is not.

Where the guarantees stop: an acknowledgement means the broker wrote the message to its commit
log; with ``flushDiskType=ASYNC_FLUSH`` (RocketMQ's default) and no synchronous replica, a
broker machine's crash can lose acknowledged messages (use ``SYNC_FLUSH`` or a synchronous
replica). Changing the number of the topic's queues moves message groups between queues, so order
across that change is not kept.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from kcons.config import check_rocketmq_endpoints
from kcons.errors import LeadershipLostError, SinkConnectionError, SinkRowError, SinkUnavailableError
from kcons.outbox.rows import RecordTuple

__all__ = ["MAX_IN_FLIGHT", "RocketMqSink", "rocketmq_message", "rocketmq_topic"]

log = logging.getLogger(__name__)

#: Messages (of distinct aggregates) awaiting their acknowledgement at once.
MAX_IN_FLIGHT = 256


_TOPIC = re.compile(r"\A[%a-zA-Z0-9_-]{1,127}\Z")


def rocketmq_topic(topic: str) -> str:
    """The RocketMQ topic for an outbox topic: dots become underscores; ValueError if still not a RocketMQ name."""
    name = topic.replace(".", "_")
    if _TOPIC.match(name) is None:
        raise ValueError(f"{name!r} is not a RocketMQ topic name ([%a-zA-Z0-9_-], 1-127 characters)")
    return name


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def rocketmq_message(topic: str, value: bytes, key: bytes, headers: Iterable[tuple[str, Any]], *,
                     fifo: bool = True) -> Any:  # fmt: skip
    """A RocketMQ message for one outbox record: key and (``fifo``) message group = the aggregate id.

    Raises ValueError (or the client's ``IllegalArgumentException``) for a topic RocketMQ can never accept.
    """
    from rocketmq import Message

    msg = Message()
    msg.topic = rocketmq_topic(topic)
    msg.body = value
    properties = {k: _text(v) for k, v in headers}
    aggregate = key.decode(errors="replace") if key else properties.get("kcons-id", "")
    if aggregate:
        msg.keys = aggregate
        if fifo:
            msg.message_group = aggregate
    for name, text in properties.items():
        msg.add_property(name, text)
    return msg


class RocketMqSink:
    """Publishes outbox batches to RocketMQ 5 FIFO topics; one message group per aggregate.

    ``publish`` returns only after every record of the batch was acknowledged by the broker;
    any failure raises and the relay marks nothing (duplicates possible after a retry, gaps and
    per-aggregate reordering never).
    """

    #: Acknowledgements do not fence a former leader: the relay checks its fencing token before each batch.
    mode = "confirms"

    def __init__(self, endpoints: str, *, ack_timeout_s: float = 30.0, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.endpoints = check_rocketmq_endpoints("KCONS_ROCKETMQ_ENDPOINTS", endpoints)
        self._ack_timeout_s = ack_timeout_s
        self._max_in_flight = max(1, max_in_flight)
        self._producer: Any = None

    def __repr__(self) -> str:
        return f"RocketMqSink(endpoints={self.endpoints!r})"

    @property
    def started(self) -> bool:
        """True while a producer is running."""
        return self._producer is not None

    def start(self) -> None:
        """Start the gRPC producer (idempotent)."""
        if self._producer is not None:
            return
        from rocketmq import ClientConfiguration, Credentials, Producer

        # The client needs whole seconds (a float breaks its route queries).
        timeout = max(1, round(min(10.0, self._ack_timeout_s)))
        config = ClientConfiguration(self.endpoints, Credentials(), request_timeout=timeout)
        producer = Producer(config)
        try:
            producer.startup()
        except Exception as exc:  # the client raises bare Exceptions for every failure
            kind = SinkUnavailableError if self._reachable() else SinkConnectionError
            raise kind(f"cannot start the RocketMQ producer ({type(exc).__name__}: {exc})") from None
        self._producer = producer

    def wait_txn_gap(self) -> None:
        """Nothing to wait for: a plain RocketMQ send has no transaction markers to settle."""

    def publish(self, records: Iterable[RecordTuple], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Publish ``records``; per aggregate in order, each after the previous one's acknowledgement."""
        if still_leader is not None and not still_leader():
            raise LeadershipLostError("lease lost before publishing")
        batch = list(records)
        messages = [self._message(index, record) for index, record in enumerate(batch)]
        self.start()
        for wave in _waves(batch):
            for start in range(0, len(wave), self._max_in_flight):
                self._send_all([(i, messages[i]) for i in wave[start : start + self._max_in_flight]], batch)
        if before_commit is not None:
            before_commit()

    @staticmethod
    def _message(index: int, record: RecordTuple) -> Any:
        topic, value, key, headers, _ts = record
        try:
            return rocketmq_message(topic, value, key, headers)
        except Exception as exc:  # ValueError or the client's IllegalArgumentException: never sendable
            event_id = _text(dict(headers).get("kcons-id", ""))
            raise SinkRowError(event_id, index, f"RocketMQ refuses it: {exc}") from None

    def _send_all(self, items: list[tuple[int, Any]], batch: list[RecordTuple]) -> None:
        """Send messages of distinct aggregates at once; return when all are acknowledged, else raise."""
        producer = self._producer
        deadline = time.monotonic() + self._ack_timeout_s
        futures: list[tuple[int, concurrent.futures.Future[Any]]] = []
        current = items[0][0]
        try:
            for index, msg in items:
                current = index
                futures.append((index, producer.send_async(msg)))
            for index, future in futures:
                current = index
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            self.reset()
            raise SinkConnectionError(f"RocketMQ did not acknowledge within {self._ack_timeout_s:g}s") from None
        except Exception as exc:
            event_id = _text(dict(batch[current][3]).get("kcons-id", ""))
            if "body" in str(exc).lower() and "size" in str(exc).lower():
                raise SinkRowError(event_id, current, f"RocketMQ refuses it: {exc}") from None
            self.reset()
            kind = SinkUnavailableError if self._reachable() else SinkConnectionError
            raise kind(f"RocketMQ send failed ({type(exc).__name__}: {exc})") from None

    def _reachable(self) -> bool:
        """Whether some proxy accepts a TCP connection (the client's errors do not tell an outage apart)."""
        for endpoint in self.endpoints.split(";"):
            host, _, port = endpoint.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                    return True
            except OSError:
                continue
        return False

    def reset(self) -> None:
        """Stop the producer; the next publish starts a new one."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.shutdown()
            except Exception as exc:  # already broken: nothing left to release
                log.debug("stopping the RocketMQ producer failed: %s", type(exc).__name__)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the producer (every publish already waited for its acknowledgements)."""
        self.reset()


def _waves(batch: list[RecordTuple]) -> list[list[int]]:
    """Indexes of ``batch`` in waves: wave k holds the k-th record of every aggregate, in batch order."""
    seen: dict[bytes, int] = {}
    waves: list[list[int]] = []
    for index, record in enumerate(batch):
        key = record[2] or b"\x00" + str(index).encode()  # no aggregate: a group of its own
        k = seen.get(key, 0)
        seen[key] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(index)
    return waves
