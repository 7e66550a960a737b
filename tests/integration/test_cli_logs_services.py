"""Long-running commands log what an operator needs with no flags, as text or JSON lines; librdkafka's too."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest


def _run_relay_until(env: dict[str, str], needle: str, log_path: Path) -> str:
    """Start ``kcons outbox relay`` (no flags), wait for ``needle`` in its stderr, stop it with SIGTERM."""
    with open(log_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kcons.cli", "outbox", "relay"], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and needle not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = log_path.read_text()
    assert needle in text, text
    assert code == 0, text
    return text


@pytest.fixture
def relay_env(kafka_bootstrap: str, postgres_dsn: str) -> dict[str, str]:
    table = f"outbox_logs_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KCONS_LOG")}
    env.update(KCONS_KAFKA_BOOTSTRAP=kafka_bootstrap, KCONS_POSTGRES_DSN=postgres_dsn, KCONS_OUTBOX_TABLE=table,
               KCONS_OUTBOX_NAME=f"logs-{table}")  # fmt: skip
    subprocess.run([sys.executable, "-m", "kcons.cli", "outbox", "init"], env=env, check=True, capture_output=True)
    return env


def test_relay_started_without_flags_logs_its_leadership_at_info(relay_env: dict[str, str], tmp_path: Path) -> None:
    text = _run_relay_until(relay_env, " leads ", tmp_path / "relay.log")
    line = next(ln for ln in text.splitlines() if " leads " in ln)
    assert " INFO " in line and f"relay={relay_env['KCONS_OUTBOX_NAME']}" in line


def test_relay_with_json_format_writes_only_json_lines_with_the_relay_name(
    relay_env: dict[str, str], tmp_path: Path
) -> None:
    text = _run_relay_until({**relay_env, "KCONS_LOG_FORMAT": "json"}, " leads ", tmp_path / "relay.log")
    records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]  # every line parses
    leads = [r for r in records if " leads " in r["message"]]
    assert leads and leads[0]["level"] == "INFO" and leads[0]["relay"] == relay_env["KCONS_OUTBOX_NAME"]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)


def test_librdkafka_lines_go_through_python_logging_not_raw_stderr() -> None:
    script = """
import logging, sys, time
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="PY %(name)s %(message)s")
from kcons.kafka import Producer
from kcons.kafka.client import check_producer_config
cfg = {"bootstrap.servers": "127.0.0.1:1", "reconnect.backoff.ms": 50}
p = Producer(check_producer_config(cfg, transactional=False))
p.produce("t", b"x")
end = time.monotonic() + 3
while time.monotonic() < end:
    p.poll(0.1)
p.purge()
p.flush(1)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not [ln for ln in out.stderr.splitlines() if ln[:1] == "%"], out.stderr
    assert "PY kcons.librdkafka" in out.stdout, out.stdout


def test_consumer_log_lines_name_their_group(
    kafka_bootstrap: str, unique_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    from kcons import IdempotentConsumer, MemoryDedupStore
    from kcons.cli.logs import JsonFormatter

    topic = unique_topic(partitions=1)
    group = f"logs-{uuid.uuid4().hex[:8]}"
    config = {"bootstrap.servers": kafka_bootstrap, "group.id": group, "auto.offset.reset": "earliest"}
    consumer = IdempotentConsumer(config, [topic], lambda _m: None, store=MemoryDedupStore())
    with caplog.at_level(logging.INFO, logger="kcons.consumer"):
        consumer.run(idle_timeout_s=3)
        consumer.close()
    assigned = [r for r in caplog.records if r.getMessage().startswith("assigned")]
    assert assigned, [r.getMessage() for r in caplog.records]
    assert json.loads(JsonFormatter().format(assigned[0]))["group"] == group
