"""Process-wide settings for a long-running kcons service (relay, invalidator, consumer).

A program that runs one of kcons' loops calls :func:`freeze_startup_heap` once, after setting up
and before the loop; the ``kcons`` commands do. Library classes never call it themselves: it
acts on the whole process, which belongs to the program.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["freeze_startup_heap"]

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Exempt every object alive now from the cyclic garbage collector (``gc.freeze``); returns how many.

    A service's modules, clients and settings live as long as the process, yet every full
    collection walks all of them: with confluent-kafka, psycopg, redis and prometheus-client
    imported that is hundreds of thousands of objects, a pause of tens of milliseconds (more on a
    busy machine) in the middle of the publish or invalidation loop, which then shows in the
    latency tail. Frozen objects are still freed by reference counting; only reference cycles
    among them are never collected. Objects made later are collected as before. Garbage
    already unreachable is collected first, so it is not kept.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%d objects exempted from the cyclic garbage collector", frozen)
    return frozen
