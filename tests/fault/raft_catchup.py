"""Fault run: a follower restarts far behind while clients keep operating; the leader must not stall.

A 3-node cluster of real node processes. One follower is killed; writers then commit
``--entries`` puts (100k by default) that it misses. Snapshots are taken only every
``--snapshot-every`` entries (default: never within the run), so the restarted follower catches
up from the leader's log, entry by entry, which is the heavy path. While it does, ``--clients``
clients keep doing puts and reads, and every completed operation's time is recorded.

Measured from the restart until the follower has applied everything committed before it (plus
a short tail):

* ``max_gap_s``: the longest time without any completed client operation (a stalled leader
  shows as a gap; one second or more is what a leader change costs);
* ``max_gap_before_s``: the same, in the last seconds before the restart (the machine's own noise);
* ``leader_status_max_s``: the slowest status answer of the leader (asked every 50 ms from
  before the restart to the end), i.e. the longest pause of the leader's own event loop;
* ``leader_changes``: elections seen during that time (the leader's term grew or the leader moved);
* ``lost``: keys whose final version is below the highest version an acknowledged put returned;
* ``duplicates``: two acknowledged puts of one key that returned the same version.

``election_timeout_s`` is the configured election timeout (``KCONS_RAFT_ELECTION_TICKS`` ticks
of ``KCONS_RAFT_TICK_MS``; a follower waits between one and two of them before campaigning).
``ok`` only when, in every one of ``--runs`` runs, nothing is lost or duplicated, the follower
caught up, no leader change happened and ``max_gap_s`` is at most two election timeouts
(``gap_limit_s``). Each run's figures and the load average at its start go to stderr as one JSON
line; the last line of stdout is one JSON object over all runs (the worst ``max_gap_s`` and
``leader_status_max_s``, every run's ``max_gap_s``); exit status 0 only when ``ok``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kcons.errors import KconsError
from kcons.raft.cluster import LocalRaftCluster

log = logging.getLogger("raft_catchup")
SECRET = b"raft-catchup-fault-secret-0123456789"
TICK_MS = 50
ELECTION_TICKS = 10


@dataclass
class Acks:
    """Thread-safe record of acknowledged put versions per key and completion times."""

    versions: dict[str, list[int]] = field(default_factory=dict)
    done_at: list[float] = field(default_factory=list)
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, key: str, version: int, at: float) -> None:
        with self.lock:
            self.versions.setdefault(key, []).append(version)
            self.done_at.append(at)

    def read(self, at: float) -> None:
        with self.lock:
            self.done_at.append(at)

    def fail(self) -> None:
        with self.lock:
            self.failed += 1


def writer(cluster: LocalRaftCluster, wid: int, todo: list[int], lock: threading.Lock, acks: Acks) -> None:
    """Put until the shared budget ``todo[0]`` is spent (keys reused, so the state stays small)."""
    n = 0
    with cluster.client(timeout=10.0, request_timeout=2.0) as c:
        while True:
            with lock:
                if todo[0] <= 0:
                    return
                todo[0] -= 1
            key = f"w{wid}-{n % 64}"
            n += 1
            try:
                acks.put(key, c.put(key, f"v{n}"), time.monotonic())
            except KconsError:
                acks.fail()


def client(cluster: LocalRaftCluster, cid: int, stop: threading.Event, acks: Acks) -> None:
    """Alternate puts and linearizable reads until ``stop``; record when each one completed."""
    n = 0
    with cluster.client(timeout=5.0, request_timeout=1.0) as c:
        while not stop.is_set():
            n += 1
            key = f"c{cid}-{n % 8}"
            try:
                if n % 2:
                    acks.put(key, c.put(key, f"v{n}"), time.monotonic())
                else:
                    c.get(key)
                    acks.read(time.monotonic())
            except KconsError:
                acks.fail()


def leader_term(cluster: LocalRaftCluster) -> tuple[int | None, int]:
    """The current leader and its term (None, 0 when none answers)."""
    leader = cluster.leader()
    if leader is None:
        return None, 0
    with cluster.client(timeout=2.0, request_timeout=1.0) as c:
        return leader, int(c.status(leader)["term"])


def watch_leaders(cluster: LocalRaftCluster, stop: threading.Event, seen: list[tuple[int | None, int]]) -> None:
    """Sample (leader, term) every 100 ms; a change in either is an election."""
    while not stop.wait(0.1):
        try:
            lt = leader_term(cluster)
        except (OSError, ValueError, KconsError):
            continue
        if lt[0] is not None and (not seen or seen[-1] != lt):
            seen.append(lt)


def probe_loop(cluster: LocalRaftCluster, node: int, stop: threading.Event, worst: list[float]) -> None:
    """Ask ``node`` for its status every 50 ms and keep the slowest answer: its event loop's longest pause.

    A status is answered by the node itself, without a quorum round, so a slow answer means the
    node's own loop was busy (or starved of CPU), not that the cluster was slow.
    """
    with cluster.client(timeout=10.0, request_timeout=10.0) as c:
        while not stop.wait(0.05):
            t = time.monotonic()
            try:
                c.status(node)
            except (OSError, ValueError, KconsError):
                continue
            worst[0] = max(worst[0], time.monotonic() - t)


def _max_gap(start: float, times: list[float], end: float) -> float:
    """The longest interval between ``start``, the sorted ``times`` and ``end``."""
    marks = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(marks))


def run(
    entries: int, writers: int, clients: int, snapshot_every: int, tail_s: float, timeout_s: float, before_s: float
) -> dict[str, Any]:
    acks = Acks()
    with tempfile.TemporaryDirectory(prefix="raft-catchup-") as tmp:
        cluster = LocalRaftCluster(
            3,
            tmp,
            SECRET,
            env={"KCONS_RAFT_SNAPSHOT_EVERY": str(snapshot_every), "KCONS_RAFT_ELECTION_TICKS": str(ELECTION_TICKS)},
            tick_ms=TICK_MS,
        )
        with cluster:
            leader = cluster.wait_for_leader(30)
            follower = next(i for i in sorted(cluster.addresses) if i != leader)
            cluster.kill(follower)
            t0 = time.monotonic()
            budget, lock = [entries], threading.Lock()
            threads = [threading.Thread(target=writer, args=(cluster, w, budget, lock, acks)) for w in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            write_s = time.monotonic() - t0
            leader = cluster.wait_for_leader(30)
            with cluster.client(timeout=5.0) as c:
                behind = int(c.status(leader)["commit"])
            log.warning("%d entries written in %.1f s; restarting node %d", behind, write_s, follower)

            stop = threading.Event()
            seen: list[tuple[int | None, int]] = [leader_term(cluster)]
            watcher = threading.Thread(target=watch_leaders, args=(cluster, stop, seen))
            worst_status = [0.0]
            prober = threading.Thread(target=probe_loop, args=(cluster, leader, stop, worst_status))
            load = [threading.Thread(target=client, args=(cluster, c, stop, acks)) for c in range(clients)]
            for t in [watcher, prober, *load]:
                t.start()
            time.sleep(before_s)
            restart = time.monotonic()
            cluster.start_node(follower)
            caught_up = True
            try:
                cluster.wait_for_node(follower, min_applied=behind, timeout=timeout_s)
            except KconsError:
                caught_up = False
            catchup_s = time.monotonic() - restart
            time.sleep(tail_s)
            end = time.monotonic()
            stop.set()
            for t in [watcher, prober, *load]:
                t.join()
            lost = 0
            duplicates = 0
            with cluster.client(timeout=30.0) as c:
                for key, versions in acks.versions.items():
                    duplicates += len(versions) - len(set(versions))
                    item = c.get(key)
                    if (0 if item is None else item.version) < max(versions):
                        lost += 1
    times = sorted(t for t in acks.done_at if restart <= t <= end)
    max_gap = _max_gap(restart, times, end)
    steady = sorted(t for t in acks.done_at if restart - before_s + 0.5 <= t < restart)
    max_gap_before = _max_gap(restart - before_s + 0.5, steady, restart)
    leader_changes = len(seen) - 1
    election_timeout = ELECTION_TICKS * TICK_MS / 1000.0
    limit = 2 * election_timeout
    return {
        "entries_behind": behind,
        "write_s": round(write_s, 1),
        "catchup_s": round(catchup_s, 2),
        "caught_up": caught_up,
        "operations_during_catchup": len(times),
        "failed_operations": acks.failed,
        "max_gap_s": round(max_gap, 3),
        "max_gap_before_s": round(max_gap_before, 3),
        "leader_status_max_s": round(worst_status[0], 3),
        "election_timeout_s": election_timeout,
        "gap_limit_s": limit,
        "leader_changes": leader_changes,
        "leaders_seen": [list(x) for x in seen],
        "acknowledged_writes": sum(len(v) for v in acks.versions.values()),
        "lost": lost,
        "duplicates": duplicates,
        "ok": caught_up and lost == 0 and duplicates == 0 and leader_changes == 0 and max_gap <= limit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000, help="entries the restarted follower misses")
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--clients", type=int, default=2, help="clients operating during the catch-up")
    parser.add_argument("--snapshot-every", type=int, default=10_000_000, help="KCONS_RAFT_SNAPSHOT_EVERY")
    parser.add_argument("--tail-s", type=float, default=3.0, help="seconds observed after the catch-up")
    parser.add_argument("--before-s", type=float, default=3.0, help="seconds of load before the restart")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="longest wait for the catch-up")
    parser.add_argument("--runs", type=int, default=1, help="independent runs (a fresh cluster each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = []
    for _ in range(args.runs):
        load = os.getloadavg()[0]
        a = args
        r = run(a.entries, a.writers, a.clients, a.snapshot_every, a.tail_s, a.timeout_s, a.before_s)
        r["load_average_1m"] = round(load, 1)
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
    ok = all(r["ok"] for r in results)
    print(
        json.dumps(
            {
                "name": "raft_catchup",
                "runs": len(results),
                "faults": len(results),
                "sent": sum(r["acknowledged_writes"] for r in results),
                "lost": sum(r["lost"] for r in results),
                "duplicates": sum(r["duplicates"] for r in results),
                "max_gap_s": max(r["max_gap_s"] for r in results),
                "max_gap_s_per_run": [r["max_gap_s"] for r in results],
                "max_gap_before_s": max(r["max_gap_before_s"] for r in results),
                "leader_status_max_s": max(r["leader_status_max_s"] for r in results),
                "leader_status_max_s_per_run": [r["leader_status_max_s"] for r in results],
                "leader_changes": sum(r["leader_changes"] for r in results),
                "entries_behind": min(r["entries_behind"] for r in results),
                "catchup_s": max(r["catchup_s"] for r in results),
                "election_timeout_s": results[0]["election_timeout_s"],
                "gap_limit_s": results[0]["gap_limit_s"],
                "load_average_1m": [r["load_average_1m"] for r in results],
                "runs_ok": sum(r["ok"] for r in results),
                "ok": ok,
            }
        )
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
