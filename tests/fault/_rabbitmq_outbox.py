"""``outbox_kill.py --sink rabbitmq``: the relays publish to a local RabbitMQ node that the run kills and restarts.

:class:`RabbitTarget` starts its own node, declares a consistent-hash exchange with one quorum
queue per ``--partitions`` and settles them with a clean restart (as long-lived queues are: on
RabbitMQ 3.10 a quorum queue declared moments before a kill -9 can come back empty and never
confirm again). Its faults: the broker SIGKILLed and restarted on its data, and every client
connection closed from the server side (``rabbitmqctl close_all_connections``). The check drains
each queue through kcons' :class:`~kcons.consumer.amqp.AmqpIdempotentConsumer` (one memory dedup
store for all queues): the ids that arrived, handler calls per id, raw copies beyond the first,
and per queue, first copies of an aggregate out of version order. The exchange rebuilds its hash
ring when the node restarts and may then route an aggregate to another queue: order is judged per
queue (what a consumer of that queue sees), and the aggregates that moved are counted.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import time
import uuid
from typing import Any

import pika

from kcons.outbox.sinks.rabbitmq import declare_hash_queues
from kcons.testing import running, wait_for
from kcons.testing.rabbitmq import RabbitMqServer

log = logging.getLogger("outbox_kill.rabbitmq")


class RabbitTarget:
    """A local RabbitMQ node, its exchange and quorum queues, its faults and the checks of what arrived."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.server = RabbitMqServer().start()
        tag = uuid.uuid4().hex[:8]
        self.exchange = f"outbox-kill-{tag}"
        self.queues = [f"outbox-kill-{tag}-{i}" for i in range(args.partitions)]
        declare_hash_queues(self.server.url, self.exchange, self.queues)
        self.server.stop()
        self.server.start(timeout=300)
        self.want_restarts = args.broker_restarts
        self.restarts = 0
        self.cuts = 0
        self.restart_s: list[float] = []

    def relay_args(self) -> list[str]:
        return ["--sink", "rabbitmq"]

    def env(self) -> dict[str, str]:
        return {"KCONS_AMQP_URL": self.server.url, "KCONS_AMQP_EXCHANGE": self.exchange}

    def pending_faults(self) -> bool:
        return self.restarts < self.want_restarts or self.cuts < 1

    def fault(self, rnd: random.Random) -> str | None:
        """Now and then: kill -9 the broker and restart it on its data, or close every connection server-side."""
        draw = rnd.random()
        if draw < 0.1 or (self.restarts < self.want_restarts and draw < 0.2):
            self.server.kill()
            started = time.monotonic()
            self.server.start(timeout=300)
            self.restart_s.append(round(time.monotonic() - started, 1))
            self.restarts += 1
            return f"killed and restarted the broker ({self.restart_s[-1]}s)"
        if draw < 0.3:
            self.server.close_connections()
            self.cuts += 1
            return "closed every broker connection"
        return None

    def check(self, committed: set[str], timeout: float) -> dict[str, Any]:
        """Drain every queue through the idempotent consumer, queue by queue."""
        from kcons.adapters.memory import MemoryDedupStore
        from kcons.consumer.amqp import AmqpDelivery, AmqpIdempotentConsumer

        url = self.server.url
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = conn.channel()
            depth = {q: int(channel.queue_declare(q, passive=True).method.message_count) for q in self.queues}
        finally:
            conn.close()
        store = MemoryDedupStore()
        handled: dict[str, int] = {}
        per_queue: dict[tuple[str, str], list[int]] = {}
        bad: list[str] = []
        duplicates = dead = 0
        for queue in self.queues:

            def handler(d: AmqpDelivery, queue: str = queue) -> None:
                agg, version = d.headers.get("kcons-aggregate-id"), d.headers.get("kcons-version")
                if d.event_id is None or agg is None or version is None or d.properties.delivery_mode != 2:
                    bad.append(f"{queue}: {d.event_id} without kcons headers, version or persistence")
                    return
                handled[d.event_id] = handled.get(d.event_id, 0) + 1
                per_queue.setdefault((queue, str(agg)), []).append(int(version))

            consumer = AmqpIdempotentConsumer(url, queue, handler, store, batch_size=500, idle_s=0.2)
            errors: list[BaseException] = []
            with running(consumer, errors):
                wait_for(
                    f"the {depth[queue]} messages of {queue}",
                    lambda c=consumer, q=queue, e=errors: c.handled + c.duplicates + c.dead_lettered >= depth[q]
                    or bool(e),
                    timeout=timeout,
                )
            if errors:
                raise errors[0]
            duplicates += consumer.duplicates
            dead += consumer.dead_lettered
        for line in bad[:10]:
            log.error("%s", line)
        regressions = sum(1 for vs in per_queue.values() for a, b in itertools.pairwise(vs) if b <= a)
        queues_of: dict[str, int] = {}
        order: dict[str, list[int]] = {}
        for (_queue, agg), versions in per_queue.items():
            queues_of[agg] = queues_of.get(agg, 0) + 1
            order.setdefault(agg, []).extend(versions)
        for versions in order.values():  # per queue the order is checked above; here: every version, once
            versions.sort()
        return {
            "ids": set(handled), "handled": handled, "order": order, "regressions": regressions,
            "malformed": len(bad) + dead,
            "fields": {"queues": len(self.queues), "amqp_messages": sum(depth.values()), "amqp_duplicates": duplicates,
                       "aggregates_moved_queue": sum(1 for n in queues_of.values() if n > 1),
                       "broker_restarts": self.restarts, "broker_restart_s": self.restart_s,
                       "broker_connection_cuts": self.cuts},
        }  # fmt: skip

    def close(self) -> None:
        self.server.close()
