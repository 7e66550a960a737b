"""The parts ``consumer_kill.py --source rocketmq|rabbitmq`` share: the event plan, the kill loop, the effect tally.

Each source's runner starts its broker, its queue or topic and its worker processes (which insert
one row per effect into ``kcons_fault_rmq_effects``, see ``_rocketmq_consumer_worker.EFFECTS_DDL``),
then calls these.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("fault.consumer_kill")

Event = tuple[str, str, int]  # event id, aggregate, version


def effects_database(server_dsn: str, ddl: str) -> str:
    """A fresh database on the server of ``server_dsn`` with the effects table; its DSN."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"kcons_fault_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(server_dsn)
    params["dbname"] = name
    dsn = make_conninfo("", **params)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl)
    return dsn


def drop_database(server_dsn: str, dsn: str) -> None:
    """Drop the database of ``dsn`` (connections forced out)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{conninfo_to_dict(dsn)["dbname"]}" WITH (FORCE)')


def plan_events(rng: random.Random, messages: int, resend_rate: float) -> tuple[list[Event], dict[str, int]]:
    """``messages`` events over ``messages // 50`` aggregates (versions 1, 2, ...), some sent twice right away."""
    aggregates = max(10, messages // 50)
    versions: dict[str, int] = {}
    plan: list[Event] = []
    for _ in range(messages):
        aggregate = f"acc-{rng.randrange(aggregates)}"
        versions[aggregate] = versions.get(aggregate, 0) + 1
        plan.append((str(uuid.uuid4()), aggregate, versions[aggregate]))
        if rng.random() < resend_rate:  # a producer's duplicate: the same id again, right after
            plan.append(plan[-1])
    return plan, versions


def kill_while_producing(
    workers: Sequence[Any], produce: Callable[[], None], kills_target: int, kill_interval: tuple[float, float],
    rng: random.Random,
) -> tuple[int, list[BaseException]]:
    """Run ``produce`` on a thread; SIGKILL and restart a random worker every interval until both are done."""
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            produce()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    kills = 0
    while thread.is_alive() or kills < kills_target:
        time.sleep(rng.uniform(*kill_interval))
        victim = rng.choice(workers)
        victim.kill()
        kills += 1
        log.info("SIGKILLed %s", victim.name)
        victim.start()
    thread.join()
    return kills, errors


def drain_effects(dsn: str, workers: Sequence[Any], sent: set[str], timeout: float) -> tuple[list[Event], list[Any]]:
    """Wait until every id has an effect row (or ``timeout``), stop the workers; the rows in order, the exit codes."""
    import psycopg

    def effect_rows() -> list[Event]:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT event_id, aggregate, version FROM kcons_fault_rmq_effects ORDER BY seq")
            return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    deadline = time.monotonic() + timeout
    rows = effect_rows()
    while {r[0] for r in rows} < sent and time.monotonic() < deadline:
        time.sleep(1.0)
        rows = effect_rows()
    time.sleep(2.0)  # a late duplicate effect would show now
    exit_codes = [w.stop() for w in workers]
    return effect_rows(), exit_codes


def tally(rows: Sequence[Event], sent: set[str]) -> dict[str, int]:
    """lost (ids without an effect), duplicates (extra effect rows), out_of_order (per aggregate), unexpected ids."""
    counts: dict[str, int] = {}
    order: dict[str, list[int]] = {}
    for event_id, aggregate, version in rows:
        counts[event_id] = counts.get(event_id, 0) + 1
        order.setdefault(aggregate, []).append(version)
    return {
        "lost": len(sent - set(counts)),
        "duplicates": sum(n - 1 for n in counts.values()),
        "out_of_order": sum(1 for vs in order.values() for a, b in itertools.pairwise(vs) if b <= a),
        "unexpected": len(set(counts) - sent),
    }
