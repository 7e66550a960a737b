"""Recorded traffic is worth nothing: replayed requests are refused and replayed answers are not believed."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from kcons.errors import KconsError
from kcons.raft.client import RaftClient
from kcons.raft.cluster import LocalRaftCluster, RecordingProxy, replay
from kcons.raft.transport import PeerAddress

SECRET = b"replay-test-secret-0123456789"


def test_a_replayed_membership_change_is_not_applied_again(tmp_path: Path) -> None:
    with LocalRaftCluster(3, tmp_path, SECRET, tick_ms=20) as cluster:
        leader = cluster.wait_for_leader()
        victim = next(i for i in cluster.addresses if i != leader)
        proxy = RecordingProxy(cluster.addresses[leader]).start()
        try:
            with RaftClient({leader: proxy.address}, SECRET, timeout=10) as c:
                c.remove_member(victim)
            with cluster.client() as c:
                c.add_member(victim)
                assert victim in c.members()["voters"]
            recorded = bytes(proxy.sessions[0][0])
        finally:
            proxy.close()
        replay(cluster.addresses[leader], recorded)  # the attacker has no secret, only the recording
        with cluster.client() as c:
            c.put("barrier", "x")  # anything the replay could have proposed is committed by now
            assert victim in c.members()["voters"]


def test_a_client_does_not_accept_a_recorded_answer_from_an_earlier_process(tmp_path: Path) -> None:
    with LocalRaftCluster(3, tmp_path, SECRET, tick_ms=20) as cluster:
        leader = cluster.wait_for_leader()
        with cluster.client() as c:
            c.put("k", "old")
        proxy = RecordingProxy(cluster.addresses[leader]).start()
        try:
            with RaftClient({leader: proxy.address}, SECRET, timeout=10) as c:
                assert c.get("k") is not None
            answer = bytes(proxy.sessions[0][1])
        finally:
            proxy.close()
        with cluster.client() as c:
            c.put("k", "new")

    # An impostor that plays back the recorded answer to whoever connects.
    impostor = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = impostor.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        fresh = RaftClient({leader: PeerAddress("127.0.0.1", impostor.getsockname()[1])}, SECRET, timeout=2)
        with fresh, pytest.raises(KconsError):
            fresh.get("k")  # a new process starts its request ids at 1 again
    finally:
        impostor.close()
