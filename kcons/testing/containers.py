"""The testcontainers backend: Kafka, Redis and PostgreSQL in Docker, for users who have it.

The configuration of each container is built as a plain :class:`ContainerSpec` (image,
environment), which needs no Docker engine and is unit-tested; :func:`start_container`
turns a spec into a running testcontainers object and returns its endpoint. Images can be
overridden with ``KCONS_TC_KAFKA_IMAGE``, ``KCONS_TC_REDIS_IMAGE``, ``KCONS_TC_POSTGRES_IMAGE``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kcons.errors import ServiceStartError

__all__ = ["ContainerSpec", "kafka_spec", "postgres_spec", "redis_spec", "start_container"]

DEFAULT_KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
DEFAULT_REDIS_IMAGE = "redis:7.4"
DEFAULT_POSTGRES_IMAGE = "postgres:16"


@dataclass(frozen=True)
class ContainerSpec:
    """What to run: the service kind, the image, its environment and options."""

    kind: str
    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        safe = {k: ("***" if "PASSWORD" in k else v) for k, v in self.env.items()}
        opts = {k: ("***" if "password" in k else v) for k, v in self.options.items()}
        return f"ContainerSpec(kind={self.kind!r}, image={self.image!r}, env={safe!r}, options={opts!r})"


def kafka_spec(environ: Mapping[str, str] | None = None) -> ContainerSpec:
    """A single KRaft broker with the internal topics sized for one node and transactions enabled."""
    env = os.environ if environ is None else environ
    return ContainerSpec(
        kind="kafka",
        image=env.get("KCONS_TC_KAFKA_IMAGE") or DEFAULT_KAFKA_IMAGE,
        env={
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
            "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
        },
        options={"kraft": True},
    )


def redis_spec(environ: Mapping[str, str] | None = None) -> ContainerSpec:
    """A Redis server with persistence off."""
    env = os.environ if environ is None else environ
    return ContainerSpec(kind="redis", image=env.get("KCONS_TC_REDIS_IMAGE") or DEFAULT_REDIS_IMAGE)


def postgres_spec(environ: Mapping[str, str] | None = None) -> ContainerSpec:
    """A PostgreSQL server with a fresh random password for user ``kcons``."""
    env = os.environ if environ is None else environ
    return ContainerSpec(
        kind="postgres",
        image=env.get("KCONS_TC_POSTGRES_IMAGE") or DEFAULT_POSTGRES_IMAGE,
        options={"username": "kcons", "password": secrets.token_urlsafe(16), "dbname": "kcons"},
    )


def _start_kafka(spec: ContainerSpec) -> tuple[Any, str]:
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer(spec.image)
    for k, v in spec.env.items():
        container.with_env(k, v)
    if spec.options.get("kraft"):
        container = container.with_kraft()
    container.start()
    return container, str(container.get_bootstrap_server())


def _start_redis(spec: ContainerSpec) -> tuple[Any, str]:
    from testcontainers.redis import RedisContainer

    container = RedisContainer(spec.image)
    container.start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    return container, f"redis://{host}:{port}/0"


def _start_postgres(spec: ContainerSpec) -> tuple[Any, str]:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(
        spec.image,
        username=spec.options["username"],
        password=spec.options["password"],
        dbname=spec.options["dbname"],
        driver=None,
    )
    container.start()
    return container, str(container.get_connection_url())


_STARTERS: dict[str, Callable[[ContainerSpec], tuple[Any, str]]] = {
    "kafka": _start_kafka,
    "redis": _start_redis,
    "postgres": _start_postgres,
}


def start_container(spec: ContainerSpec) -> tuple[Callable[[], None], str]:
    """Start the container for ``spec``; return ``(stop, endpoint)``. Needs a Docker engine."""
    try:
        container, endpoint = _STARTERS[spec.kind](spec)
    except ImportError as exc:
        raise ServiceStartError(
            "the testcontainers backend needs the [testcontainers] extra: pip install 'kcons[testcontainers]'"
        ) from exc
    except ServiceStartError:
        raise
    except Exception as exc:  # docker errors come in many types
        raise ServiceStartError(f"could not start the {spec.kind} container ({spec.image}): {exc}") from exc
    return container.stop, endpoint
