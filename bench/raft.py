"""Benchmark: kcons Raft vs PySyncObj, 3 nodes on localhost, 64-byte writes from concurrent clients.

Each system runs as 3 OS processes replicating a key-value map over TCP. The load runs inside the
leader's process for both systems (PySyncObj's API is in-process, so this compares like with
like): ``--clients`` concurrent writers, each issuing its next write when the previous one is
committed and applied on the leader. Two phases per system: throughput (closed loop, ops/s and
p50/p99 commit latency) and a fixed rate (``--rate`` ops/s open loop, p50/p99 latency).

Systems: PySyncObj without a journal (no fsync) with its default configuration, PySyncObj again
with ``appendEntriesPeriod`` tuned down to 1 ms (its default 0.1 s bounds its commit latency, so
the tuned run is the stronger baseline), kcons with ``fsync=False`` (WAL written, not synced) and
kcons with fsync (reported beside them). ``ratio`` = kcons ops/s over default PySyncObj ops/s,
``ratio_vs_tuned_baseline`` over the tuned one, all without fsync. The last line is one JSON object.

PySyncObj is needed (``pip install pysyncobj``); it is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kcons.raft.cluster import free_ports

SECRET = b"bench-secret-0123456789"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def summarize(latencies: list[float], seconds: float) -> dict[str, Any]:
    return {
        "ops": len(latencies),
        "ops_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
    }


# -- kcons node process -----------------------------------------------------------------------


def run_kcons_node(args: argparse.Namespace) -> None:
    from kcons.raft.errors import RaftError
    from kcons.raft.node import NodeSettings, RaftNode
    from kcons.raft.transport import PeerAddress

    errors = [0]

    ports = [int(p) for p in args.ports.split(",")]
    peers = {i + 1: PeerAddress("127.0.0.1", p) for i, p in enumerate(ports)}
    settings = NodeSettings(
        node_id=args.id,
        peers=peers,
        secret=SECRET,
        data_dir=Path(args.data_dir) / f"n{args.id}",
        fsync=args.fsync,
        tick_s=0.05,
        snapshot_every=50_000,
    )
    value = "v" * args.payload

    async def main() -> None:
        node = RaftNode(settings)
        await node.start()
        deadline = time.monotonic() + 30
        while not node.core.is_leader:
            if time.monotonic() > deadline or (node.core.leader and node.core.leader != args.id):
                await asyncio.sleep(3600)  # a follower: serve until killed
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)

        async def closed_loop(seconds: float) -> tuple[list[float], float]:
            lat: list[float] = []
            stop_at = time.perf_counter() + seconds

            async def client(c: int) -> None:
                n = 0
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    try:
                        await node.propose({"op": "put", "key": f"c{c}-{n % 100}", "value": value})
                    except RaftError:
                        errors[0] += 1  # leadership moved under load: counted, not timed
                        await asyncio.sleep(0.01)
                        continue
                    lat.append(time.perf_counter() - t0)
                    n += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(client(c) for c in range(args.clients)))
            return lat, time.perf_counter() - t0

        async def open_loop(rate: float, seconds: float) -> tuple[list[float], float]:
            lat: list[float] = []
            tasks = []
            start = time.perf_counter()
            total = int(rate * seconds)

            async def one(n: int) -> None:
                t0 = time.perf_counter()
                try:
                    await node.propose({"op": "put", "key": f"r-{n % 1000}", "value": value})
                except RaftError:
                    errors[0] += 1
                    return
                lat.append(time.perf_counter() - t0)

            for n in range(total):
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)
            return lat, time.perf_counter() - start

        await closed_loop(1.0)  # warm-up
        lat, secs = await closed_loop(args.duration)
        rlat, rsecs = await open_loop(args.rate, args.duration)
        out = {"throughput": summarize(lat, secs), "at_rate": summarize(rlat, rsecs), "errors": errors[0]}
        print(json.dumps(out), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())


# -- PySyncObj node process -------------------------------------------------------------------


def run_pysyncobj_node(args: argparse.Namespace) -> None:
    from pysyncobj import SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    ports = [int(p) for p in args.ports.split(",")]
    me = f"127.0.0.1:{ports[args.id - 1]}"
    others = [f"127.0.0.1:{p}" for i, p in enumerate(ports) if i != args.id - 1]
    d = ReplDict()
    errors = [0]
    conf = SyncObjConf(dynamicMembershipChange=False, appendEntriesPeriod=args.pysyncobj_period)
    obj = SyncObj(me, others, consumers=[d], conf=conf)
    value = "v" * args.payload
    deadline = time.monotonic() + 30
    while not obj._isLeader():
        leader = obj._getLeader()
        if time.monotonic() > deadline or (leader is not None and str(leader) != me):
            time.sleep(3600)
        time.sleep(0.05)
    time.sleep(0.3)

    def closed_loop(seconds: float) -> tuple[list[float], float]:
        lat: list[float] = []
        lock = threading.Lock()
        done = threading.Event()
        stop_at = time.perf_counter() + seconds
        active = [args.clients]

        def issue(c: int, n: int) -> None:
            t0 = time.perf_counter()

            def cb(result: Any, err: Any) -> None:
                now = time.perf_counter()
                with lock:
                    if err:
                        errors[0] += 1
                    else:
                        lat.append(now - t0)
                if now < stop_at:
                    issue(c, n + 1)
                else:
                    with lock:
                        active[0] -= 1
                        if active[0] == 0:
                            done.set()

            d.set(f"c{c}-{n % 100}", value, callback=cb)

        t0 = time.perf_counter()
        for c in range(args.clients):
            issue(c, 0)
        done.wait(seconds + 30)
        return lat, time.perf_counter() - t0

    def open_loop(rate: float, seconds: float) -> tuple[list[float], float]:
        lat: list[float] = []
        lock = threading.Lock()
        total = int(rate * seconds)
        remaining = [total]
        done = threading.Event()
        start = time.perf_counter()
        for n in range(total):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()

            def cb(result: Any, err: Any, t0: float = t0) -> None:
                with lock:
                    if err:
                        errors[0] += 1
                    else:
                        lat.append(time.perf_counter() - t0)
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

            d.set(f"r-{n % 1000}", value, callback=cb)
        done.wait(seconds + 30)
        return lat, time.perf_counter() - start

    closed_loop(1.0)
    lat, secs = closed_loop(args.duration)
    rlat, rsecs = open_loop(args.rate, args.duration)
    out = {"throughput": summarize(lat, secs), "at_rate": summarize(rlat, rsecs), "errors": errors[0]}
    print(json.dumps(out), flush=True)
    time.sleep(3600)


# -- orchestration ----------------------------------------------------------------------------


def run_cluster(system: str, args: argparse.Namespace, fsync: bool) -> dict[str, Any]:
    ports = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="kcons-raft-bench-") as tmp:
        procs = []
        for i in (1, 2, 3):
            cmd = [
                sys.executable,
                __file__,
                "--node",
                system,
                "--id",
                str(i),
                "--ports",
                ",".join(map(str, ports)),
                "--data-dir",
                tmp,
                "--duration",
                str(args.duration),
                "--clients",
                str(args.clients),
                "--payload",
                str(args.payload),
                "--rate",
                str(args.rate),
                "--pysyncobj-period",
                str(args.pysyncobj_period),
            ]
            if fsync:
                cmd.append("--fsync")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        result: dict[str, Any] | None = None
        try:
            deadline = time.monotonic() + 180 + 4 * args.duration
            lines: list[str] = []
            readers = []

            def read(p: subprocess.Popen[str]) -> None:
                assert p.stdout is not None
                for line in p.stdout:
                    lines.append(line)

            for p in procs:
                t = threading.Thread(target=read, args=(p,), daemon=True)
                t.start()
                readers.append(t)
            while time.monotonic() < deadline and not lines:
                time.sleep(0.1)
            if lines:
                result = json.loads(lines[0])
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
        if result is None:
            raise SystemExit(f"{system}: no leader reported results")
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=64, help="concurrent writers")
    parser.add_argument("--payload", type=int, default=64, help="bytes per value")
    parser.add_argument("--rate", type=float, default=1000.0, help="ops/s of the fixed-rate phase")
    parser.add_argument(
        "--pysyncobj-period",
        type=float,
        default=0.1,
        help="PySyncObj appendEntriesPeriod (its default 0.1 s bounds its commit latency)",
    )
    parser.add_argument(
        "--tuned-period", type=float, default=0.001, help="appendEntriesPeriod of the second, tuned PySyncObj run"
    )
    parser.add_argument(
        "--only", choices=["pysyncobj", "kcons", "kcons-fsync"], help="measure one system (no ratio; for tuning)"
    )
    parser.add_argument("--node", choices=["kcons", "pysyncobj"], help=argparse.SUPPRESS)
    parser.add_argument("--id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--fsync", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node == "kcons":
        run_kcons_node(args)
        return
    if args.node == "pysyncobj":
        run_pysyncobj_node(args)
        return
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if args.only:
        fsync = args.only == "kcons-fsync"
        out = run_cluster("pysyncobj" if args.only == "pysyncobj" else "kcons", args, fsync=fsync)
        print(json.dumps({"name": "raft", "system": args.only, **out}))
        return
    baseline = run_cluster("pysyncobj", args, fsync=False)
    print(f"pysyncobj: {json.dumps(baseline)}", file=sys.stderr)
    tuned_args = argparse.Namespace(**{**vars(args), "pysyncobj_period": args.tuned_period})
    tuned = run_cluster("pysyncobj", tuned_args, fsync=False)
    print(f"pysyncobj (appendEntriesPeriod={args.tuned_period}): {json.dumps(tuned)}", file=sys.stderr)
    kcons_nofsync = run_cluster("kcons", args, fsync=False)
    print(f"kcons (no fsync): {json.dumps(kcons_nofsync)}", file=sys.stderr)
    kcons_fsync = run_cluster("kcons", args, fsync=True)
    print(f"kcons (fsync): {json.dumps(kcons_fsync)}", file=sys.stderr)
    base_ops = baseline["throughput"]["ops_per_s"]
    ours = kcons_nofsync["throughput"]["ops_per_s"]
    print(
        json.dumps(
            {
                "name": "raft",
                "baseline": {
                    "system": "pysyncobj (no journal, no fsync)",
                    "append_entries_period_s": args.pysyncobj_period,
                    **baseline,
                },
                "baseline_tuned": {
                    "system": "pysyncobj (no journal, no fsync), replication period tuned down",
                    "append_entries_period_s": args.tuned_period,
                    **tuned,
                },
                "kcons": {"fsync": False, **kcons_nofsync},
                "kcons_fsync": {"fsync": True, **kcons_fsync},
                "ratio": round(ours / base_ops, 2) if base_ops else None,
                "ratio_vs_tuned_baseline": round(ours / tuned["throughput"]["ops_per_s"], 2)
                if tuned["throughput"]["ops_per_s"]
                else None,
                "unit": "ops/s (throughput phase), latencies in ms",
                "nodes": 3,
                "clients": args.clients,
                "payload_bytes": args.payload,
                "duration_s": args.duration,
                "rate_ops_per_s": args.rate,
                "target": {"ratio": 1.5, "p99_ms_at_rate": 20.0},
            }
        )
    )


if __name__ == "__main__":
    main()
