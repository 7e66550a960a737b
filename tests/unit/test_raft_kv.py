"""The replicated key-value state machine: versions, CAS, leases with fencing, sessions, watches."""

from __future__ import annotations

import json

from kcons.raft.kv import KvStateMachine


def cmd(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def test_versions_count_writes_and_cas_checks_the_version() -> None:
    sm = KvStateMachine()
    assert sm.apply(1, cmd(op="put", key="a", value="1"))["version"] == 1
    assert sm.apply(2, cmd(op="cas", key="a", version=1, value="2")) == {"ok": True, "version": 2, "revision": 2}
    assert sm.apply(3, cmd(op="cas", key="a", version=1, value="3")) == {"ok": False, "version": 2}
    assert sm.apply(4, cmd(op="cas", key="b", version=0, value="new"))["ok"] is True
    item = sm.get("a")
    assert item is not None and (item.value, item.version, item.revision) == ("2", 2, 2)
    assert sm.apply(5, cmd(op="delete", key="a")) == {"ok": True, "deleted": True}
    assert sm.get("a") is None
    assert sm.apply(6, cmd(op="put", key="a", value="again"))["version"] == 1


def test_a_lease_has_one_holder_until_it_expires_and_tokens_grow() -> None:
    sm = KvStateMachine()
    a = sm.apply(10, cmd(op="lease_acquire", name="L", holder="a", ttl=5, now=100.0))
    assert a == {"ok": True, "token": 10, "holder": "a", "ttl": 5.0}
    b = sm.apply(11, cmd(op="lease_acquire", name="L", holder="b", ttl=5, now=101.0))
    assert b["ok"] is False and b["holder"] == "a"
    assert sm.apply(12, cmd(op="lease_renew", name="L", token=10, ttl=5, now=104.0))["ok"] is True
    assert sm.apply(13, cmd(op="lease_acquire", name="L", holder="b", ttl=5, now=108.0))["ok"] is False
    b2 = sm.apply(14, cmd(op="lease_acquire", name="L", holder="b", ttl=5, now=109.5))
    assert b2["ok"] is True and b2["token"] == 14
    assert sm.apply(15, cmd(op="lease_renew", name="L", token=10, ttl=5, now=110.0))["ok"] is False
    assert sm.apply(16, cmd(op="lease_release", name="L", token=10))["ok"] is False
    assert sm.apply(17, cmd(op="lease_release", name="L", token=14))["ok"] is True
    assert sm.apply(18, cmd(op="lease_acquire", name="L", holder="a", ttl=5, now=111.0))["token"] == 18


def test_a_retried_command_of_a_session_is_applied_once() -> None:
    sm = KvStateMachine()
    first = sm.apply(1, cmd(op="put", key="k", value="v", client="c1", seq=1))
    again = sm.apply(2, cmd(op="put", key="k", value="v", client="c1", seq=1))
    assert first == again
    assert sm.get("k").version == 1  # type: ignore[union-attr]
    assert sm.apply(3, cmd(op="put", key="k", value="w", client="c1", seq=2))["version"] == 2
    assert sm.apply(4, cmd(op="put", key="k", value="x", client="c1", seq=1)) == {"error": "stale_sequence"}


def test_watch_events_follow_a_prefix_and_report_compaction() -> None:
    sm = KvStateMachine(event_history=3)
    for i, key in enumerate(["a/1", "b/1", "a/2", "a/3"], start=1):
        sm.apply(i, cmd(op="put", key=key, value=str(i)))
    events = sm.events_after(1, "a/")
    assert events is not None and [e.key for e in events] == ["a/2", "a/3"]
    assert sm.events_after(0, "a/") is None  # event 1 was dropped from the history


def test_snapshot_restores_identical_state() -> None:
    sm = KvStateMachine()
    sm.apply(1, cmd(op="put", key="a", value="1", client="c", seq=7))
    sm.apply(2, cmd(op="lease_acquire", name="L", holder="h", ttl=3, now=5.0))
    copy = KvStateMachine()
    copy.restore(sm.snapshot())
    assert copy.snapshot() == sm.snapshot()
    assert copy.apply(3, cmd(op="put", key="a", value="1", client="c", seq=7))["version"] == 1


def test_malformed_commands_are_answered_not_raised() -> None:
    sm = KvStateMachine()
    assert sm.apply(1, b"not json") == {"error": "bad_command"}
    assert sm.apply(2, cmd(op="cas", key="a")) == {"error": "bad_command"}
    assert sm.apply(3, cmd(op="frobnicate")) == {"error": "unknown_op"}
    assert sm.revision == 3
