"""Idempotent and transactional Kafka producers that wrap confluent-kafka, never replace it.

:class:`IdempotentProducer` gives at-least-once delivery without broker-side duplicates
(``enable.idempotence`` forced on, ``acks=all``). :class:`TransactionalProducer` adds Kafka
transactions: ``with producer.transaction():`` commits everything produced inside it, or
nothing. Both take the user's confluent-kafka config dict (librdkafka property names,
unchanged) or an existing ``confluent_kafka.Producer``; :func:`wrap` picks the right one.

Error handling follows :func:`kcons.errors.classify_kafka_error` and nothing else:
retriable errors are retried with a bounded tenacity policy; abortable errors abort the
transaction (:meth:`TransactionalProducer.run_in_transaction` re-runs the whole unit of
work); fatal and fenced errors close the producer and raise
:class:`~kcons.errors.FatalKafkaError` / :class:`~kcons.errors.ProducerFencedError`; a commit
or abort that timed out (indefinite outcome) re-creates the producer with the same
``transactional.id``, whose ``init_transactions`` fences the old instance and settles the
open transaction on the broker, and raises :class:`~kcons.errors.IndefiniteOutcomeError`.
Every blocking step has a bound.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from kcons import metrics
from kcons.config import redact_config
from kcons.envelope import HEADER_ID, Envelope
from kcons.errors import (
    AbortableTransactionError,
    ConfigError,
    DeliveryError,
    ErrorClass,
    FatalKafkaError,
    IndefiniteOutcomeError,
    KafkaOperationError,
    RetriableKafkaError,
    TimeoutExceededError,
    classify_kafka_error,
    kafka_error_to_exception,
    raise_for_kafka_error,
)
from kcons.ids import fast_event_id
from kcons.kafka.client import check_producer_config, close_bounded
from kcons.kafka.futures import (
    _UNSET,  # the fast path of produce() builds futures itself
    CallbackDeliveryFuture,
    DeliveryCallback,
    DeliveryFuture,
    DeliveryTracker,
    KeptHeaders,
)
from kcons.kafka.futures import new_future as _new_future
from kcons.kafka.futures import speedups as _speedups

log = logging.getLogger(__name__)

__all__ = [
    "DeliveryCallback",
    "DeliveryFuture",
    "HeaderList",
    "IdempotentProducer",
    "Record",
    "TransactionalProducer",
    "UnverifiedConfigWarning",
    "check_producer_config",
    "fast_event_id",
    "wrap",
    "wrap_idempotent",
    "wrap_transactional",
]

T = TypeVar("T")
#: ``retry.backoff.ms`` a TransactionalProducer uses unless the config sets it (see its _prepare_config).
TXN_RETRY_BACKOFF_MS = 10
#: librdkafka's RD_KAFKA_PARTITION_UA: let the partitioner choose (by key).
_UNASSIGNED = -1
#: ``object.__new__``: an instance without its ``__init__`` call (see produce).
_bare_future = object.__new__
#: Message headers as confluent-kafka takes them: a list of (name, value) pairs or a dict.
HeaderList = list[tuple[str, bytes | str | None]] | dict[str, bytes | str | None]
#: One record for the bulk paths: ``(topic, value, key, headers, timestamp_ms)``; a timestamp of 0 means "now".
Record = tuple[str, bytes | str | None, bytes | str | None, Any, int]

#: Error names meaning "init_transactions was already done on this producer".
_ALREADY_INITIALISED = frozenset({"_STATE", "_CONFLICT"})


def _with_event_id(headers: HeaderList | None) -> HeaderList:
    """Add a ``kcons-id`` unless the caller set one; a dict when there was nothing (cheapest for confluent-kafka)."""
    if headers is None:
        return {HEADER_ID: fast_event_id()}
    if isinstance(headers, dict):
        if HEADER_ID in headers:
            return headers
        return {HEADER_ID: fast_event_id(), **headers}
    for name, _ in headers:
        if name == HEADER_ID:
            return headers
    return [(HEADER_ID, fast_event_id()), *headers]


def _snapshot(headers: HeaderList) -> KeptHeaders:
    """The caller's headers as sent, for the future to keep: the caller may reuse its list or dict after produce."""
    return tuple(headers.items()) if isinstance(headers, dict) else tuple(headers)


# --- producers ---------------------------------------------------------------------------


def _retry_policy(attempts: int, max_delay_s: float) -> Retrying:
    """Bounded retry of retriable Kafka errors only: exponential backoff from 50 ms to 1 s."""
    return Retrying(
        stop=stop_after_attempt(attempts) | stop_after_delay(max_delay_s),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        retry=retry_if_exception_type(RetriableKafkaError),
        reraise=True,
    )


def _kafka_exception_of(exc: BaseException) -> KafkaException | None:
    """The KafkaException behind ``exc``.

    confluent-kafka's ``poll``/``flush`` raise a fatal error as a KafkaException and then run
    the delivery callbacks with that exception still pending, which surfaces as a SystemError
    whose cause is the KafkaException.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class _Client:
    """The raw confluent-kafka Producer of one kcons producer, and what belongs to it.

    Owns the raw producer (made from a checked config, or the user's own object), its error
    callback (which records a fatal error and forwards every error to the user's ``error_cb``),
    the probe for a fatal error that confluent-kafka failed to report, re-creation with the
    same config (or the user's factory), and the bounded close. Knows nothing of futures or
    transactions: the producers that have a client decide what an error means for them.
    ``closed`` and ``raw`` stay plain instance attributes: the C produce() reads them from the
    instance's ``__dict__`` (kcons/kafka/_speedups.c, ``client_attr``).
    """

    def __init__(
        self,
        producer_or_config: Producer | dict[str, Any],
        *,
        close_timeout_s: float,
        factory: Callable[[], Producer] | None = None,
    ) -> None:
        self.close_timeout_s = close_timeout_s
        self.fatal: KafkaError | None = None
        self.closed = False
        self._factory = factory
        self.user_error_cb: Callable[[KafkaError], None] | None = None
        self.config: dict[str, Any] | None
        if isinstance(producer_or_config, Producer):
            if type(producer_or_config).produce is not Producer.produce:
                # A SerializingProducer (or another subclass) takes produce() arguments in another
                # order and serializes them itself; kcons passes bytes straight to librdkafka.
                raise TypeError(
                    f"kcons wraps a plain confluent_kafka.Producer, not {type(producer_or_config).__name__}: "
                    "serialize values before producing through kcons"
                )
            self.config = None
            self.raw: Producer = producer_or_config
        else:
            self.user_error_cb = producer_or_config.pop("error_cb", None)
            producer_or_config["error_cb"] = self._on_error
            self.config = producer_or_config
            self.raw = self._new_raw()

    @property
    def owned(self) -> bool:
        """True when kcons made the raw producer (from a config), False when it is the user's object."""
        return self.config is not None

    @property
    def can_recreate(self) -> bool:
        """Whether a replacement can be made (from the config, or with the user's factory)."""
        return self.config is not None or self._factory is not None

    def _new_raw(self) -> Producer:
        if self.config is None:
            assert self._factory is not None
            return self._factory()
        try:
            return Producer(self.config)
        except KafkaException as exc:
            shown = {k: v for k, v in redact_config(self.config).items() if not callable(v)}
            raise ConfigError("producer config", f"{exc} (config: {shown})") from None

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = err
            log.error("fatal Kafka producer error: %s", err.str())
        else:
            log.debug("Kafka producer error: %s", err.str())
        if self.user_error_cb is not None:
            self.user_error_cb(err)

    def recreate(self) -> None:
        """Replace the raw producer by a new one; the old one finishes closing in the background."""
        old = self.raw
        self.close_raw(old, min(1.0, self.close_timeout_s))
        self.fatal = None
        self.raw = self._new_raw()

    def close(self) -> None:
        """Drop what is queued and close the raw producer (bounded); the client is unusable afterwards."""
        self.closed = True
        self.close_raw(self.raw, self.close_timeout_s)

    @staticmethod
    def close_raw(raw: Producer, timeout: float) -> None:
        """Drop everything queued in ``raw`` and close it, waiting at most ``timeout`` seconds."""
        with contextlib.suppress(Exception):
            raw.purge(True, True, False)
        with contextlib.suppress(Exception):
            raw.poll(0)  # fail the purged messages' futures now

        def close() -> None:
            # confluent-kafka reports an abort that failed during close (expected for a fenced
            # producer) as a RuntimeWarning; kcons reports through logging.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                raw.close()
            for warning in caught:
                log.info("closing a Kafka producer: %s", warning.message)

        close_bounded(close, timeout, "Kafka producer")

    def exception_behind(self, exc: BaseException, *, probe_transaction: bool = False) -> KafkaException | None:
        """The Kafka error behind a failed ``poll``/``flush``: in the exception chain, else the fatal one reported.

        When a fatal error is raised while delivery callbacks run, confluent-kafka can also lose
        the exception and raise a bare SystemError ("returned NULL without setting an
        exception"); the fatal error reached the error callback first, so it names the cause.
        With ``probe_transaction`` (a commit's flush inside an open transaction) a bare
        SystemError with no error reported yet makes the client ask librdkafka (:meth:`_probe`).
        """
        kexc = _kafka_exception_of(exc)
        if kexc is None and self.fatal is None and probe_transaction and isinstance(exc, SystemError):
            kexc = self._probe()
        if kexc is None and self.fatal is not None:
            kexc = KafkaException(self.fatal)
        return kexc

    def _probe(self) -> KafkaException | None:
        """After a bare SystemError in a transaction with no error reported yet: did the producer fail?

        Serves the error queue once (the fatal error's report may still be queued, behind the
        callback that lost the exception), then asks ``begin_transaction``: librdkafka answers
        it with the fatal or abortable error the transaction is in, and with a harmless "in
        transaction" state error otherwise (it begins nothing). Only the thread that runs the
        transaction probes (from its commit's flush); should the probe begin one anyway, it is aborted.
        """
        with contextlib.suppress(KafkaException, SystemError, RuntimeError):
            self.raw.poll(0)
        if self.fatal is not None:
            return None
        try:
            self.raw.begin_transaction()
            with contextlib.suppress(KafkaException, SystemError, RuntimeError):
                self.raw.abort_transaction(5.0)  # nothing was produced in it
            return None
        except KafkaException as probe:
            err = probe.args[0] if probe.args else None
            if isinstance(err, KafkaError) and (err.fatal() or err.txn_requires_abort()):
                log.warning("a bare SystemError from confluent-kafka; the transaction is in error: %s", err.str())
                return probe
        except (SystemError, RuntimeError):
            return None
        return None


def _user_delivery_callback(
    config: dict[str, Any] | None, on_delivery: DeliveryCallback | None
) -> DeliveryCallback | None:
    """The user's producer-level delivery callback: ``on_delivery=`` or the config's (popped), never both."""
    in_config = None
    if config is not None:
        in_config = config.pop("on_delivery", None) or config.pop("delivery.report.cb", None)
    if in_config is not None and on_delivery is not None:
        raise ConfigError("on_delivery", "is set both in the config and as an argument: set it once")
    return on_delivery or in_config


def _safe(callback: DeliveryCallback) -> DeliveryCallback:
    """``callback`` with its exceptions logged: a user callback must not break the delivery of the others."""

    def call(err: KafkaError | None, msg: Message) -> None:
        try:
            callback(err, msg)
        except Exception:
            log.exception("a delivery callback raised")

    return call


class _ProducerBase:
    """What both kcons producers do with their client: produce with futures, serve reports, flush, close.

    Not transaction-aware: :class:`TransactionalProducer` adds its transaction state on top and
    decides itself how an error inside a transaction is classified.
    """

    def __init__(
        self,
        client: _Client,
        *,
        flush_timeout_s: float,
        event_ids: bool,
        on_delivery: DeliveryCallback | None,
    ) -> None:
        self._client = client
        self.flush_timeout_s = flush_timeout_s
        self.close_timeout_s = client.close_timeout_s
        self._event_ids = event_ids
        self._user_delivery_cb = on_delivery
        #: Per-message callback of future-less writes: the user's callback, so it runs once per message.
        self._plain_cb: DeliveryCallback | None = None if on_delivery is None else _safe(on_delivery)
        self._failed = 0  # delivery failures reported so far
        #: The futures awaiting a report, and the successes not yet counted in metrics (kept out of the hot path).
        self._tracker = DeliveryTracker(self._on_report)
        self._install_fast_produce()

    @property
    def event_ids(self) -> bool:
        """Whether produce() adds a ``kcons-id`` header to a message that has none."""
        return self._event_ids

    @event_ids.setter
    def event_ids(self, on: bool) -> None:
        self._event_ids = on
        self._install_fast_produce()

    def _install_fast_produce(self) -> None:
        """Give this producer the C produce() (kcons.kafka._speedups) when it is built and applies.

        It covers the common case (no caller headers, no delivery callback) and hands every other
        call to the Python method below, which stays the reference. The class attribute
        ``produce`` (a FastMethod) finds it in ``_fast_produce``; a subclass that defines produce,
        or a patch of it on the class, is found first.
        """
        self.__dict__.pop("_fast_produce", None)
        if _speedups is not None and self._user_delivery_cb is None:
            self.__dict__["_fast_produce"] = _speedups.FastProduce(
                _python_produce.__get__(self),
                self._produce_failed,
                self._client,
                self._tracker,
                fast_event_id if self._event_ids else None,
                HEADER_ID,
            )

    @property
    def raw(self) -> Producer:
        """The underlying confluent-kafka Producer (a new object after a re-creation)."""
        return self._client.raw

    @property
    def _closed(self) -> bool:
        return self._client.closed

    def _check_open(self) -> None:
        if self._client.closed:
            raise FatalKafkaError("the producer is closed; create a new one")

    # producing --------------------------------------------------------------------------

    def produce(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        *,
        headers: HeaderList | None = None,
        partition: int | None = None,
        on_delivery: DeliveryCallback | None = None,
        block: bool = True,
    ) -> DeliveryFuture:
        """Queue one message; the future resolves with the acknowledged message or fails with DeliveryError.

        ``on_delivery`` (or else the producer's ``on_delivery``) is called once with the report.
        Waits (bounded by ``flush_timeout_s``) while librdkafka's local queue is full, then
        raises TimeoutExceededError; with ``block=False`` raises BufferError at once instead.
        """
        client = self._client
        if client.closed:
            raise FatalKafkaError("the producer is closed; create a new one")
        tracker = self._tracker
        callback = on_delivery or self._user_delivery_cb
        kept: KeptHeaders = headers
        if self._event_ids:
            if headers is None:
                kept = event_id = fast_event_id()  # the future keeps the id alone, not the dict
                headers = {HEADER_ID: event_id}
            else:
                with_id = _with_event_id(headers)
                kept = with_id if with_id is not headers else _snapshot(headers)
                headers = with_id
        elif headers is not None:
            kept = _snapshot(headers)
        if callback is None and _new_future is not None:
            fut = _new_future(tracker, value, topic, key, kept)  # the C type (kcons.kafka._speedups)
        elif callback is None:
            # DeliveryFuture(tracker, value, topic, key, kept) without the Python-level __init__ call
            # (a frame per message); test_producer_futures_are_built_like_the_public_constructor pins it.
            fut = _bare_future(DeliveryFuture)
            fut._tracker = tracker
            fut._topic = topic
            fut._value = value
            fut._key = key
            fut._headers = kept
            fut._outcome = _UNSET
            fut._future = None
        else:
            fut = CallbackDeliveryFuture(tracker, value, callback, topic, key, kept)
        while True:
            pending = tracker.pending
            pending.add(fut)
            if tracker.pending is pending:
                break
            # Another thread's fail_pending (abort, close, re-creation) swapped the set out meanwhile:
            # take the future back and register it again, unless that call already failed it (the
            # abort or close came first: the message is not produced).
            try:
                pending.remove(fut)
            except KeyError:
                return fut
        try:
            part = _UNASSIGNED if partition is None else partition
            # All positional (partition, callback, on_delivery, timestamp, headers): confluent-kafka
            # resolves keyword arguments by building a str per keyword name on every call. The
            # callback goes in the first callback slot: a None there makes it ignore on_delivery.
            client.raw.produce(topic, value, key, part, fut, None, 0, headers)
        except Exception as exc:
            return self._produce_failed(exc, fut, pending, topic, value, key, headers, partition, block)
        return fut

    def _produce_failed(
        self,
        exc: Exception,
        fut: DeliveryFuture,
        pending: set[DeliveryFuture],
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None,
        headers: HeaderList | None,
        partition: int | None,
        block: bool,
    ) -> DeliveryFuture:
        """What produce() does when the raw producer refused ``fut``'s message (also the C fast path's).

        A full queue is waited out (bounded) unless ``block`` is False; anything else takes the
        future back out of ``pending`` and raises: a KafkaException as a typed error, the rest as it is.
        """
        if isinstance(exc, BufferError) and block:
            try:
                self._produce_when_room(topic, value, key, headers, partition, fut)
            except BaseException:
                pending.discard(fut)
                raise
            return fut
        pending.discard(fut)
        if isinstance(exc, KafkaException):
            self._raise_kafka(exc, "produce")
        raise exc

    def _produce_when_room(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None,
        headers: HeaderList | None,
        partition: int | None,
        delivered: DeliveryCallback | None,
        timestamp_ms: int = 0,
    ) -> None:
        deadline = time.monotonic() + self.flush_timeout_s
        kwargs: dict[str, Any] = {"headers": headers, "timestamp": timestamp_ms}
        if delivered is not None:
            kwargs["on_delivery"] = delivered
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            self._serve(0.05, "poll")
            try:
                self._client.raw.produce(topic, value, key, **kwargs)
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    metrics.PRODUCE_ERRORS.labels(ErrorClass.RETRIABLE.value).inc()
                    raise TimeoutExceededError(
                        f"the local produce queue stayed full for {self.flush_timeout_s}s (queue.buffering.max.*)"
                    ) from None
            except KafkaException as exc:
                self._raise_kafka(exc, "produce")

    def _produce_records(self, records: Iterable[Record], callback: DeliveryCallback | None) -> int:
        """Queue ``records`` with ``callback`` as each one's delivery callback; returns how many were queued."""
        produce = self._client.raw.produce
        n = 0
        add_ids = self._event_ids
        for topic, value, key, headers, timestamp_ms in records:
            if add_ids:
                headers = _with_event_id(headers)
            try:
                # Positional (partition, callback, on_delivery, timestamp, headers), as in produce().
                produce(topic, value, key, _UNASSIGNED, callback, None, timestamp_ms, headers)
            except BufferError:
                self._produce_when_room(topic, value, key, headers, None, callback, timestamp_ms)
            except KafkaException as exc:
                self._raise_kafka(exc, "produce")
            n += 1
        return n

    def _on_report(
        self, fut: DeliveryFuture, err: KafkaError | None, msg: Message, user_cb: DeliveryCallback | None
    ) -> None:
        """Settle a future its report took out of the pending set (failure, or success with a user callback)."""
        if err is None:
            self._tracker.delivered += 1
            fut.settle(msg)
        else:
            self._failed += 1
            cls = classify_kafka_error(err)
            metrics.PRODUCE_ERRORS.labels(cls.value).inc()
            if cls in (ErrorClass.FATAL, ErrorClass.FENCED):
                self._client.fatal = err
            reason = f"delivery to {msg.topic()} failed: {err.str()} ({err.name()})"
            fut.settle(None, DeliveryError(reason, code=err.code(), name=err.name()))
        if user_cb is not None:
            try:
                user_cb(err, msg)
            except Exception:  # a user callback must not break delivery of the others
                log.exception("a delivery callback raised")

    def _count_delivered(self) -> None:
        tracker = self._tracker
        if tracker.delivered:
            n, tracker.delivered = tracker.delivered, 0
            metrics.MESSAGES_PRODUCED.inc(n)

    def send(self, topic: str, envelope: Envelope, *, on_delivery: DeliveryCallback | None = None) -> DeliveryFuture:
        """Produce an event: key = aggregate id (so one aggregate stays in order), value = payload, envelope headers."""
        return self.produce(
            topic, envelope.payload, envelope.key, headers=list(envelope.headers()), on_delivery=on_delivery
        )

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks for up to ``timeout`` seconds; returns how many were served."""
        self._check_open()
        return self._serve(timeout, "poll")

    def _serve(self, timeout: float, operation: str) -> int:
        """``raw.poll`` or ``raw.flush`` with fatal errors raised as typed errors (closing the producer)."""
        try:
            n = int(self._client.raw.flush(timeout) if operation == "flush" else self._client.raw.poll(timeout))
        except (KafkaException, SystemError) as exc:
            kexc = self._client.exception_behind(exc)
            if kexc is None:
                raise
            self._raise_kafka(kexc, operation)
            raise AssertionError("unreachable") from None
        finally:
            self._count_delivered()
        return n

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is acknowledged or failed (its future says which).

        Raises TimeoutExceededError when messages remain after ``timeout`` (default ``flush_timeout_s``).
        """
        self._check_open()
        bound = self.flush_timeout_s if timeout is None else timeout
        remaining = self._serve(bound, "flush")
        if remaining > 0:
            raise TimeoutExceededError(f"{remaining} message(s) still unacknowledged after {bound}s")

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded) and close; messages still queued after the bound are dropped and their futures fail."""
        if self._client.closed:
            return
        bound = self.flush_timeout_s if timeout is None else timeout
        try:
            with contextlib.suppress(KafkaException, SystemError, RuntimeError):
                remaining = int(self._client.raw.flush(bound))
                if remaining:
                    log.warning("closing a producer with %d unacknowledged message(s); they are dropped", remaining)
        finally:
            self._count_delivered()
            self._client.close()
            self._fail_pending("the producer was closed before the message was acknowledged")

    def _fail_pending(self, reason: str) -> None:
        """Fail the futures of messages that will never get a delivery report (closed or replaced producer)."""
        self._tracker.fail_pending(lambda: DeliveryError(reason))

    @property
    def closed(self) -> bool:
        """Whether the producer was closed (explicitly or after a fatal error)."""
        return self._client.closed

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return 0 if self._client.closed else len(self._client.raw)

    # errors -----------------------------------------------------------------------------

    def _raise_kafka(self, exc: KafkaException, operation: str, *, in_transaction_end: bool = False) -> None:
        """Raise the typed error for ``exc``; a fatal or fenced error closes the producer first."""
        try:
            raise_for_kafka_error(exc, operation, in_transaction_end=in_transaction_end)
        except KafkaOperationError as typed:
            self._after_typed_error(typed)
            raise

    def _after_typed_error(self, typed: KafkaOperationError) -> None:
        metrics.PRODUCE_ERRORS.labels(typed.error_class.value).inc()
        if typed.error_class in (ErrorClass.FATAL, ErrorClass.FENCED):
            self._close_after_fatal(typed)

    def _raise_if_fatal(self, operation: str) -> None:
        fatal = self._client.fatal
        if fatal is not None:
            typed = kafka_error_to_exception(fatal, operation)
            self._close_after_fatal(typed)
            raise typed

    def _close_after_fatal(self, err: BaseException) -> None:
        if not self._client.closed:
            log.error("closing the producer after a fatal error: %s", err)
            self._client.close()
            self._fail_pending(f"the producer was closed after a fatal error: {err}")


def _producer_timeouts(flush_timeout_s: float, close_timeout_s: float) -> None:
    if flush_timeout_s <= 0:
        raise ConfigError("flush_timeout_s", f"must be > 0, got {flush_timeout_s}")
    if close_timeout_s <= 0:
        raise ConfigError("close_timeout_s", f"must be > 0, got {close_timeout_s}")


#: The Python produce(): the reference, and what the C one hands every case it does not cover to.
_python_produce = _ProducerBase.produce
if _speedups is not None:
    _ProducerBase.produce = _speedups.FastMethod(_python_produce)  # type: ignore[method-assign]


class IdempotentProducer(_ProducerBase):
    """At-least-once delivery without broker-side duplicates: ``enable.idempotence`` forced, ``acks=all``.

    Wrapping an existing ``confluent_kafka.Producer`` cannot read its configuration back, so
    idempotence and ``acks=all`` are then the caller's responsibility (this is assumed, not
    verified). Every message gets a ``kcons-id`` header (UUIDv7) unless it already has one.
    Delivery results come back as futures and, optionally, a delivery callback: the config's
    ``on_delivery`` or the ``on_delivery=`` argument (the only way for a wrapped Producer
    object, whose own callback kcons cannot see), called exactly once per message.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | Producer,
        *,
        flush_timeout_s: float = 30.0,
        close_timeout_s: float = 10.0,
        event_ids: bool = True,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        _producer_timeouts(flush_timeout_s, close_timeout_s)
        cfg = None if isinstance(config, Producer) else check_producer_config(config, transactional=False)
        user_cb = _user_delivery_callback(cfg, on_delivery)
        client = _Client(config if cfg is None else cfg, close_timeout_s=close_timeout_s)  # type: ignore[arg-type]
        super().__init__(client, flush_timeout_s=flush_timeout_s, event_ids=event_ids, on_delivery=user_cb)

    def __enter__(self) -> IdempotentProducer:
        return self

    def produce_all(self, records: Iterable[Record], timeout: float | None = None) -> int:
        """Produce ``records`` in order and return once the broker acknowledged all of them; the bulk path.

        Waits at most ``timeout`` (default ``flush_timeout_s``). Raises the typed error of the
        first failed delivery (a fatal one closes the producer), or TimeoutExceededError when
        some are still unacknowledged after the bound; the records still queued are then
        withdrawn (purged), so a re-sent batch is not preceded by stale copies. Either way any
        subset may have been written: re-send the whole batch (at-least-once, no gaps).
        Returns how many records were acknowledged. The producer's ``on_delivery`` runs once per record.
        """
        self._check_open()
        failures: list[KafkaError] = []
        user_cb = self._plain_cb

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(err)
            if user_cb is not None:
                user_cb(err, msg)

        n = self._produce_records(records, delivered)
        bound = self.flush_timeout_s if timeout is None else timeout
        remaining = self._serve(bound, "flush")
        if failures:
            self._failed += len(failures)
            typed = kafka_error_to_exception(failures[0], "produce")
            self._after_typed_error(typed)
            raise typed
        if remaining > 0:
            with contextlib.suppress(KafkaException, RuntimeError):
                self._client.raw.purge(True, False, False)
            self._serve(0, "poll")
            metrics.PRODUCE_ERRORS.labels(ErrorClass.RETRIABLE.value).inc()
            raise TimeoutExceededError(f"{remaining} of {n} record(s) unacknowledged after {bound}s")
        self._tracker.delivered += n
        self._count_delivered()
        return n


class TransactionalProducer(_ProducerBase):
    """Exactly-once writes: what is produced inside ``with producer.transaction():`` commits together or not at all.

    ``init_transactions`` runs at construction (bounded by ``init_timeout_s``); it fences any
    older producer with the same ``transactional.id`` and settles its open transaction. When
    wrapping an existing Producer, init_transactions is called on it, which verifies that it
    has a ``transactional.id`` (a producer that was already initialised is accepted); since its
    config cannot be read back, an indefinite outcome then closes it unless ``producer_factory``
    is given to build a replacement. ``on_delivery`` is called exactly once per message, on
    every path (``produce``, ``send``, ``enqueue``), as for :class:`IdempotentProducer`.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | Producer,
        *,
        transactional_id: str | None = None,
        init_timeout_s: float = 30.0,
        commit_timeout_s: float = 30.0,
        flush_timeout_s: float = 30.0,
        close_timeout_s: float = 10.0,
        retry_attempts: int = 8,
        event_ids: bool = True,
        producer_factory: Callable[[], Producer] | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        _producer_timeouts(flush_timeout_s, close_timeout_s)
        if init_timeout_s <= 0:
            raise ConfigError("init_timeout_s", f"must be > 0, got {init_timeout_s}")
        if commit_timeout_s <= 0:
            raise ConfigError("commit_timeout_s", f"must be > 0, got {commit_timeout_s}")
        if retry_attempts < 1:
            raise ConfigError("retry_attempts", f"must be >= 1, got {retry_attempts}")
        if isinstance(config, Producer) and transactional_id is not None:
            raise ConfigError("transactional.id", "cannot be set on an existing Producer; configure it there")
        self.init_timeout_s = init_timeout_s
        self.commit_timeout_s = commit_timeout_s
        self.retry_attempts = retry_attempts
        self._in_txn = False
        self._failed_at_begin = 0  # delivery failures counted before the open transaction began
        self._enqueued = 0  # messages queued with enqueue() in the open transaction
        self._txn_started = 0.0
        cfg = None if isinstance(config, Producer) else self._prepare_config(config, transactional_id)
        user_cb = _user_delivery_callback(cfg, on_delivery)
        client = _Client(
            config if cfg is None else cfg,  # type: ignore[arg-type]
            close_timeout_s=close_timeout_s,
            factory=producer_factory if cfg is None else None,
        )
        super().__init__(client, flush_timeout_s=flush_timeout_s, event_ids=event_ids, on_delivery=user_cb)
        self._init_transactions(accept_already_initialised=not client.owned)

    @staticmethod
    def _prepare_config(config: Mapping[str, Any], transactional_id: str | None) -> dict[str, Any]:
        cfg = dict(config)
        if transactional_id is not None:
            cfg["transactional.id"] = transactional_id
        cfg = check_producer_config(cfg, transactional=True)
        # For a few ms after each commit the coordinator answers CONCURRENT_TRANSACTIONS to the next
        # transaction's first request; librdkafka's default 100 ms backoff would add that to every
        # transaction (measured: ~2x throughput for 500-record transactions). Only when unset.
        cfg.setdefault("retry.backoff.ms", TXN_RETRY_BACKOFF_MS)
        return cfg

    @property
    def transactional_id(self) -> str | None:
        """The ``transactional.id`` (None when wrapping a Producer whose config is unknown)."""
        config = self._client.config
        return None if config is None else str(config["transactional.id"])

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open."""
        return self._in_txn

    def _raise_kafka(self, exc: KafkaException, operation: str, *, in_transaction_end: bool = False) -> None:
        """Raise the typed error for ``exc``, classified as inside a transaction while one is open."""
        try:
            raise_for_kafka_error(exc, operation, in_transaction_end=in_transaction_end, in_transaction=self._in_txn)
        except KafkaOperationError as typed:
            self._after_typed_error(typed)
            raise

    def _init_transactions(self, *, accept_already_initialised: bool) -> None:
        def init() -> None:
            try:
                self._client.raw.init_transactions(self.init_timeout_s)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                name = err.name() if err is not None and hasattr(err, "name") else ""
                if name == "_NOT_CONFIGURED":
                    raise ConfigError(
                        "transactional.id", "the producer has none, so it cannot run transactions"
                    ) from None
                if accept_already_initialised and name in _ALREADY_INITIALISED:
                    return
                if name in {"_TIMED_OUT", "REQUEST_TIMED_OUT"}:
                    raise TimeoutExceededError(
                        f"init_transactions did not finish within {self.init_timeout_s}s"
                    ) from None
                self._raise_kafka(exc, "init_transactions")

        try:
            _retry_policy(self.retry_attempts, self.init_timeout_s * 2)(init)
        except BaseException:
            if self._client.owned and not self._client.closed:
                self._client.close()
            raise

    # transactions -----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[TransactionalProducer]:
        """Begin; on normal exit flush everything produced inside (futures resolved) and commit; on exception abort.

        Raises AbortableTransactionError when the commit had to be aborted (re-run the unit of
        work, e.g. through :meth:`run_in_transaction`), ProducerFencedError/FatalKafkaError when
        the producer is unusable (it is closed), IndefiniteOutcomeError when the commit timed
        out (the producer was re-created; the transaction is committed or aborted, unknown which).
        A message's future resolves when the broker acknowledges it, which is before the commit:
        only a normal exit from this block means the messages are committed.
        """
        self.begin_transaction()
        try:
            yield self
        except BaseException as exc:
            self.abort_after_error("exception" if isinstance(exc, Exception) else "interrupted")
            raise
        try:
            self.commit_transaction()
        except KafkaOperationError:
            # A commit that kept failing with retriable errors leaves the transaction open: abort it,
            # so the producer is ready for the next one (the other outcomes ended it already).
            if self._in_txn and not self._client.closed:
                with contextlib.suppress(KafkaOperationError):
                    self.abort_transaction(reason="commit_failed")
            raise

    def abort_after_error(self, reason: str = "exception") -> None:
        """Abort after a failure inside the transaction, first letting its in-flight requests finish (bounded)."""
        if self._in_txn and not self._client.closed:
            self._settle_before_abort()
            self.abort_transaction(reason=reason)

    def _settle_before_abort(self) -> None:
        """Let in-flight requests of the transaction finish (bounded) before aborting it.

        Aborting while librdkafka's AddPartitionsToTxn is still in flight can end, against
        Kafka 4 brokers, in a fatal INVALID_TXN_STATE; waiting for the queued records first
        avoids that race. Failures here are left to the abort that follows.
        """
        with contextlib.suppress(KafkaException, SystemError, RuntimeError):
            self._client.raw.flush(min(5.0, self.commit_timeout_s))
        self._count_delivered()

    def begin_transaction(self) -> None:
        """Open a transaction (a local call; no broker round trip)."""
        self._check_open()
        if self._in_txn:
            raise KafkaOperationError("a transaction is already open on this producer (transactions do not nest)")
        self._raise_if_fatal("begin_transaction")
        try:
            self._client.raw.begin_transaction()
        except KafkaException as exc:
            self._raise_kafka(exc, "begin_transaction")
        self._in_txn = True
        self._failed_at_begin = self._failed
        self._enqueued = 0
        self._txn_started = time.monotonic()

    def enqueue(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        *,
        headers: HeaderList | None = None,
        partition: int | None = None,
        block: bool = True,
    ) -> None:
        """Queue a message in the open transaction without a per-message future: the fast path for bulk writes.

        Same guarantee as :meth:`produce` inside a transaction (librdkafka fails the commit when
        any message of the transaction failed, and the commit then aborts), at a fraction of the
        Python cost: no future, no delivery callback. Adds the ``kcons-id`` header like produce.
        Waits (bounded) while the local queue is full; with ``block=False`` raises BufferError instead.
        """
        if not self._in_txn:
            raise KafkaOperationError("enqueue needs an open transaction; use produce() outside transactions")
        if self._event_ids:
            headers = {HEADER_ID: fast_event_id()} if headers is None else _with_event_id(headers)
        try:
            # All positional (partition, callback, on_delivery, timestamp, headers): confluent-kafka
            # resolves keyword arguments by building a str per keyword name on every call.
            # The user's delivery callback (if any) in the first callback slot: once per message.
            self._client.raw.produce(
                topic, value, key, _UNASSIGNED if partition is None else partition, self._plain_cb, None, 0, headers
            )
        except BufferError:
            if not block:
                raise
            self._produce_when_room(topic, value, key, headers, partition, self._plain_cb)
        except KafkaException as exc:
            self._raise_kafka(exc, "produce")
        self._enqueued += 1

    def enqueue_all(self, records: Iterable[Record]) -> int:
        """Queue ``records`` in order in the open transaction, as :meth:`enqueue` would each; returns how many.

        The bulk path (one Python loop, no per-record method call); records are
        ``(topic, value, key, headers, timestamp_ms)``.
        """
        if not self._in_txn:
            raise KafkaOperationError("enqueue_all needs an open transaction; use produce() outside transactions")
        n = self._produce_records(records, self._plain_cb)
        self._enqueued += n
        return n

    def send_offsets(self, offsets: list[TopicPartition], group_metadata: Any, timeout: float = 30.0) -> None:
        """Add consumer offsets (next offset to read) to the open transaction, so they commit with its outputs.

        An abortable error aborts the transaction and raises AbortableTransactionError.
        """
        self._check_open()
        if not self._in_txn:
            raise KafkaOperationError("send_offsets needs an open transaction")

        def send() -> None:
            try:
                self._client.raw.send_offsets_to_transaction(offsets, group_metadata, timeout)
            except KafkaException as exc:
                self._raise_kafka(exc, "send_offsets_to_transaction")

        try:
            try:
                send()  # first without the retry machinery: building a tenacity policy per call costs CPU
            except RetriableKafkaError:
                _retry_policy(self.retry_attempts, timeout)(send)
        except AbortableTransactionError:
            self.abort_transaction(reason="abortable_error")
            raise

    def _flush_before_commit(self) -> None:
        """Wait (bounded) for the transaction's records; abort when one failed or the bound passed."""
        try:
            remaining = int(self._client.raw.flush(self.commit_timeout_s))
        except (KafkaException, SystemError) as exc:
            kexc = self._client.exception_behind(exc, probe_transaction=True)
            if kexc is None:
                raise
            self._end_failed(kexc, "flush before commit")
            raise AssertionError("unreachable") from None
        finally:
            self._count_delivered()
        if remaining > 0:
            self.abort_transaction(reason="flush_timeout")
            raise TimeoutExceededError(
                f"{remaining} message(s) unacknowledged {self.commit_timeout_s}s into the commit; transaction aborted"
            )
        if self._failed != self._failed_at_begin:
            failed = self._failed - self._failed_at_begin
            self.abort_transaction(reason="delivery_failed")
            raise AbortableTransactionError(f"{failed} message(s) of the transaction failed delivery; it was aborted")

    def commit_transaction(self) -> None:
        """Flush (bounded), then commit; see :meth:`transaction` for the errors.

        With futures pending (``produce`` in the transaction) the flush comes first, so each
        future is resolved and a failed delivery aborts the transaction before the commit is
        tried. With only :meth:`enqueue`d records there is nothing to resolve: librdkafka's
        commit flushes them itself and fails (abortable) when any of them failed, one wait
        for the broker instead of two.
        """
        self._check_open()
        if not self._in_txn:
            raise KafkaOperationError("commit_transaction needs an open transaction")
        deadline = time.monotonic() + self.commit_timeout_s
        if self._tracker.pending:
            self._flush_before_commit()

        def commit() -> None:
            try:
                self._client.raw.commit_transaction(max(0.001, deadline - time.monotonic()))
            except KafkaException as exc:
                self._end_failed(exc, "commit_transaction")

        try:
            commit()  # first without the retry machinery: building a tenacity policy per commit costs CPU
        except RetriableKafkaError:
            _retry_policy(self.retry_attempts, self.commit_timeout_s)(commit)
        self._in_txn = False
        self._serve(0, "poll")
        if self._enqueued:
            metrics.MESSAGES_PRODUCED.inc(self._enqueued)
            self._enqueued = 0
        metrics.TRANSACTIONS_COMMITTED.inc()
        metrics.TRANSACTION_DURATION.labels("committed").observe(time.monotonic() - self._txn_started)

    def abort_transaction(self, *, reason: str = "requested") -> None:
        """Abort the open transaction (bounded); its messages are never visible to read_committed consumers.

        A timed-out abort re-creates the producer (the broker then aborts the transaction) and
        does not raise: the outcome of an abort is never in doubt.
        """
        self._check_open()
        if not self._in_txn:
            return

        def abort() -> None:
            try:
                self._client.raw.abort_transaction(self.commit_timeout_s)
            except KafkaException as exc:
                self._end_failed(exc, "abort_transaction")

        try:
            _retry_policy(self.retry_attempts, self.commit_timeout_s)(abort)
        except IndefiniteOutcomeError:
            self._in_txn = False
            if self._client.closed:
                raise
            log.warning("abort timed out; the producer was re-created and the broker aborts the transaction")
        self._in_txn = False
        self._serve(0, "poll")
        self._fail_pending("the transaction was aborted")
        metrics.TRANSACTIONS_ABORTED.labels(reason).inc()
        metrics.TRANSACTION_DURATION.labels("aborted").observe(time.monotonic() - self._txn_started)

    def _end_failed(self, exc: KafkaException, operation: str) -> None:
        """Handle a failed flush/commit/abort: raise the typed error after doing what its class requires."""
        try:
            raise_for_kafka_error(exc, operation, in_transaction_end=True)
        except KafkaOperationError as typed:
            metrics.PRODUCE_ERRORS.labels(typed.error_class.value).inc()
            cls = typed.error_class
            if cls is ErrorClass.RETRIABLE:
                raise
            if cls is ErrorClass.ABORTABLE:
                if operation != "abort_transaction":
                    self.abort_transaction(reason="abortable_error")
                raise
            self._in_txn = False
            if cls is ErrorClass.INDEFINITE:
                metrics.TRANSACTIONS_ABORTED.labels("indefinite").inc()
                self._reinitialise(typed)
                raise
            if cls in (ErrorClass.FATAL, ErrorClass.FENCED):
                self._close_after_fatal(typed)
                raise
            # A permanent error at transaction end (e.g. a state error): abort so the producer stays usable.
            self._in_txn = True
            if operation != "abort_transaction":
                with contextlib.suppress(KafkaOperationError):
                    self.abort_transaction(reason="error")
            self._in_txn = False
            raise

    def _reinitialise(self, cause: BaseException) -> None:
        """Replace the producer after an indefinite outcome: same transactional.id, fresh init_transactions."""
        metrics.PRODUCER_REINITIALISATIONS.inc()
        client = self._client
        if not client.can_recreate:
            client.close()
            self._fail_pending(f"the producer was closed after an indefinite outcome: {cause}")
            raise IndefiniteOutcomeError(
                f"{cause}; the wrapped producer cannot be re-created (pass producer_factory), so it was closed"
            ) from cause
        log.warning("transaction outcome unknown (%s): re-creating the producer to fence the old one", cause)
        # The old instance may sit in its own commit until its timeout: let it finish in the background.
        client.recreate()
        self._fail_pending(f"the producer was re-created after an indefinite outcome: {cause}")
        self._init_transactions(accept_already_initialised=False)

    def run_in_transaction(self, work: Callable[[TransactionalProducer], T], *, attempts: int = 5) -> T:
        """Run ``work(producer)`` inside a transaction and commit; on an abortable error abort and re-run it all.

        At most ``attempts`` runs. Fatal and fenced errors are raised at once (the producer is
        closed); an indefinite outcome raises IndefiniteOutcomeError rather than re-running,
        because the first run may have committed.
        """
        if attempts < 1:
            raise ConfigError("attempts", f"must be >= 1, got {attempts}")

        def once() -> T:
            with self.transaction():
                return work(self)

        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception_type(AbortableTransactionError),
            reraise=True,
        )
        return retrying(once)

    def close(self, timeout: float | None = None) -> None:
        """Abort an open transaction (bounded), flush and close."""
        if not self._client.closed and self._in_txn:
            with contextlib.suppress(KafkaOperationError):
                self.abort_transaction(reason="closed")
        super().close(timeout)

    def __enter__(self) -> TransactionalProducer:
        return self


class UnverifiedConfigWarning(UserWarning):
    """An existing Producer was wrapped as idempotent although its config could not be checked.

    confluent-kafka does not expose a Producer's configuration, so ``enable.idempotence`` and
    ``acks=all`` cannot be verified: with ``acks=1`` an acknowledged record can still be lost.
    Pass the config dict instead (it is checked), or ``trust_config=True`` once you have.
    """


def _unverified(stacklevel: int) -> None:
    warnings.warn(
        "wrapped an existing Producer as an IdempotentProducer without checking its config (it cannot be read):"
        " make sure it sets enable.idempotence=true and acks=all, or pass the config dict to have it checked;"
        " trust_config=True silences this warning",
        UnverifiedConfigWarning,
        stacklevel=stacklevel + 1,
    )


def wrap(
    producer_or_config: Mapping[str, Any] | Producer, *, trust_config: bool = False, **kwargs: Any
) -> IdempotentProducer | TransactionalProducer:
    """The one-line entry point: a TransactionalProducer iff ``transactional.id`` is set, else an IdempotentProducer.

    For an existing Producer, whose config cannot be read, ``init_transactions`` is tried:
    it succeeds (or reports an already initialised producer) only when a ``transactional.id``
    is configured. Otherwise it becomes an IdempotentProducer whose idempotence could not be
    checked: an UnverifiedConfigWarning says so unless ``trust_config=True``. Its own delivery
    callback cannot be read either, and kcons' per-message callbacks replace it: pass it as
    ``wrap(producer, on_delivery=callback)`` and it runs exactly once per message on every path
    (``produce``, ``send``, ``enqueue``). For a config dict, its ``on_delivery`` (or the
    ``on_delivery=`` argument, not both) is used the same way. Type checkers see a union: use
    :func:`wrap_transactional` or :func:`wrap_idempotent` when you know which one you want.
    """
    if isinstance(producer_or_config, Producer):
        try:
            return TransactionalProducer(producer_or_config, **kwargs)
        except ConfigError as exc:
            if exc.setting != "transactional.id":
                raise
            if not trust_config:
                _unverified(stacklevel=2)
            return IdempotentProducer(producer_or_config, **_idempotent_kwargs(kwargs))
    if producer_or_config.get("transactional.id"):
        return TransactionalProducer(producer_or_config, **kwargs)
    return IdempotentProducer(producer_or_config, **_idempotent_kwargs(kwargs))


def wrap_transactional(producer_or_config: Mapping[str, Any] | Producer, **kwargs: Any) -> TransactionalProducer:
    """A TransactionalProducer (typed); ConfigError("transactional.id") when none is configured."""
    return TransactionalProducer(producer_or_config, **kwargs)


def wrap_idempotent(
    producer_or_config: Mapping[str, Any] | Producer, *, trust_config: bool = False, **kwargs: Any
) -> IdempotentProducer:
    """An IdempotentProducer (typed): a config dict is checked (idempotence, acks=all, no transactional.id).

    An existing Producer cannot be checked: UnverifiedConfigWarning unless ``trust_config=True``.
    """
    if isinstance(producer_or_config, Producer):
        if not trust_config:
            _unverified(stacklevel=2)
    elif producer_or_config.get("transactional.id"):
        raise ConfigError("transactional.id", "is set: use wrap_transactional for a transactional producer")
    return IdempotentProducer(producer_or_config, **kwargs)


def _idempotent_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    names = ("flush_timeout_s", "close_timeout_s", "event_ids", "on_delivery")
    return {k: v for k, v in kwargs.items() if k in names}
