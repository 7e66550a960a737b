"""The topic auditor: duplicates by ``kcons-id``, per-aggregate version order, aggregates split over partitions.

:class:`TopicAuditor` takes batches of consumed records (confluent-kafka ``Message`` objects or
anything with the same methods) and keeps, over the whole read: the ids seen (with where each
was first seen, to report duplicates with offsets), per aggregate the highest version and the
partition, and per partition the counts. An aggregate is identified by its
``kcons-aggregate-type`` and ``kcons-aggregate-id`` headers.

Version promise. kcons's envelope promises versions *monotonic* per aggregate (the outbox writer
stores the version the caller gives; it does not draw or increment it), so the default check,
``monotonic``, reports only a version that does not rise. ``strict`` (each event exactly one
above the previous one) holds only where the writer increments the version by one per event, as
the aggregate's row version usually does; only the user can know that. ``off`` skips versions.
A read that starts in the middle of a topic cannot know an aggregate's version before the
range, so the first event of each aggregate in the range is never a gap.

A second copy of an id is a *duplicate*; it is not checked again for version order (it is the
same event). Records without a ``kcons-id`` header are counted apart and not checked.

Speed: a batch whose records carry the kcons header layout (``kcons-id``, ``kcons-type``,
``kcons-aggregate-type``, ``kcons-aggregate-id``, ``kcons-version`` first, as kcons producers
and the outbox relay write them) is checked with C-level loops (``map``/``zip`` over the Message
type's methods, dict and set operations); any other batch, or one in which the fast check finds a
violation, is checked again record by record by :meth:`TopicAuditor._feed_slow`, the reference
implementation, so that violations are reported with their offsets. Both give the same result
(tests/unit/test_audit_topic.py compares them).
"""

from __future__ import annotations

import array
import bisect
import itertools
import logging
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from kcons.envelope import HEADER_AGGREGATE_ID, HEADER_AGGREGATE_TYPE, HEADER_ID, HEADER_VERSION
from kcons.errors import ConfigError, TimeoutExceededError
from kcons.kafka.reader import RangeReader, RangeSpec

__all__ = [
    "AggregateSplit",
    "Duplicate",
    "PartitionStats",
    "TopicAuditor",
    "TopicReport",
    "VersionCheck",
    "VersionViolation",
    "audit_topic",
]

log = logging.getLogger(__name__)

_SEP = b"\x1f"  # joins aggregate type and id: a control character no sane id contains
_SHIFT = 20  # location = offset << 20 | partition (fewer than a million partitions)
_MASK = (1 << _SHIFT) - 1
_NAMES = (HEADER_ID, HEADER_AGGREGATE_TYPE, HEADER_AGGREGATE_ID, HEADER_VERSION)  # positions 0, 2, 3, 4
_AT = [operator.itemgetter(i) for i in (0, 2, 3, 4)]
_NAME = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)


class VersionCheck(StrEnum):
    """How versions must rise per aggregate: ``strict`` (+1 each event), ``monotonic`` (rise), ``off``."""

    STRICT = "strict"
    MONOTONIC = "monotonic"
    OFF = "off"


@dataclass(frozen=True)
class Duplicate:
    """An id seen more than once: where its first copy was and where the later ones were."""

    id: str
    first: tuple[int, int]  # (partition, offset)
    copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class VersionViolation:
    """An aggregate's version that did not rise (``regression``) or skipped (``gap``)."""

    kind: str
    aggregate: str
    previous: int
    version: int
    partition: int
    offset: int


@dataclass(frozen=True)
class AggregateSplit:
    """An aggregate whose events are in more than one partition (its order is then undefined)."""

    aggregate: str
    partitions: list[int]
    partition: int
    offset: int


@dataclass
class PartitionStats:
    """Per-partition counts."""

    records: int = 0
    distinct_ids: int = 0
    duplicates: int = 0
    without_kcons_headers: int = 0
    without_version: int = 0
    regressions: int = 0
    gaps: int = 0


@dataclass
class TopicReport:
    """What the auditor found; ``violations`` is the count that makes ``kcons audit topic`` fail."""

    topic: str
    versions: str
    partitions: dict[int, PartitionStats]
    records: int
    distinct_ids: int
    duplicates: int
    duplicate_ids: int
    regressions: int
    gaps: int
    split_aggregates: int
    without_kcons_headers: int
    without_version: int
    duplicate_list: list[Duplicate]
    version_list: list[VersionViolation]
    split_list: list[AggregateSplit]
    ranges: dict[int, dict[str, int]] = field(default_factory=dict)
    complete: bool = True
    seconds: float = 0.0

    @property
    def violations(self) -> int:
        """Duplicates + version regressions + gaps + split aggregates (+1 if the read was incomplete)."""
        return self.duplicates + self.regressions + self.gaps + self.split_aggregates + (0 if self.complete else 1)

    @property
    def ok(self) -> bool:
        """True when no violation was found and the whole range was read."""
        return self.violations == 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (partitions keyed by their number as text)."""
        out = asdict(self)
        out["partitions"] = {str(p): asdict(s) for p, s in sorted(self.partitions.items())}
        out["ranges"] = {str(p): r for p, r in sorted(self.ranges.items())}
        out["violations"] = self.violations
        out["ok"] = self.ok
        return out


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class TopicAuditor:
    """Checks batches of records from one topic; :meth:`report` says what it found so far."""

    def __init__(self, topic: str, *, versions: VersionCheck | str = VersionCheck.MONOTONIC, max_listed: int = 100):
        try:
            self.versions = VersionCheck(versions)
        except ValueError:
            raise ConfigError("--versions", f"must be strict, monotonic or off, got {versions!r}") from None
        self.topic = topic
        self.max_listed = max_listed
        # id -> where its first copy is: (offset << 20 | partition), or ~i for the i-th fast batch,
        # whose ids, offsets and partitions _batches keeps (cheaper than a location per record).
        self.seen: dict[bytes, int] = {}
        # Per fast batch: its ids joined, where each id ends in that blob, offsets, partitions. Bytes
        # and arrays hold no references, so a million ids add nothing to the garbage collector's passes.
        self._batches: list[tuple[bytes, array.array[int], array.array[int], array.array[int]]] = []
        self.last: dict[bytes, int] = {}  # aggregate -> highest version seen
        self.home: dict[bytes, int] = {}  # aggregate -> partition of its first event
        self.stats: dict[int, PartitionStats] = {}
        self.duplicate_ids: dict[bytes, Duplicate] = {}
        self.extra_copies: dict[bytes, int] = {}  # id -> copies after the first (exact, not capped)
        self.version_list: list[VersionViolation] = []
        self.split: dict[bytes, AggregateSplit] = {}
        self.split_count = 0
        self.fast_batches = 0
        self.slow_batches = 0

    # --- the reference implementation: one record at a time ----------------------------------

    def _feed_slow(self, msgs: Sequence[Any]) -> None:
        """Check ``msgs`` record by record (any layout of headers; first occurrence of a name wins)."""
        check = self.versions
        for msg in msgs:
            partition, offset = msg.partition(), msg.offset()
            st = self._partition(partition)
            st.records += 1
            headers: dict[str, bytes | None] = {}
            for name, value in msg.headers() or ():
                headers.setdefault(name, value)
            event_id = headers.get(HEADER_ID)
            if not event_id:
                st.without_kcons_headers += 1
                continue
            loc = (offset << _SHIFT) | partition
            first = self.seen.get(event_id)
            if first is not None:
                self._duplicate(event_id, first, partition, offset)
                continue
            self.seen[event_id] = loc
            st.distinct_ids += 1
            aggregate = (headers.get(HEADER_AGGREGATE_TYPE) or b"") + _SEP + (
                headers.get(HEADER_AGGREGATE_ID) or msg.key() or b""
            )
            home = self.home.setdefault(aggregate, partition)
            if home != partition:
                self._split(aggregate, home, partition, offset)
            raw = headers.get(HEADER_VERSION)
            try:
                version = int(raw) if raw else None
            except ValueError:
                version = None
            if version is None:
                st.without_version += 1
                continue
            if check is VersionCheck.OFF:
                continue
            previous = self.last.get(aggregate)
            if previous is not None:
                if version <= previous:
                    st.regressions += 1
                    self._version("regression", aggregate, previous, version, partition, offset)
                elif check is VersionCheck.STRICT and version != previous + 1:
                    st.gaps += 1
                    self._version("gap", aggregate, previous, version, partition, offset)
                self.last[aggregate] = max(previous, version)
            else:
                self.last[aggregate] = version

    def _partition(self, partition: int) -> PartitionStats:
        st = self.stats.get(partition)
        if st is None:
            st = self.stats[partition] = PartitionStats()
        return st

    def _duplicate(self, event_id: bytes, first: int, partition: int, offset: int) -> None:
        self._partition(partition).duplicates += 1
        self.extra_copies[event_id] = self.extra_copies.get(event_id, 0) + 1
        dup = self.duplicate_ids.get(event_id)
        if dup is None and len(self.duplicate_ids) < self.max_listed:
            dup = Duplicate(_text(event_id), self._location(first, event_id))
            self.duplicate_ids[event_id] = dup
        if dup is not None and len(dup.copies) < self.max_listed:
            dup.copies.append((partition, offset))

    def _location(self, first: int, event_id: bytes) -> tuple[int, int]:
        """(partition, offset) of an id's first copy from its ``seen`` entry."""
        if first >= 0:
            return first & _MASK, first >> _SHIFT
        blob, ends, offsets, partitions = self._batches[~first]
        pos = blob.find(event_id)
        while pos >= 0:
            i = bisect.bisect_right(ends, pos)  # the id that covers byte ``pos``
            if (ends[i - 1] if i else 0) == pos and ends[i] == pos + len(event_id):
                return partitions[i], offsets[i]
            pos = blob.find(event_id, pos + 1)
        raise AssertionError(f"id {event_id!r} recorded in a batch that does not hold it")

    def _version(self, kind: str, aggregate: bytes, previous: int, version: int, partition: int, offset: int) -> None:
        if len(self.version_list) < self.max_listed:
            agg = _text(aggregate).replace("\x1f", "/")
            self.version_list.append(VersionViolation(kind, agg, previous, version, partition, offset))

    def _split(self, aggregate: bytes, home: int, partition: int, offset: int) -> None:
        found = self.split.get(aggregate)
        if found is None:
            self.split_count += 1
            if len(self.split) < self.max_listed:
                agg = _text(aggregate).replace("\x1f", "/")
                self.split[aggregate] = AggregateSplit(agg, [home, partition], partition, offset)
        elif partition not in found.partitions:
            found.partitions.append(partition)

    # --- the fast path ------------------------------------------------------------------------

    def feed(self, msgs: Sequence[Any]) -> None:
        """Check one batch of records (in offset order per partition)."""
        if not msgs:
            return
        if self._feed_fast(msgs):
            self.fast_batches += 1
        else:
            self.slow_batches += 1
            self._feed_slow(msgs)

    def _feed_fast(self, msgs: Sequence[Any]) -> bool:
        """Check a clean batch with C-level loops and apply it; False (nothing applied) if it needs the slow path."""
        cls = type(msgs[0])
        n = len(msgs)
        if list(map(type, msgs)).count(cls) != n:
            return False
        headers = list(map(cls.headers, msgs))
        try:
            # The header pairs at positions 0, 2, 3, 4 (the pairs themselves: no new tuple per record).
            pairs = [list(map(g, headers)) for g in _AT]
        except (TypeError, IndexError):  # no headers, or fewer than five
            return False
        for name, column in zip(_NAMES, pairs, strict=True):
            if list(map(_NAME, column)).count(name) != n:
                return False
        ids, types, aggregate_ids, raw_versions = (list(map(_VALUE, column)) for column in pairs)
        if not all(ids):  # an empty or missing id
            return False
        try:
            blob = b"".join(ids)
        except TypeError:  # an id that is not bytes
            return False
        # Duplicates, inside the batch or with earlier batches.
        fresh = dict.fromkeys(ids, ~len(self._batches))
        if len(fresh) != n or not self.seen.keys().isdisjoint(fresh):
            return False
        try:
            versions = list(map(int, raw_versions))  # ValueError/TypeError: not a number
        except (TypeError, ValueError):
            return False
        try:
            aggregates = list(map(_SEP.join, zip(types, aggregate_ids, strict=True)))
        except TypeError:  # a missing aggregate type or id
            return False
        partitions = list(map(cls.partition, msgs))
        # A stable sort by aggregate puts each aggregate's events side by side, in batch order.
        order = sorted(range(n), key=aggregates.__getitem__)
        aggs = list(map(aggregates.__getitem__, order))
        same = list(map(operator.eq, aggs[1:], aggs[:-1]))
        parts = list(map(partitions.__getitem__, order))
        if not all(itertools.compress(map(operator.eq, parts[1:], parts[:-1]), same)):
            return False  # an aggregate in two partitions of this batch
        home = dict(zip(aggregates, partitions, strict=True))
        if list(map(operator.eq, map(self.home.get, home, home.values()), home.values())).count(True) != len(home):
            return False  # an aggregate in another partition than before
        check = self.versions
        if check is not VersionCheck.OFF and not self._versions_ok(aggregates, versions, order, same):
            return False
        # Clean: apply.
        self.seen.update(fresh)
        self._batches.append(
            (blob, array.array("q", itertools.accumulate(map(len, ids))),
             array.array("q", map(cls.offset, msgs)), array.array("l", partitions))
        )  # fmt: skip
        for partition, count in _counts(partitions).items():
            st = self._partition(partition)
            st.records += count
            st.distinct_ids += count
        self.home.update(home)
        if check is not VersionCheck.OFF:
            self.last.update(zip(aggregates, versions, strict=True))
        return True

    def _versions_ok(self, aggregates: list[bytes], versions: list[int], order: list[int], same: list[bool]) -> bool:
        """True when every aggregate's versions in the batch rise (by one, ``strict``) from what came before."""
        vers = list(map(versions.__getitem__, order))
        diffs = list(itertools.compress(map(operator.sub, vers[1:], vers[:-1]), same))
        if diffs and (min(diffs) < 1 if self.versions is VersionCheck.MONOTONIC else diffs.count(1) != len(diffs)):
            return False
        # The first event of each aggregate in the batch against the highest version before it.
        firsts = dict(zip(reversed(aggregates), reversed(versions), strict=True))
        # An aggregate not seen before gets its own first version minus one: always fine.
        before = list(map(self.last.get, firsts, map(operator.sub, firsts.values(), itertools.repeat(1))))
        steps = list(map(operator.sub, firsts.values(), before))
        if self.versions is VersionCheck.MONOTONIC:
            return bool(min(steps) >= 1)
        return steps.count(1) == len(steps)

    # --- results --------------------------------------------------------------------------------

    def report(self, *, ranges: dict[int, dict[str, int]] | None = None, complete: bool = True) -> TopicReport:
        """The counts and the (capped) lists of violations found so far."""
        stats = self.stats
        return TopicReport(
            topic=self.topic,
            versions=self.versions.value,
            partitions=dict(sorted(stats.items())),
            records=sum(s.records for s in stats.values()),
            distinct_ids=len(self.seen),
            duplicates=sum(s.duplicates for s in stats.values()),
            duplicate_ids=len(self.extra_copies),
            regressions=sum(s.regressions for s in stats.values()),
            gaps=sum(s.gaps for s in stats.values()),
            split_aggregates=self.split_count,
            without_kcons_headers=sum(s.without_kcons_headers for s in stats.values()),
            without_version=sum(s.without_version for s in stats.values()),
            duplicate_list=list(self.duplicate_ids.values())[: self.max_listed],
            version_list=list(self.version_list),
            split_list=list(self.split.values()),
            ranges=dict(ranges or {}),
            complete=complete,
        )


def _counts(values: list[int]) -> dict[int, int]:
    """How many times each value occurs (C-level for the common one-value batch)."""
    first = values[0]
    if values.count(first) == len(values):
        return {first: len(values)}
    out: dict[int, int] = {}
    for v in set(values):
        out[v] = values.count(v)
    return out


#: Called after each batch with (records read so far, records planned in total).
Progress = Callable[[int, int], None]


def audit_topic(
    config: Mapping[str, Any],
    topic: str,
    spec: RangeSpec | None = None,
    *,
    isolation: str = "read_committed",
    versions: VersionCheck | str = VersionCheck.MONOTONIC,
    max_listed: int = 100,
    batch_size: int = 10_000,
    idle_timeout_s: float = 30.0,
    progress: Progress | None = None,
    auditor: TopicAuditor | None = None,
    max_rate: float = 0.0,
) -> TopicReport:
    """Read ``spec``'s range of ``topic`` read-only (assign, no group, no commits) and audit it.

    ``config`` is a confluent-kafka config; only its connection and security properties are used.
    The range's ends are taken when the read starts; a read that makes no progress for
    ``idle_timeout_s`` stops and the report says ``complete=False``. Pass ``auditor`` to keep its
    state after the call (the ids seen, in ``auditor.seen``); ``versions`` and ``max_listed`` are then its own.
    ``max_rate`` > 0 caps the read at that many records per second (the load on the brokers).
    """
    if auditor is None:
        auditor = TopicAuditor(topic, versions=versions, max_listed=max_listed)
    started = time.monotonic()
    complete = True
    reader = RangeReader(config, topic, spec, isolation=isolation, batch_size=batch_size, idle_timeout_s=idle_timeout_s)
    with reader:
        plan = reader.plan()
        total = sum(r.end - r.start for r in plan.values())
        read = 0
        try:
            for batch in reader.batches():
                auditor.feed(batch)
                read += len(batch)
                if progress is not None:
                    progress(read, total)
                if max_rate > 0:
                    ahead = read / max_rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except TimeoutExceededError as exc:
            log.warning("%s", exc)
            complete = False
        ranges = {
            p: {"start": r.start, "end": r.end, "low": r.low, "high": r.high, "reached": min(r.position, r.end)}
            for p, r in plan.items()
        }
    report = auditor.report(ranges=ranges, complete=complete)
    report.seconds = round(time.monotonic() - started, 3)
    return report
