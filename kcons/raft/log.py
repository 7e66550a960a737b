"""The core's view of the replicated log: entries after the last snapshot, commit and apply marks.

Indexes start at 1. Entries at or below ``snap_index`` are compacted into a snapshot; only their
boundary ``(snap_index, snap_term)`` is kept. ``unstable_from`` is the first index the driver has
not yet persisted: entries there and after go into the next ``Ready``. Entries are handed out for
applying only once they are both committed and persisted locally.
"""

from __future__ import annotations

from collections.abc import Sequence

from kcons.raft.messages import Entry

__all__ = ["RaftLog"]


class RaftLog:
    """An in-memory log with snapshot offset; no I/O (the driver persists what ``unstable`` returns)."""

    def __init__(self, snap_index: int = 0, snap_term: int = 0, entries: Sequence[Entry] = ()) -> None:
        self.snap_index = snap_index
        self.snap_term = snap_term
        self.entries: list[Entry] = list(entries)
        if self.entries and self.entries[0].index != snap_index + 1:
            raise ValueError("entries must start right after the snapshot")
        self.committed = snap_index
        self.applied = snap_index
        self.unstable_from = self.last_index() + 1

    # -- positions ---------------------------------------------------------------------------
    def first_index(self) -> int:
        """The first index still held as an entry (snap_index + 1)."""
        return self.snap_index + 1

    def last_index(self) -> int:
        """The index of the last entry, or of the snapshot when no entry follows it."""
        return self.snap_index + len(self.entries)

    def last_term(self) -> int:
        """The term of the last entry (or of the snapshot boundary)."""
        return self.entries[-1].term if self.entries else self.snap_term

    def term(self, index: int) -> int | None:
        """The term at ``index``; None when compacted away (below the snapshot) or not yet written."""
        if index == self.snap_index:
            return self.snap_term
        if index < self.snap_index or index > self.last_index():
            return None
        return self.entries[index - self.snap_index - 1].term

    def match_term(self, index: int, term: int) -> bool:
        """True when the entry at ``index`` has ``term`` (the log-matching check)."""
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """True when a log ending at (last_index, last_term) is at least as up to date as ours (5.4.1)."""
        mine = self.last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index())

    def entry(self, index: int) -> Entry:
        """The entry at ``index`` (must be present)."""
        return self.entries[index - self.snap_index - 1]

    def slice(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries with lo <= index < hi, cut after ``max_bytes`` of data (always at least one)."""
        lo = max(lo, self.first_index())
        hi = min(hi, self.last_index() + 1)
        if lo >= hi:
            return []
        out = self.entries[lo - self.snap_index - 1 : hi - self.snap_index - 1]
        if max_bytes is not None:
            size = 0
            for n, e in enumerate(out):
                size += len(e.data) + 24
                if size > max_bytes and n > 0:
                    return out[:n]
        return out

    # -- changes -----------------------------------------------------------------------------
    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries that follow the last one, truncating any suffix from entries[0].index on."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise AssertionError(f"would overwrite committed entry {first} <= {self.committed}")
        if first > self.last_index() + 1:
            raise AssertionError(f"gap in log: appending {first} after {self.last_index()}")
        del self.entries[first - self.snap_index - 1 :]
        self.entries.extend(entries)
        self.unstable_from = min(self.unstable_from, first)

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """The index of the first entry that is new or disagrees with ours in term; 0 if all match."""
        for e in entries:
            t = self.term(e.index)
            if t is None and e.index <= self.snap_index:
                continue  # compacted: it is committed, so it matches
            if t != e.term:
                return e.index
        return 0

    def maybe_append(self, prev_index: int, prev_term: int, commit: int, entries: Sequence[Entry]) -> int | None:
        """Follower side of AppendEntries: append after a matching (prev_index, prev_term).

        Returns the index of the last entry the leader sent (now known to match), or None on a
        mismatch. Matching entries are kept, so a stale, reordered message never truncates.
        """
        if prev_index < self.committed:
            raise AssertionError("the core answers messages below the commit index itself")
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            self.append(entries[conflict - entries[0].index :])
        self.commit_to(min(commit, last_new))
        return last_new

    def commit_to(self, index: int) -> None:
        """Raise the commit mark (never lowers it, never beyond the last entry)."""
        index = min(index, self.last_index())
        if index > self.committed:
            self.committed = index

    def unstable(self) -> list[Entry]:
        """Entries the driver must persist before sending the next messages."""
        if self.unstable_from > self.last_index():
            return []
        return self.entries[self.unstable_from - self.snap_index - 1 :]

    def stable_to(self, index: int, term: int) -> None:
        """The driver persisted everything through ``index`` (which had ``term``)."""
        if self.match_term(index, term) and index >= self.unstable_from:
            self.unstable_from = index + 1

    def stable_index(self) -> int:
        """The last index known to be on local stable storage."""
        return self.unstable_from - 1

    def next_to_apply(self) -> list[Entry]:
        """Committed, locally persisted entries not yet handed out for applying."""
        hi = min(self.committed, self.stable_index())
        if hi <= self.applied:
            return []
        return self.slice(self.applied + 1, hi + 1)

    def applied_to(self, index: int) -> None:
        """The driver applied everything through ``index``."""
        if index > self.applied:
            self.applied = index

    def restore(self, index: int, term: int) -> None:
        """Replace the whole log with a snapshot boundary (InstallSnapshot)."""
        self.snap_index = index
        self.snap_term = term
        self.entries = []
        self.committed = index
        self.applied = index
        self.unstable_from = index + 1

    def compact(self, index: int) -> None:
        """Drop entries through ``index`` (already applied and covered by a snapshot)."""
        if index <= self.snap_index:
            return
        if index > self.applied:
            raise AssertionError(f"compacting {index} beyond applied {self.applied}")
        term = self.term(index)
        assert term is not None
        del self.entries[: index - self.snap_index]
        self.snap_index = index
        self.snap_term = term
