"""Deterministic simulation of a Raft cluster around the pure core (test helper, not a test).

One seed fixes everything: message delays (so reordering), drops, duplicates, partitions,
crashes and restarts (some lose the Ready being persisted: unsynced writes), leadership
transfers, membership changes, snapshots, and client operations. The simulation checks the
Raft safety properties as it runs and records a client history for the linearizability checker:

* election safety: at most one leader per term;
* state-machine safety: every node applies the same entry at a given index;
* leader completeness: a new leader holds every entry already applied anywhere;
* log matching: two logs that agree on an entry's term agree on everything before it.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import random
from dataclasses import dataclass, field
from typing import Any

from kcons.raft.core import RaftConfig, RaftCore, Role
from kcons.raft.errors import NotLeaderError, ProposalDroppedError
from kcons.raft.linearizability import UNKNOWN, Operation, check_kv_history
from kcons.raft.messages import Entry, EntryKind, Message, MsgType
from kcons.raft.storage import MemoryStorage


class InvariantViolation(AssertionError):
    """A Raft safety property failed in the simulation."""


@dataclass
class SimOptions:
    """Knobs of one simulated run."""

    nodes: int = 3
    steps: int = 1000
    tick_every: int = 3
    election_tick: int = 10
    max_delay: int = 4
    drop: float = 0.02
    duplicate: float = 0.02
    clients: int = 5
    keys: int = 2
    op_timeout: int = 150
    fault_every: int = 70
    crash_mid_ready: float = 0.3
    snapshot_every: int = 40
    membership: bool = False
    transfers: bool = True
    lease_reads: bool = True
    settle_steps: int = 1500
    pre_vote: bool = True
    check_quorum: bool = True


@dataclass
class _ClientOp:
    client: int
    key: str
    input: tuple[Any, ...]
    call: int
    deadline: int
    node: int
    index: int = 0
    term: int = 0


@dataclass
class _Client:
    id: int
    seq: int = 0
    leader_hint: int = 0
    busy: _ClientOp | None = None
    idle_until: int = 0


@dataclass
class SimNode:
    """A live node: the core plus its applied key-value state."""

    id: int
    core: RaftCore
    sm: dict[str, str] = field(default_factory=dict)
    applied: int = 0
    props: dict[int, _ClientOp] = field(default_factory=dict)
    reads: dict[bytes, _ClientOp] = field(default_factory=dict)
    waiting_reads: list[tuple[int, _ClientOp]] = field(default_factory=list)


class SimCluster:
    """A cluster of cores in a simulated network, driven step by step from one seed."""

    def __init__(self, seed: int, opts: SimOptions | None = None) -> None:
        self.seed = seed
        self.o = opts or SimOptions()
        self.rng = random.Random(seed)
        self.now = 0
        self.ids = list(range(1, self.o.nodes + 1))
        self.initial_voters = tuple(self.ids[:3]) if self.o.membership else tuple(self.ids)
        self.storage = {i: MemoryStorage() for i in self.ids}
        self.nodes: dict[int, SimNode | None] = {}
        self.down_until: dict[int, int] = {}
        self.phase = {i: self.rng.randrange(self.o.tick_every) for i in self.ids}
        self.net: list[tuple[int, int, Message]] = []
        self.seq = 0
        self.group: dict[int, int] = {}
        self.leaders: dict[int, int] = {}
        self.applied: dict[int, Entry] = {}
        self.was_leader: dict[int, int] = {}
        self.history: list[tuple[str, Operation]] = []
        self.clients = [_Client(c) for c in range(1, self.o.clients + 1)]
        self.completed = 0
        self.faults = 0
        self.read_ctx = 0
        self.faults_on = True
        self.dirty: set[int] = set(self.ids)
        for i in self.ids:
            self._start(i)

    # -- nodes -------------------------------------------------------------------------------
    def _start(self, i: int) -> None:
        st = self.storage[i].load()
        cfg = RaftConfig(
            id=i,
            election_tick=self.o.election_tick,
            heartbeat_tick=1,
            max_inflight=8,
            pre_vote=self.o.pre_vote,
            check_quorum=self.o.check_quorum,
        )
        core = RaftCore(
            cfg,
            self.initial_voters,
            random.Random(self.rng.random()),
            hard_state=st.hard_state,
            snapshot=st.snapshot,
            entries=st.entries,
        )
        node = SimNode(i, core)
        if st.snapshot is not None:
            node.sm, node.applied = self._restore(st.snapshot.data)
        self.nodes[i] = node

    def crash(self, i: int, down_for: int) -> None:
        """Kill node ``i``: its in-flight client operations become of unknown outcome."""
        node = self.nodes.get(i)
        if node is None:
            return
        for op in list(node.props.values()):
            self._unknown(op)
        for op in list(node.reads.values()) + [op for _, op in node.waiting_reads]:
            self._drop_read(op)
        self.nodes[i] = None
        self.down_until[i] = self.now + down_for
        self.faults += 1

    @staticmethod
    def _restore(data: bytes) -> tuple[dict[str, str], int]:
        obj = json.loads(data)
        return dict(obj["sm"]), int(obj["applied"])

    # -- network -----------------------------------------------------------------------------
    def _send(self, m: Message) -> None:
        if self.rng.random() < self.o.drop:
            return
        copies = 2 if self.rng.random() < self.o.duplicate else 1
        for _ in range(copies):
            self.seq += 1
            at = self.now + 1 + self.rng.randrange(self.o.max_delay)
            heapq.heappush(self.net, (at, self.seq, m))

    def _connected(self, a: int, b: int) -> bool:
        return self.group.get(a, 0) == self.group.get(b, 0)

    def _deliver(self) -> None:
        while self.net and self.net[0][0] <= self.now:
            _, _, m = heapq.heappop(self.net)
            node = self.nodes.get(m.dst)
            if node is None or not self._connected(m.src, m.dst):
                continue
            node.core.step(m)
            self.dirty.add(m.dst)

    # -- the driver (what kcons.raft.node does with real I/O) ---------------------------------
    def _process(self, node: SimNode) -> None:
        core = node.core
        while core.has_ready():
            rd = core.ready()
            early, late = rd.early_messages()
            for m in early:  # leader messages may overtake the leader's own disk write
                self._send(m)
            if self.faults_on and self.rng.random() < self.o.crash_mid_ready / 500:
                self.crash(node.id, self.rng.randrange(50, 400))  # the unsynced Ready is lost
                return
            self.storage[node.id].save(rd.hard_state, rd.entries, rd.snapshot)
            for m in late:
                self._send(m)
            if rd.snapshot is not None:
                node.sm, node.applied = self._restore(rd.snapshot.data)
                for idx in [i for i in node.props if i <= node.applied]:
                    self._unknown(node.props.pop(idx))
            for e in rd.committed_entries:
                self._apply(node, e)
            for rs in rd.read_states:
                op = node.reads.pop(rs.context, None)
                if op is not None:
                    node.waiting_reads.append((rs.index, op))
            self._serve_reads(node)
            core.advance(rd)
            self._maybe_compact(node)
        self._check_leader(node)

    def _apply(self, node: SimNode, e: Entry) -> None:
        seen = self.applied.get(e.index)
        if seen is None:
            self.applied[e.index] = e
        elif seen != e:
            raise InvariantViolation(f"seed {self.seed}: node {node.id} applied {e} at {e.index}, others {seen}")
        if e.index != node.applied + 1:
            raise InvariantViolation(f"seed {self.seed}: node {node.id} applied {e.index} after {node.applied}")
        node.applied = e.index
        result: Any = None
        if e.kind is EntryKind.NORMAL:
            cmd = json.loads(e.data)
            key = cmd["key"]
            if cmd["op"] == "put":
                node.sm[key] = cmd["value"]
            elif cmd["op"] == "cas":
                result = node.sm.get(key) == cmd["expected"]
                if result:
                    node.sm[key] = cmd["value"]
        op = node.props.pop(e.index, None)
        if op is not None and op.term == e.term:
            self._complete(op, result)
            # else: another entry took the index, so the proposal had no effect: not in the history

    def _serve_reads(self, node: SimNode) -> None:
        keep = []
        for index, op in node.waiting_reads:
            if node.applied >= index:
                self._complete(op, node.sm.get(op.key))
            else:
                keep.append((index, op))
        node.waiting_reads = keep

    def _maybe_compact(self, node: SimNode) -> None:
        core = node.core
        if node.applied - core.log.snap_index >= self.o.snapshot_every:
            keep = self.rng.randrange(0, 10)
            at = node.applied - keep
            if at <= core.log.snap_index:
                return
            # The snapshot is the state at ``at``: rebuild it by replaying from the previous one.
            sm, applied = (dict(), 0) if core.snapshot is None else self._restore(core.snapshot.data)
            for i in range(applied + 1, at + 1):
                e = self.applied[i]
                if e.kind is EntryKind.NORMAL:
                    cmd = json.loads(e.data)
                    if cmd["op"] == "put" or (cmd["op"] == "cas" and sm.get(cmd["key"]) == cmd["expected"]):
                        sm[cmd["key"]] = cmd["value"]
            data = json.dumps({"sm": sm, "applied": at}).encode()
            core.compact(at, data, keep=self.rng.choice([0, 0, 3, 20]))
            assert core.snapshot is not None
            self.storage[node.id].compact(core.snapshot, core.log.snap_index)

    def _check_leader(self, node: SimNode) -> None:
        core = node.core
        if core.role is not Role.LEADER:
            return
        other = self.leaders.setdefault(core.term, node.id)
        if other != node.id:
            raise InvariantViolation(f"seed {self.seed}: two leaders in term {core.term}: {other} and {node.id}")
        if self.was_leader.get(node.id) == core.term:
            return
        self.was_leader[node.id] = core.term
        for idx, e in self.applied.items():
            if idx > core.log.snap_index and core.log.term(idx) != e.term:
                raise InvariantViolation(
                    f"seed {self.seed}: leader {node.id} of term {core.term} lacks applied entry {idx}"
                )

    def check_log_matching(self) -> None:
        """Raise when two live logs agree on a term at some index but differ before it."""
        live = [n for n in self.nodes.values() if n is not None]
        for a_i, a in enumerate(live):
            for b in live[a_i + 1 :]:
                la, lb = a.core.log, b.core.log
                lo = max(la.first_index(), lb.first_index())
                hi = min(la.last_index(), lb.last_index())
                agree = 0
                for i in range(hi, lo - 1, -1):
                    if la.term(i) == lb.term(i):
                        agree = i
                        break
                for i in range(lo, agree + 1):
                    if la.entry(i) != lb.entry(i):
                        raise InvariantViolation(f"seed {self.seed}: logs of {a.id} and {b.id} differ at {i}")

    # -- clients -----------------------------------------------------------------------------
    def _complete(self, op: _ClientOp, output: Any) -> None:
        self.history.append((op.key, Operation(op.call, self.now, op.input, output, op.client)))
        self.completed += 1
        self._free(op)

    def _unknown(self, op: _ClientOp) -> None:
        self.history.append((op.key, Operation.pending(op.call, op.input, op.client)))
        self._free(op)

    def _drop_read(self, op: _ClientOp) -> None:
        self._free(op)

    def _free(self, op: _ClientOp) -> None:
        c = self.clients[op.client - 1]
        if c.busy is op:
            c.busy = None
            c.idle_until = self.now + self.rng.randrange(1, 20)

    def _clients_act(self) -> None:
        for c in self.clients:
            op = c.busy
            if op is not None:
                if self.now >= op.deadline:
                    node = self.nodes.get(op.node)
                    if node is not None:
                        node.props = {i: p for i, p in node.props.items() if p is not op}
                        node.reads = {k: p for k, p in node.reads.items() if p is not op}
                        node.waiting_reads = [(i, p) for i, p in node.waiting_reads if p is not op]
                    if op.input[0] == "get":
                        self._drop_read(op)
                    else:
                        self._unknown(op)
                    c.leader_hint = 0
                continue
            if self.now < c.idle_until:
                continue
            self._issue(c)

    def _issue(self, c: _Client) -> None:
        target = c.leader_hint if c.leader_hint and self.rng.random() < 0.9 else self.rng.choice(self.ids)
        node = self.nodes.get(target)
        if node is None:
            c.leader_hint = 0
            c.idle_until = self.now + 5
            return
        key = f"k{self.rng.randrange(self.o.keys)}"
        c.seq += 1
        r = self.rng.random()
        value = f"{c.id}.{c.seq}"
        deadline = self.now + self.o.op_timeout
        if r < 0.4 and self.rng.random() < 0.3:
            # A read at any node: followers forward it to their leader (ReadIndex).
            target = self.rng.choice(self.ids)
            node = self.nodes.get(target)
            if node is None:
                c.idle_until = self.now + 5
                return
        try:
            if r < 0.4:
                self.read_ctx += 1
                ctx = self.read_ctx.to_bytes(8, "big")
                op = _ClientOp(c.id, key, ("get",), self.now, deadline, target)
                node.core.read_index(ctx, lease=self.o.lease_reads and self.rng.random() < 0.5)
                node.reads[ctx] = op
                self.dirty.add(target)
            else:
                if r < 0.75:
                    inp: tuple[Any, ...] = ("put", value)
                    cmd = {"op": "put", "key": key, "value": value}
                else:
                    expected = self.rng.choice([None, *[f"{x}.{y}" for x in range(1, 3) for y in range(1, 4)]])
                    if node.sm.get(key) is not None and self.rng.random() < 0.6:
                        expected = node.sm[key]
                    inp = ("cas", expected, value)
                    cmd = {"op": "cas", "key": key, "expected": expected, "value": value}
                op = _ClientOp(c.id, key, inp, self.now, deadline, target)
                index, term = node.core.propose(json.dumps(cmd).encode())
                op.index, op.term = index, term
                node.props[index] = op
                self.dirty.add(target)
            c.busy = op
            c.leader_hint = target
        except NotLeaderError as exc:
            c.leader_hint = exc.leader
            c.idle_until = self.now + 3
        except ProposalDroppedError:
            c.idle_until = self.now + 10

    # -- faults ------------------------------------------------------------------------------
    def _leader(self) -> SimNode | None:
        best = None
        for n in self.nodes.values():
            if n is not None and n.core.is_leader and (best is None or n.core.term > best.core.term):
                best = n
        return best

    def _fault(self) -> None:
        r = self.rng.random()
        live = [i for i, n in self.nodes.items() if n is not None]
        if r < 0.25 and live:
            leader = self._leader()
            victim = leader.id if leader is not None and self.rng.random() < 0.5 else self.rng.choice(live)
            self.crash(victim, self.rng.randrange(50, 600))
        elif r < 0.45:
            self.group = {i: self.rng.randrange(2) for i in self.ids}
            self.faults += 1
        elif r < 0.55:
            leader = self._leader()
            if leader is not None:  # isolate the leader
                self.group = {i: (1 if i == leader.id else 0) for i in self.ids}
                self.faults += 1
        elif r < 0.7:
            self.group = {}
        elif r < 0.8 and self.o.transfers:
            leader = self._leader()
            if leader is not None:
                with contextlib.suppress(NotLeaderError):
                    leader.core.transfer_leadership(self.rng.choice(leader.core.voters))
        elif r < 0.9 and self.o.membership:
            leader = self._leader()
            if leader is not None:
                voters = set(leader.core.voters)
                others = [i for i in self.ids if i not in voters]
                try:
                    if len(voters) > 3 and (not others or self.rng.random() < 0.5):
                        leader.core.propose_conf_change(remove=self.rng.choice(sorted(voters)))
                    elif others:
                        leader.core.propose_conf_change(add=self.rng.choice(others))
                except (NotLeaderError, ProposalDroppedError):
                    pass
        else:
            self.o.drop = self.rng.choice([0.0, 0.02, 0.1, 0.3])

    # -- running -----------------------------------------------------------------------------
    def step(self) -> None:
        """Advance simulated time by one unit."""
        self.now += 1
        for i, until in list(self.down_until.items()):
            if self.now >= until:
                del self.down_until[i]
                self._start(i)
                self.dirty.add(i)
        self._deliver()
        for i in self.ids:
            node = self.nodes.get(i)
            if node is not None and (self.now + self.phase[i]) % self.o.tick_every == 0:
                node.core.tick()
                self.dirty.add(i)
        self._clients_act()
        if self.faults_on and self.now % self.o.fault_every == 0:
            self._fault()
            self.dirty.update(self.ids)
        dirty, self.dirty = self.dirty, set()
        for i in sorted(dirty):
            node = self.nodes.get(i)
            if node is not None:
                self._process(node)

    def run(self) -> None:
        """Run with faults, heal everything, let it settle, then check every invariant."""
        for _ in range(self.o.steps):
            self.step()
        self.faults_on = False
        self.group = {}
        self.o.drop = 0.0
        self.o.duplicate = 0.0
        for i in list(self.down_until):
            self.down_until[i] = self.now
        settled_before = self.completed
        for _ in range(self.o.settle_steps):
            self.step()
            if self.completed - settled_before >= 3 * self.o.clients and self._leader() is not None:
                break
        self.check_log_matching()
        if self.completed - settled_before < 3 * self.o.clients:
            raise InvariantViolation(f"seed {self.seed}: no progress after healing (liveness)")
        result = check_kv_history(self.history)
        if not result.ok:
            raise InvariantViolation(f"seed {self.seed}: history of key {result.failed_key} is not linearizable")


def pending_output_count(history: list[tuple[str, Operation]]) -> int:
    """How many operations ended with an unknown outcome (for reporting)."""
    return sum(1 for _, op in history if op.output is UNKNOWN)


class ScriptedCluster:
    """Cores wired together with instant, lossless delivery except for links a test cuts."""

    def __init__(self, n: int, *, pre_vote: bool = True, check_quorum: bool = True, seed: int = 0) -> None:
        self.ids = list(range(1, n + 1))
        self.storage = {i: MemoryStorage() for i in self.ids}
        self.rng = random.Random(seed)
        self.pre_vote = pre_vote
        self.check_quorum = check_quorum
        self.cores: dict[int, RaftCore] = {}
        self.applied: dict[int, list[Entry]] = {i: [] for i in self.ids}
        self.read_states: dict[int, list[bytes]] = {i: [] for i in self.ids}
        self.cut: set[tuple[int, int]] = set()
        self.lose: set[MsgType] = set()
        self.down: set[int] = set()
        self.sent: list[Message] = []
        for i in self.ids:
            self.restart(i)

    def restart(self, i: int, voters: tuple[int, ...] | None = None, booting: bool = False) -> RaftCore:
        """(Re)build node ``i`` from its storage; unless ``booting``, as if an election timeout passed."""
        st = self.storage[i].load()
        cfg = RaftConfig(id=i, election_tick=10, pre_vote=self.pre_vote, check_quorum=self.check_quorum)
        core = RaftCore(
            cfg,
            voters or tuple(self.ids),
            random.Random(self.rng.random()),
            hard_state=st.hard_state,
            snapshot=st.snapshot,
            entries=st.entries,
        )
        if not booting:
            core.ticks = cfg.election_tick  # past the boot quiet period
        self.cores[i] = core
        self.down.discard(i)
        self.applied[i] = []
        return core

    def isolate(self, i: int) -> None:
        """Cut every link to and from ``i``."""
        for j in self.ids:
            if j != i:
                self.cut.add((i, j))
                self.cut.add((j, i))

    def heal(self) -> None:
        """Restore every link."""
        self.cut.clear()

    def drain(self, max_rounds: int = 1000, heartbeat: bool = True) -> None:
        """Deliver until quiet; then (``heartbeat``) one leader heartbeat spreads the commit index."""
        self._drain(max_rounds)
        if heartbeat:
            leaders = self.leaders()
            for i in leaders:
                core = self.cores[i]
                if any(self.cores[j].log.committed < core.log.committed for j in self.ids if j not in self.down):
                    core.heartbeat_elapsed = core.cfg.heartbeat_tick - 1
                    core.tick()
            if leaders:
                self._drain(max_rounds)

    def _drain(self, max_rounds: int) -> None:
        for _ in range(max_rounds):
            msgs: list[Message] = []
            for i in self.ids:
                core = self.cores[i]
                if i in self.down:
                    continue
                while core.has_ready():
                    rd = core.ready()
                    self.storage[i].save(rd.hard_state, rd.entries, rd.snapshot)
                    self.applied[i].extend(rd.committed_entries)
                    self.read_states[i].extend(rs.context for rs in rd.read_states)
                    msgs.extend(rd.messages)
                    core.advance(rd)
            if not msgs:
                return
            for m in msgs:
                self.sent.append(m)
                if m.dst in self.down or (m.src, m.dst) in self.cut or m.type in self.lose:
                    continue
                self.cores[m.dst].step(m)
        raise AssertionError("cluster did not quiesce")

    def tick_all(self, n: int = 1) -> None:
        """Tick every live node ``n`` times, draining after each tick."""
        for _ in range(n):
            for i in self.ids:
                if i not in self.down:
                    self.cores[i].tick()
            self.drain()

    def elect(self, i: int) -> RaftCore:
        """Make ``i`` campaign and deliver until quiet."""
        self.cores[i].campaign(transfer=False)
        self.drain()
        return self.cores[i]

    def leaders(self) -> list[int]:
        """Live nodes that believe they lead."""
        return [i for i in self.ids if i not in self.down and self.cores[i].is_leader]


def options_for_seed(seed: int) -> SimOptions:
    """The scenario mix of the seed sweep: cluster size, membership, pre-vote and check-quorum vary."""
    membership = seed % 4 == 1
    return SimOptions(
        nodes=5 if membership or seed % 3 == 0 else 3,
        membership=membership,
        check_quorum=seed % 5 != 2,
        pre_vote=seed % 7 != 3,
    )


def main() -> None:
    """Sweep seeds from the command line: ``python tests/unit/raft_sim.py --seeds 10000``."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None, help="run just this seed")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else list(range(args.first, args.first + args.seeds))
    failures = []
    ops = unknown = faults = 0
    start = time.monotonic()
    for seed in seeds:
        opts = options_for_seed(seed)
        if args.steps:
            opts.steps = args.steps
        cluster = SimCluster(seed, opts)
        try:
            cluster.run()
        except InvariantViolation as exc:
            failures.append(str(exc))
        ops += len(cluster.history)
        unknown += pending_output_count(cluster.history)
        faults += cluster.faults
    print(
        json.dumps(
            {
                "name": "raft_sim_sweep",
                "runs": len(seeds),
                "faults": faults,
                "operations": ops,
                "unknown_outcomes": unknown,
                "violations": len(failures),
                "first_failures": failures[:5],
                "seconds": round(time.monotonic() - start, 1),
                "ok": not failures,
            }
        )
    )
    raise SystemExit(0 if not failures else 1)


if __name__ == "__main__":
    main()
