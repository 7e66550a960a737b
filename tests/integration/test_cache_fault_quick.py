"""CI runs the cache fault run in its --quick size: invalidator SIGKILLs, concurrent readers and writers, 0 stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "fault" / "cache_race.py"


def test_quick_cache_fault_run_has_no_stale_reads(kafka_bootstrap: str, redis_url: str, postgres_dsn: str) -> None:
    env = dict(os.environ)
    env.update(KCONS_KAFKA_BOOTSTRAP=kafka_bootstrap, KCONS_REDIS_URL=redis_url, KCONS_POSTGRES_DSN=postgres_dsn)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from the fault run; stderr tail:\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert report["stale"] == 0, report
    assert report["lost"] == 0, report
    assert report["faults"] >= 3 and report["reads"] >= 3000, report
    assert report["ok"] is True, report
    assert proc.returncode == 0


def test_quick_redis_restart_fault_run_leaves_nothing_stale() -> None:
    script = SCRIPT.with_name("cache_redis_restart.py")
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=240, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from the fault run; stderr tail:\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert report["faults"] >= 3 and report["stalled_write_throughs"] >= 15, report
    assert report["stale_after_quiescence"] == 0 and report["stale"] == 0, report
    assert report["ok"] is True and proc.returncode == 0, report
