"""A RocketMQ consumer process for ``consumer_kill.py --source rocketmq`` (started as a subprocess, SIGKILLed).

It runs :class:`kcons.consumer.rocketmq.RocketMqIdempotentConsumer` in its same-transaction form:
each event's effect is a row in ``kcons_fault_rmq_effects`` inserted in the same PostgreSQL
transaction as its dedup record (``PostgresDedupStore.complete_in``). Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS kcons_fault_rmq_effects (
    seq        bigint      GENERATED ALWAYS AS IDENTITY,
    event_id   text        NOT NULL,   -- no unique constraint: a duplicate effect shows as a second row
    aggregate  text        NOT NULL,
    version    int         NOT NULL,
    worker     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--lease", type=float, default=5.0)
    ap.add_argument("--invisible", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    import psycopg

    from kcons.adapters.postgres import PostgresDedupStore
    from kcons.cli.signals import stop_on_signals
    from kcons.consumer.rocketmq import RocketMqDelivery, RocketMqIdempotentConsumer

    def handler(delivery: RocketMqDelivery, conn: Any) -> None:
        aggregate, version = delivery.body.decode().split(":")
        conn.execute(
            "INSERT INTO kcons_fault_rmq_effects (event_id, aggregate, version, worker) VALUES (%s, %s, %s, %s)",
            (delivery.event_id, aggregate, int(version), args.name),
        )

    store = PostgresDedupStore(args.dsn, namespace=args.group)
    consumer = RocketMqIdempotentConsumer.same_transaction(
        args.endpoints, args.topic, args.group, handler, store,
        connect=lambda: psycopg.connect(args.dsn, autocommit=True),
        lease_s=args.lease, invisible_s=args.invisible, hold_pause_s=0.5,
    )  # fmt: skip
    with stop_on_signals(consumer):
        consumer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
