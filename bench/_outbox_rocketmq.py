"""``bench/outbox.py --sink rocketmq``: the kcons relay against a naive polling loop on the same RocketMQ node.

baseline: ``SELECT ... ORDER BY position LIMIT 500 FOR UPDATE SKIP LOCKED``, send each row with
          the RocketMQ producer (synchronous ``send``, key and message group = aggregate id),
          ``DELETE`` the rows, commit; sleep when the table is empty.
kcons:    :class:`kcons.outbox.OutboxRelay` with the RocketMQ sink (``--sink rocketmq``): rows
          marked only after every send of the batch was acknowledged, an aggregate's next message
          sent after the previous one's acknowledgement, different aggregates in flight together.

Both send the same messages to FIFO topics of one local RocketMQ node (its own topic each), and are
measured with bench/outbox.py's saturation and steady (commit -> acknowledgement) runs.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from _outbox_pair import NaiveLoop, RelayRunner, measure_pair

from kcons.outbox import OutboxRow, RelaySettings, to_record
from kcons.outbox.sinks.rocketmq import rocketmq_message


class RocketPollingLoop(NaiveLoop):
    """The naive relay on RocketMQ: lock a batch with SKIP LOCKED, send each row and wait for it, delete, commit."""

    def __init__(self, dsn: str, endpoints: str, topic: str, batch: int = 500, idle_sleep_s: float = 0.05) -> None:
        from rocketmq import ClientConfiguration, Credentials, Producer

        super().__init__(dsn, batch, idle_sleep_s)
        self.topic = topic
        self.producer = Producer(ClientConfiguration(endpoints, Credentials(), request_timeout=10), (topic,))
        self.producer.startup()

    def publish_rows(self, rows: Sequence[OutboxRow]) -> None:
        for row in rows:
            rec = to_record(row, self.topic)
            self.producer.send(rocketmq_message(rec.topic, rec.value, rec.key, rec.headers))

    def close(self) -> None:
        self.producer.shutdown()


class RocketRunner(RelayRunner):
    """The kcons relay with the RocketMQ sink, recording acknowledgement times."""

    def __init__(self, dsn: str, endpoints: str, topic: str, batch: int) -> None:
        super().__init__(RelaySettings(
            dsn=dsn, kafka=None, sink="rocketmq", rocketmq_endpoints=endpoints, topic=topic, batch_size=batch,
            poll_interval_s=1.0, holder=f"bench-{uuid.uuid4().hex[:6]}",
        ))  # fmt: skip


def measure(
    args: argparse.Namespace, server_dsn: str, server: Any, helpers: dict[str, Callable[..., Any]]
) -> dict[str, Any]:
    """Both relays side by side on one RocketMQ node (own database and FIFO topic each); saturation runs alternate."""
    topics = {kind: server.create_topic(f"bench-{kind}-{uuid.uuid4().hex[:8]}", "FIFO", queues=args.partitions)
              for kind in ("baseline", "kcons")}  # fmt: skip

    def runners_for(dbs: dict[str, str]) -> dict[str, Any]:
        return {
            "baseline": RocketPollingLoop(dbs["baseline"], server.endpoints, topics["baseline"]),
            "kcons": RocketRunner(dbs["kcons"], server.endpoints, topics["kcons"], args.batch),
        }

    return measure_pair(args, server_dsn, runners_for, lambda r: bool(r["kcons"].relay.is_leader), helpers)
