"""Real Kafka, Redis and PostgreSQL for tests, benchmarks, fault runs and local development.

:func:`start_stack` returns the endpoints of the three services. For each one it uses, in
order: a running server named by ``KCONS_KAFKA_BOOTSTRAP`` / ``KCONS_REDIS_URL`` /
``KCONS_POSTGRES_DSN``; else a throwaway server started by the backend chosen with
``KCONS_TEST_BACKEND``: ``local`` (default: processes on 127.0.0.1 from the Kafka jars and
Debian's packages) or ``testcontainers`` (Docker). The pytest fixtures in
:mod:`kcons.testing.plugin` are built on the same functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from kcons.config import env_str
from kcons.errors import ConfigError

if TYPE_CHECKING:
    from kcons.testing.rocketmq import RocketMqServer

log = logging.getLogger(__name__)

__all__ = [
    "Stack",
    "backend",
    "running",
    "start_kafka",
    "start_postgres",
    "start_rabbitmq",
    "start_redis",
    "start_rocketmq",
    "start_stack",
    "wait_for",
]

BACKENDS = ("local", "testcontainers")


def backend(environ: Mapping[str, str] | None = None) -> str:
    """The configured backend, from ``KCONS_TEST_BACKEND`` (``local`` or ``testcontainers``)."""
    value = (env_str("KCONS_TEST_BACKEND", "local", environ) or "local").lower()
    if value not in BACKENDS:
        raise ConfigError("KCONS_TEST_BACKEND", f"expected one of {', '.join(BACKENDS)}, got {value!r}")
    return value


Closer = Callable[[], None]


def _noop() -> None:
    return None


def start_kafka(brokers: int = 1) -> tuple[str, Closer]:
    """Return ``(bootstrap, close)`` for Kafka: the configured one, or a new one."""
    existing = env_str("KCONS_KAFKA_BOOTSTRAP")
    if existing and brokers == 1:
        return existing, _noop
    if backend() == "testcontainers":
        if brokers != 1:
            raise ConfigError("KCONS_TEST_BACKEND", "the testcontainers backend runs a single broker only")
        from kcons.testing.containers import kafka_spec, start_container

        stop, endpoint = start_container(kafka_spec())
        return endpoint, stop
    from kcons.testing.local import KafkaCluster

    cluster = KafkaCluster(brokers).start()
    return cluster.bootstrap, cluster.close


def start_redis() -> tuple[str, Closer]:
    """Return ``(url, close)`` for Redis: the configured one, or a new one."""
    existing = env_str("KCONS_REDIS_URL")
    if existing:
        return existing, _noop
    if backend() == "testcontainers":
        from kcons.testing.containers import redis_spec, start_container

        stop, endpoint = start_container(redis_spec())
        return endpoint, stop
    from kcons.testing.local import RedisServer

    server = RedisServer().start()
    return server.url, server.close


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0, interval_s: float = 0.05) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval_s)


class _Runnable(Protocol):
    def run(self) -> None: ...

    def stop(self) -> None: ...


R = TypeVar("R", bound=_Runnable)


@contextlib.contextmanager
def running(service: R, errors: list[BaseException], *, join_s: float = 60.0) -> Iterator[R]:
    """Run ``service.run()`` on a thread for the ``with`` block, then ``stop()`` it and join.

    What ``run`` raised is appended to ``errors`` (checked by the caller, who may expect one);
    a service that does not stop within ``join_s`` fails with AssertionError.
    """

    def target() -> None:
        try:
            service.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"kcons-running-{type(service).__name__}", daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.stop()
        thread.join(join_s)
        if thread.is_alive():
            raise AssertionError(f"{type(service).__name__} did not stop within {join_s:.0f}s")


def start_rabbitmq() -> tuple[str, Closer]:
    """Return ``(amqp_url, close)`` for RabbitMQ: ``KCONS_AMQP_URL``, or a new local node."""
    existing = env_str("KCONS_AMQP_URL")
    if existing:
        return existing, _noop
    from kcons.testing.rabbitmq import RabbitMqServer

    server = RabbitMqServer().start()
    return server.url, server.close


def start_rocketmq() -> tuple[RocketMqServer, Closer]:
    """Return ``(server, close)``: a new local RocketMQ 5 name server, broker and proxy (local backend only).

    Tests create their topics and groups through the server (:meth:`RocketMqServer.create_topic`),
    so a running cluster named by a setting is not reused here.
    """
    from kcons.testing.rocketmq import RocketMqServer

    server = RocketMqServer().start()
    return server, server.close


def start_postgres(durable: bool = False) -> tuple[str, Closer]:
    """Return ``(dsn, close)`` for PostgreSQL: the configured one, or a new one."""
    existing = env_str("KCONS_POSTGRES_DSN")
    if existing:
        return existing, _noop
    if backend() == "testcontainers":
        from kcons.testing.containers import postgres_spec, start_container

        stop, endpoint = start_container(postgres_spec())
        return endpoint, stop
    from kcons.testing.local import PostgresServer

    server = PostgresServer(durable=durable).start()
    return server.dsn, server.close


@dataclass
class Stack:
    """Endpoints of the services a script uses; ``close()`` stops the ones it started."""

    kafka_bootstrap: str = ""
    redis_url: str = ""
    postgres_dsn: str = ""
    _closers: list[Closer] = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Stop every service this stack started, in reverse order."""
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # keep stopping the others
                log.exception("stopping a test service failed")

    def env(self) -> dict[str, str]:
        """The ``KCONS_*`` variables that point child processes at this stack."""
        out = {}
        if self.kafka_bootstrap:
            out["KCONS_KAFKA_BOOTSTRAP"] = self.kafka_bootstrap
        if self.redis_url:
            out["KCONS_REDIS_URL"] = self.redis_url
        if self.postgres_dsn:
            out["KCONS_POSTGRES_DSN"] = self.postgres_dsn
        return out


@contextlib.contextmanager
def start_stack(kafka: bool = True, redis: bool = True, postgres: bool = True, *, brokers: int = 1) -> Iterator[Stack]:
    """Start (or reuse, per ``KCONS_*``) the services asked for; stop the started ones at exit."""
    stack = Stack()
    try:
        if kafka:
            stack.kafka_bootstrap, close = start_kafka(brokers)
            stack._closers.append(close)
        if redis:
            stack.redis_url, close = start_redis()
            stack._closers.append(close)
        if postgres:
            stack.postgres_dsn, close = start_postgres()
            stack._closers.append(close)
        yield stack
    finally:
        stack.close()


def child_env(stack: Stack, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment plus the stack's ``KCONS_*`` variables, for subprocesses."""
    env = dict(os.environ)
    env.update(stack.env())
    env.update(extra or {})
    return env
