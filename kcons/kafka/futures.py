"""DeliveryFuture: the outcome of one produced message, cheap enough to make one per message.

A standard ``concurrent.futures.Future`` builds a Condition and an RLock up front, which costs
more than the produce call it reports on, and most delivery futures are never waited on.
:class:`DeliveryFuture` is a small class of its own: until somebody waits, it only records the
outcome (three slots); the first call that waits or registers a callback (``result`` with the
outcome still unknown, ``add_done_callback``, ``cancel``, :meth:`~DeliveryFuture.as_future`) links
it to a standard ``concurrent.futures.Future``, which from then on holds the outcome. Nothing of
``concurrent.futures``' private machinery is touched, so its behaviour is the standard one on
every Python version.

``concurrent.futures.wait``/``as_completed`` and ``asyncio.wrap_future`` need a standard future:
pass them ``fut.as_future()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from confluent_kafka import KafkaError, Message

__all__ = ["DeliveryFuture"]

#: Guards the hand-over from the recorded outcome to the standard future (uncontended in practice).
_link_lock = threading.Lock()

Deliver = Callable[["DeliveryFuture", "KafkaError | None", Message], None]


class DeliveryFuture:
    """The delivery outcome of one message: the acknowledged Message, or the DeliveryError it failed with.

    Offers the methods of ``concurrent.futures.Future`` that callers use (``result``,
    ``exception``, ``done``, ``cancel``, ``cancelled``, ``running``, ``add_done_callback``,
    ``set_result``, ``set_exception``), with the same semantics, and :meth:`as_future` for
    APIs that need a real ``concurrent.futures.Future`` (``wait``, ``as_completed``,
    ``asyncio.wrap_future``). Thread-safe: the outcome may be set from the delivery thread
    while other threads wait.

    It is also the message's delivery callback (``__call__(err, msg)``), so a produced message
    allocates one object, not a future plus a closure.
    """

    __slots__ = ("_deliver", "_done", "_exception", "_future", "_result")

    def __init__(self, deliver: Deliver | None = None) -> None:
        self._done = False
        self._result: Message | None = None
        self._exception: BaseException | None = None
        self._deliver = deliver
        self._future: Future[Message] | None = None  # the standard future, once something waits

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        """confluent-kafka's delivery callback for this message: hand the report to the producer (once)."""
        deliver, self._deliver = self._deliver, None  # let the producer go once delivered
        if deliver is not None:
            deliver(self, err, msg)

    def release(self) -> None:
        """Drop the link to the producer (it failed this future without a report, or closed)."""
        self._deliver = None

    def __repr__(self) -> str:
        if self._future is not None:
            return f"<DeliveryFuture {self._future!r}>"
        state = "pending" if not self._done else ("failed" if self._exception is not None else "delivered")
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
                    if self._done:
                        if self._exception is not None:
                            fut.set_exception(self._exception)
                        else:
                            fut.set_result(self._result)  # type: ignore[arg-type]
                    self._future = fut
        return fut

    # outcome ---------------------------------------------------------------------------

    def set_result(self, result: Message) -> None:
        """Record the acknowledged message; InvalidStateError when the outcome is already set or cancelled."""
        with _link_lock:
            fut = self._future
            if fut is None:
                if self._done:
                    raise InvalidStateError("the delivery future is already done")
                self._result = result
                self._done = True
                return
        fut.set_result(result)

    def set_exception(self, exception: BaseException) -> None:
        """Record the failure; InvalidStateError when the outcome is already set or cancelled."""
        with _link_lock:
            fut = self._future
            if fut is None:
                if self._done:
                    raise InvalidStateError("the delivery future is already done")
                self._exception = exception
                self._done = True
                return
        fut.set_exception(exception)

    def done(self) -> bool:
        """Whether the outcome is known (or the future was cancelled)."""
        fut = self._future
        return self._done if fut is None else fut.done()

    def result(self, timeout: float | None = None) -> Message:
        """The acknowledged message; raises the delivery failure, TimeoutError, or CancelledError."""
        if self._future is None and self._done:
            if self._exception is not None:
                raise self._exception
            return self._result  # type: ignore[return-value]
        return self.as_future().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The delivery failure, or None when delivered; TimeoutError or CancelledError like ``result``."""
        if self._future is None and self._done:
            return self._exception
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

