"""``outbox_kill.py --sink rocketmq``: the relays publish to a local RocketMQ node that the run kills and restarts.

:class:`RocketTarget` starts its own node (the run SIGKILLs the broker, with the proxy that hosts
it, and restarts it on its data), creates a FIFO topic with one queue per ``--partitions`` and
checks what arrived twice, each time as a new consumer group that reads the whole topic:

* a raw pass (every copy): the ids that arrived, copies beyond the first, messages without
  ``kcons-id`` or ``kcons-version``, and first copies of an aggregate out of version order;
* kcons' :class:`~kcons.consumer.rocketmq.RocketMqIdempotentConsumer` (memory dedup store, FIFO
  group): handler calls per id and the versions per aggregate in the order they were handled.
"""

from __future__ import annotations

import argparse
import logging
import random
import threading
import time
import uuid
from typing import Any

from kcons.testing.rocketmq import RocketMqServer, drain

log = logging.getLogger("outbox_kill.rocketmq")


class RocketTarget:
    """The RocketMQ side of the outbox fault run."""

    sink = "rocketmq"

    def __init__(self, args: argparse.Namespace) -> None:
        self.server = RocketMqServer().start()
        tag = uuid.uuid4().hex[:8]
        self.topic = self.server.create_topic(f"outbox-kill-{tag}", "FIFO", queues=args.partitions)
        self.want_restarts = args.broker_restarts
        self.restarts = 0
        self.restart_s: list[float] = []

    def relay_args(self) -> list[str]:
        return ["--sink", "rocketmq", "--topic", self.topic]

    def env(self) -> dict[str, str]:
        return {"KCONS_ROCKETMQ_ENDPOINTS": self.server.endpoints}

    def pending_faults(self) -> bool:
        return self.restarts < self.want_restarts

    def fault(self, rnd: random.Random) -> str | None:
        """Now and then: SIGKILL the broker (and its proxy) and restart it on its data."""
        if rnd.random() < 0.2 or (self.pending_faults() and rnd.random() < 0.4):
            self.server.kill_broker()
            started = time.monotonic()
            self.server.restart_broker(timeout=300)
            self.restart_s.append(round(time.monotonic() - started, 1))
            self.restarts += 1
            return f"killed and restarted the broker in {self.restart_s[-1]}s"
        return None

    def check(self, committed: set[str], timeout: float) -> dict[str, Any]:
        """The raw pass and the idempotent pass (see the module docstring)."""
        group = self.server.create_group(f"audit-{uuid.uuid4().hex[:8]}", fifo=True)
        raw = drain(self.server.endpoints, self.topic, group, want=len(committed), timeout=timeout, idle_s=5)
        ids: set[str] = set()
        copies = malformed = regressions = 0
        last: dict[str, int] = {}
        for msg in raw:
            props = msg.properties or {}
            event_id, version, aggregate = props.get("kcons-id"), props.get("kcons-version"), msg.message_group
            if not event_id or not version or not aggregate:
                malformed += 1
                continue
            if event_id in ids:
                copies += 1
                continue
            ids.add(event_id)
            if int(version) <= last.get(aggregate, 0):
                regressions += 1
            last[aggregate] = int(version)
        handled, order = self._idempotent_pass(len(committed), timeout)
        return {
            "ids": ids, "handled": handled, "order": order, "regressions": regressions, "malformed": malformed,
            "fields": {"rocketmq_messages": len(raw), "rocketmq_duplicates": copies,
                       "broker_restarts": self.restarts, "broker_restart_s": self.restart_s},
        }  # fmt: skip

    def _idempotent_pass(self, want: int, timeout: float) -> tuple[dict[str, int], dict[str, list[int]]]:
        from kcons.adapters.memory import MemoryDedupStore
        from kcons.consumer.rocketmq import RocketMqDelivery, RocketMqIdempotentConsumer

        handled: dict[str, int] = {}
        order: dict[str, list[int]] = {}
        lock = threading.Lock()

        def handler(d: RocketMqDelivery) -> None:
            assert d.event_id is not None
            with lock:
                handled[d.event_id] = handled.get(d.event_id, 0) + 1
                order.setdefault(d.properties["kcons-aggregate-id"], []).append(int(d.properties["kcons-version"]))

        group = self.server.create_group(f"idem-{uuid.uuid4().hex[:8]}", fifo=True)
        self.server.create_topic(f"%DLQ%{group}", "NORMAL", queues=1)
        consumer = RocketMqIdempotentConsumer(self.server.endpoints, self.topic, group, handler, MemoryDedupStore())
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = consumer.handled + consumer.duplicates + consumer.dead_lettered
            if now != seen:
                seen, quiet_since = now, time.monotonic()
            elif len(handled) >= want and time.monotonic() - quiet_since > 3.0:
                break
        consumer.stop()
        thread.join(60)
        return handled, order

    def close(self) -> None:
        self.server.close()
