"""Topics of one benchmark run: each made fresh, all deleted when the run ends.

A bench writes up to several GB per run; on a broker that outlives it (``kcons dev up``) the
topics would stay and fill the disk. ``BenchTopics`` makes them and deletes them on exit, even
when the run fails.
"""

from __future__ import annotations

import logging
import time
import uuid
from types import TracebackType

from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger("bench.topics")


class BenchTopics:
    """Make fresh topics on ``bootstrap`` and delete every one of them on exit."""

    def __init__(self, bootstrap: str) -> None:
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.made: list[str] = []

    def new(self, prefix: str, partitions: int, *, replication_factor: int = 1, settle_s: float = 0.0) -> str:
        """Create ``<prefix>-<random>`` and wait for it; ``settle_s`` more for its leaders to be known."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        topic = NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)
        self.admin.create_topics([topic])[name].result(timeout=60)
        self.made.append(name)
        if settle_s:
            time.sleep(settle_s)
        return name

    def adopt(self, *names: str) -> None:
        """Delete these topics too on exit (topics the run's clients made, e.g. auto-created outputs)."""
        self.made.extend(names)

    def drop(self) -> None:
        """Delete every topic made so far (a topic left behind is logged: it only costs disk)."""
        made, self.made = self.made, []
        for topic, future in self.admin.delete_topics(made).items() if made else ():
            try:
                future.result(timeout=60)
            except Exception as exc:
                log.warning("could not delete %s: %s", topic, exc)

    def __enter__(self) -> BenchTopics:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.drop()
