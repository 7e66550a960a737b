"""``kcons cache``: run the cache invalidator until SIGTERM/SIGINT, inspect a cache entry."""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import threading
from types import SimpleNamespace
from typing import Any

import click

from kcons.cache.cache import CacheSettings, ConsistentCache
from kcons.cache.events import KeysFor, key_template
from kcons.cache.invalidator import CacheInvalidator
from kcons.cache.model import Strategy
from kcons.cli import logs
from kcons.cli.errors import click_error
from kcons.cli.settings import PortSetting, start_metrics
from kcons.cli.signals import stop_on_signals
from kcons.errors import ConfigError
from kcons.runtime import freeze_startup_heap

log = logging.getLogger(__name__)

_TOPIC = re.compile(r"\A[A-Za-z0-9._-]{1,249}\Z")

_KEYS = "KCONS_CACHE_KEYS (--keys)"

__all__ = ["cache_cli", "invalidator_command", "peek_command"]


def _import_function(spec: str, setting: str = _KEYS) -> Any:
    """The callable named by ``module:function``; ConfigError naming ``setting`` when it is not one."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(setting, f"expected module:function, got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(setting, f"cannot import {spec!r}: {exc}") from None
    if not callable(target):
        raise ConfigError(setting, f"{spec!r} is not callable")
    return target


@click.group("cache")
def cache_cli() -> None:
    """Versioned Redis cache: run the invalidator, inspect entries."""


@cache_cli.command("invalidator")
@click.option(
    "--topic", "topics", multiple=True, help="Change-event topic (repeatable; or comma-separated $KCONS_CACHE_TOPICS)."
)
@click.option(
    "--group",
    envvar="KCONS_CACHE_GROUP", show_envvar=True,
    default="kcons-cache-invalidator",
    show_default=True,
    help="Kafka consumer group of the invalidator replicas ($KCONS_CACHE_GROUP).",
)
@click.option(
    "--keys", "keys_spec", envvar="KCONS_CACHE_KEYS", show_envvar=True,
    help="module:function mapping a ChangeEvent to its cache keys.",
)
@click.option("--key-template", "template", default="{aggregate_type}:{aggregate_id}", show_default=True)
@click.option(
    "--strategy",
    type=click.Choice([Strategy.VERSIONED_INVALIDATION.value, Strategy.WRITE_BEHIND.value]),
    default=Strategy.VERSIONED_INVALIDATION.value,
    show_default=True,
)
@click.option("--version-field", default="version", show_default=True, help="Debezium row column holding the version.")
@click.option(
    "--idempotent-consumer",
    "per_event",
    is_flag=True,
    help="Use the IdempotentConsumer loop (one round trip per event).",
)
@click.option("--name", envvar="KCONS_CACHE_NAME", show_envvar=True, default="default", show_default=True,
              help="Cache name: the label on its metrics (keys are namespaced by KCONS_CACHE_PREFIX).")  # fmt: skip
@click.option("--metrics-port", envvar="KCONS_METRICS_PORT", show_envvar=True, type=PortSetting("KCONS_METRICS_PORT"),
              help="Serve /metrics and /healthz on this port.")  # fmt: skip
@click.option("--metrics-host", envvar="KCONS_METRICS_HOST", show_envvar=True, default="127.0.0.1", show_default=True)
def invalidator_command(
    topics: tuple[str, ...],
    group: str,
    keys_spec: str | None,
    template: str,
    strategy: str,
    version_field: str,
    per_event: bool,
    name: str,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Apply change events to the cache until SIGTERM; settings from KCONS_KAFKA_*, KCONS_REDIS_*, KCONS_CACHE_*."""
    import os

    import redis

    from kcons.config import KafkaSettings, RedisSettings, check_host, check_identifier, redact
    from kcons.errors import KconsError

    topics_setting = "--topic" if topics else "KCONS_CACHE_TOPICS"
    if not topics:
        topics = tuple(t.strip() for t in os.environ.get("KCONS_CACHE_TOPICS", "").split(",") if t.strip())
    try:
        if not topics:
            raise ConfigError("KCONS_CACHE_TOPICS", "no change-event topic given (--topic or KCONS_CACHE_TOPICS)")
        for topic in topics:
            if _TOPIC.match(topic) is None:
                raise ConfigError(topics_setting, f"expected Kafka topic names [A-Za-z0-9._-]{{1,249}}, got {topic!r}")
        check_identifier("KCONS_CACHE_GROUP", group, kind="key", max_length=249)
        check_identifier("KCONS_CACHE_NAME", name, kind="key", max_length=100)
        check_host("KCONS_METRICS_HOST", metrics_host)
        kafka = KafkaSettings.from_env()
        redis_settings = RedisSettings.from_env()
        settings = CacheSettings.from_env()
        keys_for: KeysFor = _import_function(keys_spec) if keys_spec else key_template(template)
        server = None
        if metrics_port:
            server = start_metrics(
                metrics_port, metrics_host, port_setting="KCONS_METRICS_PORT", host_setting="KCONS_METRICS_HOST"
            )
    except KconsError as exc:
        raise click_error(exc) from None
    logs.add_context(group=group)
    client = redis.Redis.from_url(redis_settings.url, socket_timeout=redis_settings.socket_timeout_s)
    cache = ConsistentCache(client, name=name, settings=settings)
    inv = CacheInvalidator(cache, keys_for, strategy=Strategy(strategy), version_field=version_field)
    stop = threading.Event()

    def health() -> tuple[bool, str]:
        return (not stop.is_set(), f"redis {redact(redis_settings.url)}")

    if server is not None:
        server.add_health_check("invalidator", health)
    log.info(
        "cache invalidator on %s (group %s, %s)",
        ",".join(topics),
        group,
        "idempotent-consumer" if per_event else "batched",
    )
    freeze_startup_heap()  # no full collection walks the imports and clients mid-batch
    try:
        with stop_on_signals(SimpleNamespace(stop=stop.set)):
            inv.run(kafka.client_config(**{"group.id": group}), list(topics), stop=stop, batched=not per_event)
    except KconsError as exc:
        log.error("invalidator failed: %s", exc)
        sys.exit(1)
    finally:
        if server is not None:
            server.stop()
        client.close()


@cache_cli.command("peek")
@click.argument("key")
@click.option("--prefix", default=None, help="Key prefix (default: $KCONS_CACHE_PREFIX or kcons:cache).")
def peek_command(key: str, prefix: str | None) -> None:
    """Print what Redis holds for KEY: its version and whether it is a value or a tombstone."""
    import redis

    from kcons.cache.redis import RedisCacheBackend
    from kcons.config import RedisSettings, redact_text
    from kcons.errors import KconsError

    try:
        redis_settings = RedisSettings.from_env()
        settings = CacheSettings.from_env()
        if prefix is not None:
            settings = CacheSettings(prefix=prefix)
    except KconsError as exc:
        raise click_error(exc) from None
    client = redis.Redis.from_url(redis_settings.url, socket_timeout=redis_settings.socket_timeout_s)
    try:
        entry = RedisCacheBackend(client, prefix=settings.prefix).read(key)
    except redis.RedisError as exc:  # its text may quote the server's reply: redacted, one line
        raise click.ClickException(f"redis: {type(exc).__name__}: {redact_text(str(exc))}") from None
    finally:
        client.close()
    if entry is None:
        click.echo(json.dumps({"key": key, "present": False}))
    else:
        click.echo(
            json.dumps(
                {"key": key, "present": True, "version": entry.version, "tombstone": entry.is_tombstone,
                 "bytes": 0 if entry.value is None else len(entry.value)}
            )
        )  # fmt: skip
