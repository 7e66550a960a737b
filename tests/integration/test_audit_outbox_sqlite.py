"""`kcons audit outbox --sqlite` on a SQLite outbox published by the relay: clean, then a lost row is reported."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from kcons.cli import main
from kcons.config import KafkaSettings
from kcons.envelope import Envelope
from kcons.outbox import OutboxRelay, add, install_schema


def test_a_sqlite_outbox_is_audited_read_only(
    tmp_path: Path, kcons_kafka_bootstrap: str, kcons_unique_topic: Callable[..., str]
) -> None:
    topic = kcons_unique_topic()
    path = str(tmp_path / "outbox.db")
    conn = sqlite3.connect(path)
    install_schema(conn)
    for v in range(1, 4):
        add(conn, Envelope.of("changed", "account", "a", {"v": v}, version=v))
    conn.commit()
    relay = OutboxRelay.for_sqlite(path, KafkaSettings(kcons_kafka_bootstrap), topic=topic, retention_s=3600.0)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while relay.published < 3:
        assert time.monotonic() < deadline, "the relay did not publish"
        time.sleep(0.05)
    relay.stop()
    thread.join(60)
    args = ["audit", "outbox", "--sqlite", path, "--bootstrap", kcons_kafka_bootstrap, "--topic", topic,
            "--relay-topic", topic, "--versions", "strict", "--json"]  # fmt: skip
    clean = CliRunner().invoke(main, args)
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.output.strip().splitlines()[-1])["published_rows"] == 3
    lost = Envelope.of("changed", "account", "a", {"v": 4}, version=4)
    add(conn, lost)
    conn.execute("UPDATE kcons_outbox SET published_at = created_at WHERE id = ?", (lost.id,))
    conn.commit()
    conn.close()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["missing_list"] == [lost.id]
