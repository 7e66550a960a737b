"""The Raft consensus algorithm as a deterministic state machine: no I/O, no clock, seeded randomness.

Inputs are :meth:`RaftCore.tick`, :meth:`RaftCore.step` (a message), :meth:`RaftCore.propose`,
:meth:`RaftCore.read_index`, :meth:`RaftCore.propose_conf_change`,
:meth:`RaftCore.transfer_leadership` and :meth:`RaftCore.compact`. Output is a :class:`Ready`
batch. The driver's contract, which makes the algorithm safe:

1. persist ``Ready.hard_state``, ``Ready.snapshot`` and ``Ready.entries`` (``entries[0].index``
   and everything after it replace what was stored) durably, *then*
2. send ``Ready.messages`` (term and vote are on disk before any reply leaves the node), then
3. restore ``Ready.snapshot`` into the state machine and apply ``Ready.committed_entries`` in order,
4. call :meth:`RaftCore.advance` with that same Ready.

One relaxation is allowed (Raft thesis, section 10.2.1): the messages in ``Ready.early_messages()``
(leader-to-follower APP, HEARTBEAT, SNAP, TIMEOUT_NOW) may be sent *before* step 1, so the leader's
disk write overlaps the followers' replication. It is safe because the leader's term and vote were
persisted before it could win, and the leader counts itself toward a quorum only for entries it
has persisted (``advance`` reports them).

Features: leader election with pre-vote and check-quorum (a follower that heard from a leader
within the election timeout ignores vote requests), log replication with batching (many
proposals per message) and pipelining (up to ``max_inflight`` unacknowledged messages per
follower), bounded appends (at most ``max_batch_entries`` entries and about ``max_batch_bytes``
of data per message, at most ``max_inflight_bytes`` unacknowledged per follower, so a follower
far behind is caught up through a window of small messages, one more per acknowledgement, that
neither crowds out heartbeats nor costs the driver a long pause to encode), commitment only by
counting entries of the current term, snapshots with InstallSnapshot, single-server membership
changes, leadership transfer (TimeoutNow), ReadIndex reads and lease reads.

Lease reads assume that no node's clock runs faster than another's by more than the
``lease_margin_ticks`` fraction of an election timeout: the leader serves a lease read only when a
quorum acknowledged a heartbeat *sent* less than ``election_tick - lease_margin_ticks`` of its ticks
ago, and each of those followers refuses to vote for ``election_tick`` of its own ticks after it
received it.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field

from kcons.raft.errors import NotLeaderError, ProposalDroppedError
from kcons.raft.log import RaftLog
from kcons.raft.messages import (
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgType,
    ReadState,
    Snapshot,
    SnapshotMeta,
)
from kcons.raft.quorum import VoteResult, committed_index, has_quorum, vote_result

__all__ = [
    "CAMPAIGN_TRANSFER",
    "Progress",
    "ProgressState",
    "RaftConfig",
    "RaftCore",
    "Ready",
    "Role",
    "decode_voters",
    "encode_voters",
]

_LEADER_MESSAGES = frozenset({MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP, MsgType.TIMEOUT_NOW})

#: Vote-request context of a campaign started by leadership transfer: it overrides the leader lease.
CAMPAIGN_TRANSFER = b"transfer"


class Role(enum.Enum):
    """The role a node plays in its current term."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


#: Bytes counted per entry besides its data (its encoded header), as :meth:`RaftLog.slice` counts them.
_ENTRY_OVERHEAD = 24


class ProgressState(enum.Enum):
    """How the leader replicates to one follower."""

    PROBE = "probe"  # one message at a time until the follower's log position is known
    REPLICATE = "replicate"  # pipelined: up to max_inflight messages in flight
    SNAPSHOT = "snapshot"  # a snapshot is on its way; wait for its acknowledgement


@dataclass
class Progress:
    """The leader's knowledge of one follower's log."""

    match: int = 0
    next: int = 1
    state: ProgressState = ProgressState.PROBE
    paused: bool = False
    inflight: deque[int] = field(default_factory=deque)
    inflight_sizes: deque[int] = field(default_factory=deque)  # data bytes of each message in inflight
    inflight_bytes: int = 0
    recent_active: bool = False
    pending_snapshot: int = 0
    acked_tick: int = -(10**9)
    snapshot_sent_tick: int = 0

    def become_probe(self) -> None:
        """Back off to one message at a time from match + 1."""
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.paused = False
        self.clear_inflight()
        self.pending_snapshot = 0

    def become_replicate(self) -> None:
        """Switch to pipelined replication from match + 1."""
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.clear_inflight()

    def clear_inflight(self) -> None:
        """Forget every unacknowledged message."""
        self.inflight.clear()
        self.inflight_sizes.clear()
        self.inflight_bytes = 0

    def sent(self, last: int, size: int) -> None:
        """Note a pipelined message ending at entry ``last`` with ``size`` bytes of data."""
        self.inflight.append(last)
        self.inflight_sizes.append(size)
        self.inflight_bytes += size

    def free_first(self) -> None:
        """Drop the oldest unacknowledged message from the window."""
        self.inflight.popleft()
        self.inflight_bytes -= self.inflight_sizes.popleft()

    def acked(self, index: int) -> None:
        """Drop the messages whose entries are all acknowledged up to ``index``."""
        while self.inflight and self.inflight[0] <= index:
            self.free_first()

    def is_paused(self, max_inflight: int, max_inflight_bytes: int = 0) -> bool:
        """True when no further append may be sent now (``max_inflight_bytes`` 0: no byte bound)."""
        if self.state is ProgressState.PROBE:
            return self.paused
        if self.state is ProgressState.REPLICATE:
            if len(self.inflight) >= max_inflight:
                return True
            return max_inflight_bytes > 0 and self.inflight_bytes >= max_inflight_bytes
        return True


@dataclass(frozen=True)
class RaftConfig:
    """Tuning of one node; ticks are the driver's clock unit."""

    id: int
    election_tick: int = 10
    heartbeat_tick: int = 1
    max_inflight: int = 256
    max_batch_bytes: int = 1 << 20
    max_batch_entries: int = 2048
    max_inflight_bytes: int = 4 << 20
    pre_vote: bool = True
    check_quorum: bool = True
    lease_margin_ticks: int = 2

    def __post_init__(self) -> None:
        if self.id <= 0:
            raise ValueError("node id must be positive")
        if self.heartbeat_tick <= 0 or self.election_tick <= self.heartbeat_tick:
            raise ValueError("need 0 < heartbeat_tick < election_tick")
        if self.max_inflight <= 0:
            raise ValueError("max_inflight must be positive")
        if self.max_batch_bytes <= 0 or self.max_batch_entries <= 0 or self.max_inflight_bytes <= 0:
            raise ValueError("max_batch_bytes, max_batch_entries and max_inflight_bytes must be positive")


@dataclass
class Ready:
    """One batch of the core's output; see the module docstring for the driver's contract."""

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)

    def early_messages(self) -> tuple[list[Message], list[Message]]:
        """Split messages into (may be sent before persisting, must wait for persisting)."""
        early = [m for m in self.messages if m.type in _LEADER_MESSAGES]
        late = [m for m in self.messages if m.type not in _LEADER_MESSAGES]
        return early, late

    def is_empty(self) -> bool:
        """True when the driver has nothing to do."""
        return not (
            self.hard_state
            or self.entries
            or self.snapshot
            or self.committed_entries
            or self.messages
            or self.read_states
        )


def encode_voters(voters: tuple[int, ...]) -> bytes:
    """The data of a CONFIG entry: the complete new voter set."""
    return ",".join(str(v) for v in sorted(voters)).encode()


def decode_voters(data: bytes) -> tuple[int, ...]:
    """Inverse of :func:`encode_voters`."""
    return tuple(sorted(int(x) for x in data.decode().split(",") if x))


@dataclass
class _PendingRead:
    index: int
    context: bytes
    acks: set[int]
    origin: int


class RaftCore:
    """One Raft node's algorithm. Not thread-safe: one driver task owns it."""

    def __init__(
        self,
        config: RaftConfig,
        voters: tuple[int, ...],
        rng: random.Random,
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: tuple[Entry, ...] | list[Entry] = (),
    ) -> None:
        self.cfg = config
        self.id = config.id
        self._rng = rng
        hs = hard_state or HardState()
        self.term = hs.term
        self.vote = hs.vote
        snap_index = snapshot.meta.index if snapshot else 0
        snap_term = snapshot.meta.term if snapshot else 0
        entries = list(entries)
        if snapshot is not None and entries and entries[0].index <= snap_index:
            # Entries kept from before the snapshot (for lagging followers): the first one gives the
            # log's offset term. Storage guarantees they agree with the snapshot at its index.
            self.log = RaftLog(entries[0].index, entries[0].term, entries[1:])
        else:
            self.log = RaftLog(snap_index, snap_term, [e for e in entries if e.index > snap_index])
        self.log.applied = snap_index
        self.log.commit_to(max(hs.commit, snap_index))
        self.log.committed = max(self.log.committed, snap_index)
        self.snapshot = snapshot
        self._base_voters = snapshot.meta.voters if snapshot else tuple(sorted(voters))
        self.voters: tuple[int, ...] = self._base_voters
        self.config_index = self.log.snap_index
        self._refresh_config()
        self.role = Role.FOLLOWER
        self.leader = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = self.cfg.election_tick
        self._reset_randomized_timeout()
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.lead_transferee = 0
        self.pending_conf_index = 0
        self.ticks = 0
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._pending_reads: deque[_PendingRead] = deque()
        self._waiting_reads: list[tuple[bytes, int, bool]] = []
        self._unsent_read: bytes | None = None
        self._needs_bcast = False
        self._received_snapshot: Snapshot | None = None
        self._prev_hs = HardState(self.term, self.vote, self.log.committed)

    # -- public queries ----------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """True while this node leads its term."""
        return self.role is Role.LEADER

    def hard_state(self) -> HardState:
        """The current term, vote and commit index."""
        return HardState(self.term, self.vote, self.log.committed)

    def promotable(self) -> bool:
        """True when this node is a voter and may campaign."""
        return self.id in self.voters

    # -- inputs ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance the logical clock by one tick."""
        self.ticks += 1
        if self.role is Role.LEADER:
            self._tick_leader()
            return
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_timeout:
            self.election_elapsed = 0
            self.campaign(transfer=False)

    def campaign(self, transfer: bool) -> None:
        """Start an election now (pre-vote first unless this is a leadership transfer)."""
        if not self.promotable() or self.role is Role.LEADER:
            return
        if self.cfg.pre_vote and not transfer:
            self._become_pre_candidate()
        else:
            self._become_candidate(transfer)

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append ``data`` at the leader; returns (index, term) the entry must commit with.

        Raises NotLeaderError off the leader and ProposalDroppedError during a transfer.
        """
        entry = self._propose_entry(EntryKind.NORMAL, data)
        return entry.index, entry.term

    def propose_conf_change(self, add: int = 0, remove: int = 0) -> tuple[int, int]:
        """Add or remove exactly one voter; refused while another change is uncommitted."""
        if not self.is_leader:
            raise NotLeaderError(self.leader)
        if (add == 0) == (remove == 0):
            raise ValueError("give exactly one of add= or remove=")
        if self.pending_conf_index > self.log.committed:
            raise ProposalDroppedError("another membership change is not committed yet")
        voters = set(self.voters)
        if add:
            if add in voters:
                raise ProposalDroppedError(f"node {add} is already a voter")
            voters.add(add)
        else:
            if remove not in voters:
                raise ProposalDroppedError(f"node {remove} is not a voter")
            if len(voters) == 1:
                raise ProposalDroppedError("cannot remove the last voter")
            voters.discard(remove)
        entry = self._propose_entry(EntryKind.CONFIG, encode_voters(tuple(voters)))
        return entry.index, entry.term

    def read_index(self, context: bytes, lease: bool = False) -> None:
        """Ask for a linearizable read; a ReadState with ``context`` appears in a later Ready.

        ReadIndex (default): the leader records its commit index and confirms with a heartbeat
        round that a quorum still follows it. ``lease=True`` skips the round when the leader
        lease is valid (see the module docstring for its clock assumption). On a follower that
        knows its leader the request is forwarded; the leader answers with the index to wait for.
        If the request or its answer is lost, no ReadState appears: the caller times out.
        """
        if not self.is_leader:
            if self.role is Role.FOLLOWER and self.leader:
                self._send(
                    Message(MsgType.READ_INDEX, self.id, self.leader, self.term, hint=int(lease), context=context)
                )
                return
            raise NotLeaderError(self.leader)
        self._leader_read(context, self.id, lease)

    def _leader_read(self, context: bytes, origin: int, lease: bool) -> None:
        if self.log.term(self.log.committed) != self.term:
            self._waiting_reads.append((context, origin, lease))  # served once this term commits an entry
            return
        self._start_read(context, lease, origin)

    def transfer_leadership(self, target: int) -> None:
        """Hand leadership to voter ``target`` once its log is up to date (TimeoutNow)."""
        if not self.is_leader:
            raise NotLeaderError(self.leader)
        if target == self.id or target not in self.progress or target not in self.voters:
            return
        self.lead_transferee = target
        self.election_elapsed = 0
        pr = self.progress[target]
        if pr.match == self.log.last_index():
            self._send(Message(MsgType.TIMEOUT_NOW, self.id, target, self.term))
        else:
            self._send_append(target)

    def compact(self, index: int, data: bytes, keep: int = 0) -> None:
        """Record the application's snapshot at applied ``index``; drop the log up to ``index - keep``.

        Keeping ``keep`` entries lets followers that lag slightly catch up by entries instead of a
        snapshot. The driver then calls ``storage.compact(core.snapshot, core.log.snap_index)``.
        """
        if index <= (self.snapshot.meta.index if self.snapshot else 0):
            return
        term = self.log.term(index)
        if term is None or index > self.log.applied:
            raise ValueError(f"cannot snapshot at {index}: applied is {self.log.applied}")
        self.snapshot = Snapshot(SnapshotMeta(index, term, self._voters_at(index)), data)
        cut = index - keep
        if cut > self.log.snap_index:
            self._base_voters = self._voters_at(cut)
            self.log.compact(cut)
            if self.config_index < cut:
                self.config_index = cut

    def step(self, m: Message) -> None:
        """Process one received message."""
        if m.term > self.term:
            if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
                forced = m.context == CAMPAIGN_TRANSFER
                # In lease: heard from a leader within the election timeout, or booted less than one
                # timeout ago (a restarted node may have followed a live leader just before it crashed).
                in_lease = (
                    self.cfg.check_quorum
                    and (self.leader != 0 or self.ticks < self.cfg.election_tick)
                    and self.election_elapsed < self.cfg.election_tick
                )
                if in_lease and not forced:
                    return  # a live leader exists: do not let a partitioned node disrupt it
            if m.type is MsgType.PRE_VOTE or (m.type is MsgType.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change terms
            elif m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, 0)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (MsgType.HEARTBEAT, MsgType.APP):
                # tell a stale leader about the newer term so it steps down
                self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term))
            elif m.type is MsgType.PRE_VOTE:
                self._send(Message(MsgType.PRE_VOTE_RESP, self.id, m.src, self.term, reject=True))
            return

        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
            return
        if self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # -- output ------------------------------------------------------------------------------
    def has_ready(self) -> bool:
        """True when :meth:`ready` would return a non-empty batch."""
        return bool(
            self._msgs
            or self._read_states
            or self._needs_bcast
            or self._unsent_read is not None
            or self._received_snapshot is not None
            or self.log.unstable_from <= self.log.last_index()
            or self.hard_state() != self._prev_hs
            or min(self.log.committed, self.log.stable_index()) > self.log.applied
        )

    def ready(self) -> Ready:
        """Collect the pending output; follow the contract in the module docstring, then advance()."""
        if self.is_leader:
            if self._needs_bcast:
                self._bcast_append()
            if self._unsent_read is not None:
                self._bcast_heartbeat(self._unsent_read)
        self._needs_bcast = False
        self._unsent_read = None
        hs = self.hard_state()
        rd = Ready(
            hard_state=hs if hs != self._prev_hs else None,
            entries=self.log.unstable(),
            snapshot=self._received_snapshot,
            committed_entries=self.log.next_to_apply(),
            messages=self._msgs,
            read_states=self._read_states,
        )
        self._msgs = []
        self._read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied ``rd``."""
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        if rd.snapshot is not None and self._received_snapshot is rd.snapshot:
            self._received_snapshot = None
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
        if rd.committed_entries:
            self.log.applied_to(rd.committed_entries[-1].index)
        if self.is_leader and self._maybe_commit():
            self._needs_bcast = True

    # -- roles -------------------------------------------------------------------------------
    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = 0
        self.leader = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self.votes = {}
        self.lead_transferee = 0
        self.progress = {}
        self._pending_reads.clear()
        self._waiting_reads.clear()
        self._unsent_read = None
        self._needs_bcast = False

    def _reset_randomized_timeout(self) -> None:
        self.randomized_timeout = self.cfg.election_tick + self._rng.randrange(self.cfg.election_tick)

    def _become_follower(self, term: int, leader: int) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _become_pre_candidate(self) -> None:
        # Term and vote stay: a pre-vote changes nothing until it would win.
        self.role = Role.PRE_CANDIDATE
        self.leader = 0
        self.votes = {self.id: True}
        self.election_elapsed = 0
        self._reset_randomized_timeout()
        if self._tally() is VoteResult.WON:
            self._become_candidate(False)
            return
        for v in self.voters:
            if v != self.id:
                self._send(
                    Message(
                        MsgType.PRE_VOTE,
                        self.id,
                        v,
                        self.term + 1,
                        log_term=self.log.last_term(),
                        index=self.log.last_index(),
                    )
                )

    def _become_candidate(self, transfer: bool) -> None:
        self._reset(self.term + 1)
        self.role = Role.CANDIDATE
        self.vote = self.id
        self.votes = {self.id: True}
        if self._tally() is VoteResult.WON:
            self._become_leader()
            return
        ctx = CAMPAIGN_TRANSFER if transfer else b""
        for v in self.voters:
            if v != self.id:
                self._send(
                    Message(
                        MsgType.VOTE,
                        self.id,
                        v,
                        self.term,
                        log_term=self.log.last_term(),
                        index=self.log.last_index(),
                        context=ctx,
                    )
                )

    def _become_leader(self) -> None:
        term = self.term
        self._reset(term)
        self.role = Role.LEADER
        self.leader = self.id
        last = self.log.last_index()
        for v in self.voters:
            if v != self.id:
                self.progress[v] = Progress(match=0, next=last + 1, recent_active=True)
        self.log.append([Entry(term, last + 1, EntryKind.NOOP)])
        self.pending_conf_index = last + 1
        self._needs_bcast = True

    def _tally(self) -> VoteResult:
        return vote_result(self.voters, self.votes)

    # -- voting ------------------------------------------------------------------------------
    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is MsgType.PRE_VOTE
        can_vote = self.vote == m.src or (self.vote == 0 and self.leader == 0) or (pre and m.term > self.term)
        resp_type = MsgType.PRE_VOTE_RESP if pre else MsgType.VOTE_RESP
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(Message(resp_type, self.id, m.src, m.term))
            if not pre:
                self.election_elapsed = 0
                self.vote = m.src
        else:
            self._send(Message(resp_type, self.id, m.src, self.term, reject=True))

    def _step_candidate(self, m: Message) -> None:
        if m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            self._become_follower(m.term, m.src)  # same term: a leader won
            self._step_follower(m)
            return
        want = MsgType.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else MsgType.VOTE_RESP
        if m.type is not want:
            return
        if self.role is Role.PRE_CANDIDATE and m.term != self.term + 1 and not m.reject:
            return
        if m.src not in self.votes:
            self.votes[m.src] = not m.reject
        result = self._tally()
        if result is VoteResult.WON:
            if self.role is Role.PRE_CANDIDATE:
                self._become_candidate(False)
            else:
                self._become_leader()
        elif result is VoteResult.LOST:
            self._become_follower(self.term, 0)

    # -- follower ----------------------------------------------------------------------------
    def _step_follower(self, m: Message) -> None:
        if m.type is MsgType.APP:
            self.election_elapsed = 0
            self.leader = m.src
            self._handle_append(m)
        elif m.type is MsgType.HEARTBEAT:
            self.election_elapsed = 0
            self.leader = m.src
            self.log.commit_to(min(m.commit, self.log.last_index()))
            self._send(Message(MsgType.HEARTBEAT_RESP, self.id, m.src, self.term, hint=m.hint, context=m.context))
        elif m.type is MsgType.SNAP:
            self.election_elapsed = 0
            self.leader = m.src
            self._handle_snapshot(m)
        elif m.type is MsgType.TIMEOUT_NOW:
            self.campaign(transfer=True)
        elif m.type is MsgType.READ_INDEX_RESP and m.src == self.leader:
            self._read_states.append(ReadState(m.index, m.context))

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=self.log.committed))
            return
        before_last = self.log.last_index()
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            if m.entries and (
                self.config_index >= m.entries[0].index
                or m.entries[0].index <= before_last
                or any(e.kind is EntryKind.CONFIG for e in m.entries)
            ):
                self._refresh_config()
            self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=last_new))
            return
        # Reject; hint the last index that may still match: skip our entries of terms above the
        # leader's term at m.index, which cannot match (fast backtracking).
        hint = min(m.index, self.log.last_index())
        while hint > self.log.committed:
            t = self.log.term(hint)
            if t is None or t <= m.log_term:
                break
            hint -= 1
        self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=m.index, reject=True, hint=hint))

    def _handle_snapshot(self, m: Message) -> None:
        s = m.snapshot
        if s is None:
            return
        meta = s.meta
        if meta.index <= self.log.committed:
            self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=self.log.committed))
            return
        if self.log.match_term(meta.index, meta.term):
            # We already hold the snapshot's last entry: fast-forward the commit index.
            self.log.commit_to(meta.index)
            self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=self.log.committed))
            return
        # The snapshot covers entries we lack or hold with a conflicting term: it replaces our log.
        self.log.restore(meta.index, meta.term)
        self.snapshot = s
        self._received_snapshot = s
        self._base_voters = meta.voters
        self.voters = meta.voters
        self.config_index = meta.index
        self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=meta.index))

    # -- leader ------------------------------------------------------------------------------
    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                active = {self.id} | {v for v, pr in self.progress.items() if pr.recent_active}
                if not has_quorum(self.voters, active):
                    self._become_follower(self.term, 0)
                    return
                for pr in self.progress.values():
                    pr.recent_active = False
            self.lead_transferee = 0  # a transfer that did not finish within a timeout is abandoned
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat(b"")

    def _step_leader(self, m: Message) -> None:
        pr = self.progress.get(m.src)
        if pr is None:
            return
        if m.type is MsgType.READ_INDEX:
            self._leader_read(m.context, m.src, bool(m.hint))
            return
        if m.type is MsgType.APP_RESP:
            pr.recent_active = True
            if m.reject:
                if self._maybe_decrease(pr, m.index, m.hint):
                    self._send_append(m.src)
                return
            if m.index > pr.match:
                pr.match = m.index
                if pr.next <= m.index:
                    pr.next = m.index + 1
                if pr.state is ProgressState.PROBE:
                    pr.become_replicate()
                elif pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
                    pr.become_probe()
                    pr.become_replicate()
            pr.acked(m.index)
            if pr.state is ProgressState.PROBE:
                pr.paused = False
            if self._maybe_commit():
                self._needs_bcast = True
            elif pr.next <= self.log.last_index():
                self._send_append(m.src)
            if m.src == self.lead_transferee and pr.match == self.log.last_index():
                self._send(Message(MsgType.TIMEOUT_NOW, self.id, m.src, self.term))
        elif m.type is MsgType.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.acked_tick = max(pr.acked_tick, m.hint)
            if pr.state is ProgressState.PROBE:
                pr.paused = False
            elif pr.state is ProgressState.REPLICATE and pr.inflight and self._window_full(pr):
                pr.free_first()  # a full window after lost messages: let one more through
            elif (
                pr.state is ProgressState.SNAPSHOT
                and pr.match < pr.pending_snapshot
                and self.ticks - pr.snapshot_sent_tick >= self.cfg.election_tick
            ):
                pr.become_probe()  # no answer within an election timeout: the snapshot was lost, resend
            if pr.match < self.log.last_index():
                self._send_append(m.src)
            if m.context:
                self._ack_read(m.src, m.context)

    def _maybe_decrease(self, pr: Progress, rejected: int, hint: int) -> bool:
        if pr.state is ProgressState.REPLICATE:
            if rejected <= pr.match:
                return False  # stale
            pr.become_probe()
            pr.next = max(pr.match + 1, min(rejected, hint + 1))
            return True
        if pr.next - 1 != rejected:
            return False  # stale
        pr.next = max(pr.match + 1, min(rejected, hint + 1))
        pr.paused = False
        return True

    def _send_append(self, to: int) -> None:
        pr = self.progress[to]
        if self._window_full(pr):
            return
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None:
            self._send_snapshot(to, pr)
            return
        ents = self.log.slice(
            pr.next, min(self.log.last_index() + 1, pr.next + self.cfg.max_batch_entries), self.cfg.max_batch_bytes
        )
        self._send(
            Message(
                MsgType.APP,
                self.id,
                to,
                self.term,
                log_term=prev_term,
                index=prev,
                commit=self.log.committed,
                entries=tuple(ents),
            )
        )
        if pr.state is ProgressState.REPLICATE:
            if ents:
                pr.next = ents[-1].index + 1
                pr.sent(ents[-1].index, sum(len(e.data) + _ENTRY_OVERHEAD for e in ents))
        else:
            pr.paused = True

    def _window_full(self, pr: Progress) -> bool:
        return pr.is_paused(self.cfg.max_inflight, self.cfg.max_inflight_bytes)

    def _send_snapshot(self, to: int, pr: Progress) -> None:
        snap = self.snapshot
        if snap is None:
            return
        pr.state = ProgressState.SNAPSHOT
        pr.pending_snapshot = snap.meta.index
        pr.snapshot_sent_tick = self.ticks
        pr.clear_inflight()
        self._send(Message(MsgType.SNAP, self.id, to, self.term, snapshot=snap))

    def _bcast_append(self) -> None:
        # Only followers with entries to receive: a commit index alone travels with the next
        # append or heartbeat (at most one tick later), which halves the messages per write.
        last = self.log.last_index()
        for v, pr in self.progress.items():
            if pr.next <= last:
                self._send_append(v)

    def keepalive(self) -> list[Message]:
        """Heartbeats to every follower as of now, changing no state; empty unless leader.

        The driver sends them while a slow disk write (its own WAL append, a compaction) keeps it
        from stepping the core, so that a leader's heartbeats never wait for its disk. Safe at any
        time: the commit index sent is what each follower already may apply, and the tick in
        ``hint`` is the leader's last counted one, older than the real sending time, so a lease
        computed from the answers is only shorter.
        """
        if self.role is not Role.LEADER:
            return []
        committed = self.log.committed
        return [
            Message(MsgType.HEARTBEAT, self.id, v, self.term, commit=min(pr.match, committed), hint=self.ticks)
            for v, pr in self.progress.items()
        ]

    def _bcast_heartbeat(self, context: bytes) -> None:
        for v, pr in self.progress.items():
            self._send(
                Message(
                    MsgType.HEARTBEAT,
                    self.id,
                    v,
                    self.term,
                    commit=min(pr.match, self.log.committed),
                    hint=self.ticks,
                    context=context,
                )
            )

    def _maybe_commit(self) -> bool:
        match = {v: pr.match for v, pr in self.progress.items()}
        match[self.id] = self.log.stable_index()
        idx = committed_index(self.voters, match)
        if idx <= self.log.committed or self.log.term(idx) != self.term:
            return False  # only entries of the current term are committed by counting (5.4.2)
        first_commit_in_term = self.log.term(self.log.committed) != self.term
        self.log.commit_to(idx)
        if first_commit_in_term and self._waiting_reads:
            waiting, self._waiting_reads = self._waiting_reads, []
            for ctx, origin, _lease in waiting:
                self._start_read(ctx, False, origin)
        if self.id not in self.voters and self.log.committed >= self.config_index:
            # Removed by a committed change: hand over by stepping down.
            self._become_follower(self.term, 0)
        return True

    def _propose_entry(self, kind: EntryKind, data: bytes) -> Entry:
        if not self.is_leader:
            raise NotLeaderError(self.leader)
        if self.lead_transferee:
            raise ProposalDroppedError("leadership transfer in progress")
        entry = Entry(self.term, self.log.last_index() + 1, kind, data)
        self.log.append([entry])
        if kind is EntryKind.CONFIG:
            self.pending_conf_index = entry.index
            self._apply_config(decode_voters(data), entry.index)
        self._needs_bcast = True
        return entry

    # -- reads -------------------------------------------------------------------------------
    def _lease_valid(self) -> bool:
        if not self.cfg.check_quorum or self.lead_transferee:
            return False
        horizon = self.ticks - (self.cfg.election_tick - self.cfg.lease_margin_ticks)
        fresh = {self.id} | {v for v, pr in self.progress.items() if pr.acked_tick > horizon}
        return has_quorum(self.voters, fresh)

    def _start_read(self, context: bytes, lease: bool, origin: int) -> None:
        if len(self.voters) == 1 or (lease and self._lease_valid()):
            self._release_read(self.log.committed, context, origin)
            return
        self._pending_reads.append(_PendingRead(self.log.committed, context, {self.id}, origin))
        self._unsent_read = context

    def _release_read(self, index: int, context: bytes, origin: int) -> None:
        if origin == self.id:
            self._read_states.append(ReadState(index, context))
        else:
            self._send(Message(MsgType.READ_INDEX_RESP, self.id, origin, self.term, index=index, context=context))

    def _ack_read(self, src: int, context: bytes) -> None:
        target = None
        for n, pr in enumerate(self._pending_reads):
            if pr.context == context:
                pr.acks.add(src)
                if has_quorum(self.voters, pr.acks):
                    target = n
                break
        if target is None:
            return
        # A quorum confirmed leadership after every earlier read was registered: release them all.
        for _ in range(target + 1):
            done = self._pending_reads.popleft()
            self._release_read(done.index, done.context, done.origin)

    # -- membership --------------------------------------------------------------------------
    def _voters_at(self, index: int) -> tuple[int, ...]:
        for i in range(min(index, self.log.last_index()), self.log.snap_index, -1):
            e = self.log.entry(i)
            if e.kind is EntryKind.CONFIG:
                return decode_voters(e.data)
        return self._base_voters

    def _refresh_config(self) -> None:
        voters = self._base_voters
        idx = self.log.snap_index
        for i in range(self.log.last_index(), self.log.snap_index, -1):
            e = self.log.entry(i)
            if e.kind is EntryKind.CONFIG:
                voters, idx = decode_voters(e.data), i
                break
        self.voters = voters
        self.config_index = idx

    def _apply_config(self, voters: tuple[int, ...], index: int) -> None:
        self.voters = voters
        self.config_index = index
        if self.is_leader:
            last = self.log.last_index()
            for v in voters:
                if v != self.id and v not in self.progress:
                    self.progress[v] = Progress(match=0, next=last, recent_active=True)
            for v in list(self.progress):
                if v not in voters:
                    del self.progress[v]

    def _send(self, m: Message) -> None:
        self._msgs.append(m)
