"""SIGTERM/SIGINT -> ``stop()``: the one place kcons installs signal handlers.

Library classes (consumers, processors, relays, invalidators) only offer a ``stop()`` that is
safe to call from a signal handler; a program decides which signals stop what. A library user's
own program does the same in one line::

    with stop_on_signals(consumer):
        consumer.run()
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, Protocol, TypeAlias

__all__ = ["Interrupted", "Stoppable", "interrupt_on_signals", "stop_on_signals"]

log = logging.getLogger(__name__)

_Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Stoppable(Protocol):
    """Anything with a ``stop()`` that asks it to finish its current step and return."""

    def stop(self) -> None: ...


@contextlib.contextmanager
def _handling(signals: Iterable[signal.Signals], handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Install ``handler`` for ``signals``; put the previous handlers back (``None`` as ``SIG_DFL``) on exit."""
    previous: list[tuple[signal.Signals, _Handler]] = []
    try:
        for sig in dict.fromkeys(signals):
            previous.append((sig, signal.signal(sig, handler)))
        yield
    finally:
        for sig, old in reversed(previous):
            signal.signal(sig, signal.SIG_DFL if old is None else old)


@contextlib.contextmanager
def stop_on_signals(
    *stoppables: Stoppable, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
) -> Iterator[None]:
    """While the block runs, each of ``signals`` calls ``stop()`` on every stoppable, in order.

    The handlers in place before are restored on exit, whatever the block raised. A previous
    handler that was not installed from Python (``signal.getsignal`` gives ``None``) cannot be
    put back as it was; the default action (``SIG_DFL``) is restored in its place. Must be entered
    in the main thread, as :func:`signal.signal` requires.
    """
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        for stoppable in stoppables:
            stoppable.stop()

    with _handling(signals, on_signal):
        yield


class Interrupted(BaseException):
    """Raised in the main thread by :func:`interrupt_on_signals`: unwind, running every ``finally``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal (128 + its number)."""
        return 128 + self.signum


@contextlib.contextmanager
def interrupt_on_signals(
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[None]:
    """While the block runs, the first of ``signals`` raises :class:`Interrupted` in the main thread.

    For commands that own children and temporary files (``kcons demo``): the exception unwinds
    through their ``finally`` blocks and context managers, which stop what they started. Later
    signals are logged and ignored, so a second Ctrl-C cannot cut the teardown short. The
    previous handlers are restored on exit, as :func:`stop_on_signals` does.
    """
    fired: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if fired:
            log.warning("%s: already stopping", signal.Signals(signum).name)
            return
        fired.append(signum)
        raise Interrupted(signum)

    with _handling(signals, on_signal):
        yield
