"""`kcons demo` stopped by SIGTERM or SIGINT leaves no process and no directory behind, and says what it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest


def _marked_processes(marker: str) -> list[int]:
    """Processes (of any parentage: orphans are reparented) whose environment carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


@pytest.mark.parametrize(
    ("sig", "when"),
    [
        (signal.SIGTERM, "[ "),  # while the shop runs: workers, Kafka and Redis up
        (signal.SIGINT, "[ "),
        (signal.SIGTERM, None),  # two seconds in: while the services are still starting
    ],
    ids=["sigterm-running", "sigint-running", "sigterm-starting"],
)
def test_demo_stopped_by_a_signal_leaves_nothing_behind(tmp_path: Path, sig: signal.Signals, when: str | None) -> None:
    marker = f"KCONS_TEST_DEMO_MARK={uuid.uuid4().hex}"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KCONS_KAFKA_BOOTSTRAP", "KCONS_REDIS_URL")}
    env.update(TMPDIR=str(tmpdir), KCONS_TEST_DEMO_MARK=marker.split("=", 1)[1], PYTHONUNBUFFERED="1")
    err_path = tmp_path / "demo.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kcons.cli", "demo", "--orders", "100000", "--rate", "500"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + (240 if when else 2)
        while time.monotonic() < deadline and (when is None or when not in err_path.read_text()):
            assert proc.poll() is None, err_path.read_text()
            time.sleep(0.2)
        if when is not None:
            assert when in err_path.read_text(), "the demo never started its workers"
        proc.send_signal(sig)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err_path.read_text()
    assert code == 128 + sig, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("stopped: "), text
    if when is not None:
        assert "relay worker" in last and "consumer worker" in last and "kafka" in last and "removed " in last
    assert "Traceback" not in text
    deadline = time.monotonic() + 10
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked_processes(marker) == []
    assert sorted(p.name for p in tmpdir.iterdir()) == []
