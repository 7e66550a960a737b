"""DeliveryFuture: the outcome of one produced message, cheap enough to make one per message.

A standard ``concurrent.futures.Future`` builds a Condition and an RLock up front, which costs
more than the produce call it reports on, and most delivery futures are never waited on.
:class:`DeliveryFuture` is a small class of its own: until somebody waits, it only records the
outcome in a slot; the first call that waits or registers a callback (``result`` with the
outcome still unknown, ``add_done_callback``, ``cancel``, :meth:`~DeliveryFuture.as_future`) links
it to a standard ``concurrent.futures.Future``, which from then on holds the outcome. Nothing of
``concurrent.futures``' private machinery is touched, so its behaviour is the standard one on
every Python version.

A future made by a producer is registered in the producer's :class:`DeliveryTracker` and is
itself the message's delivery callback. Whoever takes it out of the tracker's pending set (an
atomic ``set.remove``/``set.pop``) settles it: the delivery report, or the producer failing
what is still pending (abort, close, re-creation). So every such future completes exactly once,
and once settled only its caller holds it: a future nobody keeps is freed with its report.

A delivered future keeps no delivery report: it records the report's partition, offset and
timestamp next to what was produced (topic, key, value, headers), and :meth:`~DeliveryFuture.result`
builds the ``Message`` from them once, on first use, and returns that same object from then on.
Its ``value()`` is the object passed to ``produce`` when that was ``bytes`` (a ``str`` value or key
is returned UTF-8 encoded, as Kafka stores it), ``headers()`` are the headers as sent (``kcons-id``
included) in the list-of-tuples form a consumer reads (``produce`` keeps a copy of a caller's
list or dict, which the caller may reuse at once), and ``latency()`` and ``leader_epoch()`` are None.
Keeping many futures thus keeps one small object per message and no second copy of any payload.

``concurrent.futures.wait``/``as_completed`` and ``asyncio.wrap_future`` need a standard future:
pass them ``fut.as_future()``.

When the package's optional C extension ``kcons.kafka._speedups`` is built, ``DeliveryFuture`` is
its type: the same slots and methods (copied from the Python class below), with the delivery
callback in C, and ``DeliveryTracker`` keeps its fields in C; the producers then also produce
through the extension (:mod:`kcons.kafka.producer`). A future that holds only atoms (str, bytes,
ints) and a weak reference to its tracker is not tracked by the garbage collector, so keeping many
futures costs no collection time; anything that may hold a container tracks it.
``KCONS_PURE_PYTHON=1`` in the environment keeps the Python classes. :data:`ACCELERATED` says
which ones are in use.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, Message

from kcons._native import load
from kcons.envelope import HEADER_ID
from kcons.errors import DeliveryError

__all__ = ["ACCELERATED", "CallbackDeliveryFuture", "DeliveryFuture", "DeliveryTracker"]


#: The interface version of kcons.kafka._speedups this module is written for (its ``API`` constant).
SPEEDUPS_API = 4
#: kcons.kafka._speedups, or None (see the module docstring and kcons._native).
speedups: Any = load("kcons.kafka._speedups", SPEEDUPS_API)
# DeliveryTracker's base and its pending container: the C ones when the extension is in use.
if TYPE_CHECKING:
    _TrackerBase = object
else:
    _TrackerBase = object if speedups is None else speedups.TrackerBase
#: A new, empty pending container: a set, or the C PendingSet (the same operations, linked through the futures).
_new_pending: Callable[[], set[DeliveryFuture]] = set if speedups is None else speedups.PendingSet

#: Guards the hand-over from the recorded outcome to the standard future, and the one-time
#: building of a delivered future's Message (uncontended in practice).
_link_lock = threading.Lock()

#: The outcome slot of a future whose outcome is not known yet.
_UNSET: Any = object()
#: The outcome slot of a future delivered whose Message is not built yet (partition, offset and
#: timestamp are in their slots).
_DELIVERED: Any = object()

#: A user's delivery callback, as confluent-kafka calls it.
DeliveryCallback = Callable[["KafkaError | None", Message], None]
#: What a tracker does with a report that is not a plain success: ``(future, err, msg, user callback)``.
Report = Callable[["DeliveryFuture", "KafkaError | None", Message, "DeliveryCallback | None"], None]
#: Headers as a future keeps them: as passed to ``produce``, or only the ``kcons-id`` value
#: (bytes) when that was the one header (what the producer's fast path sends).
KeptHeaders = bytes | Mapping[str, "bytes | str | None"] | Iterable[tuple[str, "bytes | str | None"]] | None


class _Failed:
    """The recorded outcome of a failed delivery (distinct from any message a future can hold)."""

    __slots__ = ("exception",)

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception


def _as_stored(data: Any) -> bytes | None:
    """A key or value as Kafka stores it: bytes kept as they are, str UTF-8 encoded, other buffers copied."""
    if data is None or type(data) is bytes:
        return data
    if isinstance(data, str):
        return data.encode()
    return bytes(data)


def _as_read(headers: KeptHeaders) -> list[tuple[str, bytes | str | None]] | None:
    """Headers as a consumer reads them back: a list of ``(name, bytes or None)``, None when there were none."""
    if headers is None:
        return None
    if isinstance(headers, bytes):
        return [(HEADER_ID, headers)]
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: list[tuple[str, bytes | str | None]] = [
        (name, value.encode() if isinstance(value, str) else value) for name, value in items
    ]
    return out or None


def _publish(outcome: Any, fut: Future[Message]) -> None:
    """Copy a recorded outcome into the linked standard future; a second copy or a cancelled one is ignored."""
    try:
        if type(outcome) is _Failed:
            fut.set_exception(outcome.exception)
        else:
            fut.set_result(outcome)
    except InvalidStateError:
        pass


class DeliveryTracker(_TrackerBase):
    """The futures of one producer still waiting for their delivery report, and the successes not yet counted.

    ``on_report(future, err, msg, callback)`` receives every report that is not a plain success
    (a failure, or a message produced with a user delivery callback) after the future was taken
    out of ``pending``; it must settle the future (:meth:`DeliveryFuture.settle`).
    """

    # The fields are TrackerBase's when the C extension is in use.
    __slots__ = ("delivered", "on_report", "pending") if _TrackerBase is object else ()

    def __init__(self, on_report: Report) -> None:
        self.pending: set[DeliveryFuture] = _new_pending()
        self.delivered = 0
        self.on_report = on_report

    def fail_pending(self, make_error: Callable[[], BaseException]) -> int:
        """Fail every future still pending with ``make_error()``; returns how many. Later reports are ignored."""
        pending, self.pending = self.pending, _new_pending()
        failed = 0
        while True:
            try:
                fut = pending.pop()  # atomic: a report racing in takes the future, or finds it gone
            except KeyError:
                return failed
            fut.settle(None, make_error())
            failed += 1


class DeliveryFuture:
    """The delivery outcome of one message: the acknowledged Message, or the DeliveryError it failed with.

    Offers the methods of ``concurrent.futures.Future`` that callers use (``result``,
    ``exception``, ``done``, ``cancel``, ``cancelled``, ``running``, ``add_done_callback``,
    ``set_result``, ``set_exception``), with the same semantics, and :meth:`as_future` for
    APIs that need a real ``concurrent.futures.Future`` (``wait``, ``as_completed``,
    ``asyncio.wrap_future``). Thread-safe: the outcome may be set from the delivery thread
    while other threads wait.

    It is also the message's delivery callback (``__call__(err, msg)``), so a produced message
    allocates one object, not a future plus a closure. A message with a user delivery callback
    gets a :class:`CallbackDeliveryFuture` instead. ``topic``, ``value``, ``key`` and ``headers``
    are what was produced: the Message that ``result()`` returns is built from them and the report.
    """

    __slots__ = (
        "_future",
        "_headers",
        "_key",
        "_offset",
        "_outcome",
        "_partition",
        "_timestamp",
        "_timestamp_type",
        "_topic",
        "_tracker",
        "_value",
    )

    def __init__(
        self,
        tracker: DeliveryTracker | None = None,
        value: object = None,
        topic: str | None = None,
        key: object = None,
        headers: KeptHeaders = None,
    ) -> None:
        self._tracker = tracker
        self._topic = topic
        self._value = value
        self._key = key
        self._headers = headers
        self._outcome: Any = _UNSET
        self._future: Future[Message] | None = None  # the standard future, once something waits

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        """confluent-kafka's delivery callback for this message: settle it, unless it was failed already."""
        tracker = self._tracker
        if tracker is None:
            return
        try:
            tracker.pending.remove(self)  # the claim: exactly one of the report and fail_pending settles
        except KeyError:
            return
        except BaseException:
            # confluent-kafka runs callbacks with a fatal error still pending after it raised it in the
            # same poll: then every C call fails, this one included (the future may be out of the set).
            # Within this handler calls work again: settle here, then pass the error on.
            tracker.pending.discard(self)
            self._report(tracker, err, msg)
            raise
        if err is None:
            # Only what the report adds is kept; the report itself is freed on return.
            try:
                self._partition = msg.partition()
                self._offset = msg.offset()
                self._timestamp_type, self._timestamp = msg.timestamp()
            except BaseException:
                # An unreadable report: the future is settled (failed), and this error passed on.
                with contextlib.suppress(Exception):
                    self._report(tracker, err, msg)
                raise
            self._tracker = None  # let the producer go once delivered
            tracker.delivered += 1
            self._outcome = _DELIVERED
            # A waiter links after writing _future and reads _outcome after: one of the two sees the other.
            if self._future is not None:
                self._publish_delivered()
        else:
            self._report(tracker, err, msg)

    def _report(self, tracker: DeliveryTracker, err: KafkaError | None, msg: Message) -> None:
        """Settle the claimed future through the tracker; a report the tracker fails to handle fails the future."""
        try:
            tracker.on_report(self, err, msg, self._user_callback())
        finally:
            if self._outcome is _UNSET:  # on_report raised before settling it (e.g. called in the bad state)
                self.settle(None, DeliveryError(f"the delivery report could not be handled: {err}"))

    def _user_callback(self) -> DeliveryCallback | None:
        """The user's delivery callback of this message (only a CallbackDeliveryFuture has one)."""
        return None

    def settle(self, result: Message | None, exception: BaseException | None = None) -> None:
        """Record the outcome of a future its caller took out of the tracker (a cancelled future ignores it).

        A successful delivery report ``result`` is recorded as in ``__call__``: its partition,
        offset and timestamp, not the report itself.
        """
        self._tracker = None
        if exception is None and result is not None:
            if type(self._value) is bytes:
                result.set_value(self._value)  # a user callback given the report sees the produced bytes too
            self._partition = result.partition()
            self._offset = result.offset()
            self._timestamp_type, self._timestamp = result.timestamp()
            self._outcome = _DELIVERED
        else:
            self._value = self._key = self._headers = None  # a failed future holds nothing it was given
            self._outcome = _Failed(exception if exception is not None else DeliveryError("no delivery report"))
        if self._future is not None:
            self._publish_delivered()

    def _publish_delivered(self) -> None:
        """Copy the outcome into the linked standard future (building the Message first)."""
        with _link_lock:
            outcome = self._built_locked()
            fut = self._future
        if fut is not None:
            _publish(outcome, fut)

    def _built_locked(self) -> Any:
        """The outcome, with a delivered future's Message built and cached first; ``_link_lock`` is held."""
        outcome = self._outcome
        if outcome is _DELIVERED:
            outcome = self._outcome = Message(
                self._topic,
                self._partition,
                self._offset,
                _as_stored(self._key),
                _as_stored(self._value),
                _as_read(self._headers),
                None,
                (self._timestamp_type, self._timestamp),
            )
        return outcome

    def _known(self) -> Any:
        """The outcome, with a delivered future's Message built (once) if it was not yet."""
        outcome = self._outcome
        if outcome is _DELIVERED:
            with _link_lock:
                outcome = self._built_locked()
        return outcome

    def __repr__(self) -> str:
        if self._future is not None:
            return f"<DeliveryFuture {self._future!r}>"
        outcome = self._outcome
        state = "pending" if outcome is _UNSET else ("failed" if type(outcome) is _Failed else "delivered")
        return f"<DeliveryFuture {state}>"

    # the standard future, made on demand -----------------------------------------------

    def as_future(self) -> Future[Message]:
        """The standard ``concurrent.futures.Future`` holding this outcome (the same one on every call).

        For ``concurrent.futures.wait``/``as_completed`` and ``asyncio.wrap_future``;
        cancelling it cancels this future.
        """
        fut = self._future
        if fut is None:
            with _link_lock:
                fut = self._future
                if fut is None:
                    fut = Future()
                    self._future = fut  # first: a report settling now sees it (see __call__)
                    outcome = self._built_locked()
                    if outcome is not _UNSET:
                        _publish(outcome, fut)
        return fut

    # outcome ---------------------------------------------------------------------------

    def _set(self, outcome: Any) -> None:
        with _link_lock:
            tracker = self._tracker
            if tracker is not None:
                try:
                    tracker.pending.remove(self)
                except KeyError:
                    raise InvalidStateError("the delivery future is already done") from None
                self._tracker = None
            fut = self._future
            if fut is None:
                if self._outcome is not _UNSET:
                    raise InvalidStateError("the delivery future is already done")
                self._outcome = outcome
                return
        if type(outcome) is _Failed:
            fut.set_exception(outcome.exception)
        else:
            fut.set_result(outcome)

    def set_result(self, result: Message) -> None:
        """Record the acknowledged message; InvalidStateError when the outcome is already set or cancelled."""
        self._set(result)

    def set_exception(self, exception: BaseException) -> None:
        """Record the failure; InvalidStateError when the outcome is already set or cancelled."""
        self._set(_Failed(exception))

    def done(self) -> bool:
        """Whether the outcome is known (or the future was cancelled)."""
        fut = self._future
        return self._outcome is not _UNSET if fut is None else fut.done()

    def result(self, timeout: float | None = None) -> Message:
        """The acknowledged message, the same object on every call.

        Raises the delivery failure, TimeoutError or CancelledError.
        """
        if self._future is None:
            outcome = self._known()
            if outcome is not _UNSET:
                if type(outcome) is _Failed:
                    raise outcome.exception
                return outcome  # type: ignore[no-any-return]
        return self.as_future().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The delivery failure, or None when delivered; TimeoutError or CancelledError like ``result``."""
        if self._future is None:
            outcome = self._outcome
            if outcome is not _UNSET:
                return outcome.exception if type(outcome) is _Failed else None
        return self.as_future().exception(timeout)

    def add_done_callback(self, fn: Callable[[DeliveryFuture], object]) -> None:
        """Call ``fn(self)`` once the outcome is known (at once when it is); exceptions from ``fn`` are logged."""
        self.as_future().add_done_callback(lambda _fut: fn(self))

    def cancel(self) -> bool:
        """Cancel while the outcome is unknown (the message may still be delivered; its outcome is then dropped)."""
        return self.as_future().cancel()

    def cancelled(self) -> bool:
        """Whether the future was cancelled."""
        fut = self._future
        return False if fut is None else fut.cancelled()

    def running(self) -> bool:
        """Always False: a delivery is either pending or done (as for a Future nobody runs)."""
        fut = self._future
        return False if fut is None else fut.running()


#: The Python DeliveryFuture (the one in use unless the C type is; tests run both).
PyDeliveryFuture = DeliveryFuture
#: Attributes of the Python class that the C type has of its own (layout, construction, callback).
_C_OWN = frozenset({"__init__", "__call__", "__slots__", "__dict__", "__weakref__", "__module__", "__qualname__"})


def _c_future_type() -> tuple[type[DeliveryFuture], Callable[..., DeliveryFuture]] | None:
    """The C DeliveryFuture type with the Python class's methods, and its fast constructor; None when not built."""
    if speedups is None:
        return None
    ctype: type[DeliveryFuture] = speedups.make_type(_UNSET, _DELIVERED)
    for name, attr in vars(PyDeliveryFuture).items():
        if name not in _C_OWN and not isinstance(attr, types.MemberDescriptorType):
            setattr(ctype, name, attr)
    ctype.__slots__ = PyDeliveryFuture.__slots__  # what the getters mirror
    return ctype, speedups.new_future


_C = _c_future_type()
#: Whether DeliveryFuture and DeliveryTracker are the C types (kcons.kafka._speedups) rather than the Python classes.
ACCELERATED = _C is not None
#: ``new_future(tracker, value, topic, key, headers)``: a pending C DeliveryFuture in one call (what
#: produce() makes per message); None with the Python class.
new_future: Callable[[DeliveryTracker, object, str, object, KeptHeaders], DeliveryFuture] | None = None
if not TYPE_CHECKING and _C is not None:
    DeliveryFuture, new_future = _C


class CallbackDeliveryFuture(DeliveryFuture):
    """A DeliveryFuture whose message has a user delivery callback: each report goes to the tracker.

    The tracker's ``on_report`` settles the future, then calls the callback once.
    """

    __slots__ = ("_callback",)

    def __init__(
        self,
        tracker: DeliveryTracker | None,
        value: object,
        callback: DeliveryCallback,
        topic: str | None = None,
        key: object = None,
        headers: KeptHeaders = None,
    ) -> None:
        super().__init__(tracker, value, topic, key, headers)
        self._callback = callback

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        """confluent-kafka's delivery callback: claim the future, then the tracker settles it and calls back."""
        tracker = self._tracker
        if tracker is None:
            return
        try:
            tracker.pending.remove(self)
        except KeyError:
            return
        except BaseException:  # see DeliveryFuture.__call__
            tracker.pending.discard(self)
            self._report(tracker, err, msg)
            raise
        self._report(tracker, err, msg)

    def _user_callback(self) -> DeliveryCallback | None:
        return self._callback
