"""Redis dedup store: one Lua script call per batch, Redis Cluster safe, every key with a TTL.

Each id is a key ``{<prefix>:<namespace>}:i:<id>`` holding its claim (owner, claim call, lease
deadline on the server clock); a claim becomes *done* when its id joins the set of done ids of
its claim call, ``{<prefix>:<namespace>}:b:<owner>|<seq>`` (one SADD per batch instead of one
write per id). The braces are a hash tag: every key of one namespace (the consumer group)
lands in one hash slot, so a batch is handled by one atomic script on a single node of a Redis
Cluster. The script (``dedup_claim.lua``) is registered once (``register_script``) and called
with the namespace root as its only key and the ids as newline-separated arguments, which keeps
a 500-id call cheap to encode. :meth:`RedisDedupStore.complete_and_claim` records one batch done
and claims the next in the same call: one round trip per batch. Every key has the retention
TTL, so the store stays bounded.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from importlib import resources
from typing import Any

from kcons.dedup import (
    DEFAULT_RETENTION_S,
    MAX_ID_LENGTH,
    ClaimResult,
    check_lease,
    check_retention,
    new_owner_token,
    validate_namespace,
)
from kcons.errors import ConfigError, StoreError
from kcons.metrics import observe_dedup_store

__all__ = ["CLAIM_SCRIPT", "RedisDedupStore"]

#: The Lua script that claims, completes or releases a batch (shipped as ``dedup_claim.lua``).
CLAIM_SCRIPT = resources.files("kcons.adapters").joinpath("dedup_claim.lua").read_text(encoding="utf-8")


class RedisDedupStore:
    """Dedup store on Redis: atomic per batch (one Lua script), one round trip per batch.

    ``client`` is a ``redis.Redis`` (or ``redis.RedisCluster``) the caller owns, with its own
    connection pool. ``namespace`` should be the consumer group id, so groups never share
    dedup state. Leases are checked against the Redis server's clock, so workers' clocks do not
    matter. Redis errors are raised as :class:`~kcons.errors.StoreError`.
    """

    def __init__(
        self,
        client: Any,
        namespace: str,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        prefix: str = "kcons:dedup",
        owner: str | None = None,
        max_tracked: int = 64,
    ) -> None:
        validate_namespace("namespace", namespace)
        validate_namespace("prefix", prefix)
        if owner is not None and not _OWNER.match(owner):
            raise ConfigError("owner", "expected 1-64 characters of [A-Za-z0-9_.:-]")
        self._client = client
        self._retention_ms = int(check_retention("retention_s", retention_s) * 1000)
        self._root = f"{{{prefix}:{namespace}}}"
        self._owner = owner or new_owner_token()
        self._script = client.register_script(CLAIM_SCRIPT)
        self._latency = observe_dedup_store("redis")
        self._seq = 0
        # The ids of the last ``max_tracked`` claim calls, by tag, so a complete can add its ids to
        # their claim's set; ids claimed longer ago are completed as plain "d" keys.
        self._claims: deque[tuple[str, frozenset[str]]] = deque(maxlen=max(1, max_tracked))
        self._lock = threading.Lock()

    @property
    def owner(self) -> str:
        """The token that marks this instance's claims."""
        return self._owner

    def key(self, event_id: str) -> str:
        """The Redis key of an id (hash-tagged by namespace)."""
        return f"{self._root}:i:{_stored(event_id)}"

    def claim(self, ids: Sequence[str], lease_s: float) -> set[str]:
        """Claim the ids that are neither done nor held under another owner's unexpired lease."""
        return set(self.claim_batch(ids, lease_s).claimed)

    def claim_batch(self, ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Claim new ids for ``lease_s`` seconds in one script call; report the done and busy others."""
        return self.complete_and_claim((), ids, lease_s)

    def complete_and_claim(self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Mark ``done_ids`` done, then claim ``ids``, atomically in one script call (one round trip)."""
        lease_ms = max(1, int(check_lease(lease_s) * 1000))
        unique = list(dict.fromkeys(ids))
        with self._lock:
            self._seq += 1
            seq = self._seq
            groups = self._take(done_ids)
        if not unique and not groups:
            return ClaimResult(frozenset())
        codes = self._run("batch", unique, lease_ms, seq, groups)
        if isinstance(codes, str):
            codes = codes.encode()
        if len(codes) != len(unique):
            raise StoreError(f"redis dedup claim answered {len(codes)} codes for {len(unique)} ids")
        tag = f"{self._owner}|{seq}"
        if codes.count(b"1") == len(codes):  # the common case: every id is new
            claimed_all = frozenset(unique)
            self._track(claimed_all, tag)
            return ClaimResult(claimed_all)
        claimed: list[str] = []
        done: list[str] = []
        busy: list[str] = []
        for event_id, code in zip(unique, codes, strict=True):
            if code == 49:  # "1"
                claimed.append(event_id)
            elif code == 48:  # "0"
                done.append(event_id)
            else:
                busy.append(event_id)
        result = ClaimResult(frozenset(claimed), frozenset(done), frozenset(busy))
        self._track(result.claimed, tag)
        return result

    def complete(self, ids: Sequence[str]) -> None:
        """Mark ids done for the retention TTL (whoever holds them: the effect has happened)."""
        if ids:
            self.complete_and_claim(ids, (), 1.0)

    def release(self, ids: Sequence[str]) -> None:
        """Delete our own in-progress claims; done ids and other owners' claims are untouched."""
        if not ids:
            return
        unique = list(dict.fromkeys(ids))
        with self._lock:
            self._take(unique)
        self._run("release", unique, 1, 0, [])

    def _track(self, claimed: frozenset[str], tag: str) -> None:
        if claimed:
            with self._lock:
                self._claims.append((tag, claimed))

    def _take(self, ids: Sequence[str]) -> list[tuple[str, list[str]]]:
        """Remove ids from the tracked claims; group them by claim call, newest first ("" for unknown ones).

        Called with the lock held.
        """
        rest = set(ids)
        groups: list[tuple[str, list[str]]] = []
        claims = self._claims
        for i in range(len(claims) - 1, -1, -1):
            if not rest:
                break
            tag, claimed = claims[i]
            mine = claimed & rest
            if mine:
                groups.append((tag, list(mine)))
                claims[i] = (tag, claimed - mine)
                rest -= mine
        if rest:
            groups.append(("", list(rest)))
        return groups

    @staticmethod
    def _join(ids: list[str]) -> str:
        if not ids:
            return ""
        joined = "\n".join(ids)
        if joined.count("\n") != len(ids) - 1 or max(map(len, ids)) > MAX_ID_LENGTH or min(map(len, ids)) == 0:
            joined = "\n".join(_stored(i) for i in ids)
        return joined

    def _run(self, op: str, ids: list[str], lease_ms: int, seq: int, groups: list[tuple[str, list[str]]]) -> Any:
        args: list[Any] = [op, self._owner, lease_ms, self._retention_ms, seq, self._join(ids)]
        for tag, members in groups:
            args += [tag, self._join(members)]
        started = time.perf_counter()
        try:
            result = self._script(keys=[self._root], args=args)
        except Exception as exc:  # redis.RedisError and connection errors
            raise StoreError(f"redis dedup {op} of {len(ids)} ids failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._latency["release" if op == "release" else "claim" if ids else "complete"].observe(
                time.perf_counter() - started
            )
        return result


_OWNER = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def _needs_digest(event_id: str) -> bool:
    return len(event_id) > MAX_ID_LENGTH or "\n" in event_id or not event_id


def _stored(event_id: str) -> str:
    """The id as stored: itself, or its digest when it is long, empty or contains a newline (the separator)."""
    if _needs_digest(event_id):
        return "sha256:" + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()
    return event_id
