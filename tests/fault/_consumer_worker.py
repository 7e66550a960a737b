"""A consumer process for the fault run and the crash tests (started as a subprocess, killed with SIGKILL).

It runs an idempotent consumer in group ``--group`` on ``--topic``. With ``--store postgres`` it
is the transactional variant: each event's effect is a row in ``kcons_fault_effects`` inserted
in the same transaction as the dedup record. ``--kill-on-id ID`` makes the handler SIGKILL its
own process when it sees that event id (after the claim is taken: a crash inside the handler).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS kcons_fault_effects (
    event_id   text        NOT NULL,   -- no unique constraint: a duplicate effect would show as a second row
    worker     text        NOT NULL,
    topic      text        NOT NULL,
    part       int         NOT NULL,
    kafka_offset bigint    NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class CrashAtCommit:
    """A real confluent-kafka consumer whose offset commit kills the process instead (fault injection)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--instance", default=None, help="group.instance.id (static membership)")
    parser.add_argument("--store", choices=("postgres", "redis"), default="postgres")
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--kill-on-id", default=None)
    parser.add_argument(
        "--crash-at-commit", action="store_true",
        help="SIGKILL this process when it first commits offsets: after the effects, before the commit",
    )  # fmt: skip
    parser.add_argument(
        "--effect-outside-transaction", action="store_true",
        help="negative control: commit each effect on its own connection, outside the dedup transaction"
        " (--store redis: a dedup namespace of this process only, so other workers' records are not seen)",
    )  # fmt: skip
    args = parser.parse_args()
    # INFO: the consumer's assignments and revocations go to the run's worker logs (a few lines per
    # rebalance), so a failed run shows which worker held a stuck partition and when.
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {args.instance or os.getpid()} %(message)s")
    logging.getLogger("kcons.metrics").setLevel(logging.WARNING)

    from kcons.consumer import IdempotentConsumer, TransactionalIdempotentConsumer

    config: dict[str, Any] = {
        "bootstrap.servers": os.environ["KCONS_KAFKA_BOOTSTRAP"],
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
    }
    if args.instance:
        config["group.instance.id"] = args.instance
    worker = args.instance or str(os.getpid())

    def maybe_die(msg: Any) -> None:
        if args.kill_on_id is not None:
            for name, value in msg.headers() or []:
                if name == "kcons-id" and value == args.kill_on_id.encode():
                    os.kill(os.getpid(), signal.SIGKILL)

    from confluent_kafka import Consumer

    def kafka_consumer(cfg: dict[str, Any]) -> Any:
        real = Consumer(cfg)
        return CrashAtCommit(real) if args.crash_at_commit else real

    consumer: IdempotentConsumer
    if args.store == "postgres":
        import psycopg

        from kcons.adapters.postgres import PostgresDedupStore

        dsn = os.environ["KCONS_POSTGRES_DSN"]
        pg_store = PostgresDedupStore(dsn, namespace=args.group)

        outside = psycopg.connect(dsn, autocommit=True) if args.effect_outside_transaction else None

        def apply_effect(msg: Any, conn: Any) -> None:
            maybe_die(msg)
            (outside or conn).execute(
                "INSERT INTO kcons_fault_effects (event_id, worker, topic, part, kafka_offset) VALUES (%s,%s,%s,%s,%s)",
                (dict(msg.headers())["kcons-id"].decode(), worker, msg.topic(), msg.partition(), msg.offset()),
            )

        consumer = TransactionalIdempotentConsumer(
            config, [args.topic], apply_effect, store=pg_store,
            connect=lambda: psycopg.connect(dsn, autocommit=True),
            lease_s=args.lease, batch_size=args.batch_size, pause_s=0.5, consumer_factory=kafka_consumer,
        )  # fmt: skip
    else:
        import redis

        from kcons.adapters.redis import RedisDedupStore

        client = redis.Redis.from_url(os.environ["KCONS_REDIS_URL"])
        namespace = f"{args.group}-{os.getpid()}" if args.effect_outside_transaction else args.group
        r_store = RedisDedupStore(client, namespace=namespace)

        def record(msg: Any) -> None:
            maybe_die(msg)
            # "<id>|<pid>": the checker tells a kill-explained duplicate (earlier effect by a killed pid) from others
            entry = dict(msg.headers())["kcons-id"] + f"|{os.getpid()}".encode()
            client.rpush(f"kcons-test-effects:{args.group}", entry)

        consumer = IdempotentConsumer(
            config, [args.topic], record, store=r_store, lease_s=args.lease, batch_size=args.batch_size,
            pause_s=0.5, consumer_factory=kafka_consumer,
        )  # fmt: skip
    from kcons.cli.signals import stop_on_signals

    try:
        with stop_on_signals(consumer):  # the library installs no signal handler: SIGTERM stops run() here
            consumer.run()
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
