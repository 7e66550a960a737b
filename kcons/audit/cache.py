"""The cache sampler: compare cached versions with the source, continuously, and report stale entries.

Each round takes the next ``sample`` data keys of the cache (SCAN over ``<prefix>:{*}``, the cursor
kept between rounds so that the whole key space is covered over time; lease and floor keys are
skipped), reads each entry (GET) and the source's version of its key, and decides:

- a tombstone or no entry: consistent (nothing can be served from it; a read goes to the source);
- a value whose version equals the source's: consistent;
- otherwise the key is *suspect*: an invalidation may still be on its way. It is checked again
  once ``lag_bound_s`` (the invalidation-lag bound you promise, e.g. the alert threshold of
  ``kcons_cache_invalidation_lag_seconds``) has passed. It is then **stale** if the cache still
  holds a value older than the version the source had at the first look, a value newer than the
  source has now (written behind kcons's back, or a source that went back), or a value for a row
  the source no longer has; else consistent (the invalidation arrived in time).

Every decided key counts in ``kcons_cache_audit_checked_total``, stale ones also in
``kcons_cache_audit_stale_total``; ``kcons_cache_audit_inconsistency_ratio`` is stale/checked over
the last ``window`` decisions. The sampler only reads (SCAN, GET); the source callable should only
read too.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kcons import metrics
from kcons.cache.model import decode_entry
from kcons.errors import ConfigError

__all__ = ["CacheAuditReport", "CacheAuditor", "SourceVersion", "StaleEntry", "sql_source", "unescape_key"]

log = logging.getLogger(__name__)

#: The source's current version of a cache key, or None when the source has no such row.
SourceVersion = Callable[[str], int | None]

_GLOB = re.compile(r"([*?\[\]\\])")


def unescape_key(escaped: str) -> str:
    """The user's key from its escaped form in the data key (the inverse of the backend's escaping)."""
    if "%" not in escaped:
        return escaped
    return escaped.replace("%7B", "{").replace("%7D", "}").replace("%25", "%")


@dataclass(frozen=True)
class StaleEntry:
    """A key found stale: what the cache held and what the source had, at the first look and after the bound."""

    key: str
    cached: int
    source_first: int | None
    source_after: int | None
    cached_after: int


@dataclass
class CacheAuditReport:
    """Counts since the sampler started (``ratio`` over the last ``window`` decisions)."""

    cache: str
    rounds: int = 0
    sampled: int = 0
    checked: int = 0
    stale: int = 0
    suspects_pending: int = 0
    ratio: float = 0.0
    stale_list: list[StaleEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no stale entry was found."""
        return self.stale == 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["ok"] = self.ok
        return out


@dataclass
class _Suspect:
    key: str
    cached: int
    source: int | None
    due: float


class CacheAuditor:
    """Samples a Redis cache written by kcons and compares its versions with the source's."""

    def __init__(
        self,
        client: Any,
        source: SourceVersion,
        *,
        prefix: str = "kcons:cache",
        name: str = "default",
        sample: int = 100,
        lag_bound_s: float = 10.0,
        window: int = 10_000,
        max_listed: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sample < 1:
            raise ConfigError("--sample", f"must be >= 1, got {sample}")
        if lag_bound_s < 0:
            raise ConfigError("--lag-bound", f"must be >= 0, got {lag_bound_s}")
        self.client = client
        self.source = source
        self.prefix = prefix
        self.sample = sample
        self.lag_bound_s = lag_bound_s
        self.max_listed = max_listed
        self.clock = clock
        self._match = _GLOB.sub(r"\\\1", prefix) + ":{*}"
        self._head = len(prefix) + 2  # "<prefix>:{"
        self._cursor = 0
        self._suspects: dict[str, _Suspect] = {}
        self._recent: collections.deque[bool] = collections.deque(maxlen=window)
        self._stop = threading.Event()
        self.report = CacheAuditReport(cache=name)
        self._m_checked = metrics.CACHE_AUDIT_CHECKED.labels(name)
        self._m_stale = metrics.CACHE_AUDIT_STALE.labels(name)
        self._m_ratio = metrics.CACHE_AUDIT_RATIO.labels(name)

    # --- sampling ---------------------------------------------------------------------------

    def next_keys(self) -> list[str]:
        """The next ``sample`` user keys of the cache (SCAN continues where the last round stopped)."""
        keys: list[str] = []
        seen: set[str] = set()
        wrapped = False
        while len(keys) < self.sample:
            self._cursor, batch = self.client.scan(self._cursor, match=self._match, count=max(self.sample, 100))
            for raw in batch:
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                if not text.endswith("}"):
                    continue  # a lease or floor key
                key = unescape_key(text[self._head : -1])
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
            if self._cursor == 0:
                if wrapped or not keys:
                    break
                wrapped = True
        return keys[: self.sample]

    def _read(self, keys: Sequence[str]) -> list[tuple[int, bool] | None]:
        """(version, is a value) of each key's entry, or None when there is none (one pipeline)."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self._data_key(key))
        out: list[tuple[int, bool] | None] = []
        for raw in pipe.execute():
            if raw is None:
                out.append(None)
            else:
                entry = decode_entry(raw)
                out.append((entry.version, entry.value is not None))
        return out

    def _data_key(self, key: str) -> str:
        if "{" in key or "}" in key or "%" in key:
            key = key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        return f"{self.prefix}:{{{key}}}"

    def _decide(self, stale: bool) -> None:
        self.report.checked += 1
        self._m_checked.inc()
        self._recent.append(stale)
        if stale:
            self.report.stale += 1
            self._m_stale.inc()
        self.report.ratio = self._recent.count(True) / len(self._recent)
        self._m_ratio.set(self.report.ratio)

    def check_once(self) -> CacheAuditReport:
        """One round: re-check the suspects that are due, then sample new keys. Returns the running report."""
        decided = self._recheck_due()
        keys = [k for k in self.next_keys() if k not in self._suspects and k not in decided]
        now = self.clock()
        for key, cached in zip(keys, self._read(keys), strict=True):
            self.report.sampled += 1
            if cached is None or not cached[1]:
                self._decide(False)  # absent or tombstone: reads go to the source
                continue
            version = self.source(key)
            if version == cached[0]:
                self._decide(False)
            else:
                self._suspects[key] = _Suspect(key, cached[0], version, now + self.lag_bound_s)
        self.report.rounds += 1
        self.report.suspects_pending = len(self._suspects)
        return self.report

    def _recheck_due(self) -> set[str]:
        """Decide the suspects whose bound has passed; returns their keys."""
        now = self.clock()
        due = [s for s in self._suspects.values() if s.due <= now]
        if not due:
            return set()
        entries = self._read([s.key for s in due])
        for suspect, cached in zip(due, entries, strict=True):
            del self._suspects[suspect.key]
            if cached is None or not cached[1]:
                self._decide(False)
                continue
            version_now = self.source(suspect.key)
            cached_version = cached[0]
            stale = (
                (suspect.source is None and version_now is None)
                or (suspect.source is not None and cached_version < suspect.source)
                or (version_now is not None and cached_version > version_now)
            )
            if stale:
                log.warning(
                    "stale cache entry %r: cached version %s, source %s (first look) / %s (after %.1fs)",
                    suspect.key, cached_version, suspect.source, version_now, self.lag_bound_s,
                )  # fmt: skip
                if len(self.report.stale_list) < self.max_listed:
                    self.report.stale_list.append(
                        StaleEntry(suspect.key, suspect.cached, suspect.source, version_now, cached_version)
                    )
            self._decide(stale)
        self.report.suspects_pending = len(self._suspects)
        return {s.key for s in due}

    def settle(self, sleep: Callable[[float], object] = time.sleep) -> CacheAuditReport:
        """Wait out the lag bound of the pending suspects and decide them (the end of a bounded run).

        A suspect is never decided before its bound: if ``sleep`` returns early, those not due stay pending.
        """
        if self._suspects:
            wait = max(s.due for s in self._suspects.values()) - self.clock()
            if wait > 0:
                sleep(wait)
            self._recheck_due()
        return self.report

    # --- running ------------------------------------------------------------------------------

    def run(self, interval_s: float, rounds: int = 0) -> CacheAuditReport:
        """Sample every ``interval_s`` until :meth:`stop` (or ``rounds`` rounds, then settle); errors are logged."""
        done = 0
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.check_once()
            except Exception as exc:  # a Redis or source hiccup must not end a continuous sampler
                log.warning("cache audit round failed: %s: %s", type(exc).__name__, exc)
            done += 1
            if rounds and done >= rounds:
                return self.settle(self._stop.wait)
            self._stop.wait(max(0.0, interval_s - (self.clock() - started)))
        return self.report

    def stop(self) -> None:
        """Make :meth:`run` return after its current round."""
        self._stop.set()


def sql_source(conn: Any, sql: str) -> SourceVersion:
    """A source reading the version with ``sql`` (one ``%s`` parameter: the key) on a psycopg connection.

    The first column of the first row is the version; no row means the source has no such key.
    """
    if sql.count("%s") != 1:
        raise ConfigError("--source", "the SQL must take the key as exactly one %s parameter")

    def version(key: str) -> int | None:
        row = conn.execute(sql, (key,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    return version
