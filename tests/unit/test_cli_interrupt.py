"""interrupt_on_signals: the first signal unwinds the block with Interrupted; later ones cannot cut teardown."""

from __future__ import annotations

import os
import signal

import pytest

from kcons.cli.signals import Interrupted, interrupt_on_signals


def test_first_signal_raises_interrupted_later_ones_are_ignored_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    torn_down = []
    with pytest.raises(Interrupted) as caught, interrupt_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.01)  # let the handler run
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # during teardown: ignored
            torn_down.append(True)
    assert caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143
    assert torn_down == [True]
    assert signal.getsignal(signal.SIGTERM) == before
