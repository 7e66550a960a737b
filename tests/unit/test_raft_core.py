"""Scripted scenarios for the pure Raft core: each test pins down one rule of the algorithm."""

from __future__ import annotations

import random

import pytest
from raft_sim import ScriptedCluster

from kcons.raft.core import RaftConfig, RaftCore, Role, decode_voters
from kcons.raft.errors import NotLeaderError, ProposalDroppedError
from kcons.raft.messages import Entry, EntryKind, HardState, Message, MsgType


def data_of(entries: list[Entry]) -> list[bytes]:
    return [e.data for e in entries if e.kind is EntryKind.NORMAL]


def test_single_node_elects_itself_and_commits_its_proposals() -> None:
    c = ScriptedCluster(1)
    leader = c.elect(1)
    assert leader.is_leader
    leader.propose(b"a")
    c.drain()
    assert data_of(c.applied[1]) == [b"a"]


def test_elected_leader_replicates_and_every_node_applies_in_order() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    for n in range(5):
        leader.propose(b"v%d" % n)
    c.drain()
    for i in c.ids:
        assert data_of(c.applied[i]) == [b"v%d" % n for n in range(5)]


def test_many_proposals_travel_in_one_append_message() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    c.sent.clear()
    for n in range(50):
        leader.propose(b"x%d" % n)
    c.drain()
    apps = [m for m in c.sent if m.type is MsgType.APP and m.dst == 2 and m.entries]
    assert len(apps) == 1
    assert len(apps[0].entries) == 50


def test_leader_pipelines_appends_without_waiting_for_acknowledgements() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)  # followers now in replicate state
    sent: list[Message] = []
    for n in range(3):
        leader.propose(b"p%d" % n)
        rd = leader.ready()
        c.storage[1].save(rd.hard_state, rd.entries, rd.snapshot)
        sent.extend(rd.messages)
        leader.advance(rd)
    to2 = [m for m in sent if m.type is MsgType.APP and m.dst == 2]
    assert [m.entries[0].data for m in to2] == [b"p0", b"p1", b"p2"]


def test_hard_state_with_the_vote_comes_in_the_same_ready_as_the_vote_reply() -> None:
    c = ScriptedCluster(3)
    c.cores[1].campaign(transfer=True)
    rd1 = c.cores[1].ready()
    c.cores[1].advance(rd1)
    vote_req = next(m for m in rd1.messages if m.dst == 2)
    c.cores[2].step(vote_req)
    rd = c.cores[2].ready()
    assert any(m.type is MsgType.VOTE_RESP and not m.reject for m in rd.messages)
    assert rd.hard_state == HardState(term=vote_req.term, vote=1, commit=0)


def test_leader_does_not_commit_an_older_term_entry_by_counting_replicas() -> None:
    # Raft figure 8: an entry from term 2 stored on a majority must not be committed by a term-4
    # leader until an entry of term 4 is stored on a majority too.
    cfg = RaftConfig(id=1)
    old = [Entry(1, 1), Entry(2, 2, data=b"old")]
    core = RaftCore(cfg, (1, 2, 3, 4, 5), random.Random(1), hard_state=HardState(term=3, vote=0, commit=1), entries=old)
    core.ticks = 100
    core.campaign(transfer=True)
    for v in (2, 3):
        core.step(Message(MsgType.VOTE_RESP, v, 1, core.term))
    assert core.is_leader and core.term == 4
    rd = core.ready()
    core.advance(rd)  # own log now holds the term-4 no-op at index 3
    for v in (2, 3):
        core.step(Message(MsgType.APP_RESP, v, 1, core.term, index=2))
    assert core.log.committed == 1
    for v in (2, 3):
        core.step(Message(MsgType.APP_RESP, v, 1, core.term, index=3))
    assert core.log.committed == 3


def test_candidate_missing_committed_entries_cannot_win() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    c.isolate(3)
    leader.propose(b"committed")
    c.drain()
    assert data_of(c.applied[1]) == [b"committed"]
    c.heal()
    c.isolate(1)
    c.cores[3].campaign(transfer=True)  # forced: bypasses lease, still needs an up-to-date log
    c.drain()
    assert not c.cores[3].is_leader
    c.elect(2)
    assert c.cores[2].is_leader


def test_pre_vote_keeps_a_partitioned_node_from_raising_its_term() -> None:
    c = ScriptedCluster(3)
    c.elect(1)
    term = c.cores[1].term
    c.isolate(3)
    c.tick_all(60)
    assert c.cores[3].term == term
    c.heal()
    c.tick_all(3)
    assert c.cores[1].is_leader and c.cores[1].term == term


def test_without_pre_vote_a_partitioned_node_inflates_its_term() -> None:
    c = ScriptedCluster(3, pre_vote=False, check_quorum=False)
    c.elect(1)
    term = c.cores[1].term
    c.isolate(3)
    c.tick_all(60)
    assert c.cores[3].term > term


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    c = ScriptedCluster(3)
    c.elect(1)
    c.isolate(1)
    c.tick_all(25)
    assert not c.cores[1].is_leader
    assert len([i for i in (2, 3) if c.cores[i].is_leader]) == 1


def test_follower_that_hears_from_a_leader_ignores_vote_requests() -> None:
    c = ScriptedCluster(3, pre_vote=False)
    c.elect(1)
    term = c.cores[1].term
    c.cores[2].campaign(transfer=False)  # a disruptive candidate
    c.drain()
    assert c.cores[3].vote == 1 and c.cores[3].term == term
    assert not c.cores[2].is_leader


def test_restarted_node_refuses_votes_for_one_election_timeout() -> None:
    c = ScriptedCluster(3)
    c.elect(1)
    c.down.add(1)
    c.restart(2, booting=True)
    c.cores[3].campaign(transfer=False)
    c.drain()
    assert not c.cores[3].is_leader  # node 2 has just booted: it may have followed a live leader
    c.tick_all(40)
    assert len(c.leaders()) == 1


def test_stale_leader_steps_down_when_it_hears_a_higher_term() -> None:
    c = ScriptedCluster(3, check_quorum=False)
    c.elect(1)
    c.isolate(1)
    c.elect(2)
    assert c.cores[2].is_leader and c.cores[1].is_leader
    c.heal()
    c.tick_all(2)
    assert c.leaders() == [2]


def test_lagging_follower_catches_up_from_a_snapshot_after_compaction() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    c.isolate(3)
    for n in range(20):
        leader.propose(b"s%d" % n)
    c.drain()
    applied = leader.log.applied
    leader.compact(applied, b"image-at-%d" % applied)
    c.storage[1].compact(leader.snapshot)  # type: ignore[arg-type]
    c.heal()
    c.tick_all(2)
    follower = c.cores[3]
    assert follower.snapshot is not None and follower.snapshot.data == b"image-at-%d" % applied
    assert c.storage[3].load().snapshot == leader.snapshot
    leader.propose(b"after")
    c.drain()
    assert data_of(c.applied[3])[-1:] == [b"after"]
    assert follower.log.committed == leader.log.committed


def test_snapshot_replaces_a_conflicting_uncommitted_entry() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    c.isolate(1)
    leader.propose(b"doomed")  # stays on node 1 only
    c.drain()
    c.tick_all(25)  # nodes 2 and 3 time out and elect one of themselves
    (new_id,) = [i for i in (2, 3) if c.cores[i].is_leader]
    new_leader = c.cores[new_id]
    for n in range(5):
        new_leader.propose(b"n%d" % n)
    c.drain()
    new_leader.compact(new_leader.log.applied, b"snap")
    c.heal()
    c.tick_all(3)
    old = c.cores[1]
    assert not old.is_leader
    assert old.log.snap_index == new_leader.log.snap_index
    idx = old.log.snap_index
    assert old.log.term(idx) == new_leader.log.term(idx)
    assert all(e.data != b"doomed" for e in old.log.entries)


def test_membership_grows_and_shrinks_one_server_at_a_time() -> None:
    c = ScriptedCluster(4)
    for i in c.ids:
        c.restart(i, voters=(1, 2, 3))
    leader = c.elect(1)
    c.drain()
    leader.propose_conf_change(add=4)
    with pytest.raises(ProposalDroppedError):
        leader.propose_conf_change(remove=2)  # the first change is not committed yet
    c.drain()
    assert c.cores[4].voters == (1, 2, 3, 4)
    leader.propose(b"with-four")
    c.drain()
    assert data_of(c.applied[4]) == [b"with-four"]
    leader.propose_conf_change(remove=1)
    c.drain()
    assert not c.cores[1].is_leader  # a removed leader steps down once the change commits
    assert all(c.cores[i].voters == (2, 3, 4) for i in (2, 3, 4))
    c.tick_all(40)
    assert len(c.leaders()) == 1 and c.leaders()[0] != 1


def test_config_entries_encode_the_full_voter_set() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    leader.propose_conf_change(remove=3)
    c.drain()
    conf = [e for e in c.applied[2] if e.kind is EntryKind.CONFIG]
    assert decode_voters(conf[-1].data) == (1, 2)


def test_leadership_transfer_hands_over_to_the_target() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    leader.propose(b"before")
    c.drain()
    leader.transfer_leadership(3)
    c.drain()
    assert c.leaders() == [3]
    c.cores[3].propose(b"after")
    c.drain()
    assert data_of(c.applied[1]) == [b"before", b"after"]


def test_proposals_are_refused_during_a_transfer() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    c.isolate(3)
    leader.transfer_leadership(3)
    with pytest.raises(ProposalDroppedError):
        leader.propose(b"x")


def test_read_index_needs_a_quorum_round_and_an_isolated_leader_never_answers() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    c.drain()
    leader.read_index(b"r1")
    c.drain()
    assert c.read_states[1] == [b"r1"]
    c.isolate(1)
    leader.read_index(b"r2")
    c.drain()
    assert c.read_states[1] == [b"r1"]


def test_read_index_waits_for_the_first_commit_of_the_term() -> None:
    c = ScriptedCluster(3)
    core = c.cores[1]
    core.campaign(transfer=True)
    for v in (2, 3):
        core.step(Message(MsgType.VOTE_RESP, v, 1, core.term))
    assert core.is_leader
    assert core.log.term(core.log.committed) != core.term  # the no-op is not committed yet
    core.read_index(b"early")
    assert c.read_states[1] == []
    c.drain()  # the no-op commits, then a heartbeat round confirms the read
    assert c.read_states[1] == [b"early"]


def test_lease_read_skips_the_round_only_while_a_quorum_acknowledged_recently() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    c.tick_all(1)  # a heartbeat round acknowledged by both followers
    c.isolate(1)
    leader.read_index(b"lease", lease=True)
    c.drain()
    assert c.read_states[1] == [b"lease"]
    for _ in range(8):  # election_tick - lease_margin_ticks
        leader.tick()
        c.drain()
    assert leader.is_leader  # check-quorum has not deposed it yet, but the lease has run out
    leader.read_index(b"expired", lease=True)
    c.drain()
    assert c.read_states[1] == [b"lease"]


def test_lease_reads_are_disabled_without_check_quorum() -> None:
    c = ScriptedCluster(3, check_quorum=False)
    leader = c.elect(1)
    c.tick_all(1)
    c.isolate(1)
    leader.read_index(b"r", lease=True)
    c.drain()
    assert c.read_states[1] == []


def test_followers_refuse_proposals_and_name_the_leader() -> None:
    c = ScriptedCluster(3)
    c.elect(2)
    with pytest.raises(NotLeaderError) as info:
        c.cores[1].propose(b"x")
    assert info.value.leader == 2


def test_restart_recovers_term_vote_and_log_from_storage() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    leader.propose(b"durable")
    c.drain()
    term = leader.term
    for i in c.ids:
        c.restart(i)
    assert all(c.cores[i].term == term for i in c.ids)
    assert all(c.cores[i].role is Role.FOLLOWER for i in c.ids)
    c.elect(2)
    c.drain()
    assert data_of(c.applied[2]) == [b"durable"]


def test_lost_snapshot_is_resent_only_after_an_election_timeout() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    c.isolate(3)
    for n in range(10):
        leader.propose(b"x%d" % n)
    c.drain()
    leader.compact(leader.log.applied, b"img")
    c.heal()
    c.lose.add(MsgType.SNAP)  # snapshots vanish; heartbeats and their answers still flow
    c.sent.clear()
    for _ in range(5):
        leader.tick()
        c.drain(heartbeat=False)
    assert len([m for m in c.sent if m.type is MsgType.SNAP]) == 1
    for _ in range(10):
        leader.tick()
        c.drain(heartbeat=False)
    assert len([m for m in c.sent if m.type is MsgType.SNAP]) == 2
    c.lose.clear()
    for _ in range(12):
        leader.tick()
        c.drain(heartbeat=False)
    assert c.cores[3].log.committed == leader.log.committed


def test_restart_keeps_entries_before_the_snapshot_for_lagging_followers() -> None:
    c = ScriptedCluster(3)
    leader = c.elect(1)
    for n in range(30):
        leader.propose(b"e%d" % n)
    c.drain()
    applied = leader.log.applied
    leader.compact(applied, b"img", keep=10)
    assert leader.log.snap_index == applied - 10
    c.storage[1].compact(leader.snapshot, leader.log.snap_index)  # type: ignore[arg-type]
    core = c.restart(1)
    assert core.snapshot is not None and core.snapshot.meta.index == applied
    assert core.log.snap_index == applied - 10
    assert core.log.applied == applied
    assert core.log.term(applied - 5) is not None  # still served from the log, no snapshot needed


def test_follower_read_index_is_forwarded_and_answered_after_a_quorum_round() -> None:
    c = ScriptedCluster(3)
    c.elect(1)
    c.drain()
    c.sent.clear()
    c.cores[2].read_index(b"f1")
    c.drain()
    assert c.read_states[2] == [b"f1"]
    types = [m.type for m in c.sent]
    assert MsgType.READ_INDEX in types and MsgType.READ_INDEX_RESP in types and MsgType.HEARTBEAT in types


def test_follower_read_is_not_answered_by_a_leader_that_lost_its_quorum() -> None:
    c = ScriptedCluster(3)
    c.elect(1)
    c.drain()
    c.cut.update({(1, 3), (3, 1)})  # the leader keeps only follower 2, which asks it for a read
    c.cut.update({(2, 3), (3, 2)})
    c.cut.update({(1, 2)})  # ... and the leader's heartbeats to 2 are lost: no quorum round completes
    c.cores[2].read_index(b"f2")
    c.drain()
    assert c.read_states[2] == []


def test_follower_without_a_leader_refuses_reads() -> None:
    c = ScriptedCluster(3)
    with pytest.raises(NotLeaderError):
        c.cores[2].read_index(b"x")


def test_a_follower_far_behind_is_caught_up_by_bounded_appends_within_a_bounded_window() -> None:
    # 5000 entries of 50 counted bytes each; node 3 has only the first one.
    cfg = RaftConfig(id=1, max_batch_entries=100, max_inflight_bytes=10_000)
    entries = [Entry(1, i, data=b"x" * 26) for i in range(1, 5001)]
    hard_state = HardState(term=1, vote=1, commit=5000)
    core = RaftCore(cfg, (1, 2, 3), random.Random(1), hard_state=hard_state, entries=entries)
    core.ticks = 100
    core.campaign(transfer=True)
    core.step(Message(MsgType.VOTE_RESP, 2, 1, core.term))
    assert core.is_leader
    core.advance(core.ready())
    core.step(Message(MsgType.APP_RESP, 2, 1, core.term, index=core.log.last_index()))
    core.step(Message(MsgType.APP_RESP, 3, 1, core.term, index=1))  # node 3 back: replicate from 2
    sent: list[Message] = []
    for n in range(200):  # proposals under load: each round may send to node 3 while its window has room
        core.propose(b"p%d" % n)
        core.tick()
        core.step(Message(MsgType.HEARTBEAT_RESP, 2, 1, core.term, hint=core.ticks))  # node 2 keeps the quorum
        rd = core.ready()
        sent.extend(rd.messages)
        core.advance(rd)
    apps = [m for m in sent if m.dst == 3 and m.type is MsgType.APP and m.entries]
    assert apps and max(len(m.entries) for m in apps) <= 100
    unacked = sum(len(e.data) + 24 for m in apps for e in m.entries)
    assert unacked <= 10_000 + 100 * 50  # the window, plus the message that filled it
    assert apps[-1].entries[-1].index < 5000  # no acknowledgement came: the rest waits for one
    assert sum(m.type is MsgType.HEARTBEAT and m.dst == 3 for m in sent) >= 150  # heartbeats go on
    last = apps[-1].entries[-1].index
    core.step(Message(MsgType.APP_RESP, 3, 1, core.term, index=last))  # all acknowledged: the window reopens
    after = [m for m in core.ready().messages if m.dst == 3 and m.type is MsgType.APP]
    assert after and after[0].entries[0].index == last + 1
