"""Partition holds: rewind a partition to a message and pause it until a due time (back-pressure, never skipping).

:class:`PauseSchedule` seeks a held partition back to the first message not decided, pauses it
for a number of seconds, and resumes the partitions that are due before each batch. A new
assignment starts unpaused; revoked or lost partitions are forgotten. The clock is injectable.
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
        if not due:
            return
        for tp in due:
            del self._due[tp]
        try:
            self._consumer.resume([TopicPartition(t, p) for t, p in due])
        except KafkaException as exc:
            log.warning("resuming %d partitions failed: %s", len(due), exc)
        self._paused_gauge.set(len(self._due))

    def forget(self, partitions: Collection[TP]) -> None:
        """Drop the pauses of ``partitions`` (newly assigned, revoked or lost)."""
        for tp in partitions:
            self._due.pop(tp, None)
        self._paused_gauge.set(len(self._due))
