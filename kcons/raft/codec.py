"""Compact binary encoding of Raft messages, entries and snapshots (little-endian, length-prefixed).

Decoding validates every length and enum and raises :class:`FrameRejectedError` on anything
malformed, so a bad frame is dropped and counted instead of crashing the node. Numbers are
range-checked too (reason ``range``): terms and indexes stay below :data:`MAX_TERM` (2**62, so
``term + 1`` and index arithmetic never overflow the u64 fields), node ids are positive, and an
append's entries must follow its ``index`` one by one, with terms between its ``log_term`` and
its ``term``. A message that passes decodes into something the core can step without tripping
an invariant.
"""

from __future__ import annotations

import struct

from kcons.raft.errors import FrameRejectedError
from kcons.raft.messages import Entry, EntryKind, HardState, Message, MsgType, Snapshot, SnapshotMeta

__all__ = [
    "MAX_TERM",
    "decode_entries",
    "decode_hard_state",
    "decode_message",
    "decode_snapshot",
    "encode_entries",
    "encode_hard_state",
    "encode_message",
    "encode_snapshot",
]

_HEAD = struct.Struct("<BIIQQQQBQHI")  # type src dst term log_term index commit reject hint ctx_len n_entries
_ENTRY = struct.Struct("<QQBI")  # term index kind data_len
_HS = struct.Struct("<QQQ")
_SNAP_META = struct.Struct("<QQH")
_U32 = struct.Struct("<I")
_KINDS = {k.value: k for k in EntryKind}
_TYPES = {t.value: t for t in MsgType}
MAX_TERM = 1 << 62  # also the bound on indexes and commit marks
_MAX_CONTEXT = 1024
_MAX_VOTERS = 1024


def _range(message: str) -> FrameRejectedError:
    return FrameRejectedError(message, reason="range")


def encode_entries(entries: tuple[Entry, ...] | list[Entry]) -> bytes:
    """Entries one after another (no count; the caller frames them)."""
    parts: list[bytes] = []
    pack = _ENTRY.pack
    for e in entries:
        parts.append(pack(e.term, e.index, e.kind, len(e.data)))
        parts.append(e.data)
    return b"".join(parts)


def decode_entries(
    buf: bytes | memoryview, count: int, offset: int = 0, follow: tuple[int, int, int] | None = None
) -> tuple[list[Entry], int]:
    """Read ``count`` entries from ``buf`` at ``offset``; returns them and the offset after them.

    With ``follow=(prev_index, log_term, term)`` the entries must be an append's: indexes
    ``prev_index + 1, + 2, ...`` and non-decreasing terms within ``[log_term, term]``.
    """
    out: list[Entry] = []
    unpack = _ENTRY.unpack_from
    size = _ENTRY.size
    n = len(buf)
    prev, low, high = follow if follow is not None else (-1, 0, 0)
    try:
        for _ in range(count):
            term, index, kind, length = unpack(buf, offset)
            if prev >= 0:  # an append's entry: its index is implied, so range-checked too
                prev += 1
                if index != prev or term < low or term > high:
                    raise _range(f"entry {index} (term {term}) does not follow {prev - 1} within [{low}, {high}]")
                low = term
            elif term > MAX_TERM or index > MAX_TERM or index == 0:
                raise _range(f"entry term {term} or index {index} out of range")
            offset += size
            if offset + length > n:
                raise FrameRejectedError("entry data runs past the end")
            out.append(Entry(term, index, _KINDS[kind], bytes(buf[offset : offset + length])))
            offset += length
    except (struct.error, KeyError) as exc:
        raise FrameRejectedError(f"malformed entry: {exc}") from None
    return out, offset


def encode_hard_state(hs: HardState) -> bytes:
    """24 bytes: term, vote, commit."""
    return _HS.pack(hs.term, hs.vote, hs.commit)


def decode_hard_state(buf: bytes | memoryview, offset: int = 0) -> HardState:
    """Inverse of :func:`encode_hard_state`."""
    try:
        hs = HardState(*_HS.unpack_from(buf, offset))
    except struct.error as exc:
        raise FrameRejectedError(f"malformed hard state: {exc}") from None
    if hs.term > MAX_TERM or hs.commit > MAX_TERM:
        raise _range(f"hard state term {hs.term} or commit {hs.commit} out of range")
    return hs


def encode_snapshot(s: Snapshot) -> bytes:
    """Snapshot metadata, voters and data."""
    m = s.meta
    return b"".join(
        [
            _SNAP_META.pack(m.index, m.term, len(m.voters)),
            b"".join(_U32.pack(v) for v in m.voters),
            _U32.pack(len(s.data)),
            s.data,
        ]
    )


def decode_snapshot(buf: bytes | memoryview, offset: int = 0) -> tuple[Snapshot, int]:
    """Inverse of :func:`encode_snapshot`; returns the snapshot and the offset after it."""
    try:
        index, term, nv = _SNAP_META.unpack_from(buf, offset)
        offset += _SNAP_META.size
        voters = tuple(_U32.unpack_from(buf, offset + 4 * i)[0] for i in range(nv))
        offset += 4 * nv
        (length,) = _U32.unpack_from(buf, offset)
        offset += 4
    except struct.error as exc:
        raise FrameRejectedError(f"malformed snapshot: {exc}") from None
    if offset + length > len(buf):
        raise FrameRejectedError("snapshot data runs past the end")
    if index > MAX_TERM or term > MAX_TERM or not 0 < nv <= _MAX_VOTERS or 0 in voters:
        raise _range(f"snapshot index {index}, term {term} or voters out of range")
    data = bytes(buf[offset : offset + length])
    return Snapshot(SnapshotMeta(index, term, voters), data), offset + length


def encode_message(m: Message) -> bytes:
    """One message as bytes."""
    head = _HEAD.pack(
        m.type,
        m.src,
        m.dst,
        m.term,
        m.log_term,
        m.index,
        m.commit,
        1 if m.reject else 0,
        m.hint,
        len(m.context),
        len(m.entries),
    )
    snap = b"\x01" + encode_snapshot(m.snapshot) if m.snapshot is not None else b"\x00"
    return b"".join([head, m.context, encode_entries(m.entries), snap])


def decode_message(buf: bytes | memoryview) -> Message:
    """Inverse of :func:`encode_message`; raises FrameRejectedError on malformed input."""
    try:
        t, src, dst, term, log_term, index, commit, reject, hint, ctx_len, n_entries = _HEAD.unpack_from(buf, 0)
    except struct.error as exc:
        raise FrameRejectedError(f"malformed message header: {exc}") from None
    mtype = _TYPES.get(t)
    if mtype is None or reject > 1:
        raise FrameRejectedError(f"unknown message type {t}")
    if max(term, log_term, index, commit, hint) > MAX_TERM or src == 0 or dst == 0 or ctx_len > _MAX_CONTEXT:
        raise _range("term, index, commit, hint, node id or context length out of range")
    if n_entries and mtype is not MsgType.APP:
        raise _range(f"{mtype.name} carries entries")
    offset = _HEAD.size
    if offset + ctx_len > len(buf):
        raise FrameRejectedError("context runs past the end")
    context = bytes(buf[offset : offset + ctx_len])
    offset += ctx_len
    entries, offset = decode_entries(buf, n_entries, offset, (index, log_term, term))
    if offset >= len(buf):
        raise FrameRejectedError("missing snapshot flag")
    flag = buf[offset]
    offset += 1
    snapshot = None
    if flag == 1:
        snapshot, offset = decode_snapshot(buf, offset)
    elif flag != 0:
        raise FrameRejectedError("bad snapshot flag")
    if offset != len(buf):
        raise FrameRejectedError("trailing bytes after message")
    if snapshot is not None and (mtype is not MsgType.SNAP or snapshot.meta.term > term):
        raise _range("snapshot out of place or from a future term")
    return Message(
        mtype,
        src,
        dst,
        term,
        log_term=log_term,
        index=index,
        commit=commit,
        entries=tuple(entries),
        reject=bool(reject),
        hint=hint,
        context=context,
        snapshot=snapshot,
    )

