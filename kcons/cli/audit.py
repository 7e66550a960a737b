"""``kcons audit``: check a topic, an outbox table or a cache for lost, duplicated or stale data (read-only).

Exit status: 0 when nothing was found, 1 when a violation was found (or the read was
incomplete), 2 for bad usage or settings (click's usage error).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from kcons.errors import ConfigError, KconsError

log = logging.getLogger(__name__)

__all__ = ["audit_cli"]


def parse_time(setting: str, text: str | None) -> int | None:
    """Epoch milliseconds from an ISO 8601 time (UTC unless it says otherwise) or a number of epoch ms."""
    if text is None:
        return None
    value = text.strip()
    if value.isdigit():
        return int(value)
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(setting, f"expected an ISO 8601 time or epoch milliseconds, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _kafka_config(bootstrap: str | None) -> dict[str, Any]:
    from kcons.config import KafkaSettings

    if bootstrap:
        return KafkaSettings(bootstrap).client_config()
    return KafkaSettings.from_env().client_config()


@contextmanager
def _progress(show: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback drawing a bar on stderr, or None when not shown."""
    if not show:
        yield None
        return
    bar: Any = None
    done = 0

    def update(read: int, total: int) -> None:
        nonlocal bar, done
        if bar is None:
            bar = click.progressbar(length=max(total, 1), label="reading", file=sys.stderr, show_pos=True)
            bar.__enter__()
        bar.update(min(read, total) - done)
        done = min(read, total)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _fail(exc: KconsError) -> click.ClickException:
    """Bad settings: a usage error (exit status 2), so that it is never mistaken for a finding."""
    return click.UsageError(str(exc))


@click.group("audit")
def audit_cli() -> None:
    """Read-only checks of the guarantees on a running system (exit status 1 when a violation is found)."""


@audit_cli.command("topic")
@click.option("--topic", required=True, help="The topic to read.")
@click.option("--bootstrap", help="Kafka bootstrap (default: $KCONS_KAFKA_BOOTSTRAP; $KCONS_KAFKA_CONFIG applies).")
@click.option("--from-offset", type=click.IntRange(min=0), help="Start at this offset in every partition.")
@click.option("--from-time", help="Start at the first record at or after this time (ISO 8601 or epoch ms).")
@click.option("--to-offset", type=click.IntRange(min=0), help="Stop before this offset (default: the high watermark).")
@click.option("--to-time", help="Stop before the first record at or after this time.")
@click.option("--partition", "partitions", type=click.IntRange(min=0), multiple=True, help="Only this partition.")
@click.option(
    "--isolation", type=click.Choice(["read_committed", "read_uncommitted"]), default="read_committed",
    show_default=True, help="read_committed skips aborted transactions (what consumers see).",
)  # fmt: skip
@click.option(
    "--versions", type=click.Choice(["strict", "monotonic", "off"]), default="monotonic", show_default=True,
    help="strict: +1 per event (only if your writer increments by one); monotonic: must rise (the envelope's promise).",
)  # fmt: skip
@click.option("--max-listed", type=click.IntRange(min=0), default=20, show_default=True, help="Violations listed.")
@click.option("--max-rate", type=click.FloatRange(min=0), default=0.0, help="Records per second at most (0: no cap).")
@click.option("--idle-timeout", type=float, default=30.0, show_default=True, help="Seconds without data: give up.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a TTY).")
def topic_command(
    topic: str,
    bootstrap: str | None,
    from_offset: int | None,
    from_time: str | None,
    to_offset: int | None,
    to_time: str | None,
    partitions: tuple[int, ...],
    isolation: str,
    versions: str,
    max_listed: int,
    max_rate: float,
    idle_timeout: float,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Audit a range of a topic: duplicates by kcons-id, per-aggregate versions, aggregates split over partitions."""
    from kcons.audit.topic import audit_topic
    from kcons.kafka.reader import RangeSpec

    try:
        spec = RangeSpec(
            from_offset=from_offset,
            from_time_ms=parse_time("--from-time", from_time),
            to_offset=to_offset,
            to_time_ms=parse_time("--to-time", to_time),
            partitions=tuple(partitions) or None,
        )
        config = _kafka_config(bootstrap)
        show = sys.stderr.isatty() if progress is None else progress
        with _progress(show) as on_progress:
            report = audit_topic(
                config,
                topic,
                spec,
                isolation=isolation,
                versions=versions,
                max_listed=max_listed,
                idle_timeout_s=idle_timeout,
                progress=on_progress,
                max_rate=max_rate,
            )
    except ConfigError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(report.as_dict(), sort_keys=True))
    else:
        _print_topic(report)
    sys.exit(0 if report.ok else 1)


def _print_topic(report: Any) -> None:
    echo = click.echo
    echo(f"topic {report.topic}: {report.records} records in {report.seconds:.1f}s, versions: {report.versions}")
    echo(f"{'partition':>9} {'records':>10} {'ids':>10} {'dups':>6} {'regress':>7} {'gaps':>6} {'no-kcons':>8}")
    for p, s in report.partitions.items():
        echo(
            f"{p:>9} {s.records:>10} {s.distinct_ids:>10} {s.duplicates:>6} {s.regressions:>7} {s.gaps:>6}"
            f" {s.without_kcons_headers:>8}"
        )
    echo(
        f"{'total':>9} {report.records:>10} {report.distinct_ids:>10} {report.duplicates:>6} {report.regressions:>7}"
        f" {report.gaps:>6} {report.without_kcons_headers:>8}"
    )
    if report.without_version:
        echo(f"{report.without_version} events carry no kcons-version (not checked for order)")
    for dup in report.duplicate_list:
        copies = ", ".join(f"{p}@{o}" for p, o in dup.copies)
        echo(f"DUPLICATE {dup.id}: first {dup.first[0]}@{dup.first[1]}, again {copies}")
    for v in report.version_list:
        echo(f"VERSION {v.kind.upper()} {v.aggregate}: {v.previous} then {v.version} at {v.partition}@{v.offset}")
    for s in report.split_list:
        echo(f"SPLIT AGGREGATE {s.aggregate}: in partitions {s.partitions} (seen at {s.partition}@{s.offset})")
    if not report.complete:
        echo("INCOMPLETE: the read stopped before the end of the range (see ranges in --json)")
    echo("OK: no violation" if report.ok else f"FAILED: {report.violations} violations")


@audit_cli.command("outbox")
@click.option("--dsn", envvar="KCONS_POSTGRES_DSN", show_envvar=True, help="PostgreSQL DSN of the outbox database.")
@click.option("--sqlite", "sqlite_path", type=click.Path(dir_okay=False, exists=True), help="A SQLite outbox file.")
@click.option("--topic", required=True, help="The topic the relay publishes to.")
@click.option("--bootstrap", help="Kafka bootstrap (default: $KCONS_KAFKA_BOOTSTRAP; $KCONS_KAFKA_CONFIG applies).")
@click.option("--table", default="kcons_outbox", show_default=True, help="Outbox table.")
@click.option("--relay-topic", help="The relay's --topic, if it has one (rows without a topic of their own go there).")
@click.option("--grace", type=float, default=60.0, show_default=True, help="Seconds unpublished before stuck.")
@click.option(
    "--max-copies", type=click.IntRange(min=1), default=2, show_default=True,
    help="Copies of one id that at-least-once allows (1 + relay failures that hit the same in-flight batch).",
)  # fmt: skip
@click.option("--versions", type=click.Choice(["strict", "monotonic", "off"]), default="monotonic", show_default=True)
@click.option("--isolation", type=click.Choice(["read_committed", "read_uncommitted"]), default="read_committed")
@click.option("--max-listed", type=click.IntRange(min=0), default=20, show_default=True, help="Violations listed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def outbox_command(
    dsn: str | None,
    sqlite_path: str | None,
    topic: str,
    bootstrap: str | None,
    table: str,
    relay_topic: str | None,
    grace: float,
    max_copies: int,
    versions: str,
    isolation: str,
    max_listed: int,
    as_json: bool,
) -> None:
    """Compare the outbox table (retention on) with the topic: stuck rows, rows missing from Kafka, excess copies."""
    import sqlite3

    from kcons.audit.outbox import audit_outbox

    try:
        config = _kafka_config(bootstrap)
        if sqlite_path:
            conn: Any = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
        elif dsn:
            import psycopg

            conn = psycopg.connect(dsn, autocommit=True, options="-c default_transaction_read_only=on")
        else:
            raise ConfigError("--dsn", "give --dsn (or $KCONS_POSTGRES_DSN) or --sqlite")
        try:
            report = audit_outbox(
                conn, config, topic, table=table, relay_topic=relay_topic, grace_s=grace, max_copies=max_copies,
                versions=versions, isolation=isolation, max_listed=max_listed,
            )  # fmt: skip
        finally:
            conn.close()
    except ConfigError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(report.as_dict(), sort_keys=True))
    else:
        echo = click.echo
        echo(
            f"outbox {table} -> {topic}: {report.rows} rows ({report.published_rows} published, {report.in_flight} in"
            f" flight), {report.topic_records} records on the topic, versions: {report.versions}"
        )
        echo(
            f"stuck {report.stuck}, missing from topic {report.missing}, over {report.max_copies} copies"
            f" {report.excess_copies}, republished (allowed) {report.republished}, gaps {report.gaps},"
            f" regressions {report.regressions}, topic ids not in the table {report.not_in_table}"
        )
        for s in report.stuck_list:
            echo(f"STUCK {s['id']}: unpublished for {s['age_s']}s (position {s['position']})")
        for m in report.missing_list:
            echo(f"MISSING {m}: marked published, not on {topic}")
        for e in report.excess_list:
            echo(f"EXCESS COPIES {e['id']}: {e['copies']} on the topic")
        for v in report.version_list:
            echo(f"VERSION {v['kind'].upper()} {v['aggregate']}: {v['previous']} then {v['version']}"
                 f" (position {v['position']})")  # fmt: skip
        if not report.complete:
            echo("INCOMPLETE: the topic read stopped early")
        echo("OK: no violation" if report.ok else f"FAILED: {report.violations} violations")
    sys.exit(0 if report.ok else 1)


def _source(spec: str, dsn: str | None) -> Any:
    """A SourceVersion from ``--source``: SQL run on ``--dsn`` (one %s: the key), or module:function."""
    from kcons.audit.cache import sql_source
    from kcons.cli.cache import _import_function

    if " " in spec.strip():
        if not dsn:
            raise ConfigError("--dsn", "a SQL --source needs --dsn (or $KCONS_POSTGRES_DSN)")
        import psycopg

        conn = psycopg.connect(dsn, autocommit=True, options="-c default_transaction_read_only=on")
        return sql_source(conn, spec)
    return _import_function(spec, "--source")


@audit_cli.command("cache")
@click.option("--redis", "redis_url", envvar="KCONS_REDIS_URL", help="Redis URL of the cache ($KCONS_REDIS_URL).")
@click.option(
    "--source", required=True,
    help="The source's version of a key: SQL with one %s for the key (run on --dsn), or module:function(key).",
)  # fmt: skip
@click.option("--dsn", envvar="KCONS_POSTGRES_DSN", help="PostgreSQL DSN for a SQL --source ($KCONS_POSTGRES_DSN).")
@click.option("--prefix", envvar="KCONS_CACHE_PREFIX", default="kcons:cache", show_default=True, help="Cache prefix.")
@click.option("--name", envvar="KCONS_CACHE_NAME", default="default", show_default=True, help="Cache name (label).")
@click.option("--sample", type=click.IntRange(min=1), default=100, show_default=True, help="Keys per round.")
@click.option("--interval", type=float, default=10.0, show_default=True, help="Seconds between rounds.")
@click.option(
    "--lag-bound", type=float, default=10.0, show_default=True,
    help="Invalidation-lag bound: a mismatch is stale only if it outlives this many seconds.",
)  # fmt: skip
@click.option("--window", type=click.IntRange(min=1), default=10_000, show_default=True, help="Decisions in the ratio.")
@click.option("--rounds", type=click.IntRange(min=0), default=0, help="Stop after this many rounds (0: until SIGTERM).")
@click.option("--metrics-port", envvar="KCONS_METRICS_PORT", type=int, help="Serve /metrics on this port.")
@click.option("--metrics-host", envvar="KCONS_METRICS_HOST", default="127.0.0.1", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final report as one JSON object.")
def cache_command(
    redis_url: str | None,
    source: str,
    dsn: str | None,
    prefix: str,
    name: str,
    sample: int,
    interval: float,
    lag_bound: float,
    window: int,
    rounds: int,
    metrics_port: int | None,
    metrics_host: str,
    as_json: bool,
) -> None:
    """Sample cache keys continuously, compare cached and source versions, export the inconsistency ratio."""
    import redis

    from kcons.audit.cache import CacheAuditor
    from kcons.cli.signals import stop_on_signals
    from kcons.config import redact
    from kcons.metrics import MetricsServer

    try:
        if not redis_url:
            raise ConfigError("KCONS_REDIS_URL", "give --redis or set $KCONS_REDIS_URL")
        version_of = _source(source, dsn)
        try:
            client = redis.Redis.from_url(redis_url)
        except ValueError as exc:
            raise ConfigError("KCONS_REDIS_URL", f"not a Redis URL ({exc})") from None
        auditor = CacheAuditor(
            client, version_of, prefix=prefix, name=name, sample=sample, lag_bound_s=lag_bound, window=window
        )
    except ConfigError as exc:
        raise _fail(exc) from None
    server = MetricsServer(metrics_port, metrics_host) if metrics_port else None
    if server is not None:
        server.start()
    log.info("cache audit of %s (prefix %s) every %.1fs", redact(redis_url), prefix, interval)
    try:
        with stop_on_signals(auditor):
            report = auditor.run(interval, rounds)
    finally:
        if server is not None:
            server.stop()
        client.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), sort_keys=True))
    else:
        click.echo(
            f"cache {name}: {report.rounds} rounds, {report.checked} keys checked, {report.stale} stale"
            f" (ratio {report.ratio:.4f} over the last {window}), {report.suspects_pending} still within the bound"
        )
        for s in report.stale_list:
            click.echo(
                f"STALE {s.key}: cached version {s.cached_after}, source {s.source_first} then {s.source_after}"
            )
        click.echo("OK: no stale entry" if report.ok else f"FAILED: {report.stale} stale entries")
    sys.exit(0 if report.ok else 1)
