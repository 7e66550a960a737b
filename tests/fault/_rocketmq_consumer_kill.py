"""``consumer_kill.py --source rocketmq``: RocketMQ consumer processes SIGKILLed while they apply effects.

A producer sends ``messages`` events over ``aggregates`` aggregates to a FIFO topic of a local
RocketMQ node (each aggregate one message group, versions 1, 2, ... in order), and resends some
(same ``kcons-id``, a producer-side duplicate). Worker processes (``_rocketmq_consumer_worker.py``:
the same-transaction RocketMqIdempotentConsumer with the PostgreSQL dedup store) in one FIFO
consumer group insert one effect row per event in the transaction of its dedup record. A killer
SIGKILLs a random worker every few seconds and restarts it. Then every id is checked: exactly one
effect row (``lost`` = ids without one, ``duplicates`` = extra rows) and each aggregate's effects
in version order (``out_of_order``).
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

log = logging.getLogger("fault.consumer_kill.rocketmq")
HERE = Path(__file__).resolve().parent
WORKER = HERE / "_rocketmq_consumer_worker.py"


def _produce(endpoints: str, topic: str, plan: list[tuple[str, str, int]], duration_s: float) -> None:
    from rocketmq import ClientConfiguration, Credentials, Message, Producer

    producer = Producer(ClientConfiguration(endpoints, Credentials(), request_timeout=10), (topic,))
    producer.startup()
    pace = duration_s / max(1, len(plan))
    started = time.monotonic()
    try:
        for n, (event_id, aggregate, version) in enumerate(plan):
            msg = Message()
            msg.topic, msg.body = topic, f"{aggregate}:{version}".encode()
            msg.keys, msg.message_group = aggregate, aggregate
            msg.add_property("kcons-id", event_id)
            for attempt in range(30):  # a send can fail while the proxy is busy; the id makes a retry harmless
                try:
                    producer.send(msg)
                    break
                except Exception as exc:
                    if attempt == 29:
                        raise
                    log.warning("send failed (%s); retrying", exc)
                    time.sleep(0.5)
            delay = started + (n + 1) * pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        producer.shutdown()


def run(args: argparse.Namespace, *, messages: int, workers_n: int, kills_target: int, produce_s: float,
        kill_interval: tuple[float, float], lease: float, seed: int) -> dict[str, Any]:  # fmt: skip
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    sys.path.insert(0, str(HERE))
    from _effects_kill import drain_effects, kill_while_producing, plan_events, tally
    from _rocketmq_consumer_worker import EFFECTS_DDL
    from consumer_kill import Worker

    from kcons.testing import start_stack
    from kcons.testing.rocketmq import RocketMqServer

    rng = random.Random(seed)
    plan, versions = plan_events(rng, messages, args.resend_rate)
    sent = {event_id for event_id, _a, _v in plan}
    with start_stack(kafka=False, redis=False, postgres=True) as stack, RocketMqServer() as server:
        db = f"kcons_fault_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        params = conninfo_to_dict(stack.postgres_dsn)
        params["dbname"] = db
        dsn = make_conninfo("", **params)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(EFFECTS_DDL)
        tag = uuid.uuid4().hex[:8]
        topic = server.create_topic(f"fault-consumer-{tag}", "FIFO", queues=args.partitions)
        group = server.create_group(f"fault-{tag}", fifo=True, max_attempts=1000)
        server.create_topic(f"%DLQ%{group}", "NORMAL", queues=1)
        log_dir = Path(tempfile.mkdtemp(prefix="kcons-consumer-kill-rocketmq-"))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        base = ["--endpoints", server.endpoints, "--topic", topic, "--group", group, "--dsn", dsn,
                "--lease", str(lease)]  # fmt: skip
        workers = [Worker(f"w{i}", [*base, "--name", f"w{i}"], env, log_dir, WORKER) for i in range(workers_n)]
        for w in workers:
            w.start()
        started = time.monotonic()
        kills, errors = kill_while_producing(
            workers, lambda: _produce(server.endpoints, topic, plan, produce_s), kills_target, kill_interval, rng
        )
        rows, exit_codes = drain_effects(dsn, workers, sent, args.drain_timeout)
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    found = tally(rows, sent)
    ok = not errors and found["lost"] == 0 and found["duplicates"] == 0 and found["out_of_order"] == 0
    ok = ok and kills >= kills_target
    return {
        "name": "consumer_kill",
        "source": "rocketmq",
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
