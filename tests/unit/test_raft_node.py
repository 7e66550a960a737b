"""The asyncio node driver on one in-process node: the JSON request API and fail-stop on disk errors."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from kcons.raft.cluster import free_ports
from kcons.raft.errors import OutcomeUnknownError
from kcons.raft.messages import Entry, HardState, Snapshot
from kcons.raft.node import NodeSettings, RaftNode
from kcons.raft.storage import MemoryStorage, WalStorage
from kcons.raft.transport import PeerAddress

SECRET = b"node-unit-secret-0123456789"


def settings(data_dir: Path | None = None) -> NodeSettings:
    (port,) = free_ports(1)
    return NodeSettings(1, {1: PeerAddress("127.0.0.1", port)}, SECRET, data_dir=data_dir, tick_s=0.01)


async def ask(node: RaftNode, **req: object) -> dict[str, object]:
    out: dict[str, object] = json.loads(await node.handle_request(json.dumps(req).encode()))
    return out


async def until_leader(node: RaftNode) -> None:
    for _ in range(500):
        if node.core.is_leader:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no leader")


def test_single_node_serves_the_request_api_and_recovers_from_its_wal(tmp_path: Path) -> None:
    async def first() -> None:
        node = RaftNode(settings(tmp_path))
        await node.start()
        try:
            await until_leader(node)
            assert (await ask(node, op="put", key="a", value="1"))["version"] == 1
            assert (await ask(node, op="cas", key="a", version=1, value="2"))["ok"] is True
            got = await ask(node, op="get", key="a")
            assert (got["value"], got["version"]) == ("2", 2)
            assert (await ask(node, op="nonsense"))["error"] == "bad_request"
            assert (await ask(node, op="members"))["voters"] == [1]
        finally:
            await node.stop()

    async def second() -> None:
        node = RaftNode(settings(tmp_path))
        await node.start()
        try:
            await until_leader(node)
            got = await ask(node, op="get", key="a")
            assert (got["value"], got["version"]) == ("2", 2)
        finally:
            await node.stop()

    asyncio.run(first())
    asyncio.run(second())


class FailingStorage(MemoryStorage):
    """Memory storage whose disk 'breaks' after ``fail_after`` saves."""

    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.fail_after = fail_after

    def save(self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None) -> None:
        if self.saves >= self.fail_after:
            raise OSError(5, "Input/output error")
        super().save(hard_state, entries, snapshot)


def test_a_storage_error_stops_the_node_instead_of_answering_without_disk() -> None:
    async def scenario() -> None:
        storage = FailingStorage(fail_after=10**9)
        node = RaftNode(settings(), storage=storage)
        await node.start()
        try:
            await until_leader(node)
            await node.propose({"op": "put", "key": "k", "value": "v"})
            storage.fail_after = storage.saves
            with pytest.raises(OutcomeUnknownError):
                await asyncio.wait_for(node.propose({"op": "put", "key": "k", "value": "w"}), 5)
            assert isinstance(await asyncio.wait_for(node.wait_failed(), 5), OSError)
            with pytest.raises(OutcomeUnknownError):
                await node.propose({"op": "put", "key": "k", "value": "x"})
        finally:
            await node.stop()

    asyncio.run(scenario())


def test_wal_storage_is_used_when_a_data_dir_is_given(tmp_path: Path) -> None:
    node = RaftNode(settings(tmp_path / "d"))
    assert isinstance(node.storage, WalStorage)
    node.storage.close()


def test_a_leader_keeps_its_followers_while_its_disk_stalls(tmp_path: Path) -> None:
    """A WAL write that takes several election timeouts does not silence the leader: no election."""
    ports = free_ports(3)
    peers = {i + 1: PeerAddress("127.0.0.1", p) for i, p in enumerate(ports)}

    async def scenario() -> tuple[int, int, int, dict[str, object]]:
        nodes = [
            RaftNode(NodeSettings(i, peers, SECRET, data_dir=tmp_path / str(i), tick_s=0.02, election_tick=10))
            for i in peers
        ]
        for n in nodes:
            await n.start()
        try:
            for _ in range(500):
                leaders = [n for n in nodes if n.core.is_leader]
                if leaders and all(n.core.leader == leaders[0].id for n in nodes):
                    break
                await asyncio.sleep(0.02)
            leader = leaders[0]
            assert (await ask(leader, op="put", key="warm", value="1"))["ok"] is True
            term = leader.core.term
            save = leader.storage.save

            def slow_save(*args: object) -> None:
                time.sleep(1.5)  # about five election timeouts (0.2 to 0.4 s)
                save(*args)  # type: ignore[arg-type]

            leader.storage.save = slow_save  # type: ignore[method-assign]
            answer = await ask(leader, op="put", key="k", value="v")
            leader.storage.save = save  # type: ignore[method-assign]
            await asyncio.sleep(0.3)
            return term, leader.core.term, max(n.core.term for n in nodes), answer
        finally:
            for n in nodes:
                await n.stop()

    term_before, term_after, highest, answer = asyncio.run(scenario())
    assert answer.get("ok") is True
    assert term_after == term_before == highest, "a follower campaigned while the leader was writing"
