"""``bench/outbox.py --sink rabbitmq``: the kcons relay against a naive polling loop on the same RabbitMQ node.

baseline: ``SELECT ... ORDER BY position LIMIT 500 FOR UPDATE SKIP LOCKED``, publish each row with
          pika's blocking channel in confirm mode (each ``basic_publish`` waits for its confirm;
          persistent, ``mandatory``, aggregate id as routing key), ``DELETE`` the rows, commit;
          sleep when the table is empty.
kcons:    :class:`kcons.outbox.OutboxRelay` with the RabbitMQ sink (``--sink rabbitmq``): a batch
          published in order on one channel, its confirms awaited together, rows marked after.

Each publishes the same messages to its own consistent-hash exchange with ``--partitions`` quorum
queues on one local RabbitMQ node, and is measured with bench/outbox.py's saturation and steady
(commit -> confirm) runs.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pika
from _outbox_pair import NaiveLoop, RelayRunner, measure_pair

from kcons.outbox import OutboxRow, RelaySettings, to_record
from kcons.outbox.sinks.rabbitmq import declare_hash_queues


class AmqpPollingLoop(NaiveLoop):
    """The naive relay on RabbitMQ: lock a batch with SKIP LOCKED, publish each row and wait for its confirm, delete."""

    def __init__(self, dsn: str, url: str, exchange: str, batch: int = 500, idle_sleep_s: float = 0.05) -> None:
        super().__init__(dsn, batch, idle_sleep_s)
        self.exchange = exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def publish_rows(self, rows: Sequence[OutboxRow]) -> None:
        for row in rows:  # each basic_publish returns after the broker's confirm
            rec = to_record(row, None)
            headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in rec.headers}
            props = pika.BasicProperties(delivery_mode=2, message_id=row.id, headers=headers)
            self.channel.basic_publish(self.exchange, row.aggregateid, rec.value, props, mandatory=True)

    def idle(self) -> None:
        self.connection.sleep(self.idle_sleep_s)  # keeps the connection's heartbeats going

    def close(self) -> None:
        self.connection.close()


def measure(
    args: argparse.Namespace, server_dsn: str, url: str, helpers: dict[str, Callable[..., Any]]
) -> dict[str, Any]:
    """Both relays side by side on one RabbitMQ node (own database, exchange and quorum queues each)."""
    exchanges = {kind: f"bench-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("baseline", "kcons")}
    for exchange in exchanges.values():
        declare_hash_queues(url, exchange, [f"{exchange}-{i}" for i in range(args.partitions)])

    def runners_for(dbs: dict[str, str]) -> dict[str, Any]:
        settings = RelaySettings(
            dsn=dbs["kcons"], kafka=None, sink="rabbitmq", amqp_url=url, amqp_exchange=exchanges["kcons"],
            batch_size=args.batch, poll_interval_s=1.0, holder=f"bench-{uuid.uuid4().hex[:6]}",
        )  # fmt: skip
        baseline = AmqpPollingLoop(dbs["baseline"], url, exchanges["baseline"])
        return {"baseline": baseline, "kcons": RelayRunner(settings)}

    try:
        return measure_pair(args, server_dsn, runners_for, lambda r: bool(r["kcons"].relay.is_leader), helpers)
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        for exchange in exchanges.values():
            for i in range(args.partitions):
                channel.queue_delete(f"{exchange}-{i}")
            channel.exchange_delete(exchange)
        connection.close()
