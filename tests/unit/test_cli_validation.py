"""The command line refuses bad input with exit 2 and one ``Error:`` line; operational failures exit 1, no traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from kcons.cli import main
from kcons.errors import KconsError
from kcons.raft.client import RaftClient, RequestRefusedError
from kcons.raft.errors import NodeUnreachableError

SECRET = "0123456789abcdef0123456789abcdef"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = _closed_port()
PEERS = f"1=127.0.0.1:{PORT}"
NO_SERVICES = {"KCONS_POSTGRES_DSN": None, "KCONS_RAFT_PEERS": None, "KCONS_KAFKA_BOOTSTRAP": None}

CASES = [
    # (argv, extra env, exit code, text the one Error: line must contain)
    (["demo", "--orders", "-5"], {}, 2, "--orders"),
    (["demo", "--rate", "0"], {}, 2, "--rate"),
    (["demo", "--orders", "100", "--rate", "1", "--timeout", "50"], {}, 2, "--timeout"),
    (["demo", "--products", "0"], {}, 2, "--products"),
    (["outbox", "relay"], {}, 2, "KCONS_POSTGRES_DSN"),
    (["outbox", "init"], {}, 2, "KCONS_POSTGRES_DSN"),
    (["outbox", "relay", "--batch-size", "0", "--dsn", "postgresql://u@127.0.0.1:1/db"], {}, 2, "--batch-size"),
    (["outbox", "relay", "--lease-ttl", "0", "--dsn", "postgresql://u@127.0.0.1:1/db"], {}, 2, "--lease-ttl"),
    (["outbox", "purge", "--older-than", "-1"], {}, 2, "--older-than"),
    (["outbox", "relay"], {"KCONS_POSTGRES_DSN": "postgresql://u@127.0.0.1:1/db", "KCONS_OUTBOX_BATCH_SIZE": "0"}, 2,
     "KCONS_OUTBOX_BATCH_SIZE"),
    (["raft", "serve", "--id", "1", "--peers", PEERS, "--data-dir", "{tmp}", "--metrics-port", "70000"], {}, 2,
     "--metrics-port"),
    (["raft", "serve", "--id", "1", "--peers", PEERS, "--data-dir", "{tmp}"], {"KCONS_METRICS_PORT": "http"}, 2,
     "KCONS_METRICS_PORT"),
    (["raft", "get", "k"], {}, 2, "KCONS_RAFT_PEERS"),
    (["raft", "get", "k", "--peers", PEERS], {"KCONS_RAFT_SECRET": "short"}, 2, "secret"),
    (["raft", "get", "k", "--node", "1", "--peers", PEERS], {"KCONS_RAFT_SECRET": SECRET}, 1, "node 1"),
    (["raft", "get", "k", "--node", "9", "--peers", PEERS], {"KCONS_RAFT_SECRET": SECRET}, 1, "not in the peer list"),
    (["raft", "put", "k", "v", "--peers", PEERS], {"KCONS_RAFT_SECRET": SECRET}, 1, "did not succeed"),
    (["version"], {"KCONS_LOG_FORMAT": "xml"}, 2, "KCONS_LOG_FORMAT"),
]


@pytest.mark.parametrize(("argv", "env", "code", "says"), CASES, ids=[" ".join(c[0][:3]) + f"->{c[2]}" for c in CASES])
def test_bad_input_exits_2_and_failures_exit_1_with_one_error_line(
    tmp_path: Path, argv: list[str], env: dict[str, str], code: int, says: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path / "data")) for a in argv]
    result = CliRunner().invoke(main, argv, env={**NO_SERVICES, "KCONS_LOG_LEVEL": "ERROR", **env})
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], result.output
    assert not isinstance(result.exception, KconsError | OSError)  # reported, not raised


def test_raft_serve_takes_its_metrics_port_from_kcons_metrics_port() -> None:
    result = CliRunner().invoke(main, ["raft", "serve", "--help"])
    assert "KCONS_METRICS_PORT" in result.output and "KCONS_RAFT_PEERS" in result.output


def test_raft_client_methods_raise_kcons_errors_for_unreachable_and_unknown_nodes() -> None:
    with RaftClient(PEERS, SECRET.encode()) as client:
        with pytest.raises(NodeUnreachableError) as caught:
            client.get("k", at_node=1)
        assert isinstance(caught.value, KconsError) and isinstance(caught.value, OSError)
        with pytest.raises(NodeUnreachableError):
            client.status(1)
        with pytest.raises(RequestRefusedError, match="not in the peer list"):
            client.get("k", at_node=7)

