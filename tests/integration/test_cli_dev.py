"""`kcons dev up/env/status/down` manage a detached local stack; `kcons dev smoke` checks one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from kcons.cli import main


def _kcons(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kcons.cli", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_dev_up_env_status_down_round_trip(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KCONS_")}
    env["KCONS_STATE_DIR"] = str(tmp_path)
    up = _kcons("dev", "up", env=env)
    try:
        assert up.returncode == 0, up.stderr
        exports = _kcons("dev", "env", env=env)
        assert exports.returncode == 0, exports.stderr
        line = exports.stdout.strip()
        assert line.startswith("export ")
        pairs = dict(item.split("=", 1) for item in line[len("export ") :].split())
        assert set(pairs) == {"KCONS_KAFKA_BOOTSTRAP", "KCONS_REDIS_URL", "KCONS_POSTGRES_DSN"}
        smoke = _kcons("dev", "smoke", "--messages", "200", env={**env, **pairs})
        assert smoke.returncode == 0, smoke.stderr
        report = json.loads(smoke.stdout.strip().splitlines()[-1])
        assert report["ok"] is True and report["received"] == 200 and report["lost"] == 0
        status = _kcons("dev", "status", env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
        pids = [int(p) for p in json.loads(status.stdout)["pids"]]
    finally:
        down = _kcons("dev", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "dev.json").exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert _kcons("dev", "env", env=env).returncode != 0


def test_smoke_without_settings_fails_naming_the_variable() -> None:
    cleared = {k: "" for k in os.environ if k.startswith("KCONS_")}
    result = CliRunner().invoke(main, ["dev", "smoke"], env=cleared)
    assert result.exit_code != 0
    assert "KCONS_KAFKA_BOOTSTRAP" in result.output


def test_version_names_librdkafka() -> None:
    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0 and "librdkafka" in result.output
