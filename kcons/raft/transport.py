"""Authenticated asyncio TCP transport for Raft messages and client requests.

Frame: ``[u32 body length][32-byte HMAC-SHA256(secret, kind || payload)][u8 kind][payload]``.
Every frame is authenticated with the cluster secret; a frame that fails authentication, is
larger than ``max_frame`` or does not decode is dropped, counted in
``kcons_raft_frames_rejected_total{reason}`` and its connection closed; the node never crashes
on input. Replaying a captured frame is equivalent to the network duplicating a message, which
Raft tolerates by design (and client commands carry session sequence numbers, applied at most
once). The secret is never logged. Binds 127.0.0.1 unless configured otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential

from kcons.errors import ConfigError
from kcons.metrics import RAFT_FRAMES_REJECTED
from kcons.raft.codec import decode_message, encode_message
from kcons.raft.errors import FrameRejectedError
from kcons.raft.messages import Message

log = logging.getLogger(__name__)

__all__ = [
    "KIND_RAFT",
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "FrameCodec",
    "PeerAddress",
    "RaftTransport",
    "load_secret",
    "parse_peers",
]

KIND_RAFT = 1
KIND_REQUEST = 2
KIND_RESPONSE = 3
_KINDS = {KIND_RAFT, KIND_REQUEST, KIND_RESPONSE}
_LEN = struct.Struct("<I")
_MAC = 32
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


class FrameCodec:
    """Seals and opens authenticated frames."""

    def __init__(self, secret: bytes, max_frame: int = 64 << 20) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError("KCONS_RAFT_SECRET", f"the secret must be at least {MIN_SECRET_BYTES} bytes")
        self._base = hmac.new(secret, digestmod=hashlib.sha256)
        self.max_frame = max_frame

    def __repr__(self) -> str:
        return f"FrameCodec(max_frame={self.max_frame}, secret=***)"

    def _mac(self, body: bytes) -> bytes:
        h = self._base.copy()  # keyed state prepared once: cheaper than keying per frame
        h.update(body)
        return h.digest()

    def seal(self, kind: int, payload: bytes) -> bytes:
        """One frame carrying ``payload``."""
        body = bytes([kind]) + payload
        return _LEN.pack(_MAC + len(body)) + self._mac(body) + body

    def open(self, frame_body: bytes) -> tuple[int, bytes]:
        """Verify a frame body (after the length prefix); raises FrameRejectedError."""
        if len(frame_body) < _MAC + 1:
            raise FrameRejectedError("short frame")
        mac, body = frame_body[:_MAC], frame_body[_MAC:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise FrameRejectedError("authentication failed")
        kind = body[0]
        if kind not in _KINDS:
            raise FrameRejectedError(f"unknown frame kind {kind}")
        return kind, body[1:]

    async def read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        """Read and verify one frame; EOF raises asyncio.IncompleteReadError."""
        head = await reader.readexactly(_LEN.size)
        (length,) = _LEN.unpack(head)
        if length > self.max_frame:
            raise FrameRejectedError(f"frame of {length} bytes exceeds the limit")
        return self.open(await reader.readexactly(length))


def _reason(exc: FrameRejectedError) -> str:
    text = str(exc)
    if "authentication" in text:
        return "auth"
    if "exceeds" in text:
        return "oversized"
    return "malformed"


RequestHandler = Callable[[bytes], Awaitable[bytes]]


class _PeerSender:
    """One outbound connection to a peer; frames are written straight into the socket buffer.

    While the link is down, up to ``queue_limit`` frames wait for the reconnect and later ones are
    dropped; when the peer is slow and the buffer passes ``buffer_limit`` bytes, frames are dropped
    too. Raft retransmits whatever matters, so dropping is always safe.
    """

    def __init__(self, codec: FrameCodec, addr: PeerAddress, queue_limit: int, buffer_limit: int = 32 << 20) -> None:
        self.codec = codec
        self.addr = addr
        self.queue_limit = queue_limit
        self.buffer_limit = buffer_limit
        self.pending: list[bytes] = []
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.dropped = 0

    def offer(self, frame: bytes) -> None:
        w = self.writer
        if w is not None and not w.is_closing():
            if w.transport.get_write_buffer_size() > self.buffer_limit:
                self.dropped += 1
                return
            w.write(frame)
        elif len(self.pending) < self.queue_limit:
            self.pending.append(frame)
        else:
            self.dropped += 1

    async def run(self) -> None:
        while True:
            reader, writer = await self._connect()
            try:
                if self.pending:
                    writer.write(b"".join(self.pending))
                    self.pending.clear()
                self.writer = writer
                # The peer never writes on this link: a read returns only when it closes or breaks.
                while await reader.read(4096):
                    pass
            except (OSError, ConnectionError):
                pass
            finally:
                self.writer = None
                log.debug("raft link to %s closed; reconnecting", self.addr)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(OSError),
            wait=wait_exponential(multiplier=0.02, max=0.5),
            stop=stop_never,
            reraise=True,
        ):
            with attempt:
                reader, writer = await asyncio.open_connection(self.addr.host, self.addr.port)
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return reader, writer
        raise AssertionError("unreachable")


class RaftTransport:
    """Listens for peers and clients; sends Raft messages to peers over persistent connections."""

    def __init__(
        self,
        node_id: int,
        peers: Mapping[int, PeerAddress],
        secret: bytes,
        on_message: Callable[[Message], None],
        on_request: RequestHandler,
        listen: PeerAddress | None = None,
        queue_limit: int = 10_000,
    ) -> None:
        self.node_id = node_id
        self.codec = FrameCodec(secret)
        self.peers = dict(peers)
        self.listen = listen or self.peers[node_id]
        self.on_message = on_message
        self.on_request = on_request
        self._senders = {
            pid: _PeerSender(self.codec, addr, queue_limit) for pid, addr in self.peers.items() if pid != node_id
        }
        self._server: asyncio.Server | None = None
        self._conn_writers: set[asyncio.StreamWriter] = set()
        self.rejected = 0

    async def start(self) -> None:
        """Bind the listening socket and start the peer senders."""
        self._server = await asyncio.start_server(self._serve, self.listen.host, self.listen.port)
        for s in self._senders.values():
            s.task = asyncio.create_task(s.run(), name=f"raft-send-{s.addr}")

    async def stop(self) -> None:
        """Close the listener, connections and senders."""
        if self._server is not None:
            self._server.close()
        for w in list(self._conn_writers):
            w.close()  # the serving tasks see EOF and return on their own
        tasks = [s.task for s in self._senders.values() if s.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def send(self, messages: list[Message]) -> None:
        """Queue messages for their destinations (fire and forget)."""
        seal = self.codec.seal
        for m in messages:
            sender = self._senders.get(m.dst)
            if sender is not None:
                sender.offer(seal(KIND_RAFT, encode_message(m)))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conn_writers.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending: set[asyncio.Task[None]] = set()
        buf = bytearray()
        codec = self.codec
        try:
            while True:
                chunk = await reader.read(1 << 18)
                if not chunk:
                    return
                buf += chunk
                # Handle every complete frame in the buffer: one wake-up per TCP read, not per frame.
                while len(buf) >= 4:
                    (length,) = _LEN.unpack_from(buf, 0)
                    try:
                        if length > codec.max_frame:
                            raise FrameRejectedError(f"frame of {length} bytes exceeds the limit")
                        if len(buf) < 4 + length:
                            break
                        body = bytes(buf[4 : 4 + length])
                        del buf[: 4 + length]
                        kind, payload = codec.open(body)
                        if kind == KIND_RAFT:
                            self.on_message(decode_message(payload))
                        elif kind == KIND_REQUEST:
                            t = asyncio.create_task(self._answer(payload, writer))
                            pending.add(t)
                            t.add_done_callback(pending.discard)
                        else:
                            raise FrameRejectedError("unexpected frame kind from a peer")
                    except FrameRejectedError as exc:
                        self.rejected += 1
                        RAFT_FRAMES_REJECTED.labels(_reason(exc)).inc()
                        peer = writer.get_extra_info("peername")
                        log.warning("raft transport: dropped a frame from %s (%s); closing", peer, exc)
                        return
        except (ConnectionError, OSError):
            return
        finally:
            for t in pending:
                t.cancel()
            writer.close()
            self._conn_writers.discard(writer)

    async def _answer(self, payload: bytes, writer: asyncio.StreamWriter) -> None:
        # The payload starts with an 8-byte request id that the response echoes.
        rid, body = payload[:8], payload[8:]
        response = await self.on_request(body)
        if writer.is_closing():
            return
        writer.write(self.codec.seal(KIND_RESPONSE, rid + response))
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
