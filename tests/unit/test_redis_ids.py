"""The Redis store's compact ids: which ids are kept as their 16 bytes, decided for a batch at once."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from kcons.adapters.redis.dedup import CANONICAL_UUID, uuid_blob

CANONICAL = st.uuids().map(str)
# Near misses: a canonical UUID with a character changed, added or removed, or in upper case.
NEAR = st.tuples(
    CANONICAL, st.integers(0, 36), st.sampled_from("0aAfFg-\n \u00e9"), st.sampled_from(["set", "ins", "del", "upper"])
)


def _mutate(t: tuple[str, int, str, str]) -> str:
    text, i, ch, op = t
    if op == "set":
        return text[:i] + ch + text[i + 1 :]
    if op == "ins":
        return text[:i] + ch + text[i:]
    if op == "del":
        return text[:i] + text[i + 1 :]
    return text.upper()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(CANONICAL, NEAR.map(_mutate)), min_size=1, max_size=6))
def test_a_batch_is_compact_exactly_when_every_id_is_a_canonical_uuid(ids: list[str]) -> None:
    blob = uuid_blob(ids)
    if all(CANONICAL_UUID.fullmatch(i) for i in ids):
        assert blob == b"".join(uuid.UUID(i).bytes for i in ids)
    else:
        assert blob is None


def test_ids_whose_lengths_shift_across_the_separator_are_not_taken_for_uuids() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert uuid_blob([a, b]) is not None
    assert uuid_blob([a[:-1], a[-1] + b]) is None
    assert uuid_blob([a.upper()]) is None
    assert uuid_blob([a.replace("-", "")]) is None
