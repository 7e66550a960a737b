"""Real Kafka (KRaft), Redis and PostgreSQL as local processes, for tests, benchmarks and dev.

Each service binds to 127.0.0.1 on free ports, keeps its data in a throwaway folder and is
removed by ``close()``. Kafka runs from the official jars that :mod:`kcons.testing.install`
resolves; a :class:`KafkaCluster` of 3 nodes (replication factor 3, ``min.insync.replicas=2``)
supports hard kills and restarts of single brokers for failover tests.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from kcons.errors import ServiceStartError
from kcons.testing.install import ensure_kafka_jars, postgres_bin_dir

log = logging.getLogger(__name__)

__all__ = [
    "KafkaCluster", "ManagedProcess", "PostgresServer", "RedisServer", "broker_settings", "free_port",
    "free_ports", "stop_together",
]  # fmt: skip

#: Strong references: a service whose start() was interrupted (a signal raised in it) must still be
#: stopped at exit, after the frame that created it is gone.
_LIVE: set[Any] = set()


def _close_live() -> None:
    for svc in list(_LIVE):
        with contextlib.suppress(Exception):
            svc.close()


atexit.register(_close_live)


#: Ports free_ports handed out in this process: a service may not have bound its port yet when
#: the next one is asked for, and the kernel can offer the same free port again.
_ISSUED: set[int] = set()


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct TCP ports on 127.0.0.1, free right now and not handed out before here.

    The sockets stay bound until all ``n`` are chosen, so one call never returns a port twice (a
    3-node cluster once got the same controller port for two nodes and never formed).
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port not in _ISSUED:
                ports.append(port)
        _ISSUED.update(ports)
        return ports
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (and not handed out before here)."""
    return free_ports(1)[0]


def _wait(what: str, check: Any, timeout: float, proc: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise ServiceStartError(f"{what} exited with {proc.returncode()} while starting:\n{proc.log_tail()}")
        try:
            if check():
                return
        except Exception as exc:  # readiness probes fail until the service is up
            last = exc
        time.sleep(0.1)
    detail = f" (last error: {last})" if last else ""
    tail = f"\n{proc.log_tail()}" if proc is not None else ""
    raise ServiceStartError(f"{what} not ready after {timeout:.0f}s{detail}{tail}")


class ManagedProcess:
    """A child process in its own session with its output in a log file; stop, kill, pause."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, *, user: str | None = None,
        env: dict[str, str] | None = None, cwd: Path | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._user = user
        self._env = env
        self._cwd = cwd
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        """Start (or restart) the process."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, user=self._user, env=self._env, cwd=self._cwd,
        )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        """The process id (raises if never started)."""
        if self.proc is None:
            raise ServiceStartError(f"{self.name} was never started")
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is running (or paused)."""
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        """Exit status, None while running."""
        return None if self.proc is None else self.proc.poll()

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process group (so children such as PostgreSQL backends get it too)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """Hard kill (SIGKILL) and reap."""
        self.send_signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._close_log()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): it holds its sockets but answers nothing."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a paused process (SIGCONT)."""
        self.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Ask the process to stop, then kill it if it has not exited within ``timeout``."""
        if self.alive():
            self.resume()
            self.send_signal(sig)
            assert self.proc is not None
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
                self.kill()
        self._close_log()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the process's output, for error messages."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-chars:].decode(errors="replace")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_together(processes: Sequence[ManagedProcess], grace_s: float) -> None:
    """SIGTERM every process at once, SIGKILL what still runs after ``grace_s`` (for throwaway data)."""
    for proc in processes:
        proc.resume()
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in processes:
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()


_LOG4J2 = """\
rootLogger.level=WARN
rootLogger.appenderRef.main.ref=MAIN
appender.main.type=Console
appender.main.name=MAIN
appender.main.layout.type=PatternLayout
appender.main.layout.pattern=[%d] %p %m (%c)%n
logger.state.name=state.change.logger
logger.state.level=ERROR
"""


def broker_settings(size: int) -> dict[str, str]:
    """Broker settings for tests, beyond listeners and storage: internal topics sized for ``size`` nodes.

    One node: replication factor 1 and ``min.isr`` 1 for the offsets and transaction-state
    topics, which transactions need on a single broker. More: replication factor 3 and
    ``min.insync.replicas`` 2. Both backends (local processes, containers) use these.
    """
    rf = 1 if size == 1 else 3
    min_isr = 1 if size == 1 else 2
    return {
        "num.partitions": "1",
        "default.replication.factor": str(rf),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(rf),
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min_isr),
        "transaction.state.log.num.partitions": "10",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "unclean.leader.election.enable": "false",
        "log.segment.bytes": str(64 * 1024 * 1024),
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": "5000",
        "transaction.remove.expired.transaction.cleanup.interval.ms": "60000",
        "controlled.shutdown.enable": "true",
        "replica.lag.time.max.ms": "10000",
    }


class KafkaCluster:
    """A KRaft Apache Kafka cluster of 1 or 3 combined broker/controller nodes on 127.0.0.1.

    One node: replication factor 1 for the internal topics (``offsets.topic``, transaction
    state log with ``min.isr=1``). Three nodes: replication factor 3 and
    ``min.insync.replicas=2`` everywhere, so one broker can be killed and writes continue.
    """

    def __init__(self, size: int = 1, *, base_dir: Path | None = None, heap: str = "768m",
                 extra_config: dict[str, str] | None = None) -> None:  # fmt: skip
        if size not in (1, 3, 5):
            raise ValueError("KafkaCluster size must be 1, 3 or 5")
        self.size = size
        self.heap = heap
        self.extra_config = dict(extra_config or {})
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="kcons-kafka-"))
        self.cluster_id = ""
        ports = free_ports(2 * size)
        self.broker_ports, self.controller_ports = ports[:size], ports[size:]
        self.nodes: list[ManagedProcess] = []
        self._jars: Path | None = None
        self._closed = False

    @property
    def bootstrap(self) -> str:
        """The bootstrap.servers string for clients."""
        return ",".join(f"127.0.0.1:{p}" for p in self.broker_ports)

    def _properties(self, i: int) -> str:
        voters = ",".join(f"{n + 1}@127.0.0.1:{p}" for n, p in enumerate(self.controller_ports))
        props = {
            "process.roles": "broker,controller",
            "node.id": str(i + 1),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.broker_ports[i]},CONTROLLER://127.0.0.1:{self.controller_ports[i]}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.broker_ports[i]}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.base_dir / f"node{i + 1}" / "data"),
            **broker_settings(self.size),
        }
        props.update(self.extra_config)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, main_class: str, *args: str) -> list[str]:
        assert self._jars is not None
        java = shutil.which("java")
        if java is None:
            raise ServiceStartError("java is not installed (needed to run the Kafka broker)")
        # The parallel (throughput) collector: on a small machine shared with the clients under
        # test, G1 keeps its young generation small to meet the pause goal and collects it many
        # times as often, and every pause stalls each produce, commit and fetch under way; the
        # parallel collector's young generation is larger, so it pauses rarely.
        return [
            java, "-Xms256m", f"-Xmx{self.heap}", "-XX:+UseParallelGC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.base_dir / 'log4j2.properties'}",
            "-cp", f"{self._jars}/*", main_class, *args,
        ]  # fmt: skip

    def start(self, timeout: float = 180.0) -> KafkaCluster:
        """Format storage, start every node and wait until all brokers answer metadata."""
        self._jars = ensure_kafka_jars()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        _LIVE.add(self)  # from here on, close() at exit removes what start() made, even if start() is interrupted
        (self.base_dir / "log4j2.properties").write_text(_LOG4J2)
        self.cluster_id = _kafka_cluster_id()
        for i in range(self.size):
            node_dir = self.base_dir / f"node{i + 1}"
            node_dir.mkdir(parents=True, exist_ok=True)
            (node_dir / "server.properties").write_text(self._properties(i))

        def fmt(i: int) -> None:
            props = self.base_dir / f"node{i + 1}" / "server.properties"
            argv = self._java("kafka.tools.StorageTool", "format", f"--cluster-id={self.cluster_id}", "-c", str(props))
            res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            if res.returncode != 0:
                raise ServiceStartError(f"kafka storage format failed:\n{(res.stdout + res.stderr)[-3000:]}")

        with concurrent.futures.ThreadPoolExecutor(self.size) as pool:
            list(pool.map(fmt, range(self.size)))
        self.nodes = [
            ManagedProcess(
                f"kafka-{i + 1}",
                self._java("kafka.Kafka", str(self.base_dir / f"node{i + 1}" / "server.properties")),
                self.base_dir / f"node{i + 1}" / "broker.log",
            )
            for i in range(self.size)
        ]
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 180.0, expected: int | None = None) -> None:
        """Wait until ``expected`` (default: all) brokers are in the cluster metadata."""
        from confluent_kafka.admin import AdminClient

        want = self.size if expected is None else expected
        admin = AdminClient(
            {"bootstrap.servers": self.bootstrap, "socket.connection.setup.timeout.ms": 2000, "log_level": 0}
        )

        def ready() -> bool:
            md = admin.list_topics(timeout=2)
            return len(md.brokers) >= want

        first_alive = next((n for n in self.nodes if n.alive()), None)
        _wait(f"Kafka ({self.size} node(s)) at {self.bootstrap}", ready, timeout, first_alive)

    def node_index_for_broker(self, broker_id: int) -> int:
        """Map a Kafka broker id (node.id) to an index in ``nodes``."""
        return broker_id - 1

    def kill_node(self, i: int) -> None:
        """Hard-kill node ``i`` (SIGKILL), as a crash would."""
        self.nodes[i].kill()

    def stop_node(self, i: int) -> None:
        """Stop node ``i`` cleanly (controlled shutdown)."""
        self.nodes[i].stop(timeout=60)

    def restart_node(self, i: int, timeout: float = 180.0) -> None:
        """Start node ``i`` again on the same ports and data, and wait until it rejoined."""
        if self.nodes[i].alive():
            raise ServiceStartError(f"kafka node {i + 1} is still running")
        self.nodes[i].start()
        self.wait_ready(timeout)

    def close(self) -> None:
        """Stop every node at once (SIGTERM, then SIGKILL after 5 s) and delete all data."""
        if self._closed:
            return
        self._closed = True
        stop_together(self.nodes, grace_s=5)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kafka_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, never starting with '-'.

    A leading '-' would be read as an option by command-line tools (Kafka's own generator avoids it too).
    """
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 with persistence off."""

    def __init__(self, *, base_dir: Path | None = None, port: int | None = None) -> None:
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="kcons-redis-"))
        self.port = port or free_port()
        self.process: ManagedProcess | None = None
        self._closed = False

    @property
    def url(self) -> str:
        """The redis:// URL of this server (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceStartError("redis-server is not installed (run: python -m kcons.testing.install)")
        argv = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(self.base_dir), "--daemonize", "no",
            "--loglevel", "warning", "--maxclients", "2000",
        ]  # fmt: skip
        self.process = ManagedProcess("redis", argv, self.base_dir / "redis.log").start()
        _LIVE.add(self)
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            _wait(f"Redis at {self.url}", lambda: bool(client.ping()), timeout, self.process)
        finally:
            client.close()
        return self

    def close(self) -> None:
        """Stop the server and delete its folder."""
        if self._closed:
            return
        self._closed = True
        if self.process is not None:
            self.process.stop(timeout=10)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (``initdb`` + ``postgres``, trust auth).

    As root the server runs as the ``postgres`` user, since PostgreSQL refuses to run as
    root. ``durable=False`` (the default for tests) turns fsync off for speed.
    """

    def __init__(self, *, base_dir: Path | None = None, port: int | None = None, durable: bool = False,
                 max_connections: int = 300) -> None:  # fmt: skip
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="kcons-pg-"))
        self.port = port or free_port()
        self.durable = durable
        self.max_connections = max_connections
        self.process: ManagedProcess | None = None
        self._user: str | None = None
        self._closed = False

    @property
    def dsn(self) -> str:
        """A libpq URL for the ``postgres`` database as the ``postgres`` superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceStartError("running as root but there is no 'postgres' user to run PostgreSQL") from None
        return "postgres"

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """Create the cluster, start the server and wait until it accepts connections."""
        bindir = postgres_bin_dir()
        if bindir is None:
            raise ServiceStartError("PostgreSQL server binaries not found (run: python -m kcons.testing.install)")
        self._user = self._run_as()
        data = self.base_dir / "data"
        sock = self.base_dir / "sock"
        sock.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            for path in (self.base_dir, sock):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
             "--no-sync", "--locale=C"],
            capture_output=True, text=True, user=self._user, timeout=120, check=False, cwd=self.base_dir,
        )  # fmt: skip
        if init.returncode != 0:
            raise ServiceStartError(f"initdb failed:\n{(init.stdout + init.stderr)[-3000:]}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(sock),
            "max_connections": str(self.max_connections),
            "shared_buffers": "128MB",
            "max_wal_size": "1GB",
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "log_min_messages": "warning",
        }
        argv = [str(bindir / "postgres"), "-D", str(data)]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        self.process = ManagedProcess(
            "postgres", argv, self.base_dir / "postgres.log", user=self._user, cwd=self.base_dir
        )
        if self._user is not None:
            (self.base_dir / "postgres.log").touch()
        self.process.start()
        _LIVE.add(self)
        isready = bindir / "pg_isready"

        def ready() -> bool:
            res = subprocess.run(
                [str(isready), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-t", "1"],
                capture_output=True, timeout=5, check=False,
            )  # fmt: skip
            return res.returncode == 0

        _wait(f"PostgreSQL on port {self.port}", ready, timeout, self.process)
        return self

    def kill(self) -> None:
        """Hard-kill the postmaster and its backends (a crash)."""
        if self.process is not None:
            self.process.kill()

    def close(self) -> None:
        """Stop the server (fast shutdown) and delete its data."""
        if self._closed:
            return
        self._closed = True
        if self.process is not None:
            self.process.stop(timeout=20, sig=signal.SIGINT)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
