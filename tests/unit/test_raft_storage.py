"""Raft storage: the WAL's durability and recovery rules, snapshots, and the memory variant."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kcons.raft.errors import CorruptLogError
from kcons.raft.messages import Entry, HardState, Snapshot, SnapshotMeta
from kcons.raft.storage import MemoryStorage, RaftStorage, WalStorage


def ents(first: int, last: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, data=b"e%d" % i) for i in range(first, last + 1)]


@pytest.fixture(params=["wal", "memory"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A factory that reopens the same storage (a restart)."""
    mem = MemoryStorage()

    def make() -> RaftStorage:
        return WalStorage(tmp_path) if request.param == "wal" else mem

    return make


def test_saved_entries_and_hard_state_survive_a_restart(make_storage) -> None:  # type: ignore[no-untyped-def]
    s = make_storage()
    s.save(HardState(3, 2, 4), ents(1, 5), None)
    s.save(None, ents(6, 6, term=3), None)
    s.close()
    st = make_storage().load()
    assert st.hard_state == HardState(3, 2, 4)
    assert [e.index for e in st.entries] == [1, 2, 3, 4, 5, 6]
    assert st.entries[-1].term == 3


def test_entries_saved_from_an_index_replace_the_old_suffix(make_storage) -> None:  # type: ignore[no-untyped-def]
    s = make_storage()
    s.save(None, ents(1, 5), None)
    s.save(None, ents(3, 4, term=2), None)
    s.close()
    st = make_storage().load()
    assert [(e.index, e.term) for e in st.entries] == [(1, 1), (2, 1), (3, 2), (4, 2)]


def test_compaction_keeps_the_snapshot_and_later_entries(make_storage) -> None:  # type: ignore[no-untyped-def]
    s = make_storage()
    s.save(HardState(1, 1, 8), ents(1, 10), None)
    snap = Snapshot(SnapshotMeta(8, 1, (1, 2, 3)), b"image")
    s.compact(snap)
    s.save(None, ents(11, 12), None)
    s.close()
    st = make_storage().load()
    assert st.snapshot == snap
    assert [e.index for e in st.entries] == [9, 10, 11, 12]
    assert st.hard_state == HardState(1, 1, 8)


def test_installed_snapshot_replaces_the_whole_log(make_storage) -> None:  # type: ignore[no-untyped-def]
    s = make_storage()
    s.save(HardState(1, 1, 2), ents(1, 6), None)
    snap = Snapshot(SnapshotMeta(20, 4, (1, 2, 3)), b"leader-image")
    s.save(HardState(4, 0, 20), [], snap)
    s.save(None, [Entry(4, 21)], None)
    s.close()
    st = make_storage().load()
    assert st.snapshot == snap
    assert [e.index for e in st.entries] == [21]
    assert st.hard_state.commit == 20


def test_torn_tail_is_truncated_and_appends_continue(tmp_path: Path) -> None:
    s = WalStorage(tmp_path)
    s.save(HardState(1, 1, 0), ents(1, 3), None)
    s.close()
    wal = tmp_path / "raft.wal"
    good = wal.stat().st_size
    with open(wal, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34")  # a record header cut short by a crash
    s2 = WalStorage(tmp_path)
    assert s2.truncated_bytes == 6
    assert wal.stat().st_size == good
    s2.save(None, ents(4, 4), None)
    s2.close()
    assert [e.index for e in WalStorage(tmp_path).load().entries] == [1, 2, 3, 4]


def test_last_record_with_a_bad_checksum_counts_as_torn(tmp_path: Path) -> None:
    s = WalStorage(tmp_path)
    s.save(None, ents(1, 2), None)
    s.save(None, ents(3, 3), None)
    s.close()
    wal = tmp_path / "raft.wal"
    raw = bytearray(wal.read_bytes())
    raw[-1] ^= 0xFF  # damage the last record's payload: written but not fully flushed
    wal.write_bytes(bytes(raw))
    st = WalStorage(tmp_path).load()
    assert [e.index for e in st.entries] == [1, 2]


def test_corruption_before_valid_records_is_refused(tmp_path: Path) -> None:
    s = WalStorage(tmp_path)
    s.save(None, ents(1, 2), None)
    s.save(None, ents(3, 3), None)
    s.save(HardState(2, 1, 3), [], None)
    s.close()
    wal = tmp_path / "raft.wal"
    raw = bytearray(wal.read_bytes())
    raw[12] ^= 0xFF  # inside the first record's payload
    wal.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError):
        WalStorage(tmp_path)


def test_a_leftover_temporary_file_from_an_interrupted_snapshot_is_ignored(tmp_path: Path) -> None:
    s = WalStorage(tmp_path)
    s.save(HardState(1, 1, 3), ents(1, 3), None)
    s.close()
    (tmp_path / "raft.snap.tmp").write_bytes(b"half a snapshot")
    st = WalStorage(tmp_path).load()
    assert st.snapshot is None
    assert not (tmp_path / "raft.snap.tmp").exists()
    assert len(st.entries) == 3


def test_corrupt_snapshot_file_is_refused(tmp_path: Path) -> None:
    s = WalStorage(tmp_path)
    s.save(HardState(1, 1, 3), ents(1, 3), None)
    s.compact(Snapshot(SnapshotMeta(2, 1, (1,)), b"image"))
    s.close()
    snap = tmp_path / "raft.snap"
    raw = bytearray(snap.read_bytes())
    raw[-1] ^= 0xFF
    snap.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError):
        WalStorage(tmp_path)


def test_crash_after_snapshot_before_log_rewrite_drops_a_replaced_history(tmp_path: Path) -> None:
    s = WalStorage(tmp_path)
    s.save(HardState(1, 1, 1), ents(1, 5, term=1), None)
    s.close()
    # Simulate the crash: the received snapshot (index 3, term 2) reached disk, the log rewrite did not.
    s2 = WalStorage(tmp_path)
    s2._write_snapshot(Snapshot(SnapshotMeta(3, 2, (1, 2, 3)), b"x"))
    s2.close()
    st = WalStorage(tmp_path).load()
    assert st.snapshot is not None and st.snapshot.meta.index == 3
    assert st.entries == []  # entry 3 had term 1, not 2: entries 4 and 5 belonged to another history


def test_unsynced_mode_still_writes_the_same_records(tmp_path: Path) -> None:
    s = WalStorage(tmp_path, fsync=False)
    s.save(HardState(1, 1, 0), ents(1, 2), None)
    s.close()
    assert len(WalStorage(tmp_path).load().entries) == 2
    assert os.path.getsize(tmp_path / "raft.wal") > 0


def test_compaction_can_keep_entries_before_the_snapshot_for_lagging_followers(make_storage) -> None:  # type: ignore[no-untyped-def]
    s = make_storage()
    s.save(HardState(1, 1, 10), ents(1, 10), None)
    snap = Snapshot(SnapshotMeta(9, 1, (1, 2, 3)), b"image")
    s.compact(snap, 6)
    s.close()
    st = make_storage().load()
    assert [e.index for e in st.entries] == [6, 7, 8, 9, 10]
    assert st.snapshot == snap


def _three_records(tmp_path: Path) -> tuple[Path, list[int]]:
    """A WAL with three appended records; returns its path and the byte offset of each record."""
    s = WalStorage(tmp_path)
    wal = tmp_path / "raft.wal"
    starts = []
    for first, last in ((1, 2), (3, 4), (5, 6)):
        starts.append(wal.stat().st_size)
        s.save(HardState(1, 1, last), ents(first, last), None)
    s.close()
    return wal, starts


def test_a_flipped_length_bit_in_a_middle_record_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    wal, starts = _three_records(tmp_path)
    raw = bytearray(wal.read_bytes())
    raw[starts[1] + 3] ^= 0x10  # the length's high byte: the record now "ends" past the end of the file
    wal.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError) as err:
        WalStorage(tmp_path)
    assert str(wal) in str(err.value)
    assert f"byte {starts[1]}" in str(err.value)
    assert wal.read_bytes() == bytes(raw)  # the evidence is kept as it was


def test_zeroed_bytes_over_a_middle_record_are_refused_not_read_as_a_torn_tail(tmp_path: Path) -> None:
    wal, starts = _three_records(tmp_path)
    raw = bytearray(wal.read_bytes())
    raw[starts[1] : starts[2]] = bytes(starts[2] - starts[1])
    wal.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError) as err:
        WalStorage(tmp_path)
    assert f"byte {starts[1]}" in str(err.value)
    assert wal.read_bytes() == bytes(raw)


def test_a_flipped_low_length_bit_in_a_middle_record_is_refused(tmp_path: Path) -> None:
    wal, starts = _three_records(tmp_path)
    raw = bytearray(wal.read_bytes())
    raw[starts[1]] ^= 0x01
    wal.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError):
        WalStorage(tmp_path)
    assert wal.read_bytes() == bytes(raw)


def test_zero_fill_after_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    wal, _ = _three_records(tmp_path)
    good = wal.read_bytes()
    wal.write_bytes(good + bytes(100))  # the file grew but the data never reached the disk
    st = WalStorage(tmp_path).load()
    assert [e.index for e in st.entries] == [1, 2, 3, 4, 5, 6]
    assert wal.read_bytes() == good


def test_a_member_whose_wal_was_deleted_or_emptied_refuses_to_start(tmp_path: Path) -> None:
    wal, _ = _three_records(tmp_path)
    wal.unlink()
    with pytest.raises(CorruptLogError, match="rejoin-empty"):
        WalStorage(tmp_path)
    wal.write_bytes(b"")
    with pytest.raises(CorruptLogError, match="rejoin-empty"):
        WalStorage(tmp_path)
    st = WalStorage(tmp_path, allow_empty=True).load()  # the operator's explicit choice
    assert st.hard_state == HardState() and st.entries == []


def test_a_wal_in_the_previous_format_is_read_and_upgraded_with_a_backup(tmp_path: Path) -> None:
    import struct
    import zlib

    from kcons.raft.codec import encode_entries, encode_hard_state

    def v1(payload: bytes) -> bytes:
        return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload

    entries = v1(b"\x02" + struct.pack("<I", 3) + encode_entries(ents(1, 3)))
    old = entries + v1(b"\x01" + encode_hard_state(HardState(2, 1, 3)))
    (tmp_path / "raft.wal").write_bytes(old)
    s = WalStorage(tmp_path)
    assert [e.index for e in s.load().entries] == [1, 2, 3]
    assert s.load().hard_state == HardState(2, 1, 3)
    s.save(None, ents(4, 4), None)
    s.close()
    assert (tmp_path / "raft.wal.v1").read_bytes() == old
    st = WalStorage(tmp_path).load()
    assert [e.index for e in st.entries] == [1, 2, 3, 4]


def test_a_damaged_file_header_is_refused_not_read_as_an_old_format(tmp_path: Path) -> None:
    wal, _ = _three_records(tmp_path)
    raw = bytearray(wal.read_bytes())
    raw[1] ^= 0x40  # inside the magic
    wal.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError, match="byte 0"):
        WalStorage(tmp_path)
    assert wal.read_bytes() == bytes(raw)
    assert not (tmp_path / "raft.wal.v1").exists()


def test_a_file_that_is_no_wal_at_all_is_refused(tmp_path: Path) -> None:
    WalStorage(tmp_path).close()
    (tmp_path / "raft.wal").write_bytes(b"some other file " * 20)
    with pytest.raises(CorruptLogError):
        WalStorage(tmp_path)


def test_a_persisted_term_out_of_range_is_refused_at_start_not_a_crash_later(tmp_path: Path) -> None:
    s = WalStorage(tmp_path)
    s.save(HardState((1 << 64) - 1, 2, 0), [], None)  # what an earlier version could persist
    s.close()
    with pytest.raises(CorruptLogError, match="out of range"):
        WalStorage(tmp_path)
