"""The kcons error hierarchy, and the classification of a failed Kafka client call.

What kcons raises because an operation failed (a setting, a store, a decode, a Kafka call, a
lost lease, a time bound) derives from :class:`KconsError`, so callers can catch the whole
family at once and still tell the kinds apart by subclass. :class:`ConfigError` is also a
``ValueError`` and :class:`TimeoutExceededError` a ``TimeoutError``, so code written against
the builtin kinds keeps working. Calling an API wrongly (an argument of the wrong type or out of
range for a low-level helper, a step out of order in a state machine) still raises the builtin
``ValueError``, ``TypeError`` or ``RuntimeError`` where it is detected; settings a user writes
are checked by :mod:`kcons.config` and fail with ``ConfigError`` naming the setting. The Raft
errors (:mod:`kcons.raft.errors`) are children of ``KconsError`` too.

:func:`classify_kafka_error` decides how a failed *call* (produce, flush, commit, a transaction
step) must be handled, as one :class:`ErrorClass`: retriable (retry, bounded), abortable (abort
the transaction and re-run the unit of work), fenced (another instance took over: stop, never
retry), fatal (the client is broken: recreate it), indefinite (a transaction end timed out, its
outcome is unknown) or permanent (report it). :func:`kafka_error_to_exception` and
:func:`raise_for_kafka_error` turn that class into the matching exception type. What an error
or end-of-partition event *inside a consumed batch* means is decided once, in
:func:`kcons.kafka.messages.check_consumed`, which classifies with this module.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "POISON_RECORD_ERRORS",
    "AbortableTransactionError",
    "ConfigError",
    "DecodeError",
    "DeliveryError",
    "ErrorClass",
    "FatalKafkaError",
    "IndefiniteOutcomeError",
    "KafkaOperationError",
    "KconsError",
    "LeadershipLostError",
    "PoisonMessageError",
    "ProducerFencedError",
    "RetriableKafkaError",
    "ServiceStartError",
    "SinkConnectionError",
    "SinkError",
    "SinkRowError",
    "SinkUnavailableError",
    "StoreError",
    "TimeoutExceededError",
    "classify_kafka_error",
    "is_poison_record_error",
    "raise_for_kafka_error",
]


class KconsError(Exception):
    """Root of every error kcons raises."""


class ConfigError(KconsError, ValueError):
    """A setting is missing or invalid; raised at start, names the setting, never its secret."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"invalid setting {setting}: {problem}")


class ServiceStartError(KconsError):
    """A test service (Kafka, Redis, PostgreSQL) could not be installed or started."""


class TimeoutExceededError(KconsError, TimeoutError):
    """A blocking step did not finish within its bound."""


class StoreError(KconsError):
    """A dedup, outbox, cache or lease store failed."""


class DecodeError(KconsError):
    """A message could not be decoded; it is a poison message and goes to the dead-letter topic."""


class PoisonMessageError(KconsError):
    """A message kept failing after its last attempt; it goes to the dead-letter topic."""

    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        self.reason = reason
        super().__init__(reason)
        if cause is not None:
            self.__cause__ = cause


class SinkError(KconsError):
    """An outbox sink (the broker the relay publishes to) did not confirm a batch."""


class SinkUnavailableError(SinkError):
    """The sink could not confirm the batch for now (connection, broker nack, unroutable): retry it whole."""


class SinkConnectionError(SinkUnavailableError):
    """The broker cannot be reached or dropped the connection: the relay reconnects until it is back.

    Unlike the other unavailable errors it has no retry bound: every replica would fail alike, so
    exiting would only turn a broker restart into a relay crash. Nothing of the batch is marked.
    """


class SinkRowError(SinkError):
    """One row can never be published by this sink (e.g. larger than the broker accepts).

    ``event_id`` is the row's ``kcons-id``, ``index`` its place in the batch; no row of the batch
    counts as published.
    """

    def __init__(self, event_id: str, index: int, reason: str) -> None:
        self.event_id = event_id
        self.index = index
        self.reason = reason
        super().__init__(f"row {event_id} (batch index {index}) cannot be published: {reason}")


class ErrorClass(enum.Enum):
    """How a Kafka error must be handled."""

    RETRIABLE = "retriable"
    ABORTABLE = "abortable"
    FATAL = "fatal"
    FENCED = "fenced"
    INDEFINITE = "indefinite"
    PERMANENT = "permanent"


class KafkaOperationError(KconsError):
    """A Kafka client call failed; ``error_class`` says how it must be handled."""

    error_class: ErrorClass = ErrorClass.PERMANENT

    def __init__(self, message: str, *, code: int | None = None, name: str | None = None) -> None:
        self.code = code
        self.name = name
        super().__init__(message)


class RetriableKafkaError(KafkaOperationError):
    """Transient: the same call may succeed if retried (bounded, with backoff)."""

    error_class = ErrorClass.RETRIABLE


class AbortableTransactionError(KafkaOperationError):
    """The open transaction must be aborted; the unit of work may then be re-run."""

    error_class = ErrorClass.ABORTABLE


class FatalKafkaError(KafkaOperationError):
    """The client is broken; close it and create a new one. Never retried blindly."""

    error_class = ErrorClass.FATAL


class ProducerFencedError(FatalKafkaError):
    """Another producer with the same transactional.id took over; this one must stop."""

    error_class = ErrorClass.FENCED


class LeadershipLostError(KafkaOperationError):
    """This relay is no longer the leader (lease lost, fenced token, or fenced producer); it must stop publishing."""

    error_class = ErrorClass.FENCED


class IndefiniteOutcomeError(FatalKafkaError):
    """A commit or abort timed out: its outcome is unknown, so the producer is re-initialised."""

    error_class = ErrorClass.INDEFINITE


class DeliveryError(KafkaOperationError):
    """A produced message was not acknowledged by the broker."""


# Error names (confluent_kafka.KafkaError.name()) that mean this producer instance is fenced.
_FENCED_NAMES = frozenset(
    {
        "_FENCED",
        "PRODUCER_FENCED",
        "INVALID_PRODUCER_EPOCH",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    }
)
_TIMEOUT_NAMES = frozenset({"_TIMED_OUT", "REQUEST_TIMED_OUT", "_TIMED_OUT_QUEUE"})

_CLASS_TO_EXC: dict[ErrorClass, type[KafkaOperationError]] = {
    ErrorClass.RETRIABLE: RetriableKafkaError,
    ErrorClass.ABORTABLE: AbortableTransactionError,
    ErrorClass.FATAL: FatalKafkaError,
    ErrorClass.FENCED: ProducerFencedError,
    ErrorClass.INDEFINITE: IndefiniteOutcomeError,
    ErrorClass.PERMANENT: KafkaOperationError,
}


def classify_kafka_error(err: Any, *, in_transaction_end: bool = False, in_transaction: bool = False) -> ErrorClass:
    """Return how ``err`` (a ``confluent_kafka.KafkaError``) must be handled.

    ``in_transaction_end`` marks errors from ``commit_transaction``/``abort_transaction``:
    there a timeout means the outcome is unknown, which is handled by re-initialising.
    Fencing is checked before everything else because a fenced producer must never retry.
    ``in_transaction`` marks errors raised while a transaction is open: there librdkafka's
    ``_STATE`` from ``produce`` means the transaction already failed, which is abortable.
    """
    name = str(err.name())
    if name in _FENCED_NAMES:
        return ErrorClass.FENCED
    if err.fatal():
        return ErrorClass.FATAL
    if in_transaction_end and name in _TIMEOUT_NAMES:
        return ErrorClass.INDEFINITE
    if in_transaction and name == "_STATE":
        return ErrorClass.ABORTABLE
    if err.txn_requires_abort():
        return ErrorClass.ABORTABLE
    if err.retriable():
        return ErrorClass.RETRIABLE
    return ErrorClass.PERMANENT


def kafka_error_to_exception(
    err: Any, operation: str, *, in_transaction_end: bool = False, in_transaction: bool = False
) -> KafkaOperationError:
    """Build the typed kcons exception for ``err`` raised by ``operation``."""
    cls = classify_kafka_error(err, in_transaction_end=in_transaction_end, in_transaction=in_transaction)
    exc_type = _CLASS_TO_EXC[cls]
    return exc_type(f"{operation} failed: {err.str()} ({err.name()})", code=err.code(), name=err.name())


def raise_for_kafka_error(
    exc: BaseException, operation: str, *, in_transaction_end: bool = False, in_transaction: bool = False
) -> None:
    """Re-raise a ``confluent_kafka.KafkaException`` as the typed kcons exception."""
    err = exc.args[0] if exc.args else None
    if err is None or not hasattr(err, "txn_requires_abort"):
        raise KafkaOperationError(f"{operation} failed: {exc}") from exc
    raise kafka_error_to_exception(
        err, operation, in_transaction_end=in_transaction_end, in_transaction=in_transaction
    ) from exc


#: Kafka errors (``KafkaError.name()``) that one record causes and that retrying cannot cure: the
#: record is too large for the topic or the client, the topic name is invalid, or the broker
#: rejects the record itself. A batch that fails with one of them holds a *poison* record.
POISON_RECORD_ERRORS = frozenset(
    {
        "MSG_SIZE_TOO_LARGE",
        "RECORD_LIST_TOO_LARGE",
        "INVALID_RECORD",
        "TOPIC_EXCEPTION",
        "INVALID_TOPIC_EXCEPTION",
        "_INVALID_ARG",
    }
)


def is_poison_record_error(exc: BaseException) -> bool:
    """True when ``exc`` is a Kafka failure caused by one record and permanent (see POISON_RECORD_ERRORS).

    Transient failures (broker down, timeouts, an abortable transaction for another reason,
    an unknown topic that may yet be created) are not poison: they are retried, never dead-lettered.
    """
    while exc is not None:
        if isinstance(exc, SinkRowError):  # another sink's word for the same thing
            return True
        if isinstance(exc, KafkaOperationError) and exc.name in POISON_RECORD_ERRORS:
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False
