"""CI slice of the producer futures fault run: aborted and committed transactions, every future checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "fault" / "producer_futures.py"


def test_quick_producer_futures_run_settles_every_future_at_the_records_position(kafka_bootstrap: str) -> None:
    env = {**os.environ, "KCONS_KAFKA_BOOTSTRAP": kafka_bootstrap}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--abort-p", "0.3", "--seed", "7"],  # seed: a fixed set of aborts
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result; stderr tail:\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["ok"] is True, result
    assert result["app_aborts"] >= 1 and result["committed"] == result["sent"] == 3000
    assert (result["lost"], result["duplicates"], result["unsettled"], result["mismatched"]) == (0, 0, 0, 0)
    assert proc.returncode == 0
