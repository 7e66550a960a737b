"""A RabbitMQ consumer process for ``consumer_kill.py --source rabbitmq`` (started as a subprocess, SIGKILLed).

It runs :class:`kcons.consumer.amqp.AmqpIdempotentConsumer` in its same-transaction form on one
queue: each event's effect is a row in the effects table (``EFFECTS_DDL`` of the RocketMQ worker)
inserted in the same PostgreSQL transaction as its dedup record; deliveries are acknowledged after
the commit. Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--queue", required=True)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--lease", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    import psycopg

    from kcons.adapters.postgres import PostgresDedupStore
    from kcons.cli.signals import stop_on_signals
    from kcons.consumer.amqp import AmqpDelivery, AmqpIdempotentConsumer

    def handler(delivery: AmqpDelivery, conn: Any) -> None:
        aggregate, version = delivery.body.decode().split(":")
        conn.execute(
            "INSERT INTO kcons_fault_rmq_effects (event_id, aggregate, version, worker) VALUES (%s, %s, %s, %s)",
            (delivery.event_id, aggregate, int(version), args.name),
        )

    store = PostgresDedupStore(args.dsn, namespace=f"amqp-{args.queue}")
    consumer = AmqpIdempotentConsumer.same_transaction(
        args.url, args.queue, handler, store, connect=lambda: psycopg.connect(args.dsn, autocommit=True),
        lease_s=args.lease, batch_size=args.batch_size, hold_pause_s=0.5, idle_s=0.1,
    )  # fmt: skip
    with stop_on_signals(consumer):
        consumer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
