"""A linearizability checker for client histories (Wing & Gong's search with Lowe's memoization).

A history is a list of :class:`Operation` (invocation time, response time, input, output).
An operation whose outcome is unknown (the client timed out) has ``ret = inf`` and
``output = UNKNOWN``: it may take effect at any point after its call, or never. The checker
searches for a total order consistent with real time in which every operation's output is the
one a sequential model gives; it memoizes (set of linearized operations, model state) pairs so
that equivalent interleavings are explored once (Lowe, "Testing for linearizability", 2017).

Histories of a key-value store are checked one key at a time (linearizability is local,
Herlihy & Wing), which keeps the search small.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "UNKNOWN",
    "CheckResult",
    "KvModel",
    "Operation",
    "VersionedKvModel",
    "check_kv_history",
    "check_linearizable",
]


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


#: Output of an operation whose outcome the client never learned.
UNKNOWN: Any = _Unknown()


@dataclass(frozen=True)
class Operation:
    """One client operation: [call, ret] in real time, what was asked and what was answered."""

    call: float
    ret: float
    input: Any
    output: Any = UNKNOWN
    client: int = 0

    @staticmethod
    def pending(call: float, input: Any, client: int = 0) -> Operation:
        """An operation whose outcome is unknown."""
        return Operation(call, math.inf, input, UNKNOWN, client)


# A sequential model: (state, input, output) -> (is this output legal, next state).
Step = Callable[[Hashable, Any, Any], tuple[bool, Hashable]]


@dataclass(frozen=True)
class CheckResult:
    """Whether a history is linearizable; when not, which key (or partition) failed."""

    ok: bool
    failed_key: Any = None
    operations: int = 0


class _Node:
    __slots__ = ("is_call", "match", "next", "op_id", "prev")

    def __init__(self, op_id: int, is_call: bool) -> None:
        self.op_id = op_id
        self.is_call = is_call
        self.prev: _Node | None = None
        self.next: _Node | None = None
        self.match: _Node | None = None


def check_linearizable(history: list[Operation], init: Hashable, step: Step) -> bool:
    """True when ``history`` has a linearization under the sequential ``step`` model."""
    if not history:
        return True
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(history):
        events.append((op.call, 0, i))  # at equal times calls sort first: overlapping counts as concurrent
        events.append((op.ret, 1, i))
    events.sort()
    head = _Node(-1, False)
    prev = head
    calls: dict[int, _Node] = {}
    for _, kind, i in events:
        node = _Node(i, kind == 0)
        if kind == 0:
            calls[i] = node
        else:
            calls[i].match = node
        prev.next = node
        node.prev = prev
        prev = node

    def lift(n: _Node) -> None:
        assert n.prev is not None and n.match is not None and n.match.prev is not None
        n.prev.next = n.next
        if n.next is not None:
            n.next.prev = n.prev
        m = n.match
        m.prev.next = m.next  # type: ignore[union-attr]
        if m.next is not None:
            m.next.prev = m.prev

    def unlift(n: _Node) -> None:
        m = n.match
        assert m is not None and m.prev is not None and n.prev is not None
        m.prev.next = m
        if m.next is not None:
            m.next.prev = m
        n.prev.next = n
        if n.next is not None:
            n.next.prev = n

    state: Hashable = init
    linearized = 0
    cache: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Node, Hashable]] = []
    entry = head.next
    while head.next is not None:
        assert entry is not None
        if entry.is_call:
            op = history[entry.op_id]
            legal, new_state = step(state, op.input, op.output)
            if legal:
                bits = linearized | (1 << entry.op_id)
                key = (bits, new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state = new_state
                    linearized = bits
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # A return reached while its operation is not linearized: undo the last choice.
            if not stack:
                return False
            top, state = stack.pop()
            linearized &= ~(1 << top.op_id)
            unlift(top)
            entry = top.next
    return True


class KvModel:
    """Sequential model of one register of a key-value store, for :func:`check_kv_history`.

    Inputs: ``("put", value)``, ``("get",)``, ``("cas", expected, new)``, ``("delete",)``.
    Outputs: put/delete -> None, get -> the value or None, cas -> True/False.
    """

    @staticmethod
    def step(state: Hashable, inp: Any, out: Any) -> tuple[bool, Hashable]:
        """Apply ``inp`` to ``state``; legal when ``out`` matches (anything matches UNKNOWN)."""
        kind = inp[0]
        if kind == "put":
            return (out is UNKNOWN or out is None), inp[1]
        if kind == "delete":
            return (out is UNKNOWN or out is None), None
        if kind == "get":
            return (out is UNKNOWN or out == state), state
        if kind == "cas":
            hit = state == inp[1]
            return (out is UNKNOWN or out == hit), (inp[2] if hit else state)
        raise ValueError(f"unknown operation {kind!r}")


class VersionedKvModel:
    """Sequential model of one key of :mod:`kcons.raft.kv` (value and version), state ``(value, version)``.

    Inputs and outputs: ``("put", v)`` -> new version; ``("get",)`` -> ``(value, version)`` with
    ``(None, 0)`` when absent; ``("cas", expected_version, v)`` -> ``(written, version_now)``;
    ``("delete",)`` -> whether the key existed.
    """

    INIT: Hashable = (None, 0)

    @staticmethod
    def step(state: Hashable, inp: Any, out: Any) -> tuple[bool, Hashable]:
        """Apply ``inp``; legal when ``out`` is what the store must have answered (or UNKNOWN)."""
        assert isinstance(state, tuple)
        value: Any = state[0]
        version: int = state[1]
        kind = inp[0]
        if kind == "put":
            return (out is UNKNOWN or out == version + 1), (inp[1], version + 1)
        if kind == "get":
            return (out is UNKNOWN or tuple(out) == (value, version)), state
        if kind == "cas":
            if version == inp[1]:
                return (out is UNKNOWN or tuple(out) == (True, version + 1)), (inp[2], version + 1)
            return (out is UNKNOWN or tuple(out) == (False, version)), state
        if kind == "delete":
            return (out is UNKNOWN or out == (value is not None)), (None, 0)
        raise ValueError(f"unknown operation {kind!r}")


def check_kv_history(
    history: Iterable[tuple[Any, Operation]], init: Hashable = None, step: Step | None = None
) -> CheckResult:
    """Check ``(key, operation)`` pairs key by key against :class:`KvModel`.

    Reads whose outcome is unknown constrain nothing and are dropped before the search.
    """
    by_key: dict[Any, list[Operation]] = defaultdict(list)
    total = 0
    for key, op in history:
        if op.output is UNKNOWN and op.input[0] == "get":
            continue
        by_key[key].append(op)
        total += 1
    model = step or KvModel.step
    for key, ops in by_key.items():
        if not check_linearizable(ops, init, model):
            return CheckResult(False, key, total)
    return CheckResult(True, None, total)
