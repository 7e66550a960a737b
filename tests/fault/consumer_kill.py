"""Fault run: consumer processes are SIGKILLed at random while they apply effects to PostgreSQL.

A producer writes ``--messages`` messages, of which at least ``--resend-rate`` are deliberate
resends of an id already sent (same ``kcons-id``; half keep the key, half go to another
partition). ``--workers`` consumer processes in one group (``tests/fault/_consumer_worker.py``,
the transactional consumer with the PostgreSQL dedup store) insert one effect row per event in
the same transaction as the dedup record. A killer SIGKILLs a random worker every few seconds
(at least ``--kills`` times) and restarts it. When everything is consumed, the workers are
stopped with SIGTERM and every id is checked: exactly one effect row each (``lost`` = ids
without one, ``duplicates`` = extra rows), and the group's committed offsets reach the end of
every partition.

    python tests/fault/consumer_kill.py            # full: 20,000 messages over 90 s, 3 workers, >= 12 kills
    python tests/fault/consumer_kill.py --quick    # ~60 s: 3,000 messages, 2 workers, 4 kills
    python tests/fault/consumer_kill.py --store redis   # IdempotentConsumer + Redis store (at-least-once effects:
                                                        # a repeat passes only after an effect by a killed worker)
    python tests/fault/consumer_kill.py --quick --source rocketmq   # RocketMQ (tests/fault/_rocketmq_consumer_kill.py)
    python tests/fault/consumer_kill.py --quick --source rabbitmq   # RabbitMQ (tests/fault/_rabbitmq_consumer_kill.py)

The last line of output is one JSON object; the exit status is 0 only when ``ok`` is true.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kcons.testing import start_stack

log = logging.getLogger("fault.consumer_kill")
WORKER = Path(__file__).resolve().parent / "_consumer_worker.py"
ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """One consumer process that can be SIGKILLed and restarted."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, script: Path = WORKER) -> None:
        self.name = name
        self.script = script
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), *self.args], env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )  # fmt: skip
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close_log()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop on SIGTERM; killing it", self.name)
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def produce(bootstrap: str, topic: str, messages: int, resend_rate: float, duration_s: float, seed: int,
            out: dict[str, Any]) -> None:  # fmt: skip
    """Write ``messages`` messages over about ``duration_s`` seconds; record ids and resends in ``out``."""
    rng = random.Random(seed)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 10})
    sent_ids: list[str] = []
    resends = 0
    partitions = out["partitions"]
    started = time.monotonic()
    for i in range(messages):
        if sent_ids and (resends < resend_rate * messages) and rng.random() < resend_rate * 1.5:
            event_id = rng.choice(sent_ids)
            key = event_id.encode() if rng.random() < 0.5 else f"other-{rng.randrange(1000)}".encode()
            resends += 1
        else:
            event_id = f"ev-{len(sent_ids):06d}-{uuid.uuid4().hex[:8]}"
            sent_ids.append(event_id)
            key = event_id.encode()
        producer.produce(topic, value=f"payload {i}".encode(), key=key, headers=[("kcons-id", event_id.encode())])
        if i % 200 == 0:
            producer.poll(0)
            behind = started + duration_s * (i / messages) - time.monotonic()
            if behind > 0:
                time.sleep(behind)
    if producer.flush(60) != 0:
        raise RuntimeError("the producer could not deliver every message")
    out.update(ids=sent_ids, resends=resends, sent=messages, partitions=partitions)


def redis_effects(redis_url: str, group: str) -> dict[str, list[int]]:
    """The pids that applied each event id's effect, in order, from the Redis effect list (``--store redis``)."""
    import redis

    by_id: dict[str, list[int]] = {}
    client = redis.Redis.from_url(redis_url)
    try:
        for raw in client.lrange(f"kcons-test-effects:{group}", 0, -1):
            event_id, _, pid = raw.decode().rpartition("|")
            by_id.setdefault(event_id, []).append(int(pid))
    finally:
        client.close()
    return by_id


def unexplained_duplicates(by_id: dict[str, list[int]], killed: set[int]) -> int:
    """Repeated effects a kill does not explain.

    With the Redis store the effect is not atomic with the done record, so a worker SIGKILLed
    after an effect and before ``complete`` lets the event run again once its claim expires
    (at-least-once, as the README's guarantee table says). Every effect but an id's last must
    therefore come from a worker that was killed afterwards; a repeat after a live worker's
    effect is a dedup failure.
    """
    return sum(1 for pids in by_id.values() for pid in pids[:-1] if pid not in killed)


def effects(dsn: str, redis_url: str | None, group: str) -> dict[str, int]:
    """Effect count per event id: rows in PostgreSQL, or entries of the Redis effect list (``--store redis``)."""
    if redis_url is not None:
        return {event_id: len(pids) for event_id, pids in redis_effects(redis_url, group).items()}
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return dict(conn.execute("SELECT event_id, count(*) FROM kcons_fault_effects GROUP BY event_id").fetchall())


def effect_counts(dsn: str, redis_url: str | None, group: str) -> tuple[int, int]:
    counts = effects(dsn, redis_url, group)
    return len(counts), sum(counts.values())


def lag(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        committed = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=20)
        total = 0
        for tp in committed:
            _low, high = probe.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=20)
            total += high - max(tp.offset, 0)
        return total
    finally:
        probe.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run that finishes in about a minute")
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--resend-rate", type=float, default=0.06)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--kills", type=int, default=None)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--produce-seconds", type=float, default=None)
    parser.add_argument("--kill-interval", type=float, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--lease", type=float, default=None)
    parser.add_argument(
        "--static-membership", action=argparse.BooleanOptionalAction, default=None,
        help="give workers a group.instance.id: a restarted worker gets its partitions back without a rebalance",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--store", choices=("postgres", "redis"), default="postgres",
        help="postgres: the transactional consumer (effect and dedup record in one transaction); redis: the "
        "IdempotentConsumer with the Redis store, effects appended to a Redis list",
    )  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=240.0)
    parser.add_argument(
        "--source", choices=("kafka", "rocketmq", "rabbitmq"), default="kafka",
        help="rocketmq: a local RocketMQ node and the same-transaction RocketMqIdempotentConsumer (PostgreSQL store); "
        "rabbitmq: a RabbitMQ quorum queue and the same-transaction AmqpIdempotentConsumer (PostgreSQL store)",
    )  # fmt: skip
    parser.add_argument(
        "--control-unsafe", action="store_true",
        help="negative control: workers commit effects outside the dedup transaction (--store redis: each worker"
        " process keeps its own dedup namespace); the run must then fail",
    )  # fmt: skip
    args = parser.parse_args()
    messages = args.messages or (3000 if args.quick else 20000)
    workers_n = args.workers or (2 if args.quick else 3)
    kills_target = args.kills if args.kills is not None else (4 if args.quick else 12)
    produce_s = args.produce_seconds or (10.0 if args.quick else 90.0)
    kill_min, kill_max = args.kill_interval or ((1.0, 2.0) if args.quick else (2.0, 5.0))
    lease = args.lease or (3.0 if args.quick else 5.0)
    static = args.static_membership if args.static_membership is not None else args.quick
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.source in ("rocketmq", "rabbitmq"):
        sys.path.insert(0, str(WORKER.parent))
        if args.source == "rocketmq":
            from _rocketmq_consumer_kill import run as run_source
        else:
            from _rabbitmq_consumer_kill import run as run_source

        result = run_source(
            args, messages=messages, workers_n=workers_n, kills_target=kills_target, produce_s=produce_s,
            kill_interval=(kill_min, kill_max), lease=lease, seed=seed,
        )  # fmt: skip
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    rng = random.Random(seed)

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with start_stack(kafka=True, redis=args.store == "redis", postgres=True) as stack:
        redis_url = stack.redis_url if args.store == "redis" else None
        bootstrap = stack.kafka_bootstrap
        db = f"kcons_fault_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        params = conninfo_to_dict(stack.postgres_dsn)
        params["dbname"] = db
        dsn = make_conninfo("", **params)
        sys.path.insert(0, str(WORKER.parent))
        from _consumer_worker import EFFECTS_DDL

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(EFFECTS_DDL)
        topic = f"fault-consumer-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, num_partitions=args.partitions, replication_factor=1)])[topic].result(60)
        group = f"fault-{uuid.uuid4().hex[:8]}"
        env = dict(os.environ, KCONS_KAFKA_BOOTSTRAP=bootstrap, KCONS_POSTGRES_DSN=dsn)
        if redis_url is not None:
            env["KCONS_REDIS_URL"] = redis_url
        log_dir = Path(tempfile.mkdtemp(prefix="kcons-consumer-kill-"))
        worker_args = ["--group", group, "--topic", topic, "--store", args.store, "--lease", str(lease)]
        worker_args += ["--batch-size", "200"]
        if args.control_unsafe:
            worker_args.append("--effect-outside-transaction")
        workers = [
            Worker(f"w{i}", [*worker_args, *(["--instance", f"w{i}"] if static else [])], env, log_dir)
            for i in range(workers_n)
        ]
        for w in workers:
            w.start()

        produced: dict[str, Any] = {"partitions": args.partitions}
        errors: list[BaseException] = []

        def run_producer() -> None:
            try:
                produce(bootstrap, topic, messages, args.resend_rate, produce_s, seed, produced)
            except BaseException as exc:
                errors.append(exc)

        producer_thread = threading.Thread(target=run_producer, name="producer")
        producer_thread.start()
        started = time.monotonic()
        kills = 0
        effects_at_kills: list[int] = []
        killed_pids: set[int] = set()
        # A kill only counts once the group made progress since the previous one, so every kill
        # lands while effects are being applied (not during a rebalance that is still settling).
        last_rows = 0
        next_kill = time.monotonic() + rng.uniform(kill_min, kill_max)
        stalled_since = time.monotonic()
        while kills < kills_target or producer_thread.is_alive():
            time.sleep(0.2)
            for w in workers:
                if not w.alive():
                    log.warning("%s exited by itself; restarting it", w.name)
                    w.start()
            now = time.monotonic()
            if now < next_kill:
                continue
            rows = effect_counts(dsn, redis_url, group)[1]
            if rows == last_rows and now - stalled_since < 60:
                continue  # wait for progress
            if now - stalled_since >= 60:
                log.error("no progress for 60s")
                break
            victim = rng.choice(workers)
            assert victim.proc is not None
            killed_pids.add(victim.proc.pid)
            victim.kill()
            kills += 1
            effects_at_kills.append(rows)
            log.info("kill %d: SIGKILLed %s (%d effects so far)", kills, victim.name, rows)
            victim.start()
            last_rows = rows
            stalled_since = now
            next_kill = now + rng.uniform(kill_min, kill_max)
        producer_thread.join()
        if errors:
            raise errors[0]
        unique = len(produced["ids"])
        log.info("produced %d messages (%d unique ids, %d resends); %d kills", messages, unique, produced["resends"],
                 kills)  # fmt: skip

        deadline = time.monotonic() + args.drain_timeout
        distinct, _rows = effect_counts(dsn, redis_url, group)
        while distinct < unique and time.monotonic() < deadline:
            time.sleep(1.0)
            for w in workers:
                if not w.alive():
                    log.warning("%s exited (%s); restarting it", w.name, w.proc.returncode if w.proc else None)
                    w.start()
            distinct, _rows = effect_counts(dsn, redis_url, group)
        time.sleep(3.0)  # late duplicates, if any, would land now
        exit_codes = [w.stop() for w in workers]
        remaining = lag(bootstrap, group, topic, args.partitions)

        counts = effects(dsn, redis_url, group)
        sent_ids = set(produced["ids"])
        lost = sum(1 for i in sent_ids if i not in counts)
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        # The SQL store commits effect and done record together: no duplicate at all. The Redis
        # store promises at-least-once effects across a crash: only kill-explained duplicates.
        unexplained = (
            duplicates if redis_url is None else unexplained_duplicates(redis_effects(redis_url, group), killed_pids)
        )
        unknown = sum(1 for i in counts if i not in sent_ids)
        ok = (
            lost == 0
            and unexplained == 0
            and unknown == 0
            and remaining == 0
            and kills >= kills_target
            and produced["resends"] >= 0.05 * messages
        )
        if not ok:
            log.error("worker logs are in %s", log_dir)
        result = {
            "name": "consumer_kill",
            "runs": 1,
            "faults": kills,
            "sent": messages,
            "unique_ids": unique,
            "resends": produced["resends"],
            "lost": lost,
            "duplicates": duplicates,
            "unexplained_duplicates": unexplained,
            "unknown_effects": unknown,
            "uncommitted_messages": remaining,
            "workers": workers_n,
            "worker_starts": sum(w.starts for w in workers),
            "worker_exit_codes": exit_codes,
            "effects_at_kills": effects_at_kills,
            "partitions": args.partitions,
            "lease_s": lease,
            "static_membership": static,
            "control_unsafe": args.control_unsafe,
            "store": args.store,
            "seed": seed,
            "seconds": round(time.monotonic() - started, 1),
            "ok": ok,
        }
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
