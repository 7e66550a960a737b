"""Binary encoding of Raft messages: round trips, and rejection of malformed frames."""

from __future__ import annotations

import random

import pytest

from kcons.raft.codec import decode_message, encode_message
from kcons.raft.errors import FrameRejectedError
from kcons.raft.messages import Entry, EntryKind, Message, MsgType, Snapshot, SnapshotMeta


def sample() -> Message:
    return Message(
        MsgType.APP,
        1,
        2,
        7,
        log_term=6,
        index=41,
        commit=40,
        entries=(Entry(7, 42, EntryKind.NORMAL, b"x" * 64), Entry(7, 43, EntryKind.CONFIG, b"1,2,3")),
        reject=False,
        hint=3,
        context=b"ctx",
    )


def test_messages_round_trip_exactly() -> None:
    m = sample()
    assert decode_message(encode_message(m)) == m
    snap = Message(MsgType.SNAP, 1, 3, 9, snapshot=Snapshot(SnapshotMeta(100, 8, (1, 2, 3)), b"image"))
    assert decode_message(encode_message(snap)) == snap
    resp = Message(MsgType.APP_RESP, 3, 1, 9, index=5, reject=True, hint=4)
    assert decode_message(encode_message(resp)) == resp


def test_truncated_frames_are_rejected_not_crashing() -> None:
    raw = encode_message(sample())
    for cut in range(len(raw)):
        with pytest.raises(FrameRejectedError):
            decode_message(raw[:cut])


def test_trailing_bytes_and_unknown_types_are_rejected() -> None:
    raw = encode_message(sample())
    with pytest.raises(FrameRejectedError):
        decode_message(raw + b"\x00")
    with pytest.raises(FrameRejectedError):
        decode_message(bytes([99]) + raw[1:])


def test_random_garbage_never_raises_anything_but_frame_rejected() -> None:
    rng = random.Random(3)
    raw = encode_message(sample())
    rejected = 0
    for _ in range(2000):
        buf = bytearray(raw)
        for _ in range(rng.randrange(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        try:
            decode_message(bytes(buf))  # some damage still decodes (the HMAC catches it in transport)
        except FrameRejectedError:
            rejected += 1
    assert rejected > 100
