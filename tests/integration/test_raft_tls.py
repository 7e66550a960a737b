"""Optional TLS: a cluster serves over TLS, nothing readable crosses the wire, plaintext is refused."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from kcons.errors import ConfigError
from kcons.raft.client import RaftClient
from kcons.raft.cluster import LocalRaftCluster, RecordingProxy
from kcons.raft.transport import ROLE_CLIENT, Handshake, TlsFiles, client_session

SECRET = b"tls-test-secret-0123456789"


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=kcons-raft", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_a_tls_cluster_serves_encrypted_and_refuses_plaintext(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    env = {"KCONS_RAFT_TLS_CERT": cert, "KCONS_RAFT_TLS_KEY": key, "KCONS_RAFT_TLS_CA": cert}
    with LocalRaftCluster(3, tmp_path / "cluster", SECRET, tick_ms=20, env=env) as cluster:
        leader = cluster.wait_for_leader()
        proxy = RecordingProxy(cluster.addresses[leader]).start()
        try:
            tls = TlsFiles(None, None, cert).client_context()
            with RaftClient({leader: proxy.address}, SECRET, timeout=10, tls=tls) as c:
                c.put("visible-key", "visible-value-0123456789")
                got = c.get("visible-key")
                assert got is not None and got.value == "visible-value-0123456789"
        finally:
            proxy.close()
        wire = b"".join(bytes(a) + bytes(b) for a, b in proxy.sessions)
        assert b"visible-value" not in wire and b"KRFT" not in wire  # the handshake is inside TLS too

        addr = cluster.addresses[leader]
        with socket.create_connection((addr.host, addr.port), timeout=5) as s, pytest.raises(OSError):
            client_session(s, Handshake(SECRET), ROLE_CLIENT, 0, leader)  # plaintext: closed, never answered
        assert all(cluster.alive(i) for i in cluster.addresses)


def test_tls_settings_name_what_is_missing_or_unreadable(tmp_path: Path) -> None:
    assert TlsFiles.from_env({}) is None
    with pytest.raises(ConfigError) as err:
        TlsFiles.from_env({"KCONS_RAFT_TLS_CERT": "c.pem", "KCONS_RAFT_TLS_KEY": "k.pem"})
    assert err.value.setting == "KCONS_RAFT_TLS_CA"
    with pytest.raises(ConfigError) as err:
        TlsFiles.from_env({"KCONS_RAFT_TLS_CA": str(tmp_path / "missing.pem")}, server=False)
    assert err.value.setting == "KCONS_RAFT_TLS_CA"
