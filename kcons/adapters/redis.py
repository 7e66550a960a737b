"""Redis dedup store: one Lua script call per batch, Redis Cluster safe, every key with a TTL.

Each id is a key ``{<prefix>:<namespace>}:<id>``. The braces are a hash tag: every key of
one namespace (the consumer group) lands in one hash slot, so a whole batch is claimed by one
atomic script on a single node of a Redis Cluster. The script is registered once
(``register_script``) and called with the namespace root as its only key and the batch's ids as
one newline-separated argument, which keeps a 500-id call cheap to encode. An in-progress key
expires with its lease, a done key with the retention TTL; nothing is stored without a TTL.
"""

from __future__ import annotations

import hashlib
import time
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
from kcons.errors import StoreError
from kcons.metrics import observe_dedup_store

__all__ = ["CLAIM_SCRIPT", "RedisDedupStore"]

#: The Lua script that claims, completes or releases a batch (shipped as ``dedup_claim.lua``).
CLAIM_SCRIPT = resources.files("kcons.adapters").joinpath("dedup_claim.lua").read_text(encoding="utf-8")


class RedisDedupStore:
    """Dedup store on Redis: atomic per batch (one Lua script), one round trip per call.

    ``client`` is a ``redis.Redis`` (or ``redis.RedisCluster``) the caller owns, with its own
    connection pool. ``namespace`` should be the consumer group id, so groups never share
    dedup state. Redis errors are raised as :class:`~kcons.errors.StoreError`.
    """

    def __init__(
        self,
        client: Any,
        namespace: str,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        prefix: str = "kcons:dedup",
        owner: str | None = None,
    ) -> None:
        validate_namespace("namespace", namespace)
        validate_namespace("prefix", prefix)
        self._client = client
        self._retention_ms = int(check_retention("retention_s", retention_s) * 1000)
        self._root = f"{{{prefix}:{namespace}}}"
        self._owner = owner or new_owner_token()
        self._script = client.register_script(CLAIM_SCRIPT)
        self._latency = observe_dedup_store("redis")

    @property
    def owner(self) -> str:
        """The token that marks this instance's claims."""
        return self._owner

    def key(self, event_id: str) -> str:
        """The Redis key of an id (hash-tagged by namespace)."""
        return f"{self._root}:{_stored(event_id)}"

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
        if not unique:
            if done_ids:
                self.complete(done_ids)
            return ClaimResult(frozenset())
        if done_ids:
            codes = self._run("complete_claim", unique, lease_ms, self._join(list(dict.fromkeys(done_ids))))
        else:
            codes = self._run("claim", unique, lease_ms)
        if isinstance(codes, str):
            codes = codes.encode()
        if len(codes) != len(unique):
            raise StoreError(f"redis dedup claim answered {len(codes)} codes for {len(unique)} ids")
        if codes.count(b"1") == len(codes):  # the common case: every id is new
            return ClaimResult(frozenset(unique))
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
        return ClaimResult(frozenset(claimed), frozenset(done), frozenset(busy))

    def complete(self, ids: Sequence[str]) -> None:
        """Mark ids done for the retention TTL (whoever holds them: the effect has happened)."""
        if ids:
            self._run("complete", list(dict.fromkeys(ids)), self._retention_ms)

    def release(self, ids: Sequence[str]) -> None:
        """Delete our own in-progress claims; done ids and other owners' claims are untouched."""
        if ids:
            self._run("release", list(dict.fromkeys(ids)), 0)

    @staticmethod
    def _join(ids: list[str]) -> str:
        joined = "\n".join(ids)
        if joined.count("\n") != len(ids) - 1 or max(map(len, ids)) > MAX_ID_LENGTH or min(map(len, ids)) == 0:
            joined = "\n".join(_stored(i) for i in ids)
        return joined

    def _run(self, op: str, ids: list[str], ttl_ms: int, done: str | None = None) -> Any:
        args: list[Any] = [op, self._owner, ttl_ms, self._join(ids)]
        if done is not None:
            args += [done, self._retention_ms]
        started = time.perf_counter()
        try:
            result = self._script(keys=[self._root], args=args)
        except Exception as exc:  # redis.RedisError and connection errors
            raise StoreError(f"redis dedup {op} of {len(ids)} ids failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._latency["claim" if op == "complete_claim" else op].observe(time.perf_counter() - started)
        return result


def _needs_digest(event_id: str) -> bool:
    return len(event_id) > MAX_ID_LENGTH or "\n" in event_id or not event_id


def _stored(event_id: str) -> str:
    """The id as stored: itself, or its digest when it is long, empty or contains a newline (the separator)."""
    if _needs_digest(event_id):
        return "sha256:" + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()
    return event_id
