"""Redis dedup store: one Lua script call per batch, Redis Cluster safe, every key with a TTL.

Ids are fields of a few time-bucketed hashes ``{<prefix>:<namespace>}:h:<bucket>`` (the bucket
is the server time at the write divided by ``retention / BUCKETS_PER_RETENTION``); a field holds
the tag of the claim call that claimed it (whose owner and lease deadline, on the server clock,
are one more field of the bucket) or ``d`` (done). A lookup reads every live bucket with one
variadic HMGET, and new ids are written with one variadic HSET of the same value, so a batch
costs a few Redis commands rather than one or two per id. When every id a claim call claimed is
completed at once (the common case), one key ``{<prefix>:<namespace>}:b:<tag>`` marks them all
done. Ids completed apart from the rest of their call, whose claim the client no longer tracks,
or completed after their lease deadline, are written ``d`` one field each.

The braces are a hash tag: every key of one namespace (the consumer group) lands in one hash
slot, so a batch is handled by one atomic script on a single node of a Redis Cluster. The script
(``dedup_claim.lua``) is registered once (``register_script``) and called with the namespace root
as its only key and the ids as newline-separated arguments, which keeps a 500-id call cheap to
encode. :meth:`RedisDedupStore.complete_and_claim` records one batch done and claims the next in
the same call: one round trip per batch; :meth:`RedisDedupStore.send_complete_and_claim` sends
it and reads the answer later. Needs Redis 4.0 or later (variadic HSET).

Compact ids: in a namespace created by this version (its ``<root>:v`` format key says ``2``), an
id that is a canonical UUID (lowercase, as kcons writes them) is kept as its 16 bytes, which
costs Redis less time and memory per id than its 36 characters; any other id is kept as text,
and a text that would be exactly 16 bytes long is kept by its digest, so the two never meet. A
namespace that already holds data when this version first uses it keeps every id as text.

Retention: a done id stays a duplicate for at least ``retention_s`` after its completion and is
forgotten at most ``retention_s + retention_s / BUCKETS_PER_RETENTION + lease`` after it
(``lease`` the longest lease of the claims written in the same bucket); after that its claim
still counts as in progress until its lease deadline, if that is later. Every key has a TTL
within that bound, so the store stays bounded.

The key layout changed after kcons 0.1.0 (it was one key per id): keys of that layout are not
read, so dedup state written by 0.1.0 is forgotten on upgrade (pre-1.0: no migration). The
layout before this one (a field held ``<tag>:<index>`` and ``:b:<tag>`` was a bitmap of done
indices) is still read, but workers of that version read this one's claims as busy: stop every
worker of a consumer group before starting the new version.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from importlib import resources
from typing import Any, NamedTuple

from kcons.config import check_identifier
from kcons.dedup import (
    DEFAULT_RETENTION_S,
    ClaimResult,
    StoreCapabilities,
    check_lease,
    check_retention,
    new_owner_token,
    validate_namespace,
)
from kcons.errors import StoreError
from kcons.ids import MAX_ID_LENGTH, storage_id
from kcons.metrics import observe_dedup_store

__all__ = ["BUCKETS_PER_RETENTION", "CLAIM_SCRIPT", "RedisDedupStore"]

#: The Lua script that claims, completes or releases a batch (shipped as ``dedup_claim.lua``).
CLAIM_SCRIPT = resources.files("kcons.adapters.redis").joinpath("dedup_claim.lua").read_text(encoding="utf-8")

#: Buckets per retention: a lookup reads about this many hashes plus one; a done id may be kept
#: up to ``retention / BUCKETS_PER_RETENTION`` (plus a lease) longer than the retention.
BUCKETS_PER_RETENTION = 4

#: A canonical RFC 9562 UUID: lowercase hex, dashes at 8, 13, 18 and 23, variant bits 10 (kept as its 16 bytes in
#: a compact namespace; its byte 8 is never ASCII, so it never equals a claim call's text field).
CANONICAL_UUID = re.compile("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def uuid_blob(ids: Collection[str]) -> bytes | None:
    """The 16 bytes of every id back to back when each one is a :data:`CANONICAL_UUID`, else None.

    Checked for the batch at once with C-level string operations (a regular expression over the
    joined ids costs about four times as much): each id is 36 characters between newlines, with
    dashes at the canonical places and nowhere else, and lowercase hex elsewhere (the bytes
    written back as hex must give the same text).
    """
    n = len(ids)
    joined = "\n".join(ids)
    if len(joined) != 37 * n - 1 or joined.count("\n") != n - 1 or joined[36::37] != "\n" * (n - 1):
        return None
    dashes = "-" * n
    if joined[8::37] != dashes or joined[13::37] != dashes or joined[18::37] != dashes or joined[23::37] != dashes:
        return None
    if joined[19::37].strip("89ab"):  # the variant
        return None
    text = joined.encode()
    if len(text) != len(joined):  # not ASCII
        return None
    digits = text.translate(None, b"-\n")
    if len(digits) != 32 * n:
        return None
    try:
        blob = binascii.unhexlify(digits)
    except binascii.Error:
        return None
    return blob if blob.hex().encode() == digits else None  # uppercase hex is another id


class _Done(NamedTuple):
    """Ids to record done: every id of one tracked claim call (its tag, lease deadline), or ids one by one (tag "")."""

    tag: str
    deadline: bytes
    ids: Collection[str]
    with_ids: bool  # send the ids (written "d" one by one); a whole tracked claim call needs only its tag in time


class _Claim:
    """One tracked claim call: its tag, lease deadline (server clock) and the claimed ids not completed yet."""

    __slots__ = ("claimed", "deadline", "intact", "tag")

    def __init__(self, tag: str, deadline: bytes, claimed: frozenset[str]) -> None:
        self.tag = tag
        self.deadline = deadline
        self.claimed = claimed  # the claimed ids not completed or released yet
        self.intact = True  # no id of the call was completed or released yet


class RedisDedupStore:
    """Dedup store on Redis: atomic per batch (one Lua script), one round trip per batch.

    ``client`` is a ``redis.Redis`` (or ``redis.RedisCluster``) the caller owns, with its own
    connection pool. ``namespace`` should be the consumer group id, so groups never share
    dedup state. Leases are checked against the Redis server's clock, so workers' clocks do not
    matter. Redis errors are raised as :class:`~kcons.errors.StoreError`. Workers sharing a
    namespace should use the same ``retention_s`` (it sets the bucket width).
    """

    capabilities = StoreCapabilities(batch_claim=True, pipelined=True, claim_ahead=True)

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
        if owner is not None:
            check_identifier("owner", owner, kind="key", max_length=64)
        self._client = client
        self._retention_ms = int(check_retention("retention_s", retention_s) * 1000)
        self._width_ms = max(1, self._retention_ms // BUCKETS_PER_RETENTION)
        self._root = f"{{{prefix}:{namespace}}}"
        self._owner = owner or new_owner_token()
        self._script = client.register_script(CLAIM_SCRIPT)
        self._latency = observe_dedup_store("redis")
        # A claim call's tag: a random prefix of this instance and a counter, unique in the
        # namespace (a restarted worker with a fixed owner never reuses a tag of its previous life).
        self._nonce = secrets.token_hex(6)
        self._seq = 0
        # The last ``max_tracked`` claim calls, so a complete of a whole call is one key; ids
        # claimed longer ago are completed as plain "d" fields.
        self._claims: deque[_Claim] = deque(maxlen=max(1, max_tracked))
        self._ahead_conn: Any = None  # the connection of the calls sent ahead (answers read in order)
        self._ahead_generation = 0  # bumped when that connection is reset: answers sent before are lost
        self._format: bytes | None = None  # the namespace's id format ("2" compact, "1" text), asked once
        self._flying: dict[str, frozenset[str]] = {}  # claim calls sent and not answered yet: tag -> ids
        self._lock = threading.Lock()

    @property
    def owner(self) -> str:
        """The token that marks this instance's claims."""
        return self._owner

    @property
    def root(self) -> str:
        """The hash-tagged prefix of every key of this namespace (``{<prefix>:<namespace>}``)."""
        return self._root

    @property
    def bucket_s(self) -> float:
        """The width of a time bucket: how much longer than the retention (plus a lease) a done id may be kept."""
        return self._width_ms / 1000

    def describe(self, event_id: str) -> tuple[str, str | None, int | None]:
        """What the store holds for one id, for tests and debugging (not atomic, several reads).

        ``("done", None, None)``, ``("claimed", owner, lease deadline in ms on the server clock)``
        (in progress, or expired when the deadline has passed) or ``("absent", None, None)``.
        """
        stored: str | bytes = self._field(event_id) if self._compact() else storage_id(event_id)
        client = self._client
        now_s, _now_us = client.time()
        live = [int(b) for b, at in client.zrange(f"{self._root}:r", 0, -1, withscores=True) if at > now_s * 1000]
        claims: list[tuple[str, str]] = []
        for bucket in sorted(live, reverse=True):
            key = f"{self._root}:h:{bucket}"
            value = client.hget(key, stored)
            if value is None:
                continue
            if value == b"d":
                return ("done", None, None)
            tag, older, index = value.decode().partition(":")  # "<tag>", or the older "<tag>:<index>"
            call = f"{self._root}:b:{tag}"
            if client.getbit(call, int(index)) if older else client.exists(call):
                return ("done", None, None)
            claims.append((key, tag))
        if not claims:
            return ("absent", None, None)
        key, tag = claims[0]
        meta = (client.hget(key, "\n" + tag) or b"|0").decode()
        owner, _, deadline = meta.rpartition("|")
        return ("claimed", owner, int(deadline))

    def claim(self, ids: Sequence[str], lease_s: float) -> set[str]:
        """Claim the ids that are neither done nor held under another owner's unexpired lease."""
        return set(self.claim_batch(ids, lease_s).claimed)

    def claim_batch(self, ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Claim new ids for ``lease_s`` seconds in one script call; report the done and busy others."""
        return self.complete_and_claim((), ids, lease_s)

    def complete_and_claim(self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float) -> ClaimResult:
        """Mark ``done_ids`` done, then claim ``ids``, atomically in one script call (one round trip)."""
        lease_ms, unique, tag, groups = self._prepare(done_ids, ids, lease_s)
        if not unique and not groups:
            return ClaimResult(frozenset())
        return self._answer(unique, lease_ms, tag, groups, self._batch(unique, lease_ms, tag, groups))

    def send_complete_and_claim(
        self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float
    ) -> Callable[[], ClaimResult]:
        """:meth:`complete_and_claim` in two halves: send the call now, read its answer later.

        The returned function waits for the answer and returns the :class:`ClaimResult` (call it
        once, and in the order the calls were sent; it raises :class:`StoreError` like the
        one-call form). The caller can work while Redis runs the script. Every call sent this way
        goes on one connection kept for them, so Redis runs them in the order they were sent (a
        call's done records are written before a later call claims); answers are read in that
        order. A client without a connection pool (Redis Cluster) makes the whole call at once.
        """
        lease_ms, unique, tag, groups = self._prepare(done_ids, ids, lease_s)
        pool = getattr(self._client, "connection_pool", None)
        if not unique and not groups:
            empty = ClaimResult(frozenset())
            return lambda: empty
        if pool is None or not hasattr(pool, "release") or not hasattr(pool, "get_connection"):
            result = self._answer(unique, lease_ms, tag, groups, self._batch(unique, lease_ms, tag, groups))
            return lambda: result
        args = self._args("batch", unique, lease_ms, tag, groups)
        started = time.perf_counter()
        conn = self._ahead_conn
        if conn is None:
            try:
                conn = self._ahead_conn = pool.get_connection()
            except Exception as exc:
                raise self._error("batch", unique, exc) from exc
        generation = self._ahead_generation
        try:
            conn.send_command("EVALSHA", self._script.sha, 1, self._root, *args)
        except BaseException as exc:
            self._reset_ahead(pool, conn)
            if not isinstance(exc, Exception):
                raise
            raise self._error("batch", unique, exc) from exc
        with self._lock:
            self._flying[tag] = frozenset(unique)

        def answer() -> ClaimResult:
            try:
                if generation != self._ahead_generation:  # the connection was reset: this answer is gone
                    raise StoreError("redis dedup batch: the connection was reset before the answer was read")
                reply = conn.read_response()
            except BaseException as exc:
                if type(exc).__name__ == "NoScriptError":  # the server lost its scripts: the usual way loads it
                    return self._answer(unique, lease_ms, tag, groups, self._batch(unique, lease_ms, tag, groups))
                if generation == self._ahead_generation:
                    self._reset_ahead(pool, conn)
                if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                    raise
                raise self._error("batch", unique, exc) from exc
            finally:
                with self._lock:
                    self._flying.pop(tag, None)
                self._latency["claim" if unique else "complete"].observe(time.perf_counter() - started)
            raw = reply.encode() if isinstance(reply, str) else bytes(reply)
            if raw[:1] == b"F":  # another id format in the namespace: encoded again, called at once
                self._format = raw[1:]
                raw = self._batch(unique, lease_ms, tag, groups)
            return self._answer(unique, lease_ms, tag, groups, raw)

        return answer

    def _reset_ahead(self, pool: Any, conn: Any) -> None:
        """Drop the connection of the calls sent ahead (its unread answers are lost with it)."""
        self._ahead_generation += 1
        self._ahead_conn = None
        try:
            conn.disconnect()
        finally:
            pool.release(conn)

    def _prepare(
        self, done_ids: Sequence[str], ids: Sequence[str], lease_s: float
    ) -> tuple[int, list[str], str, list[_Done]]:
        """A batch call's lease (ms), distinct ids, tag and done groups (the done ids leave the tracked claims)."""
        lease_ms = max(1, int(check_lease(lease_s) * 1000))
        unique = list(dict.fromkeys(ids))
        with self._lock:
            self._seq += 1
            tag = f"{self._nonce}{self._seq:x}"
            # An id a call still in flight also claims: which claim call's tag its field holds is
            # decided by the order the two scripts run in, so it is written "d" by id instead.
            unsure: set[str] = set()
            for flying in self._flying.values():
                unsure.update(flying.intersection(done_ids))
            if unsure:
                self._take(list(unsure), complete=False)
                groups = self._take([i for i in done_ids if i not in unsure], complete=True)
                groups.append(_Done("", b"", unsure, True))
            else:
                groups = self._take(done_ids, complete=True)
        return lease_ms, unique, tag, groups

    def _answer(self, unique: list[str], lease_ms: int, tag: str, groups: list[_Done], reply: bytes) -> ClaimResult:
        """The ClaimResult of a batch call's reply; the claimed ids are tracked for their done records."""
        if reply[:1] == b"L":  # the rare case: groups completed after their lease are written "d", by id
            for number in reply[1:].split(b","):
                groups[int(number) - 1] = groups[int(number) - 1]._replace(with_ids=True)
            reply = self._batch(unique, lease_ms, tag, groups)
        deadline, _, codes = reply.partition(b"|")
        if len(codes) != len(unique):
            raise StoreError(f"redis dedup claim answered {len(codes)} codes for {len(unique)} ids")
        if not unique:
            return ClaimResult(frozenset())
        if codes.count(b"1") == len(codes):  # the common case: every id is new
            claimed_all = frozenset(unique)
            self._track(_Claim(tag, deadline, claimed_all))
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
        if claimed:
            self._track(_Claim(tag, deadline, result.claimed))
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
            self._take(unique, complete=False)
        self._run("release", unique, 1, "", [])

    def _track(self, claim: _Claim) -> None:
        with self._lock:
            self._claims.append(claim)

    def _take(self, ids: Sequence[str], *, complete: bool) -> list[_Done]:
        """Remove ids from the tracked claims; with ``complete``, the groups that record them done.

        A tracked claim call whose every claimed id is completed at once is one group (its tag);
        the other ids come last, in one group written "d" by id. Called with the lock held.
        """
        rest = set(ids)
        groups: list[_Done] = []
        apart: set[str] = set()
        claims = self._claims
        for i in range(len(claims) - 1, -1, -1):
            if not rest:
                break
            claim = claims[i]
            mine = claim.claimed & rest
            if mine:
                if claim.intact and len(mine) == len(claim.claimed):
                    groups.append(_Done(claim.tag, claim.deadline, mine, False))
                else:
                    apart |= mine
                claim.claimed -= mine
                claim.intact = False
                rest -= mine
        if complete and (rest or apart):
            groups.append(_Done("", b"", rest | apart, True))
        return groups if complete else []

    def _compact(self) -> bool:
        """Whether this namespace keeps canonical UUIDs as 16 bytes (asked once; see ``<root>:v``)."""
        if self._format is None:
            try:
                reply = self._script(keys=[self._root], args=["format", self._owner, 0, self._retention_ms])
            except Exception as exc:
                raise self._error("format", [], exc) from exc
            self._format = bytes(reply.encode() if isinstance(reply, str) else reply)
        return self._format == b"2"

    def _field(self, event_id: str) -> bytes:
        """An id's field in a compact namespace: a canonical UUID's 16 bytes, else text (never 16 bytes long)."""
        if CANONICAL_UUID.fullmatch(event_id):
            return bytes.fromhex(event_id.replace("-", ""))
        stored = storage_id(event_id).encode("utf-8", "surrogatepass")
        if len(stored) == 16:
            stored = ("sha256:" + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()).encode()
        return stored

    def _encode(self, ids: Collection[str]) -> str | bytes:
        """The ids as the script's argument: compact UUIDs back to back, length-prefixed fields, or text lines."""
        if not ids:
            return ""
        if not self._compact():
            return "n" + self._join(ids)
        blob = uuid_blob(ids)
        if blob is not None:  # the common case: kcons ids, converted for the batch at once
            return b"u" + blob
        parts = [b"l"]
        for event_id in ids:
            field = self._field(event_id)
            parts.append(len(field).to_bytes(2, "big") + field)
        return b"".join(parts)

    @staticmethod
    def _join(ids: Collection[str]) -> str:
        if not ids:
            return ""
        joined = "\n".join(ids)
        # The common case, every id kept as it is by storage_id, checked for the batch at once.
        if joined.count("\n") != len(ids) - 1 or max(map(len, ids)) > MAX_ID_LENGTH or min(map(len, ids)) == 0:
            joined = "\n".join(map(storage_id, ids))
        return joined

    def _batch(self, ids: list[str], lease_ms: int, tag: str, groups: list[_Done]) -> bytes:
        """One "batch" script call; its reply as bytes (the client may or may not decode replies)."""
        reply = self._run("batch", ids, lease_ms, tag, groups)
        return reply.encode() if isinstance(reply, str) else bytes(reply)

    def _run(self, op: str, ids: list[str], lease_ms: int, tag: str, groups: list[_Done]) -> Any:
        """One script call; called again, encoded anew, when the namespace's id format is not the one cached."""
        reply = self._call(op, ids, lease_ms, tag, groups)
        if isinstance(reply, (bytes, str)) and reply[:1] in (b"F", "F"):
            self._format = (reply.encode() if isinstance(reply, str) else bytes(reply))[1:]
            reply = self._call(op, ids, lease_ms, tag, groups)
        return reply

    def _args(self, op: str, ids: list[str], lease_ms: int, tag: str, groups: list[_Done]) -> list[Any]:
        """The script's arguments (see dedup_claim.lua)."""
        fmt = "2" if self._compact() else "1"  # the script checks it against the namespace's
        args: list[Any] = [f"{op}:{fmt}", self._owner, lease_ms, self._retention_ms, tag, self._encode(ids),
                           self._width_ms]  # fmt: skip
        for done in groups:
            args += [done.tag, done.deadline, self._encode(done.ids) if done.with_ids else ""]
        return args

    @staticmethod
    def _error(op: str, ids: list[str], exc: Exception) -> StoreError:
        return StoreError(f"redis dedup {op} of {len(ids)} ids failed: {type(exc).__name__}: {exc}")

    def _call(self, op: str, ids: list[str], lease_ms: int, tag: str, groups: list[_Done]) -> Any:
        args = self._args(op, ids, lease_ms, tag, groups)
        started = time.perf_counter()
        try:
            result = self._script(keys=[self._root], args=args)
        except Exception as exc:  # redis.RedisError and connection errors
            raise self._error(op, ids, exc) from exc
        finally:
            self._latency["release" if op == "release" else "claim" if ids else "complete"].observe(
                time.perf_counter() - started
            )
        return result
