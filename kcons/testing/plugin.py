"""pytest fixtures for real Kafka, Redis and PostgreSQL (registered as the ``kcons`` pytest11 plugin).

Installing kcons makes these fixtures available to any test suite. Each one is named with a
``kcons_`` prefix and depends only on other ``kcons_`` fixtures, so a suite's own fixtures
never change what kcons' fixtures use; the short names are aliases kept for convenience
(a suite that defines its own ``redis_url``, say, simply hides that alias):

* ``kcons_kafka_bootstrap``, ``kcons_redis_url``, ``kcons_postgres_dsn`` (aliases
  ``kafka_bootstrap``, ``redis_url``, ``postgres_dsn``): session-wide servers, started on first
  use by the backend ``KCONS_TEST_BACKEND`` names (``local`` processes or ``testcontainers``),
  or taken from ``KCONS_*``; a server that fails to start fails the test, never skips it.
* ``kcons_kafka_admin``, ``kcons_make_producer``, ``kcons_make_consumer``, ``kcons_unique_topic``
  (aliases without the prefix): clients and topics cleaned up after each test.
* ``kcons_redis_client``, ``kcons_fresh_database`` (aliases ``redis_client``, ``fresh_database``):
  a Redis client and a new PostgreSQL database per call.
* ``kcons_amqp_url`` (alias ``amqp_url``): a session-wide RabbitMQ node (``KCONS_AMQP_URL``, else
  a local ``rabbitmq-server`` process with the consistent-hash exchange plugin enabled).
* ``kcons_rocketmq`` (alias ``rocketmq``): a session-wide local RocketMQ 5 name server, broker and
  gRPC proxy (:class:`kcons.testing.rocketmq.RocketMqServer`: ``endpoints``, ``create_topic``,
  ``create_group``).
* ``kcons_kafka_cluster`` (alias ``kafka_cluster``): a local 3-broker KRaft cluster whose brokers
  can be killed and restarted (local backend only).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest

from kcons.testing import backend, start_kafka, start_postgres, start_rabbitmq, start_redis, start_rocketmq

__all__ = [
    "amqp_url",
    "create_topic",
    "fresh_database",
    "kafka_admin",
    "kafka_bootstrap",
    "kafka_cluster",
    "kcons_amqp_url",
    "kcons_fresh_database",
    "kcons_kafka_admin",
    "kcons_kafka_bootstrap",
    "kcons_kafka_cluster",
    "kcons_make_consumer",
    "kcons_make_producer",
    "kcons_postgres_dsn",
    "kcons_redis_client",
    "kcons_redis_url",
    "kcons_rocketmq",
    "kcons_unique_topic",
    "make_consumer",
    "make_producer",
    "postgres_dsn",
    "redis_client",
    "redis_url",
    "rocketmq",
    "unique_topic",
]


@pytest.fixture(scope="session")
def kcons_kafka_bootstrap() -> Iterator[str]:
    """bootstrap.servers of a Kafka broker for the whole session."""
    bootstrap, close = start_kafka()
    try:
        yield bootstrap
    finally:
        close()


@pytest.fixture(scope="session")
def kcons_redis_url() -> Iterator[str]:
    """URL of a Redis server for the whole session."""
    url, close = start_redis()
    try:
        yield url
    finally:
        close()


@pytest.fixture(scope="session")
def kcons_postgres_dsn() -> Iterator[str]:
    """DSN of a PostgreSQL superuser connection for the whole session."""
    dsn, close = start_postgres()
    try:
        yield dsn
    finally:
        close()


@pytest.fixture(scope="session")
def kcons_amqp_url() -> Iterator[str]:
    """amqp:// URL of a RabbitMQ node for the whole session."""
    url, close = start_rabbitmq()
    try:
        yield url
    finally:
        close()


@pytest.fixture(scope="session")
def kcons_rocketmq() -> Iterator[Any]:
    """A local RocketMQ 5 node (:class:`kcons.testing.rocketmq.RocketMqServer`) for the whole session."""
    server, close = start_rocketmq()
    try:
        yield server
    finally:
        close()


@pytest.fixture(scope="session")
def kcons_kafka_admin(kcons_kafka_bootstrap: str) -> Any:
    """A confluent-kafka AdminClient for the session broker."""
    from confluent_kafka.admin import AdminClient

    from kcons.kafka.client import with_logger

    return AdminClient(with_logger({"bootstrap.servers": kcons_kafka_bootstrap}))


def create_topic(
    admin: Any, name: str, partitions: int = 1, replication: int = -1, config: dict[str, str] | None = None
) -> str:
    """Create a topic and wait until its leaders are known."""
    import time

    from confluent_kafka.cimpl import NewTopic

    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=replication, config=config or {})],
        operation_timeout=30,
    )
    futures[name].result(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(name, timeout=5)
        topic = md.topics.get(name)
        if (
            topic is not None
            and topic.error is None
            and len(topic.partitions) == partitions
            and all(p.leader >= 0 for p in topic.partitions.values())
        ):
            return name
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} has no leaders after 30s")


@pytest.fixture
def kcons_unique_topic(kcons_kafka_admin: Any) -> Callable[..., str]:
    """Factory: ``unique_topic(partitions=1, config=None) -> name`` of a new topic."""

    def make(partitions: int = 1, config: dict[str, str] | None = None, prefix: str = "t") -> str:
        return create_topic(kcons_kafka_admin, f"{prefix}-{uuid.uuid4().hex[:12]}", partitions, config=config)

    return make


@pytest.fixture
def kcons_make_producer(kcons_kafka_bootstrap: str) -> Iterator[Callable[..., Any]]:
    """Factory: a confluent-kafka Producer with the given librdkafka overrides; flushed at teardown.

    Its librdkafka log lines go through ``logging`` (kcons.librdkafka) unless ``logger`` is overridden.
    """
    from confluent_kafka import Producer

    from kcons.kafka.client import with_logger

    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        config: dict[str, Any] = {"bootstrap.servers": kcons_kafka_bootstrap, "linger.ms": 5}
        config.update({k.replace("_", "."): v for k, v in overrides.items()})
        producer = Producer(with_logger(config))
        made.append(producer)
        return producer

    yield make
    for producer in made:
        producer.flush(10)


@pytest.fixture
def kcons_make_consumer(kcons_kafka_bootstrap: str) -> Iterator[Callable[..., Any]]:
    """Factory: a confluent-kafka Consumer (own group, from earliest); closed at teardown.

    Its librdkafka log lines go through ``logging`` (kcons.librdkafka) unless ``logger`` is overridden.
    """
    from confluent_kafka import Consumer

    from kcons.kafka.client import with_logger

    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        config: dict[str, Any] = {
            "bootstrap.servers": kcons_kafka_bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:12]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
        config.update({k.replace("_", "."): v for k, v in overrides.items()})
        consumer = Consumer(with_logger(config))
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        with contextlib.suppress(RuntimeError):  # already closed by the test
            consumer.close()


@pytest.fixture
def kcons_redis_client(kcons_redis_url: str) -> Iterator[Any]:
    """A redis-py client on the session server."""
    import redis

    client = redis.Redis.from_url(kcons_redis_url)
    yield client
    client.close()


@pytest.fixture
def kcons_fresh_database(kcons_postgres_dsn: str) -> Iterator[Callable[[], str]]:
    """Factory: create a new empty PostgreSQL database and return its DSN; dropped at teardown."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    created: list[str] = []

    def make() -> str:
        name = f"kcons_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(kcons_postgres_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        params = conninfo_to_dict(kcons_postgres_dsn)
        params["dbname"] = name
        return make_conninfo("", **params)

    yield make
    with psycopg.connect(kcons_postgres_dsn, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def kcons_kafka_cluster() -> Iterator[Any]:
    """A local 3-broker KRaft cluster (RF 3, min.insync.replicas 2) for failover tests."""
    if backend() != "local":
        pytest.skip("the 3-broker cluster needs KCONS_TEST_BACKEND=local (brokers are killed by pid)")
    from kcons.testing.local import KafkaCluster

    cluster = KafkaCluster(3).start()
    try:
        yield cluster
    finally:
        cluster.close()


# The short names: aliases of the kcons_ fixtures above (a suite's own fixture of the same name hides them).


def _alias(name: str, scope: Literal["session", "function"]) -> Any:
    """A fixture called ``name`` that returns the value of ``kcons_<name>``."""

    @pytest.fixture(scope=scope, name=name)
    def alias(request: pytest.FixtureRequest) -> Any:
        return request.getfixturevalue(f"kcons_{name}")

    alias.__doc__ = f"Alias of ``kcons_{name}``."
    return alias


kafka_bootstrap = _alias("kafka_bootstrap", "session")
redis_url = _alias("redis_url", "session")
postgres_dsn = _alias("postgres_dsn", "session")
amqp_url = _alias("amqp_url", "session")
rocketmq = _alias("rocketmq", "session")
kafka_admin = _alias("kafka_admin", "session")
kafka_cluster = _alias("kafka_cluster", "session")
unique_topic = _alias("unique_topic", "function")
make_producer = _alias("make_producer", "function")
make_consumer = _alias("make_consumer", "function")
redis_client = _alias("redis_client", "function")
fresh_database = _alias("fresh_database", "function")
