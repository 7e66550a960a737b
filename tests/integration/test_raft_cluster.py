"""The Raft metadata store as real node processes on localhost: replication, failover, recovery,
authentication, leases for the outbox relay, watches, membership and the CLI."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kcons.adapters.raft import RaftLeaseBackend
from kcons.lease import LeaseBackend
from kcons.raft.cluster import LocalRaftCluster
from kcons.raft.transport import KIND_RAFT, ROLE_PEER, Handshake, Session, client_session

pytestmark = pytest.mark.integration

SECRET = b"integration-secret-0123456789"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRaftCluster]:
    """One 3-node cluster shared by the tests that do not kill nodes."""
    with LocalRaftCluster(3, tmp_path_factory.mktemp("raft"), SECRET, metrics=True) as c:
        yield c


def test_writes_replicate_and_reads_see_the_latest_value(cluster: LocalRaftCluster) -> None:
    with cluster.client() as c:
        assert c.put("config/a", "1") == 1
        assert c.put("config/a", "2") == 2
        item = c.get("config/a")
        assert item is not None and (item.value, item.version) == ("2", 2)
        assert c.cas("config/a", 2, "3") == (True, 3)
        assert c.cas("config/a", 2, "4") == (False, 3)
        assert c.cas("config/new", 0, "x") == (True, 1)
        assert c.delete("config/a") is True
        assert c.get("config/a") is None
        assert c.get("config/new", lease=True) is not None
        leader = cluster.leader()
        follower = next(i for i in cluster.addresses if i != leader)
        item = c.get("config/new", at_node=follower)  # forwarded ReadIndex, served by the follower
        assert item is not None and item.value == "x"


def test_acknowledged_writes_survive_failover_compaction_catch_up_and_full_restart(tmp_path: Path) -> None:
    env = {"KCONS_RAFT_SNAPSHOT_EVERY": "20"}
    cluster = LocalRaftCluster(3, tmp_path, SECRET, env=env)
    with cluster, cluster.client() as c:
        for n in range(20):
            c.put(f"k{n}", str(n))
        old = cluster.leader()
        assert old is not None
        cluster.kill(old)
        c.put("after", "failover")  # the client finds the new leader by itself
        new = cluster.wait_for_leader()
        assert new != old
        for n in range(100):  # the survivors compact their logs meanwhile
            c.put(f"s{n}", str(n))
        cluster.start_node(old)
        cluster.wait_for_node(old, min_applied=c.status(new)["commit"])
        c.transfer_leadership(old)
        deadline = time.monotonic() + 10
        while cluster.leader() != old and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cluster.leader() == old  # it caught up (by snapshot or entries) and could take over
        assert c.get("after").value == "failover"  # type: ignore[union-attr]
        assert (tmp_path / f"node{new}" / "raft.snap").exists()
        for i in cluster.addresses:
            cluster.kill(i)  # SIGKILL everything: only what was fsynced survives
        cluster.start()
        assert [c.get(f"k{n}").value for n in range(20)] == [str(n) for n in range(20)]  # type: ignore[union-attr]
        assert [c.get(f"s{n}").value for n in range(100)] == [str(n) for n in range(100)]  # type: ignore[union-attr]


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_unauthenticated_and_malformed_frames_are_rejected_counted_and_harmless(cluster: LocalRaftCluster) -> None:
    node = 1
    addr = cluster.addresses[node]
    before = _metric(cluster.metrics_ports[node], "kcons_raft_frames_rejected_total")

    def authentic(secret: bytes, role: int = ROLE_PEER) -> tuple[socket.socket, Session]:
        s = socket.create_connection((addr.host, addr.port), timeout=2)
        return s, client_session(s, Handshake(secret), role, 2 if role == ROLE_PEER else 0, node)

    # A wrong secret fails the handshake itself (the node cannot prove itself to us either).
    with socket.create_connection((addr.host, addr.port), timeout=2) as s:
        hello = Handshake.hello(ROLE_PEER, 2, node)
        s.sendall(hello)
        s.recv(1024)
        s.sendall(b"\x00" * 32)  # a CONFIRM computed without the secret
        assert s.recv(10) == b""
    for payload in (
        lambda sess: struct.pack("<I", 1 << 31) + b"x" * 10,  # oversized length
        lambda sess: sess.seal(KIND_RAFT, b"\x07garbage"),  # authentic but not a message
        lambda sess: sess.seal(99, b""),  # unknown kind
    ):
        s, session = authentic(SECRET)
        with s:
            s.sendall(payload(session))
            assert s.recv(10) == b""  # the node closes the connection
    with socket.create_connection((addr.host, addr.port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n" + b"x" * 100)  # not a kcons hello
        assert s.recv(10) == b""
    after = _metric(cluster.metrics_ports[node], "kcons_raft_frames_rejected_total")
    assert after - before == 5
    assert cluster.alive(node)
    with cluster.client() as c:
        c.put("still", "working")
        assert c.status(node)["ok"] is True


def test_node_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KCONS_RAFT_SECRET"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kcons.raft",
            "serve",
            "--id",
            "1",
            "--peers",
            "1=127.0.0.1:1",
            "--data-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert "KCONS_RAFT_SECRET" in r.stderr


def test_raft_lease_backend_grants_one_holder_with_increasing_fencing_tokens(cluster: LocalRaftCluster) -> None:
    with cluster.client() as ca, cluster.client() as cb:
        a, b = RaftLeaseBackend(ca), RaftLeaseBackend(cb)
        assert isinstance(a, LeaseBackend)
        la = a.acquire("outbox:orders", "relay-a", 2.0)
        assert la is not None
        assert b.acquire("outbox:orders", "relay-b", 2.0) is None
        renewed = a.renew(la, 2.0)
        assert renewed is not None and renewed.token == la.token
        a.release(la)
        lb = b.acquire("outbox:orders", "relay-b", 1.0)
        assert lb is not None and lb.token > la.token
        assert a.renew(la, 2.0) is None  # the old token is fenced
        time.sleep(1.5)  # lb expires (leader clock)
        la2 = a.acquire("outbox:orders", "relay-a", 5.0)
        assert la2 is not None and la2.token > lb.token
        assert b.renew(lb, 1.0) is None


def test_watch_returns_changes_under_a_prefix_in_revision_order(cluster: LocalRaftCluster) -> None:
    with cluster.client() as c:
        start = c.put("other", "x")
        rev0, _ = c.watch("jobs/", after=0, wait_s=0.1)
        c.put("jobs/1", "a")
        c.put("unrelated", "b")
        c.put("jobs/2", "c")
        c.delete("jobs/1")
        rev, events = c.watch("jobs/", after=rev0, wait_s=1.0)
        assert [(e["kind"], e["key"]) for e in events] == [("put", "jobs/1"), ("put", "jobs/2"), ("delete", "jobs/1")]
        assert rev > rev0 and start == 1
        t0 = time.monotonic()
        rev2, none = c.watch("jobs/", after=rev, wait_s=0.5)
        assert none == [] and time.monotonic() - t0 >= 0.4 and rev2 >= rev


def test_membership_changes_one_server_at_a_time(tmp_path: Path) -> None:
    with LocalRaftCluster(4, tmp_path, SECRET, voters=(1, 2, 3)) as cluster, cluster.client() as c:
        c.put("before", "1")
        cluster.start_node(4)
        cluster.wait_for_node(4)
        c.add_member(4)
        assert sorted(c.members()["voters"]) == [1, 2, 3, 4]
        cluster.wait_for_node(4, min_applied=3)
        leader = cluster.leader()
        assert leader is not None
        c.remove_member(leader)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            new = cluster.leader()
            if new is not None and new != leader:
                break
            time.sleep(0.1)
        assert sorted(c.members()["voters"]) == sorted({1, 2, 3, 4} - {leader})
        c.put("after", "2")
        assert c.get("before").value == "1"  # type: ignore[union-attr]


def test_cli_put_get_cas_and_members(cluster: LocalRaftCluster) -> None:
    from click.testing import CliRunner

    from kcons.cli.raft import raft

    env = {"KCONS_RAFT_SECRET": SECRET.decode(), "KCONS_RAFT_PEERS": cluster.peers_spec}
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(raft, list(args), env=env, catch_exceptions=False)
        return result.exit_code, result.output

    code, out = run("put", "cli/key", "v1")
    assert code == 0 and json.loads(out) == {"version": 1}
    assert json.loads(run("get", "cli/key")[1])["value"] == "v1"
    assert json.loads(run("get", "cli/key", "--node", "1")[1])["value"] == "v1"  # any node, via ReadIndex
    code, out = run("cas", "cli/key", "1", "v2")
    assert code == 0 and json.loads(out) == {"ok": True, "version": 2}
    code, out = run("cas", "cli/key", "1", "v3")
    assert code == 1 and json.loads(out)["ok"] is False
    members = json.loads(run("members")[1])
    assert sorted(members["voters"]) == [1, 2, 3] and members["leader"] in (1, 2, 3)
    code, out = run("status")
    assert code == 0 and SECRET.decode() not in out
    assert {json.loads(out)[str(i)]["role"] for i in (1, 2, 3)} >= {"leader", "follower"}
