"""The consumer's batch decision as pure steps: no Kafka, no clock, no I/O.

A batch is a list of :class:`Entry` (topic, partition, offset, event id or poison reason). The
driver claims the batch's ids in the dedup store, then:

1. :class:`BatchPlan` takes the entries, the claim (ids now ours, ids already done) and the ids
   handled whose done records are not written yet (they count as done), and walks the batch in
   order. :meth:`BatchPlan.next` decides every entry that needs no handler (poison: dead-letter;
   done or repeated id: drop; id busy in another worker: hold the partition there) and returns
   the index of the next entry to handle; :meth:`BatchPlan.fresh` lists the entries a handler
   that never fails would get (what a batch handler is given).
2. The driver runs the handler and reports the outcome (:data:`OK`, :class:`DeadLetter`,
   :class:`Hold`) with :meth:`BatchPlan.record`; a hold stops its partition there, so the rest of
   that partition is deferred, never skipped.
3. :meth:`BatchPlan.settle` returns the :class:`Decision`: ids to record done, offsets to commit
   per partition, messages to dead-letter (with reasons), partitions to hold (rewind and pause)
   at an offset, claims to give back. :func:`after_dead_letters` settles the dead-letter writes
   (an unacknowledged one holds its partition at that message).

The offset committed for a partition is always the offset after its last decided message
before the first message that is not decided: a message is never skipped. :func:`all_new` is
the fast path's decision (every message new and handled): the same :class:`Decision` the steps
give for that batch, built without walking it (a property test checks they agree).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "OK",
    "TP",
    "BatchPlan",
    "DeadLetter",
    "Decision",
    "Entry",
    "Hold",
    "Outcome",
    "Poison",
    "abandon",
    "after_dead_letters",
    "all_new",
    "hold_all",
]

#: A topic partition: ``(topic, partition)``.
TP = tuple[str, int]


class Entry(NamedTuple):
    """One consumed message as the decision sees it: its position, and its event id or why it is poison."""

    topic: str
    partition: int
    offset: int
    event_id: str | None
    poison: str | None = None


class Hold(NamedTuple):
    """Stop a partition at ``offset``: nothing from there on is committed; it is rewound and paused ``pause_s``.

    As a handler outcome, ``offset`` is ignored (the handled message's own offset is used) and a
    negative ``pause_s`` means the batch's default pause.
    """

    offset: int
    pause_s: float
    reason: str


class Poison(NamedTuple):
    """A message to dead-letter: position in the batch, the event id when it was claimed (else None), and why."""

    position: int
    event_id: str | None
    reason: str


class DeadLetter(NamedTuple):
    """Handler outcome: the message failed for good (after its retries, or cannot be decoded)."""

    reason: str


class _Ok:
    __slots__ = ()

    def __repr__(self) -> str:
        return "OK"


#: Handler outcome: the message's effect is done.
OK = _Ok()
#: What a handler attempt can end with (an interrupt is :func:`abandon`).
Outcome = _Ok | DeadLetter | Hold


@dataclass
class Decision:
    """What a batch comes to: the plan the driver carries out, in this order.

    1. record ``done`` in the dedup store; 2. dead-letter ``dead_letter`` (then
    :func:`after_dead_letters`); 3. give back ``release``; 4. rewind and pause ``holds``;
    5. commit ``commit`` (offset after the last decided message of each partition).
    """

    done: list[str] = field(default_factory=list)
    commit: dict[TP, int] = field(default_factory=dict)
    dead_letter: list[Poison] = field(default_factory=list)
    holds: dict[TP, Hold] = field(default_factory=dict)
    release: set[str] = field(default_factory=set)
    duplicates: int = 0
    deferred: int = 0
    dead_lettered: int = 0

    @property
    def handled(self) -> int:
        """Messages whose effect is done in this batch."""
        return len(self.done)

    def hold(self, tp: TP, offset: int, pause_s: float, reason: str) -> None:
        """Stop ``tp`` at ``offset`` (the lowest hold wins) and commit nothing from there on."""
        current = self.holds.get(tp)
        if current is None or offset < current.offset:
            self.holds[tp] = Hold(offset, pause_s, reason)
        if self.commit.get(tp, -1) > offset:
            self.commit[tp] = offset


class BatchPlan:
    """One batch's decision, walked in order: entries needing no handler are decided here, the rest by outcomes.

    ``claimed``: ids of the batch now ours; ``done``: ids already done (duplicates), including
    the ones handled whose done records are not written yet. An id in neither is busy in
    another worker. ``pause_s``: how long a held partition stays paused by default.
    """

    __slots__ = ("_claimed", "_current", "_d", "_entries", "_pause_s", "_pos", "_seen")

    def __init__(self, entries: Sequence[Entry], claimed: Set[str], done: Collection[str], pause_s: float) -> None:
        self._entries = entries
        self._claimed = claimed
        self._seen: set[str] = set(done)
        self._pause_s = pause_s
        self._pos = 0
        self._current = -1
        self._d = Decision()

    @property
    def entries(self) -> Sequence[Entry]:
        """The batch."""
        return self._entries

    def fresh(self) -> list[int]:
        """Indices of the entries a handler that never fails would be given, in order ("handle these")."""
        out: list[int] = []
        busy: set[TP] = set()
        seen = set(self._seen)
        claimed = self._claimed
        for i, (topic, partition, _offset, event_id, poison) in enumerate(self._entries):
            if poison is not None or event_id is None or event_id in seen:
                continue
            tp = (topic, partition)
            if tp in busy:
                continue
            if event_id not in claimed:
                busy.add(tp)
                continue
            seen.add(event_id)
            out.append(i)
        return out

    def next(self) -> int | None:
        """Decide entries up to the next one to handle and return its index; None when the batch is decided."""
        if self._current >= 0:
            raise RuntimeError("record the outcome of the entry being handled first")
        d = self._d
        holds = d.holds
        commit = d.commit
        seen = self._seen
        entries = self._entries
        while self._pos < len(entries):
            i = self._pos
            self._pos += 1
            topic, partition, offset, event_id, poison = entries[i]
            tp = (topic, partition)
            if holds and tp in holds:
                d.deferred += 1
            elif poison is not None or event_id is None:
                d.dead_letter.append(Poison(i, None, poison or "no event id"))
                commit[tp] = offset + 1
            elif event_id in seen:
                d.duplicates += 1
                commit[tp] = offset + 1
            elif event_id not in self._claimed:
                d.hold(tp, offset, self._pause_s, "busy")
                d.deferred += 1
            else:
                self._current = i
                return i
        return None

    def record(self, outcome: Outcome) -> None:
        """The outcome of the entry :meth:`next` returned."""
        i = self._current
        if i < 0:
            raise RuntimeError("no entry is being handled")
        self._current = -1
        topic, partition, offset, event_id, _ = self._entries[i]
        assert event_id is not None
        d = self._d
        if outcome is OK:
            d.done.append(event_id)
            self._seen.add(event_id)
            d.commit[(topic, partition)] = offset + 1
        elif isinstance(outcome, DeadLetter):
            d.dead_letter.append(Poison(i, event_id, outcome.reason))
            self._seen.add(event_id)
            d.commit[(topic, partition)] = offset + 1
        else:
            assert isinstance(outcome, Hold)
            pause_s = outcome.pause_s if outcome.pause_s >= 0 else self._pause_s
            d.hold((topic, partition), offset, pause_s, outcome.reason)
            d.deferred += 1

    @property
    def done(self) -> list[str]:
        """Ids whose effect is done so far."""
        return self._d.done

    def settle(self) -> Decision:
        """Decide what is left (no more handler runs) and return the batch's decision."""
        if self._current >= 0:
            raise RuntimeError("record the outcome of the entry being handled first")
        if self.next() is not None:
            raise RuntimeError("entries left to handle: call next() until it returns None")
        d = self._d
        d.release = set(self._claimed).difference(d.done)
        return d


def all_new(ids: list[str], commit: dict[TP, int]) -> Decision:
    """The decision for a batch whose messages are all new, claimed and handled (the fast path).

    ``ids`` are the batch's ids in order (distinct), ``commit`` the offset after each
    partition's last message: the decision :class:`BatchPlan` reaches with every outcome OK.
    """
    return Decision(done=ids, commit=commit)


def after_dead_letters(d: Decision, entries: Sequence[Entry], acknowledged: Set[int], pause_s: float) -> Decision:
    """Settle the dead-letter writes: each write not acknowledged (by position in ``d.dead_letter``) holds its
    partition at that message, so it is consumed and written again later instead of being lost."""
    for n, poison in enumerate(d.dead_letter):
        if n in acknowledged:
            continue
        e = entries[poison.position]
        d.hold((e.topic, e.partition), e.offset, pause_s, "dead_letter_failed")
        d.deferred += 1
    d.dead_lettered = len(acknowledged)
    return d


def hold_all(starts: Mapping[TP, int], count: int, pause_s: float, reason: str) -> Decision:
    """Nothing of the batch is decided (store outage): every partition is held at its first message."""
    d = Decision(deferred=count)
    for tp, offset in starts.items():
        d.hold(tp, offset, pause_s, reason)
    return d


def abandon(done: list[str], claimed: Set[str], starts: Mapping[TP, int], pause_s: float, reason: str) -> Decision:
    """The batch stopped part-way (its effects failed, or an interrupt): keep ``done``, give back the other
    claims, commit nothing, hold every partition at its first message."""
    d = hold_all(starts, 0, pause_s, reason)
    d.done = list(done)
    d.release = set(claimed).difference(done)
    return d
