"""How a batch's effects run: strategy objects for the consumer driver, and the handler's retry rule.

* :class:`PerMessage`: ``handler(msg)`` once per new message (at-least-once effects).
* :class:`PerBatch`: ``batch_handler(messages)`` once per batch with its new messages; a batch it
  fails on is retried one message at a time (``batch_handler([msg])``), so one bad message costs
  the batch's speed, never its neighbours (what the failed call applied is applied again).
* :class:`SameTransaction`: ``handler(msg, conn)`` in the caller's SQL database, the batch in one
  transaction and each message in a savepoint that first records its id done with the store's
  ``complete_in``: effect and dedup record commit together (exactly-once effects).

A strategy runs the batch's first pass (:meth:`Effects.first_pass`: the handler on every new
message at once, as far as it gets) and single attempts; :func:`run_plan` walks the batch's
:class:`~kcons.consumer.plan.BatchPlan` with them, under the retry policy. A handler raising
:class:`RetryLater` holds its partition (back-pressure); ``ClaimLostError`` holds it too (another
worker took the claim over); DecodeError and PoisonMessageError dead-letter the message at once;
any other error is retried, then dead-lettered.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import tenacity

from kcons.consumer.ids import reason
from kcons.consumer.plan import OK, BatchPlan, DeadLetter, Decision, Hold, Outcome
from kcons.dedup import ClaimLostError, TransactionalDedupStore
from kcons.errors import ConfigError, DecodeError, KconsError, PoisonMessageError

__all__ = [
    "BatchHandler",
    "Effects",
    "FirstPass",
    "Handler",
    "PerBatch",
    "PerMessage",
    "RetryLater",
    "SameTransaction",
    "default_retry_policy",
    "outcome_of",
    "run_plan",
]

log = logging.getLogger(__name__)

Handler = Callable[[Any], None]
#: ``batch_handler(messages)``: the effects of a batch's new messages, in consumption order.
BatchHandler = Callable[[list[Any]], None]


class RetryLater(KconsError):
    """Raised by a handler when a downstream is saturated: the message is put back and its partition paused.

    The message is not retried at once and not dead-lettered: the partition is rewound to it
    and paused for ``retry_after_s`` seconds (back-pressure), then consumed again.
    """

    def __init__(self, retry_after_s: float = 1.0, reason: str = "handler asked to retry later") -> None:
        self.retry_after_s = max(0.0, float(retry_after_s))
        super().__init__(reason)


_NOT_RETRIED = (DecodeError, PoisonMessageError, RetryLater, ClaimLostError)


def attempts_policy(attempts: int) -> tenacity.Retrying:
    """``attempts`` attempts, one right after the other; poison errors are not retried."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        retry=tenacity.retry_if_not_exception_type(_NOT_RETRIED),
        reraise=True,
    )


def default_retry_policy() -> tenacity.Retrying:
    """Three attempts with exponential backoff (0.1 s, 0.2 s, ... at most 2 s); poison errors are not retried."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
        retry=tenacity.retry_if_not_exception_type(_NOT_RETRIED),
        reraise=True,
    )


def outcome_of(exc: BaseException) -> Outcome:
    """A handler's final exception as a plan outcome: hold (retry later, claim lost) or dead-letter."""
    if isinstance(exc, RetryLater):
        return Hold(-1, exc.retry_after_s, "retry_later")
    if isinstance(exc, ClaimLostError):
        return Hold(-1, -1.0, "claim_lost")
    return DeadLetter(reason(exc))


class FirstPass(NamedTuple):
    """What the first pass over a batch's new messages did.

    The first ``ok`` messages' effects are done; ``error`` is what the next one's first attempt
    raised (None: not tried yet); ``answer``, when set, is every message's answer (a batch
    handler's RetryLater or ClaimLostError).
    """

    ok: int
    error: BaseException | None = None
    answer: Exception | None = None


_NOTHING_RAN = FirstPass(0)


class _NotCounted:
    """Stands in for a metric child until the driver binds its consumer group's."""

    def inc(self, amount: float = 1) -> None:
        """Count nothing."""


class Effects(abc.ABC):
    """A strategy for running a batch's effects (see the module docstring for the three kinds)."""

    #: Counter child of failed handler attempts; the driver binds its group's (ConsumerMetrics).
    handler_errors: Any = _NotCounted()

    #: A failed batch leaves no effect behind (its effects run in one transaction).
    atomic = False
    #: The driver writes the done records to the dedup store after the effects (else they commit with them).
    records_done = True
    #: An all-new batch may run through :meth:`first_pass` without a plan (the driver's fast path).
    fast_path = True

    def open(self) -> None:
        """Take what the effects need (a connection), once the consumer's settings are checked."""
        return None  # a hook: nothing to take by default

    def close(self) -> None:
        """Give back what :meth:`open` took."""
        return None  # a hook: nothing to give back by default

    def unit(self) -> contextlib.AbstractContextManager[Any]:
        """The unit of work around a batch's handlers (none: each effect is its own)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def first_pass(self, msgs: list[Any]) -> FirstPass:
        """Run the handler on ``msgs`` (a batch's new messages, in order) as far as it gets."""

    @abc.abstractmethod
    def attempt(self, msg: Any, event_id: str) -> None:
        """One attempt of one message's effect."""

    def outcome(self, msg: Any, event_id: str, retry: tenacity.Retrying, first: BaseException | None) -> Outcome:
        """The message's outcome under ``retry``; ``first`` is its first attempt's error when that already ran.

        An interrupt (not an Exception) propagates.
        """
        if first is None:
            try:
                self.attempt(msg, event_id)
                return OK
            except Exception as exc:
                first = exc
        if not isinstance(first, Exception):
            raise first
        if isinstance(first, (RetryLater, ClaimLostError)):
            return outcome_of(first)
        self.handler_errors.inc()
        if isinstance(first, (DecodeError, PoisonMessageError)):
            return DeadLetter(reason(first))
        # The first attempt counts as the policy's first: it is replayed, not run again.
        pending: list[BaseException] = [first]

        def again() -> None:
            if pending:
                raise pending.pop()
            try:
                self.attempt(msg, event_id)
            except Exception:
                self.handler_errors.inc()
                raise

        failure: BaseException
        try:
            retry(again)
            return OK
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            failure = last if last is not None else exc
        except Exception as exc:
            failure = exc
        return outcome_of(failure)


class PerMessage(Effects):
    """``handler(msg)`` once per new message; the all-new batch runs from C (``map``)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def first_pass(self, msgs: list[Any]) -> FirstPass:
        rest = iter(msgs)
        try:
            collections.deque(map(self.handler, rest), maxlen=0)
        except BaseException as exc:
            return FirstPass(len(msgs) - sum(1 for _ in rest) - 1, exc)  # ``rest`` stopped after the failed one
        return FirstPass(len(msgs))

    def attempt(self, msg: Any, event_id: str) -> None:
        self.handler(msg)


class PerBatch(Effects):
    """``batch_handler(messages)`` once per batch; a failed batch goes one message at a time.

    A RetryLater or ClaimLostError from the batch is every new message's answer: each partition
    is held at its first new message (nothing retried at once under back-pressure).
    """

    def __init__(self, batch_handler: BatchHandler) -> None:
        self.batch_handler = batch_handler

    def first_pass(self, msgs: list[Any]) -> FirstPass:
        try:
            self.batch_handler(msgs)
        except (RetryLater, ClaimLostError) as exc:
            return FirstPass(0, None, exc)
        except Exception as exc:
            self.handler_errors.inc()
            log.info("batch handler failed on %d messages (%s); one at a time now", len(msgs), reason(exc))
            return _NOTHING_RAN
        return FirstPass(len(msgs))

    def attempt(self, msg: Any, event_id: str) -> None:
        self.batch_handler([msg])


class SameTransaction(Effects):
    """``handler(msg, conn)`` and the dedup record commit in one transaction on the caller's database.

    Each batch runs in one transaction on ``conn`` (opened by the store's ``transaction``); each
    message in a savepoint that first records its id done with ``store.complete_in`` (which
    succeeds only while this worker still owns the claim) and then runs the handler. A failed
    attempt rolls back to the savepoint; a crash rolls back the whole batch, whose claims then
    expire after their lease. ``connection`` is the caller's connection (psycopg in autocommit
    mode, or sqlite3 on the store's file); or ``connect``, a factory called again when the
    connection breaks. Nothing is opened before :meth:`open`.
    """

    atomic = True
    records_done = False
    fast_path = False

    def __init__(
        self,
        handler: Callable[[Any, Any], None],
        store: TransactionalDedupStore,
        *,
        connection: Any = None,
        connect: Callable[[], Any] | None = None,
    ) -> None:
        if (connection is None) == (connect is None):
            raise ConfigError("connection", "pass exactly one of connection= or connect=")
        self.handler = handler
        self.store = store
        self._connect = connect
        self.connection = connection

    def open(self) -> None:
        if self.connection is None:
            assert self._connect is not None
            self.connection = self._connect()
        _check_autocommit(self.connection)

    @contextlib.contextmanager
    def _unit(self) -> Iterator[Any]:
        if self._connect is not None and _is_broken(self.connection):
            log.warning("the handler connection is broken; reconnecting")
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = self._connect()
            _check_autocommit(self.connection)
        with self.store.transaction(self.connection):
            yield self.connection

    def unit(self) -> contextlib.AbstractContextManager[Any]:
        return self._unit()

    def first_pass(self, msgs: list[Any]) -> FirstPass:
        return _NOTHING_RAN  # every message in its own savepoint

    def attempt(self, msg: Any, event_id: str) -> None:
        conn = self.connection
        with self.store.transaction(conn):
            self.store.complete_in(conn, [event_id])
            self.handler(msg, conn)


def effects_for(handler: Callable[[Any], Any] | None, effects: Effects | None) -> Effects:
    """The effect strategy of a consumer given ``handler=`` (one message at a time) or ``effects=``; exactly one."""
    if effects is None and handler is not None:
        return PerMessage(handler)
    if effects is None or handler is not None:
        raise ValueError("pass exactly one of handler or effects=")
    return effects


def run_plan(
    effects: Effects, plan: BatchPlan, msgs: list[Any], retry: tenacity.Retrying, first: FirstPass | None = None
) -> Decision:
    """Walk ``plan`` to its decision, running ``effects`` on each message it hands out.

    ``first``: a first pass already run over the plan's fresh messages (the fast path's); None
    runs it here. Messages the first pass applied are recorded OK without running again.
    """
    if first is None:
        fresh = plan.fresh()
        first = effects.first_pass([msgs[i] for i in fresh]) if fresh else _NOTHING_RAN
    ok, error, answer = first
    entries = plan.entries
    while (i := plan.next()) is not None:
        if ok:
            ok -= 1
            plan.record(OK)
        elif answer is not None:
            plan.record(outcome_of(answer))
        else:
            event_id = entries[i].event_id
            assert event_id is not None
            outcome = effects.outcome(msgs[i], event_id, retry, error)
            error = None
            plan.record(outcome)
    return plan.settle()


def _check_autocommit(conn: Any) -> None:
    # psycopg: kcons opens the transactions, so the connection must not open one implicitly.
    if hasattr(conn, "autocommit") and hasattr(conn, "info") and not conn.autocommit:
        raise ConfigError("connection", "a psycopg connection must be in autocommit mode (kcons opens transactions)")
    if getattr(conn, "in_transaction", False):
        raise ConfigError("connection", "the connection is inside an open transaction")


def _is_broken(conn: Any) -> bool:
    return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False))
