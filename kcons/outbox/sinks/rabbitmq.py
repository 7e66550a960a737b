"""The relay's RabbitMQ sink: a batch returns only after the broker confirmed every message.

Client: ``pika``, its ``SelectConnection`` driven on the relay's own thread (no extra thread, no
asyncio loop under a synchronous relay). A batch is published in order on one channel in confirm
mode, then the I/O loop runs until every message of the batch is confirmed (``basic.ack``), or a
``basic.nack``, a ``basic.return`` (``mandatory``), a closed channel or connection, or
``ack_timeout_s`` without a confirm ends the wait with an error. Confirms are awaited together,
not one round trip per message; aio-pika would give the same on an asyncio loop the relay does not
have. The last case matters: after a broker restart, a channel can take messages for a quorum queue
and never confirm them; an unbounded wait would hang the relay while it keeps its lease.

What each message carries and why:

* ``delivery_mode=2`` (persistent): a confirmed message in a durable (quorum) queue survives a
  broker restart.
* ``mandatory=True``: a message no queue receives comes back as ``basic.return``; that fails the
  batch (:class:`~kcons.errors.SinkUnavailableError`, retried whole), it never counts as published.

A broker that cannot be reached or drops the connection (killed, restarting, connections closed
by an operator) raises :class:`~kcons.errors.SinkConnectionError`: the relay keeps reconnecting with
backoff for as long as it leads and re-sends the unconfirmed batch; refusals (credentials, an
exchange of another type, unroutable, nacks) stay bounded by the relay's retry limit.
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
import time
from collections.abc import Callable, Iterable
from typing import Any

import pika
import pika.exceptions

from kcons.config import check_amqp_url, check_identifier, redact
from kcons.errors import LeadershipLostError, SinkConnectionError, SinkRowError, SinkUnavailableError
from kcons.outbox.rows import RecordTuple

__all__ = ["DEFAULT_EXCHANGE", "HEADER_TOPIC", "RabbitMqSink", "declare_hash_queues"]

log = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "kcons.outbox"
#: The header naming the Kafka topic the row would have been published to.
HEADER_TOPIC = "kcons-topic"
_HASH_EXCHANGE = "x-consistent-hash"
#: Errors after which the connection is unusable: drop it, the batch is retried on a new one.
_CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError)
#: Connection failures that are answers (bad credentials, no access to the vhost), not an outage.
_REFUSED = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
)


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

    ``publish`` returns only after every record of the batch was confirmed; any failure (a nack,
    a return, a closed channel or connection, no confirm within ``ack_timeout_s``) raises, so the
    relay marks nothing and retries the batch whole (duplicates possible, gaps never). A batch is
    published in order on one channel and its confirms are awaited together.
    """

    #: Confirms do not fence a former leader: the relay checks its fencing token before each batch.
    mode = "confirms"

    def __init__(self, url: str, *, exchange: str = DEFAULT_EXCHANGE, ack_timeout_s: float = 30.0,
                 declare_exchange: bool = True) -> None:  # fmt: skip
        self._url = check_amqp_url("KCONS_AMQP_URL", url)
        self.exchange = check_identifier("KCONS_AMQP_EXCHANGE", exchange, kind="key", max_length=200)
        self._ack_timeout_s = ack_timeout_s
        self._declare_exchange = declare_exchange
        self._connection: Any = None  # pika.SelectConnection, driven on the caller's thread
        self._channel: Any = None
        self._ready = False
        self._lost: BaseException | None = None  # why the connection (or its opening) ended
        self._channel_closed: BaseException | None = None
        self._tag = 0  # the channel's last delivery tag
        self._outstanding: set[int] = set()
        self._nacked: int | None = None
        self._returned: str | None = None

    def __repr__(self) -> str:
        return f"RabbitMqSink(url={redact(self._url)!r}, exchange={self.exchange!r})"

    @property
    def started(self) -> bool:
        """True while the connection and its confirm channel are open."""
        return (
            self._ready
            and self._lost is None
            and self._channel_closed is None
            and self._connection is not None
            and self._connection.is_open
        )

    # ------------------------------------------------------------------ the I/O loop

    def _wake(self) -> None:
        if self._connection is not None:
            self._connection.ioloop.stop()

    def _drive(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run the connection's I/O loop until ``done()`` or ``timeout``; True when done."""
        ioloop = self._connection.ioloop
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            timer = ioloop.call_later(left, ioloop.stop)
            try:
                ioloop.start()  # every callback below stops it, so the condition is checked again
            finally:
                ioloop.remove_timeout(timer)
        return True

    def _pump(self) -> None:
        """Process what arrived while idle (heartbeats, a close from the broker) without waiting."""
        if self._connection is not None and self._ready:
            ioloop = self._connection.ioloop
            ioloop.call_later(0, ioloop.stop)
            ioloop.start()

    # ------------------------------------------------------------------ callbacks

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, _connection: Any, error: BaseException | str) -> None:
        self._lost = error if isinstance(error, BaseException) else pika.exceptions.AMQPConnectionError(error)
        self._wake()

    def _on_closed(self, _connection: Any, reason: BaseException) -> None:
        self._lost = reason
        self._wake()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        if self._declare_exchange:
            self._channel.exchange_declare(self.exchange, _HASH_EXCHANGE, durable=True, callback=self._on_declared)
        else:
            self._on_declared(None)

    def _on_declared(self, _frame: Any) -> None:
        self._ready = True
        self._wake()

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        self._channel_closed = reason
        self._wake()

    def _on_return(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        if self._returned is None:
            self._returned = str(props.message_id or "")
        self._wake()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        done = {t for t in self._outstanding if t <= tag} if method.multiple else {tag}
        self._outstanding -= done
        if isinstance(method, pika.spec.Basic.Nack) and self._nacked is None:
            self._nacked = min(done) if done else tag
        if not self._outstanding or self._nacked is not None:
            self._wake()

    # ------------------------------------------------------------------ the sink

    def start(self) -> None:
        """Connect, open one channel in confirm mode and declare the (durable) exchange."""
        self._pump()
        if self.started:
            return
        self.reset()
        self._ready, self._lost, self._channel_closed, self._tag = False, None, None, 0
        try:
            self._connection = pika.SelectConnection(
                _parameters(self._url, self._ack_timeout_s),
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed,
            )
        except _CONNECTION_ERRORS as exc:
            raise SinkConnectionError(f"cannot connect to RabbitMQ ({type(exc).__name__})") from None
        settled = self._drive(lambda: self._ready or self._lost is not None or self._channel_closed is not None,
                              self._ack_timeout_s)  # fmt: skip
        if self._ready and self._lost is None and self._channel_closed is None:
            return
        lost, closed = self._lost, self._channel_closed
        self.reset()
        if isinstance(lost, _REFUSED):  # the broker answers but refuses us: waiting will not help
            raise SinkUnavailableError(f"RabbitMQ refused the connection ({type(lost).__name__})")
        if isinstance(closed, pika.exceptions.ChannelClosedByBroker):  # e.g. the exchange has another type
            raise SinkUnavailableError(
                f"RabbitMQ refused the confirm channel or exchange ({closed.reply_code}: {closed.reply_text})"
            )
        why = type(lost or closed).__name__ if settled else f"no answer within {self._ack_timeout_s:g}s"
        raise SinkConnectionError(f"cannot connect to RabbitMQ ({why})")

    def wait_txn_gap(self) -> None:
        """Nothing to wait for: RabbitMQ has no transaction markers to settle."""

    def publish(self, records: Iterable[RecordTuple], *, still_leader: Callable[[], bool] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Publish ``records`` in order on one channel and wait for all their confirms; raise on any failure."""
        if still_leader is not None and not still_leader():
            raise LeadershipLostError("lease lost before publishing")
        self.start()
        channel = self._channel
        first = self._tag + 1
        ids: list[str] = []
        self._outstanding, self._nacked, self._returned = set(), None, None
        try:
            for topic, value, key, headers, timestamp_ms in records:
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
                channel.basic_publish(self.exchange, routing_key, value, props, mandatory=True)
                self._tag += 1
                self._outstanding.add(self._tag)
                ids.append(event_id)
        except _CONNECTION_ERRORS as exc:  # the channel or connection closed under us
            self.reset()
            raise SinkConnectionError(f"RabbitMQ connection failed ({type(exc).__name__})") from None
        confirmed = self._drive(
            lambda: not self._outstanding or self._nacked is not None or self._returned is not None
            or self._lost is not None or self._channel_closed is not None,
            self._ack_timeout_s,
        )  # fmt: skip
        self._raise_unless_confirmed(confirmed, first, ids)
        if before_commit is not None:
            before_commit()

    def _raise_unless_confirmed(self, confirmed: bool, first: int, ids: list[str]) -> None:
        if self._returned is not None:  # the channel stays usable; the retry will be returned too until bound
            raise SinkUnavailableError(
                f"row {self._returned} was returned unroutable by exchange {self.exchange!r} (no queue bound?)"
            )
        if self._nacked is not None:
            self.reset()  # a fresh channel for the retry: the queue may have been restarted meanwhile
            raise SinkUnavailableError(f"RabbitMQ refused (nack) row {ids[self._nacked - first]}")
        closed = self._channel_closed
        if isinstance(closed, pika.exceptions.ChannelClosedByBroker):
            self.reset()
            if closed.reply_code == 406 and "size" in str(closed.reply_text).lower():
                # The row is among the unconfirmed ones; the relay then publishes row by row to find it.
                index = min(self._outstanding, default=first) - first
                raise SinkRowError(ids[index], index, f"RabbitMQ refused it: {closed.reply_text}")
            raise SinkUnavailableError(f"RabbitMQ closed the channel ({closed.reply_code})")
        if self._lost is not None or closed is not None:
            why = type(self._lost or closed).__name__
            self.reset()
            raise SinkConnectionError(f"RabbitMQ connection failed ({why})")
        if not confirmed:  # a broker that takes messages but never confirms them: drop the connection
            self.reset()
            raise SinkConnectionError(f"no publisher confirm within {self._ack_timeout_s:g}s")

    def reset(self) -> None:
        """Drop the connection (a bounded close); the next publish opens a new one."""
        connection, self._connection, self._channel = self._connection, None, None
        self._ready = False
        if connection is None:
            return
        try:
            if connection.is_open:
                connection.close()
            if not (connection.is_closed or self._lost is not None):
                self._connection = connection  # drive its loop until the close is done, bounded
                self._drive(lambda: connection.is_closed or self._lost is not None, min(5.0, self._ack_timeout_s))
        except _CONNECTION_ERRORS as exc:  # already gone: nothing to release
            log.debug("closing the RabbitMQ connection failed: %s", type(exc).__name__)
        finally:
            self._connection = None

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
