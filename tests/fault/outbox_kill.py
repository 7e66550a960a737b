"""Fault run: outbox relays SIGKILLed, paused and cut off from PostgreSQL while writers commit events.

Concurrent writer processes commit events over many aggregates (some transactions rolled back,
some long-running) while relay replicas (``python -m kcons.cli outbox relay``) are SIGKILLed at
random, the leader is SIGSTOPped past its lease TTL and resumed, and the relays' database
connections are cut with ``pg_terminate_backend``. Afterwards kcons.audit's topic check reads the
topic (read_committed, assign) and the run checks: every committed event reached Kafka at least once (``lost``), no
rolled-back event did, each aggregate's events appear in version order (``out_of_order``,
judged on first occurrences), and an idempotent consumer (dedup by ``kcons-id``) handles each
event exactly once (``duplicates``). Prints one JSON object last; exit status 0 only when ok.

With ``--sink rocketmq`` the relays publish to a local RocketMQ node (FIFO topic, one message group
per aggregate; ``tests/fault/_rocketmq_outbox.py``) whose broker the run also SIGKILLs and
restarts on its data (``--broker-restarts``); the same checks read the topic as new consumer groups,
raw and through kcons' RocketMqIdempotentConsumer.

With ``--sink rabbitmq`` the relays publish to a local RabbitMQ node (consistent-hash exchange,
quorum queues; ``tests/fault/_rabbitmq_outbox.py``) that the run also SIGKILLs and restarts and
whose client connections it closes server-side; the queues are drained through kcons'
AmqpIdempotentConsumer, order is judged per queue, and a relay that exits on its own (instead of
reconnecting) fails the run.

    python tests/fault/outbox_kill.py            # full: 20,000 events, 200 aggregates, >= 10 kills
    python tests/fault/outbox_kill.py --quick    # ~1 minute
    python tests/fault/outbox_kill.py --quick --sink rocketmq
    python tests/fault/outbox_kill.py --quick --sink rabbitmq
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kcons.audit import TopicAuditor, TopicReport, VersionCheck, audit_topic
from kcons.envelope import read_envelope
from kcons.outbox import install_schema
from kcons.testing import child_env, start_stack

log = logging.getLogger("outbox_kill")
HERE = Path(__file__).resolve().parent


class RelaySlot:
    """One relay replica slot: a CLI relay process, restarted after each kill."""

    def __init__(self, index: int, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.index = index
        self.args = args
        self.env = env
        self.logdir = logdir
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashes = 0
        self.started_at = 0.0

    @property
    def holder(self) -> str:
        return f"relay-{self.index}-{self.generation}"

    def start(self) -> None:
        self.generation += 1
        env = dict(self.env, KCONS_OUTBOX_HOLDER=self.holder)
        out = open(self.logdir / f"{self.holder}.log", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kcons.cli", "outbox", "relay", *self.args], env=env, stdout=out, stderr=out
        )
        out.close()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        # A relay started a moment ago may still be importing, before its SIGTERM handler exists.
        time.sleep(max(0.0, self.started_at + 5.0 - time.monotonic()))
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            return None


def _leader_holder(dsn: str) -> str | None:
    """The holder of the advisory lock right now (from the session that holds it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() LIMIT 1"
        ).fetchone()
    if not row:
        return None
    return str(row[0]).rsplit(":", 1)[-1]


def _cut_relay_connections(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE 'kcons-outbox:%' AND datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def _unpublished(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM kcons_outbox").fetchone()
    return int(row[0]) if row else -1


def _create_database(server_dsn: str) -> str:
    name = f"kcons_fault_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(server_dsn)
    params["dbname"] = name
    return make_conninfo("", **params)


def _drop_database(server_dsn: str, dsn: str) -> None:
    name = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(60)


def _audit_topic(bootstrap: str, topic: str, expected: set[str], timeout: float) -> tuple[TopicReport, set[str]]:
    """kcons.audit's topic check of everything on ``topic`` (read_committed), and the ids it holds.

    Reads again (each time up to the high watermark) until every id of ``expected`` is there or
    ``timeout`` passed: the last relay may still be flushing when the run ends.
    """
    deadline = time.monotonic() + timeout
    while True:
        auditor = TopicAuditor(topic, versions=VersionCheck.MONOTONIC)
        report = audit_topic({"bootstrap.servers": bootstrap}, topic, isolation="read_committed", auditor=auditor)
        seen = {event_id.decode() for event_id in auditor.seen}
        if expected <= seen or time.monotonic() > deadline:
            return report, seen
        time.sleep(1.0)


Handled = tuple[dict[str, int], dict[str, list[int]]]


def _idempotent_pass(bootstrap: str, topic: str, want: int, timeout: float) -> Handled:
    """Read ``topic`` through kcons' IdempotentConsumer: handler calls per id, versions per aggregate."""
    from kcons.adapters.memory import MemoryDedupStore
    from kcons.consumer import IdempotentConsumer

    handled: dict[str, int] = {}
    order: dict[str, list[int]] = {}

    def handler(msg: Any) -> None:
        env = read_envelope(msg.key(), msg.value(), msg.headers())
        assert env is not None and env.version is not None
        handled[env.id] = handled.get(env.id, 0) + 1
        order.setdefault(env.aggregate_id, []).append(env.version)

    config = {
        "bootstrap.servers": bootstrap,
        "group.id": f"idempotent-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
    }
    consumer = IdempotentConsumer(config, [topic], handler, store=MemoryDedupStore(), batch_size=2000)
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            before = consumer.stats.consumed
            consumer.poll_once()
            if consumer.stats.consumed != before:
                quiet_since = time.monotonic()
            elif len(handled) >= want and time.monotonic() - quiet_since > 2.0:
                break
    finally:
        consumer.close()
    return handled, order


def run(args: argparse.Namespace) -> dict[str, Any]:
    rnd = random.Random(args.seed)
    logdir = Path(args.logdir or f"/tmp/kcons-outbox-kill-{uuid.uuid4().hex[:6]}")
    logdir.mkdir(parents=True, exist_ok=True)
    with start_stack(kafka=args.sink == "kafka", redis=False) as stack:
        dsn = _create_database(stack.postgres_dsn)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                install_schema(conn)
                conn.execute("CREATE TABLE accounts (id text PRIMARY KEY, version bigint NOT NULL)")
                conn.execute(
                    "INSERT INTO accounts SELECT format('agg-%%s', lpad(i::text, 4, '0')), 0 "
                    "FROM generate_series(0, %s - 1) i",
                    (args.aggregates,),
                )
            env = child_env(stack, {"PYTHONUNBUFFERED": "1"})
            relay_args = [
                "--dsn", dsn, "--lease-ttl", str(args.lease_ttl), "--batch-size", str(args.batch_size),
                "--poll-interval", "0.5",
            ]  # fmt: skip
            if args.sink in ("rocketmq", "rabbitmq"):
                sys.path.insert(0, str(HERE))
                if args.sink == "rocketmq":
                    from _rocketmq_outbox import RocketTarget

                    target: Any = RocketTarget(args)
                else:
                    from _rabbitmq_outbox import RabbitTarget

                    target = RabbitTarget(args)
                relay_args += target.relay_args()
                env.update(target.env())
            else:
                target = None
                topic = f"outbox-kill-{uuid.uuid4().hex[:8]}"
                _create_topic(stack.kafka_bootstrap, topic, args.partitions)
                relay_args += ["--bootstrap", stack.kafka_bootstrap, "--topic", topic]
            slots = [RelaySlot(i, relay_args, env, logdir) for i in range(args.relays)]
            for slot in slots:
                slot.start()
            per_writer = -(-args.events // args.writers)
            writers = []
            for i in range(args.writers):
                argv = [
                    sys.executable, str(HERE / "_outbox_writer.py"), "--dsn", dsn, "--seed", str(args.seed * 100 + i),
                    "--events", str(per_writer), "--aggregates", str(args.aggregates), "--duration", str(args.duration),
                    "--out", str(logdir / f"writer-{i}.json"),
                ]  # fmt: skip
                with open(logdir / f"writer-{i}.log", "wb") as err:
                    writers.append(subprocess.Popen(argv, env=env, stdout=err, stderr=err))
            kills = cuts = pauses = rounds = 0
            started = time.monotonic()
            while (
                any(w.poll() is None for w in writers) or kills < args.kills or pauses < args.pauses
                or (target is not None and target.pending_faults())
            ):  # fmt: skip
                time.sleep(rnd.uniform(args.fault_interval * 0.5, args.fault_interval * 1.5))
                if time.monotonic() - started > args.max_seconds:
                    log.warning("fault phase hit --max-seconds; stopping faults")
                    break
                if target is not None and (what := target.fault(rnd)) is not None:
                    log.info("%s", what)
                    continue
                for slot in slots:  # a relay that exited on its own is a crash: restart it
                    if not slot.alive():
                        slot.crashes += 1
                        code = slot.proc.returncode if slot.proc else None
                        log.warning("relay %s exited on its own (status %s)", slot.holder, code)
                        slot.start()
                choice = rnd.random()
                rounds += 1
                if pauses < args.pauses and (choice < 0.15 or rounds % 5 == 2):
                    holder = _leader_holder(dsn)
                    victim = next((s for s in slots if s.holder == holder and s.alive()), None)
                    if victim is not None and victim.proc is not None:
                        victim.proc.send_signal(signal.SIGSTOP)
                        time.sleep(args.lease_ttl * 2)  # the server ends its sessions; another replica leads
                        victim.proc.send_signal(signal.SIGCONT)
                        pauses += 1
                        log.info("paused and resumed leader %s", holder)
                        continue
                    log.info("no live leader to pause right now")
                if choice < 0.35:
                    cuts += 1
                    log.info("cut %d relay connections", _cut_relay_connections(dsn))
                    continue
                holder = _leader_holder(dsn)
                leader = next((s for s in slots if s.holder == holder), None)
                victim = leader if leader is not None and rnd.random() < 0.7 else rnd.choice(slots)
                if victim.alive():
                    victim.kill()
                    kills += 1
                    log.info("SIGKILLed %s (leader %s)", victim.holder, holder)
                    victim.start()
            results = []
            for i, w in enumerate(writers):
                if w.wait(timeout=300) != 0:
                    raise RuntimeError(f"writer failed with {w.returncode}; see {logdir}")
                results.append(json.loads((logdir / f"writer-{i}.json").read_text()))
            for slot in slots:
                if not slot.alive():
                    slot.crashes += 1
                    slot.start()
            drain_deadline = time.monotonic() + args.drain_timeout
            while _unpublished(dsn) > 0 and time.monotonic() < drain_deadline:
                time.sleep(0.5)
            backlog = _unpublished(dsn)
            exit_codes = [slot.stop() for slot in slots]
            committed = {i for r in results for i in r["committed"]}
            rolled_back = {i for r in results for i in r["rolled_back"]}
            unknown = {i for r in results for i in r["unknown"]}
            if target is not None:
                found = target.check(committed, args.drain_timeout)
                delivered, handled, order = found["ids"], found["handled"], found["order"]
                raw_out_of_order, malformed, sink_fields = found["regressions"], found["malformed"], found["fields"]
            else:
                audit, delivered = _audit_topic(stack.kafka_bootstrap, topic, committed, timeout=args.drain_timeout)
                handled, order = _idempotent_pass(stack.kafka_bootstrap, topic, len(committed), args.drain_timeout)
                # First copies of each aggregate's events must rise (kcons.audit: regressions), stay in one
                # partition, and every record must carry the kcons headers and a version.
                raw_out_of_order = audit.regressions
                malformed = (
                    audit.without_kcons_headers + audit.without_version + audit.split_aggregates + (not audit.complete)
                )
                sink_fields = {
                    "kafka_records": audit.records,
                    "kafka_duplicates": audit.duplicates,
                    "split_aggregates": audit.split_aggregates,
                    "records_without_kcons_headers_or_version": audit.without_kcons_headers + audit.without_version,
                }
        finally:
            if target is not None:
                target.close()
            _drop_database(stack.postgres_dsn, dsn)
    lost = len(committed - delivered)
    phantom = len(delivered & rolled_back)
    unexpected = len(delivered - committed - rolled_back - unknown)
    out_of_order = sum(1 for versions in order.values() for a, b in itertools.pairwise(versions) if b <= a)
    gaps = sum(1 for versions in order.values() if versions != list(range(1, len(versions) + 1)))
    duplicates = sum(1 for n in handled.values() if n > 1)
    not_handled = len(committed - set(handled))
    ok = (
        lost == 0
        and phantom == 0
        and unexpected == 0
        and out_of_order == 0
        and raw_out_of_order == 0
        and malformed == 0
        and gaps == 0
        and not_handled == 0
        and duplicates == 0
        and backlog == 0
        and kills >= args.kills
        and pauses >= args.pauses
        and len(committed) >= args.events
        # RabbitMQ: a broker restart or a cut connection must not make a relay exit (it reconnects).
        and (args.sink != "rabbitmq" or sum(s.crashes for s in slots) == 0)
        and (target is None or not target.pending_faults())
    )
    return {
        "name": "outbox_kill",
        "sink": args.sink,
        "runs": 1,
        "faults": kills + cuts + pauses + int(sink_fields.get("broker_restarts", 0))
        + int(sink_fields.get("broker_connection_cuts", 0)),
        "kills": kills,
        "connection_cuts": cuts,
        "pauses": pauses,
        "relay_crashes": sum(s.crashes for s in slots),
        "relay_exit_codes": exit_codes,
        "sent": len(committed),
        "aggregates": args.aggregates,
        "rolled_back": len(rolled_back),
        "unknown_outcome": len(unknown),
        "long_running": sum(int(r["long"]) for r in results),
        "lost": lost,
        "rolled_back_published": phantom,
        "unexpected": unexpected,
        **sink_fields,
        "malformed": malformed,
        "duplicates": duplicates,
        "not_handled": not_handled,
        "out_of_order": out_of_order,
        "out_of_order_first_copies": raw_out_of_order,
        "version_gaps": gaps,
        "backlog_after": backlog,
        "seconds": round(time.monotonic() - started, 1),
        "logs": str(logdir),
        "ok": ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (~1 minute) for CI")
    ap.add_argument("--events", type=int)
    ap.add_argument("--aggregates", type=int)
    ap.add_argument("--kills", type=int)
    ap.add_argument("--pauses", type=int)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--relays", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--duration", type=float, help="seconds over which writers spread their events")
    ap.add_argument("--fault-interval", type=float, default=2.0)
    ap.add_argument("--lease-ttl", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--drain-timeout", type=float, default=180.0)
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--logdir")
    ap.add_argument("--sink", choices=("kafka", "rocketmq", "rabbitmq"), default="kafka",
                    help="where the relays publish")  # fmt: skip
    ap.add_argument("--broker-restarts", type=int, default=None,
                    help="broker SIGKILLs + restarts at least (not kafka; default 1 quick, 3 full)")  # fmt: skip
    args = ap.parse_args()
    if args.broker_restarts is None:
        args.broker_restarts = 1 if args.quick else 3
    quick = {"events": 2000, "aggregates": 40, "kills": 3, "pauses": 1, "duration": 10.0, "writers": 3}
    full = {"events": 20000, "aggregates": 200, "kills": 12, "pauses": 2, "duration": 45.0}
    for key, value in (quick if args.quick else full).items():
        if key == "writers":
            args.writers = value if args.writers == 4 else args.writers
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.fault_interval = min(args.fault_interval, 1.5)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = run(args)
    result["seed"] = args.seed
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
