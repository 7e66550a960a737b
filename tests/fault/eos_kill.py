"""Fault run: exactly-once processor workers SIGKILLed at random on a 3-broker cluster that loses a broker.

Input records (value = a sequence number, key = one of ``--keys`` keys, so each key's ids
increase in the input) are produced at a steady rate while ``--workers`` processor worker
processes (``_eos_worker.py``, each with a stable ``transactional.id``) copy them to an output
topic inside Kafka transactions. At random moments a worker is SIGKILLed and restarted with the
same ``transactional.id``; a few times a worker is frozen (SIGSTOP) past its session timeout and
resumed, so it wakes up as a zombie with a transaction open on partitions that moved; once,
mid-run, a broker is hard-killed (SIGKILL) and restarted. When
all input is produced and the faults are done, the run waits until the group's committed offsets
reach the end of the input, stops the workers with SIGTERM and reads the output with a
read_committed consumer. It checks that every input id appears exactly once (``lost``,
``duplicates``), that nothing else appears (``unexpected``), and that each key's ids stay in
input order (``out_of_order``). Prints one JSON object last; exit status 0 only when ok.

    python tests/fault/eos_kill.py           # full: 20,000 records, >= 10 worker kills, 1 broker kill
    python tests/fault/eos_kill.py --quick   # under a minute: 2,000 records, 3 kills, one broker (no broker kill)
    python tests/fault/eos_kill.py --quick --brokers 3   # quick, with the 3-broker cluster and a broker kill

The full run starts its own 3-broker cluster (``kcons.testing.local.KafkaCluster``), since it
kills brokers by pid; ``--brokers 1`` uses ``KCONS_KAFKA_BOOTSTRAP`` or a fresh single broker.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from _kafka import kafka_for_run
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from kcons.testing.plugin import create_topic

log = logging.getLogger("eos_kill")
HERE = Path(__file__).resolve().parent
WORKER = HERE / "_eos_worker.py"


class WorkerSlot:
    """One worker position: a process with a stable transactional.id, restarted after each kill."""

    def __init__(self, index: int, argv: list[str], logdir: Path) -> None:
        self.index = index
        self.argv = argv
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.unexpected_exits = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.logdir / f"worker-{self.index}.log", "ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the worker keeps its sockets and its open transaction but answers nothing (a zombie)."""
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def check(self) -> None:
        """Restart a worker that exited by itself (counted; the run goes on)."""
        if self.proc is not None and not self.alive():
            self.unexpected_exits += 1
            log.warning("worker %d exited by itself with %s; restarting", self.index, self.proc.returncode)
            self.start()

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker %d ignored SIGTERM; killing it", self.index)
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def produce_input(bootstrap: str, topic: str, n: int, keys: int, duration_s: float, done: threading.Event) -> None:
    """Produce ids 0..n-1 spread evenly over ``duration_s`` (idempotent, acks=all)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    failed: list[Any] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(err)

    start = time.monotonic()
    for i in range(n):
        target = start + duration_s * i / n
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        while True:
            try:
                producer.produce(topic, str(i).encode(), f"key-{i % keys}".encode(), on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(300)
    if left or failed:
        raise RuntimeError(f"input producer lost records: {left} unflushed, {len(failed)} failed ({failed[:3]})")
    done.set()


def committed_total(checker: Consumer, topic: str, partitions: int) -> int | None:
    """Sum of the group's committed offsets on ``topic`` (None when the broker did not answer in time)."""
    try:
        tps = checker.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
    except KafkaException as exc:
        log.info("committed offsets not available yet: %s", exc)
        return None
    return sum(max(tp.offset, 0) for tp in tps)


def read_output(bootstrap: str, topic: str, partitions: int) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) of ``topic`` visible to read_committed, read up to the last stable offset."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"verify-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[tuple[bytes | None, bytes | None]] = []
    at_eof: set[int] = set()
    deadline = time.monotonic() + 300
    while len(at_eof) < partitions and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 1.0):
            err = msg.error()
            if err is None:
                out.append((msg.key(), msg.value()))
                at_eof.discard(msg.partition())
            elif err.code() == -191:  # _PARTITION_EOF
                at_eof.add(msg.partition())
    consumer.close()
    if len(at_eof) < partitions:
        raise RuntimeError("could not read the output to its end within 300 s")
    return out


def log_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm-{uuid.uuid4().hex}"})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in range(partitions))
    finally:
        consumer.close()


def verify(records: list[tuple[bytes | None, bytes | None]], n: int) -> dict[str, Any]:
    counts: collections.Counter[int] = collections.Counter()
    unexpected = 0
    out_of_order = 0
    last_per_key: dict[bytes | None, int] = {}
    for key, value in records:
        try:
            ident = int(value or b"")
        except ValueError:
            unexpected += 1
            continue
        if not 0 <= ident < n:
            unexpected += 1
            continue
        counts[ident] += 1
        if counts[ident] == 1:  # order is judged on first occurrences
            if last_per_key.get(key, -1) > ident:
                out_of_order += 1
            last_per_key[key] = max(ident, last_per_key.get(key, -1))
    lost = sum(1 for i in range(n) if counts[i] == 0)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    return {"received": len(records), "lost": lost, "duplicates": duplicates, "unexpected": unexpected,
            "out_of_order": out_of_order}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="kcons-eos-kill-"))
    logdir.mkdir(parents=True, exist_ok=True)
    log.info("logs in %s, seed %d", logdir, args.seed)
    started = time.monotonic()
    with contextlib.ExitStack() as services:
        bootstrap, cluster = kafka_for_run(services, args.brokers)
        admin = AdminClient({"bootstrap.servers": bootstrap})
        run_id = uuid.uuid4().hex[:8]
        replication = 3 if cluster is not None else 1
        topic_in = create_topic(admin, f"eos-in-{run_id}", args.partitions, replication=replication)
        topic_out = create_topic(admin, f"eos-out-{run_id}", args.partitions, replication=replication)
        group = f"eos-{run_id}"
        slots = []
        for i in range(args.workers):
            argv = [
                sys.executable, str(WORKER), "--bootstrap", bootstrap, "--input", topic_in, "--output", topic_out,
                "--group", group, "--transactional-id", f"eos-{run_id}-worker-{i}", "--batch-size",
                str(args.batch_size), "--delay-ms", str(args.delay_ms),
            ]  # fmt: skip
            slots.append(WorkerSlot(i, argv, logdir))
        for slot in slots:
            slot.start()

        produced = threading.Event()
        producer_errors: list[BaseException] = []

        def producer_main() -> None:
            try:
                produce_input(bootstrap, topic_in, args.records, args.keys, args.duration, produced)
            except BaseException as exc:
                producer_errors.append(exc)

        producer_thread = threading.Thread(target=producer_main, name="input-producer", daemon=True)
        producer_thread.start()

        worker_kills = 0
        broker_kills = 0
        worker_pauses = 0
        broker_kill_at = time.monotonic() + args.duration * 0.4
        next_kill = time.monotonic() + rng.uniform(args.kill_min_s, args.kill_max_s)
        kill_deadline = time.monotonic() + args.max_seconds
        while time.monotonic() < kill_deadline:
            for slot in slots:
                slot.check()
            faults_done = (
                worker_kills >= args.kills and broker_kills >= args.broker_kills and worker_pauses >= args.pauses
            )
            if faults_done and (produced.is_set() or producer_errors):
                break
            now = time.monotonic()
            if cluster is not None and broker_kills < args.broker_kills and now >= broker_kill_at:
                node = rng.randrange(cluster.size)
                log.info("SIGKILL broker %d", node + 1)
                cluster.kill_node(node)
                broker_kills += 1
                down_until = time.monotonic() + args.broker_down_s
                # Keep killing workers while the broker is down: the hardest moment for the transactions.
                while time.monotonic() < down_until:
                    if worker_kills < args.kills and time.monotonic() >= next_kill:
                        victim = rng.choice(slots)
                        victim.kill()
                        worker_kills += 1
                        log.info("SIGKILL worker %d (kill %d, broker down)", victim.index, worker_kills)
                        time.sleep(rng.uniform(0.0, 1.0))
                        victim.start()
                        next_kill = time.monotonic() + rng.uniform(args.kill_min_s, args.kill_max_s)
                    time.sleep(0.1)
                log.info("restarting broker %d", node + 1)
                cluster.restart_node(node)
                continue
            if worker_pauses < args.pauses and now >= next_kill and rng.random() < 0.3:
                # A zombie: frozen past the session timeout, its partitions move to the others; when it
                # wakes up with its transaction still open, the broker must fence it (KIP-447).
                victim = rng.choice(slots)
                victim.pause()
                worker_pauses += 1
                log.info("SIGSTOP worker %d for %.0fs (pause %d)", victim.index, args.pause_s, worker_pauses)
                time.sleep(args.pause_s)
                victim.resume()
                log.info("SIGCONT worker %d", victim.index)
                next_kill = time.monotonic() + rng.uniform(args.kill_min_s, args.kill_max_s)
                continue
            if worker_kills < args.kills and now >= next_kill:
                victim = rng.choice(slots)
                victim.kill()
                worker_kills += 1
                log.info("SIGKILL worker %d (kill %d)", victim.index, worker_kills)
                time.sleep(rng.uniform(0.0, 1.0))
                victim.start()
                next_kill = time.monotonic() + rng.uniform(args.kill_min_s, args.kill_max_s)
            time.sleep(0.1)

        producer_thread.join(args.max_seconds)
        if producer_errors:
            raise RuntimeError(f"the input producer failed: {producer_errors[0]}")

        # Drain: wait until the group's committed offsets cover the whole input.
        drain_deadline = time.monotonic() + args.drain_timeout
        done = 0
        reported = 0.0
        # Never subscribes, so it never joins the group: it only reads the group's committed offsets.
        checker = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "isolation.level": "read_committed"})
        while time.monotonic() < drain_deadline:
            for slot in slots:
                slot.check()
            done = committed_total(checker, topic_in, args.partitions) or done
            if done >= args.records:
                break
            if time.monotonic() - reported > 5:
                reported = time.monotonic()
                log.info("draining: %d of %d input offsets committed", done, args.records)
            time.sleep(0.5)
        checker.close()
        log.info("committed input offsets: %d of %d", done, args.records)
        exit_codes = [slot.stop() for slot in slots]
        records = read_output(bootstrap, topic_out, args.partitions)
        result = verify(records, args.records)
        # Offsets used in the output log: committed records, aborted ones (killed mid-transaction) and markers.
        result["output_log_offsets"] = log_offsets(bootstrap, topic_out, args.partitions)

    ok = (
        result["lost"] == 0
        and result["duplicates"] == 0
        and result["unexpected"] == 0
        and result["out_of_order"] == 0
        and worker_kills >= args.kills
        and broker_kills >= args.broker_kills
        and worker_pauses >= args.pauses
    )
    return {
        "name": "eos_kill",
        "runs": 1,
        "faults": worker_kills + broker_kills + worker_pauses,
        "worker_kills": worker_kills,
        "worker_pauses": worker_pauses,
        "brokers": args.brokers,
        "broker_kills": broker_kills,
        "worker_starts": sum(s.starts for s in slots),
        "worker_unexpected_exits": sum(s.unexpected_exits for s in slots),
        "worker_exit_codes": exit_codes,
        "sent": args.records,
        **result,
        "committed_input_offsets": done,
        "workers": args.workers,
        "partitions": args.partitions,
        "seed": args.seed,
        "seconds": round(time.monotonic() - started, 1),
        "logdir": str(logdir),
        "ok": ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (about a minute) for CI")
    ap.add_argument("--records", type=int)
    ap.add_argument("--kills", type=int, help="worker SIGKILLs")
    ap.add_argument("--brokers", type=int, choices=[1, 3], help="3: own cluster with a broker kill (full default)")
    ap.add_argument("--broker-kills", type=int, default=1, choices=[0, 1])
    ap.add_argument("--duration", type=float, help="seconds over which the input is produced")
    ap.add_argument("--pauses", type=int, help="worker SIGSTOP/SIGCONT (zombies) past the session timeout")
    ap.add_argument("--pause-s", type=float, default=9.0, help="how long a paused worker stays frozen")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--batch-size", "--batch-max", dest="batch_size", type=int, default=100)
    ap.add_argument("--delay-ms", type=float, default=1.0, help="handler time per record")
    ap.add_argument("--kill-min-s", type=float)
    ap.add_argument("--kill-max-s", type=float)
    ap.add_argument("--broker-down-s", type=float, default=8.0)
    ap.add_argument("--drain-timeout", type=float, default=600.0)
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--logdir")
    args = ap.parse_args(argv)
    quick = args.quick
    args.brokers = args.brokers or (1 if quick else 3)
    if args.brokers == 1:
        args.broker_kills = 0  # the single broker (KCONS_KAFKA_BOOTSTRAP or a fresh one) is never killed
    args.records = args.records or (2000 if quick else 20_000)
    args.kills = args.kills if args.kills is not None else (3 if quick else 12)
    args.pauses = args.pauses if args.pauses is not None else (1 if quick else 2)
    args.duration = args.duration or (12.0 if quick else 90.0)
    args.kill_min_s = args.kill_min_s or (1.5 if quick else 3.0)
    args.kill_max_s = args.kill_max_s or (3.5 if quick else 7.0)
    if quick:
        args.broker_down_s = min(args.broker_down_s, 5.0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        result = run(args)
    except Exception as exc:
        log.exception("the fault run failed")
        result = {"name": "eos_kill", "runs": 1, "sent": args.records, "error": str(exc), "ok": False}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
