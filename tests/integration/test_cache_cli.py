"""``kcons cache invalidator`` runs until SIGTERM and applies events; ``kcons cache peek`` shows an entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from click.testing import CliRunner

from kcons.cli.cache import cache_cli
from kcons.envelope import Envelope


def test_invalidator_command_applies_events_and_stops_on_sigterm(
    kafka_bootstrap: str, redis_url: str, unique_topic: Any, make_producer: Any
) -> None:
    topic = unique_topic(partitions=1)
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, KCONS_KAFKA_BOOTSTRAP=kafka_bootstrap, KCONS_REDIS_URL=redis_url, KCONS_CACHE_PREFIX=prefix)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from kcons.cli.cache import cache_cli; cache_cli()", "invalidator", "--topic", topic,
         "--group", f"g-{prefix}", "--key-template", "{aggregate_type}/{aggregate_id}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ev = Envelope.of("ItemUpdated", "item", "3", {}, version=12)
        producer = make_producer()
        producer.produce(topic, key=ev.key, value=ev.payload, headers=ev.headers())
        producer.flush(10)
        runner = CliRunner()
        deadline = time.monotonic() + 60
        shown: dict[str, Any] = {}
        while time.monotonic() < deadline:
            result = runner.invoke(cache_cli, ["peek", "item/3"], env=env)
            assert result.exit_code == 0, result.output
            shown = json.loads(result.output)
            if shown.get("present"):
                break
            time.sleep(0.2)
        assert shown == {"key": "item/3", "present": True, "version": 12, "tombstone": True, "bytes": 0}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]


def test_invalidator_command_reports_bad_configuration_by_name() -> None:
    result = CliRunner().invoke(
        cache_cli,
        ["invalidator", "--topic", "t", "--group", "g", "--keys", "nonexistent_module:f"],
        env={"KCONS_KAFKA_BOOTSTRAP": "127.0.0.1:9", "KCONS_REDIS_URL": "redis://127.0.0.1:9/0"},
    )
    assert result.exit_code != 0
    assert "--keys" in result.output
