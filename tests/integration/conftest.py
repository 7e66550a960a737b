"""Fixtures shared by the integration tests: a real 3-node Redis Cluster of local redis-server processes."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kcons.testing.local import free_port


def _port_pair() -> int:
    """A port P such that P and its cluster bus port P + 10000 are both free right now."""
    import socket

    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _start_cluster(base: str) -> tuple[list[subprocess.Popen[bytes]], list[int], str]:
    """Start three cluster nodes and join them; returns the processes, ports and '' or the failure."""
    ports = [_port_pair() for _ in range(3)]
    procs = [
        subprocess.Popen(
            ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{p}.conf", "--save", "", "--appendonly", "no", "--dir", base],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]  # fmt: skip
    for p in ports:
        deadline = time.monotonic() + 30
        while subprocess.run(["redis-cli", "-p", str(p), "ping"], capture_output=True).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                return procs, ports, f"node {p} did not start"
            time.sleep(0.1)
    create = subprocess.run(
        ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
         "--cluster-yes"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    if create.returncode != 0:
        return procs, ports, f"cluster create failed: {create.stdout[-1000:]!r}"
    deadline = time.monotonic() + 60
    while (
        b"cluster_state:ok"
        not in subprocess.run(["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True).stdout
    ):
        if time.monotonic() > deadline:
            return procs, ports, "the cluster did not become ok"
        time.sleep(0.2)
    return procs, ports, ""


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[Any]:
    from redis.cluster import RedisCluster

    failures: list[str] = []
    for _attempt in range(3):  # a port taken by another process between choosing and binding: start again
        base = tempfile.mkdtemp(prefix="kcons-redis-cluster-")
        procs, ports, failure = _start_cluster(base)
        try:
            if not failure:
                client = RedisCluster(host="127.0.0.1", port=ports[0])
                yield client
                client.close()
                return
            failures.append(failure)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            shutil.rmtree(base, ignore_errors=True)
    raise AssertionError(f"could not start a Redis Cluster: {failures}")
