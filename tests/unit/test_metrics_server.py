"""The metrics endpoint serves Prometheus text and a health check that reflects failing checks."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from kcons.metrics import MetricsServer, metric_names


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_healthz_are_served_on_loopback() -> None:
    registry = CollectorRegistry()
    c = Counter("kcons_test_events_total", "test counter", registry=registry)
    c.inc(3)
    healthy = {"db": True}
    server = MetricsServer(0, registry=registry, health_checks=[("db", lambda: (healthy["db"], "conn"))]).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, body = _get(base + "/metrics")
        assert status == 200 and "kcons_test_events_total 3.0" in body
        assert _get(base + "/healthz")[0] == 200
        healthy["db"] = False
        status, body = _get(base + "/healthz")
        assert status == 503 and "db: FAIL" in body
        assert _get(base + "/nope")[0] == 404
    finally:
        server.stop()


def test_metric_names_lists_kcons_metrics_with_their_exported_names() -> None:
    registry = CollectorRegistry()
    Counter("kcons_a_total", "a", registry=registry)
    Counter("other_total", "b", registry=registry)
    assert metric_names(registry) == ["kcons_a_total"]


def test_half_open_requests_are_bounded_in_number_and_time() -> None:
    import socket
    import threading
    import time

    server = MetricsServer(0, registry=CollectorRegistry(), request_timeout=0.5, max_connections=4).start()
    threads_before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(12)]
    try:
        for s in socks:
            s.sendall(b"GET /metr")  # never finishes the request line
        time.sleep(0.2)
        assert threading.active_count() <= threads_before + 4
        t0 = time.monotonic()
        for s in socks:
            assert s.recv(1024) is not None  # each one is answered or closed, none is held forever
        assert time.monotonic() - t0 < 3
        assert _get(f"http://127.0.0.1:{server.port}/metrics")[0] == 200
    finally:
        for s in socks:
            s.close()
        server.stop()
