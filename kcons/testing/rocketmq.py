"""A throwaway Apache RocketMQ 5 (name server, broker, gRPC proxy) as local processes, for tests and dev.

The jars are pinned by ``kcons/testing/rocketmq_broker/pom.xml`` and resolved by
:func:`kcons.testing.install.ensure_rocketmq_jars`. Two JVMs run: the name server, and the proxy
in ``Local`` mode, which runs the broker inside its own process (one JVM less than three).
Heaps are small (name server 128 MiB, proxy + broker 512 MiB, direct memory 256 MiB) and the
broker's memory-mapped files are scaled down (64 MiB commit-log segments, 16 MiB timer log),
so a node fits beside Kafka, Redis and PostgreSQL on a 2-core machine.

The name server and the broker's remoting ports bind 127.0.0.1. RocketMQ 5.3.3 has no bind
address setting for three listeners, which therefore bind every interface: the proxy's gRPC
port, the proxy's remoting port and the broker's HA port. Everything else (data, logs, the JVMs'
``user.home``) lives under a throwaway folder.

Topics and consumer groups are created through the broker's remoting protocol
(:func:`remoting_call`) instead of the ``mqadmin`` tool, which costs a JVM start per call.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import socket
import struct
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kcons.errors import ServiceStartError
from kcons.testing.install import ensure_rocketmq_jars
from kcons.testing.local import _LIVE, ManagedProcess, _wait, stop_together

log = logging.getLogger(__name__)

__all__ = ["MESSAGE_TYPES", "RocketMqServer", "drain", "remoting_call"]

#: Message types a RocketMQ 5 topic can accept (its ``message.type`` attribute).
MESSAGE_TYPES = ("NORMAL", "FIFO", "DELAY", "TRANSACTION")

_UPDATE_AND_CREATE_TOPIC = 17
_UPDATE_AND_CREATE_SUBSCRIPTIONGROUP = 200
_GET_ROUTE = 105
_READY_LINE = b"rocketmq-proxy startup successfully"


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        buf += chunk
    return buf


def remoting_call(address: str, code: int, fields: dict[str, str], body: bytes = b"",
                  timeout: float = 10.0) -> tuple[dict[str, Any], bytes]:  # fmt: skip
    """One request/response over RocketMQ's remoting protocol (JSON header); ``(header, body)`` of the answer.

    A frame is the total length, the header length (serialisation type 0, JSON, in its high byte),
    the header and the body. Raises ServiceStartError when the answer's code is not 0 (success).
    """
    host, _, port = address.rpartition(":")
    header = json.dumps(
        {"code": code, "language": "PYTHON", "version": 0, "opaque": 1, "flag": 0, "extFields": fields}
    ).encode()
    frame = struct.pack(">II", 4 + len(header) + len(body), len(header)) + header + body
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(frame)
        (total,) = struct.unpack(">I", _read_exact(sock, 4))
        rest = _read_exact(sock, total)
    header_len = struct.unpack(">I", rest[:4])[0] & 0xFFFFFF
    answer = json.loads(rest[4 : 4 + header_len])
    if answer.get("code") != 0:
        raise ServiceStartError(f"RocketMQ request {code} failed: {answer.get('code')} {answer.get('remark')}")
    return answer, rest[4 + header_len :]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections take their local ports there)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _stable_port(taken: set[int], offsets: tuple[int, ...] = (0,)) -> int:
    """A port P with every P + offset free now and not in ``taken`` (which then gets them), below the ephemeral range.

    The broker binds its ports again when it restarts: a port in the ephemeral range can meanwhile
    become the local port of some outgoing connection, and the restart would fail to bind it.
    """
    top = _ephemeral_low() - 10
    for _ in range(200):
        port = random.randint(max(1100, top - 12000), top)
        free = not taken.intersection(port + o for o in offsets)
        for offset in offsets if free else ():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port + offset))
                except OSError:
                    free = False
                    break
        if free:
            taken.update(port + o for o in offsets)
            return port
    raise ServiceStartError("no free port below the ephemeral range for the RocketMQ node")


class RocketMqServer:
    """A throwaway RocketMQ 5 name server + broker + proxy on 127.0.0.1 (cluster ``DefaultCluster``).

    ``endpoints`` is the gRPC address the Python client (``rocketmq-python-client``) connects to.
    :meth:`kill_broker` and :meth:`restart_broker` crash and restart the broker (with the proxy,
    its host process) on the same ports and data, for fault runs.
    """

    def __init__(self, *, base_dir: Path | None = None, transaction_check_s: float = 2.0) -> None:
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="kcons-rocketmq-"))
        # The broker also listens on broker_port - 2 (its "fast" port) and broker_port + 1 (HA).
        taken: set[int] = set()
        self.namesrv_port = _stable_port(taken)
        self.broker_port = _stable_port(taken, (-2, 0, 1))
        self.ha_port = self.broker_port + 1
        self.grpc_port = _stable_port(taken)
        self.proxy_remoting_port = _stable_port(taken)
        self.broker_name = f"kcons-{uuid.uuid4().hex[:8]}"
        self.transaction_check_s = transaction_check_s
        self.namesrv: ManagedProcess | None = None
        self.proxy: ManagedProcess | None = None
        self.start_s: float | None = None  # how long the last start took
        self._jars: Path | None = None
        self._closed = False

    @property
    def endpoints(self) -> str:
        """The proxy's gRPC endpoint (``host:port``) for clients."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def namesrv_address(self) -> str:
        """The name server's address."""
        return f"127.0.0.1:{self.namesrv_port}"

    @property
    def broker_address(self) -> str:
        """The broker's remoting address (topic and group administration)."""
        return f"127.0.0.1:{self.broker_port}"

    def _write_config(self) -> None:
        base = self.base_dir
        for sub in ("store", "home"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "namesrv.conf").write_text(f"listenPort={self.namesrv_port}\nbindAddress=127.0.0.1\n")
        check_ms = max(500, int(self.transaction_check_s * 1000))
        broker = {
            "brokerClusterName": "DefaultCluster",
            "brokerName": self.broker_name,
            "brokerId": "0",
            "brokerIP1": "127.0.0.1",
            "namesrvAddr": f"127.0.0.1:{self.namesrv_port}",
            "listenPort": str(self.broker_port),
            "haListenPort": str(self.ha_port),
            "bindAddress": "127.0.0.1",
            "storePathRootDir": str(base / "store"),
            "storePathCommitLog": str(base / "store" / "commitlog"),
            "mappedFileSizeCommitLog": str(64 * 1024 * 1024),
            "mappedFileSizeTimerLog": str(16 * 1024 * 1024),
            "flushDiskType": "ASYNC_FLUSH",
            "autoCreateTopicEnable": "false",
            "autoCreateSubscriptionGroup": "true",
            # Half messages older than this are checked back with the producers of their topic.
            "transactionTimeOut": str(check_ms),
            "transactionCheckInterval": str(check_ms),
            "diskMaxUsedSpaceRatio": "95",
        }
        (base / "broker.conf").write_text("".join(f"{k}={v}\n" for k, v in broker.items()))
        proxy = {
            "rocketMQClusterName": "DefaultCluster",
            "namesrvAddr": f"127.0.0.1:{self.namesrv_port}",
            "grpcServerPort": self.grpc_port,
            "remotingListenPort": self.proxy_remoting_port,
            "proxyMode": "LOCAL",
        }
        (base / "proxy.json").write_text(json.dumps(proxy))

    def _java(self, heap: str, direct: str, main_class: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise ServiceStartError("java is not installed (needed to run the RocketMQ broker)")
        home = self.base_dir / "home"
        return [
            java, "-Xms64m", f"-Xmx{heap}", f"-XX:MaxDirectMemorySize={direct}", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
            f"-Duser.home={home}", f"-Drocketmq.home.dir={home}", "-Drocketmq.client.logUseSlf4j=false",
            "-cp", f"{self._jars}/*", main_class, *args,
        ]  # fmt: skip

    def _proxy_process(self) -> ManagedProcess:
        argv = self._java(
            "512m", "256m", "org.apache.rocketmq.proxy.ProxyStartup", "-pm", "Local",
            "-pc", str(self.base_dir / "proxy.json"), "-bc", str(self.base_dir / "broker.conf"),
        )  # fmt: skip
        return ManagedProcess("rocketmq-proxy", argv, self.base_dir / "proxy.out", cwd=self.base_dir)

    def start(self, timeout: float = 120.0) -> RocketMqServer:
        """Start the name server and the proxy with its broker; wait until the proxy serves gRPC."""
        started = time.monotonic()
        self._jars = ensure_rocketmq_jars()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        _LIVE.add(self)  # close() at exit removes what start() made, even if start() is interrupted
        self._write_config()
        argv = self._java("128m", "64m", "org.apache.rocketmq.namesrv.NamesrvStartup",
                          "-c", str(self.base_dir / "namesrv.conf"))  # fmt: skip
        self.namesrv = ManagedProcess("rocketmq-namesrv", argv, self.base_dir / "namesrv.out", cwd=self.base_dir)
        self.namesrv.start()
        self.proxy = self._proxy_process().start()
        self._wait_proxy(timeout)
        self.start_s = time.monotonic() - started
        log.info("RocketMQ %s ready in %.1fs (gRPC %s)", self.broker_name, self.start_s, self.endpoints)
        return self

    def _wait_proxy(self, timeout: float) -> None:
        assert self.proxy is not None

        def ready() -> bool:
            if _READY_LINE not in self.proxy_log().encode():
                return False
            with socket.create_connection(("127.0.0.1", self.grpc_port), timeout=1.0):
                return True

        _wait(f"RocketMQ proxy on port {self.grpc_port}", ready, timeout, self.proxy)
        if self.namesrv is not None and not self.namesrv.alive():
            raise ServiceStartError(f"the RocketMQ name server exited:\n{self.namesrv.log_tail()}")

    def proxy_log(self) -> str:
        """The proxy process's console output since its last start."""
        try:
            return (self.base_dir / "proxy.out").read_text(errors="replace")
        except OSError:
            return ""

    def create_topic(self, topic: str, message_type: str = "FIFO", queues: int = 4) -> str:
        """Create (or update) ``topic`` accepting ``message_type`` messages, with ``queues`` queues."""
        if message_type not in MESSAGE_TYPES:
            raise ValueError(f"message_type must be one of {MESSAGE_TYPES}, got {message_type!r}")
        fields = {
            "topic": topic, "defaultTopic": "TBW102", "readQueueNums": str(queues), "writeQueueNums": str(queues),
            "perm": "6", "topicFilterType": "SINGLE_TAG", "topicSysFlag": "0", "order": "false",
            "attributes": f"+message.type={message_type}",
        }  # fmt: skip
        remoting_call(self.broker_address, _UPDATE_AND_CREATE_TOPIC, fields)
        # The broker registers the topic with the name server asynchronously: wait for its route.
        route = {"topic": topic}
        _wait(f"the route of topic {topic}", lambda: bool(remoting_call(self.namesrv_address, _GET_ROUTE, route)), 30.0)
        return topic

    def create_group(self, group: str, *, fifo: bool = True, max_attempts: int = 16) -> str:
        """Create (or update) consumer ``group``; ``fifo`` delivers each message group in order."""
        config = {
            "groupName": group, "consumeEnable": True, "consumeMessageOrderly": fifo,
            "retryMaxTimes": max_attempts, "retryQueueNums": 1, "consumeBroadcastEnable": False,
        }  # fmt: skip
        remoting_call(self.broker_address, _UPDATE_AND_CREATE_SUBSCRIPTIONGROUP, {}, json.dumps(config).encode())
        return group

    def kill_broker(self) -> None:
        """Hard-kill the broker and its proxy (SIGKILL, a crash); data and ports stay for a restart."""
        if self.proxy is not None:
            self.proxy.kill()

    def restart_broker(self, timeout: float = 120.0) -> None:
        """Start the broker and proxy again after :meth:`kill_broker`, on the same ports and data."""
        if self.proxy is not None and self.proxy.alive():
            raise ServiceStartError("the RocketMQ broker is still running")
        (self.base_dir / "proxy.out").write_bytes(b"")
        self.proxy = self._proxy_process().start()
        self._wait_proxy(timeout)

    def close(self) -> None:
        """Stop the proxy (with its broker) and the name server (SIGTERM, SIGKILL after 5 s); delete the folder."""
        if self._closed:
            return
        self._closed = True
        # Both at once: the data is thrown away, so a slow shutdown hook buys nothing.
        stop_together([p for p in (self.proxy, self.namesrv) if p is not None], grace_s=5)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> RocketMqServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def drain(endpoints: str, topic: str, group: str, *, want: int, timeout: float = 60.0,
          idle_s: float = 3.0) -> list[Any]:  # fmt: skip
    """Receive and acknowledge messages of ``topic`` as ``group`` until ``want`` arrived (or ``timeout``).

    After ``want`` messages it keeps receiving until ``idle_s`` pass without one, so copies beyond
    ``want`` (at-least-once duplicates) are returned too. The messages come in delivery order.
    """
    from rocketmq import ClientConfiguration, Credentials, FilterExpression, SimpleConsumer

    config = ClientConfiguration(endpoints, Credentials(), request_timeout=10)
    consumer = SimpleConsumer(config, group, {topic: FilterExpression()}, await_duration=1)
    consumer.startup()
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    idle_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if len(got) >= want and time.monotonic() - idle_since > idle_s:
                break
            try:
                batch = consumer.receive(32, 30)
            except Exception as exc:  # settings arrive asynchronously after startup; no message is an error too
                log.debug("receive: %s", exc)
                time.sleep(0.1)
                continue
            for msg in batch:
                consumer.ack(msg)
                got.append(msg)
                idle_since = time.monotonic()
    finally:
        consumer.shutdown()
    return got
