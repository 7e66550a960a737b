"""A blocking client of the Raft metadata store: finds the leader, follows redirects, retries.

Writes carry a client session ``(client_id, seq)``; the state machine applies a sequence number
at most once and returns the first outcome to a retry, so retrying a write whose answer was lost
(leader crash, timeout) never applies it twice. Reads go to the leader and are linearizable
(ReadIndex) unless ``lease=True`` is asked for. Thread-safe: one request at a time.

Each connection is a session (see :mod:`kcons.raft.transport`): the node proves it holds the
cluster secret and is the node asked for, and an answer counts only if it is sealed with this
connection's keys and echoes the request id, so a recorded answer from an earlier process is
refused. A pooled connection the node has closed (idle timeout) is replaced before use.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from kcons.errors import TimeoutExceededError
from kcons.raft.errors import FrameRejectedError, NodeUnreachableError, RaftError
from kcons.raft.transport import (
    KIND_REQUEST,
    KIND_RESPONSE,
    ROLE_CLIENT,
    Handshake,
    PeerAddress,
    Session,
    client_session,
    parse_peers,
    read_frame,
)

__all__ = ["KvResult", "RaftClient", "RequestRefusedError"]

_MAX_RESPONSE = 64 << 20


class RequestRefusedError(RaftError):
    """The cluster answered with an error that retrying cannot fix (bad request, unknown op)."""


class _TryAgain(Exception):
    pass


@dataclass(frozen=True)
class KvResult:
    """A value read from the store with its version and the revision that wrote it."""

    value: str
    version: int
    mod_revision: int


class RaftClient:
    """Talks to any node; ``timeout`` bounds each call including retries and redirects."""

    def __init__(
        self,
        peers: Mapping[int, PeerAddress] | str,
        secret: bytes,
        timeout: float = 10.0,
        request_timeout: float = 3.0,
        client_id: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.peers = parse_peers(peers) if isinstance(peers, str) else dict(peers)
        self._handshake = Handshake(secret)
        self._tls = tls
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.client_id = client_id or uuid.uuid4().hex
        self._seq = 0
        self._leader: int | None = None
        self._order = sorted(self.peers)
        self._next = 0
        self._socks: dict[int, tuple[socket.socket, Session]] = {}
        self._lock = threading.Lock()
        self._rid = 0

    def __repr__(self) -> str:
        return f"RaftClient(peers={sorted(self.peers)}, client_id={self.client_id!r})"

    # -- plumbing ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection."""
        for s, _ in self._socks.values():
            s.close()
        self._socks.clear()

    def __enter__(self) -> RaftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop(self, node: int) -> None:
        pair = self._socks.pop(node, None)
        if pair is not None:
            pair[0].close()

    def _connection(self, node: int) -> tuple[socket.socket, Session]:
        pair = self._socks.get(node)
        if pair is not None:
            readable, _, _ = select.select([pair[0]], [], [], 0)
            if not readable:
                return pair
            self._drop(node)  # closed by the node (idle) or unexpected bytes: start a new session
        addr = self.peers[node]
        s = socket.create_connection((addr.host, addr.port), timeout=self.request_timeout)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                s = self._tls.wrap_socket(s, server_hostname=addr.host)
            session = client_session(s, self._handshake, ROLE_CLIENT, 0, node)
        except BaseException:
            s.close()
            raise
        self._socks[node] = (s, session)
        return s, session

    def call_node(self, node: int, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request to one node and return its JSON answer (no retries).

        Raises RequestRefusedError for a node id not in the peer list, NodeUnreachableError when
        the node cannot be reached, FrameRejectedError for an answer that is not one.
        """
        if node not in self.peers:
            raise RequestRefusedError(f"node {node} is not in the peer list {sorted(self.peers)}")
        self._rid += 1
        rid = self._rid.to_bytes(8, "big")
        try:
            s, session = self._connection(node)
            s.settimeout(self.request_timeout)
            s.sendall(session.seal(KIND_REQUEST, rid + json.dumps(req, separators=(",", ":")).encode()))
            while True:
                kind, payload = read_frame(s, session, _MAX_RESPONSE)
                if kind != KIND_RESPONSE:
                    raise FrameRejectedError("unexpected frame kind")
                if payload[:8] == rid:
                    answer: dict[str, Any] = json.loads(payload[8:])
                    return answer
        except (OSError, FrameRejectedError) as exc:
            self._drop(node)
            if isinstance(exc, OSError) and not isinstance(exc, NodeUnreachableError):
                raise NodeUnreachableError(f"node {node} ({self.peers[node]}): {exc}") from exc
            raise
        except ValueError as exc:  # an authenticated answer that is not JSON
            self._drop(node)
            raise FrameRejectedError(f"node {node}: malformed answer ({exc})") from exc

    def _target(self) -> int:
        if self._leader is not None and self._leader in self.peers:
            return self._leader
        node = self._order[self._next % len(self._order)]
        self._next += 1
        return node

    def request(self, req: dict[str, Any], write: bool = False) -> dict[str, Any]:
        """Send ``req`` to the leader, following redirects and retrying until ``timeout``."""
        with self._lock:
            if write:
                self._seq += 1
                req = {**req, "client": self.client_id, "seq": self._seq}
            try:
                for attempt in Retrying(
                    retry=retry_if_exception_type(_TryAgain),
                    wait=wait_exponential(multiplier=0.01, max=0.3),
                    stop=stop_after_delay(self.timeout),
                    reraise=True,
                ):
                    with attempt:
                        return self._attempt(req)
            except _TryAgain as exc:
                raise TimeoutExceededError(f"raft request {req.get('op')!r} did not succeed: {exc}") from None
            raise AssertionError("unreachable")

    def _attempt(self, req: dict[str, Any]) -> dict[str, Any]:
        node = self._target()
        try:
            answer = self.call_node(node, req)
        except (OSError, ConnectionError, FrameRejectedError, ValueError) as exc:
            self._leader = None
            raise _TryAgain(f"node {node}: {exc}") from None
        err = answer.get("error")
        if err is None:
            self._leader = node
            return answer
        if err == "not_leader":
            leader = answer.get("leader") or None
            self._leader = leader if leader != node else None
            raise _TryAgain(f"node {node} is not the leader")
        if err in ("dropped", "unknown_outcome"):
            self._leader = None
            raise _TryAgain(f"node {node}: {answer.get('detail', err)}")
        raise RequestRefusedError(f"{err}: {answer.get('detail', '')}")

    # -- the store ---------------------------------------------------------------------------
    def get(self, key: str, lease: bool = False, at_node: int | None = None) -> KvResult | None:
        """The value at ``key`` (linearizable; ``lease=True`` trusts the leader lease).

        ``at_node`` reads at that node even if it follows (it forwards a ReadIndex request to the
        leader and answers from its own state once caught up): still linearizable, no redirect.
        """
        if at_node is not None:
            with self._lock:
                a = self.call_node(at_node, {"op": "get", "key": key, "lease": lease, "follower": True})
            if a.get("error"):
                raise RequestRefusedError(f"{a['error']}: node {at_node} cannot serve the read now")
        else:
            a = self.request({"op": "get", "key": key, "lease": lease})
        if not a.get("found"):
            return None
        return KvResult(a["value"], int(a["version"]), int(a["mod_revision"]))

    def put(self, key: str, value: str) -> int:
        """Write ``value``; returns the key's new version."""
        return int(self.request({"op": "put", "key": key, "value": value}, write=True)["version"])

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        return bool(self.request({"op": "delete", "key": key}, write=True).get("deleted"))

    def cas(self, key: str, expected_version: int, value: str) -> tuple[bool, int]:
        """Write only if the key's version is ``expected_version`` (0: absent); (written, version now)."""
        a = self.request({"op": "cas", "key": key, "version": expected_version, "value": value}, write=True)
        return bool(a["ok"]), int(a["version"])

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> dict[str, Any]:
        """Try to take lease ``name``; ``ok`` and a fencing ``token`` when granted."""
        return self.request({"op": "lease_acquire", "name": name, "holder": holder, "ttl": ttl_s}, write=True)

    def renew_lease(self, name: str, token: int, ttl_s: float) -> bool:
        """Extend a held lease; False when it was lost."""
        a = self.request({"op": "lease_renew", "name": name, "token": token, "ttl": ttl_s}, write=True)
        return bool(a.get("ok"))

    def release_lease(self, name: str, token: int) -> bool:
        """Give a lease up; False if it was no longer held with ``token``."""
        return bool(self.request({"op": "lease_release", "name": name, "token": token}, write=True).get("ok"))

    def members(self) -> dict[str, Any]:
        """Voters and leader as the leader sees them."""
        return self.request({"op": "members"})

    def add_member(self, node_id: int) -> dict[str, Any]:
        """Add one voter (its address must be in every node's peer list)."""
        return self.request({"op": "add_member", "id": node_id})

    def remove_member(self, node_id: int) -> dict[str, Any]:
        """Remove one voter."""
        return self.request({"op": "remove_member", "id": node_id})

    def transfer_leadership(self, node_id: int) -> None:
        """Ask the leader to hand leadership to ``node_id``."""
        self.request({"op": "transfer", "id": node_id})

    def watch(self, prefix: str, after: int, wait_s: float = 10.0) -> tuple[int, list[dict[str, Any]]]:
        """Changes under ``prefix`` after revision ``after`` (long-poll up to ``wait_s``): (revision, events)."""
        saved = self.request_timeout
        self.request_timeout = saved + wait_s
        try:
            a = self.request({"op": "watch", "prefix": prefix, "after": after, "wait": wait_s})
        finally:
            self.request_timeout = saved
        return int(a["revision"]), list(a["events"])

    def status(self, node: int) -> dict[str, Any]:
        """One node's own view (role, term, leader, indexes), without redirects."""
        with self._lock:
            return self.call_node(node, {"op": "status"})

    @classmethod
    def from_env(cls, peers: str | None = None, secret_file: str | None = None) -> RaftClient:
        """A client for ``peers`` (or ``KCONS_RAFT_PEERS``) with the cluster secret."""
        from kcons.errors import ConfigError
        from kcons.raft.transport import load_secret

        spec = peers or os.environ.get("KCONS_RAFT_PEERS", "")
        if not spec:
            raise ConfigError("KCONS_RAFT_PEERS", "give --peers or set KCONS_RAFT_PEERS (id=host:port,...)")
        from kcons.raft.transport import TlsFiles

        tls = TlsFiles.from_env(server=False)
        return cls(parse_peers(spec), load_secret(secret_file), tls=tls.client_context() if tls else None)
