"""No ``kcons`` command prints a secret: not at ``-vv``, not when a server is unreachable or refuses it.

Every command that takes settings runs as a real process with secret-bearing settings (from the
environment and from flags; passwords with ``# ? / @ : %`` and non-ASCII characters, written
percent-encoded, raw, and in libpq's key=value form), pointed at unreachable ports and at the real
local services with credentials they refuse. Long-running commands get SIGTERM after a while. The
secret is built from random pieces between its special characters, and no piece may appear in
stdout or stderr (which carries every log record).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

pytestmark = pytest.mark.integration

PIECES = [uuid.uuid4().hex[:8] for _ in range(8)]
SECRET = "{}#{}?{}/{}@{}:{}%{}ü{}".format(*PIECES)
ENCODED = quote(SECRET, safe="")
UNREACHABLE = "127.0.0.1:1"


@dataclass
class Run:
    """One command line, its environment, and after how many seconds it is stopped (None: runs to its end)."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stop_after_s: float | None = None


def _libpq_quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.fixture(scope="module")
def services(kcons_kafka_bootstrap: str, kcons_redis_url: str, kcons_postgres_dsn: str) -> dict[str, str]:
    """The real services (started by the fixtures when no KCONS_* variable names running ones)."""
    return {
        "KCONS_KAFKA_BOOTSTRAP": kcons_kafka_bootstrap,
        "KCONS_REDIS_URL": kcons_redis_url,
        "KCONS_POSTGRES_DSN": kcons_postgres_dsn,
    }


def _runs(services: dict[str, str], tmp: Path) -> list[Run]:
    pg = urlsplit(services["KCONS_POSTGRES_DSN"])
    redis_hostport = urlsplit(services["KCONS_REDIS_URL"]).netloc.rsplit("@", 1)[-1]
    kafka_config = json.dumps(
        {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": "kcons",
            "sasl.password": SECRET,
            "sasl.oauthbearer.config": f"clientId=kcons clientSecret={SECRET}",
            "ssl.key.password": SECRET,
            "ssl.keystore.password": SECRET,
        }
    )
    dsns = {
        "pg-encoded-unreachable": f"postgresql://kcons:{ENCODED}@{UNREACHABLE}/shop",
        "pg-encoded-refused": f"postgresql://nosuchuser:{ENCODED}@{pg.hostname}:{pg.port}/postgres",
        "pg-raw-url": f"postgresql://kcons:{SECRET}@{pg.hostname}:{pg.port}/postgres",
        "pg-keyvalue": f"host={pg.hostname} port={pg.port} user=nosuchuser password={_libpq_quoted(SECRET)}",
        "pg-query": f"postgresql://nosuchuser@{pg.hostname}:{pg.port}/postgres?password={ENCODED}",
    }
    redis_urls = {
        "redis-encoded-refused": f"redis://default:{ENCODED}@{redis_hostport}/0",
        "redis-encoded-unreachable": f"redis://:{ENCODED}@{UNREACHABLE}/0",
        "redis-raw": f"redis://:{SECRET}@{redis_hostport}/0",
    }
    secret_file = tmp / "raft.secret"
    secret_file.write_text(SECRET)
    base = {
        "KCONS_KAFKA_BOOTSTRAP": services["KCONS_KAFKA_BOOTSTRAP"],
        "KCONS_KAFKA_CONFIG": kafka_config,
        "KCONS_RAFT_SECRET": SECRET,
        "KCONS_RAFT_PEERS": f"1={UNREACHABLE}",
        "KCONS_CACHE_TOPICS": "kcons-secrets-test",
        "KCONS_OUTBOX_RETRY_MAX_S": "2",
    }
    runs: list[Run] = []
    for label, dsn in dsns.items():
        env = {**base, "KCONS_POSTGRES_DSN": dsn, "KCONS_REDIS_URL": redis_urls["redis-encoded-refused"]}
        runs += [
            Run(f"outbox init env {label}", ["outbox", "init"], env),
            Run(f"outbox init flag {label}", ["outbox", "init", "--dsn", dsn], base),
            Run(f"outbox relay env {label}", ["outbox", "relay", "--name", f"s{len(runs)}"], env, 8),
            Run(f"outbox relay flag {label}", ["outbox", "relay", "--dsn", dsn, "--name", f"s{len(runs)}"], base, 8),
            Run(f"outbox purge flag {label}", ["outbox", "purge", "--dsn", dsn, "--older-than", "1"], base),
            Run(f"dev smoke {label}", ["dev", "smoke", "--messages", "5"], env, 25),
        ]
    for label, url in redis_urls.items():
        env = {**base, "KCONS_REDIS_URL": url, "KCONS_POSTGRES_DSN": dsns["pg-encoded-refused"]}
        runs += [
            Run(f"cache peek {label}", ["cache", "peek", "k"], env),
            Run(f"cache invalidator {label}", ["cache", "invalidator"], env, 8),
        ]
    unreachable_kafka = {**base, "KCONS_KAFKA_BOOTSTRAP": UNREACHABLE, "KCONS_REDIS_URL": redis_urls["redis-raw"]}
    runs.append(Run("cache invalidator kafka unreachable", ["cache", "invalidator"], unreachable_kafka, 8))
    relay_raft = ["outbox", "relay", "--lease-backend", "raft", "--raft-secret-file", str(secret_file)]
    runs.append(Run("outbox relay raft lease", relay_raft, {**base, "KCONS_POSTGRES_DSN": dsns["pg-keyvalue"]}, 8))
    raft_clients = [["get", "k"], ["put", "k", "v"], ["delete", "k"], ["cas", "k", "0", "v"], ["members"], ["status"]]
    for sub in raft_clients:
        runs.append(Run(f"raft {sub[0]} env", ["raft", *sub], base, 20))
        runs.append(Run(f"raft {sub[0]} file", ["raft", *sub, "--secret-file", str(secret_file)], base, 20))
    serve = ["raft", "serve", "--id", "1", "--peers", "1=127.0.0.1:0", "--data-dir", str(tmp / "raft")]
    runs.append(Run("raft serve env", [*serve, "--metrics-port", "0"], base, 6))
    runs.append(Run("raft serve file", [*serve, "--secret-file", str(secret_file)], base, 6))
    demo_env = {**base, "KCONS_POSTGRES_DSN": dsns["pg-encoded-refused"], "KCONS_REDIS_URL": redis_urls["redis-raw"]}
    runs.append(Run("demo", ["demo", "--postgres", "--orders", "5", "--timeout", "10"], demo_env, 30))
    return runs


def _start(run: Run) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KCONS_")}
    env.update(run.env)
    return subprocess.Popen(
        [sys.executable, "-m", "kcons.cli", "-vv", *run.args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[bytes], run: Run) -> str:
    try:
        out, err = proc.communicate(timeout=run.stop_after_s or 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    return (out + err).decode(errors="replace")


def test_no_command_prints_a_secret(services: dict[str, str], tmp_path: Path) -> None:
    runs = _runs(services, tmp_path)
    leaks: list[str] = []
    outputs: dict[str, str] = {}
    for start in range(0, len(runs), 8):  # a few at a time: the machine is shared
        batch = runs[start : start + 8]
        procs = [(_start(r), r) for r in batch]
        for proc, run in procs:
            text = _finish(proc, run)
            outputs[run.name] = text
            found = [p for p in PIECES if p in text]
            if found:
                line = next(line for line in text.splitlines() if any(p in line for p in found))
                leaks.append(f"{run.name}: {line[:300]}")
    assert not leaks, "\n".join(leaks)
    # The runs did reach the code paths that used to leak (else the check above proves nothing).
    joined = "\n".join(outputs.values())
    assert "Error: invalid setting KCONS_POSTGRES_DSN" in outputs["outbox relay env pg-raw-url"]
    assert "--dsn" in outputs["outbox init flag pg-raw-url"]
    assert "cannot connect" in outputs["outbox relay env pg-encoded-unreachable"]
    assert "'sasl.password': '***'" in joined
    assert "DEBUG" in joined
