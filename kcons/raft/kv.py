"""The replicated metadata store: a deterministic key-value state machine applied from the Raft log.

Commands are JSON objects. Every node applies the same commands in the same order, so every
node reaches the same state; nothing here reads a clock or randomness (the leader stamps
``now`` into lease commands before proposing them). Guarantees:

* every key carries a ``version`` (1 on creation, +1 per write) and the ``revision`` (log index)
  of its last change; ``cas`` succeeds only against the expected version (0: key absent);
* a lease ``name`` has at most one holder; a grant's fencing ``token`` is the log index of the
  grant, so tokens strictly increase across grants of any lease; a lease expires ``ttl`` seconds
  of leader time after its last grant or renewal;
* a command tagged with a client session ``(client, seq)`` is applied at most once: a retry of
  the same sequence number gets the first outcome back;
* watch events (put, delete) are kept for the last ``event_history`` revisions.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, NamedTuple

__all__ = ["KvItem", "KvStateMachine", "LeaseRecord", "WatchEvent"]

_decode = json.JSONDecoder().decode


class KvItem(NamedTuple):
    """A stored value with its version and the revision that wrote it."""

    value: str
    version: int
    revision: int


class LeaseRecord(NamedTuple):
    """Who holds a lease, with which fencing token, until which leader time."""

    holder: str
    token: int
    expires_at: float


class WatchEvent(NamedTuple):
    """One change, in revision order."""

    revision: int
    kind: str
    key: str
    value: str | None
    version: int


class KvStateMachine:
    """Deterministic state; :meth:`apply` is the only mutator besides :meth:`restore`."""

    def __init__(self, event_history: int = 10_000, max_sessions: int = 100_000) -> None:
        self.data: dict[str, KvItem] = {}
        self.leases: dict[str, LeaseRecord] = {}
        self.sessions: dict[str, tuple[int, dict[str, Any]]] = {}
        self.revision = 0
        self.events: deque[WatchEvent] = deque(maxlen=event_history)
        self.max_sessions = max_sessions
        self.dropped_through = 0

    # -- reading -----------------------------------------------------------------------------
    def get(self, key: str) -> KvItem | None:
        """The current item at ``key``, or None."""
        return self.data.get(key)

    def events_after(self, revision: int, prefix: str) -> list[WatchEvent] | None:
        """Events with revision > ``revision`` whose key starts with ``prefix``; None if compacted."""
        if revision < self.dropped_through:
            return None  # some events after ``revision`` are no longer kept: re-read, then watch
        return [e for e in self.events if e.revision > revision and e.key.startswith(prefix)]

    def _event(self, event: WatchEvent) -> None:
        if self.events.maxlen is not None and len(self.events) == self.events.maxlen:
            self.dropped_through = self.events[0].revision
        self.events.append(event)

    # -- applying ----------------------------------------------------------------------------
    def apply(self, index: int, data: bytes) -> dict[str, Any]:
        """Apply the command at log ``index``; returns its result (also for rejected commands)."""
        self.revision = index
        try:
            cmd = _decode(data.decode())
            if not isinstance(cmd, dict):
                raise ValueError("command is not an object")
        except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
            return {"error": "bad_command"}
        client = cmd.get("client")
        seq = cmd.get("seq")
        if isinstance(client, str) and isinstance(seq, int):
            seen = self.sessions.get(client)
            if seen is not None and seq <= seen[0]:
                return seen[1] if seq == seen[0] else {"error": "stale_sequence"}
        result = self._apply(index, cmd)
        if isinstance(client, str) and isinstance(seq, int):
            self.sessions.pop(client, None)
            self.sessions[client] = (seq, result)
            if len(self.sessions) > self.max_sessions:
                self.sessions.pop(next(iter(self.sessions)))
        return result

    def _apply(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        try:
            if op == "put":
                return self._put(index, str(cmd["key"]), str(cmd["value"]))
            if op == "delete":
                key = str(cmd["key"])
                item = self.data.pop(key, None)
                if item is None:
                    return {"ok": True, "deleted": False}
                self._event(WatchEvent(index, "delete", key, None, 0))
                return {"ok": True, "deleted": True}
            if op == "cas":
                key = str(cmd["key"])
                expected = int(cmd["version"])
                current = self.data.get(key)
                have = current.version if current else 0
                if have != expected:
                    return {"ok": False, "version": have}
                return self._put(index, key, str(cmd["value"]))
            if op == "lease_acquire":
                return self._acquire(index, str(cmd["name"]), str(cmd["holder"]), float(cmd["ttl"]), float(cmd["now"]))
            if op == "lease_renew":
                return self._renew(str(cmd["name"]), int(cmd["token"]), float(cmd["ttl"]), float(cmd["now"]))
            if op == "lease_release":
                lease = self.leases.get(str(cmd["name"]))
                if lease is not None and lease.token == int(cmd["token"]):
                    del self.leases[str(cmd["name"])]
                    return {"ok": True}
                return {"ok": False}
        except (KeyError, TypeError, ValueError):
            return {"error": "bad_command"}
        return {"error": "unknown_op"}

    def _put(self, index: int, key: str, value: str) -> dict[str, Any]:
        old = self.data.get(key)
        version = (old.version if old else 0) + 1
        self.data[key] = KvItem(value, version, index)
        self._event(WatchEvent(index, "put", key, value, version))
        return {"ok": True, "version": version, "revision": index}

    def _acquire(self, index: int, name: str, holder: str, ttl: float, now: float) -> dict[str, Any]:
        lease = self.leases.get(name)
        if lease is not None and lease.expires_at > now and lease.holder != holder:
            return {"ok": False, "holder": lease.holder, "expires_in": lease.expires_at - now}
        token = index  # every grant (even to the same holder name) fences all earlier ones
        self.leases[name] = LeaseRecord(holder, token, now + ttl)
        return {"ok": True, "token": token, "holder": holder, "ttl": ttl}

    def _renew(self, name: str, token: int, ttl: float, now: float) -> dict[str, Any]:
        lease = self.leases.get(name)
        if lease is None or lease.token != token or lease.expires_at <= now:
            return {"ok": False}
        self.leases[name] = LeaseRecord(lease.holder, token, now + ttl)
        return {"ok": True, "token": token, "ttl": ttl}

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """The whole state as bytes (JSON)."""
        return json.dumps(
            {
                "revision": self.revision,
                "data": {k: [v.value, v.version, v.revision] for k, v in self.data.items()},
                "leases": {k: [v.holder, v.token, v.expires_at] for k, v in self.leases.items()},
                "sessions": {k: [s, r] for k, (s, r) in self.sessions.items()},
                "dropped_through": self.dropped_through,
                "events": [[e.revision, e.kind, e.key, e.value, e.version] for e in self.events],
            },
            separators=(",", ":"),
        ).encode()

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot's."""
        obj = json.loads(data) if data else {}
        self.revision = int(obj.get("revision", 0))
        self.dropped_through = int(obj.get("dropped_through", 0))
        self.data = {k: KvItem(v[0], int(v[1]), int(v[2])) for k, v in obj.get("data", {}).items()}
        self.leases = {k: LeaseRecord(v[0], int(v[1]), float(v[2])) for k, v in obj.get("leases", {}).items()}
        self.sessions = {k: (int(v[0]), v[1]) for k, v in obj.get("sessions", {}).items()}
        self.events = deque(
            (WatchEvent(int(e[0]), e[1], e[2], e[3], int(e[4])) for e in obj.get("events", [])),
            maxlen=self.events.maxlen,
        )
