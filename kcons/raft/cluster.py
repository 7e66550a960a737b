"""A local cluster of Raft node *processes* for tests, fault runs and demos.

Each node is ``python -m kcons.raft serve`` in its own OS process, so faults are real: SIGKILL
loses everything not yet fsynced, SIGSTOP freezes a leader mid-flight. Nodes bind 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from kcons.errors import KconsError, ServiceStartError
from kcons.raft.client import RaftClient
from kcons.raft.transport import PeerAddress, TlsFiles
from kcons.testing.local import free_ports

log = logging.getLogger(__name__)

__all__ = ["LocalRaftCluster", "RecordingProxy", "free_ports", "replay"]


class _NoLeaderYet(Exception):
    pass


_T = TypeVar("_T")


def _poll(probe: Callable[[], _T], timeout: float, failure: str) -> _T:
    """Call ``probe`` every 0.1 s until it stops raising _NoLeaderYet; ServiceStartError(failure) after ``timeout``."""
    try:
        for attempt in Retrying(
            retry=retry_if_exception_type(_NoLeaderYet),
            wait=wait_fixed(0.1),
            stop=stop_after_delay(timeout),
            reraise=True,
        ):
            with attempt:
                return probe()
    except _NoLeaderYet:
        raise ServiceStartError(failure) from None
    raise AssertionError("unreachable")


class LocalRaftCluster:
    """``size`` node processes sharing ``secret``; ``start()`` returns once a leader is elected."""

    def __init__(
        self,
        size: int,
        base_dir: str | os.PathLike[str],
        secret: bytes,
        *,
        voters: tuple[int, ...] | None = None,
        env: dict[str, str] | None = None,
        tick_ms: int = 50,
        metrics: bool = False,
    ) -> None:
        self.size = size
        self.base = Path(base_dir)
        self.secret = secret
        ports = free_ports(size * (2 if metrics else 1))
        self.addresses = {i + 1: PeerAddress("127.0.0.1", ports[i]) for i in range(size)}
        self.metrics_ports = {i + 1: ports[size + i] for i in range(size)} if metrics else {}
        self.voters = voters
        self.env = dict(env or {})
        self.tick_ms = tick_ms
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        self.routes: dict[int, PeerAddress] = {}  # other nodes reach node i here (e.g. a proxy)

    @property
    def peers_spec(self) -> str:
        """The ``--peers`` value of this cluster."""
        return ",".join(f"{i}={a}" for i, a in sorted(self.addresses.items()))

    def client(self, timeout: float = 15.0, request_timeout: float = 2.0) -> RaftClient:
        """A client of this cluster (over TLS when ``env`` configures it)."""
        tls = TlsFiles.from_env(self.env, server=False)
        return RaftClient(
            self.addresses,
            self.secret,
            timeout=timeout,
            request_timeout=request_timeout,
            tls=tls.client_context() if tls is not None else None,
        )

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["KCONS_RAFT_SECRET"] = self.secret.decode()
        env["KCONS_RAFT_TICK_MS"] = str(self.tick_ms)
        return env

    def start_node(self, i: int, extra_args: tuple[str, ...] = ()) -> None:
        """Start (or restart) node ``i`` on its data directory (``extra_args`` go to ``serve``)."""
        data = self.base / f"node{i}"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "kcons.raft",
            "serve",
            "--id",
            str(i),
            "--peers",
            ",".join(f"{j}={a if j == i else self.routes.get(j, a)}" for j, a in sorted(self.addresses.items())),
            "--data-dir",
            str(data),
        ]
        if self.voters:
            cmd += ["--voters", ",".join(map(str, self.voters))]
        if i in self.metrics_ports:
            cmd += ["--metrics-port", str(self.metrics_ports[i])]
        cmd += list(extra_args)
        logf = open(self.base / f"node{i}.log", "ab")  # noqa: SIM115 - kept open for the child's life
        self._logs[i] = logf
        self.procs[i] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self._environ())

    def start(self, timeout: float = 30.0) -> LocalRaftCluster:
        """Start every node and wait for a leader."""
        self.base.mkdir(parents=True, exist_ok=True)
        for i in self.addresses:
            if self.voters is None or i in self.voters:
                self.start_node(i)
        self.wait_for_leader(timeout)
        return self

    def leader(self) -> int | None:
        """The node that says it leads with the highest term, or None."""
        best: tuple[int, int] | None = None
        with self.client(timeout=1.0, request_timeout=0.5) as c:
            for i in self.addresses:
                if not self.alive(i):
                    continue
                try:
                    st = c.status(i)
                except (OSError, ValueError, KconsError):
                    continue  # down, frozen or dying: it does not lead
                if st.get("role") == "leader" and (best is None or st["term"] > best[1]):
                    best = (i, st["term"])
        return best[0] if best else None

    def wait_for_leader(self, timeout: float = 30.0) -> int:
        """Block until some node leads; raises ServiceStartError after ``timeout``."""

        def probe() -> int:
            leader = self.leader()
            if leader is None:
                raise _NoLeaderYet()
            return leader

        return _poll(probe, timeout, f"no Raft leader within {timeout}s; see logs in {self.base}")

    def wait_for_node(self, i: int, min_applied: int = 0, timeout: float = 30.0) -> dict[str, object]:
        """Block until node ``i`` answers and has applied ``min_applied``; returns its status."""

        def probe() -> dict[str, object]:
            try:
                with self.client(timeout=1.0, request_timeout=0.5) as c:
                    st = c.status(i)
            except (OSError, ValueError, KconsError):
                raise _NoLeaderYet() from None
            applied = st.get("applied", 0)
            if not isinstance(applied, int) or applied < min_applied:
                raise _NoLeaderYet()
            return st

        return _poll(probe, timeout, f"node {i} did not reach applied >= {min_applied} in {timeout}s")

    def alive(self, i: int) -> bool:
        """True while node ``i``'s process runs."""
        p = self.procs.get(i)
        return p is not None and p.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no chance to flush anything)."""
        p = self.procs.get(i)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def pause(self, i: int) -> None:
        """SIGSTOP node ``i``."""
        p = self.procs.get(i)
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        """SIGCONT node ``i``."""
        p = self.procs.get(i)
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop every node (SIGCONT first, then SIGTERM, then SIGKILL after a grace period)."""
        for i, p in self.procs.items():
            if p.poll() is None:
                self.resume(i)
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs.values():
            f.close()
        self._logs.clear()

    def __enter__(self) -> LocalRaftCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RecordingProxy:
    """A TCP proxy in front of one address that records both directions of every connection.

    For adversarial tests: what an attacker on the path sees (and can replay). Threads, blocking
    sockets, 127.0.0.1 only.
    """

    def __init__(self, target: PeerAddress) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = PeerAddress("127.0.0.1", self._listener.getsockname()[1])
        self.sessions: list[tuple[bytearray, bytearray]] = []  # (client to server, server to client)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="raft-proxy", daemon=True)

    def start(self) -> RecordingProxy:
        """Accept connections in a daemon thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting (open connections end when either side closes)."""
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection((self.target.host, self.target.port), timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            c2s, s2c = bytearray(), bytearray()
            self.sessions.append((c2s, s2c))
            for src, dst, rec in ((down, up, c2s), (up, down, s2c)):
                threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while chunk := src.recv(65536):
                record.extend(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def replay(address: PeerAddress, data: bytes, wait: float = 1.0) -> bytes:
    """Send recorded ``data`` to ``address`` on a fresh connection; returns what came back within ``wait``."""
    got = bytearray()
    with socket.create_connection((address.host, address.port), timeout=wait) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        deadline = time.monotonic() + wait
        with contextlib.suppress(OSError):
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                got.extend(chunk)
    return bytes(got)
