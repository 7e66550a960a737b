"""Every Prometheus metric kcons exports, defined once, and the HTTP exposition helper.

Names start with ``kcons_``; counters end in ``_total``; durations are in seconds and end in
``_seconds``. Labels are few and bounded (never a message key or id). Each part of kcons
adds its metrics in its own section below, and the README's metrics table lists them all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import Counter as Counter
from prometheus_client import Gauge as Gauge
from prometheus_client import Histogram as Histogram

log = logging.getLogger(__name__)

__all__ = ["LATENCY_BUCKETS", "ConsumerMetrics", "MetricsServer", "metric_names"]

#: Buckets for latencies from 0.5 ms to 30 s: transactions, round trips, batches.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# --- producer and transactions ------------------------------------------------------------
TRANSACTIONS_COMMITTED = Counter("kcons_transactions_committed", "Kafka transactions committed by kcons producers.")
TRANSACTIONS_ABORTED = Counter(
    "kcons_transactions_aborted", "Kafka transactions aborted by kcons producers, by reason.", ["reason"]
)
TRANSACTION_DURATION = Histogram(
    "kcons_transaction_duration_seconds",
    "Time from begin_transaction to the end of commit or abort, by outcome.",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
)
MESSAGES_PRODUCED = Counter("kcons_messages_produced", "Messages acknowledged by the broker to kcons producers.")
PRODUCE_ERRORS = Counter(
    "kcons_produce_errors", "Produce and transaction errors seen by kcons producers, by error class.", ["error_class"]
)
PRODUCER_REINITIALISATIONS = Counter(
    "kcons_producer_reinitialisations",
    "Transactional producers re-created after an indefinite commit or abort outcome.",
)

# --- processor (exactly-once consume-transform-produce) -----------------------------------
PROCESSOR_BATCH_SIZE = Histogram(
    "kcons_processor_batch_size",
    "Input records per committed processor transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
)
PROCESSOR_LAG = Gauge(
    "kcons_processor_lag",
    "Records behind the high watermark, per input partition a processor owns.",
    ["group", "topic", "partition"],
)
PROCESSOR_RECORDS = Counter("kcons_processor_records", "Input records whose outputs and offsets were committed.")
PROCESSOR_REWINDS = Counter(
    "kcons_processor_rewinds",
    "Times a processor aborted a batch and rewound to the committed offsets, by reason.",
    ["reason"],
)
PROCESSOR_DEAD_LETTERED = Counter(
    "kcons_processor_dead_lettered",
    "Input records a processor wrote to their dead-letter topic (in the transaction) instead of processing.",
)

# --- idempotent consumer and dedup stores --------------------------------------------------
# Every kcons_consumer_* metric carries the consumer group (``group``), so that several consumers in
# one process can be told apart; the driver binds its children once (ConsumerMetrics).
CONSUMER_CONSUMED = Counter(
    "kcons_consumer_consumed_total", "Messages the idempotent consumer received from Kafka.", ["group"]
)
CONSUMER_HANDLED = Counter(
    "kcons_consumer_handled_total", "Messages whose handler succeeded and whose effect is recorded done.", ["group"]
)
CONSUMER_DUPLICATES = Counter(
    "kcons_consumer_duplicates_dropped_total",
    "Messages dropped because their id was already done (or repeated in a batch).",
    ["group"],
)
CONSUMER_HANDLER_ERRORS = Counter(
    "kcons_consumer_handler_errors_total", "Failed handler attempts (each retry counts).", ["group"]
)
CONSUMER_DEAD_LETTERED = Counter(
    "kcons_consumer_dead_lettered_total", "Poison messages whose dead-letter write was acknowledged.", ["group"]
)
CONSUMER_FALLBACK_IDS = Counter(
    "kcons_consumer_fallback_ids_total",
    "Messages without an event id, deduplicated by topic/partition/offset.",
    ["group"],
)
CONSUMER_HOLDS = Counter(
    "kcons_consumer_partition_holds_total",
    "Times a partition was rewound to a message not decided yet and paused (back-pressure), by reason.",
    ["group", "reason"],
)
CONSUMER_COMMIT_FAILURES = Counter(
    "kcons_consumer_commit_failures_total", "Offset commits that failed (retried).", ["group"]
)
CONSUMER_PAUSED_PARTITIONS = Gauge(
    "kcons_consumer_paused_partitions", "Partitions paused for back-pressure right now.", ["group"]
)
CONSUMER_BATCH_SECONDS = Histogram(
    "kcons_consumer_batch_duration_seconds",
    "Time to claim, handle, complete and commit one batch.",
    ["group"],
    buckets=LATENCY_BUCKETS,
)


class ConsumerMetrics:
    """The kcons_consumer_* children of one consumer group, bound once at construction.

    The hot path then increments plain children: no label lookup per batch or message.
    """

    def __init__(self, group: str) -> None:
        self.group = group
        self.consumed = CONSUMER_CONSUMED.labels(group=group)
        self.handled = CONSUMER_HANDLED.labels(group=group)
        self.duplicates = CONSUMER_DUPLICATES.labels(group=group)
        self.handler_errors = CONSUMER_HANDLER_ERRORS.labels(group=group)
        self.dead_lettered = CONSUMER_DEAD_LETTERED.labels(group=group)
        self.fallback_ids = CONSUMER_FALLBACK_IDS.labels(group=group)
        self.commit_failures = CONSUMER_COMMIT_FAILURES.labels(group=group)
        self.paused_partitions = CONSUMER_PAUSED_PARTITIONS.labels(group=group)
        self.batch_seconds = CONSUMER_BATCH_SECONDS.labels(group=group)
        self._holds: dict[str, Any] = {}

    def hold(self, reason: str) -> Any:
        """The partition-holds counter for ``reason`` (a small fixed set), bound on first use."""
        child = self._holds.get(reason)
        if child is None:
            child = self._holds[reason] = CONSUMER_HOLDS.labels(group=self.group, reason=reason)
        return child


DEDUP_STORE_SECONDS = Histogram(
    "kcons_dedup_store_latency_seconds",
    "Latency of one dedup store call for a whole batch, by store and operation.",
    ["store", "op"],
    buckets=LATENCY_BUCKETS,
)


def observe_dedup_store(store: str) -> dict[str, Any]:
    """Bound histogram children of one dedup store, per operation (claim, complete, release)."""
    return {op: DEDUP_STORE_SECONDS.labels(store=store, op=op) for op in ("claim", "complete", "release")}


# --- outbox relay ------------------------------------------------------------------------
OUTBOX_BACKLOG_ROWS = Gauge(
    "kcons_outbox_backlog_rows", "Committed outbox rows not yet published (sampled by the leader).", ["relay"]
)
OUTBOX_OLDEST_AGE_SECONDS = Gauge(
    "kcons_outbox_oldest_unpublished_age_seconds", "Age of the oldest unpublished outbox row, in seconds.", ["relay"]
)
OUTBOX_PUBLISHED_TOTAL = Counter(
    "kcons_outbox_published_total", "Outbox rows acknowledged by Kafka and marked or deleted.", ["relay"]
)
OUTBOX_PUBLISH_LATENCY_SECONDS = Histogram(
    "kcons_outbox_publish_latency_seconds",
    "From outbox row insert (database clock) to Kafka acknowledgement, per batch for its oldest row.",
    ["relay"],
    buckets=LATENCY_BUCKETS,
)
OUTBOX_BATCH_SECONDS = Histogram(
    "kcons_outbox_batch_seconds", "Time to read, publish and mark one relay batch.", ["relay"], buckets=LATENCY_BUCKETS
)
OUTBOX_IS_LEADER = Gauge("kcons_outbox_is_leader", "1 while this relay replica holds the outbox lease.", ["relay"])
OUTBOX_LEADERSHIP_CHANGES_TOTAL = Counter(
    "kcons_outbox_leadership_changes_total", "Times this replica gained or lost the outbox lease.", ["relay", "change"]
)
OUTBOX_ERRORS_TOTAL = Counter(
    "kcons_outbox_errors_total", "Relay batch attempts that failed and were retried or abandoned.", ["relay", "kind"]
)
OUTBOX_DEAD_LETTERED_TOTAL = Counter(
    "kcons_outbox_dead_lettered_total",
    "Outbox rows moved to the dead-letter table, by kind: poison (cannot be published) or held (behind a poison row "
    "of the same aggregate).",
    ["relay", "kind"],
)

# --- cache -------------------------------------------------------------------------------
CACHE_HITS = Counter("kcons_cache_hits_total", "ConsistentCache reads answered from Redis.", ["cache"])
CACHE_MISSES = Counter(
    "kcons_cache_misses_total", "ConsistentCache reads that found no value (absent or tombstone).", ["cache"]
)
CACHE_FILLS_REJECTED = Counter(
    "kcons_cache_fills_rejected_total",
    "Cache fills refused as stale: reason=version (a newer version or tombstone is stored) or lease (invalidated).",
    ["cache", "reason"],
)
CACHE_LEASE_TIMEOUTS = Counter(
    "kcons_cache_lease_wait_timeouts_total",
    "Misses that waited for another loader too long and read through.",
    ["cache"],
)
CACHE_INVALIDATIONS = Counter(
    "kcons_cache_invalidations_total",
    "Invalidations (tombstones or write-behind values) sent to Redis; result=applied or stale (older than stored).",
    ["cache", "result"],
)
CACHE_INVALIDATION_LAG = Histogram(
    "kcons_cache_invalidation_lag_seconds",
    "Time from the source commit of a change event to Redis acknowledging its invalidation.",
    ["cache"],
    buckets=LATENCY_BUCKETS,
)

# --- cache audit (kcons audit cache) ---------------------------------------------------------
CACHE_AUDIT_CHECKED = Counter(
    "kcons_cache_audit_checked_total",
    "Cache keys the audit sampler decided (consistent or stale), after the lag bound for suspects.",
    ["cache"],
)
CACHE_AUDIT_STALE = Counter(
    "kcons_cache_audit_stale_total",
    "Cache keys the audit sampler found stale: still wrong after the invalidation-lag bound.",
    ["cache"],
)
CACHE_AUDIT_RATIO = Gauge(
    "kcons_cache_audit_inconsistency_ratio",
    "Stale / checked over the audit sampler's last decisions (its window).",
    ["cache"],
)

# --- raft --------------------------------------------------------------------------------
RAFT_FRAMES_REJECTED = Counter(
    "kcons_raft_frames_rejected_total",
    "Transport frames dropped because they failed authentication, were oversized or malformed.",
    ["reason"],
)
RAFT_PROPOSALS = Counter(
    "kcons_raft_proposals_total",
    "Client commands proposed by this node as leader, by outcome.",
    ["node", "result"],
)
RAFT_COMMIT_SECONDS = Histogram(
    "kcons_raft_commit_seconds",
    "Time from a proposal at the leader to its entry being committed and applied there.",
    ["node"],
    buckets=LATENCY_BUCKETS,
)
RAFT_FSYNC_SECONDS = Histogram(
    "kcons_raft_wal_fsync_seconds",
    "Time to persist one Ready (WAL append and fsync) before its messages are sent.",
    ["node"],
    buckets=LATENCY_BUCKETS,
)
RAFT_TERM = Gauge("kcons_raft_term", "Current Raft term of the node.", ["node"])
RAFT_IS_LEADER = Gauge("kcons_raft_is_leader", "1 while the node leads, else 0.", ["node"])
RAFT_COMMIT_INDEX = Gauge("kcons_raft_commit_index", "Highest log index known committed.", ["node"])
RAFT_APPLIED_INDEX = Gauge("kcons_raft_applied_index", "Highest log index applied to the state machine.", ["node"])
RAFT_SNAPSHOTS = Counter(
    "kcons_raft_snapshots_total", "Snapshots taken locally or installed from the leader.", ["node", "kind"]
)


def metric_names(registry: CollectorRegistry = REGISTRY) -> list[str]:
    """Return the exported names of the kcons metrics in ``registry`` (for docs and tests)."""
    names: set[str] = set()
    for family in registry.collect():
        if family.name.startswith("kcons_"):
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return sorted(names)


HealthCheck = Callable[[], tuple[bool, str]]


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per request, but at most ``max_connections`` at once; extra connections are closed."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text format) and ``/healthz`` over HTTP.

    Binds to 127.0.0.1 unless another host is configured, so nothing listens beyond loopback
    by default. ``/healthz`` answers 200 when every health check passes and 503 otherwise,
    with one ``name: detail`` line per check. Resources are bounded: a request must arrive within
    ``request_timeout`` seconds (a half-open connection is closed after it) and at most
    ``max_connections`` are served at once (more are closed without an answer).
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        registry: CollectorRegistry = REGISTRY,
        health_checks: Iterable[tuple[str, HealthCheck]] = (),
        request_timeout: float = 10.0,
        max_connections: int = 32,
    ) -> None:
        self._registry = registry
        self._checks = list(health_checks)
        self._request_timeout = request_timeout
        self._server = _BoundedHTTPServer((host, port), self._handler_class(), max_connections)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        return int(self._server.server_address[1])

    def add_health_check(self, name: str, check: HealthCheck) -> None:
        """Register a check that returns ``(healthy, detail)``."""
        self._checks.append((name, check))

    def health(self) -> tuple[bool, list[str]]:
        """Run every check; a check that raises counts as unhealthy."""
        ok = True
        lines: list[str] = []
        for name, check in self._checks:
            try:
                healthy, detail = check()
            except Exception as exc:  # a failing check must not take the endpoint down
                healthy, detail = False, f"check raised {type(exc).__name__}"
            ok = ok and healthy
            lines.append(f"{name}: {'ok' if healthy else 'FAIL'} {detail}".rstrip())
        return ok, lines

    def start(self) -> MetricsServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="kcons-metrics", daemon=True)
        self._thread.start()
        log.info("metrics and health on http://%s:%d", self._server.server_address[0], self.port)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = outer._request_timeout  # socket timeout: a half-open request is dropped

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(outer._registry))
                elif path == "/healthz":
                    ok, lines = outer.health()
                    body = ("\n".join(lines) + "\n" if lines else "ok\n").encode()
                    self._send(200 if ok else 503, "text/plain; charset=utf-8", body)
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        return Handler
