"""The testcontainers backend is configured for transactions without needing Docker to build it."""

from __future__ import annotations

import pytest

from kcons.errors import ConfigError
from kcons.testing import backend
from kcons.testing.containers import kafka_spec, postgres_spec, redis_spec


def test_kafka_container_sizes_internal_topics_for_one_broker_and_enables_kraft() -> None:
    spec = kafka_spec({})
    assert spec.env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert spec.env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert spec.env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert spec.env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert spec.options["kraft"] is True


def test_images_can_be_overridden() -> None:
    env = {"KCONS_TC_KAFKA_IMAGE": "k:1", "KCONS_TC_REDIS_IMAGE": "r:2", "KCONS_TC_POSTGRES_IMAGE": "p:3"}
    assert (kafka_spec(env).image, redis_spec(env).image, postgres_spec(env).image) == ("k:1", "r:2", "p:3")


def test_postgres_container_gets_a_fresh_password_that_is_not_in_its_repr() -> None:
    a, b = postgres_spec({}), postgres_spec({})
    assert a.options["password"] != b.options["password"]
    assert a.options["password"] not in repr(a)


def test_backend_defaults_to_local_and_rejects_unknown_names() -> None:
    assert backend({}) == "local"
    assert backend({"KCONS_TEST_BACKEND": "TestContainers"}) == "testcontainers"
    with pytest.raises(ConfigError) as info:
        backend({"KCONS_TEST_BACKEND": "docker"})
    assert info.value.setting == "KCONS_TEST_BACKEND"


def test_local_kafka_cluster_ids_never_start_with_a_dash() -> None:
    from kcons.testing.local import _kafka_cluster_id

    ids = [_kafka_cluster_id() for _ in range(5000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)
