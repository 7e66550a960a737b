"""The outbox relay: publish committed outbox rows to Kafka, in order per aggregate, then mark them.

One relay replica of an outbox leads (it holds the lease ``outbox:<name>``); the others wait.
The leader repeats: read the lowest-positioned committed, unpublished rows (see
:mod:`kcons.adapters.postgres.outbox` for why this is gap-free and keeps each aggregate's commit order),
publish them as one batch and wait for Kafka's acknowledgement, then delete them (or mark them
published, with retention) in one statement fenced by its lease token. The database work is
pipelined with Kafka: while batch *k* is being acknowledged, a worker thread marks batch *k-1*
and reads batch *k+1* (excluding *k*'s rows); *k+1* is produced only after *k* is acknowledged,
so the order holds, and any failure drops the pipeline and re-reads from the database. When
there is nothing to do it waits for the insert trigger's NOTIFY, with polling as fallback.

Fencing tokens come from the lease backend (advisory-lock grants count 1, 2, 3...; Raft grants
use log indexes) and the fence row per relay name keeps the highest one seen, so switching a
running outbox to another lease backend needs a new relay name (or the fence row deleted).

A long-running writer transaction holds back only its own rows (invisible until it commits);
rows of other transactions keep flowing, and its rows are published when it commits, however
low their positions.

Guarantees: at-least-once (a crash between the Kafka acknowledgement and the mark republishes
the batch; consumers deduplicate by ``kcons-id``); no row lost; no rolled-back row published;
per-aggregate order; a former leader whose lease was lost cannot commit a Kafka transaction
(transactional mode: the new leader's ``init_transactions`` fences it) nor mark rows (fence
token). A poison row (one that cannot become a Kafka record, or that Kafka refuses for good) is
moved to ``<table>_dead`` with a reason naming it, with the later rows of its aggregate held
behind it there, and the relay goes on (see :meth:`OutboxRelay._split`). Transient Kafka and
database errors are retried with bounded exponential backoff
(tenacity); when the bound is exhausted :meth:`OutboxRelay.run` raises and the process should
exit, letting another replica lead. An unreachable broker (a sink's
:class:`~kcons.errors.SinkConnectionError`) is retried with the same backoff and no bound: the relay
reconnects when the broker is back and re-sends the unconfirmed batch.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from kcons import metrics
from kcons.config import (
    KafkaSettings,
    check_amqp_url,
    check_host,
    check_identifier,
    check_port,
    check_postgres_dsn,
    check_range,
    check_rocketmq_endpoints,
    env_float,
    env_int,
    env_str,
    redact,
    redact_text,
)
from kcons.errors import (
    ConfigError,
    KafkaOperationError,
    KconsError,
    LeadershipLostError,
    SinkConnectionError,
    SinkUnavailableError,
    StoreError,
    TimeoutExceededError,
    is_poison_record_error,
)
from kcons.lease import Lease, LeaseBackend
from kcons.outbox.publisher import MODES, KafkaBatchPublisher
from kcons.outbox.rows import DEBEZIUM_TOPIC_PREFIX, OutboxRow, poison_reason, record_tuples
from kcons.outbox.schema import DEFAULT_TABLE, validate_table
from kcons.outbox.sink import OutboxSink
from kcons.outbox.store import OutboxStore

__all__ = ["OutboxRelay", "RelaySettings"]

log = logging.getLogger(__name__)

PublishedHook = Callable[[Sequence[OutboxRow], float], None]

# Row fields read for a whole batch at C speed (map), in the per-batch checks of the hot path.
_POSITION = attrgetter("position")
_AGE = attrgetter("age_s")
_HELD = attrgetter("held")
_POISON = attrgetter("poison")
_ROW_TOPIC = attrgetter("topic")
_AGG_TYPE = attrgetter("aggregatetype")

_TOPIC = re.compile(r"\A[A-Za-z0-9._-]{1,249}\Z")
_NAME = re.compile(r"\A[A-Za-z0-9._-]{1,100}\Z")


@dataclass(frozen=True)
class RelaySettings:
    """Relay settings; every value is checked at construction (ConfigError names the ``KCONS_*`` setting)."""

    dsn: str
    kafka: KafkaSettings | None  # None only with a sink other than Kafka
    table: str = DEFAULT_TABLE
    name: str = "default"
    topic: str | None = None
    mode: str = "transactional"
    batch_size: int = 1000
    poll_interval_s: float = 1.0
    retention_s: float | None = None
    lease_ttl_s: float = 10.0
    ack_timeout_s: float = 30.0
    retry_max_s: float = 60.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    sink: str = "kafka"
    amqp_url: str | None = None
    amqp_exchange: str = "kcons.outbox"
    rocketmq_endpoints: str | None = None

    def __post_init__(self) -> None:
        if not self.dsn:
            raise ConfigError("KCONS_POSTGRES_DSN", "is empty")
        if self.dsn != "sqlite":  # the CLI's marker for a SQLite outbox
            check_postgres_dsn("KCONS_POSTGRES_DSN", self.dsn)
        validate_table(self.table)
        if _NAME.match(self.name) is None:
            raise ConfigError("KCONS_OUTBOX_NAME", f"expected 1-100 characters [A-Za-z0-9._-], got {self.name!r}")
        if self.topic is not None and _TOPIC.match(self.topic) is None:
            raise ConfigError("KCONS_OUTBOX_TOPIC", f"expected [A-Za-z0-9._-]{{1,249}}, got {self.topic!r}")
        check_identifier("KCONS_OUTBOX_HOLDER", self.holder, kind="key", max_length=200)
        if self.mode not in MODES:
            raise ConfigError("KCONS_OUTBOX_MODE", f"expected one of {', '.join(MODES)}, got {self.mode!r}")
        check_range("KCONS_OUTBOX_BATCH_SIZE", self.batch_size, 1, 50000)
        check_range("KCONS_OUTBOX_POLL_INTERVAL_S", self.poll_interval_s, 0.001, 3600.0)
        if self.retention_s is not None:
            check_range("KCONS_OUTBOX_RETENTION_S", self.retention_s, 0.0, 10 * 365 * 86400.0)
        check_range("KCONS_OUTBOX_LEASE_TTL_S", self.lease_ttl_s, 1.0, 3600.0)
        check_range("KCONS_OUTBOX_ACK_TIMEOUT_S", self.ack_timeout_s, 0.1, 3600.0)
        check_range("KCONS_OUTBOX_RETRY_MAX_S", self.retry_max_s, 0.0, 86400.0)
        if self.metrics_port is not None:
            check_port("KCONS_OUTBOX_METRICS_PORT", self.metrics_port)
        check_host("KCONS_OUTBOX_METRICS_HOST", self.metrics_host)
        if self.sink not in SINKS:
            raise ConfigError("KCONS_OUTBOX_SINK", f"expected one of {', '.join(SINKS)}, got {self.sink!r}")
        if self.sink == "kafka" and self.kafka is None:
            raise ConfigError("KCONS_KAFKA_BOOTSTRAP", "is not set (expected host:port[,host:port...])")
        if self.sink == "rabbitmq":
            if not self.amqp_url:
                raise ConfigError("KCONS_AMQP_URL", "is not set (expected amqp://user:password@host:port/vhost)")
            check_amqp_url("KCONS_AMQP_URL", self.amqp_url)
            check_identifier("KCONS_AMQP_EXCHANGE", self.amqp_exchange, kind="key", max_length=200)
        if self.sink == "rocketmq":
            if not self.rocketmq_endpoints:
                raise ConfigError("KCONS_ROCKETMQ_ENDPOINTS", "is not set (expected host:port[;host:port...])")
            check_rocketmq_endpoints("KCONS_ROCKETMQ_ENDPOINTS", self.rocketmq_endpoints)

    def __repr__(self) -> str:
        return (
            f"RelaySettings(dsn={redact(self.dsn)!r}, kafka={self.kafka!r}, table={self.table!r}, "
            f"name={self.name!r}, topic={self.topic!r}, mode={self.mode!r}, batch_size={self.batch_size}, "
            f"sink={self.sink!r}, amqp_url={redact(self.amqp_url) if self.amqp_url else None!r})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RelaySettings:
        """Build from ``KCONS_*`` variables; keyword ``overrides`` (e.g. from CLI flags) win when not None."""
        env = os.environ if environ is None else environ
        given = {k: v for k, v in overrides.items() if v is not None}
        dsn = given.pop("dsn", None) or env_str("KCONS_POSTGRES_DSN", None, env)
        if not dsn:
            raise ConfigError("KCONS_POSTGRES_DSN", "is not set (expected postgresql://user@host:port/db)")
        kafka = given.pop("kafka", None)
        bootstrap = given.pop("bootstrap", None)
        sink = given.pop("sink", None) or env_str("KCONS_OUTBOX_SINK", "kafka", env) or "kafka"
        if kafka is None:
            base = KafkaSettings.from_env(env) if env_str("KCONS_KAFKA_BOOTSTRAP", None, env) else None
            if bootstrap is not None:
                kafka = KafkaSettings(bootstrap, base.properties if base else {})
            elif base is None and sink == "kafka":
                raise ConfigError("KCONS_KAFKA_BOOTSTRAP", "is not set (expected host:port[,host:port...])")
            else:
                kafka = base
        retention_raw = env_str("KCONS_OUTBOX_RETENTION_S", None, env)
        metrics_port, metrics_host = _metrics_address(env)
        values: dict[str, Any] = {
            "table": env_str("KCONS_OUTBOX_TABLE", DEFAULT_TABLE, env),
            "name": env_str("KCONS_OUTBOX_NAME", "default", env),
            "topic": env_str("KCONS_OUTBOX_TOPIC", None, env),
            "mode": env_str("KCONS_OUTBOX_MODE", "transactional", env),
            "batch_size": env_int("KCONS_OUTBOX_BATCH_SIZE", 1000, minimum=1, environ=env),
            "poll_interval_s": env_float("KCONS_OUTBOX_POLL_INTERVAL_S", 1.0, minimum=0.001, environ=env),
            "retention_s": (
                env_float("KCONS_OUTBOX_RETENTION_S", 0.0, minimum=0.0, environ=env) if retention_raw else None
            ),
            "lease_ttl_s": env_float("KCONS_OUTBOX_LEASE_TTL_S", 10.0, minimum=1.0, environ=env),
            "ack_timeout_s": env_float("KCONS_OUTBOX_ACK_TIMEOUT_S", 30.0, minimum=0.1, environ=env),
            "retry_max_s": env_float("KCONS_OUTBOX_RETRY_MAX_S", 60.0, minimum=0.0, environ=env),
            "metrics_port": metrics_port,
            "metrics_host": metrics_host,
            "sink": sink,
            "amqp_url": env_str("KCONS_AMQP_URL", None, env),
            "amqp_exchange": env_str("KCONS_AMQP_EXCHANGE", "kcons.outbox", env),
            "rocketmq_endpoints": env_str("KCONS_ROCKETMQ_ENDPOINTS", None, env),
        }
        holder = env_str("KCONS_OUTBOX_HOLDER", None, env)
        if holder:
            values["holder"] = holder
        values.update(given)
        return cls(dsn=dsn, kafka=kafka, **values)


SINKS = ("kafka", "rabbitmq", "rocketmq")


def _sink(settings: RelaySettings) -> OutboxSink:
    """The sink ``settings.sink`` names (the RabbitMQ and RocketMQ ones import their clients, so only when chosen)."""
    if settings.sink == "rocketmq":
        from kcons.outbox.sinks.rocketmq import RocketMqSink

        assert settings.rocketmq_endpoints is not None  # checked by RelaySettings
        return RocketMqSink(settings.rocketmq_endpoints, ack_timeout_s=settings.ack_timeout_s)
    if settings.sink == "rabbitmq":
        from kcons.outbox.sinks.rabbitmq import RabbitMqSink

        assert settings.amqp_url is not None  # checked by RelaySettings
        return RabbitMqSink(settings.amqp_url, exchange=settings.amqp_exchange, ack_timeout_s=settings.ack_timeout_s)
    assert settings.kafka is not None  # checked by RelaySettings
    return KafkaBatchPublisher(
        settings.kafka.client_config(),
        mode=settings.mode,
        transactional_id=f"kcons-outbox-{settings.table}-{settings.name}",
        ack_timeout_s=settings.ack_timeout_s,
    )


def _metrics_address(env: Mapping[str, str] | None) -> tuple[int | None, str]:
    """The relay's /metrics port (None: off) and host.

    ``KCONS_OUTBOX_METRICS_PORT``/``_HOST`` when that port is set (0: any free port); else the
    ``KCONS_METRICS_PORT``/``_HOST`` that every kcons service reads, where 0 or unset means off.
    """
    if env_str("KCONS_OUTBOX_METRICS_PORT", None, env) is not None:
        port = env_int("KCONS_OUTBOX_METRICS_PORT", 0, minimum=0, maximum=65535, environ=env)
        host = env_str("KCONS_OUTBOX_METRICS_HOST", None, env) or "127.0.0.1"
        return port, check_host("KCONS_OUTBOX_METRICS_HOST", host)
    shared = env_int("KCONS_METRICS_PORT", 0, minimum=0, maximum=65535, environ=env)
    return (shared or None), check_host("KCONS_METRICS_HOST", env_str("KCONS_METRICS_HOST", None, env) or "127.0.0.1")


def _is_transient(exc: BaseException) -> bool:
    """Retry database, Kafka and unavailable-sink failures, never a lost leadership (that ends the batch loop)."""
    if isinstance(exc, LeadershipLostError):
        return False
    # A poison record (is_poison_record_error) is retried too: the next attempt publishes row by row
    # and dead-letters it (see OutboxRelay._step).
    if is_poison_record_error(exc):
        return True
    if isinstance(exc, KafkaOperationError | SinkUnavailableError | TimeoutExceededError | StoreError):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is an optional dependency
        return False
    transient = (
        psycopg.OperationalError,  # connection lost, server shutting down, admin termination
        psycopg.InterfaceError,  # the connection was closed under us
        psycopg.errors.QueryCanceled,  # statement timeout
        psycopg.errors.SerializationFailure,
        psycopg.errors.DeadlockDetected,
    )
    return isinstance(exc, transient)


def _failure(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


class _bounded_while_broker_up(stop_base):
    """Stop after ``max_s`` of failures, counted from the start or from the broker's last outage.

    An unreachable broker (:class:`~kcons.errors.SinkConnectionError`) never stops the retries
    (every replica would fail alike) and starts the bound again: the first publishes to a restarted
    broker may be nacked while its quorum queues elect leaders, and the time spent waiting for the
    broker must not count against them. One instance per retried call.
    """

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.since: float | None = None
        self.broker_down = False

    def __call__(self, retry_state: RetryCallState) -> bool:
        if isinstance(_failure(retry_state), SinkConnectionError):
            self.broker_down = True
            return False
        if self.broker_down:  # the first other failure once the broker answers again: the bound starts
            self.broker_down = False
            self.since = time.monotonic()
            return False
        since = retry_state.start_time if self.since is None else self.since
        return time.monotonic() - since >= self.max_s


class _stop_set(stop_base):
    """Stop retrying once the relay was asked to stop."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.event.is_set()


class OutboxRelay:
    """Publishes an outbox through its sink (Kafka by default); at-least-once, per-aggregate order, one leader."""

    def __init__(
        self,
        store: OutboxStore,
        publisher: OutboxSink,
        *,
        leases: LeaseBackend,
        name: str = "default",
        holder: str | None = None,
        topic: str | None = None,
        batch_size: int = 1000,
        poll_interval_s: float = 1.0,
        retention_s: float | None = None,
        lease_ttl_s: float = 10.0,
        retry_max_s: float = 60.0,
        backlog_interval_s: float = 5.0,
        on_published: PublishedHook | None = None,
        before_commit: Callable[[Sequence[OutboxRow]], None] | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.leases = leases
        self.name = name
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.topic = topic
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.retention_s = retention_s
        self.lease_ttl_s = lease_ttl_s
        self.retry_max_s = retry_max_s
        self.backlog_interval_s = backlog_interval_s
        self.on_published = on_published
        self.before_commit = before_commit
        self.lease_name = f"outbox:{name}"
        self.published = 0
        self._lease: Lease | None = None
        self._lease_lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._last_loop = time.monotonic()
        self._m_leader = metrics.OUTBOX_IS_LEADER.labels(name)
        self._m_published = metrics.OUTBOX_PUBLISHED_TOTAL.labels(name)
        self._m_latency = metrics.OUTBOX_PUBLISH_LATENCY_SECONDS.labels(name)
        self._m_batch = metrics.OUTBOX_BATCH_SECONDS.labels(name)
        self._m_backlog = metrics.OUTBOX_BACKLOG_ROWS.labels(name)
        self._m_age = metrics.OUTBOX_OLDEST_AGE_SECONDS.labels(name)
        self._m_leader.set(0)
        self._next: tuple[list[OutboxRow], float] | None = None  # prefetched batch and when it was read
        self._unmarked: list[OutboxRow] | None = None  # acknowledged by Kafka, not yet marked
        # Two workers: a store that marks on its own connection (``concurrent_mark``) marks the
        # previous batch while the next one is read.
        self._db_worker = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kcons-outbox-db")
        self.dead_lettered = 0
        self._isolate = False  # a batch failed with a poison record: publish the next one row by row
        self._topics_ok: set[str] = set()
        self._m_dead_poison = metrics.OUTBOX_DEAD_LETTERED_TOTAL.labels(name, "poison")
        self._m_dead_held = metrics.OUTBOX_DEAD_LETTERED_TOTAL.labels(name, "held")

    # ----------------------------------------------------------------- construction helpers

    @classmethod
    def for_postgres(
        cls,
        settings: RelaySettings,
        *,
        leases: LeaseBackend | None = None,
        on_published: PublishedHook | None = None,
        before_commit: Callable[[Sequence[OutboxRow]], None] | None = None,
    ) -> OutboxRelay:
        """A relay for a PostgreSQL outbox; leadership by advisory lock unless ``leases`` is given (e.g. Raft)."""
        from kcons.adapters.postgres import AdvisoryLockLeaseBackend, PostgresOutboxStore

        store = PostgresOutboxStore(
            settings.dsn,
            settings.table,
            application_name=f"kcons-outbox:{settings.name}:{settings.holder}"[:63],
            session_timeout_s=settings.lease_ttl_s,
        )
        publisher = _sink(settings)
        backend = leases or AdvisoryLockLeaseBackend(
            settings.dsn, application_name=f"kcons-outbox:{settings.name}:{settings.holder}"[:63]
        )
        return cls(
            store,
            publisher,
            leases=backend,
            name=settings.name,
            holder=settings.holder,
            topic=settings.topic,
            batch_size=settings.batch_size,
            poll_interval_s=settings.poll_interval_s,
            retention_s=settings.retention_s,
            lease_ttl_s=settings.lease_ttl_s,
            retry_max_s=settings.retry_max_s,
            on_published=on_published,
            before_commit=before_commit,
        )

    @classmethod
    def for_sqlite(
        cls,
        path: str,
        kafka: KafkaSettings,
        *,
        table: str = DEFAULT_TABLE,
        topic: str | None = None,
        mode: str = "idempotent",
        batch_size: int = 1000,
        retention_s: float | None = None,
        on_published: PublishedHook | None = None,
    ) -> OutboxRelay:
        """A relay for a SQLite outbox (embedded, exactly one relay per database file)."""
        from kcons.adapters.memory import SingleProcessLease
        from kcons.adapters.sqlite import SqliteOutboxStore

        publisher = KafkaBatchPublisher(
            kafka.client_config(), mode=mode, transactional_id=f"kcons-outbox-sqlite-{table}", ack_timeout_s=30.0
        )
        return cls(
            SqliteOutboxStore(path, table),
            publisher,
            leases=SingleProcessLease(),
            name=f"sqlite-{table}",
            topic=topic,
            batch_size=batch_size,
            poll_interval_s=0.5,
            retention_s=retention_s,
            on_published=on_published,
        )

    # ------------------------------------------------------------------------ leadership

    @property
    def is_leader(self) -> bool:
        """True while this replica holds an unexpired lease."""
        with self._lease_lock:
            lease = self._lease
        # A safety margin: stop publishing a tenth of the TTL before the server could end the session.
        return lease is not None and time.monotonic() < lease.expires_at - self.lease_ttl_s * 0.1

    def _current_lease(self) -> Lease:
        with self._lease_lock:
            lease = self._lease
        if lease is None or not self.is_leader:
            raise LeadershipLostError(f"{self.holder} no longer holds {self.lease_name}")
        return lease

    def _try_lead(self) -> bool:
        lease = self.leases.acquire(self.lease_name, self.holder, self.lease_ttl_s)
        if lease is None:
            return False
        with self._lease_lock:
            self._lease = lease
        # Renew from now on: fencing the previous leader (init_transactions) can take a while.
        self._renewer = threading.Thread(target=self._renew_loop, args=(lease,), name="kcons-outbox-lease", daemon=True)
        self._renewer.start()
        try:
            self.store.forget_position()
            self.store.claim_fence(self.name, lease.token, self.holder)
            self.publisher.reset()
            self.publisher.start()  # transactional: init_transactions fences the previous leader's producer
        except Exception:
            self._step_down("taking the lead failed")
            raise
        self._m_leader.set(1)
        metrics.OUTBOX_LEADERSHIP_CHANGES_TOTAL.labels(self.name, "gained").inc()
        log.info("relay %s leads %s with token %d", self.holder, self.lease_name, lease.token)
        return True

    def _renew_loop(self, lease: Lease) -> None:
        interval = self.lease_ttl_s / 3
        current: Lease | None = lease
        while current is not None and not self._stop.wait(interval):
            with self._lease_lock:
                if self._lease is None or self._lease.token != lease.token:
                    return
            try:
                current = self.leases.renew(current, self.lease_ttl_s)
            except Exception as exc:  # a failing backend means the lease cannot be proven: treat as lost
                log.warning("lease renewal raised %s", type(exc).__name__)
                current = None
            with self._lease_lock:
                if self._lease is not None and self._lease.token == lease.token:
                    self._lease = current
        if current is None:
            log.warning("relay %s lost %s (token %d)", self.holder, self.lease_name, lease.token)

    def _step_down(self, reason: str) -> None:
        with self._lease_lock:
            lease, self._lease = self._lease, None
        self._reset_pipeline()
        self._m_leader.set(0)
        self.publisher.reset()
        if lease is not None:
            try:
                self.leases.release(lease)
            except Exception as exc:  # the lease expires on its own
                log.debug("lease release failed: %s", type(exc).__name__)
        metrics.OUTBOX_LEADERSHIP_CHANGES_TOTAL.labels(self.name, "lost").inc()
        log.info("relay %s stepped down: %s", self.holder, reason)

    # --------------------------------------------------------------------------- batches

    def _step(self) -> int:
        """One pipeline step as leader; on any failure the pipeline restarts from the database's state.

        A batch that Kafka refused because of one record (see :func:`kcons.errors.is_poison_record_error`)
        is retried row by row, which finds the record and moves it to the dead-letter table.
        """
        try:
            if self._isolate:
                return self._step_isolated()
            return self._step_once()
        except BaseException as exc:
            self._reset_pipeline()
            if not self._isolate and is_poison_record_error(exc):
                self._isolate = True
                # A refused record leaves the producer's sequence numbers behind: start afresh.
                self.publisher.reset()
                log.warning(
                    "the broker refused a record of the batch for good (%s); publishing it row by row to find it",
                    getattr(exc, "name", type(exc).__name__),
                )
            raise

    # ------------------------------------------------------------------------ poison rows

    def _split(self, rows: list[OutboxRow]) -> tuple[list[OutboxRow], list[tuple[OutboxRow, str]]]:
        """The rows to publish, and the rows to move to the dead-letter table with their reasons.

        Poison rows (see :func:`kcons.outbox.rows.poison_reason`) go, and so do the rows of an
        aggregate that has a dead row (in the table, or earlier in this batch): they are held
        back, not published out of order, until an operator resolves the aggregate.
        """
        ok_topics = self._topics_ok
        fixed = self.topic

        def topic_of(r: OutboxRow) -> str:
            return r.topic or fixed or DEBEZIUM_TOPIC_PREFIX + r.aggregatetype

        if self._all_clean(rows):
            return rows, []  # the common case, no per-row work
        good: list[OutboxRow] = []
        dead: list[tuple[OutboxRow, str]] = []
        blocked: dict[tuple[str, str], int] = {}
        for row in rows:
            agg = (row.aggregatetype, row.aggregateid)
            if agg in blocked:
                dead.append((row, self._held_reason(row, f"dead row position={blocked[agg]}")))
                continue
            reason = poison_reason(row, fixed)
            if reason is None and row.held:
                reason = self._held_reason(row, "a row in the dead-letter table")
            if reason is not None:
                dead.append((row, reason))
                blocked[agg] = row.position
                continue
            if len(ok_topics) < 10000:  # a valid topic name is checked once (bounded memory)
                ok_topics.add(topic_of(row))
            good.append(row)
        return good, dead

    def _all_clean(self, rows: list[OutboxRow]) -> bool:
        """True when no row is poison or held and every row's topic was checked before (C-level passes only)."""
        if any(map(_HELD, rows)) or list(map(_POISON, rows)).count(None) != len(rows) or any(map(_ROW_TOPIC, rows)):
            return False
        ok_topics = self._topics_ok
        if self.topic:
            return self.topic in ok_topics
        return all(DEBEZIUM_TOPIC_PREFIX + t in ok_topics for t in set(map(_AGG_TYPE, rows)))

    @staticmethod
    def _held_reason(row: OutboxRow, behind: str) -> str:
        return (
            f"held: outbox row position={row.position} id={row.id} waits behind {behind} of aggregate "
            f"{row.aggregatetype}/{row.aggregateid} (per-aggregate order)"
        )

    def _dead_letter(self, lease: Lease, dead: list[tuple[OutboxRow, str]]) -> None:
        """Move rows to the dead-letter table (fenced), count and log each with its reason."""
        self.store.dead_letter(dead, name=self.name, token=lease.token)
        self.dead_lettered += len(dead)
        for _row, reason in dead:
            held = reason.startswith("held:")
            (self._m_dead_held if held else self._m_dead_poison).inc()
            log.log(logging.INFO if held else logging.ERROR, "outbox row moved to the dead-letter table: %s", reason)

    def _step_isolated(self) -> int:
        """Publish one batch row by row: a row Kafka refuses for good is dead-lettered, the others go out."""
        lease = self._current_lease()
        rows = self.store.fetch(self.batch_size)
        if not rows:
            self._isolate = False
            return 0
        good, dead = self._split(rows)
        if dead:
            self._dead_letter(lease, dead)
        blocked: dict[tuple[str, str], int] = {}
        done = len(dead)
        retain = self.retention_s is not None
        for row in good:
            agg = (row.aggregatetype, row.aggregateid)
            if agg in blocked:
                self._dead_letter(lease, [(row, self._held_reason(row, f"dead row position={blocked[agg]}"))])
                done += 1
                continue
            if self.publisher.mode != "transactional":  # the sink does not fence a former leader itself
                self.store.check_fence(self.name, lease.token)
            try:
                self.publisher.publish(list(record_tuples([row], self.topic)), still_leader=lambda: self.is_leader)
            except KconsError as exc:
                if not is_poison_record_error(exc):
                    raise
                kind = exc.name if isinstance(exc, KafkaOperationError) else type(exc).__name__
                reason = (
                    f"outbox row position={row.position} id={row.id}: the broker refused the record for good "
                    f"({kind}): {redact_text(str(exc))[:300]}"
                )
                self.publisher.reset()  # a refused record leaves the producer's sequence numbers behind
                self._dead_letter(lease, [(row, reason)])
                blocked[agg] = row.position
                done += 1
                continue
            self.store.mark_published([row], name=self.name, token=lease.token, retain=retain)
            self.published += 1
            self._m_published.inc()
            if self.on_published is not None:
                self.on_published([row], time.monotonic())
            done += 1
        self._isolate = False
        return done

    def _reset_pipeline(self) -> None:
        # Unmarked or prefetched rows are still unpublished in the database: the next read finds
        # them again (a published-but-unmarked batch is then published twice: at-least-once).
        self._next = None
        self._unmarked = None
        self.store.forget_position()

    def _step_once(self) -> int:
        lease = self._current_lease()
        started = time.monotonic()
        if self._next is None:
            rows = self.store.fetch(self.batch_size)
            fetched = time.monotonic()
        else:
            rows, fetched = self._next
            self._next = None
            if len(rows) < self.batch_size:
                # The prefetch was read before the previous batch went out; rows that committed
                # meanwhile (and during the pause between transactions) join this batch now
                # instead of one step later (latency at low rates).
                self.publisher.wait_txn_gap()
                in_flight = [r.position for r in rows] + [r.position for r in self._unmarked or ()]
                more = self.store.fetch(self.batch_size - len(rows), in_flight)
                if more:
                    rows = sorted(rows + more, key=lambda r: r.position)
        if rows:
            rows, dead = self._split(rows)
            if dead:  # before the next read is submitted: that read then sees the held aggregates
                self._dead_letter(lease, dead)
                if not rows:
                    self._mark_unmarked(lease)
                    return len(dead)
        if not rows:
            self._mark_unmarked(lease)  # drain the pipeline
            return 0
        if self.publisher.mode != "transactional":  # the sink does not fence a former leader itself
            self.store.check_fence(self.name, lease.token)
        # A generator: each record is built just before it is produced and freed right after, so a batch's
        # records never pile up as container objects for the garbage collector to walk.
        records = record_tuples(rows, self.topic)
        hook = self.before_commit
        # While this batch goes to Kafka, mark the previous one and read the next one (excluding
        # this batch's rows): database round trips overlap the wait for Kafka's acknowledgement.
        # The next batch is produced only after this one is acknowledged, so order is kept.
        # A store with a connection of its own for marking (``concurrent_mark``) marks the previous
        # batch while the next one is read: that read excludes both batches' rows, which may still
        # look unpublished to it.
        exclude = list(map(_POSITION, rows))
        background: list[futures.Future[Any]]
        if self._unmarked and getattr(self.store, "concurrent_mark", False):
            exclude += map(_POSITION, self._unmarked)
            background = [
                self._db_worker.submit(self._mark_unmarked, lease),
                self._db_worker.submit(self._fetch_next, exclude),
            ]
        else:
            background = [self._db_worker.submit(self._mark_then_fetch, lease, exclude)]
        try:
            self.publisher.publish(
                records,
                still_leader=lambda: self.is_leader,
                before_commit=(lambda: hook(rows)) if hook is not None else None,
            )
        finally:
            futures.wait(background)  # the connections must be idle before anything else uses them
        acked = time.monotonic()
        for done in background[:-1]:
            done.result()  # re-raises a failed mark
        self._next = background[-1].result()  # re-raises a failed mark or read
        self._unmarked = rows
        # One observation per batch, for its oldest row (the batch's worst latency): a per-row
        # histogram update would cost more than building the row's record.
        self._m_latency.observe(max(map(_AGE, rows)) + (acked - fetched))
        self._m_batch.observe(acked - started)
        if self.on_published is not None:
            self.on_published(rows, acked)
        return len(rows)

    def _mark_then_fetch(self, lease: Lease, exclude: list[int]) -> tuple[list[OutboxRow], float]:
        self._mark_unmarked(lease)
        return self._fetch_next(exclude)

    def _fetch_next(self, exclude: list[int]) -> tuple[list[OutboxRow], float]:
        return self.store.fetch(self.batch_size, exclude), time.monotonic()

    def _mark_unmarked(self, lease: Lease) -> None:
        rows = self._unmarked
        if not rows:
            return
        self.store.mark_published(rows, name=self.name, token=lease.token, retain=self.retention_s is not None)
        self._unmarked = None
        self.published += len(rows)
        self._m_published.inc(len(rows))

    def _record_retry(self, state: RetryCallState) -> None:
        exc = _failure(state)
        kind = type(exc).__name__ if exc is not None else "unknown"
        metrics.OUTBOX_ERRORS_TOTAL.labels(self.name, kind).inc()
        if isinstance(exc, SinkConnectionError):
            self._last_loop = time.monotonic()  # alive: waiting for the broker, not stuck
        log.warning("relay batch failed (%s: %s); retry %d", kind, redact_text(str(exc)), state.attempt_number)

    def _sleep(self, seconds: float) -> None:
        """The retries' sleep: cut short by :meth:`stop`."""
        self._stop.wait(seconds)

    def publish_once(self) -> int:
        """One pipeline step with retries: publish a batch (0 when there was none; then the previous
        batch is marked). Raises LeadershipLostError or, past the retry bound, the last error.

        An unreachable broker (:class:`~kcons.errors.SinkConnectionError`) is retried with the same
        backoff but no bound, for as long as this replica leads and is not stopped, and the bound
        for other failures counts from when it was reachable again: the rows of the unconfirmed
        batch stay unpublished and are sent again on the new connection.
        """
        retrying = Retrying(
            stop=_bounded_while_broker_up(self.retry_max_s) | _stop_set(self._stop),
            wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
            retry=retry_if_exception(_is_transient),
            before_sleep=self._record_retry,
            sleep=self._sleep,
            reraise=True,
        )
        return int(retrying(self._step))

    # ------------------------------------------------------------------------- main loop

    def run(self) -> None:
        """Lead or stand by until :meth:`stop`; raises when a batch keeps failing past the retry bound."""
        log.info("outbox relay %s (%s) starting", self.holder, self.lease_name)
        housekeeper = threading.Thread(target=self._housekeeping_loop, name="kcons-outbox-housekeeping", daemon=True)
        housekeeper.start()
        try:
            while not self._stop.is_set():
                self._last_loop = time.monotonic()
                if not self.is_leader:
                    if self._lease is not None:
                        self._step_down("lease expired or lost")
                    try:
                        led = self._try_lead()
                    except Exception as exc:
                        if not (_is_transient(exc) or isinstance(exc, LeadershipLostError)):
                            raise
                        log.warning("taking the lead failed (%s); will try again", type(exc).__name__)
                        led = False
                    if not led:
                        self._stop.wait(min(1.0, self.lease_ttl_s / 4))
                        continue
                try:
                    n = self.publish_once()
                except LeadershipLostError as exc:
                    self._step_down(str(exc))
                    continue
                except BaseException as exc:
                    if self._stop.is_set() and _is_transient(exc):  # stopped while retrying: not a failure
                        log.info("relay stopped while retrying (%s)", type(exc).__name__)
                        break
                    metrics.OUTBOX_ERRORS_TOTAL.labels(self.name, "gave_up").inc()
                    log.error("relay gives up after retrying for %.0fs: %s", self.retry_max_s, type(exc).__name__)
                    raise
                if n == 0:
                    self._wait_for_rows()
        finally:
            self._stop.set()
            housekeeper.join(15)
            self._shutdown()

    def _wait_for_rows(self) -> None:
        deadline = time.monotonic() + self.poll_interval_s
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self.store.wait_for_change(min(left, 0.25)):
                return

    def _housekeeping_loop(self) -> None:
        """Sample the backlog and purge expired published rows, in this thread, while leading."""
        last_purge = 0.0
        while not self._stop.wait(self.backlog_interval_s):
            if not self.is_leader:
                continue
            try:
                count, age = self.store.backlog()
            except Exception as exc:  # metrics must not stop publishing
                log.debug("backlog sample failed: %s", type(exc).__name__)
            else:
                self._m_backlog.set(count)
                self._m_age.set(age)
            now = time.monotonic()
            if self.retention_s is not None and now - last_purge >= 60.0:
                last_purge = now
                try:
                    purged = self.store.purge_published(self.retention_s)
                except Exception as exc:  # retried at the next interval
                    log.warning("purging published rows failed: %s", type(exc).__name__)
                else:
                    if purged:
                        log.info("purged %d published outbox rows", purged)

    def stop(self) -> None:
        """Ask the loop to finish its current batch, release the lease and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def _shutdown(self) -> None:
        if self._unmarked and self.is_leader:
            try:  # a graceful stop marks what Kafka acknowledged, so the next leader does not repeat it
                self._mark_unmarked(self._current_lease())
            except Exception as exc:  # the next leader republishes the batch: duplicates, not loss
                log.warning("marking the last batch on stop failed: %s", type(exc).__name__)
        if self._lease is not None:
            self._step_down("stopping")
        self._db_worker.shutdown(wait=True)
        self.publisher.close()
        self.store.close()
        log.info("outbox relay %s stopped after publishing %d rows", self.holder, self.published)

    def health(self) -> tuple[bool, str]:
        """Healthy while the loop turns; reports the role."""
        stalled = time.monotonic() - self._last_loop
        limit = max(self.retry_max_s, self.poll_interval_s, self.lease_ttl_s) + 30.0
        role = "leader" if self.is_leader else "standby"
        return stalled < limit, f"{role}, last loop {stalled:.1f}s ago, published {self.published}"
