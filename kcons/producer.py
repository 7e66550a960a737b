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
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import FINISHED as _FINISHED
from concurrent.futures._base import PENDING as _PENDING
from functools import partial
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
from kcons.kafka.client import check_producer_config

log = logging.getLogger(__name__)

__all__ = [
    "DeliveryCallback",
    "DeliveryFuture",
    "HeaderList",
    "IdempotentProducer",
    "TransactionalProducer",
    "check_producer_config",
    "fast_event_id",
    "wrap",
]

T = TypeVar("T")
#: ``retry.backoff.ms`` a TransactionalProducer uses unless the config sets it (see its _prepare_config).
TXN_RETRY_BACKOFF_MS = 10
#: librdkafka's RD_KAFKA_PARTITION_UA: let the partitioner choose (by key).
_UNASSIGNED = -1
#: Message headers as confluent-kafka takes them: a list of (name, value) pairs or a dict.
HeaderList = list[tuple[str, bytes | str | None]] | dict[str, bytes | str | None]
DeliveryCallback = Callable[[KafkaError | None, Message], None]

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


# --- delivery futures --------------------------------------------------------------------

_lazy_condition_lock = threading.Lock()


class DeliveryFuture(Future[Message]):
    """A ``concurrent.futures.Future`` that creates its Condition only when something waits on it.

    One future is made per produced message and most are never waited on; the standard
    Future builds a Condition and an RLock up front, which costs more than the produce call.
    Here the Condition appears on first use (``result``, ``done``, ``add_done_callback``,
    ``wait``...); until then ``set_result``/``set_exception`` just record the outcome. Both
    paths hold one module lock while checking whether the Condition exists, so a waiter that
    arrives concurrently either sees the outcome or is notified. Behaviour is otherwise that
    of ``concurrent.futures.Future`` (``asyncio.wrap_future`` works on it).

    The future is also the message's delivery callback (``__call__(err, msg)``), and its
    waiter and callback lists appear on first use too: a produced message then allocates one
    object that the cyclic garbage collector tracks, instead of six (future, two lists, a
    closure and its cells), which with many messages in flight made collections the largest
    cost of ``produce``.
    """

    def __init__(self, deliver: Callable[[DeliveryFuture, KafkaError | None, Message], None] | None = None) -> None:
        # Future.__init__ is skipped on purpose: it builds the Condition and both lists.
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._deliver = deliver

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        """confluent-kafka's delivery callback for this message: hand the report to the producer (once)."""
        deliver, self._deliver = self._deliver, None  # let the producer go once delivered
        if deliver is not None:
            deliver(self, err, msg)

    def release(self) -> None:
        """Drop the link to the producer (it failed this future without a report, or closed)."""
        self._deliver = None

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        return self._lazy_list("_lazy_waiters")

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Message]], object]]:
        return self._lazy_list("_lazy_done_callbacks")

    def _lazy_list(self, name: str) -> list[Any]:
        found: list[Any] | None = self.__dict__.get(name)
        if found is None:
            found = self.__dict__.setdefault(name, [])  # atomic: two threads get the same list
        return found

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond: threading.Condition | None = self.__dict__.get("_lazy_condition")
        if cond is None:
            with _lazy_condition_lock:
                cond = self.__dict__.get("_lazy_condition")
                if cond is None:
                    cond = threading.Condition()
                    self.__dict__["_lazy_condition"] = cond
        return cond

    def set_result(self, result: Message) -> None:
        with _lazy_condition_lock:
            if "_lazy_condition" not in self.__dict__:
                if self._state != _PENDING:
                    raise InvalidStateError(f"the delivery future is already {self._state}")
                self._result = result
                self._state = _FINISHED
                return
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        with _lazy_condition_lock:
            if "_lazy_condition" not in self.__dict__:
                if self._state != _PENDING:
                    raise InvalidStateError(f"the delivery future is already {self._state}")
                self._exception = exception
                self._state = _FINISHED
                return
        super().set_exception(exception)


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


def _close_raw(raw: Producer, timeout: float) -> None:
    """Drop everything queued in ``raw`` and close it, waiting at most ``timeout`` seconds."""
    with contextlib.suppress(Exception):
        raw.purge(True, True, False)
    with contextlib.suppress(Exception):
        raw.poll(0)  # fail the purged messages' futures now
    done = threading.Event()

    def close() -> None:
        with contextlib.suppress(Exception):
            raw.close()
        done.set()

    threading.Thread(target=close, name="kcons-producer-close", daemon=True).start()
    if not done.wait(timeout):
        log.warning("closing a Kafka producer took longer than %.1fs; left to finish in the background", timeout)


class IdempotentProducer:
    """At-least-once delivery without broker-side duplicates: ``enable.idempotence`` forced, ``acks=all``.

    Wrapping an existing ``confluent_kafka.Producer`` cannot read its configuration back, so
    idempotence and ``acks=all`` are then the caller's responsibility (this is assumed, not
    verified). Every message gets a ``kcons-id`` header (UUIDv7) unless it already has one.
    Delivery results come back as futures and, optionally, per-message callbacks.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | Producer,
        *,
        flush_timeout_s: float = 30.0,
        close_timeout_s: float = 10.0,
        event_ids: bool = True,
    ) -> None:
        if flush_timeout_s <= 0:
            raise ConfigError("flush_timeout_s", f"must be > 0, got {flush_timeout_s}")
        self.flush_timeout_s = flush_timeout_s
        self.close_timeout_s = close_timeout_s
        self.event_ids = event_ids
        self._closed = False
        self._fatal: KafkaError | None = None
        self._user_error_cb: Callable[[KafkaError], None] | None = None
        self._user_delivery_cb: DeliveryCallback | None = None
        self._delivered = 0  # acknowledged since the last metrics update (kept out of the hot path)
        self._failures_since_begin = 0
        self._pending: set[DeliveryFuture] = set()
        self._config: dict[str, Any] | None
        if isinstance(config, Producer):
            if type(config).produce is not Producer.produce:
                # A SerializingProducer (or another subclass) takes produce() arguments in another
                # order and serializes them itself; kcons passes bytes straight to librdkafka.
                raise TypeError(
                    f"kcons wraps a plain confluent_kafka.Producer, not {type(config).__name__}: "
                    "serialize values before producing through kcons"
                )
            self._config = None
            self.raw: Producer = config
        else:
            self._config = self._prepare_config(config)
            self.raw = self._new_raw()

    # configuration ----------------------------------------------------------------------

    def _prepare_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        cfg = check_producer_config(config, transactional=False)
        return self._take_callbacks(cfg)

    def _take_callbacks(self, cfg: dict[str, Any]) -> dict[str, Any]:
        self._user_error_cb = cfg.pop("error_cb", None)
        self._user_delivery_cb = cfg.pop("on_delivery", None) or cfg.pop("delivery.report.cb", None)
        cfg["error_cb"] = self._on_error
        return cfg

    def _new_raw(self) -> Producer:
        assert self._config is not None
        try:
            return Producer(self._config)
        except KafkaException as exc:
            shown = {k: v for k, v in redact_config(self._config).items() if not callable(v)}
            raise ConfigError("producer config", f"{exc} (config: {shown})") from None

    def _kafka_exception_behind(self, exc: BaseException, *, probe: bool = False) -> KafkaException | None:
        """The Kafka error behind a failed ``poll``/``flush``: in the exception chain, else the fatal one reported.

        When a fatal error is raised while delivery callbacks run, confluent-kafka can also lose
        the exception and raise a bare SystemError ("returned NULL without setting an
        exception"); the fatal error reached :meth:`_on_error` first, so it names the cause.
        """
        kexc = _kafka_exception_of(exc)
        if kexc is None and self._fatal is None and probe and isinstance(exc, SystemError):
            kexc = self._probe_fatal()
        if kexc is None and self._fatal is not None:
            kexc = KafkaException(self._fatal)
        return kexc

    def _probe_fatal(self) -> KafkaException | None:
        """After a bare SystemError with no error reported yet: ask librdkafka whether the producer failed.

        Serves the error queue once (the fatal error's report may still be queued, behind the
        callback that lost the exception); in a transaction, ``begin_transaction`` is then
        asked too: librdkafka answers it with the fatal or abortable error the transaction is
        in, and with a harmless "in transaction" state error otherwise (it begins nothing).
        Only the thread that runs the transaction probes (from its commit's flush), so
        librdkafka is in that transaction; should the probe begin one anyway, it is aborted.
        """
        with contextlib.suppress(KafkaException, SystemError, RuntimeError):
            self.raw.poll(0)
        if self._fatal is not None or not self._transaction_open():
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

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
            log.error("fatal Kafka producer error: %s", err.str())
        else:
            log.debug("Kafka producer error: %s", err.str())
        if self._user_error_cb is not None:
            self._user_error_cb(err)

    # producing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FatalKafkaError("the producer is closed; create a new one")

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
    ) -> Future[Message]:
        """Queue one message; the future resolves with the acknowledged message or fails with DeliveryError.

        Waits (bounded by ``flush_timeout_s``) while librdkafka's local queue is full, then
        raises TimeoutExceededError; with ``block=False`` raises BufferError at once instead.
        """
        self._check_open()
        user_cb = on_delivery or self._user_delivery_cb
        fut = DeliveryFuture(self._on_delivery if user_cb is None else partial(self._on_delivery, user_cb=user_cb))
        self._pending.add(fut)
        if self.event_ids:
            headers = {HEADER_ID: fast_event_id()} if headers is None else _with_event_id(headers)
        try:
            part = _UNASSIGNED if partition is None else partition
            # Positional (see enqueue); the callback goes in the first callback slot: a None there
            # would make confluent-kafka ignore on_delivery.
            self.raw.produce(topic, value, key, part, fut, None, 0, headers)
        except BufferError:
            if not block:
                self._pending.discard(fut)
                raise
            try:
                self._produce_when_room(topic, value, key, headers, partition, fut)
            except BaseException:
                self._pending.discard(fut)
                raise
        except KafkaException as exc:
            self._pending.discard(fut)
            self._raise_kafka(exc, "produce")
        return fut

    def _produce_when_room(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None,
        headers: HeaderList | None,
        partition: int | None,
        delivered: DeliveryCallback | None,
    ) -> None:
        deadline = time.monotonic() + self.flush_timeout_s
        kwargs: dict[str, Any] = {"headers": headers}
        if delivered is not None:
            kwargs["on_delivery"] = delivered
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            self._serve(0.05, "poll")
            try:
                self.raw.produce(topic, value, key, **kwargs)
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    metrics.PRODUCE_ERRORS.labels(ErrorClass.RETRIABLE.value).inc()
                    raise TimeoutExceededError(
                        f"the local produce queue stayed full for {self.flush_timeout_s}s (queue.buffering.max.*)"
                    ) from None
            except KafkaException as exc:
                self._raise_kafka(exc, "produce")

    def _on_delivery(
        self, fut: Future[Message], err: KafkaError | None, msg: Message, user_cb: DeliveryCallback | None = None
    ) -> None:
        # The future leaves the pending set only once resolved: when confluent-kafka runs this callback
        # with a fatal error already pending, every C call in here fails, and close() must fail it later.
        if err is None:
            self._delivered += 1
            with contextlib.suppress(InvalidStateError):  # cancelled by its caller (e.g. asyncio)
                fut.set_result(msg)
        else:
            self._failures_since_begin += 1
            cls = classify_kafka_error(err)
            metrics.PRODUCE_ERRORS.labels(cls.value).inc()
            if cls in (ErrorClass.FATAL, ErrorClass.FENCED):
                self._fatal = err
            reason = f"delivery to {msg.topic()} failed: {err.str()} ({err.name()})"
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(DeliveryError(reason, code=err.code(), name=err.name()))
        self._pending.discard(fut)
        if user_cb is not None:
            try:
                user_cb(err, msg)
            except Exception:  # a user callback must not break delivery of the others
                log.exception("a delivery callback raised")

    def _count_delivered(self) -> None:
        if self._delivered:
            n, self._delivered = self._delivered, 0
            metrics.MESSAGES_PRODUCED.inc(n)

    def send(self, topic: str, envelope: Envelope, *, on_delivery: DeliveryCallback | None = None) -> Future[Message]:
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
            n = int(self.raw.flush(timeout) if operation == "flush" else self.raw.poll(timeout))
        except (KafkaException, SystemError) as exc:
            kexc = self._kafka_exception_behind(exc)
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
        if self._closed:
            return
        bound = self.flush_timeout_s if timeout is None else timeout
        try:
            with contextlib.suppress(KafkaException, SystemError, RuntimeError):
                remaining = int(self.raw.flush(bound))
                if remaining:
                    log.warning("closing a producer with %d unacknowledged message(s); they are dropped", remaining)
        finally:
            self._count_delivered()
            self._closed = True
            _close_raw(self.raw, self.close_timeout_s)
            self._fail_pending("the producer was closed before the message was acknowledged")

    def _fail_pending(self, reason: str) -> None:
        """Fail the futures of messages that will never get a delivery report (closed or replaced producer)."""
        pending, self._pending = self._pending, set()
        for fut in pending:
            fut.release()
            if not fut.done():
                with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                    fut.set_exception(DeliveryError(reason))

    @property
    def closed(self) -> bool:
        """Whether the producer was closed (explicitly or after a fatal error)."""
        return self._closed

    def __enter__(self) -> IdempotentProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return 0 if self._closed else len(self.raw)

    # errors -----------------------------------------------------------------------------

    def _raise_kafka(self, exc: KafkaException, operation: str, *, in_transaction_end: bool = False) -> None:
        """Raise the typed error for ``exc``; a fatal or fenced error closes the producer first."""
        try:
            raise_for_kafka_error(
                exc, operation, in_transaction_end=in_transaction_end, in_transaction=self._transaction_open()
            )
        except KafkaOperationError as typed:
            metrics.PRODUCE_ERRORS.labels(typed.error_class.value).inc()
            if typed.error_class in (ErrorClass.FATAL, ErrorClass.FENCED):
                self._close_after_fatal(typed)
            raise

    def _transaction_open(self) -> bool:
        return False

    def _close_after_fatal(self, err: BaseException) -> None:
        if not self._closed:
            log.error("closing the producer after a fatal error: %s", err)
            self._closed = True
            _close_raw(self.raw, self.close_timeout_s)
            self._fail_pending(f"the producer was closed after a fatal error: {err}")


class TransactionalProducer(IdempotentProducer):
    """Exactly-once writes: what is produced inside ``with producer.transaction():`` commits together or not at all.

    ``init_transactions`` runs at construction (bounded by ``init_timeout_s``); it fences any
    older producer with the same ``transactional.id`` and settles its open transaction. When
    wrapping an existing Producer, init_transactions is called on it, which verifies that it
    has a ``transactional.id`` (a producer that was already initialised is accepted); since its
    config cannot be read back, an indefinite outcome then closes it unless ``producer_factory``
    is given to build a replacement.
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
    ) -> None:
        if init_timeout_s <= 0:
            raise ConfigError("init_timeout_s", f"must be > 0, got {init_timeout_s}")
        if commit_timeout_s <= 0:
            raise ConfigError("commit_timeout_s", f"must be > 0, got {commit_timeout_s}")
        if retry_attempts < 1:
            raise ConfigError("retry_attempts", f"must be >= 1, got {retry_attempts}")
        self._transactional_id = transactional_id
        self.init_timeout_s = init_timeout_s
        self.commit_timeout_s = commit_timeout_s
        self.retry_attempts = retry_attempts
        self._producer_factory = producer_factory
        self._in_txn = False
        self._enqueued = 0  # messages queued with enqueue() in the open transaction
        self._txn_started = 0.0
        self._txn_lock = threading.Lock()
        if isinstance(config, Producer) and transactional_id is not None:
            raise ConfigError("transactional.id", "cannot be set on an existing Producer; configure it there")
        super().__init__(config, flush_timeout_s=flush_timeout_s, close_timeout_s=close_timeout_s, event_ids=event_ids)
        self._init_transactions(accept_already_initialised=self._config is None)

    def _prepare_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        cfg = dict(config)
        if self._transactional_id is not None:
            cfg["transactional.id"] = self._transactional_id
        cfg = check_producer_config(cfg, transactional=True)
        # For a few ms after each commit the coordinator answers CONCURRENT_TRANSACTIONS to the next
        # transaction's first request; librdkafka's default 100 ms backoff would add that to every
        # transaction (measured: ~2x throughput for 500-record transactions). Only when unset.
        cfg.setdefault("retry.backoff.ms", TXN_RETRY_BACKOFF_MS)
        return self._take_callbacks(cfg)

    @property
    def transactional_id(self) -> str | None:
        """The ``transactional.id`` (None when wrapping a Producer whose config is unknown)."""
        return None if self._config is None else str(self._config["transactional.id"])

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open."""
        return self._in_txn

    def _transaction_open(self) -> bool:
        return self._in_txn

    def _init_transactions(self, *, accept_already_initialised: bool) -> None:
        def init() -> None:
            try:
                self.raw.init_transactions(self.init_timeout_s)
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
            if self._config is not None:
                self._closed = True
                _close_raw(self.raw, self.close_timeout_s)
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
        self.commit_transaction()

    def abort_after_error(self, reason: str = "exception") -> None:
        """Abort after a failure inside the transaction, first letting its in-flight requests finish (bounded)."""
        if self._in_txn and not self._closed:
            self._settle_before_abort()
            self.abort_transaction(reason=reason)

    def _settle_before_abort(self) -> None:
        """Let in-flight requests of the transaction finish (bounded) before aborting it.

        Aborting while librdkafka's AddPartitionsToTxn is still in flight can end, against
        Kafka 4 brokers, in a fatal INVALID_TXN_STATE; waiting for the queued records first
        avoids that race. Failures here are left to the abort that follows.
        """
        with contextlib.suppress(KafkaException, SystemError, RuntimeError):
            self.raw.flush(min(5.0, self.commit_timeout_s))
        self._count_delivered()

    def begin_transaction(self) -> None:
        """Open a transaction (a local call; no broker round trip)."""
        self._check_open()
        if self._in_txn:
            raise KafkaOperationError("a transaction is already open on this producer (transactions do not nest)")
        self._raise_if_fatal("begin_transaction")
        try:
            self.raw.begin_transaction()
        except KafkaException as exc:
            self._raise_kafka(exc, "begin_transaction")
        self._in_txn = True
        self._failures_since_begin = 0
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
        if self.event_ids:
            headers = {HEADER_ID: fast_event_id()} if headers is None else _with_event_id(headers)
        try:
            # All positional (partition, callback, on_delivery, timestamp, headers): confluent-kafka
            # resolves keyword arguments by building a str per keyword name on every call.
            self.raw.produce(topic, value, key, _UNASSIGNED if partition is None else partition, None, None, 0, headers)
        except BufferError:
            if not block:
                raise
            self._produce_when_room(topic, value, key, headers, partition, None)
        except KafkaException as exc:
            self._raise_kafka(exc, "produce")
        self._enqueued += 1

    def send_offsets(self, offsets: list[TopicPartition], group_metadata: Any, timeout: float = 30.0) -> None:
        """Add consumer offsets (next offset to read) to the open transaction, so they commit with its outputs.

        An abortable error aborts the transaction and raises AbortableTransactionError.
        """
        self._check_open()
        if not self._in_txn:
            raise KafkaOperationError("send_offsets needs an open transaction")

        def send() -> None:
            try:
                self.raw.send_offsets_to_transaction(offsets, group_metadata, timeout)
            except KafkaException as exc:
                self._raise_kafka(exc, "send_offsets_to_transaction")

        try:
            _retry_policy(self.retry_attempts, timeout)(send)
        except AbortableTransactionError:
            self.abort_transaction(reason="abortable_error")
            raise

    def commit_transaction(self) -> None:
        """Flush (bounded), then commit; see :meth:`transaction` for the errors."""
        self._check_open()
        if not self._in_txn:
            raise KafkaOperationError("commit_transaction needs an open transaction")
        deadline = time.monotonic() + self.commit_timeout_s
        try:
            remaining = int(self.raw.flush(self.commit_timeout_s))
        except (KafkaException, SystemError) as exc:
            kexc = self._kafka_exception_behind(exc, probe=True)
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
        if self._failures_since_begin:
            failed = self._failures_since_begin
            self.abort_transaction(reason="delivery_failed")
            raise AbortableTransactionError(f"{failed} message(s) of the transaction failed delivery; it was aborted")

        def commit() -> None:
            try:
                self.raw.commit_transaction(max(0.001, deadline - time.monotonic()))
            except KafkaException as exc:
                self._end_failed(exc, "commit_transaction")

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
                self.raw.abort_transaction(self.commit_timeout_s)
            except KafkaException as exc:
                self._end_failed(exc, "abort_transaction")

        try:
            _retry_policy(self.retry_attempts, self.commit_timeout_s)(abort)
        except IndefiniteOutcomeError:
            self._in_txn = False
            if self._closed:
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
        old = self.raw
        if self._config is None and self._producer_factory is None:
            self._closed = True
            _close_raw(old, self.close_timeout_s)
            self._fail_pending(f"the producer was closed after an indefinite outcome: {cause}")
            raise IndefiniteOutcomeError(
                f"{cause}; the wrapped producer cannot be re-created (pass producer_factory), so it was closed"
            ) from cause
        log.warning("transaction outcome unknown (%s): re-creating the producer to fence the old one", cause)
        # The old instance may sit in its own commit until its timeout: let it finish in the background.
        _close_raw(old, min(1.0, self.close_timeout_s))
        self._fail_pending(f"the producer was re-created after an indefinite outcome: {cause}")
        self._fatal = None
        self.raw = self._new_raw() if self._config is not None else self._producer_factory()  # type: ignore[misc]
        self._init_transactions(accept_already_initialised=False)

    def _raise_if_fatal(self, operation: str) -> None:
        if self._fatal is not None:
            typed = kafka_error_to_exception(self._fatal, operation)
            self._close_after_fatal(typed)
            raise typed

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
        if not self._closed and self._in_txn:
            with contextlib.suppress(KafkaOperationError):
                self.abort_transaction(reason="closed")
        super().close(timeout)

    def __enter__(self) -> TransactionalProducer:
        return self


def wrap(producer_or_config: Mapping[str, Any] | Producer, **kwargs: Any) -> IdempotentProducer | TransactionalProducer:
    """The one-line entry point: a TransactionalProducer iff ``transactional.id`` is set, else an IdempotentProducer.

    For an existing Producer, whose config cannot be read, ``init_transactions`` is tried:
    it succeeds (or reports an already initialised producer) only when a ``transactional.id``
    is configured.
    """
    if isinstance(producer_or_config, Producer):
        try:
            return TransactionalProducer(producer_or_config, **kwargs)
        except ConfigError as exc:
            if exc.setting != "transactional.id":
                raise
            return IdempotentProducer(producer_or_config, **_idempotent_kwargs(kwargs))
    if producer_or_config.get("transactional.id"):
        return TransactionalProducer(producer_or_config, **kwargs)
    return IdempotentProducer(producer_or_config, **_idempotent_kwargs(kwargs))


def _idempotent_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    names = ("flush_timeout_s", "close_timeout_s", "event_ids")
    return {k: v for k, v in kwargs.items() if k in names}
