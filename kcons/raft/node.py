"""The asyncio Raft node: drives the pure core with a WAL, the authenticated transport and the KV store.

One task owns the core. Messages, proposals, reads and ticks are queued to it; each round it
feeds them all to the core, then handles the resulting :class:`~kcons.raft.core.Ready`: persist
(WAL append + fsync, in a worker thread so that more proposals accumulate meanwhile: group
commit), *then* send, then apply. Proposals made while one Ready is being persisted go out in the
next batch, so throughput grows with concurrency. Client requests arrive over the same port as
JSON (see :meth:`RaftNode.handle_request`); only the leader serves writes and linearizable reads,
others answer ``not_leader`` with the leader's id so clients can follow the redirect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kcons.config import check_host, check_port, env_bool, env_int, env_str
from kcons.errors import ConfigError
from kcons.metrics import (
    RAFT_APPLIED_INDEX,
    RAFT_COMMIT_INDEX,
    RAFT_COMMIT_SECONDS,
    RAFT_FSYNC_SECONDS,
    RAFT_IS_LEADER,
    RAFT_PROPOSALS,
    RAFT_SNAPSHOTS,
    RAFT_TERM,
)
from kcons.raft.codec import MAX_TERM
from kcons.raft.core import RaftConfig, RaftCore, Ready
from kcons.raft.errors import NotLeaderError, OutcomeUnknownError, ProposalDroppedError
from kcons.raft.kv import KvStateMachine
from kcons.raft.messages import EntryKind, Message, MsgType
from kcons.raft.storage import MemoryStorage, RaftStorage, WalStorage
from kcons.raft.transport import PeerAddress, RaftTransport, TlsFiles, load_secret, parse_peers

log = logging.getLogger(__name__)

__all__ = ["NodeSettings", "RaftNode"]


@dataclass(frozen=True)
class NodeSettings:
    """Configuration of one node; ``from_env`` reads the ``KCONS_RAFT_*`` variables."""

    node_id: int
    peers: Mapping[int, PeerAddress]
    secret: bytes = field(repr=False)
    data_dir: Path | None = None
    voters: tuple[int, ...] = ()
    tick_s: float = 0.05
    election_tick: int = 10
    heartbeat_tick: int = 1
    fsync: bool = True
    snapshot_every: int = 10_000
    snapshot_keep: int = 2_000
    max_inflight: int = 256
    listen: PeerAddress | None = None
    rejoin_empty: bool = False
    max_connections: int = 256
    idle_timeout_s: float = 60.0
    tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        if self.node_id not in self.peers:
            raise ConfigError("--id", f"node {self.node_id} is not in the peer list")
        if self.tick_s <= 0:
            raise ConfigError("KCONS_RAFT_TICK_MS", "must be positive")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigError("KCONS_RAFT_ELECTION_TICKS", "must exceed the heartbeat interval (1 tick)")
        for v in self.voters:
            if v not in self.peers:
                raise ConfigError("--voters", f"voter {v} has no address in the peer list")

    @classmethod
    def from_env(
        cls,
        node_id: int,
        peers: str,
        data_dir: str | None,
        secret_file: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> NodeSettings:
        """Build settings from CLI values plus ``KCONS_RAFT_*`` variables (secret, tick, fsync...)."""
        env = os.environ if environ is None else environ
        listen = env_str("KCONS_RAFT_LISTEN", None, env)
        listen_addr = None
        if listen:
            host, _, port = listen.rpartition(":")
            try:
                listen_addr = PeerAddress(check_host("KCONS_RAFT_LISTEN", host), int(port))
            except ValueError:
                raise ConfigError("KCONS_RAFT_LISTEN", f"expected host:port, got {listen!r}") from None
            check_port("KCONS_RAFT_LISTEN", listen_addr.port)
        return cls(
            node_id=node_id,
            peers=parse_peers(peers),
            secret=load_secret(secret_file, env),
            data_dir=Path(data_dir) if data_dir else None,
            tick_s=env_int("KCONS_RAFT_TICK_MS", 50, minimum=1, maximum=10_000, environ=env) / 1000.0,
            election_tick=env_int("KCONS_RAFT_ELECTION_TICKS", 10, minimum=3, maximum=1000, environ=env),
            fsync=env_bool("KCONS_RAFT_FSYNC", True, env),
            snapshot_every=env_int("KCONS_RAFT_SNAPSHOT_EVERY", 10_000, minimum=10, environ=env),
            listen=listen_addr,
            max_connections=env_int("KCONS_RAFT_MAX_CONNECTIONS", 256, minimum=4, maximum=65_536, environ=env),
            idle_timeout_s=float(env_int("KCONS_RAFT_IDLE_TIMEOUT_S", 60, minimum=1, maximum=86_400, environ=env)),
            tls=TlsFiles.from_env(env),
        )


@dataclass
class _Waiter:
    term: int
    future: asyncio.Future[dict[str, Any]]
    started: float


class RaftNode:
    """A Raft replica of the KV metadata store, serving peers and clients on one TCP port."""

    def __init__(
        self,
        settings: NodeSettings,
        storage: RaftStorage | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.id = settings.node_id
        self._label = str(self.id)
        self._m_fsync = RAFT_FSYNC_SECONDS.labels(self._label)
        self._m_commit = RAFT_COMMIT_SECONDS.labels(self._label)
        self._m_committed = RAFT_PROPOSALS.labels(self._label, "committed")
        self._m_lost = RAFT_PROPOSALS.labels(self._label, "lost")
        self._m_refused = RAFT_PROPOSALS.labels(self._label, "refused")
        self._m_term = RAFT_TERM.labels(self._label)
        self._m_leader = RAFT_IS_LEADER.labels(self._label)
        self._m_commit_index = RAFT_COMMIT_INDEX.labels(self._label)
        self._m_applied = RAFT_APPLIED_INDEX.labels(self._label)
        if storage is None:
            storage = (
                WalStorage(settings.data_dir, fsync=settings.fsync, allow_empty=settings.rejoin_empty)
                if settings.data_dir is not None
                else MemoryStorage()
            )
        self.storage = storage
        self.sm = KvStateMachine()
        st = self.storage.load()
        cfg = RaftConfig(
            id=self.id,
            election_tick=settings.election_tick,
            heartbeat_tick=settings.heartbeat_tick,
            max_inflight=settings.max_inflight,
        )
        voters = settings.voters or tuple(sorted(settings.peers))
        self.core = RaftCore(
            cfg,
            voters,
            rng or random.Random(),
            hard_state=st.hard_state,
            snapshot=st.snapshot,
            entries=st.entries,
        )
        if st.snapshot is not None:
            self.sm.restore(st.snapshot.data)
        self.transport = RaftTransport(
            self.id,
            settings.peers,
            settings.secret,
            self._on_message,
            self.handle_request,
            listen=settings.listen,
            max_connections=settings.max_connections,
            idle_timeout=settings.idle_timeout_s,
            tls=settings.tls,
        )
        self._inbox: list[tuple[Any, ...]] = []
        self._wake = asyncio.Event()
        self._waiters: dict[int, _Waiter] = {}
        self._reads: dict[bytes, asyncio.Future[int]] = {}
        self._read_seq = 0
        self._ready_reads: list[tuple[int, asyncio.Future[int]]] = []
        self._apply_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._apply_signal = asyncio.Event()
        self._last_signalled = 0
        self._gauges_due = True
        self._read_epoch = (0, 0)
        self._logged_view: tuple[int, tuple[int, ...]] = (0, ())  # (leader, voters) last logged
        self._stopped = False
        self._failed = asyncio.Event()
        self.failure: BaseException | None = None
        # A member restarted without its state neither votes nor campaigns until the cluster has
        # removed and re-added it: its old votes are forgotten, so it could vote twice in a term.
        self.rejoining = settings.rejoin_empty and st.hard_state.term == 0 and not st.entries and st.snapshot is None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen, connect to peers, start ticking."""
        self._wake = asyncio.Event()
        self._apply_signal = asyncio.Event()
        self._failed = asyncio.Event()
        await self.transport.start()
        self._tasks = [
            asyncio.create_task(self._run(), name=f"raft-{self.id}"),
            asyncio.create_task(self._ticker(), name=f"raft-tick-{self.id}"),
        ]
        if self.rejoining:
            self._tasks.append(asyncio.create_task(self._rejoin(), name=f"raft-rejoin-{self.id}"))
        log.info("raft node %d listening on %s", self.id, self.transport.listen)

    async def stop(self) -> None:
        """Stop serving; fail outstanding requests."""
        self._stopped = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.transport.stop()
        for w in self._waiters.values():
            if not w.future.done():
                w.future.set_exception(OutcomeUnknownError("node stopped"))
        self.storage.close()

    async def _rejoin(self) -> None:
        """Have the cluster remove this member (if still listed) and add it back, then vote again."""
        from kcons.raft.client import RaftClient

        others = {i: a for i, a in self.settings.peers.items() if i != self.id}
        log.warning("raft node %d started without its state: rejoining (remove, then re-add)", self.id)
        delay = 0.2
        while self.rejoining:
            tls = self.settings.tls.client_context() if self.settings.tls is not None else None
            client = RaftClient(others, self.settings.secret, timeout=10.0, request_timeout=2.0, tls=tls)
            try:
                await asyncio.to_thread(self._remove_and_add, client)
                self.rejoining = False
                log.warning("raft node %d: removed and re-added; voting again", self.id)
            except Exception as exc:  # keep trying: the node stays a silent follower meanwhile
                log.warning("raft node %d: rejoin attempt failed (%s); retrying", self.id, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                client.close()

    def _remove_and_add(self, client: Any) -> None:
        if self.id in client.members()["voters"]:
            client.remove_member(self.id)
        client.add_member(self.id)

    # -- inputs from other tasks ---------------------------------------------------------------
    def _on_message(self, m: Message) -> None:
        if m.dst != self.id:
            return
        if self.rejoining and m.type in (MsgType.VOTE, MsgType.PRE_VOTE, MsgType.TIMEOUT_NOW):
            return
        self._inbox.append(("msg", m))
        self._wake.set()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            self._inbox.append(("tick",))
            self._wake.set()

    async def propose(self, command: dict[str, Any]) -> dict[str, Any]:
        """Replicate ``command`` and return its result once applied; NotLeaderError off the leader."""
        if self.failure is not None:
            raise OutcomeUnknownError("node failed; restart it")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inbox.append(("prop", json.dumps(command, separators=(",", ":")).encode(), fut))
        self._wake.set()
        return await fut

    async def read_barrier(self, lease: bool = False) -> None:
        """Return once this node's state machine reflects every write committed before the call.

        On the leader this is ReadIndex (or a lease read); on a follower the request is forwarded
        to the leader and the follower waits until it applied the index the leader confirmed.
        Raises NotLeaderError when no leader confirms within two election timeouts.
        """
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._read_seq += 1
        ctx = self._read_seq.to_bytes(8, "big")
        self._inbox.append(("read", ctx, fut, lease))
        self._wake.set()
        bound = 2 * self.settings.election_tick * self.settings.tick_s
        try:
            await asyncio.wait_for(fut, bound)
        except TimeoutError:
            self._reads.pop(ctx, None)
            raise NotLeaderError(self.core.leader) from None

    async def change_membership(self, add: int = 0, remove: int = 0) -> dict[str, Any]:
        """Add or remove one voter (the address must be in every node's peer list)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inbox.append(("conf", add, remove, fut))
        self._wake.set()
        return await fut

    def transfer_leadership(self, target: int) -> None:
        """Ask the leader to hand over to ``target``."""
        self._inbox.append(("transfer", target))
        self._wake.set()

    async def wait_applied(self, index: int) -> None:
        """Return once the state machine applied ``index``."""
        if self.core.log.applied >= index:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._apply_waiters.append((index, fut))
        await fut

    # -- the loop that owns the core -------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                if not self._inbox:
                    await self._wake.wait()
                self._wake.clear()
                inbox, self._inbox = self._inbox, []
                for item in inbox:
                    self._feed(item)
                await self._drain_ready()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Fail-stop: after a storage error (or a broken invariant) the node must not answer
            # anything it cannot back with its disk. It stops; a restart recovers from the WAL.
            log.critical("raft node %d stopped: %s: %s", self.id, type(exc).__name__, exc)
            self.failure = exc
            for w in self._waiters.values():
                if not w.future.done():
                    w.future.set_exception(OutcomeUnknownError(f"node failed: {type(exc).__name__}"))
            for fut in self._reads.values():
                if not fut.done():
                    fut.set_exception(NotLeaderError(0))
            self._failed.set()

    async def wait_failed(self) -> BaseException | None:
        """Return the error that stopped the node's loop (waits until one happens)."""
        await self._failed.wait()
        return self.failure

    def _feed(self, item: tuple[Any, ...]) -> None:
        core = self.core
        kind = item[0]
        if kind == "msg":
            core.step(item[1])
        elif kind == "tick":
            if not self.rejoining:
                core.tick()
            self._gauges_due = True
        elif kind == "prop":
            fut = item[2]
            try:
                index, term = core.propose(item[1])
            except (NotLeaderError, ProposalDroppedError) as exc:
                self._m_refused.inc()
                if not fut.done():
                    fut.set_exception(exc)
                return
            self._waiters[index] = _Waiter(term, fut, time.perf_counter())
        elif kind == "read":
            _, ctx, fut, lease = item
            try:
                core.read_index(ctx, lease=lease)
            except NotLeaderError as exc:
                if not fut.done():
                    fut.set_exception(exc)
                return
            self._reads[ctx] = fut
        elif kind == "conf":
            _, add, remove, fut = item
            try:
                index, term = core.propose_conf_change(add=add, remove=remove)
            except (NotLeaderError, ProposalDroppedError, ValueError) as exc:
                if not fut.done():
                    fut.set_exception(exc)
                return
            self._waiters[index] = _Waiter(term, fut, time.perf_counter())
        elif kind == "transfer":
            with contextlib.suppress(NotLeaderError):
                core.transfer_leadership(item[1])

    async def _drain_ready(self) -> None:
        core = self.core
        while core.has_ready():
            rd = core.ready()
            early, late = rd.early_messages()
            if early:
                self.transport.send(early)  # leader replication overlaps its own disk write
            if rd.hard_state is not None or rd.entries or rd.snapshot is not None:
                t0 = time.perf_counter()
                if self._disk_in_thread():
                    await self._off_loop(self.storage.save, rd.hard_state, rd.entries, rd.snapshot)
                else:
                    self.storage.save(rd.hard_state, rd.entries, rd.snapshot)
                self._m_fsync.observe(time.perf_counter() - t0)
            if late:
                self.transport.send(late)
            self._apply(rd)
            core.advance(rd)
            await self._maybe_compact()
        self._after_round()

    def _disk_in_thread(self) -> bool:
        """True when storage calls wait for the disk (fsynced WAL): they then run in a worker thread."""
        return self.settings.fsync and isinstance(self.storage, WalStorage)

    async def _off_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a storage call in a worker thread; a leader keeps sending heartbeats meanwhile.

        The core is not stepped while its Ready is being persisted, so without this a disk that
        stalls for an election timeout (fsync under I/O load) would silence the leader and make
        its followers elect another one. Heartbeats go out every heartbeat interval of the wait
        (:meth:`~kcons.raft.core.RaftCore.keepalive`, which changes no state).
        """
        call = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        interval = self.settings.tick_s * self.settings.heartbeat_tick
        try:
            while not (await asyncio.wait({call}, timeout=interval))[0]:
                self.transport.send(self.core.keepalive())
        except asyncio.CancelledError:
            call.cancel()
            raise
        call.result()

    def _apply(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.sm.restore(rd.snapshot.data)
            RAFT_SNAPSHOTS.labels(self._label, "installed").inc()
            for idx in [i for i in self._waiters if i <= rd.snapshot.meta.index]:
                dropped = self._waiters.pop(idx)
                if not dropped.future.done():
                    dropped.future.set_exception(OutcomeUnknownError("log replaced by a snapshot; outcome unknown"))
        now = time.perf_counter()
        committed = 0
        for e in rd.committed_entries:
            result: dict[str, Any] = {}
            if e.kind is EntryKind.NORMAL:
                result = self.sm.apply(e.index, e.data)
            else:
                self.sm.revision = e.index
                if e.kind is EntryKind.CONFIG:
                    result = {"ok": True, "voters": list(self.core.voters)}
            w = self._waiters.pop(e.index, None)
            if w is not None and not w.future.done():
                if w.term == e.term:
                    w.future.set_result(result)
                    committed += 1
                    self._m_commit.observe(now - w.started)
                else:
                    w.future.set_exception(ProposalDroppedError("leadership changed; the command was not committed"))
                    self._m_lost.inc()
        if committed:
            self._m_committed.inc(committed)
        for rs in rd.read_states:
            fut = self._reads.pop(rs.context, None)
            if fut is not None:
                self._ready_reads.append((rs.index, fut))

    def _after_round(self) -> None:
        core = self.core
        applied = core.log.applied
        if self._ready_reads:
            keep = []
            for index, fut in self._ready_reads:
                if applied >= index:
                    if not fut.done():
                        fut.set_result(index)
                else:
                    keep.append((index, fut))
            self._ready_reads = keep
        if self._apply_waiters:
            keep_a = []
            for index, afut in self._apply_waiters:
                if applied >= index:
                    if not afut.done():
                        afut.set_result(None)
                else:
                    keep_a.append((index, afut))
            self._apply_waiters = keep_a
        epoch = (core.term, core.leader)
        self._log_view_change(core.term, core.leader, tuple(core.voters))
        if epoch != self._read_epoch:
            self._read_epoch = epoch
            fail_reads = True  # requests registered with a former leader will never be confirmed
        else:
            fail_reads = core.leader == 0
        if fail_reads and self._reads:
            for fut in self._reads.values():
                if not fut.done():
                    fut.set_exception(NotLeaderError(core.leader))
            self._reads.clear()
        if self._gauges_due:
            self._gauges_due = False  # once per tick: cheap enough to leave on under load
            self._m_term.set(core.term)
            self._m_leader.set(1 if core.is_leader else 0)
            self._m_commit_index.set(core.log.committed)
            self._m_applied.set(applied)
        if applied != self._last_signalled:
            self._last_signalled = applied
            signal, self._apply_signal = self._apply_signal, asyncio.Event()
            signal.set()

    def _log_view_change(self, term: int, leader: int, voters: tuple[int, ...]) -> None:
        """Log at INFO when a new leader is known or the voter set changed (operators follow these)."""
        last_leader, last_voters = self._logged_view
        if leader and leader != last_leader:
            log.info("raft node %d: leader is now %d (term %d)", self.id, leader, term)
            last_leader = leader
        if voters != last_voters:
            if last_voters:
                log.info("raft node %d: voters changed from %s to %s", self.id, list(last_voters), list(voters))
            last_voters = voters
        self._logged_view = (last_leader, last_voters)

    async def _maybe_compact(self) -> None:
        core = self.core
        base = core.snapshot.meta.index if core.snapshot else 0
        applied = core.log.applied
        if applied - base < self.settings.snapshot_every:
            return
        core.compact(applied, self.sm.snapshot(), keep=self.settings.snapshot_keep)
        assert core.snapshot is not None
        if self._disk_in_thread():  # the snapshot file and the rewritten log are fsynced
            await self._off_loop(self.storage.compact, core.snapshot, core.log.snap_index)
        else:
            self.storage.compact(core.snapshot, core.log.snap_index)
        RAFT_SNAPSHOTS.labels(self._label, "taken").inc()

    # -- client requests -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Role, term, leader, indexes and voters of this node."""
        core = self.core
        return {
            "id": self.id,
            "role": core.role.value,
            "term": core.term,
            "leader": core.leader,
            "commit": core.log.committed,
            "applied": core.log.applied,
            "voters": list(core.voters),
            "peers": {str(k): str(v) for k, v in self.settings.peers.items()},
        }

    async def handle_request(self, body: bytes) -> bytes:
        """Serve one JSON client request; the answer is JSON with ``ok`` or ``error``."""
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("request is not an object")
            result = await self._serve(req)
        except NotLeaderError as exc:
            result = {"error": "not_leader", "leader": exc.leader}
        except ProposalDroppedError as exc:
            result = {"error": "dropped", "detail": str(exc)}
        except OutcomeUnknownError as exc:
            result = {"error": "unknown_outcome", "detail": str(exc)}
        except (ValueError, KeyError, TypeError) as exc:
            result = {"error": "bad_request", "detail": str(exc)}
        except Exception as exc:  # a request must always get an answer; the client may retry
            log.exception("raft node %d: request failed", self.id)
            result = {"error": "unknown_outcome", "detail": type(exc).__name__}
        return json.dumps(result, separators=(",", ":")).encode()

    async def _serve(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "get":
            if not self.core.is_leader and not req.get("follower"):
                raise NotLeaderError(self.core.leader)
            await self.read_barrier(lease=bool(req.get("lease", False)))
            item = self.sm.get(str(req["key"]))
            if item is None:
                return {"ok": True, "found": False, "revision": self.sm.revision}
            return {
                "ok": True,
                "found": True,
                "value": item.value,
                "version": item.version,
                "mod_revision": item.revision,
                "revision": self.sm.revision,
            }
        if op in ("put", "delete", "cas", "lease_acquire", "lease_renew", "lease_release"):
            if not self.core.is_leader:
                raise NotLeaderError(self.core.leader)
            cmd = dict(req)
            if op in ("lease_acquire", "lease_renew"):
                ttl = float(req["ttl"])
                if not 0 < ttl <= 86_400:  # also refuses nan: a lease must expire
                    raise ValueError("ttl must be a number of seconds in (0, 86400]")
                cmd["now"] = time.time()  # leader time: lease expiry assumes loosely synchronized clocks
            return await self.propose(cmd)
        if op == "members":
            return {"ok": True, "voters": list(self.core.voters), "leader": self.core.leader}
        if op == "add_member":
            return await self.change_membership(add=self._peer_id(req))
        if op == "remove_member":
            return await self.change_membership(remove=self._peer_id(req))
        if op == "transfer":
            target = self._peer_id(req)
            if not self.core.is_leader:
                raise NotLeaderError(self.core.leader)
            self.transfer_leadership(target)
            return {"ok": True}
        if op == "watch":
            after = int(req.get("after", 0))
            if not 0 <= after <= MAX_TERM:
                raise ValueError("after is out of range")
            return await self._watch(str(req.get("prefix", "")), after, float(req.get("wait", 10)))
        raise ValueError(f"unknown op {op!r}")

    def _peer_id(self, req: dict[str, Any]) -> int:
        """The request's node id; it must have an address in the peer list (ValueError otherwise)."""
        node = req["id"]
        if not isinstance(node, int) or isinstance(node, bool) or node not in self.settings.peers:
            raise ValueError(f"node id {node!r} is not in the peer list")
        return node

    async def _watch(self, prefix: str, after: int, wait: float) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + max(0.0, min(wait, 60.0))
        while True:
            events = self.sm.events_after(after, prefix)
            if events is None:
                return {"error": "compacted", "revision": self.sm.revision}
            remaining = deadline - asyncio.get_running_loop().time()
            if events or remaining <= 0:
                return {
                    "ok": True,
                    "revision": self.sm.revision,
                    "events": [
                        {"revision": e.revision, "kind": e.kind, "key": e.key, "value": e.value, "version": e.version}
                        for e in events
                    ],
                }
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._apply_signal.wait(), remaining)
