"""``kcons outbox``: apply the schema and run a relay replica (mounted under the ``kcons`` command)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click
from click.decorators import FC

from kcons.cli import logs
from kcons.cli.errors import click_error
from kcons.cli.settings import remember_file_secret, start_metrics
from kcons.cli.signals import stop_on_signals
from kcons.config import check_postgres_dsn, check_range, env_str, redact, redact_text
from kcons.errors import ConfigError, KconsError
from kcons.lease import LeaseBackend
from kcons.outbox.schema import DEFAULT_LOCK_TIMEOUT_S, DEFAULT_TABLE, SCHEMA_VERSION, install_schema, postgres_ddl
from kcons.runtime import freeze_startup_heap

log = logging.getLogger(__name__)

_POSITIVE = click.FloatRange(min=0, min_open=True)
_NON_NEGATIVE = click.FloatRange(min=0)


def _env_option(flag: str, envvar: str, **kwargs: Any) -> Callable[[FC], FC]:
    """A click option that falls back to ``envvar`` and says so in ``--help``."""
    return click.option(flag, envvar=envvar, show_envvar=True, **kwargs)


_DSN = _env_option("--dsn", "KCONS_POSTGRES_DSN", help="PostgreSQL DSN.")
_TABLE = _env_option("--table", "KCONS_OUTBOX_TABLE", help=f"Outbox table (default {DEFAULT_TABLE}).")


@click.group("outbox")
def outbox() -> None:
    """Transactional outbox: schema and relay."""


@outbox.command("init")
@_DSN
@click.option("--sqlite", "sqlite_path", type=click.Path(dir_okay=False), help="Create the schema in this SQLite file.")
@_TABLE
@click.option(
    "--print-sql", is_flag=True,
    help="Print the PostgreSQL DDL (for Alembic/Flyway migrations) instead of applying it.",
)  # fmt: skip
@click.option(
    "--lock-timeout", type=click.FloatRange(min=0.05, max=600), default=DEFAULT_LOCK_TIMEOUT_S,
    show_default=True, envvar="KCONS_OUTBOX_INIT_LOCK_TIMEOUT_S", show_envvar=True,
    help="Give up (exit 1, nothing changed) after waiting this many seconds for a lock.",
)  # fmt: skip
def init(dsn: str | None, sqlite_path: str | None, table: str | None, print_sql: bool, lock_timeout: float) -> None:
    """Create or upgrade the outbox schema; a no-op when the version recorded in the database is current.

    Safe as an init container on every relay start: the current-version check takes no lock on
    the outbox table, and an upgrade gives up after --lock-timeout rather than make the
    application's writers queue behind it.
    """
    name = table or env_str("KCONS_OUTBOX_TABLE", DEFAULT_TABLE) or DEFAULT_TABLE
    try:
        check_range("KCONS_OUTBOX_INIT_LOCK_TIMEOUT_S", lock_timeout, 0.05, 600.0)  # click's range lets nan through
        if print_sql:
            click.echo(postgres_ddl(name))
            return
        if sqlite_path:
            import sqlite3

            with sqlite3.connect(sqlite_path) as db:
                install_schema(db, name)
            click.echo(f"outbox schema ready in {sqlite_path} (table {name})")
            return
        target = dsn or env_str("KCONS_POSTGRES_DSN")
        if not target:
            raise click.UsageError("give --dsn or set KCONS_POSTGRES_DSN (or use --sqlite PATH)")
        check_postgres_dsn("--dsn" if dsn else "KCONS_POSTGRES_DSN", target)
        import psycopg

        with psycopg.connect(target, autocommit=True, application_name="kcons-outbox-init") as conn:
            applied = install_schema(conn, name, lock_timeout_s=lock_timeout)
        state = f"applied (version {SCHEMA_VERSION})" if applied else f"already current (version {SCHEMA_VERSION})"
        click.echo(f"outbox schema {state} in {redact(target)} (table {name})")
    except KconsError as exc:
        raise click_error(exc) from None


@outbox.command("relay")
@_DSN
@click.option(
    "--sqlite", "sqlite_path", type=click.Path(dir_okay=False, exists=True),
    help="Relay a SQLite outbox instead (embedded case: exactly one relay per file, no leader election).",
)  # fmt: skip
@click.option("--bootstrap", envvar="KCONS_KAFKA_BOOTSTRAP", show_envvar=True, help="Kafka bootstrap servers.")
@_TABLE
@_env_option("--name", "KCONS_OUTBOX_NAME", help="Relay group: replicas with the same name elect one leader.")
@_env_option("--topic", "KCONS_OUTBOX_TOPIC",
             help="Publish every row to this topic (default: the row's topic, else outbox.event.<type>).")
@_env_option("--mode", "KCONS_OUTBOX_MODE", type=click.Choice(["transactional", "idempotent"], case_sensitive=False),
             help="Kafka publishing mode (default transactional).")
@_env_option("--sink", "KCONS_OUTBOX_SINK", type=click.Choice(["kafka", "rabbitmq", "rocketmq"], case_sensitive=False),
             help="Where rows go (default kafka); rabbitmq reads $KCONS_AMQP_URL, rocketmq $KCONS_ROCKETMQ_ENDPOINTS.")
@_env_option("--batch-size", "KCONS_OUTBOX_BATCH_SIZE", type=click.IntRange(min=1),
             help="Rows per batch (default 1000).")
@_env_option("--poll-interval", "KCONS_OUTBOX_POLL_INTERVAL_S", type=_POSITIVE, help="Polling fallback in seconds.")
@_env_option("--retention", "KCONS_OUTBOX_RETENTION_S", type=_NON_NEGATIVE,
             help="Keep published rows this many seconds (default: delete them).")
@_env_option("--lease-ttl", "KCONS_OUTBOX_LEASE_TTL_S", type=_POSITIVE, help="Leader lease TTL, seconds (default 10).")
@_env_option("--metrics-port", "KCONS_OUTBOX_METRICS_PORT", type=click.IntRange(0, 65535),
             help="Serve /metrics and /healthz on this port (unset: $KCONS_METRICS_PORT, 0 there: off).")
@_env_option("--metrics-host", "KCONS_OUTBOX_METRICS_HOST", help="Address for /metrics (default 127.0.0.1).")
@_env_option("--lease-backend", "KCONS_OUTBOX_LEASE_BACKEND",
             type=click.Choice(["advisory", "raft"], case_sensitive=False),
             help="Leadership: PostgreSQL advisory lock (default) or a Raft lease.")
@_env_option("--raft-peers", "KCONS_RAFT_PEERS", help="Raft nodes id=host:port,... for --lease-backend raft.")
@click.option(
    "--raft-secret-file", type=click.Path(dir_okay=False, exists=True),
    help="Raft cluster secret (default: $KCONS_RAFT_SECRET).",
)  # fmt: skip
def relay(
    dsn: str | None,
    sqlite_path: str | None,
    bootstrap: str | None,
    table: str | None,
    name: str | None,
    topic: str | None,
    mode: str | None,
    sink: str | None,
    batch_size: int | None,
    poll_interval: float | None,
    retention: float | None,
    lease_ttl: float | None,
    metrics_port: int | None,
    metrics_host: str | None,
    lease_backend: str | None,
    raft_peers: str | None,
    raft_secret_file: str | None,
) -> None:
    """Run one relay replica until SIGTERM/SIGINT (finishes its batch, releases the lease)."""
    from kcons.outbox.relay import OutboxRelay, RelaySettings

    try:
        settings = RelaySettings.from_env(
            dsn=dsn or ("sqlite" if sqlite_path else None),
            bootstrap=bootstrap,
            table=table,
            name=name,
            topic=topic,
            mode=mode,
            sink=sink,
            batch_size=batch_size,
            poll_interval_s=poll_interval,
            retention_s=retention,
            lease_ttl_s=lease_ttl,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
        )
        if sqlite_path and (settings.sink != "kafka" or settings.kafka is None):
            raise ConfigError("KCONS_OUTBOX_SINK", "a SQLite outbox is relayed to Kafka only")
        leases = None if sqlite_path else _lease_backend(lease_backend, raft_peers, raft_secret_file)
    except KconsError as exc:
        raise click_error(exc) from None
    logs.add_context(relay=settings.name)
    server = None
    if settings.metrics_port is not None:  # bound before anything connects, so a bad address fails first
        explicit = metrics_port is not None or env_str("KCONS_OUTBOX_METRICS_PORT") is not None
        try:
            server = start_metrics(
                settings.metrics_port,
                settings.metrics_host,
                port_setting="KCONS_OUTBOX_METRICS_PORT" if explicit else "KCONS_METRICS_PORT",
                host_setting="KCONS_OUTBOX_METRICS_HOST" if explicit else "KCONS_METRICS_HOST",
            )
        except KconsError as exc:
            raise click_error(exc) from None
    if sqlite_path:
        assert settings.kafka is not None  # checked above
        runner = OutboxRelay.for_sqlite(
            sqlite_path,
            settings.kafka,
            table=settings.table,
            topic=settings.topic,
            mode=settings.mode if mode else "idempotent",
            batch_size=settings.batch_size,
            retention_s=settings.retention_s,
        )
    else:
        runner = OutboxRelay.for_postgres(settings, leases=leases)
    if server is not None:
        server.add_health_check("relay", runner.health)
    log.info("relay %r", settings)
    freeze_startup_heap()  # no full collection walks the imports and clients mid-batch
    try:
        with stop_on_signals(runner):
            runner.run()
    except Exception as exc:  # retries exhausted: exit non-zero so the supervisor restarts it
        log.error("relay failed after its retries: %s: %s", type(exc).__name__, redact_text(str(exc)))
        sys.exit(1)
    finally:
        if server is not None:
            server.stop()


def _lease_backend(choice: str | None, raft_peers: str | None, raft_secret_file: str | None) -> LeaseBackend | None:
    """None for the default advisory-lock backend, else a Raft lease backend from flags or ``KCONS_*``."""
    name = choice or env_str("KCONS_OUTBOX_LEASE_BACKEND", "advisory") or "advisory"
    if name == "advisory":
        return None
    if name != "raft":
        raise ConfigError("KCONS_OUTBOX_LEASE_BACKEND", f"expected advisory or raft, got {name!r}")
    from kcons.adapters.raft import RaftLeaseBackend
    from kcons.raft.client import RaftClient

    remember_file_secret(raft_secret_file)
    peers = raft_peers or env_str("KCONS_RAFT_PEERS")
    if not peers:
        raise ConfigError("KCONS_RAFT_PEERS", "is required with the raft lease backend (id=host:port,...)")
    return RaftLeaseBackend(RaftClient.from_env(peers, raft_secret_file))  # the secret, and TLS when configured


@outbox.command("purge")
@_DSN
@_TABLE
@click.option("--older-than", type=_NON_NEGATIVE, required=True, help="Delete rows published this many seconds ago.")
def purge(dsn: str | None, table: str | None, older_than: float) -> None:
    """Delete published rows past their retention (retention mode); unpublished rows are never touched."""
    from kcons.adapters.postgres import PostgresOutboxStore

    name = table or env_str("KCONS_OUTBOX_TABLE", DEFAULT_TABLE) or DEFAULT_TABLE
    target = dsn or env_str("KCONS_POSTGRES_DSN")
    if not target:
        raise click.UsageError("give --dsn or set KCONS_POSTGRES_DSN")
    try:
        check_range("--older-than", older_than, 0.0, 10 * 365 * 86400.0)
        check_postgres_dsn("--dsn" if dsn else "KCONS_POSTGRES_DSN", target)
        store = PostgresOutboxStore(target, name, application_name="kcons-outbox-purge")
    except KconsError as exc:
        raise click_error(exc) from None
    total = 0
    try:
        while True:
            n = store.purge_published(older_than)
            total += n
            if n == 0:
                break
    finally:
        store.close()
    click.echo(f"purged {total} published rows from {name}")



@outbox.group("dead")
def dead() -> None:
    """The dead-letter table ``<table>_dead``: rows the relay could not publish, and the rows held behind them.

    A poison row (headers that are not a JSON object, a topic name Kafka refuses, a record too
    large for its topic, ...) is moved there with its reason, and so is every later row of its
    aggregate (reason ``held: ...``), so the aggregate's order is kept while the relay goes on
    with the others. Fix the cause (for example raise the topic's max.message.bytes, or correct
    the dead row with SQL), then ``retry`` or ``drop``: either puts the aggregate's dead rows back
    into the outbox at their original positions, and the relay publishes them in order.
    """


def _dead_store(dsn: str | None, sqlite_path: str | None, table: str | None) -> Any:
    name = table or env_str("KCONS_OUTBOX_TABLE", DEFAULT_TABLE) or DEFAULT_TABLE
    if sqlite_path:
        from kcons.adapters.sqlite import SqliteOutboxStore

        return SqliteOutboxStore(sqlite_path, name)
    from kcons.adapters.postgres import PostgresOutboxStore

    target = dsn or env_str("KCONS_POSTGRES_DSN")
    if not target:
        raise click.UsageError("give --dsn or set KCONS_POSTGRES_DSN (or use --sqlite PATH)")
    check_postgres_dsn("--dsn" if dsn else "KCONS_POSTGRES_DSN", target)
    return PostgresOutboxStore(target, name, application_name="kcons-outbox-dead")


_DEAD_OPTIONS = [
    click.option("--dsn", help="PostgreSQL DSN (default: $KCONS_POSTGRES_DSN)."),
    click.option("--sqlite", "sqlite_path", type=click.Path(dir_okay=False, exists=True), help="A SQLite outbox."),
    click.option("--table", default=None, help=f"Outbox table (default: $KCONS_OUTBOX_TABLE or {DEFAULT_TABLE})."),
]


def _dead_options(fn: Any) -> Any:
    for option in reversed(_DEAD_OPTIONS):
        fn = option(fn)
    return fn


@dead.command("list")
@_dead_options
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
def dead_list(dsn: str | None, sqlite_path: str | None, table: str | None, limit: int) -> None:
    """Print the dead rows, lowest position first, one JSON object per line (the payload's size, not its bytes)."""
    import json

    try:
        store = _dead_store(dsn, sqlite_path, table)
        try:
            for row in store.dead_rows(limit):
                click.echo(json.dumps(row, default=str))
        finally:
            store.close()
    except KconsError as exc:
        raise click_error(exc) from None


def _resolve(dsn: str | None, sqlite_path: str | None, table: str | None, position: int, drop: bool) -> None:
    try:
        store = _dead_store(dsn, sqlite_path, table)
        try:
            n = store.resolve_dead(position, drop=drop)
        finally:
            store.close()
    except KconsError as exc:
        raise click_error(exc) from None
    what = "dropped the row and put" if drop else "put"
    click.echo(f"{what} {n} row(s) of its aggregate back into the outbox (original positions)")


@dead.command("retry")
@_dead_options
@click.argument("position", type=int)
def dead_retry(dsn: str | None, sqlite_path: str | None, table: str | None, position: int) -> None:
    """Put the dead row at POSITION and the rows held behind it back into the outbox, in order."""
    _resolve(dsn, sqlite_path, table, position, drop=False)


@dead.command("drop")
@_dead_options
@click.argument("position", type=int)
def dead_drop(dsn: str | None, sqlite_path: str | None, table: str | None, position: int) -> None:
    """Delete the dead row at POSITION for good and put the rows held behind it back into the outbox."""
    _resolve(dsn, sqlite_path, table, position, drop=True)
