"""Hostile but authenticated input: out-of-range numbers and crafted appends are dropped, never fatal."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from kcons.raft.cluster import free_ports
from kcons.raft.codec import decode_message, encode_message
from kcons.raft.errors import FrameRejectedError
from kcons.raft.messages import Entry, Message, MsgType, Snapshot, SnapshotMeta
from kcons.raft.node import NodeSettings, RaftNode
from kcons.raft.transport import KIND_RAFT, ROLE_PEER, Handshake, PeerAddress, client_session

SECRET = b"hostile-unit-secret-0123456789"
TOP = (1 << 64) - 1

HOSTILE = [
    Message(MsgType.HEARTBEAT, 2, 1, TOP),  # a term nobody can add one to
    Message(MsgType.VOTE, 2, 1, TOP, log_term=TOP, index=TOP),
    Message(MsgType.APP, 2, 1, 1, index=0, log_term=0, entries=(Entry(1, 5),)),  # a gap: index 1 expected
    Message(MsgType.APP, 2, 1, 1, index=0, log_term=0, entries=(Entry(1, 1), Entry(1, 3))),  # not contiguous
    Message(MsgType.APP, 2, 1, 1, index=0, log_term=0, entries=(Entry(9, 1),)),  # entry from a future term
    Message(MsgType.APP, 2, 1, 3, index=TOP - 1, log_term=1, commit=TOP),
    Message(MsgType.SNAP, 2, 1, 2, snapshot=Snapshot(SnapshotMeta(TOP, 1, (1, 2, 3)))),
]


@pytest.mark.parametrize("m", HOSTILE, ids=lambda m: f"{m.type.name}-{m.term}")
def test_out_of_range_or_inconsistent_messages_are_rejected_by_the_codec(m: Message) -> None:
    with pytest.raises(FrameRejectedError) as err:
        decode_message(encode_message(m))
    assert err.value.reason == "range"


async def _send_as_peer(addr: PeerAddress, messages: list[Message]) -> None:
    def send() -> None:
        for m in messages:  # one connection each: a rejected frame closes its connection
            with socket.create_connection((addr.host, addr.port), timeout=5) as s:
                session = client_session(s, Handshake(SECRET), ROLE_PEER, 2, 1)
                s.sendall(session.seal(KIND_RAFT, encode_message(m)))
                assert s.recv(10) == b""  # rejected: the node closes the connection

    await asyncio.to_thread(send)


def test_hostile_authenticated_messages_never_stop_the_node() -> None:
    async def scenario() -> tuple[BaseException | None, dict[str, object]]:
        ports = free_ports(3)
        peers = {i + 1: PeerAddress("127.0.0.1", p) for i, p in enumerate(ports)}
        node = RaftNode(NodeSettings(1, peers, SECRET, tick_s=0.01, election_tick=5))
        await node.start()
        try:
            await _send_as_peer(peers[1], HOSTILE)
            await asyncio.sleep(0.5)  # many election timeouts: a term of 2**64-1 would overflow here
            out = json.loads(await node.handle_request(b'{"op":"status"}'))
            return node.failure, out
        finally:
            await node.stop()

    failure, status = asyncio.run(scenario())
    assert failure is None
    assert status["ok"] is True
    assert isinstance(status["term"], int) and status["term"] < 1000


def test_membership_requests_for_unknown_or_huge_ids_are_refused_not_fatal() -> None:
    async def scenario() -> tuple[BaseException | None, list[dict[str, object]]]:
        (port,) = free_ports(1)
        node = RaftNode(NodeSettings(1, {1: PeerAddress("127.0.0.1", port)}, SECRET, tick_s=0.01))
        await node.start()
        try:
            for _ in range(300):
                if node.core.is_leader:
                    break
                await asyncio.sleep(0.01)
            answers = []
            for req in (
                {"op": "add_member", "id": 1 << 40},
                {"op": "add_member", "id": 7},
                {"op": "remove_member", "id": -1},
                {"op": "transfer", "id": 1 << 70},
                {"op": "watch", "after": 1 << 70, "wait": 0},
            ):
                answers.append(json.loads(await node.handle_request(json.dumps(req).encode())))
            await asyncio.sleep(0.05)
            answers.append(json.loads(await node.handle_request(b'{"op":"put","key":"k","value":"v"}')))
            return node.failure, answers
        finally:
            await node.stop()

    failure, answers = asyncio.run(scenario())
    assert failure is None
    assert [a.get("error") for a in answers[:4]] == ["bad_request"] * 4
    assert answers[-1].get("ok") is True


def _elect(seed: int) -> dict[int, object]:
    import random

    from kcons.raft.core import RaftConfig, RaftCore

    cores = {
        i: RaftCore(RaftConfig(id=i, election_tick=10, heartbeat_tick=1), (1, 2, 3), random.Random(seed * 10 + i))
        for i in (1, 2, 3)
    }
    for _ in range(300):
        for c in cores.values():
            c.tick()
        for c in cores.values():
            while c.has_ready():
                rd = c.ready()
                for m in rd.messages:
                    cores[m.dst].step(m)
                c.advance(rd)
        if any(c.is_leader for c in cores.values()):
            break
    return dict(cores)


def test_messages_that_pass_the_codec_never_raise_in_the_core() -> None:
    import random

    from kcons.raft.core import RaftCore

    stepped = 0
    for seed in range(150):
        rng = random.Random(seed)
        cores = _elect(seed)
        target = cores[rng.choice((1, 2, 3))]
        assert isinstance(target, RaftCore)
        if target.is_leader:
            target.propose(b"x")

        def num(rng: random.Random = rng) -> int:
            return rng.choice([0, 1, 2, 5, rng.randrange(1 << 20), 1 << 62])

        for _ in range(20):
            mtype = rng.choice(list(MsgType))
            term = rng.choice([target.term, target.term + 1, max(0, target.term - 1), num()])
            index = num() if rng.random() < 0.5 else rng.randrange(target.log.last_index() + 3)
            entries: tuple[Entry, ...] = ()
            if mtype is MsgType.APP and rng.random() < 0.6:
                entries = tuple(Entry(term, index + 1 + j, data=b"y") for j in range(rng.randrange(1, 4)))
            snap = Snapshot(SnapshotMeta(num(), rng.randrange(term + 1), (1, 2, 3))) if mtype is MsgType.SNAP else None
            m = Message(
                mtype,
                rng.choice([x for x in (1, 2, 3) if x != target.id]),
                target.id,
                term,
                log_term=rng.randrange(term + 1) if entries else rng.choice([0, target.term, num()]),
                index=index,
                commit=num(),
                entries=entries,
                reject=rng.random() < 0.3,
                hint=num(),
                context=rng.choice([b"", b"\0" * 8]),
                snapshot=snap,
            )
            try:
                m = decode_message(encode_message(m))
            except FrameRejectedError:
                continue
            target.step(m)  # must not raise: the node would stop
            target.tick()
            while target.has_ready():
                target.advance(target.ready())
            stepped += 1
    assert stepped > 1000
