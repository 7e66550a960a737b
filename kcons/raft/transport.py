"""Session-authenticated asyncio TCP transport for Raft messages and client requests (wire version 2).

Every connection starts with a handshake that proves both sides hold the cluster secret and
makes fresh keys for this connection only:

1. initiator -> responder, HELLO (48 bytes): ``KRFT``, version 2, role (peer or client), the
   initiator's node id (0 for clients), the responder id it expects, a fresh 32-byte nonce.
2. responder -> initiator, ACK (80 bytes): ``KRFT``, version, the responder's node id, its own
   fresh nonce, and HMAC-SHA256(secret, "ack" || HELLO || ACK head).
3. initiator -> responder, CONFIRM (32 bytes): HMAC-SHA256(secret, "confirm" || HELLO || ACK head).

Each direction then has its own key, HMAC(secret, direction || HELLO || ACK head), and every frame
is ``[u32 length][u64 sequence][u8 kind][payload][HMAC-SHA256(key, everything before it)]`` with
the sequence number starting at 1 and growing by exactly one per frame. A recorded frame or a
whole recorded conversation is therefore worthless: on a new connection the other side's nonce
differs, so the keys differ; on the same connection its sequence number is spent. A client's
answer is bound to its connection's keys and to the request id it echoes.

Resources are bounded: at most ``max_connections`` connections (more are closed at once), the
handshake must finish within ``handshake_timeout`` (before it, no more than 80 bytes are ever
buffered), a connection that completes no frame for ``idle_timeout`` while nothing is pending is
closed (this also ends slow-drip connections), frames are limited to ``max_frame`` bytes from
peers and ``max_request`` from clients. Anything rejected is counted in
``kcons_raft_frames_rejected_total{reason}`` and its connection closed; the WARNING about it is
rate-limited. The node never crashes on input. The secret is never logged. Binds 127.0.0.1
unless configured otherwise. Bodies are not encrypted unless TLS is configured
(:class:`TlsFiles`, ``KCONS_RAFT_TLS_*``); without it, run the cluster on a private network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential

from kcons.errors import ConfigError
from kcons.metrics import RAFT_FRAMES_REJECTED
from kcons.raft.codec import decode_message, encode_message
from kcons.raft.errors import FrameRejectedError
from kcons.raft.messages import Message, MsgType

log = logging.getLogger(__name__)

__all__ = [
    "ACK_SIZE",
    "APPEND_PACE_BYTES",
    "HELLO_SIZE",
    "INLINE_APPEND_ENTRIES",
    "KIND_RAFT",
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "ROLE_CLIENT",
    "ROLE_PEER",
    "WIRE_VERSION",
    "Handshake",
    "PeerAddress",
    "RaftTransport",
    "Session",
    "TlsFiles",
    "client_session",
    "load_secret",
    "parse_peers",
    "read_frame",
]

WIRE_VERSION = 2
KIND_RAFT = 1
KIND_REQUEST = 2
KIND_RESPONSE = 3
ROLE_PEER = 1
ROLE_CLIENT = 2
_LEN = struct.Struct("<I")
_FRAME_HEAD = struct.Struct("<IQB")  # length, sequence, kind
_HELLO = struct.Struct("<4sBBHII32s")  # magic, version, role, reserved, sender id, expected/own id, nonce
_MAGIC = b"KRFT"
_MAC = 32
HELLO_SIZE = _HELLO.size
ACK_SIZE = _HELLO.size + _MAC
MIN_SECRET_BYTES = 16


def load_secret(secret_file: str | None = None, environ: Mapping[str, str] | None = None) -> bytes:
    """The cluster secret from ``secret_file`` or ``KCONS_RAFT_SECRET``; refuses to run without one."""
    env = os.environ if environ is None else environ
    if secret_file:
        try:
            raw = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError("--secret-file", f"cannot read the secret file: {exc.strerror}") from None
        setting = "--secret-file"
    else:
        raw = (env.get("KCONS_RAFT_SECRET") or "").strip().encode()
        setting = "KCONS_RAFT_SECRET"
    if not raw:
        raise ConfigError(setting, "a cluster secret is required (every Raft frame is authenticated with it)")
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(setting, f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    return raw


@dataclass(frozen=True)
class PeerAddress:
    """Where a node listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_peers(spec: str, setting: str = "--peers") -> dict[int, PeerAddress]:
    """Parse ``1=127.0.0.1:7001,2=127.0.0.1:7002``; ConfigError names the setting on bad input."""
    peers: dict[int, PeerAddress] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ident, addr = part.split("=", 1)
            host, port = addr.rsplit(":", 1)
            node_id, port_no = int(ident), int(port)
        except ValueError:
            raise ConfigError(setting, f"expected id=host:port, got {part!r}") from None
        if node_id <= 0 or not 0 < port_no < 65536 or not host:
            raise ConfigError(setting, f"bad node id, host or port in {part!r}")
        peers[node_id] = PeerAddress(host, port_no)
    if not peers:
        raise ConfigError(setting, "no peers given")
    return peers


@dataclass(frozen=True)
class TlsFiles:
    """Optional TLS for confidentiality (the session handshake still authenticates): PEM files.

    Nodes present ``cert``/``key``; nodes and clients verify the server's certificate against
    ``ca`` (the chain only: peers are addressed by IP, so host names are not checked).
    """

    cert: str | None
    key: str | None
    ca: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, server: bool = True) -> TlsFiles | None:
        """``KCONS_RAFT_TLS_CA`` (and, for a node, ``KCONS_RAFT_TLS_CERT``/``_KEY``); None when unset."""
        env = os.environ if environ is None else environ
        ca = (env.get("KCONS_RAFT_TLS_CA") or "").strip()
        cert = (env.get("KCONS_RAFT_TLS_CERT") or "").strip() or None
        key = (env.get("KCONS_RAFT_TLS_KEY") or "").strip() or None
        if not ca and not cert and not key:
            return None
        if not ca:  # the first thing missing is named first
            raise ConfigError("KCONS_RAFT_TLS_CA", "TLS needs the CA file that signed the nodes' certificates")
        for setting, path in (("KCONS_RAFT_TLS_CA", ca), ("KCONS_RAFT_TLS_CERT", cert), ("KCONS_RAFT_TLS_KEY", key)):
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ConfigError(setting, f"cannot read the file {path!r}")
        if server and not (cert and key):
            raise ConfigError("KCONS_RAFT_TLS_CERT", "a node needs KCONS_RAFT_TLS_CERT and KCONS_RAFT_TLS_KEY for TLS")
        files = cls(cert, key, ca)
        files.client_context()  # refuse unreadable files at start, naming the setting
        if server:
            files.server_context()
        return files

    def server_context(self) -> ssl.SSLContext:
        """The listening side's context (TLS 1.2 or later)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert or "", self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("KCONS_RAFT_TLS_CERT", f"cannot load the certificate or key: {exc}") from None
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The connecting side's context: the server's chain must lead to ``ca``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("KCONS_RAFT_TLS_CA", f"cannot load the CA file: {exc}") from None
        return ctx


def _hmac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


class Session:
    """The keys and sequence numbers of one authenticated connection (one side's view)."""

    __slots__ = ("_recv", "_recv_seq", "_send", "_send_seq", "peer_id", "role")

    def __init__(self, send_key: bytes, recv_key: bytes, role: int, peer_id: int) -> None:
        self._send = hmac.new(send_key, digestmod=hashlib.sha256)  # keyed once, copied per frame
        self._recv = hmac.new(recv_key, digestmod=hashlib.sha256)
        self._send_seq = 0
        self._recv_seq = 0
        self.role = role
        self.peer_id = peer_id

    def __repr__(self) -> str:
        return f"Session(role={self.role}, peer_id={self.peer_id}, keys=***)"

    def seal(self, kind: int, payload: bytes) -> bytes:
        """One frame carrying ``payload`` with the next sequence number."""
        self._send_seq += 1
        head = _FRAME_HEAD.pack(_FRAME_HEAD.size - 4 + len(payload) + _MAC, self._send_seq, kind)
        h = self._send.copy()
        h.update(head)
        h.update(payload)
        return b"".join([head, payload, h.digest()])

    def open(self, frame: bytes) -> tuple[int, bytes]:
        """Verify a whole frame (length prefix included); raises FrameRejectedError."""
        if len(frame) < _FRAME_HEAD.size + _MAC:
            raise FrameRejectedError("short frame")
        h = self._recv.copy()
        h.update(memoryview(frame)[:-_MAC])
        if not hmac.compare_digest(h.digest(), frame[-_MAC:]):
            raise FrameRejectedError("authentication failed", reason="auth")
        _, seq, kind = _FRAME_HEAD.unpack_from(frame)
        if seq != self._recv_seq + 1:
            raise FrameRejectedError(f"sequence {seq} after {self._recv_seq}: replayed or reordered", reason="replay")
        self._recv_seq = seq
        return kind, frame[_FRAME_HEAD.size : -_MAC]


class Handshake:
    """The three-message handshake (see the module docstring); pure, no I/O."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError("KCONS_RAFT_SECRET", f"the secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "Handshake(secret=***)"

    def _keys(self, transcript: bytes, initiator: bool, role: int, peer_id: int) -> Session:
        i2r = _hmac(self._secret, b"kcons-raft/2 i2r", transcript)
        r2i = _hmac(self._secret, b"kcons-raft/2 r2i", transcript)
        return Session(i2r, r2i, role, peer_id) if initiator else Session(r2i, i2r, role, peer_id)

    @staticmethod
    def hello(role: int, own_id: int, expect_id: int) -> bytes:
        """The initiator's first message, with a fresh nonce."""
        return _HELLO.pack(_MAGIC, WIRE_VERSION, role, 0, own_id, expect_id, os.urandom(32))

    def accept(self, hello: bytes, own_id: int) -> tuple[bytes, bytes, int, int]:
        """Responder: check HELLO; returns (ACK, transcript, role, initiator id)."""
        magic, version, role, _, sender, expect, _ = _HELLO.unpack(hello)
        if magic != _MAGIC or version != WIRE_VERSION:
            raise FrameRejectedError(f"not a kcons Raft wire-version-{WIRE_VERSION} hello", reason="handshake")
        if role not in (ROLE_PEER, ROLE_CLIENT) or expect not in (0, own_id):
            raise FrameRejectedError("hello for another role or node", reason="handshake")
        head = _HELLO.pack(_MAGIC, WIRE_VERSION, 0, 0, own_id, 0, os.urandom(32))
        transcript = hello + head
        return head + _hmac(self._secret, b"kcons-raft/2 ack", transcript), transcript, role, sender

    def responder_session(self, transcript: bytes, confirm: bytes, role: int, sender: int) -> Session:
        """Responder: check CONFIRM; returns the session."""
        if not hmac.compare_digest(confirm, _hmac(self._secret, b"kcons-raft/2 confirm", transcript)):
            raise FrameRejectedError("handshake authentication failed", reason="auth")
        return self._keys(transcript, False, role, sender)

    def initiator_session(self, hello: bytes, ack: bytes, role: int, expect_id: int) -> tuple[bytes, Session]:
        """Initiator: check ACK (the responder knows the secret and is ``expect_id``); returns (CONFIRM, session)."""
        head, mac = ack[: _HELLO.size], ack[_HELLO.size :]
        transcript = hello + head
        if not hmac.compare_digest(mac, _hmac(self._secret, b"kcons-raft/2 ack", transcript)):
            raise FrameRejectedError("the responder failed authentication", reason="auth")
        magic, version, _, _, responder, _, _ = _HELLO.unpack(head)
        if magic != _MAGIC or version != WIRE_VERSION or (expect_id and responder != expect_id):
            raise FrameRejectedError(f"answered by node {responder}, expected {expect_id}", reason="handshake")
        confirm = _hmac(self._secret, b"kcons-raft/2 confirm", transcript)
        return confirm, self._keys(transcript, True, role, responder)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf.extend(chunk)
    return bytes(buf)


def client_session(sock: socket.socket, handshake: Handshake, role: int, own_id: int, expect_id: int) -> Session:
    """Run the initiator's side of the handshake on a connected blocking socket."""
    hello = handshake.hello(role, own_id, expect_id)
    sock.sendall(hello)
    confirm, session = handshake.initiator_session(hello, _recv_exact(sock, ACK_SIZE), role, expect_id)
    sock.sendall(confirm)
    return session


def read_frame(sock: socket.socket, session: Session, max_frame: int) -> tuple[int, bytes]:
    """Read and verify one frame from a blocking socket."""
    head = _recv_exact(sock, _LEN.size)
    (length,) = _LEN.unpack(head)
    if length > max_frame:
        raise FrameRejectedError(f"frame of {length} bytes exceeds the limit", reason="oversized")
    return session.open(head + _recv_exact(sock, length))


class _WarnLimiter:
    """At most one WARNING per ``interval`` seconds; the rest are counted and summarised."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = -interval
        self._suppressed = 0

    def warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        log.warning(msg + " (%d similar suppressed)", *args, suppressed)


RequestHandler = Callable[[bytes], Awaitable[bytes]]

#: An append with more entries than this is encoded by the peer's append task, not inline.
INLINE_APPEND_ENTRIES = 64
#: Past this many bytes waiting in a peer's socket buffer, the append task lets it drain first.
APPEND_PACE_BYTES = 1 << 20


class _PeerSender:
    """One outbound connection to a peer; frames are sealed and written straight into the socket buffer.

    While the link is down, up to ``queue_limit`` messages wait for the reconnect and later ones are
    dropped; when the peer is slow and the buffer passes ``buffer_limit`` bytes, messages are dropped
    too. Raft retransmits whatever matters, so dropping is always safe.

    Large appends (a follower catching up) never run on the caller's turn of the event loop: they
    queue, in order, for the peer's append task, which encodes one, writes it, yields, and, when
    more than ``pace_bytes`` wait in the socket buffer, lets it drain (asyncio's write-buffer
    limits) before the next. Heartbeats, votes and
    answers are written at once, so they overtake the catch-up backlog and wait behind at most
    about ``pace_bytes`` of it on the wire. While appends are queued, small appends queue behind
    them: appends to one follower keep their order.
    """

    def __init__(
        self,
        handshake: Handshake,
        own_id: int,
        peer_id: int,
        addr: PeerAddress,
        queue_limit: int,
        timeout: float,
        buffer_limit: int = 32 << 20,
        tls: ssl.SSLContext | None = None,
        pace_bytes: int = APPEND_PACE_BYTES,
    ) -> None:
        self.tls = tls
        self.pace_bytes = pace_bytes
        self.appends: deque[Message] = deque()
        self.append_task: asyncio.Task[None] | None = None
        self.handshake = handshake
        self.own_id = own_id
        self.peer_id = peer_id
        self.addr = addr
        self.queue_limit = queue_limit
        self.timeout = timeout
        self.buffer_limit = buffer_limit
        self.pending: list[bytes] = []
        self.writer: asyncio.StreamWriter | None = None
        self.session: Session | None = None
        self.task: asyncio.Task[None] | None = None
        self.dropped = 0

    def offer(self, payload: bytes) -> None:
        w = self.writer
        if w is not None and self.session is not None and not w.is_closing():
            if w.transport.get_write_buffer_size() > self.buffer_limit:
                self.dropped += 1
                return
            w.write(self.session.seal(KIND_RAFT, payload))
        elif len(self.pending) < self.queue_limit:
            self.pending.append(payload)
        else:
            self.dropped += 1

    def queue_append(self, m: Message) -> None:
        """Hand an append to the append task (started on demand); dropped beyond ``queue_limit``."""
        if len(self.appends) >= self.queue_limit:
            self.dropped += 1
            return
        self.appends.append(m)
        if self.append_task is None or self.append_task.done():
            self.append_task = asyncio.get_running_loop().create_task(
                self._write_appends(), name=f"raft-append-{self.addr}"
            )

    async def _write_appends(self) -> None:
        """Encode and write queued appends one at a time, yielding to the loop between them."""
        while self.appends:
            self.offer(encode_message(self.appends.popleft()))
            await asyncio.sleep(0)
            w = self.writer
            if w is not None and not w.is_closing():
                with contextlib.suppress(ConnectionError, OSError):
                    await w.drain()  # returns at once unless more than pace_bytes wait in the buffer

    def cancel(self) -> list[asyncio.Task[None]]:
        """Cancel this sender's tasks; returns them to be awaited."""
        tasks = [t for t in (self.task, self.append_task) if t is not None]
        for t in tasks:
            t.cancel()
        self.appends.clear()
        return tasks

    async def run(self) -> None:
        while True:
            reader, writer, session = await self._connect()
            try:
                if self.pending:
                    writer.write(b"".join(session.seal(KIND_RAFT, p) for p in self.pending))
                    self.pending.clear()
                writer.transport.set_write_buffer_limits(high=self.pace_bytes)  # the append task's pace
                self.writer, self.session = writer, session
                # The peer never writes after the handshake: a read returns only when it closes or breaks.
                while await reader.read(4096):
                    pass
            except (OSError, ConnectionError):
                pass
            finally:
                self.writer = self.session = None
                log.debug("raft link to %s closed; reconnecting", self.addr)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Session]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((OSError, FrameRejectedError, TimeoutError, asyncio.IncompleteReadError)),
            wait=wait_exponential(multiplier=0.02, max=0.5),
            stop=stop_never,
            reraise=True,
        ):
            with attempt:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.addr.host, self.addr.port, ssl=self.tls), self.timeout
                )
                try:
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    hello = self.handshake.hello(ROLE_PEER, self.own_id, self.peer_id)
                    writer.write(hello)
                    ack = await asyncio.wait_for(reader.readexactly(ACK_SIZE), self.timeout)
                    confirm, session = self.handshake.initiator_session(hello, ack, ROLE_PEER, self.peer_id)
                    writer.write(confirm)
                except BaseException:
                    writer.close()
                    raise
                return reader, writer, session
        raise AssertionError("unreachable")


@dataclass(eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    last: float
    pending: int = 0


class RaftTransport:
    """Listens for peers and clients; sends Raft messages to peers over persistent sessions."""

    def __init__(
        self,
        node_id: int,
        peers: Mapping[int, PeerAddress],
        secret: bytes,
        on_message: Callable[[Message], None],
        on_request: RequestHandler,
        listen: PeerAddress | None = None,
        queue_limit: int = 10_000,
        *,
        max_connections: int = 256,
        handshake_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        max_frame: int = 64 << 20,
        max_request: int = 1 << 20,
        max_pending_requests: int = 1024,
        tls: TlsFiles | None = None,
    ) -> None:
        self.node_id = node_id
        self.tls = tls
        self._server_tls = tls.server_context() if tls is not None else None
        client_tls = tls.client_context() if tls is not None else None
        self.handshake = Handshake(secret)
        self.peers = dict(peers)
        self.listen = listen or self.peers[node_id]
        self.on_message = on_message
        self.on_request = on_request
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_frame = max_frame
        self.max_request = max_request
        self.max_pending_requests = max_pending_requests
        self._senders = {
            pid: _PeerSender(self.handshake, node_id, pid, addr, queue_limit, handshake_timeout, tls=client_tls)
            for pid, addr in self.peers.items()
            if pid != node_id
        }
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._warn = _WarnLimiter()
        self.rejected = 0

    async def start(self) -> None:
        """Bind the listening socket and start the peer senders."""
        self._server = await asyncio.start_server(
            self._serve,
            self.listen.host,
            self.listen.port,
            ssl=self._server_tls,
            ssl_handshake_timeout=self.handshake_timeout if self._server_tls is not None else None,
        )
        for s in self._senders.values():
            s.task = asyncio.create_task(s.run(), name=f"raft-send-{s.addr}")
        self._watchdog = asyncio.create_task(self._close_idle(), name=f"raft-idle-{self.node_id}")

    async def stop(self) -> None:
        """Close the listener, connections and senders."""
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.writer.close()  # the serving tasks see EOF and return on their own
        tasks = [t for s in self._senders.values() for t in s.cancel()]
        if self._watchdog is not None:
            self._watchdog.cancel()
            tasks.append(self._watchdog)
        # A cancellation that lands as a reconnect's wait_for completes can be swallowed (Python
        # before 3.12), leaving the sender retrying forever: cancel again until every task ended.
        pending = {t for t in tasks if not t.done()}
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.2)
            for t in pending:
                t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def send(self, messages: list[Message]) -> None:
        """Queue messages for their destinations (fire and forget).

        Small messages are encoded and written now; an append of more than
        :data:`INLINE_APPEND_ENTRIES` entries, and any append behind one, goes to the peer's
        append task, so a catch-up costs the caller no more than a small message does.
        """
        for m in messages:
            sender = self._senders.get(m.dst)
            if sender is None:
                continue
            if m.type is MsgType.APP and (sender.appends or len(m.entries) > INLINE_APPEND_ENTRIES):
                sender.queue_append(m)
            else:
                sender.offer(encode_message(m))

    def connections(self) -> int:
        """Connections being served now."""
        return len(self._conns)

    def _reject(self, reason: str, detail: object, writer: asyncio.StreamWriter) -> None:
        self.rejected += 1
        RAFT_FRAMES_REJECTED.labels(reason).inc()
        self._warn.warn(
            "raft transport: rejected a connection from %s (%s: %s)", writer.get_extra_info("peername"), reason, detail
        )

    async def _close_idle(self) -> None:
        """Close connections that completed no frame for ``idle_timeout`` with nothing pending."""
        loop = asyncio.get_running_loop()
        period = max(0.05, min(1.0, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for c in list(self._conns):
                if c.pending == 0 and now - c.last > self.idle_timeout:
                    log.debug("raft transport: closing an idle connection")
                    c.writer.close()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Session:
        hello = await reader.readexactly(HELLO_SIZE)
        ack, transcript, role, sender = self.handshake.accept(hello, self.node_id)
        if role == ROLE_PEER and (sender == self.node_id or sender not in self.peers):
            raise FrameRejectedError(f"node {sender} is not a peer", reason="unknown_node")
        writer.write(ack)
        confirm = await reader.readexactly(_MAC)
        return self.handshake.responder_session(transcript, confirm, role, sender)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        if len(self._conns) >= self.max_connections:
            self._reject("connections", f"more than {self.max_connections} connections", writer)
            writer.close()
            return
        conn = _Conn(writer, loop.time())
        self._conns.add(conn)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending: set[asyncio.Task[None]] = set()
        try:
            try:
                session = await asyncio.wait_for(self._handshake(reader, writer), self.handshake_timeout)
            except TimeoutError:
                raise FrameRejectedError("handshake not finished in time", reason="timeout") from None
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise FrameRejectedError("connection closed during the handshake", reason="handshake") from None
                return  # connected and left without a word: a health probe
            conn.last = loop.time()
            peer = session.role == ROLE_PEER
            limit = self.max_frame if peer else self.max_request
            buf = bytearray()
            while True:
                chunk = await reader.read(1 << 18)
                if not chunk:
                    return
                buf += chunk
                # Handle every complete frame in the buffer: one wake-up per TCP read, not per frame.
                while len(buf) >= 4:
                    (length,) = _LEN.unpack_from(buf, 0)
                    if length > limit:
                        raise FrameRejectedError(f"frame of {length} bytes exceeds {limit}", reason="oversized")
                    if len(buf) < 4 + length:
                        break
                    frame = bytes(buf[: 4 + length])
                    del buf[: 4 + length]
                    kind, payload = session.open(frame)
                    conn.last = loop.time()
                    if peer and kind == KIND_RAFT:
                        m = decode_message(payload)
                        if m.src != session.peer_id or m.dst != self.node_id:
                            raise FrameRejectedError(
                                f"message {m.src}->{m.dst} on node {session.peer_id}'s link", reason="unknown_node"
                            )
                        self.on_message(m)
                    elif not peer and kind == KIND_REQUEST:
                        if len(pending) >= self.max_pending_requests:
                            raise FrameRejectedError("too many requests in flight", reason="overload")
                        t = asyncio.create_task(self._answer(payload, session, writer, conn))
                        pending.add(t)
                        conn.pending += 1
                        t.add_done_callback(pending.discard)
                    else:
                        raise FrameRejectedError(f"frame kind {kind} on a {'peer' if peer else 'client'} link")
        except FrameRejectedError as exc:
            self._reject(exc.reason, exc, writer)
        except (ConnectionError, OSError):
            return
        finally:
            for t in pending:
                t.cancel()
            writer.close()
            self._conns.discard(conn)

    async def _answer(self, payload: bytes, session: Session, writer: asyncio.StreamWriter, conn: _Conn) -> None:
        # The payload starts with an 8-byte request id that the response echoes.
        try:
            rid, body = payload[:8], payload[8:]
            response = await self.on_request(body)
            if writer.is_closing():
                return
            writer.write(session.seal(KIND_RESPONSE, rid + response))
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
        finally:
            conn.pending -= 1
            conn.last = asyncio.get_running_loop().time()
