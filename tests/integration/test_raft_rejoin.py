"""A member that lost its WAL refuses to start, and rejoins only when the operator says so."""

from __future__ import annotations

import time
from pathlib import Path

from kcons.raft.cluster import LocalRaftCluster

SECRET = b"rejoin-test-secret-0123456789"


def test_a_member_without_its_wal_refuses_to_start_and_rejoins_only_when_asked(tmp_path: Path) -> None:
    with LocalRaftCluster(3, tmp_path, SECRET, tick_ms=20) as cluster:
        with cluster.client() as c:
            for n in range(20):
                c.put(f"k{n}", f"v{n}")
        victim = next(i for i in cluster.addresses if i != cluster.leader())
        cluster.kill(victim)
        (tmp_path / f"node{victim}" / "raft.wal").unlink()

        cluster.start_node(victim)
        proc = cluster.procs[victim]
        proc.wait(30)  # it must not come back at term 0 with no vote
        assert proc.returncode != 0
        log = (tmp_path / f"node{victim}.log").read_text()
        assert "rejoin-empty" in log

        cluster.start_node(victim, ("--rejoin-empty",))
        with cluster.client() as c:
            deadline = time.monotonic() + 30
            while True:
                members = c.members()
                st = cluster.wait_for_node(victim, timeout=10)
                if victim in members["voters"] and isinstance(st["applied"], int) and st["applied"] > 20:
                    break
                assert time.monotonic() < deadline, (members, st)
                time.sleep(0.2)
            got = c.get("k19", at_node=victim)
            assert got is not None and got.value == "v19"
            c.put("after", "rejoin")
        assert cluster.alive(victim)
