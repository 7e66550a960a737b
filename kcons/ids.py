"""Event ids: one UUIDv7 generator for the whole package, and the one rule for storing long ids.

:func:`fast_event_id` is the generator (canonical UUIDv7 text as bytes, the form a Kafka header
takes): the C one of the optional extension (``kcons._idgen``) when it is in use, else
the Python one below, which stays the reference; :func:`new_event_id` and :func:`uuid7` are the
same ids as ``str`` and ``uuid.UUID``.
Ids are unique within the process and increase within each thread (and across threads as long
as one thread at a time draws them). :func:`storage_id` is the one rule for the id a dedup
store keeps.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

from kcons._native import load

__all__ = ["MAX_ID_LENGTH", "fast_event_id", "new_event_id", "storage_id", "uuid7"]

#: The longest id a dedup store keeps as it is; longer ones are stored by their SHA-256 digest.
MAX_ID_LENGTH = 200

_HEX3 = tuple(f"{i:03x}".encode() for i in range(0x1000))


def _event_id_source() -> Callable[[], bytes]:
    """Build a generator of UUIDv7 text ids: unique within the process, increasing within each thread.

    Layout (RFC 9562): 48-bit Unix milliseconds, version 7, a 12-bit sequence within the
    millisecond, variant bits and 62 random bits. The random bits are drawn once per
    millisecond (the sequence keeps ids of one millisecond apart), and so is the text around
    the sequence. Each millisecond gets a C-level iterator over its 4096 ids (``map`` of
    ``bytes.join`` over ``zip``), so drawing one id costs one clock read and one ``next()``.
    The fast path takes no lock: the millisecond's end (in ns) and its iterator live in one
    immutable tuple swapped as a whole, and ``next()`` on that iterator runs in C under the
    GIL, so two threads never draw the same id. Only the start of a new millisecond takes the
    lock; when the 4096 ids of one millisecond are used up, the next millisecond is borrowed.

    A forked child starts a new millisecond with its own random bits: without that, parent and
    child would draw the same ids for the rest of the millisecond of the fork.
    """
    lock = threading.Lock()
    join = b"".join
    repeat = itertools.repeat
    # (end of the millisecond in ns since the epoch, the millisecond, the iterator over its remaining ids)
    state: tuple[int, int, Iterator[bytes]] = (0, -1, iter(()))

    def new_millisecond(now_ns: int) -> bytes:
        nonlocal state
        with lock:
            end, ms, ids = state
            if now_ns < end:  # another thread moved on already, or the clock went back: stay in order
                first = next(ids, None)
                if first is not None:
                    return first
                now = ms + 1  # the sequence ran out: borrow the next millisecond
            else:
                now = max(now_ns // 1_000_000, ms + 1)
            rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
            low = 0b10 << 62 | rand  # variant + 62 random bits: 16 hex digits
            ms48 = now & 0xFFFFFFFFFFFF
            head = f"{ms48 >> 16:08x}-{ms48 & 0xFFFF:04x}-7".encode()
            tail = f"-{low >> 48:04x}-{low & 0xFFFFFFFFFFFF:012x}".encode()
            ids = map(join, zip(repeat(head), _HEX3, repeat(tail), strict=False))
            first = next(ids)
            state = ((now + 1) * 1_000_000, now, ids)
            return first

    def forget_after_fork() -> None:
        nonlocal state, lock
        lock = threading.Lock()  # another thread of the parent may have held it
        state = (0, state[1], iter(()))  # the next id starts a millisecond after the parent's last

    os.register_at_fork(after_in_child=forget_after_fork)

    def fast_event_id(_time_ns: Callable[[], int] = time.time_ns, _next: Any = next) -> bytes:
        """Return a fresh UUIDv7 (canonical text, as header bytes): the ``kcons-id`` of a produced message."""
        end, _, ids = state
        now_ns = _time_ns()
        if now_ns < end:
            event_id: bytes | None = _next(ids, None)
            if event_id is not None:
                return event_id
        return new_millisecond(now_ns)

    return fast_event_id


#: The interface version of kcons._idgen this module is written for (its ``API`` constant).
IDGEN_API = 1


def _native_source() -> Callable[[], bytes] | None:
    """The C form of the generator above (kcons._idgen.event_id: the same ids at about a quarter
    of the cost per call), when it is built and allowed (see kcons._native)."""
    idgen = load("kcons._idgen", IDGEN_API)
    return None if idgen is None else cast("Callable[[], bytes]", idgen.event_id)


fast_event_id = _native_source() or _event_id_source()
"""Return a fresh UUIDv7 (canonical text, as header bytes): the ``kcons-id`` of a produced message."""


def new_event_id() -> str:
    """Return a fresh event id: a UUIDv7 in canonical text form (drawn from :func:`fast_event_id`)."""
    return fast_event_id().decode()


def uuid7() -> uuid.UUID:
    """Return a fresh UUIDv7 (RFC 9562) as a ``uuid.UUID`` (drawn from :func:`fast_event_id`)."""
    return uuid.UUID(fast_event_id().decode())


def storage_id(event_id: str) -> str:
    """The id as every dedup store keeps it: itself, or ``sha256:<hex digest>`` when it is longer
    than :data:`MAX_ID_LENGTH`, empty, or holds a newline (the Redis store's batch separator).

    Keys stay bounded and unambiguous in every store, and the same id maps to the same stored id
    whichever store keeps it.
    """
    if 0 < len(event_id) <= MAX_ID_LENGTH and "\n" not in event_id:
        return event_id
    return "sha256:" + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()
