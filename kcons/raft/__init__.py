"""A compact Raft log for kcons's metadata: relay leadership, leases, settings.

Parts, one concept per module:

* :mod:`kcons.raft.core` -- the algorithm as a pure, deterministic state machine (no I/O, no clock);
* :mod:`kcons.raft.log`, :mod:`kcons.raft.quorum` -- the in-memory log and majority arithmetic;
* :mod:`kcons.raft.messages`, :mod:`kcons.raft.codec` -- value types and their binary encoding;
* :mod:`kcons.raft.storage` -- the storage protocol, a WAL with snapshots, an in-memory variant;
* :mod:`kcons.raft.transport` -- HMAC-authenticated asyncio TCP framing;
* :mod:`kcons.raft.kv` -- the replicated key-value state machine (versions, CAS, leases, watch);
* :mod:`kcons.raft.node` -- the asyncio driver; :mod:`kcons.raft.client` -- the blocking client;
* :mod:`kcons.raft.linearizability` -- the history checker used by the tests and the fault run;
* :mod:`kcons.raft.cluster` -- local node processes for tests, fault runs and demos;
* :mod:`kcons.cli.raft` -- ``kcons raft serve|get|put|delete|cas|members|status``.
"""

from __future__ import annotations

from kcons.raft.client import KvResult, RaftClient, RequestRefusedError
from kcons.raft.core import RaftConfig, RaftCore, Ready
from kcons.raft.errors import (
    CorruptLogError,
    FrameRejectedError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalDroppedError,
    RaftError,
)
from kcons.raft.kv import KvStateMachine
from kcons.raft.node import NodeSettings, RaftNode
from kcons.raft.storage import MemoryStorage, RaftStorage, WalStorage

__all__ = [
    "CorruptLogError",
    "FrameRejectedError",
    "KvResult",
    "KvStateMachine",
    "MemoryStorage",
    "NodeSettings",
    "NotLeaderError",
    "OutcomeUnknownError",
    "ProposalDroppedError",
    "RaftClient",
    "RaftConfig",
    "RaftCore",
    "RaftError",
    "RaftNode",
    "RaftStorage",
    "Ready",
    "RequestRefusedError",
    "WalStorage",
]
