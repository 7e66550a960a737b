"""The local RabbitMQ node of kcons.testing: it speaks AMQP and runs the consistent-hash exchange."""

from __future__ import annotations

import uuid

import pika


def test_local_node_routes_through_the_consistent_hash_exchange(kcons_amqp_url: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(kcons_amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        exchange, queue = f"x-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
        ch.exchange_declare(exchange, "x-consistent-hash", auto_delete=True)
        ch.queue_declare(queue, auto_delete=True)
        ch.queue_bind(queue, exchange, routing_key="1")
        ch.basic_publish(exchange, "aggregate-7", b"hello", mandatory=True)
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        assert method is not None and body == b"hello"
    finally:
        conn.close()
