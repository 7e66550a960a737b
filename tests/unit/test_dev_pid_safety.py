"""`kcons dev down` signals only the processes it recorded and deletes only the folders it marked.

A recorded pid can name another process after the original exited (ids are reused); such a
process must survive `dev down`, and a recorded folder without the stack's marker must stay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from kcons.cli import main
from kcons.testing.procs import ProcessRecord, mark_dir


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process leading its own process group, as a reused pid would name."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    time.sleep(0.05)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


def _down(state_dir: Path, state: dict[str, object]) -> None:
    (state_dir / "dev.json").write_text(json.dumps(state))
    result = CliRunner().invoke(main, ["dev", "down"], env={"KCONS_STATE_DIR": str(state_dir)})
    assert result.exit_code == 0, result.output


def test_dev_down_spares_a_process_that_reused_a_recorded_pid(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    real = ProcessRecord.of(bystander.pid)
    stale = ProcessRecord(pid=real.pid, start_time=real.start_time - 1, cmdline=real.cmdline)
    folder = tmp_path / "someone-elses"
    folder.mkdir()
    _down(tmp_path, {"id": "a", "procs": [stale.to_json()], "dirs": [str(folder)], "env": {}})
    assert bystander.poll() is None, "an unrelated process was signalled"
    assert folder.is_dir(), "a folder without the stack's marker was deleted"
    assert not (tmp_path / "dev.json").exists()


def test_dev_down_spares_a_process_whose_command_line_differs(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    real = ProcessRecord.of(bystander.pid)
    other = ProcessRecord(pid=real.pid, start_time=real.start_time, cmdline=("redis-server", "--port", "1"))
    _down(tmp_path, {"id": "a", "procs": [other.to_json()], "dirs": [], "env": {}})
    assert bystander.poll() is None


def test_dev_down_spares_a_reused_pid_from_an_old_state_file(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _down(tmp_path, {"pids": [bystander.pid], "dirs": [str(folder)], "env": {}})
    assert bystander.poll() is None
    assert folder.is_dir()


def test_dev_down_stops_its_own_process_group_and_deletes_its_marked_folder(tmp_path: Path) -> None:
    folder = tmp_path / "stack"
    folder.mkdir()
    mark_dir(folder, "owner-1")
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        record = ProcessRecord.of(proc.pid)
        _down(tmp_path, {"id": "owner-1", "procs": [record.to_json()], "dirs": [str(folder)], "env": {}})
        assert proc.wait(10) == -signal.SIGTERM
        assert not folder.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_status_counts_a_reused_pid_as_not_running(tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    real = ProcessRecord.of(bystander.pid)
    stale = ProcessRecord(pid=real.pid, start_time=real.start_time + 7, cmdline=real.cmdline)
    (tmp_path / "dev.json").write_text(json.dumps({"id": "a", "procs": [stale.to_json()], "dirs": [], "env": {}}))
    result = CliRunner().invoke(main, ["dev", "status"], env={"KCONS_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert json.loads(result.output)["running"] is False
