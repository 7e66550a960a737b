"""Partition holds: rewind a partition to a message and pause it until a due time (back-pressure, never skipping).

:class:`PauseSchedule` seeks a held partition back to the first message not decided, pauses it
for a number of seconds, and resumes the partitions that are due before each batch.

librdkafka keeps a partition's pause across a rebalance: a partition paused here, revoked, and
later assigned back to the same consumer would come back paused, with nothing left to resume
it, and its messages would never be read again. So a held partition is resumed when it is
revoked or lost (:meth:`release`), and every newly assigned partition is resumed as well
(:meth:`start`), in case the first did not reach librdkafka. The clock is injectable.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from kcons.metrics import CONSUMER_PAUSED_PARTITIONS

__all__ = ["PauseSchedule"]

log = logging.getLogger(__name__)

TP = tuple[str, int]


class PauseSchedule:
    """Rewinds and pauses partitions of one consumer, and resumes them when due."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, group: str = "") -> None:
        self._clock = clock
        self._paused_gauge = CONSUMER_PAUSED_PARTITIONS.labels(group=group)  # the consumer group's child
        self._consumer: Any = None
        self._due: dict[TP, float] = {}  # partition -> clock time to resume

    def attach(self, consumer: Any) -> None:
        """The Kafka consumer whose partitions this schedule pauses."""
        self._consumer = consumer

    def __len__(self) -> int:
        return len(self._due)

    @property
    def paused(self) -> list[TP]:
        """Partitions paused right now, sorted."""
        return sorted(self._due)

    def hold(self, tp: TP, offset: int, pause_s: float) -> None:
        """Rewind ``tp`` to ``offset`` and pause it for ``pause_s`` seconds (0: rewind only)."""
        try:
            self._consumer.seek(TopicPartition(tp[0], tp[1], offset))
            if pause_s > 0:
                self._consumer.pause([TopicPartition(tp[0], tp[1])])
                self._due[tp] = self._clock() + pause_s
        except KafkaException as exc:
            # The partition was revoked meanwhile: its new owner starts from the committed offset.
            log.warning("rewinding %s[%d] to %d failed: %s", tp[0], tp[1], offset, exc,
                        extra={"topic": tp[0], "partition": tp[1]})
        self._paused_gauge.set(len(self._due))

    def rewind(self, tp: TP, offset: int) -> None:
        """Seek ``tp`` back to ``offset``, best effort (an interrupted batch)."""
        with contextlib.suppress(Exception):
            self._consumer.seek(TopicPartition(tp[0], tp[1], offset))

    def resume_due(self) -> None:
        """Resume the partitions whose pause is over."""
        if not self._due:
            return
        now = self._clock()
        due = [tp for tp, at in self._due.items() if at <= now]
        self._resume(due, "due")

    def release(self, partitions: Collection[TP]) -> None:
        """Resume and forget the held ones of ``partitions`` (revoked or lost), so none comes back paused."""
        self._resume([tp for tp in partitions if tp in self._due], "revoked")

    def start(self, partitions: Collection[TP]) -> None:
        """A new assignment of ``partitions``: each starts unpaused, whatever librdkafka kept from before."""
        self._resume(list(partitions), "assigned")

    def _resume(self, partitions: list[TP], what: str) -> None:
        """Forget the pauses of ``partitions`` and resume them in the consumer (best effort)."""
        for tp in partitions:
            self._due.pop(tp, None)
        self._paused_gauge.set(len(self._due))
        if not partitions or self._consumer is None:
            return
        try:
            self._consumer.resume([TopicPartition(t, p) for t, p in partitions])
        except KafkaException as exc:
            log.warning("resuming %d %s partitions failed: %s", len(partitions), what, exc)
