"""One rule for names put into SQL or keys (``check_identifier``) and one for stored ids (``storage_id``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kcons.adapters.postgres import dedup_schema_sql
from kcons.adapters.redis import RedisDedupStore
from kcons.adapters.sqlite import SqliteDedupStore
from kcons.config import check_identifier
from kcons.dedup import validate_namespace
from kcons.errors import ConfigError
from kcons.ids import MAX_ID_LENGTH, storage_id
from kcons.outbox.schema import validate_table


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("sql", ["kcons_dedup", "_t", "Orders2"], ["2orders", "a-b", "a b", "t;drop", "é"]),
        ("lowercase_sql", ["kcons_outbox", "_x9"], ["Outbox", "9x", "a.b"]),
        ("key", ["orders-group.v1", "a:b_c", "9"], ["a b", "bad}{", "a/b", "a\tb"]),
    ],
)
def test_identifier_kinds_accept_their_characters_only(kind: str, good: list[str], bad: list[str]) -> None:
    for value in good:
        assert check_identifier("setting", value, kind=kind, max_length=63) == value  # type: ignore[arg-type]
    for value in bad:
        with pytest.raises(ConfigError, match="setting"):
            check_identifier("setting", value, kind=kind, max_length=63)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["sql", "lowercase_sql", "key"])
def test_a_trailing_newline_empty_or_overlong_name_is_rejected(kind: str) -> None:
    for value in ["name\n", "", "n" * 11, None, 5]:
        with pytest.raises(ConfigError, match="invalid setting table"):
            check_identifier("table", value, kind=kind, max_length=10)  # type: ignore[arg-type]


def test_every_name_check_rejects_a_trailing_newline() -> None:
    with pytest.raises(ConfigError, match="KCONS_OUTBOX_TABLE"):
        validate_table("kcons_outbox\n")
    with pytest.raises(ConfigError, match="namespace"):
        validate_namespace("namespace", "orders\n")
    with pytest.raises(ConfigError, match="table"):
        dedup_schema_sql("kcons_dedup\n")
    with pytest.raises(ConfigError, match="table"):
        SqliteDedupStore(":memory:", "orders", table="kcons_dedup\n")
    with pytest.raises(ConfigError, match="owner"):
        RedisDedupStore(object(), "orders", owner="me\n")


def test_outbox_tables_leave_room_for_the_derived_names() -> None:
    assert validate_table("t" * 41) == "t" * 41
    with pytest.raises(ConfigError):
        validate_table("t" * 42)


def test_stored_id_is_the_id_unless_long_empty_or_holding_a_newline() -> None:
    short = "x" * MAX_ID_LENGTH
    assert storage_id(short) == short
    for odd in [short + "y", "", "a\nb"]:
        stored = storage_id(odd)
        assert stored.startswith("sha256:") and len(stored) == len("sha256:") + 64 and "\n" not in stored
        assert storage_id(odd) == stored
    assert len({storage_id(short + "y"), storage_id(""), storage_id("a\nb")}) == 3


_IDS = st.one_of(st.text(max_size=8), st.text(min_size=MAX_ID_LENGTH, max_size=MAX_ID_LENGTH + 2))


@given(st.lists(_IDS, max_size=6))
def test_redis_batch_join_fast_path_equals_storage_id_per_id(ids: list[str]) -> None:
    assert RedisDedupStore._join(ids) == "\n".join(storage_id(i) for i in ids)
