"""Every ```python snippet of the README runs against real Kafka, Redis, PostgreSQL and a Raft node.

A snippet preceded by ``<!-- not run: reason -->`` is skipped, visibly; snippets whose first line
names a file (``# conftest.py``, ``# test_orders.py``) form a small pytest project run as one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
_FILE_NAME = re.compile(r"\A# (?P<name>[\w/]+\.py)\n")
_NOT_RUN = re.compile(r"<!-- not run: (?P<reason>.+?) -->")


def _snippets() -> list[tuple[int, str, str | None]]:
    """(line number, code, reason it is not run or None) for each python block of the README."""
    text = (ROOT / "README.md").read_text()
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        not_run = _NOT_RUN.search(m.group("before"))
        out.append((line, m.group("code"), not_run.group("reason") if not_run else None))
    return out


SNIPPETS = _snippets()
STANDALONE = [s for s in SNIPPETS if not _FILE_NAME.match(s[1])]
PROJECT = [s for s in SNIPPETS if _FILE_NAME.match(s[1])]
SECRET = "readme-snippets-secret-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def raft_peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Raft cluster (it elects itself), for the README's Raft snippet."""
    peers = f"1=127.0.0.1:{_free_port()}"
    env = {**os.environ, "KCONS_RAFT_SECRET": SECRET, "KCONS_METRICS_PORT": "0"}
    data = tmp_path_factory.mktemp("raft")
    proc = subprocess.Popen([sys.executable, "-m", "kcons.cli", "raft", "serve", "--id", "1", "--peers", peers,
                             "--data-dir", str(data / "node1")], env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = subprocess.run([sys.executable, "-m", "kcons.cli", "raft", "get", "probe", "--peers", peers],
                                   env=env, capture_output=True, timeout=30)  # fmt: skip
            if probe.returncode == 0:
                break
            time.sleep(0.5)
        yield peers
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.fixture
def snippet_env(kafka_bootstrap: str, redis_url: str, postgres_dsn: str, raft_peers: str) -> dict[str, str]:
    return {**os.environ, "KCONS_KAFKA_BOOTSTRAP": kafka_bootstrap, "KCONS_REDIS_URL": redis_url,
            "KCONS_POSTGRES_DSN": postgres_dsn, "KCONS_RAFT_PEERS": raft_peers,
            "KCONS_RAFT_SECRET": SECRET}  # fmt: skip


def test_the_readme_has_the_snippets_it_promises() -> None:
    assert len([s for s in STANDALONE if s[2] is None]) >= 4  # producer, consumer, outbox, Raft
    assert all(reason for _line, _code, reason in SNIPPETS if reason is not None)


@pytest.mark.parametrize(("line", "code", "not_run"), STANDALONE, ids=[f"README.md:{s[0]}" for s in STANDALONE])
def test_readme_snippet_runs(
    line: int, code: str, not_run: str | None, snippet_env: dict[str, str], tmp_path: Path
) -> None:
    if not_run:
        pytest.skip(f"marked in the README: not run: {not_run}")
    script = tmp_path / f"readme_{line}.py"
    script.write_text(code + "\n")
    result = subprocess.run([sys.executable, str(script)], env=snippet_env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, f"README.md:{line}\n{result.stdout}\n{result.stderr}"


def test_readme_pytest_project_passes(snippet_env: dict[str, str], tmp_path: Path) -> None:
    assert PROJECT, "the README shows a conftest.py and a test module"
    for _line, code, _not_run in PROJECT:
        name = _FILE_NAME.match(code)
        assert name is not None
        (tmp_path / name.group("name")).write_text(code + "\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            env=snippet_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
