"""Every ``KCONS_*`` setting: each bad value ends the ``kcons`` command with one line naming the setting.

One table covers every variable that ``kcons/``, ``README.md`` and ``deploy/`` mention. A setting
is either driven through the command that reads it (bad value -> ConfigError -> ``Error: invalid
setting NAME: ...``, or click's ``(env var: 'NAME')`` for an option it reads, on one line, exit
status non-zero, no traceback) or listed as exempt with the
reason. A new ``KCONS_*`` name that is in neither fails the coverage test.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from kcons.cli import main

ROOT = Path(__file__).resolve().parents[2]
SECRET = "x" * 40

RELAY = ["outbox", "relay"]
RELAY_ENV = {"KCONS_POSTGRES_DSN": "postgresql://app:pw@127.0.0.1:1/shop", "KCONS_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
AMQP_ENV = {**RELAY_ENV, "KCONS_OUTBOX_SINK": "rabbitmq"}
ROCKETMQ_ENV = {**RELAY_ENV, "KCONS_OUTBOX_SINK": "rocketmq"}
PEEK = ["cache", "peek", "k"]
PEEK_ENV = {"KCONS_REDIS_URL": "redis://127.0.0.1:1/0"}
INVALIDATOR = ["cache", "invalidator"]
INVALIDATOR_ENV = {**PEEK_ENV, "KCONS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "KCONS_CACHE_TOPICS": "orders"}
SERVE = ["raft", "serve", "--id", "1", "--data-dir", "{tmp}"]
SERVE_ENV = {"KCONS_RAFT_PEERS": "1=127.0.0.1:1", "KCONS_RAFT_SECRET": SECRET}
GET = ["raft", "get", "k"]
#: A readable CA file, so that the certificate or key is the first thing wrong.
TLS_SERVE_ENV = {**SERVE_ENV, "KCONS_RAFT_TLS_CA": __file__}
NAN = ["nan", "inf", "-inf", "NaN"]


@dataclass(frozen=True)
class Row:
    """A setting, the values it must refuse, the command that reads it and the valid rest of the environment."""

    setting: str
    bad: list[str]
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


TABLE = [
    Row("KCONS_KAFKA_BOOTSTRAP", ["localhost", "h:70000", "h:abc", "h:0"], RELAY, RELAY_ENV),
    Row("KCONS_KAFKA_CONFIG", ["not json", "[1, 2]", '"x"', '{"": 1}'], RELAY, RELAY_ENV),
    Row("KCONS_REDIS_URL", ["redis://h:abc/0", "redis://h:70000/0", "http://h/0", "redis://:p#w@h/0"], PEEK),
    Row("KCONS_REDIS_TIMEOUT_S", [*NAN, "0", "-1", "abc"], PEEK, PEEK_ENV),
    Row(
        "KCONS_POSTGRES_DSN",
        ["mysql://h/db", "nonsense", "postgresql://u:p@h:abc/db", "host=h port=99999", "postgresql://u:p#w@h/db"],
        RELAY,
        {"KCONS_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
    ),
    Row("KCONS_OUTBOX_TABLE", ["bad-name", "x;drop table y", "1abc"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_NAME", ["has space", "a" * 101, "a:b", "é"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_TOPIC", ["bad topic", "a" * 250, "a/b"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_MODE", ["exactly-once"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_BATCH_SIZE", ["0", "abc", "1e3", "100000"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_POLL_INTERVAL_S", [*NAN, "0", "-1", "x"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_RETENTION_S", [*NAN, "-1", "x"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_LEASE_TTL_S", [*NAN, "0.5", "x"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_ACK_TIMEOUT_S", [*NAN, "0", "x"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_RETRY_MAX_S", [*NAN, "-1", "x"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_HOLDER", ["a b", "a/b"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_LEASE_BACKEND", ["zookeeper"], RELAY, RELAY_ENV),
    Row("KCONS_OUTBOX_METRICS_PORT", ["70000", "-1", "abc"], RELAY, RELAY_ENV),
    Row(
        "KCONS_OUTBOX_METRICS_HOST",
        ["bad host", "-x", "203.0.113.7"],
        RELAY,
        {**RELAY_ENV, "KCONS_OUTBOX_METRICS_PORT": "0"},
    ),
    Row("KCONS_METRICS_PORT", ["70000", "-1", "abc"], RELAY, RELAY_ENV),
    Row("KCONS_METRICS_PORT", ["70000", "-1", "abc"], INVALIDATOR, INVALIDATOR_ENV),
    Row("KCONS_METRICS_HOST", ["bad host", "203.0.113.7"], RELAY, {**RELAY_ENV, "KCONS_METRICS_PORT": "1"}),
    Row("KCONS_METRICS_HOST", ["bad host", "203.0.113.7"], INVALIDATOR, {**INVALIDATOR_ENV, "KCONS_METRICS_PORT": "1"}),
    Row("KCONS_METRICS_HOST", ["bad host"], [*SERVE, "--metrics-port", "0"], SERVE_ENV),
    Row("KCONS_CACHE_TOPICS", ["bad topic", ",", "a/b"], INVALIDATOR, {**PEEK_ENV, "KCONS_KAFKA_BOOTSTRAP": "h:1"}),
    Row("KCONS_CACHE_GROUP", [" ", "a b", "x" * 300], INVALIDATOR, INVALIDATOR_ENV),
    Row("KCONS_CACHE_KEYS", ["nomodule", "no.such:f", "json:nosuch", "json:__doc__"], INVALIDATOR, INVALIDATOR_ENV),
    Row("KCONS_CACHE_NAME", ["a b", "{x}"], INVALIDATOR, INVALIDATOR_ENV),
    Row("KCONS_CACHE_PREFIX", ["a b", "{x}", "a\tb"], PEEK, PEEK_ENV),
    Row("KCONS_CACHE_VALUE_TTL_S", [*NAN, "0", "x"], PEEK, PEEK_ENV),
    Row("KCONS_CACHE_TOMBSTONE_TTL_S", [*NAN, "0", "1"], PEEK, PEEK_ENV),
    Row("KCONS_CACHE_LEASE_TTL_S", [*NAN, "0", "x"], PEEK, PEEK_ENV),
    Row("KCONS_CACHE_LEASE_WAIT_S", [*NAN, "-1", "x"], PEEK, PEEK_ENV),
    Row("KCONS_CACHE_LEASE_POLL_S", [*NAN, "0", "x"], PEEK, PEEK_ENV),
    Row("KCONS_RAFT_SECRET", ["short"], GET, {"KCONS_RAFT_PEERS": "1=127.0.0.1:1"}),
    Row("KCONS_RAFT_SECRET", ["short"], SERVE, {"KCONS_RAFT_PEERS": "1=127.0.0.1:1"}),
    Row("KCONS_RAFT_PEERS", ["garbage", "1=h:70000", "0=h:1", "1=h:abc"], GET, {"KCONS_RAFT_SECRET": SECRET}),
    Row("KCONS_RAFT_PEERS", ["garbage", "1=h:70000"], SERVE, {"KCONS_RAFT_SECRET": SECRET}),
    Row("KCONS_RAFT_LISTEN", ["nohost", "h:abc", "h:70000", "bad host:1", "203.0.113.7:7000"], SERVE, SERVE_ENV),
    Row("KCONS_RAFT_TICK_MS", ["0", "abc", "nan", "100000"], SERVE, SERVE_ENV),
    Row("KCONS_RAFT_ELECTION_TICKS", ["1", "abc"], SERVE, SERVE_ENV),
    Row("KCONS_RAFT_FSYNC", ["maybe"], SERVE, SERVE_ENV),
    Row("KCONS_RAFT_SNAPSHOT_EVERY", ["1", "abc"], SERVE, SERVE_ENV),
    Row("KCONS_RAFT_MAX_CONNECTIONS", ["1", "abc"], SERVE, SERVE_ENV),
    Row("KCONS_RAFT_IDLE_TIMEOUT_S", ["0", "abc", "nan"], SERVE, SERVE_ENV),
    Row("KCONS_LOG_LEVEL", ["LOUD", "-3x"], PEEK, PEEK_ENV),
    Row("KCONS_LOG_FORMAT", ["xml"], PEEK, PEEK_ENV),
    Row("KCONS_OUTBOX_INIT_LOCK_TIMEOUT_S", [*NAN, "0", "abc"], ["outbox", "init"], RELAY_ENV),
    Row("KCONS_OUTBOX_SINK", ["smtp"], RELAY, RELAY_ENV),
    Row("KCONS_AMQP_URL", ["http://h/", "amqp://u:p#w@h/", "amqp://h:abc/", "amqp://h:70000/"], RELAY, AMQP_ENV),
    Row("KCONS_AMQP_EXCHANGE", ["a b", "x" * 300], RELAY, {**AMQP_ENV, "KCONS_AMQP_URL": "amqp://u:p@127.0.0.1:1/"}),
    Row("KCONS_ROCKETMQ_ENDPOINTS", ["", ";", "nohost", "h:abc", "h:70000", "h:1;bad host:2"], RELAY, ROCKETMQ_ENV),
    Row("KCONS_RAFT_TLS_CA", ["/nonexistent/ca.pem"], GET, {"KCONS_RAFT_PEERS": "1=h:1", "KCONS_RAFT_SECRET": SECRET}),
    Row("KCONS_RAFT_TLS_CERT", ["/nonexistent/cert.pem", "/"], SERVE, TLS_SERVE_ENV),
    Row("KCONS_RAFT_TLS_KEY", ["/nonexistent/key.pem", "/"], SERVE, TLS_SERVE_ENV),
]

#: Names that are not settings of the kcons library or command, with the reason.
EXEMPT = {
    "KCONS_POSTGRES_POOL_MIN": "no longer read (named in the README's upgrade notes only)",
    "KCONS_POSTGRES_POOL_MAX": "no longer read (named in the README's upgrade notes only)",
    "KCONS_TEST_BACKEND": "test harness (kcons.testing), read by the pytest plugin only",
    "KCONS_PURE_PYTHON": "read at import by kcons._native (a boolean; true: the Python code); no command",
    "KCONS_TC_KAFKA_IMAGE": "test harness: testcontainers image",
    "KCONS_TC_REDIS_IMAGE": "test harness: testcontainers image",
    "KCONS_TC_POSTGRES_IMAGE": "test harness: testcontainers image",
    "KCONS_TC_START_TIMEOUT": "test harness: testcontainers timeout (env_float: refuses nan)",
    "KCONS_TC_PULL_TIMEOUT": "test harness: testcontainers timeout (env_float: refuses nan)",
    "KCONS_KAFKA_POM": "local harness: where kcons dev finds the broker's Maven pom",
    "KCONS_KAFKA_JARS": "local harness: where kcons dev finds the broker's jars",
    "KCONS_POSTGRES_BIN": "local harness: PostgreSQL binaries for kcons dev",
    "KCONS_RABBITMQ_BIN": "local harness: RabbitMQ binaries for the test services",
    "KCONS_ROCKETMQ_JARS": "local harness: RocketMQ jars for the test services",
    "KCONS_SETUP_EXTRAS": "local harness: what kcons dev setup installs",
    "KCONS_CACHE_DIR": "local harness: download cache of kcons dev (any directory)",
    "KCONS_STATE_DIR": "local harness: where kcons dev records the stack (any directory)",
    "KCONS_IMAGE": "deploy/compose.yaml variable, read by docker compose, not by kcons",
    "KCONS_TOPICS": "deploy/compose.yaml variable (topic-creation one-shot), not read by kcons",
    "KCONS_TOPIC_PARTITIONS": "deploy/compose.yaml variable, not read by kcons",
    "KCONS_DOCKER_DIR": "deploy/local/docker.sh variable, not read by kcons",
    "KCONS_IMAGES_DEB_CACHE": "deploy/local/images/build.sh variable, not read by kcons",
    "KCONS_IMAGES_MIRROR": "deploy/local/images/build.sh variable, not read by kcons",
    "KCONS_IMAGES_SUITE": "deploy/local/images/build.sh variable, not read by kcons",
    "KCONS_IMAGES_WORK": "deploy/local/images/build.sh variable, not read by kcons",
    "KCONS_HEADERS": "a Python constant of kcons.envelope (the envelope's header names), not a setting",
}


def _mentioned_names() -> set[str]:
    text = subprocess.run(
        ["grep", "-rhoE", "KCONS_[A-Z0-9_]+", "kcons", "README.md", "deploy"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    # Prefixes written in prose ("KCONS_CACHE_*") end with an underscore: they are not names.
    return {name for name in text.split() if not name.endswith("_")}


def test_the_table_covers_every_kcons_setting() -> None:
    covered = {row.setting for row in TABLE}
    missing = _mentioned_names() - covered - set(EXEMPT)
    assert not missing, f"add these settings to TABLE (or EXEMPT with a reason): {sorted(missing)}"
    assert not covered & set(EXEMPT)


def _clean_env(extra: dict[str, str]) -> dict[str, str | None]:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("KCONS_")}
    env.update(extra)
    return env


CASES = [
    pytest.param(row, value, id=f"{row.setting}={value[:20]!r}-{row.command[0]}-{row.command[1]}")
    for row in TABLE
    for value in row.bad
]


@pytest.mark.parametrize(("row", "value"), CASES)
def test_bad_value_ends_the_command_with_one_line_naming_the_setting(row: Row, value: str, tmp_path: Path) -> None:
    args = [a.replace("{tmp}", str(tmp_path / "data")) for a in row.command]
    result = CliRunner().invoke(main, args, env=_clean_env({**row.env, row.setting: value}), catch_exceptions=True)
    output = result.output
    assert result.exit_code not in (0, None), output
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    # Either kcons' ConfigError or click's own check of an option read from the variable names it.
    named = rf"(invalid setting [^:]*\b{row.setting}\b|\(env var: '{row.setting}'\))"
    assert re.search(named, errors[0]), errors[0]


@pytest.mark.parametrize("kind", ["sql", "lowercase_sql", "key"])
def test_identifiers_with_a_trailing_newline_are_refused(kind: str) -> None:
    from kcons.config import check_identifier
    from kcons.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        check_identifier("KCONS_OUTBOX_TABLE", "outbox\n", kind=kind, max_length=63)  # type: ignore[arg-type]
    assert info.value.setting == "KCONS_OUTBOX_TABLE"


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_purge_refuses_a_retention_that_would_make_it_fail_forever(value: str) -> None:
    env = _clean_env({"KCONS_POSTGRES_DSN": "postgresql://app:pw@127.0.0.1:1/shop"})
    result = CliRunner().invoke(main, ["outbox", "purge", "--older-than", value], env=env)
    assert result.exit_code not in (0, None)
    assert isinstance(result.exception, SystemExit)
    assert "--older-than" in result.output and "Traceback" not in result.output
