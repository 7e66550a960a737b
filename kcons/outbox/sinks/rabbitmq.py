"""The relay's RabbitMQ sink: a batch returns only after the broker confirmed every message.

Client: ``pika`` (its ``BlockingConnection``). The relay is a synchronous loop on its own
thread, and pika's blocking channel in confirm mode gives exactly the contract the relay needs
without an event loop: ``basic_publish`` returns after the broker's ``basic.ack`` for that
message and raises on a ``basic.nack`` or, with ``mandatory``, on a ``basic.return``. aio-pika
would pipeline confirms, but it would put an asyncio loop (and a thread to run it) under a
synchronous relay, for a throughput the relay does not need per replica. The price of the choice:
one confirm round trip per message (ordered, no pipelining).

What each message carries and why:

* ``delivery_mode=2`` (persistent): a confirmed message in a durable (quorum) queue survives a
  broker restart.
* ``mandatory=True``: a message no queue receives comes back as ``basic.return``; that fails the
  batch (:class:`~kcons.errors.SinkUnavailableError`, retried whole), it never counts as published.
* ``message_id`` = the row's ``kcons-id``, the envelope's ``kcons-*`` headers as AMQP headers
  (string values), ``kcons-topic`` = the Kafka topic the row would go to, ``timestamp`` = the row's
  creation time: consumers dedupe and order exactly as on Kafka.
* routing key = the aggregate id, on an ``x-consistent-hash`` exchange: an aggregate always lands
  in the same queue (as long as the bindings do not change), and one channel publishes in order,
  so per-aggregate order holds from the outbox to that queue.

Where the guarantees stop: a confirm means the queues that received the message have it (for a
quorum queue, a majority of its replicas); a classic queue on one node loses confirmed messages
with that node's disk. Use quorum queues. Changing the exchange's bindings moves aggregates
between queues, so order across that change is not kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import pika
import pika.exceptions

from kcons.config import check_amqp_url, check_identifier, redact
from kcons.errors import LeadershipLostError, SinkRowError, SinkUnavailableError
from kcons.outbox.rows import RecordTuple

__all__ = ["DEFAULT_EXCHANGE", "HEADER_TOPIC", "RabbitMqSink", "declare_hash_queues"]

log = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "kcons.outbox"
#: The header naming the Kafka topic the row would have been published to.
HEADER_TOPIC = "kcons-topic"
_HASH_EXCHANGE = "x-consistent-hash"
#: Errors after which the connection is unusable: drop it, the batch is retried on a new one.
_CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError)


def _header_value(value: Any) -> Any:
    """A header value as AMQP carries it: text when it is UTF-8, else the bytes."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    return value


def _parameters(url: str, ack_timeout_s: float) -> pika.URLParameters:
    params = pika.URLParameters(url)
    # A broker that stops answering must not block the relay beyond its bound: the heartbeat
    # closes a silent connection, the blocked timeout one the broker throttles (memory, disk).
    if "heartbeat" not in url:
        params.heartbeat = max(2, int(ack_timeout_s / 2))
    params.blocked_connection_timeout = ack_timeout_s
    params.socket_timeout = min(10.0, ack_timeout_s)
    params.stack_timeout = ack_timeout_s
    return params


class RabbitMqSink:
    """Publishes outbox batches to one consistent-hash exchange with publisher confirms.

    ``publish`` returns only after every record of the batch was confirmed, in order; any
    failure leaves the rest of the batch unpublished and raises, so the relay marks nothing and
    retries the batch whole (duplicates possible, gaps never).
    """

    #: Confirms do not fence a former leader: the relay checks its fencing token before each batch.
    mode = "confirms"

    def __init__(self, url: str, *, exchange: str = DEFAULT_EXCHANGE, ack_timeout_s: float = 30.0,
                 declare_exchange: bool = True) -> None:  # fmt: skip
        self._url = check_amqp_url("KCONS_AMQP_URL", url)
        self.exchange = check_identifier("KCONS_AMQP_EXCHANGE", exchange, kind="key", max_length=200)
        self._ack_timeout_s = ack_timeout_s
        self._declare_exchange = declare_exchange
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None

    def __repr__(self) -> str:
        return f"RabbitMqSink(url={redact(self._url)!r}, exchange={self.exchange!r})"

    @property
    def started(self) -> bool:
        """True while a connection is open."""
        return self._connection is not None and self._connection.is_open

    def start(self) -> None:
        """Connect, open one channel in confirm mode and declare the (durable) exchange."""
        if self.started and self._channel is not None and self._channel.is_open:
            return
        self.reset()
        try:
            connection = pika.BlockingConnection(_parameters(self._url, self._ack_timeout_s))
        except _CONNECTION_ERRORS as exc:
            raise SinkUnavailableError(f"cannot connect to RabbitMQ ({type(exc).__name__})") from None
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            if self._declare_exchange:
                channel.exchange_declare(self.exchange, _HASH_EXCHANGE, durable=True)
        except _CONNECTION_ERRORS as exc:
            self._close_quietly(connection)
            raise SinkUnavailableError(f"cannot open the confirm channel ({type(exc).__name__}: {exc})") from None
        self._connection, self._channel = connection, channel

    def wait_txn_gap(self) -> None:
        """Nothing to wait for: RabbitMQ has no transaction markers to settle."""

    def publish(self, records: Iterable[RecordTuple], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Publish ``records`` in order, each awaited for its confirm; raise on the first failure."""
        if still_leader is not None and not still_leader():
            raise LeadershipLostError("lease lost before publishing")
        self.start()
        channel = self._channel
        for index, (topic, value, key, headers, timestamp_ms) in enumerate(records):
            table = {k: _header_value(v) for k, v in headers}
            event_id = str(table.get("kcons-id", ""))
            table[HEADER_TOPIC] = topic
            props = pika.BasicProperties(
                delivery_mode=2,
                message_id=event_id or None,
                headers=table,
                timestamp=timestamp_ms // 1000 if timestamp_ms else None,
            )
            routing_key = key.decode(errors="replace") if key else event_id
            try:
                channel.basic_publish(self.exchange, routing_key, value, props, mandatory=True)
            except pika.exceptions.UnroutableError:
                raise SinkUnavailableError(
                    f"row {event_id} was returned unroutable by exchange {self.exchange!r} (no queue bound?)"
                ) from None
            except pika.exceptions.NackError:
                self.reset()  # a fresh channel for the retry: the queue may have been restarted meanwhile
                raise SinkUnavailableError(f"RabbitMQ refused (nack) row {event_id}") from None
            except pika.exceptions.ChannelClosedByBroker as exc:
                self.reset()
                if exc.reply_code == 406 and "size" in str(exc.reply_text).lower():
                    raise SinkRowError(event_id, index, f"RabbitMQ refused it: {exc.reply_text}") from None
                raise SinkUnavailableError(f"RabbitMQ closed the channel ({exc.reply_code})") from None
            except _CONNECTION_ERRORS as exc:
                self.reset()
                raise SinkUnavailableError(f"RabbitMQ connection failed ({type(exc).__name__})") from None
        if before_commit is not None:
            before_commit()

    @staticmethod
    def _close_quietly(connection: pika.BlockingConnection) -> None:
        try:
            if connection.is_open:
                connection.close()
        except _CONNECTION_ERRORS as exc:  # already gone: nothing to release
            log.debug("closing the RabbitMQ connection failed: %s", type(exc).__name__)

    def reset(self) -> None:
        """Drop the connection; the next publish opens a new one."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            self._close_quietly(connection)

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection (every publish already waited for its confirms)."""
        self.reset()


def declare_hash_queues(url: str, exchange: str, queues: Iterable[str], *, quorum: bool = True) -> None:
    """Declare ``exchange`` (consistent hash) and durable queues bound to it with equal weight.

    Quorum queues by default: a confirmed message then survives the loss of a minority of nodes.
    """
    connection = pika.BlockingConnection(pika.URLParameters(check_amqp_url("KCONS_AMQP_URL", url)))
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, _HASH_EXCHANGE, durable=True)
        arguments = {"x-queue-type": "quorum"} if quorum else None
        for queue in queues:
            channel.queue_declare(queue, durable=True, arguments=arguments)
            channel.queue_bind(queue, exchange, routing_key="1")
    finally:
        connection.close()
