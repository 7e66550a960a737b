"""Every script in examples/ runs against real services and reports success."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    "script", ["wrap_producer.py", "outbox_sqlalchemy.py", "consumer_postgres.py", "cache_invalidation.py"]
)
def test_example_runs_and_checks_its_own_guarantee(
    script: str, kafka_bootstrap: str, redis_url: str, fresh_database: Callable[[], str]
) -> None:
    env = {
        **os.environ,
        "KCONS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "KCONS_REDIS_URL": redis_url,
        "KCONS_POSTGRES_DSN": fresh_database(),
    }
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] is True
