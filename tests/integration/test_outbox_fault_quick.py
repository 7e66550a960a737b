"""CI runs the outbox fault run in its --quick size: relays killed, paused and cut off; nothing lost or reordered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "fault" / "outbox_kill.py"


def test_quick_outbox_fault_run_loses_nothing_and_keeps_aggregate_order(
    kafka_bootstrap: str, postgres_dsn: str
) -> None:
    env = dict(os.environ, KCONS_KAFKA_BOOTSTRAP=kafka_bootstrap, KCONS_POSTGRES_DSN=postgres_dsn)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--seed", "7"],
        env=env, capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["ok"] is True, (result, proc.stderr[-3000:])
    assert result["lost"] == 0 and result["out_of_order"] == 0 and result["rolled_back_published"] == 0
    assert result["kills"] >= 3 and result["sent"] >= 2000
    assert proc.returncode == 0
