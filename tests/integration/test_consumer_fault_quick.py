"""Runs the consumer fault run (tests/fault/consumer_kill.py --quick) against the session's Kafka and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_sigkilled_consumers_apply_every_effect_exactly_once(kafka_bootstrap: str, postgres_dsn: str) -> None:
    env = dict(os.environ, KCONS_KAFKA_BOOTSTRAP=kafka_bootstrap, KCONS_POSTGRES_DSN=postgres_dsn)
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests/fault/consumer_kill.py"), "--quick"],
        env=env, capture_output=True, text=True, timeout=280, check=False, cwd=str(ROOT),
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result; stderr:\n{run.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["ok"] is True, result
    assert result["lost"] == 0 and result["duplicates"] == 0
    assert result["faults"] >= 4
    assert run.returncode == 0
