"""freeze_startup_heap (kcons.runtime): start-up objects leave the collector's passes, garbage does not stay."""

from __future__ import annotations

import gc
import weakref

from kcons.runtime import freeze_startup_heap


class Node:
    """A container that can point at itself (a reference cycle only the cyclic collector frees)."""

    def __init__(self) -> None:
        self.other: Node | None = None


def _cycle() -> weakref.ref[Node]:
    node = Node()
    node.other = node
    return weakref.ref(node)


def test_garbage_before_the_freeze_is_collected_and_cycles_made_after_it_still_are() -> None:
    dropped = _cycle()  # unreachable already: must be collected, not frozen
    kept = Node()
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert dropped() is None, "unreachable start-up garbage must not be kept by the freeze"
        assert not any(o is kept for o in gc.get_objects()), "a live start-up object leaves the collector's lists"
        later = _cycle()
        gc.collect()
        assert later() is None, "cycles made after the freeze are still collected"
    finally:
        gc.unfreeze()
