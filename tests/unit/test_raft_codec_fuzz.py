"""Fuzzing the Raft decoders: every input decodes or raises the codec's typed error, nothing else."""

from __future__ import annotations

import contextlib
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kcons.raft.codec import MAX_TERM, decode_entries, decode_message, decode_snapshot, encode_message
from kcons.raft.errors import FrameRejectedError
from kcons.raft.messages import Entry, EntryKind, Message, MsgType, Snapshot, SnapshotMeta
from kcons.raft.transport import ROLE_PEER, Handshake, read_frame

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECRET = b"fuzz-unit-secret-0123456789"

numbers = st.one_of(st.integers(0, 8), st.integers(0, (1 << 64) - 1), st.just(MAX_TERM), st.just(MAX_TERM + 1))


@st.composite
def messages(draw: st.DrawFn) -> Message:
    mtype = draw(st.sampled_from(list(MsgType)))
    term = draw(numbers)
    index = draw(numbers)
    entries: tuple[Entry, ...] = ()
    if mtype is MsgType.APP and draw(st.booleans()):
        n = draw(st.integers(1, 4))
        # The last entry's index must still fit the frame's u64 (the decoder is what is fuzzed).
        start = min(draw(st.one_of(st.just(index + 1), numbers)), (1 << 64) - n)
        entries = tuple(
            Entry(draw(numbers), start + i, draw(st.sampled_from(list(EntryKind))), draw(st.binary(max_size=16)))
            for i in range(n)
        )
    snap = None
    if mtype is MsgType.SNAP:
        voters = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
        snap = Snapshot(SnapshotMeta(draw(numbers), draw(numbers), voters), draw(st.binary(max_size=16)))
    return Message(
        mtype,
        draw(st.integers(0, 4)),
        draw(st.integers(0, 4)),
        term,
        log_term=draw(numbers),
        index=index,
        commit=draw(numbers),
        entries=entries,
        reject=draw(st.booleans()),
        hint=draw(numbers),
        context=draw(st.binary(max_size=16)),
        snapshot=snap,
    )


def _decodes_or_rejects(raw: bytes) -> None:
    try:
        m = decode_message(raw)
    except FrameRejectedError as exc:
        assert exc.reason in {"range", "malformed"}
        return
    # What decodes is in range and re-encodes to the same bytes.
    assert max(m.term, m.index, m.log_term, m.commit, m.hint) <= MAX_TERM
    assert encode_message(m) == raw


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_the_typed_error(raw: bytes) -> None:
    _decodes_or_rejects(raw)


@FUZZ
@given(messages(), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4), st.integers(0, 8))
def test_mutated_messages_decode_or_raise_the_typed_error(m: Message, flips: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(encode_message(m))
    for pos, value in flips:
        if raw:
            raw[pos % len(raw)] = value
    _decodes_or_rejects(bytes(raw[: len(raw) - cut] if cut < len(raw) else raw))


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 1 << 32))
def test_entry_and_snapshot_decoders_raise_only_the_typed_error(raw: bytes, count: int) -> None:
    for decode in (lambda: decode_entries(raw, count % 64), lambda: decode_snapshot(raw)):
        with contextlib.suppress(FrameRejectedError):
            decode()


@FUZZ
@given(st.binary(min_size=48, max_size=48), st.binary(max_size=200))
def test_handshake_and_frames_from_strangers_raise_only_the_typed_error(hello: bytes, frame: bytes) -> None:
    hs = Handshake(SECRET)
    with contextlib.suppress(FrameRejectedError):
        hs.accept(hello, 1)
    own_hello = hs.hello(ROLE_PEER, 2, 1)
    ack, transcript, role, sender = hs.accept(own_hello, 1)
    confirm, initiator = hs.initiator_session(own_hello, ack, ROLE_PEER, 1)
    session = hs.responder_session(transcript, confirm, role, sender)
    del initiator
    with pytest.raises(FrameRejectedError):
        session.open(frame)  # made without the session keys
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises((FrameRejectedError, ConnectionError)):
            read_frame(b, session, 1 << 16)
