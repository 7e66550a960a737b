"""``stop_on_signals``: signals call ``stop()`` while the block runs, and the previous handlers come back."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

import pytest

from kcons.cli.signals import stop_on_signals


class _Runner:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


def _mine(_signum: int, _frame: FrameType | None) -> None:
    """A handler that is recognisably not the one stop_on_signals installs."""


def test_a_signal_stops_every_runner_and_the_previous_handler_comes_back() -> None:
    first, second = _Runner(), _Runner()
    before = signal.signal(signal.SIGUSR1, _mine)
    try:
        with stop_on_signals(first, second, signals=(signal.SIGUSR1,)):
            assert signal.getsignal(signal.SIGUSR1) is not _mine
            os.kill(os.getpid(), signal.SIGUSR1)
        assert (first.stops, second.stops) == (1, 1)
        assert signal.getsignal(signal.SIGUSR1) is _mine
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_sigterm_and_sigint_are_the_default_signals_and_are_restored_after_an_exception() -> None:
    runner = _Runner()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RuntimeError, match="boom"), stop_on_signals(runner):
        assert all(signal.getsignal(sig) is not previous[sig] for sig in previous)
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("boom")
    assert runner.stops == 1
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


def test_a_previous_handler_not_installed_from_python_is_restored_as_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``signal.signal`` returns None for a handler installed outside Python (an embedding program).

    That cannot be produced from a Python test process, so the first ``signal.signal`` call is made
    to report it; passing that None back to ``signal.signal`` raised TypeError before.
    """
    real = signal.signal
    before = real(signal.SIGUSR2, _mine)
    calls: list[Any] = []

    def reports_a_foreign_handler(sig: int, handler: Any) -> Any:
        calls.append(handler)
        previous = real(sig, handler)
        return None if len(calls) == 1 else previous

    monkeypatch.setattr(signal, "signal", reports_a_foreign_handler)
    try:
        with stop_on_signals(_Runner(), signals=(signal.SIGUSR2,)):
            pass
        assert calls[-1] is signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        real(signal.SIGUSR2, before)
