"""The Wing-Gong-Lowe linearizability checker on hand-made histories."""

from __future__ import annotations

import random

from kcons.raft.linearizability import UNKNOWN, KvModel, Operation, check_kv_history, check_linearizable


def op(call: float, ret: float, inp: tuple[object, ...], out: object = None) -> Operation:
    return Operation(call, ret, inp, out)


def test_sequential_history_that_reads_its_writes_is_linearizable() -> None:
    h = [op(0, 1, ("put", "a")), op(2, 3, ("get",), "a"), op(4, 5, ("cas", "a", "b"), True), op(6, 7, ("get",), "b")]
    assert check_linearizable(h, None, KvModel.step)


def test_stale_read_after_a_completed_write_is_rejected() -> None:
    h = [op(0, 1, ("put", "a")), op(2, 3, ("put", "b")), op(4, 5, ("get",), "a")]
    assert not check_linearizable(h, None, KvModel.step)


def test_concurrent_operations_may_take_effect_in_either_order() -> None:
    h = [op(0, 10, ("put", "a")), op(1, 11, ("put", "b")), op(12, 13, ("get",), "a")]
    assert check_linearizable(h, None, KvModel.step)
    h2 = [op(0, 10, ("put", "a")), op(1, 11, ("put", "b")), op(12, 13, ("get",), "b")]
    assert check_linearizable(h2, None, KvModel.step)


def test_write_with_unknown_outcome_may_apply_late_or_never() -> None:
    applied_late = [Operation.pending(0, ("put", "x")), op(5, 6, ("get",), None), op(7, 8, ("get",), "x")]
    never = [Operation.pending(0, ("put", "x")), op(5, 6, ("get",), None), op(7, 8, ("get",), None)]
    assert check_linearizable(applied_late, None, KvModel.step)
    assert check_linearizable(never, None, KvModel.step)


def test_value_that_flips_back_is_rejected_even_with_unknown_writes() -> None:
    h = [Operation.pending(0, ("put", "x")), op(5, 6, ("get",), "x"), op(7, 8, ("get",), None)]
    assert not check_linearizable(h, None, KvModel.step)


def test_compare_and_set_outcomes_must_match_the_register() -> None:
    ok = [op(0, 1, ("put", "a")), op(2, 3, ("cas", "a", "b"), True), op(4, 5, ("cas", "a", "c"), False)]
    bad = [op(0, 1, ("put", "a")), op(2, 3, ("cas", "a", "b"), True), op(4, 5, ("cas", "a", "c"), True)]
    assert check_linearizable(ok, None, KvModel.step)
    assert not check_linearizable(bad, None, KvModel.step)


def test_histories_are_checked_per_key() -> None:
    h = [("k1", op(0, 1, ("put", "a"))), ("k2", op(2, 3, ("get",), None)), ("k1", op(4, 5, ("get",), "a"))]
    assert check_kv_history(h).ok
    bad = [*h, ("k2", op(6, 7, ("get",), "a"))]
    result = check_kv_history(bad)
    assert not result.ok and result.failed_key == "k2"


def test_reads_with_unknown_outcome_constrain_nothing() -> None:
    h = [("k", op(0, 1, ("put", "a"))), ("k", Operation.pending(2, ("get",)))]
    assert check_kv_history(h).operations == 1


def test_random_sequential_histories_are_accepted_and_corrupted_ones_rejected() -> None:
    rng = random.Random(7)
    for _ in range(50):
        state = None
        history = []
        t = 0.0
        for _ in range(30):
            r = rng.random()
            if r < 0.4:
                v = rng.choice("abc")
                history.append(op(t, t + 1, ("put", v)))
                state = v
            elif r < 0.7:
                history.append(op(t, t + 1, ("get",), state))
            else:
                exp, new = rng.choice("abc"), rng.choice("abc")
                hit = state == exp
                history.append(op(t, t + 1, ("cas", exp, new), hit))
                if hit:
                    state = new
            t += 2
        assert check_linearizable(history, None, KvModel.step)
        reads = [n for n, o in enumerate(history) if o.input[0] == "get"]
        if reads:
            n = rng.choice(reads)
            wrong = "z"
            history[n] = op(history[n].call, history[n].ret, ("get",), wrong)
            assert not check_linearizable(history, None, KvModel.step)


def test_unknown_output_is_a_distinct_marker() -> None:
    assert Operation.pending(0, ("get",)).output is UNKNOWN
    assert UNKNOWN is not None


def test_versioned_model_checks_versions_returned_by_writes() -> None:
    from kcons.raft.linearizability import VersionedKvModel

    init = VersionedKvModel.INIT
    good = [op(0, 1, ("put", "a"), 1), op(2, 3, ("cas", 1, "b"), (True, 2)), op(4, 5, ("get",), ("b", 2))]
    assert check_linearizable(good, init, VersionedKvModel.step)
    duplicated = [op(0, 1, ("put", "a"), 1), op(2, 3, ("put", "b"), 3)]  # a write applied twice
    assert not check_linearizable(duplicated, init, VersionedKvModel.step)
    lost = [op(0, 1, ("put", "a"), 1), op(2, 3, ("get",), (None, 0))]
    assert not check_linearizable(lost, init, VersionedKvModel.step)
    deleted = [op(0, 1, ("put", "a"), 1), op(2, 3, ("delete",), True), op(4, 5, ("put", "c"), 1)]
    assert check_linearizable(deleted, init, VersionedKvModel.step)
