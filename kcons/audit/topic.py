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
and the outbox relay write them) is checked with C-level loops (``zip`` to split the header
pairs, ``map``, ``sort``, dict and set operations); any other batch, or one in which the fast
check finds a violation, is checked again record by record by :meth:`TopicAuditor._feed_slow`,
the reference implementation, so that violations are reported with their offsets. Both give the
same result (tests/unit/test_audit_topic.py compares them). Ids are kept as the header's bytes;
where an id's first copy was is kept per batch (the batch's ids, its partition and first offset,
or arrays when the batch spans partitions or its offsets are not contiguous) and looked up only
when a copy is found. :func:`audit_topic` raises the collector's young-generation threshold
while it reads (see :func:`_fewer_collections`).
"""

from __future__ import annotations

import array
import gc
import itertools
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from kcons.envelope import HEADER_AGGREGATE_ID, HEADER_AGGREGATE_TYPE, HEADER_ID, HEADER_TYPE, HEADER_VERSION
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

_SHIFT = 20  # location = offset << 20 | partition (fewer than a million partitions)
_MASK = (1 << _SHIFT) - 1
#: The kcons headers in the order kcons writes them first (positions 0-4).
_LAYOUT = (HEADER_ID, HEADER_TYPE, HEADER_AGGREGATE_TYPE, HEADER_AGGREGATE_ID, HEADER_VERSION)
_NOTHING: Mapping[bytes, int] = {}


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
        self.seen: set[bytes] = set()  # every id read (a set: one memory access per lookup)
        # Where each id's first copy is: (offset << 20 | partition) for the ids the slow path added;
        # the fast batches' ids, partition(s) and offset(s) for the others, searched only for a copy.
        self._first: dict[bytes, int] = {}
        self._batches: list[_Batch] = []
        # Per aggregate type, per aggregate id: the highest version seen, the partition of the first event.
        self.last: dict[bytes, dict[bytes, int]] = {}
        self.home: dict[bytes, dict[bytes, int]] = {}
        self.stats: dict[int, PartitionStats] = {}
        self.duplicate_ids: dict[bytes, Duplicate] = {}
        self.extra_copies: dict[bytes, int] = {}  # id -> copies after the first (exact, not capped)
        self.version_list: list[VersionViolation] = []
        self.split: dict[tuple[bytes, bytes], AggregateSplit] = {}
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
            if event_id in self.seen:
                self._duplicate(event_id, partition, offset)
                continue
            self.seen.add(event_id)
            self._first[event_id] = (offset << _SHIFT) | partition
            st.distinct_ids += 1
            kind = headers.get(HEADER_AGGREGATE_TYPE) or b""
            aggregate = headers.get(HEADER_AGGREGATE_ID) or msg.key() or b""
            home = self.home.setdefault(kind, {}).setdefault(aggregate, partition)
            if home != partition:
                self._split(kind, aggregate, home, partition, offset)
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
            last = self.last.setdefault(kind, {})
            previous = last.get(aggregate)
            if previous is not None:
                if version <= previous:
                    st.regressions += 1
                    self._version("regression", kind, aggregate, previous, version, partition, offset)
                elif check is VersionCheck.STRICT and version != previous + 1:
                    st.gaps += 1
                    self._version("gap", kind, aggregate, previous, version, partition, offset)
                last[aggregate] = max(previous, version)
            else:
                last[aggregate] = version

    def _partition(self, partition: int) -> PartitionStats:
        st = self.stats.get(partition)
        if st is None:
            st = self.stats[partition] = PartitionStats()
        return st

    def _duplicate(self, event_id: bytes, partition: int, offset: int) -> None:
        self._partition(partition).duplicates += 1
        self.extra_copies[event_id] = self.extra_copies.get(event_id, 0) + 1
        dup = self.duplicate_ids.get(event_id)
        if dup is None and len(self.duplicate_ids) < self.max_listed:
            dup = Duplicate(_text(event_id), self._location(event_id))
            self.duplicate_ids[event_id] = dup
        if dup is not None and len(dup.copies) < self.max_listed:
            dup.copies.append((partition, offset))

    def _location(self, event_id: bytes) -> tuple[int, int]:
        """(partition, offset) of the first copy of an id in :attr:`seen` (a search: done for listed copies only)."""
        first = self._first.get(event_id)
        if first is not None:
            return first & _MASK, first >> _SHIFT
        for batch in self._batches:
            if event_id in batch.ids:
                return batch.where(event_id)
        raise AssertionError(f"id {event_id!r} is in seen but in no batch")

    def _version(
        self, kind: str, atype: bytes, aggregate: bytes, previous: int, version: int, partition: int, offset: int
    ) -> None:
        if len(self.version_list) < self.max_listed:
            agg = _aggregate_text(atype, aggregate)
            self.version_list.append(VersionViolation(kind, agg, previous, version, partition, offset))

    def _split(self, atype: bytes, aggregate: bytes, home: int, partition: int, offset: int) -> None:
        found = self.split.get((atype, aggregate))
        if found is None:
            self.split_count += 1
            if len(self.split) < self.max_listed:
                agg = _aggregate_text(atype, aggregate)
                self.split[atype, aggregate] = AggregateSplit(agg, [home, partition], partition, offset)
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
            # The first five header pairs of every record, one tuple per position; zip stops at the
            # shortest record, so fewer than five columns means a record with fewer headers.
            columns = list(itertools.islice(zip(*headers, strict=False), len(_LAYOUT)))
        except TypeError:  # a record without headers
            return False
        if len(columns) < len(_LAYOUT):
            return False
        values: list[tuple[Any, ...]] = []
        for name, column in zip(_LAYOUT, columns, strict=True):  # the five kcons headers first, in order
            try:
                names, found = zip(*column, strict=True)  # (names, values) of the (name, value) pairs
            except (TypeError, ValueError):
                return False
            if names.count(name) != n:
                return False
            values.append(found)
        ids, _, kinds, aggregates, raw_versions = values
        if not all(ids) or not all(aggregates):  # an empty id; an empty aggregate id means "use the key"
            return False
        # Duplicates, inside the batch or with earlier batches.
        fresh = set(ids)
        if len(fresh) != n or not self.seen.isdisjoint(fresh):
            return False
        try:
            versions = list(map(int, raw_versions))  # ValueError/TypeError: not a number
        except (TypeError, ValueError):
            return False
        partitions = list(map(cls.partition, msgs))
        single = partitions.count(partitions[0]) == n
        kind = kinds[0]
        groups: list[tuple[bytes, Sequence[bytes], list[int], list[int]]]
        if kinds.count(kind) == n:
            groups = [(kind or b"", aggregates, versions, partitions)]
        else:
            distinct = set(kinds)
            if None in distinct or b"" in distinct:  # the slow path reads both as b""
                return False
            groups = []
            for kind in distinct:
                mask = list(map(operator.eq, kinds, itertools.repeat(kind)))
                groups.append(
                    (kind, list(itertools.compress(aggregates, mask)), list(itertools.compress(versions, mask)),
                     list(itertools.compress(partitions, mask)))
                )  # fmt: skip
        results = []
        for kind, aggs, vers, parts in groups:
            clean = self._group_ok(kind, aggs, vers, parts, single)
            if clean is None:
                return False
            results.append(clean)
        # Clean: apply.
        self.seen |= fresh
        self._batches.append(_Batch.of(cls, msgs, ids, partitions, single))
        for partition, count in _counts(partitions, single).items():
            st = self._partition(partition)
            st.records += count
            st.distinct_ids += count
        for (kind, *_), (home, lasts) in zip(groups, results, strict=True):
            self.home.setdefault(kind, {}).update(home)
            if lasts:
                self.last.setdefault(kind, {}).update(lasts)
        return True

    def _group_ok(
        self, kind: bytes, aggregates: Sequence[bytes], versions: list[int], partitions: list[int], single: bool
    ) -> tuple[dict[bytes, int], dict[bytes, int]] | None:
        """One aggregate type's records of a batch, if clean: (aggregate -> partition, aggregate -> last version).

        None when an aggregate is in another partition than before or in two partitions of the
        batch, or when its versions do not rise (by one, ``strict``) from the highest one before.
        """
        known = self.home.get(kind, _NOTHING)
        check = self.versions
        if check is VersionCheck.OFF and single:
            p = partitions[0]
            home = dict.fromkeys(aggregates, p)
            if list(map(known.get, home, itertools.repeat(p))).count(p) != len(home):
                return None  # an aggregate in another partition than before
            return home, {}
        # A stable sort by aggregate puts each aggregate's events side by side, in batch order.
        order = sorted(range(len(aggregates)), key=aggregates.__getitem__)
        aggs = list(map(aggregates.__getitem__, order))
        same = list(map(operator.eq, aggs[1:], aggs[:-1]))  # same[i]: aggs[i + 1] is aggs[i]'s aggregate
        starts = [True, *map(operator.not_, same)]  # each aggregate's first event in the batch
        distinct = list(itertools.compress(aggs, starts))
        if single:
            p = partitions[0]
            home = dict.fromkeys(distinct, p)
            if list(map(known.get, home, itertools.repeat(p))).count(p) != len(home):
                return None  # an aggregate in another partition than before
        else:
            parts = list(map(partitions.__getitem__, order))
            if not all(itertools.compress(map(operator.eq, parts[1:], parts[:-1]), same)):
                return None  # an aggregate in two partitions of this batch
            home = dict(zip(distinct, itertools.compress(parts, starts), strict=True))
            if list(map(operator.eq, map(known.get, home, home.values()), home.values())).count(True) != len(home):
                return None
        if check is VersionCheck.OFF:
            return home, {}
        vers = list(map(versions.__getitem__, order))
        diffs = list(itertools.compress(map(operator.sub, vers[1:], vers[:-1]), same))
        if diffs and (min(diffs) < 1 if check is VersionCheck.MONOTONIC else diffs.count(1) != len(diffs)):
            return None
        # The first event of each aggregate in the batch against the highest version before it.
        firsts = list(itertools.compress(vers, starts))
        last = self.last.get(kind, _NOTHING)
        # An aggregate not seen before gets its own first version minus one: always fine.
        before = list(map(last.get, distinct, map(operator.sub, firsts, itertools.repeat(1))))
        steps = list(map(operator.sub, firsts, before))
        if min(steps) < 1 if check is VersionCheck.MONOTONIC else steps.count(1) != len(steps):
            return None
        ends = starts[1:]  # each aggregate's last event: the one before the next aggregate's first
        ends.append(True)
        return home, dict(zip(distinct, itertools.compress(vers, ends), strict=True))

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


def _counts(values: list[int], single: bool) -> dict[int, int]:
    """How many times each value occurs (``single``: all values are the first one)."""
    if single:
        return {values[0]: len(values)}
    return {v: values.count(v) for v in set(values)}


def _aggregate_text(atype: bytes, aggregate: bytes) -> str:
    return f"{_text(atype)}/{_text(aggregate)}"


class _Batch(NamedTuple):
    """Where a fast batch's records are: its ids in order, its partition(s) and offset(s).

    ``partition`` is an int when the whole batch is in one partition, and ``offset`` the first
    offset when that partition's offsets are contiguous; arrays otherwise. Bytes, tuples of bytes
    and arrays hold no container, so a million ids add nothing to the collector's full passes.
    """

    ids: tuple[bytes, ...]
    partition: int | array.array[int]
    offset: int | array.array[int]

    @classmethod
    def of(cls, kind: Any, msgs: Sequence[Any], ids: Sequence[bytes], partitions: list[int], single: bool) -> _Batch:
        """The locations of a batch of ``kind`` messages (``single``: all in ``partitions[0]``)."""
        first = kind.offset(msgs[0])
        if single and kind.offset(msgs[-1]) - first == len(msgs) - 1:  # offsets rise within a partition
            return cls(tuple(ids), partitions[0], first)
        offsets = array.array("q", map(kind.offset, msgs))
        return cls(tuple(ids), partitions[0] if single else array.array("l", partitions), offsets)

    def where(self, event_id: bytes) -> tuple[int, int]:
        """(partition, offset) of ``event_id`` in this batch."""
        i = self.ids.index(event_id)
        partition = self.partition if isinstance(self.partition, int) else self.partition[i]
        offset = self.offset + i if isinstance(self.offset, int) else self.offset[i]
        return partition, offset


_gc_lock = threading.Lock()
_gc_readers = 0
_gc_saved: tuple[int, int, int] = (700, 10, 10)
#: Young-generation threshold while reading (CPython's default is 700).
_READ_THRESHOLD = 100_000


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector's young collections less often while records are read.

    confluent-kafka builds a list and a tuple per header of every record read: containers the
    collector tracks, so with the default threshold it runs every hundred-odd records and rescans
    the batch in flight, a cost larger than the audit's own checks. A read makes no reference
    cycles (records and headers are freed by reference counting), so the young threshold is
    raised for the read and the previous thresholds restored when the last concurrent read ends;
    collections still run, only less often.
    """
    global _gc_readers, _gc_saved
    with _gc_lock:
        if _gc_readers == 0:
            _gc_saved = gc.get_threshold()
            if _gc_saved[0]:  # 0: the program turned automatic collection off; leave it so
                gc.set_threshold(max(_gc_saved[0], _READ_THRESHOLD), *_gc_saved[1:])
        _gc_readers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_readers -= 1
            if _gc_readers == 0:
                gc.set_threshold(*_gc_saved)


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
    with reader, _fewer_collections():
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
