"""Fault run: real Raft node processes under client load, SIGKILL/restart and SIGSTOP/SIGCONT of leaders.

For each cluster size (3 and 5 nodes by default) the run starts the nodes as OS processes,
drives concurrent clients doing put / get / compare-and-set / delete on a few keys, and
meanwhile injects faults one at a time: SIGKILL of a random node or of the leader (restarted
after a pause, losing whatever was not fsynced) and SIGSTOP of the leader for longer than an
election timeout (then SIGCONT: a paused former leader wakes up and must not serve stale data).
Every operation is recorded with its invocation and response times; an operation whose answer
never came is recorded with an unknown outcome. At the end the faults stop, every node is
brought back, each key is read once more, and the whole history is checked:

* linearizability (Wing-Gong-Lowe checker against a model of values *and versions*, so a lost
  acknowledged write, a write applied twice, or a stale read are all violations);
* ``lost``: keys whose final version is below the highest version an acknowledged write returned;
* ``duplicates``: two acknowledged writes of one key that returned the same version.

Deletes happen on the first key only (a delete resets a key's version), so the ``lost`` and
``duplicates`` counts cover the other keys; the linearizability check covers all of them.

The last line is one JSON object; exit status 0 only when ``ok``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kcons.errors import KconsError
from kcons.raft.cluster import LocalRaftCluster
from kcons.raft.linearizability import Operation, VersionedKvModel, check_kv_history

log = logging.getLogger("raft_kill")
SECRET = b"raft-kill-fault-secret-0123456789"


@dataclass
class Recorder:
    """Thread-safe history of (key, operation) plus acknowledged write versions."""

    history: list[tuple[str, Operation]] = field(default_factory=list)
    acked_versions: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, op: Operation) -> None:
        with self.lock:
            self.history.append((key, op))
            out = op.output
            if op.input[0] == "put" and isinstance(out, int):
                self.acked_versions.setdefault(key, []).append(out)
            elif op.input[0] == "cas" and isinstance(out, tuple) and out[0]:
                self.acked_versions.setdefault(key, []).append(out[1])


def client_loop(
    cluster: LocalRaftCluster, cid: int, keys: list[str], stop: threading.Event, rec: Recorder, seed: int
) -> None:
    rng = random.Random(seed)
    seq = 0
    with cluster.client(timeout=3.0, request_timeout=1.0) as c:
        while not stop.is_set():
            key = rng.choice(keys)
            seq += 1
            r = rng.random()
            value = f"c{cid}-{seq}"
            if r < 0.35:
                inp: tuple[Any, ...] = ("get",)
            elif r < 0.7:
                inp = ("put", value)
            elif r < 0.95 or key != keys[0]:
                inp = ("cas", rng.choice([0, 1, 2, 3, rng.randrange(1, 40)]), value)
            else:
                inp = ("delete",)  # only on the first key, so versions of the others only grow
            call = time.monotonic()
            try:
                if inp[0] == "get":
                    item = c.get(key)
                    out: Any = (None, 0) if item is None else (item.value, item.version)
                elif inp[0] == "put":
                    out = c.put(key, value)
                elif inp[0] == "cas":
                    out = c.cas(key, inp[1], value)
                else:
                    out = c.delete(key)
            except KconsError:
                rec.add(key, Operation.pending(call, inp, cid))  # outcome unknown
                continue
            rec.add(key, Operation(call, time.monotonic(), inp, out, cid))


def fault_loop(
    cluster: LocalRaftCluster, stop: threading.Event, rng: random.Random, interval: float, counts: dict[str, int]
) -> None:
    next_at = time.monotonic()
    while True:
        next_at += interval  # a fixed schedule: the faults' own pauses do not thin them out
        if stop.wait(max(0.0, next_at - time.monotonic())):
            return
        leader = cluster.leader()
        r = rng.random()
        if r < 0.35 and leader is not None:
            victim = leader
            kind = "kill_leader"
        elif r >= 0.65 and leader is not None:
            cluster.pause(leader)
            counts["pause_leader"] = counts.get("pause_leader", 0) + 1
            stop.wait(min(interval * 0.8, rng.uniform(0.8, 2.0)))  # beyond an election timeout (0.5-1 s)
            cluster.resume(leader)
            continue
        else:
            victim = rng.choice(sorted(cluster.addresses))
            kind = "kill_random"
        cluster.kill(victim)
        counts[kind] = counts.get(kind, 0) + 1
        stop.wait(min(interval * 0.8, rng.uniform(0.3, 1.5)))
        cluster.start_node(victim)


def run_cluster(size: int, duration: float, faults: int, clients: int, keys: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    key_names = [f"key{n}" for n in range(keys)]
    rec = Recorder()
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix=f"raft-kill-{size}-") as tmp:
        cluster = LocalRaftCluster(size, tmp, SECRET, env={"KCONS_RAFT_SNAPSHOT_EVERY": "200"})
        with cluster:
            stop = threading.Event()
            workers = [
                threading.Thread(target=client_loop, args=(cluster, c, key_names, stop, rec, seed * 100 + c))
                for c in range(clients)
            ]
            for w in workers:
                w.start()
            injector = threading.Thread(target=fault_loop, args=(cluster, stop, rng, duration / faults, counts))
            injector.start()
            time.sleep(duration)
            stop.set()
            injector.join()
            for w in workers:
                w.join()
            for i in cluster.addresses:
                cluster.resume(i)
                if not cluster.alive(i):
                    cluster.start_node(i)
            cluster.wait_for_leader(60)
            final: dict[str, tuple[Any, int]] = {}
            with cluster.client(timeout=30.0) as c:
                for key in key_names:
                    call = time.monotonic()
                    item = c.get(key)
                    out = (None, 0) if item is None else (item.value, item.version)
                    final[key] = out
                    rec.add(key, Operation(call, time.monotonic(), ("get",), out, -1))
    result = check_kv_history(rec.history, VersionedKvModel.INIT, VersionedKvModel.step)
    lost = 0
    duplicates = 0
    for key, versions in rec.acked_versions.items():
        if key == key_names[0]:
            continue  # deletes reset its version; the linearizability check covers it
        duplicates += len(versions) - len(set(versions))
        if final[key][1] < max(versions):
            lost += 1
    completed = [op for _, op in rec.history if op.ret != float("inf")]
    return {
        "nodes": size,
        "faults": sum(counts.values()),
        "fault_kinds": counts,
        "operations": len(rec.history),
        "completed": len(completed),
        "unknown": len(rec.history) - len(completed),
        "acknowledged_writes": sum(len(v) for v in rec.acked_versions.values()),
        "lost": lost,
        "duplicates": duplicates,
        "linearizable": result.ok,
        "failed_key": result.failed_key,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 3-node cluster, ~40 s, fewer faults")
    parser.add_argument("--sizes", default="3,5", help="cluster sizes to run")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per cluster")
    parser.add_argument("--faults", type=int, default=24, help="faults per cluster (>= 20 for the full run)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--keys", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.sizes, args.duration, args.faults, args.clients = "3", 20.0, 6, 4
    runs = []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        r = run_cluster(size, args.duration, args.faults, args.clients, args.keys, args.seed + size)
        print(json.dumps(r), file=sys.stderr)
        runs.append(r)
    ok = all(r["linearizable"] and r["lost"] == 0 and r["duplicates"] == 0 for r in runs) and all(
        r["completed"] > 0 for r in runs
    )
    print(
        json.dumps(
            {
                "name": "raft_kill",
                "runs": len(runs),
                "faults": sum(r["faults"] for r in runs),
                "sent": sum(r["acknowledged_writes"] for r in runs),
                "lost": sum(r["lost"] for r in runs),
                "duplicates": sum(r["duplicates"] for r in runs),
                "stale": sum(0 if r["linearizable"] else 1 for r in runs),
                "linearizability_violations": sum(0 if r["linearizable"] else 1 for r in runs),
                "operations": sum(r["operations"] for r in runs),
                "unknown_outcomes": sum(r["unknown"] for r in runs),
                "clusters": runs,
                "ok": ok,
            }
        )
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
