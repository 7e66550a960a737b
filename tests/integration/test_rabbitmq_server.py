"""The local RabbitMQ node of kcons.testing: it speaks AMQP and runs the consistent-hash exchange."""

from __future__ import annotations

import uuid
from pathlib import Path

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


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes of session ``pid`` listen on, from /proc."""
    import os
    import socket

    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[3]) == pid:  # the session id: the node runs in its own session
                pids.add(int(entry.name))
    inodes: set[str] = set()
    for p in pids:
        fd_dir = Path(f"/proc/{p}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: set[tuple[str, int]] = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)  # little-endian 32-bit words
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


def test_local_node_listens_on_loopback_only(tmp_path: Path) -> None:
    from kcons.testing.rabbitmq import RabbitMqServer

    server = RabbitMqServer(base_dir=tmp_path).start()
    try:
        assert server.process is not None and server.process.pid is not None
        listening = _listening_addresses(server.process.pid)
        assert (("127.0.0.1", server.port)) in listening, listening  # the check sees the AMQP listener
        assert ("127.0.0.1", server.dist_port) in listening, listening
        assert all(addr in ("127.0.0.1", "::1") for addr, _port in listening), listening
    finally:
        server.stop()
