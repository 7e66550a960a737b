"""Read a fixed range of a topic with ``assign``: no consumer group is joined, moved or committed to.

:class:`RangeReader` is the read-only client the auditor uses. It takes the range's ends when it
starts (per partition: a start offset, time or the beginning; an end offset, time or the high
watermark, which a ``read_committed`` reader gets as the last stable offset), assigns exactly those
partitions, and hands back the data messages in batches until every partition reached its end.
The consumer has a random ``group.id`` (librdkafka requires one) that never joins a group,
``enable.auto.commit=false`` and ``enable.auto.offset.store=false``, and no commit is ever sent, so
no group's offsets are read or written.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from kcons.errors import ConfigError, ErrorClass, TimeoutExceededError, classify_kafka_error, kafka_error_to_exception
from kcons.kafka.client import close_bounded, shared_client_config

__all__ = ["PartitionRange", "RangeReader", "RangeSpec", "reader_config"]

log = logging.getLogger(__name__)

_EOF = KafkaError._PARTITION_EOF
#: Message.partition and .offset (the stubs allow None, which a consumed data message never has).
_PARTITION = cast(Callable[[Any], int], Message.partition)
_OFFSET = cast(Callable[[Any], int], Message.offset)
_ISOLATION = ("read_committed", "read_uncommitted")


@dataclass(frozen=True)
class RangeSpec:
    """Where to start and stop in every partition: an offset, a time (epoch ms), or neither.

    Start: ``from_offset`` else ``from_time_ms`` (the first record at or after it) else the beginning.
    End (exclusive): ``to_offset`` else ``to_time_ms`` (the first record at or after it) else the
    high watermark (the last stable offset for ``read_committed``) taken when the read starts.
    """

    from_offset: int | None = None
    from_time_ms: int | None = None
    to_offset: int | None = None
    to_time_ms: int | None = None
    partitions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("from_offset", "to_offset", "from_time_ms", "to_time_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_ms', '').replace('_', '-')}", f"must be >= 0, got {value}")


@dataclass
class PartitionRange:
    """One partition's planned range ``[start, end)`` and how far the read got."""

    partition: int
    start: int
    end: int
    low: int
    high: int
    position: int = field(default=-1)

    @property
    def done(self) -> bool:
        """True when the read reached the range's end."""
        return self.start >= self.end or self.position >= self.end


def reader_config(config: Mapping[str, Any], isolation: str = "read_committed") -> dict[str, Any]:
    """The consumer config of a :class:`RangeReader`: ``config``'s connection, security and fetch sizes.

    A random ``group.id`` (librdkafka insists on one) that is never joined (assign only) nor
    committed to, no automatic commit or offset store, end-of-partition events on.
    """
    cfg = shared_client_config(config)
    cfg.update(
        {
            "group.id": f"kcons-audit-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": isolation,
            "fetch.queue.backoff.ms": 10,
        }
    )
    for key in ("fetch.max.bytes", "max.partition.fetch.bytes", "queued.max.messages.kbytes", "fetch.wait.max.ms"):
        if key in config:
            cfg[key] = config[key]
    return cfg


def _reaching_end(msgs: list[Message], pending: dict[int, PartitionRange]) -> set[int]:
    """The partitions of ``msgs`` not pending, or whose last message in the batch is at or past their end - 1."""
    partitions = list(map(_PARTITION, msgs))
    first = partitions[0]
    if partitions.count(first) == len(partitions):  # the usual batch: one partition
        r = pending.get(first)
        return {first} if r is None or _OFFSET(msgs[-1]) >= r.end - 1 else set()
    # Each partition's last message in the batch (messages are in order per partition).
    last = dict(zip(partitions, range(len(msgs)), strict=True))
    return {p for p, i in last.items() if p not in pending or _OFFSET(msgs[i]) >= pending[p].end - 1}


class RangeReader:
    """Reads ``[start, end)`` of each partition of one topic, read-only (assign, no group, no commits)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        topic: str,
        spec: RangeSpec | None = None,
        *,
        isolation: str = "read_committed",
        batch_size: int = 10_000,
        idle_timeout_s: float = 30.0,
    ) -> None:
        if isolation not in _ISOLATION:
            raise ConfigError("--isolation", f"must be read_committed or read_uncommitted, got {isolation!r}")
        if "bootstrap.servers" not in config and "metadata.broker.list" not in config:
            raise ConfigError("bootstrap.servers", "is not set")
        self.topic = topic
        self.spec = spec or RangeSpec()
        self.isolation = isolation
        self.batch_size = batch_size
        self.idle_timeout_s = idle_timeout_s
        cfg = reader_config(config, isolation)
        self._consumer = Consumer(cfg)
        self.ranges: dict[int, PartitionRange] = {}

    def plan(self, timeout_s: float = 30.0) -> dict[int, PartitionRange]:
        """Take every partition's range now (watermarks, offsets for times); raises if the topic is unknown."""
        md = self._consumer.list_topics(self.topic, timeout=timeout_s)
        meta = md.topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ConfigError("--topic", f"topic {self.topic!r} does not exist or has no partitions")
        partitions = sorted(meta.partitions)
        if self.spec.partitions is not None:
            unknown = set(self.spec.partitions) - set(partitions)
            if unknown:
                raise ConfigError("--partition", f"topic {self.topic!r} has no partition {sorted(unknown)}")
            partitions = sorted(self.spec.partitions)
        marks = {
            p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout_s, cached=False)
            for p in partitions
        }
        starts = self._for_time(partitions, self.spec.from_time_ms, marks, timeout_s)
        ends = self._for_time(partitions, self.spec.to_time_ms, marks, timeout_s)
        for p in partitions:
            low, high = marks[p]
            start = self.spec.from_offset if self.spec.from_offset is not None else starts.get(p, low)
            end = self.spec.to_offset if self.spec.to_offset is not None else ends.get(p, high)
            start = max(start, low)
            end = min(end, high)
            self.ranges[p] = PartitionRange(p, start, max(end, start), low, high, position=start)
        return self.ranges

    def _for_time(
        self, partitions: list[int], ms: int | None, marks: dict[int, tuple[int, int]], timeout_s: float
    ) -> dict[int, int]:
        if ms is None:
            return {}
        found = self._consumer.offsets_for_times([TopicPartition(self.topic, p, ms) for p in partitions], timeout_s)
        # -1: no record at or after that time, i.e. the end of the partition.
        return {tp.partition: (tp.offset if tp.offset >= 0 else marks[tp.partition][1]) for tp in found}

    def batches(self) -> Iterator[list[Message]]:
        """The data messages of the planned ranges, in batches, each partition's in offset order.

        Raises TimeoutExceededError when no partition made progress for ``idle_timeout_s`` while
        some had not reached their end (:attr:`ranges` tells how far each got).
        """
        if not self.ranges:
            self.plan()
        pending = {p: r for p, r in self.ranges.items() if not r.done}
        if not pending:
            return
        self._consumer.assign(
            [TopicPartition(self.topic, p, r.start if r.start > 0 else OFFSET_BEGINNING) for p, r in pending.items()]
        )
        consume = self._consumer.consume
        n = self.batch_size
        last_progress = time.monotonic()
        while pending:
            msgs = consume(n, 0.5)
            if not msgs:
                if time.monotonic() - last_progress > self.idle_timeout_s:
                    raise TimeoutExceededError(
                        f"reading {self.topic}: no progress for {self.idle_timeout_s:.0f}s"
                        f" in partitions {sorted(pending)}"
                    )
                continue
            last_progress = time.monotonic()
            eofs: dict[int, int] = {}
            if any(map(Message.error, msgs)):
                msgs = self._drop_events(msgs, eofs)
            if msgs:
                over = _reaching_end(msgs, pending)
                if over:
                    msgs = self._cut(msgs, pending, over)
            for p, position in eofs.items():  # the end of the log: only control records after the last data
                r = pending.get(p)
                if r is not None and position >= r.end:
                    r.position = r.end
                    self._finish(pending, p)
            if msgs:
                yield msgs

    def _finish(self, pending: dict[int, PartitionRange], partition: int) -> None:
        del pending[partition]
        self._consumer.incremental_unassign([TopicPartition(self.topic, partition)])

    def _drop_events(self, msgs: list[Any], eofs: dict[int, int]) -> list[Any]:
        """The data messages of ``msgs``; end-of-partition positions go to ``eofs``; fatal errors raise."""
        out = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                out.append(msg)
            elif err.code() == _EOF:
                eofs[msg.partition()] = msg.offset()
            elif classify_kafka_error(err) in (ErrorClass.FATAL, ErrorClass.FENCED):
                raise kafka_error_to_exception(err, "audit read")
            else:
                log.warning("reading %s: %s (%s); continuing", self.topic, err.str(), err.name())
        return out

    def _cut(self, msgs: list[Any], pending: dict[int, PartitionRange], over: set[int]) -> list[Message]:
        """Drop messages at or past their partition's end, and finish the partitions that reached it."""
        out = []
        for msg in msgs:
            r = pending.get(msg.partition())
            if r is None:
                continue
            if msg.offset() < r.end:
                out.append(msg)
        for p in over:
            r2 = pending.get(p)
            if r2 is not None:  # a message at end - 1 or later: everything before the end was delivered
                r2.position = r2.end
                self._finish(pending, p)
        return out

    def close(self) -> None:
        """Close the consumer (bounded: never hangs on an unreachable cluster); nothing is committed."""
        close_bounded(self._consumer.close, 10.0, "audit reader")

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
