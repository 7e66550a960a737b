"""`kcons demo` runs the shop with a relay kill, a consumer kill and resent duplicates, and every guarantee holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_demo_loses_nothing_duplicates_no_effect_and_serves_nothing_stale(
    database: str, kafka_bootstrap: str, redis_url: str, postgres_dsn: str
) -> None:
    env = {
        **os.environ,
        "KCONS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "KCONS_REDIS_URL": redis_url,
        "KCONS_POSTGRES_DSN": postgres_dsn,
    }
    argv = [sys.executable, "-m", "kcons.cli", "demo", "--orders", "400", "--rate", "200", "--timeout", "240"]
    if database == "postgres":
        argv.append("--postgres")
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=280, check=False)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, (report, result.stderr[-3000:])
    assert report["ok"] is True
    assert report["database"] == database
    assert report["faults"]["relay_kills"] == 1 and report["faults"]["consumer_kills"] == 1
    assert report["faults"]["resent"] > 0 and report["duplicates_dropped"] >= report["faults"]["resent"]
    assert report["orders_committed"] == report["published"] > 0
    assert report["lost"] == 0 and report["duplicate_effects"] == 0 and report["stale"] == 0
    assert report["reads"] > 0
