"""Transport framing, authentication and settings, plus an in-process round trip over TCP."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from kcons.errors import ConfigError
from kcons.raft.errors import FrameRejectedError
from kcons.raft.messages import Message, MsgType
from kcons.raft.transport import (
    KIND_RAFT,
    KIND_REQUEST,
    KIND_RESPONSE,
    ROLE_CLIENT,
    ROLE_PEER,
    Handshake,
    PeerAddress,
    RaftTransport,
    Session,
    client_session,
    load_secret,
    parse_peers,
    read_frame,
)

SECRET = b"unit-test-secret-0123456789"


def _pair(secret_a: bytes = SECRET, secret_b: bytes = SECRET) -> tuple[Session, Session]:
    """An initiator's and a responder's session after an in-memory handshake."""
    a, b = Handshake(secret_a), Handshake(secret_b)
    hello = a.hello(ROLE_PEER, 2, 1)
    ack, transcript, role, sender = b.accept(hello, 1)
    confirm, initiator = a.initiator_session(hello, ack, ROLE_PEER, 1)
    return initiator, b.responder_session(transcript, confirm, role, sender)


def test_sealed_frames_open_on_the_other_side_of_the_session_only() -> None:
    i, r = _pair()
    frame = i.seal(KIND_RAFT, b"payload")
    (length,) = struct.unpack_from("<I", frame)
    assert length == len(frame) - 4
    assert r.open(frame) == (KIND_RAFT, b"payload")
    i2, r2 = _pair()  # another connection: other nonces, other keys
    with pytest.raises(FrameRejectedError) as err:
        r2.open(i.seal(KIND_RAFT, b"payload"))
    assert err.value.reason == "auth"
    del i2


def test_a_frame_replayed_on_its_own_connection_is_refused_by_its_sequence_number() -> None:
    i, r = _pair()
    first = i.seal(KIND_RAFT, b"one")
    assert r.open(first) == (KIND_RAFT, b"one")
    with pytest.raises(FrameRejectedError) as err:
        r.open(first)
    assert err.value.reason == "replay"
    skipped = i.seal(KIND_RAFT, b"two")
    del skipped
    with pytest.raises(FrameRejectedError):
        r.open(i.seal(KIND_RAFT, b"three"))  # a dropped frame in between is not accepted either


def test_the_handshake_fails_without_the_secret_on_either_side() -> None:
    with pytest.raises(FrameRejectedError):
        _pair(secret_a=b"another-secret-0123456789")
    with pytest.raises(FrameRejectedError):
        _pair(secret_b=b"another-secret-0123456789")
    a = Handshake(SECRET)
    hello = a.hello(ROLE_PEER, 2, 1)
    with pytest.raises(FrameRejectedError) as err:
        Handshake(SECRET).accept(hello, 3)  # meant for node 1
    assert err.value.reason == "handshake"
    ack, _, _, _ = Handshake(SECRET).accept(hello, 1)
    with pytest.raises(FrameRejectedError):
        a.initiator_session(a.hello(ROLE_PEER, 2, 1), ack, ROLE_PEER, 1)  # an ACK recorded for another HELLO


def test_a_flipped_bit_anywhere_fails_authentication() -> None:
    i, _ = _pair()
    frame = i.seal(KIND_REQUEST, b"x" * 20)
    for n in range(len(frame)):
        _, fresh = _pair()
        damaged = bytearray(frame)
        damaged[n] ^= 1
        with pytest.raises(FrameRejectedError):
            fresh.open(bytes(damaged))


def test_secret_is_required_long_enough_and_never_shown() -> None:
    with pytest.raises(ConfigError) as info:
        load_secret(None, environ={})
    assert info.value.setting == "KCONS_RAFT_SECRET"
    with pytest.raises(ConfigError):
        load_secret(None, environ={"KCONS_RAFT_SECRET": "short"})
    assert load_secret(None, environ={"KCONS_RAFT_SECRET": SECRET.decode()}) == SECRET
    assert SECRET.decode() not in repr(Handshake(SECRET))
    assert SECRET.decode() not in repr(_pair()[0])


def test_secret_file_is_read_and_a_missing_one_names_the_option(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "secret"
    f.write_bytes(SECRET + b"\n")
    assert load_secret(str(f), environ={}) == SECRET
    with pytest.raises(ConfigError) as info:
        load_secret(str(tmp_path / "missing"), environ={})
    assert info.value.setting == "--secret-file"


def test_peer_lists_are_parsed_and_bad_entries_name_the_setting() -> None:
    peers = parse_peers("1=127.0.0.1:7001, 2=localhost:7002")
    assert peers == {1: PeerAddress("127.0.0.1", 7001), 2: PeerAddress("localhost", 7002)}
    for bad in ["", "1=127.0.0.1", "x=host:1", "0=h:1", "1=h:99999"]:
        with pytest.raises(ConfigError) as info:
            parse_peers(bad)
        assert info.value.setting == "--peers"


async def _started_pair(
    got: list[Message], answer: Callable[[bytes], Awaitable[bytes]]
) -> tuple[RaftTransport, RaftTransport, int]:
    """Transports of nodes 1 and 2 on free local ports, started; node 1 collects what it receives."""
    from kcons.raft.cluster import free_ports

    p1, p2 = free_ports(2)
    peers = {1: PeerAddress("127.0.0.1", p1), 2: PeerAddress("127.0.0.1", p2)}
    t1 = RaftTransport(1, peers, SECRET, got.append, answer)
    t2 = RaftTransport(2, peers, SECRET, lambda m: None, answer)
    await t1.start()
    await t2.start()
    return t1, t2, p1


def test_messages_and_requests_cross_a_real_socket_and_garbage_is_counted() -> None:
    async def scenario() -> tuple[list[Message], int, bytes]:
        got: list[Message] = []

        async def answer(body: bytes) -> bytes:
            return b"echo:" + body

        t1, t2, p1 = await _started_pair(got, answer)
        try:
            t2.send([Message(MsgType.HEARTBEAT, 2, 1, 5, commit=3)])
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.02)
            def client() -> tuple[bytes, bytes]:
                with socket.create_connection(("127.0.0.1", p1), timeout=5) as s:
                    session = client_session(s, Handshake(SECRET), ROLE_CLIENT, 0, 1)
                    s.sendall(session.seal(KIND_REQUEST, b"\x00" * 8 + b"hello"))
                    kind, payload = read_frame(s, session, 1 << 20)
                    assert kind == KIND_RESPONSE
                    s.sendall(b"\xff\xff\xff\x7f" + b"junk")
                    return payload, s.recv(10)

            payload, closed = await asyncio.to_thread(client)
            assert closed == b""
            return got, t1.rejected, payload
        finally:
            await t1.stop()
            await t2.stop()

    got, rejected, payload = asyncio.run(scenario())
    assert got == [Message(MsgType.HEARTBEAT, 2, 1, 5, commit=3)]
    assert payload == b"\x00" * 8 + b"echo:hello"
    assert rejected == 1


def test_connections_handshakes_and_idle_links_are_bounded() -> None:
    async def scenario() -> dict[str, object]:
        from kcons.raft.cluster import free_ports

        async def answer(body: bytes) -> bytes:
            return body

        (port,) = free_ports(1)
        peers = {1: PeerAddress("127.0.0.1", port)}
        t = RaftTransport(
            1, peers, SECRET, lambda m: None, answer, max_connections=4, handshake_timeout=0.3, idle_timeout=0.6
        )
        await t.start()
        try:

            def probe() -> dict[str, object]:
                out: dict[str, object] = {}
                slow = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(4)]
                for s in slow:
                    s.sendall(b"KRFT")  # a slowloris: starts a hello and never finishes it
                extra = socket.create_connection(("127.0.0.1", port), timeout=3)
                out["extra_closed"] = extra.recv(10) == b""  # over the limit: closed at once
                extra.close()
                out["slow_closed"] = all(s.recv(10) == b"" for s in slow)  # handshake timeout
                for s in slow:
                    s.close()
                with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                    try:
                        s.sendall(b"\x00" * (8 << 20))  # megabytes before any handshake: 48 bytes read, then closed
                        out["junk_closed"] = s.recv(10) == b""
                    except (ConnectionResetError, BrokenPipeError):  # closed while we were still sending
                        out["junk_closed"] = True
                with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                    session = client_session(s, Handshake(SECRET), ROLE_CLIENT, 0, 1)
                    s.sendall(session.seal(KIND_REQUEST, b"\x00" * 8 + b"ping"))
                    out["answer"] = read_frame(s, session, 1 << 20)[1]
                    out["idle_closed"] = s.recv(10) == b""  # nothing pending: closed after the idle timeout
                return out

            out = await asyncio.to_thread(probe)
            out["open"] = t.connections()
            return out
        finally:
            await t.stop()

    out = asyncio.run(scenario())
    assert out == {
        "extra_closed": True,
        "slow_closed": True,
        "junk_closed": True,
        "answer": b"\x00" * 8 + b"ping",
        "idle_closed": True,
        "open": 0,
    }


def test_heartbeats_overtake_a_catch_up_backlog_and_appends_keep_their_order() -> None:
    from kcons.raft.messages import Entry
    from kcons.raft.transport import INLINE_APPEND_ENTRIES

    def append(index: int, n: int) -> Message:
        entries = tuple(Entry(1, index + 1 + i, data=b"x" * 40) for i in range(n))
        return Message(MsgType.APP, 2, 1, 1, log_term=1, index=index, commit=0, entries=entries)

    async def scenario() -> list[Message]:
        got: list[Message] = []

        async def answer(body: bytes) -> bytes:
            return body

        t1, t2, _ = await _started_pair(got, answer)
        try:
            t2.send([Message(MsgType.HEARTBEAT, 2, 1, 1)])  # the link is up once this arrives
            for _ in range(250):
                if got:
                    break
                await asyncio.sleep(0.02)
            got.clear()
            big = 4 * INLINE_APPEND_ENTRIES
            backlog = [append(i * big, big) for i in range(20)]
            small = append(20 * big, 1)  # small, but behind the backlog: it must not overtake it
            t2.send([*backlog, Message(MsgType.HEARTBEAT, 2, 1, 1, commit=7), small])
            for _ in range(250):
                if len(got) == 22:
                    break
                await asyncio.sleep(0.02)
            return got
        finally:
            await t1.stop()
            await t2.stop()

    got = asyncio.run(scenario())
    assert [m.type for m in got] == [MsgType.HEARTBEAT] + [MsgType.APP] * 21
    assert got[0].commit == 7
    assert [m.index for m in got[1:]] == [i * 4 * INLINE_APPEND_ENTRIES for i in range(21)]
