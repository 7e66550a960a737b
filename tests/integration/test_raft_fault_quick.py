"""Runs the quick variant of the Raft fault run (real node processes, SIGKILL and SIGSTOP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "fault" / "raft_kill.py"


def test_quick_fault_run_loses_nothing_and_stays_linearizable() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=240)
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["ok"] is True, proc.stderr[-2000:]
    assert result["faults"] >= 3
    assert result["sent"] > 0
    assert result["lost"] == 0 and result["duplicates"] == 0 and result["linearizability_violations"] == 0
    assert proc.returncode == 0
