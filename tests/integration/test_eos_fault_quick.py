"""CI slice of the exactly-once fault run: workers SIGKILLed mid-stream, output checked exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "fault" / "eos_kill.py"


def test_quick_eos_fault_run_loses_and_duplicates_nothing(kafka_bootstrap: str) -> None:
    env = {**os.environ, "KCONS_KAFKA_BOOTSTRAP": kafka_bootstrap}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result; stderr tail:\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["ok"] is True, result
    assert result["worker_kills"] >= 3
    assert (result["lost"], result["duplicates"], result["unexpected"]) == (0, 0, 0)
    assert proc.returncode == 0
