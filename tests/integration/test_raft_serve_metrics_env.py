"""`kcons raft serve` serves /healthz on KCONS_METRICS_PORT, as the image's HEALTHCHECK expects."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kcons.testing.local import free_ports


def test_raft_serve_answers_healthz_on_kcons_metrics_port(tmp_path: Path) -> None:
    raft_port, metrics_port = free_ports(2)
    env = {**os.environ, "KCONS_RAFT_SECRET": "0123456789abcdef0123456789abcdef",
           "KCONS_METRICS_PORT": str(metrics_port)}  # fmt: skip
    argv = [sys.executable, "-m", "kcons.cli", "raft", "serve", "--id", "1", "--peers", f"1=127.0.0.1:{raft_port}",
            "--data-dir", str(tmp_path / "data")]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    body = ""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "leader=1" not in body:  # up, then elected
            assert proc.poll() is None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                pass
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "leader=1" in body, err.decode()
    assert proc.returncode == 0, err.decode()
    assert "leader is now 1" in err.decode()  # leader changes are logged at INFO by default
