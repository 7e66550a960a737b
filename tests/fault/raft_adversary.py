"""Adversarial fault run: a real 3-node Raft cluster against an attacker on the path and a bad disk.

The nodes run as OS processes (:class:`kcons.raft.cluster.LocalRaftCluster`); the other nodes
reach node 2 through a recording TCP proxy, and clients are recorded the same way, so the
attacker holds real traffic. Faults, one after another, while every acknowledged put is noted:

* replay of recorded client sessions without the secret (a ``remove_member`` and a ``put``), of
  their frames inside a fresh session made *with* the secret, of a frame twice in one session,
  of recorded peer traffic (heartbeats) while the leader is down, and of a recorded answer to a
  new client process;
* authenticated messages with out-of-range terms, indexes and lengths, and requests with
  out-of-range ids and numbers;
* an oversized frame, megabytes before a handshake, slow (slowloris) connections, more
  connections than a node serves;
* a corrupted WAL on a stopped node in each region (file header, record length, payload, a
  whole middle record zeroed; it must refuse to start and keep the file) and a torn tail (it
  must start); the node is then restarted from the intact file and catches up.

Counted: ``accepted_replays`` (a replay that got an answer or changed anything), ``crashes``
(a node process that died without being stopped), ``failures`` (wrong handling that is neither:
a damaged WAL not refused or rewritten, a torn tail refused, a slow connection never closed, an
out-of-range request not refused, an absurd term adopted), ``lost`` (acknowledged puts not read
back at the end). The last line is one JSON object;
exit status 0 only when ``ok``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kcons.errors import KconsError
from kcons.raft.client import RaftClient
from kcons.raft.cluster import LocalRaftCluster, RecordingProxy, replay
from kcons.raft.codec import encode_message
from kcons.raft.messages import Entry, Message, MsgType, Snapshot, SnapshotMeta
from kcons.raft.transport import (
    ACK_SIZE,
    HELLO_SIZE,
    KIND_RAFT,
    KIND_REQUEST,
    ROLE_CLIENT,
    ROLE_PEER,
    Handshake,
    PeerAddress,
    client_session,
    read_frame,
)

log = logging.getLogger("raft_adversary")
SECRET = b"raft-adversary-secret-0123456789"
TOP = (1 << 64) - 1


class Run:
    """The cluster, the attacker's recordings and the counters."""

    def __init__(self, cluster: LocalRaftCluster, proxy: RecordingProxy) -> None:
        self.cluster = cluster
        self.peer_proxy = proxy
        self.faults = 0
        self.crashes = 0
        self.failures = 0  # wrong handling that is neither a crash nor a replay (see notes)
        self.accepted_replays = 0
        self.acked: dict[str, str] = {}
        self.expected_down: set[int] = set()
        self.notes: list[str] = []

    def fault(self, name: str) -> None:
        self.faults += 1
        log.info("fault %d: %s", self.faults, name)

    def put(self, key: str, value: str) -> None:
        with self.cluster.client(timeout=20) as c:
            c.put(key, value)
        self.acked[key] = value

    def check_alive(self, where: str) -> None:
        for i in self.cluster.addresses:
            if i not in self.expected_down and not self.cluster.alive(i):
                self.crashes += 1
                self.notes.append(f"node {i} died during {where}")
                log.error("node %d died during %s; restarting it", i, where)
                self.cluster.start_node(i)

    def accepted(self, what: str) -> None:
        self.accepted_replays += 1
        self.notes.append(f"replay accepted: {what}")
        log.error("replay accepted: %s", what)


def _frames_after_handshake(c2s: bytes) -> bytes:
    return c2s[HELLO_SIZE + 32 :]  # HELLO, then CONFIRM, then the frames


def _answered(got: bytes) -> bool:
    """True when a replayed conversation got more than the handshake's ACK back (an answer)."""
    return len(got) > ACK_SIZE


def replay_client_sessions(run: Run) -> None:
    cluster = run.cluster
    leader = cluster.wait_for_leader()
    victim = next(i for i in cluster.addresses if i != leader)
    proxy = RecordingProxy(cluster.addresses[leader]).start()
    try:
        with RaftClient({leader: proxy.address}, SECRET, timeout=20) as c:
            c.remove_member(victim)
        with RaftClient({leader: proxy.address}, SECRET, timeout=20) as c:
            c.put("replayed", "old")
            got = c.get("replayed")
            assert got is not None and got.value == "old"
    finally:
        proxy.close()
    with cluster.client(timeout=20) as c:
        c.add_member(victim)
    run.put("replayed", "new")
    sessions = [bytes(c2s) for c2s, _ in proxy.sessions]
    answers = [bytes(s2c) for _, s2c in proxy.sessions]

    # 1. Whole sessions replayed to every node, without the secret.
    for c2s in sessions:
        for node, addr in cluster.addresses.items():
            run.fault(f"replay a recorded client session to node {node} without the secret")
            if _answered(replay(addr, c2s)):
                run.accepted(f"client session replayed to node {node} was answered")

    # 2. The recorded frames inside a fresh session made with the secret.
    for c2s in sessions:
        run.fault("replay recorded frames inside a fresh authenticated session")
        addr = cluster.addresses[leader]
        with socket.create_connection((addr.host, addr.port), timeout=3) as s:
            client_session(s, Handshake(SECRET), ROLE_CLIENT, 0, leader)
            s.sendall(_frames_after_handshake(c2s))
            if _recv_some(s):
                run.accepted("recorded frames answered inside a fresh session")

    # 3. One frame twice on its own connection (an attacker injecting into the stream).
    run.fault("a frame replayed inside its own session")
    addr = cluster.addresses[leader]
    with socket.create_connection((addr.host, addr.port), timeout=3) as s:
        session = client_session(s, Handshake(SECRET), ROLE_CLIENT, 0, leader)
        frame = session.seal(KIND_REQUEST, b"\0" * 8 + b'{"op":"members"}')
        s.sendall(frame + frame)
        answers_seen = 0
        try:
            while True:
                read_frame(s, session, 1 << 20)
                answers_seen += 1
        except (OSError, ConnectionError, KconsError):
            pass
        if answers_seen > 1:
            run.accepted("a frame sent twice in one session was answered twice")

    time.sleep(0.5)
    with cluster.client(timeout=20) as c:
        c.put("barrier", "1")
        if victim not in c.members()["voters"]:
            run.accepted(f"remove_member({victim}) applied again by a replay")
        got = c.get("replayed")
        if got is None or got.value != "new":
            run.accepted("a replayed put overwrote a newer value")
    run.acked["barrier"] = "1"

    # 4. A recorded answer played back to a new client process.
    for s2c in answers:
        run.fault("a recorded answer played back to a new client")
        if _impostor_answer_accepted(s2c, leader):
            run.accepted("a new client accepted a recorded answer")
    run.check_alive("client replays")


def _recv_some(s: socket.socket, wait: float = 1.0) -> bool:
    s.settimeout(wait)
    try:
        return bool(s.recv(65536))
    except (TimeoutError, OSError):
        return False


def _impostor_answer_accepted(recorded: bytes, node: int) -> bool:
    impostor = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:  # the client retries until its timeout: play the recording to every attempt
            try:
                conn, _ = impostor.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.recv(HELLO_SIZE)
                conn.sendall(recorded)
                conn.recv(65536)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        addr = PeerAddress("127.0.0.1", impostor.getsockname()[1])
        with RaftClient({node: addr}, SECRET, timeout=1.0, request_timeout=0.5) as c:
            c.get("replayed")
            return True
    except KconsError:
        return False
    finally:
        impostor.close()


def replay_peer_traffic(run: Run) -> None:
    """Recorded heartbeats to node 2, replayed while the leader is down, must not hold off an election."""
    cluster = run.cluster
    leader = cluster.wait_for_leader()
    if leader == 2:
        with cluster.client(timeout=20) as c:
            c.transfer_leadership(1)
        time.sleep(1.0)
        leader = cluster.wait_for_leader()
    time.sleep(1.0)  # heartbeats to node 2 are being recorded
    recorded = [bytes(c2s) for c2s, _ in run.peer_proxy.sessions if len(c2s) > ACK_SIZE]
    if not recorded:
        raise RuntimeError("no peer traffic to node 2 was recorded")
    log.info("replaying %d recorded peer sessions (%d bytes)", len(recorded), sum(map(len, recorded)))
    run.fault(f"kill leader {leader}, replay its recorded heartbeats to node 2")
    cluster.kill(leader)
    run.expected_down.add(leader)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            for c2s in recorded:
                replay(cluster.addresses[2], c2s, wait=0.05)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        t0 = time.monotonic()
        new_leader = None
        while time.monotonic() - t0 < 15:
            new_leader = cluster.leader()
            if new_leader is not None:
                break
            time.sleep(0.2)
        if new_leader is None:
            run.accepted("replayed heartbeats kept the cluster without a leader")
    finally:
        stop.set()
        flooder.join()
    log.info("a new leader was elected %.1f s after the kill, under the replay", time.monotonic() - t0)
    cluster.start_node(leader)
    run.expected_down.discard(leader)
    cluster.wait_for_node(leader)
    run.check_alive("peer replay")


def hostile_numbers(run: Run) -> None:
    cluster = run.cluster
    target = 1
    addr = cluster.addresses[target]
    hostile = [
        Message(MsgType.HEARTBEAT, 2, target, TOP),
        Message(MsgType.VOTE, 2, target, TOP, log_term=TOP, index=TOP),
        Message(MsgType.APP, 2, target, 1, index=0, log_term=0, entries=(Entry(1, 5),)),
        Message(MsgType.APP, 2, target, 1, index=0, log_term=0, entries=(Entry(1, 1), Entry(1, 3))),
        Message(MsgType.APP, 2, target, 3, index=TOP - 1, log_term=1, commit=TOP),
        Message(MsgType.SNAP, 2, target, 2, snapshot=Snapshot(SnapshotMeta(TOP, 1, (1, 2, 3)))),
    ]
    for m in hostile:
        run.fault(f"authenticated {m.type.name} with out-of-range numbers")
        with socket.create_connection((addr.host, addr.port), timeout=3) as s:
            session = client_session(s, Handshake(SECRET), ROLE_PEER, 2, target)
            s.sendall(session.seal(KIND_RAFT, encode_message(m)))
            _recv_some(s)
    # A length field that promises more entries than the frame holds.
    run.fault("authenticated append whose entry count runs past the frame")
    raw = bytearray(encode_message(Message(MsgType.APP_RESP, 2, target, 1)))
    struct.pack_into("<I", raw, struct.calcsize("<BIIQQQQBQH"), 0xFFFFFFFF)
    with socket.create_connection((addr.host, addr.port), timeout=3) as s:
        session = client_session(s, Handshake(SECRET), ROLE_PEER, 2, target)
        s.sendall(session.seal(KIND_RAFT, bytes(raw)))
        _recv_some(s)
    with cluster.client(timeout=20) as c:
        leader = cluster.wait_for_leader()
        for req in (
            {"op": "add_member", "id": 1 << 40},
            {"op": "remove_member", "id": -1},
            {"op": "transfer", "id": 1 << 70},
            {"op": "watch", "after": 1 << 70, "wait": 0},
            {"op": "lease_acquire", "name": "x", "holder": "h", "ttl": float("nan")},
        ):
            run.fault(f"client request {req['op']} with an out-of-range number")
            answer = c.call_node(leader, req)
            if answer.get("error") != "bad_request":
                run.notes.append(f"{req['op']} answered {answer}")
                run.failures += 1
    run.put("after-hostile", "ok")
    for i in cluster.addresses:
        term = cluster.wait_for_node(i)["term"]
        if not isinstance(term, int) or term > 1 << 32:
            run.failures += 1
            run.notes.append(f"node {i} adopted term {term}")
    run.check_alive("out-of-range input")


def resource_exhaustion(run: Run, many: int) -> None:
    cluster = run.cluster
    addr = cluster.addresses[1]
    run.fault("oversized frame after the handshake")
    with socket.create_connection((addr.host, addr.port), timeout=3) as s:
        client_session(s, Handshake(SECRET), ROLE_CLIENT, 0, 1)
        s.sendall(struct.pack("<I", 1 << 31) + b"x" * 64)
        _recv_some(s)
    run.fault("megabytes before any handshake")
    with socket.create_connection((addr.host, addr.port), timeout=3) as s, contextlib.suppress(OSError):
        s.sendall(os.urandom(1 << 20) * 8)
    run.fault("slowloris connections (one byte a second)")
    slow = [socket.create_connection((addr.host, addr.port), timeout=3) for _ in range(50)]
    t0 = time.monotonic()
    open_ = list(slow)
    while open_ and time.monotonic() - t0 < 12:
        for s in list(open_):
            try:
                s.sendall(b"K")
            except OSError:
                open_.remove(s)
        run.put(f"during-slowloris-{int(time.monotonic() - t0)}", "ok")
        time.sleep(1.0)
    if open_:
        run.notes.append(f"{len(open_)} slow connections still open after 12 s")
        run.failures += 1
    for s in slow:
        s.close()
    run.fault(f"{many} connections at once to one node")
    flood = []
    for _ in range(many):
        try:
            flood.append(socket.create_connection((addr.host, addr.port), timeout=3))
        except OSError:
            break
    run.put("during-flood", "ok")  # other nodes keep serving; peer links stay up
    for s in flood:
        s.close()
    time.sleep(0.5)
    with cluster.client(timeout=20) as c:
        c.status(1)
    run.check_alive("resource exhaustion")


def _region_offsets(wal: bytes) -> dict[str, int]:
    """Byte offsets of interest in a format-2 WAL: the first records' starts."""
    starts = []
    off = 8
    while off + 12 <= len(wal):
        (length,) = struct.unpack_from("<I", wal, off)
        starts.append(off)
        off += 12 + length
    return {"first": starts[0], "middle": starts[len(starts) // 2], "count": len(starts)}


def corrupt_wals(run: Run) -> None:
    cluster = run.cluster
    for n in range(30):
        run.put(f"wal-{n}", str(n))  # several records in every WAL
    leader = cluster.wait_for_leader()
    node = next(i for i in cluster.addresses if i != leader)
    wal_path = cluster.base / f"node{node}" / "raft.wal"

    def damage(name: str, raw: bytearray, regions: dict[str, int]) -> None:
        mid = regions["middle"]
        if name == "file header":
            raw[2] ^= 0x20
        elif name == "record length":
            raw[mid + 3] ^= 0x08
        elif name == "record payload":
            raw[mid + 12 + 2] ^= 0x01
        elif name == "middle record zeroed":
            (length,) = struct.unpack_from("<I", raw, mid)
            raw[mid : mid + 12 + length] = bytes(12 + length)
        elif name == "torn tail":
            raw.extend(struct.pack("<III", 500, 1, 2) + b"half a record")

    for region in ("file header", "record length", "record payload", "middle record zeroed", "torn tail"):
        run.fault(f"corrupt the WAL of stopped node {node}: {region}")
        cluster.kill(node)
        run.expected_down.add(node)
        intact = wal_path.read_bytes()
        backup = wal_path.with_name("raft.wal.intact")
        shutil.copyfile(wal_path, backup)
        raw = bytearray(intact)
        regions = _region_offsets(intact)
        if regions["count"] < 3:
            run.notes.append(f"WAL of node {node} has only {regions['count']} records")
        damage(region, raw, regions)
        wal_path.write_bytes(bytes(raw))
        cluster.start_node(node)
        proc = cluster.procs[node]
        if region == "torn tail":
            try:
                cluster.wait_for_node(node, timeout=20)
            except KconsError:
                run.failures += 1
                run.notes.append("a torn tail stopped the node")
        else:
            try:
                proc.wait(20)
            except Exception:
                run.failures += 1  # started on a damaged WAL: it could have lost acknowledged entries
                run.notes.append(f"node started on a WAL with a damaged {region}")
                cluster.kill(node)
            log_text = (cluster.base / f"node{node}.log").read_text(errors="replace")
            if "raft.wal: " not in log_text[-3000:]:  # the refusal names the file (and the offset)
                run.failures += 1
                run.notes.append(f"node stopped on a damaged {region} without naming the WAL")
            if wal_path.read_bytes() != bytes(raw):
                run.failures += 1
                run.notes.append(f"the damaged WAL ({region}) was rewritten")
            shutil.copyfile(backup, wal_path)
            cluster.start_node(node)
            cluster.wait_for_node(node, timeout=30)
        backup.unlink()
        run.expected_down.discard(node)
        run.put(f"after-{region}", "ok")
    run.check_alive("WAL corruption")


def rejected_frames(cluster: LocalRaftCluster) -> dict[str, float]:
    """``kcons_raft_frames_rejected_total`` by reason, summed over the nodes (since their last restart)."""
    totals: dict[str, float] = {}
    for port in cluster.metrics_ports.values():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("kcons_raft_frames_rejected_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                totals[reason] = totals.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def read_back(run: Run) -> int:
    lost = 0
    with run.cluster.client(timeout=30) as c:
        for key, value in sorted(run.acked.items()):
            got = c.get(key)
            if got is None or got.value != value:
                lost += 1
                run.notes.append(f"lost {key}: expected {value!r}, read {got!r}")
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=400, help="connections opened at once in the flood")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    base = Path(tempfile.mkdtemp(prefix="raft-adversary-"))
    cluster = LocalRaftCluster(3, base, SECRET, tick_ms=50, env={"KCONS_RAFT_MAX_CONNECTIONS": "256"}, metrics=True)
    proxy = RecordingProxy(cluster.addresses[2]).start()
    cluster.routes = {2: proxy.address}  # the other nodes reach node 2 through the recorder
    run = Run(cluster, proxy)
    lost = 0
    rejected: dict[str, float] = {}
    error: str | None = None
    try:
        cluster.start()
        for n in range(10):
            run.put(f"k{n}", f"v{n}")
        for phase in (replay_client_sessions, replay_peer_traffic, hostile_numbers, corrupt_wals):
            phase(run)
        resource_exhaustion(run, args.connections)
        run.check_alive("the end")
        lost = read_back(run)
        rejected = rejected_frames(cluster)
    except Exception as exc:  # the run itself failed: report it, not ok
        log.exception("adversarial run failed")
        error = f"{type(exc).__name__}: {exc}"
    finally:
        proxy.close()
        cluster.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if error is None and not rejected.get("replay", 0) + rejected.get("auth", 0) + rejected.get("handshake", 0):
        run.failures += 1
        run.notes.append("the replays were not counted in kcons_raft_frames_rejected_total")
    ok = error is None and run.crashes == 0 and run.failures == 0 and run.accepted_replays == 0 and lost == 0
    result: dict[str, Any] = {
        "name": "raft_adversary",
        "faults": run.faults,
        "crashes": run.crashes,
        "accepted_replays": run.accepted_replays,
        "lost": lost,
        "failures": run.failures,
        "acknowledged_puts": len(run.acked),
        "rejected_by_reason": rejected,
        "notes": run.notes[:20],
        "error": error,
        "ok": ok,
    }
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
