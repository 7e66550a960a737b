"""Records of detached service processes that are safe to signal later, and folders safe to delete.

A process id alone names a different process once the original has exited and the id was
reused. A :class:`ProcessRecord` keeps the id together with the process's start time
(``/proc/PID/stat`` field 22, clock ticks since boot) and its command line; a later signal
goes to the process group only while all three still match and the process still leads its
group. A folder is deleted only if it holds the marker file written when it was recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MARKER", "ProcessRecord", "delete_marked_dir", "mark_dir", "stop_groups"]

MARKER = ".kcons-dev-owner"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (after the parenthesised command name), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)


@dataclass(frozen=True)
class ProcessRecord:
    """A process as it was when recorded: id, start time (field 22 of its stat) and command line."""

    pid: int
    start_time: int
    cmdline: tuple[str, ...]

    @classmethod
    def of(cls, pid: int) -> ProcessRecord:
        """Record the running process ``pid`` (raises ProcessLookupError if it is gone)."""
        fields = _stat_fields(pid)
        cmdline = _cmdline(pid)
        if fields is None or cmdline is None:
            raise ProcessLookupError(pid)
        return cls(pid=pid, start_time=int(fields[19]), cmdline=cmdline)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form for a state file."""
        return {"pid": self.pid, "start_time": self.start_time, "cmdline": list(self.cmdline)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """The inverse of :meth:`to_json`."""
        return cls(pid=int(data["pid"]), start_time=int(data["start_time"]), cmdline=tuple(data["cmdline"]))

    def is_running(self) -> bool:
        """Whether the recorded process (not merely its id) still runs, zombies excepted."""
        fields = _stat_fields(self.pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return int(fields[19]) == self.start_time and _cmdline(self.pid) == self.cmdline

    def leads_group(self) -> bool:
        """Whether the recorded process still runs and is the leader of its process group."""
        fields = _stat_fields(self.pid)
        return self.is_running() and fields is not None and int(fields[2]) == self.pid

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the process group this process leads; False (nothing sent) if it is not ours."""
        if not self.leads_group():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        return True


def stop_groups(records: Sequence[ProcessRecord], timeout: float = 10.0) -> list[int]:
    """SIGTERM each recorded group that still is ours, SIGKILL the ones left after ``timeout``.

    Returns the ids that were skipped because they now name another process (or none).
    """
    skipped = [r.pid for r in records if not r.signal_group(signal.SIGTERM)]
    for pid in skipped:
        log.info("process %s is no longer the recorded one: not signalled", pid)
    deadline = time.monotonic() + timeout
    for record in records:
        while record.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if record.is_running():
            record.signal_group(signal.SIGKILL)
    return skipped


def mark_dir(path: Path, owner: str) -> None:
    """Write the marker that lets :func:`delete_marked_dir` delete ``path`` for ``owner`` later."""
    (path / MARKER).write_text(owner)


def delete_marked_dir(path: Path, owner: str) -> bool:
    """Delete ``path`` only if it holds the marker written for ``owner``; False when left alone."""
    try:
        if (path / MARKER).read_text() != owner:
            return False
    except OSError:
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def records_of(pids: Iterable[int]) -> list[ProcessRecord]:
    """Records of the running processes among ``pids`` (ones already gone are left out)."""
    out = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            out.append(ProcessRecord.of(pid))
    return out
