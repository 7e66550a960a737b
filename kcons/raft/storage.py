"""Raft's stable storage: the protocol, an in-memory variant for tests, and a write-ahead log on disk.

:class:`WalStorage` keeps one append-only file and one snapshot file. The WAL (format 2) starts
with the 8-byte magic ``KRWAL\x00\x02\n``, then records ``[length u32][crc32(payload) u32]
[crc32(length, payload crc) u32][payload]``: the header has its own checksum, so a damaged
length can never be mistaken for the end of the log. Each ``save`` writes exactly one record, so
a crash can leave at most one incomplete record, the last one. ``save`` returns only after
``fsync`` (unless constructed with ``fsync=False``, which benchmarks use to compare with systems
that do not sync), so the core's contract "persist, then reply" holds across power loss.

Recovery replays the records. Only a torn tail is truncated: a damaged or incomplete record
after which no valid record follows (a crash during the last append, or zero fill). Damage
anywhere else raises :class:`CorruptLogError` naming the file and byte offset, and the file is
left exactly as it was. A WAL in the previous format (no magic, checksum over the payload only)
is read with the same rule, then rewritten in format 2; the original is kept as ``raft.wal.v1``.

A directory that once held this node's state carries a ``raft.member`` marker: if the WAL is
then missing or empty the node would restart at term 0 with no vote and could vote twice in one
term, so recovery refuses unless ``allow_empty`` is set (the CLI's ``--rejoin-empty``).
Snapshots and log rewrites are atomic: write a temporary file, fsync it, rename it over the old
one, fsync the directory.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable
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

_WAL_MAGIC = b"KRWAL\x00\x02\n"  # format 2
_REC = struct.Struct("<II")  # payload length, crc32(payload): format 1's header, and format 2's first 8 bytes
_REC2 = struct.Struct("<III")  # payload length, crc32(payload), header checksum
_HEAD_CRC_MASK = 0x5A17C3E1  # so that an all-zero header never checks
_REC_HS = 1  # format 1 only
_REC_ENTRIES = 2  # format 1 only
_REC_BATCH = 3  # one save: hard-state flag [+ hard state], entry count, entries
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


def _head_crc(length: int, payload_crc: int) -> int:
    return zlib.crc32(_REC.pack(length, payload_crc)) ^ _HEAD_CRC_MASK


def _record(payload: bytes) -> bytes:
    crc = zlib.crc32(payload)
    return _REC2.pack(len(payload), crc, _head_crc(len(payload), crc)) + payload


def _batch_payload(hard_state: HardState | None, entries: list[Entry]) -> bytes:
    """One save as one record: optional hard state, then the entries."""
    hs = b"\x01" + encode_hard_state(hard_state) if hard_state is not None else b"\x00"
    return b"".join([bytes([_REC_BATCH]), hs, struct.pack("<I", len(entries)), encode_entries(entries)])


def _v2_record_at(buf: bytes, offset: int) -> int | None:
    """The end of a complete, valid format-2 record at ``offset``, else None."""
    if offset + _REC2.size > len(buf):
        return None
    length, crc, hcrc = _REC2.unpack_from(buf, offset)
    if hcrc != _head_crc(length, crc) or length == 0:
        return None
    end: int = offset + _REC2.size + length
    if end > len(buf) or zlib.crc32(buf[offset + _REC2.size : end]) != crc:
        return None
    return end


def _v1_record_at(buf: bytes, offset: int) -> int | None:
    """The end of a complete, valid format-1 record at ``offset``, else None."""
    if offset + _REC.size > len(buf):
        return None
    length, crc = _REC.unpack_from(buf, offset)
    end: int = offset + _REC.size + length
    if length == 0 or end > len(buf) or zlib.crc32(buf[offset + _REC.size : end]) != crc:
        return None
    return end


class WalStorage:
    """A write-ahead log plus an atomic snapshot file in ``directory``; fsync before returning."""

    def __init__(self, directory: str | os.PathLike[str], fsync: bool = True, allow_empty: bool = False) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.allow_empty = allow_empty
        self._wal_path = self.dir / "raft.wal"
        self._snap_path = self.dir / "raft.snap"
        self._marker = self.dir / "raft.member"
        self.truncated_bytes = 0
        self.started_empty = False
        self._upgrade = False
        self._state = self._recover()
        if self._upgrade or not self._wal_path.exists() or self._wal_path.stat().st_size == 0:
            self._rewrite_file()  # a new WAL, or the old format rewritten in format 2
        else:
            self._file = open(self._wal_path, "ab")  # noqa: SIM115 - held open for appends
        if not self._marker.exists():
            self._atomic_write(self._marker, b"this directory holds a Raft member's state; see --rejoin-empty\n")

    # -- recovery ----------------------------------------------------------------------------
    def _recover(self) -> PersistentState:
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()  # an interrupted atomic write; the previous file is intact
        state = PersistentState()
        wal_missing = not self._wal_path.exists() or self._wal_path.stat().st_size == 0
        if wal_missing and (self._marker.exists() or self._snap_path.exists()):
            if not self.allow_empty:
                raise CorruptLogError(
                    f"{self._wal_path} is missing or empty but {self.dir} held a Raft member's state: "
                    "restarting without it could vote twice in one term; restore the file, or start "
                    "with --rejoin-empty to rejoin as a new member (it is removed and re-added)"
                )
            log.warning("raft WAL %s is missing or empty: rejoining with empty state as asked", self._wal_path)
            for path in (self._snap_path,):
                if path.exists():
                    path.rename(path.with_name(path.name + ".before-rejoin"))
            self.started_empty = True
            return state
        if self._snap_path.exists():
            state.snapshot = self._read_snapshot()
        snap_index = state.snapshot.meta.index if state.snapshot else 0
        if wal_missing:
            self.started_empty = state.snapshot is None
            return state
        buf = self._wal_path.read_bytes()
        if buf.startswith(_WAL_MAGIC):
            good = self._scan(state, buf, len(_WAL_MAGIC), _v2_record_at, _REC2.size)
        elif buf.startswith(_WAL_MAGIC[:5]):
            raise CorruptLogError(f"{self._wal_path}: unknown WAL format version {buf[5:8]!r} at byte 5")
        elif len(buf) >= len(_WAL_MAGIC) and _v2_record_at(buf, len(_WAL_MAGIC)) is not None:
            raise CorruptLogError(f"{self._wal_path}: damaged file header at byte 0 (format-2 records follow)")
        else:
            if _v1_record_at(buf, 0) is None:
                raise CorruptLogError(f"{self._wal_path}: no valid record at byte 0: not a kcons WAL, or damaged")
            good = self._scan(state, buf, 0, _v1_record_at, _REC.size)
            self._upgrade = True
        self._drop_covered(state, snap_index)
        if good < len(buf):
            self.truncated_bytes = len(buf) - good
            log.warning("raft WAL %s: truncating a torn tail of %d bytes", self._wal_path, self.truncated_bytes)
            if self._upgrade:
                return state  # the original is kept as raft.wal.v1 when the new file is written
            with open(self._wal_path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return state

    def _scan(
        self,
        state: PersistentState,
        buf: bytes,
        offset: int,
        record_at: Callable[[bytes, int], int | None],
        head: int,
    ) -> int:
        """Apply every valid record from ``offset``; returns where the torn tail (if any) starts."""
        while offset < len(buf):
            end = record_at(buf, offset)
            if end is None:
                # Damaged or incomplete. Only the last record may be: a valid record after it
                # means acknowledged data follows, and guessing would lose it. A format-2 header
                # that checks bounds the record, so only what lies after it is searched.
                search_from = offset + 1
                if head == _REC2.size and offset + head <= len(buf):
                    length, crc, hcrc = _REC2.unpack_from(buf, offset)
                    if hcrc == _head_crc(length, crc):
                        search_from = offset + head + length
                for later in range(search_from, len(buf) - head + 1):
                    if record_at(buf, later) is not None:
                        raise CorruptLogError(
                            f"{self._wal_path}: damaged record at byte {offset} is followed by a valid "
                            f"record at byte {later}; refusing to start (the file is left as it was)"
                        )
                return offset
            self._apply_record(state, buf[offset + head : end], offset)
            offset = end
        return offset

    def _apply_record(self, state: PersistentState, payload: bytes, offset: int) -> None:
        kind = payload[0]
        try:
            if kind == _REC_BATCH:
                pos = 2
                if payload[1] == 1:
                    state.hard_state = decode_hard_state(payload, 2)
                    pos = 2 + 24
                elif payload[1] != 0:
                    raise FrameRejectedError("bad hard-state flag")
                (count,) = struct.unpack_from("<I", payload, pos)
                entries, end = decode_entries(payload, count, pos + 4)
                if end != len(payload):
                    raise FrameRejectedError("trailing bytes")
                self._splice_recovered(state.entries, entries)
            elif kind == _REC_HS:
                state.hard_state = decode_hard_state(payload, 1)
            elif kind == _REC_ENTRIES:
                (count,) = struct.unpack_from("<I", payload, 1)
                entries, end = decode_entries(payload, count, 5)
                if end != len(payload):
                    raise FrameRejectedError("trailing bytes")
                self._splice_recovered(state.entries, entries)
            else:
                raise CorruptLogError(f"{self._wal_path}: unknown record kind {kind} at byte {offset}")
        except (FrameRejectedError, struct.error, IndexError) as exc:
            raise CorruptLogError(
                f"{self._wal_path}: record at byte {offset} passes its checksum but does not decode: {exc}"
            ) from None

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
        if hard_state is not None:
            s.hard_state = hard_state
        elif not entries:
            return
        self._file.write(_record(_batch_payload(hard_state, entries)))
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
        self._file.close()
        self._rewrite_file()

    def _rewrite_file(self) -> None:
        """Write the whole state as a fresh format-2 WAL (atomically) and reopen it for appends."""
        s = self._state
        if self._upgrade and self._wal_path.exists():
            backup = self._wal_path.with_name(self._wal_path.name + ".v1")
            if not backup.exists():
                os.link(self._wal_path, backup)
            log.info("raft WAL %s: upgraded to format 2; the original is kept as %s", self._wal_path, backup)
            self._upgrade = False
        self._atomic_write(self._wal_path, _WAL_MAGIC + _record(_batch_payload(s.hard_state, s.entries)))
        self._file = open(self._wal_path, "ab")  # noqa: SIM115 - held open for appends
