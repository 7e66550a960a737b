"""A throwaway RabbitMQ node as a local process, for tests and dev.

Debian's ``rabbitmq-server`` (installed by :mod:`kcons.testing.install` with the same consent
rule as Redis and PostgreSQL) is started directly from ``/usr/lib/rabbitmq/bin`` (not through the
service wrapper), on 127.0.0.1 with free ports for AMQP, Erlang distribution and its own
``epmd``, and with every file of its own under a throwaway folder: ``RABBITMQ_MNESIA_BASE``,
``RABBITMQ_LOG_BASE``, the config file, ``HOME`` (the Erlang cookie) and
``RABBITMQ_ENABLED_PLUGINS_FILE``, which enables the consistent-hash exchange plugin offline
(the plugin ships with the server). ``/etc/rabbitmq`` is never read nor written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kcons.errors import ServiceStartError
from kcons.testing.install import rabbitmq_server_binary
from kcons.testing.local import _LIVE, ManagedProcess, _wait, free_port

log = logging.getLogger(__name__)

__all__ = ["PLUGINS", "RabbitMqServer", "drain"]

#: Plugins every test node runs: the exchange that keeps an aggregate on one queue.
PLUGINS = ("rabbitmq_consistent_hash_exchange",)


def _amqp_handshake(port: int) -> bool:
    """True when the port answers the AMQP protocol header with a Connection.Start frame."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        s.settimeout(2.0)
        frame = s.recv(7)
        return len(frame) == 7 and frame[0] == 1  # a METHOD frame


class RabbitMqServer:
    """A throwaway RabbitMQ node on 127.0.0.1 (user ``guest``/``guest``, vhost ``/``)."""

    def __init__(self, *, base_dir: Path | None = None, port: int | None = None) -> None:
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="kcons-rabbitmq-"))
        self.port = port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"kcons-{uuid.uuid4().hex[:8]}@localhost"
        self.process: ManagedProcess | None = None
        self.start_s: float | None = None  # how long the last start took
        self._closed = False

    @property
    def url(self) -> str:
        """The amqp:// URL of this node (default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        base = self.base_dir
        for sub in ("mnesia", "log", "home"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "log.console = true\nlog.console.level = warning\nlog.file = false\n"
            "disk_free_limit.absolute = 50MB\n"
        )
        (base / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n")
        (base / "rabbitmq-env.conf").write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(base / "home"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            # the Erlang distribution listener binds every interface unless told otherwise
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(base / "rabbitmq.pid"),
            RABBITMQ_LOGS="-",
        )
        return env

    def start(self, timeout: float = 90.0) -> RabbitMqServer:
        """Start the node (or start it again after :meth:`kill`) and wait until it speaks AMQP."""
        binary = rabbitmq_server_binary()
        if binary is None:
            raise ServiceStartError(
                "rabbitmq-server is not installed (run: python -m kcons.testing.install --rabbitmq)"
            )
        started = time.monotonic()
        self.process = ManagedProcess(
            "rabbitmq", [str(binary)], self.base_dir / "rabbitmq.out", env=self._env(), cwd=self.base_dir
        ).start()
        _LIVE.add(self)
        _wait(f"RabbitMQ on port {self.port}", lambda: _amqp_handshake(self.port), timeout, self.process)
        self.start_s = time.monotonic() - started
        log.info("RabbitMQ %s ready in %.1fs", self.nodename, self.start_s)
        return self

    def kill(self) -> None:
        """Hard-kill the node (a crash); its data folder stays for a restart."""
        if self.process is not None:
            self.process.kill()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node cleanly (SIGTERM, files closed); its data folder stays for a restart."""
        if self.process is not None:
            self.process.stop(timeout=timeout)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against this node (its own cookie and epmd); its output, or ServiceStartError."""
        binary = rabbitmq_server_binary()
        if binary is None:
            raise ServiceStartError("rabbitmq-server is not installed")
        ctl = binary.parent / "rabbitmqctl"
        try:
            done = subprocess.run([str(ctl), "-n", self.nodename, *args], env=self._env(), capture_output=True,
                                  timeout=timeout, check=False, cwd=self.base_dir)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServiceStartError(f"rabbitmqctl {args[0] if args else ''} failed: {exc}") from None
        if done.returncode != 0:
            raise ServiceStartError(f"rabbitmqctl {' '.join(args)} exited {done.returncode}: {done.stderr[-500:]!r}")
        return done.stdout.decode(errors="replace")

    def close_connections(self, reason: str = "fault injection") -> None:
        """Close every client connection from the server side (clients see CONNECTION_FORCED)."""
        self.ctl("close_all_connections", reason)

    def _stop_epmd(self) -> None:
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([epmd, "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10,
                           check=False)  # fmt: skip

    def close(self) -> None:
        """Stop the node and its epmd, and delete its folder."""
        if self._closed:
            return
        self._closed = True
        if self.process is not None:
            self.process.stop(timeout=30)
        self._stop_epmd()
        shutil.rmtree(self.base_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> RabbitMqServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def drain(url: str, queue: str) -> list[tuple[Any, bytes]]:
    """Every message now in ``queue``, in queue order, as ``(properties, body)``; acknowledged (removed)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        out: list[tuple[Any, bytes]] = []
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))
    finally:
        conn.close()
