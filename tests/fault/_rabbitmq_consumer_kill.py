"""``consumer_kill.py --source rabbitmq``: AMQP consumer processes SIGKILLed while they apply effects.

A producer publishes ``messages`` events (body ``aggregate:version``, ``message_id`` = the event id,
persistent, with publisher confirms) to one quorum queue of a RabbitMQ node, and resends some (the
same id again: a producer-side duplicate). Worker processes (``_rabbitmq_consumer_worker.py``: the
same-transaction AmqpIdempotentConsumer with the PostgreSQL dedup store) compete on that queue and
insert one effect row per event in the transaction of its dedup record, acknowledging after the
commit. A killer SIGKILLs a random worker every few seconds and restarts it; the broker requeues
what the dead worker had not acknowledged. Then every id is checked: exactly one effect row
(``lost`` = ids without one, ``duplicates`` = extra rows). Competing consumers and requeues do not
keep order, so ``out_of_order`` (effects of an aggregate applied below an earlier version) is
reported, not required.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("fault.consumer_kill.rabbitmq")
HERE = Path(__file__).resolve().parent
WORKER = HERE / "_rabbitmq_consumer_worker.py"


def _produce(url: str, queue: str, plan: list[tuple[str, str, int]], duration_s: float) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.confirm_delivery()
    pace = duration_s / max(1, len(plan))
    started = time.monotonic()
    try:
        for n, (event_id, aggregate, version) in enumerate(plan):
            props = pika.BasicProperties(delivery_mode=2, message_id=event_id)
            channel.basic_publish("", queue, f"{aggregate}:{version}".encode(), props, mandatory=True)
            delay = started + (n + 1) * pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        conn.close()


def run(args: argparse.Namespace, *, messages: int, workers_n: int, kills_target: int, produce_s: float,
        kill_interval: tuple[float, float], lease: float, seed: int) -> dict[str, Any]:  # fmt: skip
    import pika

    sys.path.insert(0, str(HERE))
    from _effects_kill import drain_effects, drop_database, effects_database, kill_while_producing, plan_events, tally
    from _rocketmq_consumer_worker import EFFECTS_DDL
    from consumer_kill import Worker

    from kcons.testing import start_rabbitmq, start_stack

    rng = random.Random(seed)
    plan, versions = plan_events(rng, messages, args.resend_rate)
    sent = {event_id for event_id, _a, _v in plan}
    url, close_rabbitmq = start_rabbitmq()
    try:
        with start_stack(kafka=False, redis=False, postgres=True) as stack:
            dsn = effects_database(stack.postgres_dsn, EFFECTS_DDL)
            queue = f"fault-consumer-{uuid.uuid4().hex[:8]}"
            amqp = pika.BlockingConnection(pika.URLParameters(url))
            amqp.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
            amqp.close()
            log_dir = Path(tempfile.mkdtemp(prefix="kcons-consumer-kill-rabbitmq-"))
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            base = ["--url", url, "--queue", queue, "--dsn", dsn, "--lease", str(lease)]
            workers = [Worker(f"w{i}", [*base, "--name", f"w{i}"], env, log_dir, WORKER) for i in range(workers_n)]
            for w in workers:
                w.start()
            started = time.monotonic()
            kills, errors = kill_while_producing(
                workers, lambda: _produce(url, queue, plan, produce_s), kills_target, kill_interval, rng
            )
            rows, exit_codes = drain_effects(dsn, workers, sent, args.drain_timeout)
            drop_database(stack.postgres_dsn, dsn)
    finally:
        close_rabbitmq()
    found = tally(rows, sent)
    ok = not errors and found["lost"] == 0 and found["duplicates"] == 0 and kills >= kills_target
    return {
        "name": "consumer_kill",
        "source": "rabbitmq",
        "runs": 1,
        "faults": kills,
        "kills": kills,
        "sent": len(sent),
        "resent": len(plan) - len(sent),
        "aggregates": len(versions),
        "workers": workers_n,
        **found,
        "worker_exit_codes": exit_codes,
        "producer_error": repr(errors[0]) if errors else None,
        "seconds": round(time.monotonic() - started, 1),
        "seed": seed,
        "logs": str(log_dir),
        "ok": ok,
    }
