"""Transport framing, authentication and settings, plus an in-process round trip over TCP."""

from __future__ import annotations

import asyncio
import struct

import pytest

from kcons.errors import ConfigError
from kcons.raft.errors import FrameRejectedError
from kcons.raft.messages import Message, MsgType
from kcons.raft.transport import (
    KIND_RAFT,
    KIND_REQUEST,
    KIND_RESPONSE,
    FrameCodec,
    PeerAddress,
    RaftTransport,
    load_secret,
    parse_peers,
)

SECRET = b"unit-test-secret-0123456789"


def test_sealed_frames_open_with_the_same_secret_only() -> None:
    frame = FrameCodec(SECRET).seal(KIND_RAFT, b"payload")
    (length,) = struct.unpack_from("<I", frame)
    body = frame[4:]
    assert length == len(body)
    assert FrameCodec(SECRET).open(body) == (KIND_RAFT, b"payload")
    with pytest.raises(FrameRejectedError, match="authentication"):
        FrameCodec(b"another-secret-0123456789").open(body)


def test_a_flipped_bit_anywhere_fails_authentication() -> None:
    body = FrameCodec(SECRET).seal(KIND_REQUEST, b"x" * 20)[4:]
    for i in range(len(body)):
        damaged = bytearray(body)
        damaged[i] ^= 1
        with pytest.raises(FrameRejectedError):
            FrameCodec(SECRET).open(bytes(damaged))


def test_secret_is_required_long_enough_and_never_shown() -> None:
    with pytest.raises(ConfigError) as info:
        load_secret(None, environ={})
    assert info.value.setting == "KCONS_RAFT_SECRET"
    with pytest.raises(ConfigError):
        load_secret(None, environ={"KCONS_RAFT_SECRET": "short"})
    assert load_secret(None, environ={"KCONS_RAFT_SECRET": SECRET.decode()}) == SECRET
    assert SECRET.decode() not in repr(FrameCodec(SECRET))


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


def test_messages_and_requests_cross_a_real_socket_and_garbage_is_counted() -> None:
    async def scenario() -> tuple[list[Message], int, bytes]:
        got: list[Message] = []

        async def answer(body: bytes) -> bytes:
            return b"echo:" + body

        from kcons.raft.cluster import free_ports

        p1, p2 = free_ports(2)
        peers = {1: PeerAddress("127.0.0.1", p1), 2: PeerAddress("127.0.0.1", p2)}
        t1 = RaftTransport(1, peers, SECRET, got.append, answer)
        t2 = RaftTransport(2, peers, SECRET, lambda m: None, answer)
        await t1.start()
        await t2.start()
        try:
            t2.send([Message(MsgType.HEARTBEAT, 2, 1, 5, commit=3)])
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.02)
            reader, writer = await asyncio.open_connection("127.0.0.1", p1)
            writer.write(FrameCodec(SECRET).seal(KIND_REQUEST, b"\x00" * 8 + b"hello"))
            kind, payload = await FrameCodec(SECRET).read(reader)
            assert kind == KIND_RESPONSE
            writer.write(b"\xff\xff\xff\x7f" + b"junk")
            await writer.drain()
            closed = await reader.read(10)
            writer.close()
            assert closed == b""
            return got, t1.rejected, payload
        finally:
            await t1.stop()
            await t2.stop()

    got, rejected, payload = asyncio.run(scenario())
    assert got == [Message(MsgType.HEARTBEAT, 2, 1, 5, commit=3)]
    assert payload == b"\x00" * 8 + b"echo:hello"
    assert rejected == 1
