"""Kafka errors are classified in one place into retriable, abortable, fatal, fenced and indefinite."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from kcons import errors
from kcons.errors import ErrorClass, classify_kafka_error


def _err(code: int, *, fatal: bool = False, retriable: bool = False, txn_requires_abort: bool = False) -> KafkaError:
    return KafkaError(code, "test", fatal=fatal, retriable=retriable, txn_requires_abort=txn_requires_abort)


def test_fencing_wins_over_every_other_flag() -> None:
    err = _err(KafkaError._FENCED, fatal=True, retriable=True, txn_requires_abort=True)
    assert classify_kafka_error(err) is ErrorClass.FENCED
    assert classify_kafka_error(_err(KafkaError.PRODUCER_FENCED)) is ErrorClass.FENCED
    assert classify_kafka_error(_err(KafkaError.INVALID_PRODUCER_EPOCH)) is ErrorClass.FENCED


def test_fatal_errors_are_fatal() -> None:
    assert classify_kafka_error(_err(KafkaError._STATE, fatal=True)) is ErrorClass.FATAL


def test_abortable_beats_retriable() -> None:
    err = _err(KafkaError._TIMED_OUT, retriable=True, txn_requires_abort=True)
    assert classify_kafka_error(err) is ErrorClass.ABORTABLE


def test_timeout_at_transaction_end_is_an_indefinite_outcome() -> None:
    err = _err(KafkaError._TIMED_OUT, retriable=True)
    assert classify_kafka_error(err) is ErrorClass.RETRIABLE
    assert classify_kafka_error(err, in_transaction_end=True) is ErrorClass.INDEFINITE


def test_plain_errors_are_permanent() -> None:
    assert classify_kafka_error(_err(KafkaError.UNKNOWN_TOPIC_OR_PART)) is ErrorClass.PERMANENT


@pytest.mark.parametrize(
    ("err", "exc_type"),
    [
        (_err(KafkaError._FENCED, fatal=True), errors.ProducerFencedError),
        (_err(KafkaError._STATE, fatal=True), errors.FatalKafkaError),
        (_err(KafkaError._TRANSPORT, retriable=True), errors.RetriableKafkaError),
        (_err(KafkaError._TRANSPORT, txn_requires_abort=True), errors.AbortableTransactionError),
    ],
)
def test_raise_for_kafka_error_raises_the_typed_exception(err: KafkaError, exc_type: type[Exception]) -> None:
    with pytest.raises(exc_type) as info:
        errors.raise_for_kafka_error(KafkaException(err), "commit_transaction")
    assert isinstance(info.value, errors.KconsError)
    assert "commit_transaction" in str(info.value)


def test_fenced_is_a_fatal_error_so_callers_of_fatal_stop_too() -> None:
    assert issubclass(errors.ProducerFencedError, errors.FatalKafkaError)
    assert issubclass(errors.IndefiniteOutcomeError, errors.FatalKafkaError)
