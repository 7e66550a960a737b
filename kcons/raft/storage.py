"""Raft's stable storage: the protocol, an in-memory variant for tests, and a write-ahead log on disk.

:class:`WalStorage` keeps one append-only file of records ``[length u32][crc32 u32][payload]``
and one snapshot file. ``save`` returns only after ``fsync`` (unless constructed with
``fsync=False``, which benchmarks use to compare with systems that do not sync), so the core's
contract "persist, then reply" holds across power loss. Recovery replays the records; a torn
tail (a last record cut short, or whose checksum fails with nothing valid after it, or zero fill)
is truncated away, while a damaged record *followed by* a valid one is corruption in the middle
and recovery refuses with :class:`CorruptLogError` rather than silently dropping acknowledged
entries. Snapshots and log rewrites are atomic: write a temporary file, fsync it, rename it over
the old one, fsync the directory.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kcons.raft.codec import (
    decode_entries,
    decode_hard_state,
    decode_snapshot,
    encode_entries,
    encode_hard_state,
    encode_snapshot,
)
from kcons.raft.errors import CorruptLogError, FrameRejectedError
from kcons.raft.messages import Entry, HardState, Snapshot

log = logging.getLogger(__name__)

__all__ = ["MemoryStorage", "PersistentState", "RaftStorage", "WalStorage"]

_REC = struct.Struct("<II")  # payload length, crc32(payload)
_REC_HS = 1
_REC_ENTRIES = 2
_MAX_RECORD = 1 << 30
_SNAP_MAGIC = b"KRSN1"


@dataclass
class PersistentState:
    """What a node reads back at start: hard state, latest snapshot, entries after it."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)


class RaftStorage(Protocol):
    """Durable home of one node's hard state, log entries and snapshot."""

    def load(self) -> PersistentState:
        """Everything persisted so far (after crash recovery)."""
        ...

    def save(self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None) -> None:
        """Durably store a Ready's snapshot (replacing the log), entries (replacing the log from
        ``entries[0].index`` on) and hard state; returns only once they survive a crash."""
        ...

    def compact(self, snapshot: Snapshot, log_offset: int | None = None) -> None:
        """Store a locally taken snapshot; drop entries below ``log_offset`` (default: the snapshot's
        index). Entries from ``log_offset`` on are kept so lagging followers can still be sent them."""
        ...

    def close(self) -> None:
        """Release files."""
        ...


def _splice(entries: list[Entry], new: list[Entry], snap_index: int) -> None:
    """Replace ``entries`` from new[0].index on with ``new`` (entries at or below ``snap_index`` that
    ``new`` would start before are simply replaced: they are covered by the snapshot)."""
    if not new:
        return
    first = new[0].index
    if not entries or first <= entries[0].index:
        if not entries and first > snap_index + 1:
            raise CorruptLogError(f"log gap: entry {first} after snapshot {snap_index}")
        entries[:] = new
        return
    if first > entries[-1].index + 1:
        raise CorruptLogError(f"log gap: entry {first} after {entries[-1].index}")
    del entries[first - entries[0].index :]
    entries.extend(new)


def _kept_after_compaction(entries: list[Entry], snapshot: Snapshot, log_offset: int | None) -> list[Entry]:
    if log_offset is None:
        return [e for e in entries if e.index > snapshot.meta.index]
    offset = min(log_offset, snapshot.meta.index)
    return [e for e in entries if e.index >= offset]


class MemoryStorage:
    """Storage in memory: survives a simulated crash of the node object, not of the process."""

    def __init__(self) -> None:
        self.state = PersistentState()
        self.saves = 0

    def load(self) -> PersistentState:
        """A copy of the stored state."""
        s = self.state
        return PersistentState(s.hard_state, s.snapshot, list(s.entries))

    def save(self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None) -> None:
        """Store synchronously (memory is 'durable' for the simulated node)."""
        s = self.state
        if snapshot is not None:
            s.snapshot = snapshot
            s.entries = []
        _splice(s.entries, entries, s.snapshot.meta.index if s.snapshot else 0)
        if hard_state is not None:
            s.hard_state = hard_state
        self.saves += 1

    def compact(self, snapshot: Snapshot, log_offset: int | None = None) -> None:
        """Keep ``snapshot`` and the entries from ``log_offset`` on."""
        s = self.state
        old = s.snapshot.meta.index if s.snapshot else 0
        if snapshot.meta.index <= old:
            return
        s.entries = _kept_after_compaction(s.entries, snapshot, log_offset)
        s.snapshot = snapshot

    def close(self) -> None:
        """Nothing to release."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record(payload: bytes) -> bytes:
    return _REC.pack(len(payload), zlib.crc32(payload)) + payload


def _valid_record_at(buf: bytes, offset: int) -> bool:
    if offset + _REC.size > len(buf):
        return False
    length, crc = _REC.unpack_from(buf, offset)
    end: int = offset + _REC.size + length
    return bool(length > 0) and end <= len(buf) and zlib.crc32(buf[offset + _REC.size : end]) == crc


class WalStorage:
    """A write-ahead log plus an atomic snapshot file in ``directory``; fsync before returning."""

    def __init__(self, directory: str | os.PathLike[str], fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._wal_path = self.dir / "raft.wal"
        self._snap_path = self.dir / "raft.snap"
        self.truncated_bytes = 0
        self._state = self._recover()
        self._file = open(self._wal_path, "ab")  # noqa: SIM115 - held open for appends

    # -- recovery ----------------------------------------------------------------------------
    def _recover(self) -> PersistentState:
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()  # an interrupted atomic write; the previous file is intact
        state = PersistentState()
        if self._snap_path.exists():
            state.snapshot = self._read_snapshot()
        snap_index = state.snapshot.meta.index if state.snapshot else 0
        if not self._wal_path.exists():
            return state
        buf = self._wal_path.read_bytes()
        offset = 0
        good = 0
        while offset < len(buf):
            if offset + _REC.size > len(buf):
                break  # torn header at the tail
            length, crc = _REC.unpack_from(buf, offset)
            start = offset + _REC.size
            end = start + length
            if length == 0 or length > _MAX_RECORD or end > len(buf) or zlib.crc32(buf[start:end]) != crc:
                if length and end <= len(buf) and _valid_record_at(buf, end):
                    raise CorruptLogError(
                        f"{self._wal_path}: damaged record at byte {offset} is followed by valid records"
                    )
                break
            self._apply_record(state, buf[start:end])
            offset = end
            good = end
        self._drop_covered(state, snap_index)
        if good < len(buf):
            self.truncated_bytes = len(buf) - good
            log.warning("raft WAL %s: truncating a torn tail of %d bytes", self._wal_path, self.truncated_bytes)
            with open(self._wal_path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return state

    def _apply_record(self, state: PersistentState, payload: bytes) -> None:
        kind = payload[0]
        try:
            if kind == _REC_HS:
                state.hard_state = decode_hard_state(payload, 1)
            elif kind == _REC_ENTRIES:
                (count,) = struct.unpack_from("<I", payload, 1)
                entries, end = decode_entries(payload, count, 5)
                if end != len(payload):
                    raise FrameRejectedError("trailing bytes")
                self._splice_recovered(state.entries, entries)
            else:
                raise CorruptLogError(f"{self._wal_path}: unknown record kind {kind}")
        except (FrameRejectedError, struct.error) as exc:
            raise CorruptLogError(f"{self._wal_path}: record passes its checksum but does not decode: {exc}") from None

    @staticmethod
    def _splice_recovered(raw: list[Entry], new: list[Entry]) -> None:
        if not new:
            return
        first = new[0].index
        if not raw or first <= raw[0].index:
            raw[:] = new
            return
        if first > raw[-1].index + 1:
            raise CorruptLogError(f"log gap at entry {first} after {raw[-1].index}")
        del raw[first - raw[0].index :]
        raw.extend(new)

    @staticmethod
    def _drop_covered(state: PersistentState, snap_index: int) -> None:
        # A crash between writing a received snapshot and rewriting the log leaves the old log:
        # if it disagrees with the snapshot at its boundary, it belongs to a replaced history.
        snap = state.snapshot
        raw = state.entries
        if snap is None or not raw:
            return
        if raw[-1].index < snap_index:
            state.entries = []  # everything is covered by the snapshot
            return
        if raw[0].index > snap_index + 1:
            raise CorruptLogError(f"log starts at {raw[0].index}, snapshot ends at {snap_index}")
        if raw[0].index <= snap_index and raw[snap_index - raw[0].index].term != snap.meta.term:
            state.entries = []

    def _read_snapshot(self) -> Snapshot:
        buf = self._snap_path.read_bytes()
        head = len(_SNAP_MAGIC) + _REC.size
        if len(buf) < head or not buf.startswith(_SNAP_MAGIC):
            raise CorruptLogError(f"{self._snap_path}: not a snapshot file")
        length, crc = _REC.unpack_from(buf, len(_SNAP_MAGIC))
        body = buf[head : head + length]
        if len(body) != length or zlib.crc32(body) != crc:
            raise CorruptLogError(f"{self._snap_path}: snapshot checksum mismatch")
        try:
            snap, _ = decode_snapshot(body)
        except FrameRejectedError as exc:
            raise CorruptLogError(f"{self._snap_path}: {exc}") from None
        return snap

    # -- protocol ----------------------------------------------------------------------------
    def load(self) -> PersistentState:
        """The recovered state (a copy)."""
        s = self._state
        return PersistentState(s.hard_state, s.snapshot, list(s.entries))

    def save(self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None) -> None:
        """Append records and fsync; a snapshot is written atomically and the log rewritten after it."""
        s = self._state
        if snapshot is not None:
            s.snapshot = snapshot
            s.entries = []
            _splice(s.entries, entries, snapshot.meta.index)
            if hard_state is not None:
                s.hard_state = hard_state
            self._write_snapshot(snapshot)
            self._rewrite()
            return
        _splice(s.entries, entries, s.snapshot.meta.index if s.snapshot else 0)
        parts: list[bytes] = []
        if entries:
            parts.append(_record(bytes([_REC_ENTRIES]) + struct.pack("<I", len(entries)) + encode_entries(entries)))
        if hard_state is not None:
            s.hard_state = hard_state
            parts.append(_record(bytes([_REC_HS]) + encode_hard_state(hard_state)))
        if not parts:
            return
        self._file.write(b"".join(parts))
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def compact(self, snapshot: Snapshot, log_offset: int | None = None) -> None:
        """Write the snapshot atomically, then rewrite the log with the entries from ``log_offset`` on."""
        s = self._state
        old = s.snapshot.meta.index if s.snapshot else 0
        if snapshot.meta.index <= old:
            return
        s.entries = _kept_after_compaction(s.entries, snapshot, log_offset)
        s.snapshot = snapshot
        self._write_snapshot(snapshot)
        self._rewrite()

    def close(self) -> None:
        """Close the log file."""
        self._file.close()

    # -- atomic rewrites ---------------------------------------------------------------------
    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(self.dir)

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        body = encode_snapshot(snapshot)
        self._atomic_write(self._snap_path, _SNAP_MAGIC + _REC.pack(len(body), zlib.crc32(body)) + body)

    def _rewrite(self) -> None:
        s = self._state
        parts = [_record(bytes([_REC_HS]) + encode_hard_state(s.hard_state))]
        if s.entries:
            parts.append(_record(bytes([_REC_ENTRIES]) + struct.pack("<I", len(s.entries)) + encode_entries(s.entries)))
        self._file.close()
        self._atomic_write(self._wal_path, b"".join(parts))
        self._file = open(self._wal_path, "ab")  # noqa: SIM115 - held open for appends
