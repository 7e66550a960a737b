"""The testcontainers backend speaks the official images' interface, and says what to do without Docker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kcons.errors import ConfigError, ServiceStartError
from kcons.testing import backend
from kcons.testing.containers import (
    DEFAULT_KAFKA_IMAGE,
    DEFAULT_POSTGRES_IMAGE,
    DEFAULT_REDIS_IMAGE,
    kafka_spec,
    postgres_spec,
    property_env_name,
    redis_spec,
    start_container,
)

ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "images" / "kafka" / "entrypoint.sh"


def _properties(spec_env: dict[str, str]) -> dict[str, str]:
    """Invert the apache/kafka naming rule in Python: "___" -> "-", "__" -> "_", "_" -> "."."""
    out = {}
    for name, value in spec_env.items():
        if name.startswith("KAFKA_") and name != "KAFKA_HEAP_OPTS":
            key = name[6:].replace("___", "\x01").replace("__", "\x02").replace("_", ".")
            out[key.replace("\x01", "-").replace("\x02", "_").lower()] = value
    return out


def test_default_images_are_the_official_ones_running_the_local_backends_kafka() -> None:
    assert (DEFAULT_KAFKA_IMAGE, DEFAULT_REDIS_IMAGE, DEFAULT_POSTGRES_IMAGE) == (
        "apache/kafka:4.1.1", "redis:7.4", "postgres:16",
    )  # fmt: skip
    assert (kafka_spec({}).image, redis_spec({}).image, postgres_spec({}).image) == (
        DEFAULT_KAFKA_IMAGE, DEFAULT_REDIS_IMAGE, DEFAULT_POSTGRES_IMAGE,
    )  # fmt: skip


def test_kafka_container_is_one_kraft_node_with_transaction_log_sized_for_it() -> None:
    spec = kafka_spec({})
    props = _properties(dict(spec.env))
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@localhost:9094"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert spec.env["CLUSTER_ID"] and not spec.env["CLUSTER_ID"].startswith("-")
    env, endpoint = spec.render("127.0.0.1", 40001)
    assert "PLAINTEXT://127.0.0.1:40001" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert endpoint == "127.0.0.1:40001"
    assert spec.fixed_host_port


def test_property_names_follow_the_apache_kafka_image_rule() -> None:
    assert property_env_name("transaction.state.log.min.isr") == "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"
    assert property_env_name("some_prop-name.x") == "KAFKA_SOME__PROP___NAME_X"
    assert _properties({property_env_name("some_prop-name.x"): "v"}) == {"some_prop-name.x": "v"}


def test_local_kafka_image_entrypoint_turns_the_env_into_the_same_properties() -> None:
    spec = kafka_spec({})
    names = [n for n in spec.env if n.startswith("KAFKA_") and n != "KAFKA_HEAP_OPTS"] + ["KAFKA_SOME__PROP___NAME_X"]
    script = (
        f"source <(sed -n '/^to_property()/,/^}}/p' {ENTRYPOINT})\n"
        + "".join(f'to_property {n}; echo\n' for n in names)
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [*_properties({n: "" for n in names[:-1]}), "some_prop-name.x"]


def test_images_can_be_overridden() -> None:
    env = {"KCONS_TC_KAFKA_IMAGE": "k:1", "KCONS_TC_REDIS_IMAGE": "r:2", "KCONS_TC_POSTGRES_IMAGE": "p:3"}
    assert (kafka_spec(env).image, redis_spec(env).image, postgres_spec(env).image) == ("k:1", "r:2", "p:3")


def test_postgres_container_gets_a_fresh_password_that_is_not_in_its_repr() -> None:
    a, b = postgres_spec({}), postgres_spec({})
    assert a.env["POSTGRES_PASSWORD"] != b.env["POSTGRES_PASSWORD"]
    assert a.env["POSTGRES_PASSWORD"] not in repr(a)
    assert (a.env["POSTGRES_USER"], a.env["POSTGRES_DB"]) == ("kcons", "kcons")
    _, dsn = a.render("127.0.0.1", 5)
    assert dsn.startswith("postgresql://kcons:") and dsn.endswith("@127.0.0.1:5/kcons")


def test_redis_container_runs_without_persistence() -> None:
    command = list(redis_spec({}).command)
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "no"
    assert command[command.index("--save") + 1] == ""


def test_without_a_docker_daemon_the_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(ServiceStartError) as info:
        start_container(redis_spec({}), environ={})
    text = str(info.value)
    assert f"no Docker daemon at unix://{tmp_path}/no-docker.sock" in text
    assert "DOCKER_HOST" in text and "KCONS_TEST_BACKEND=local" in text


def test_a_bad_start_timeout_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        start_container(redis_spec({}), environ={"KCONS_TC_START_TIMEOUT": "soon"})
    assert info.value.setting == "KCONS_TC_START_TIMEOUT"


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
