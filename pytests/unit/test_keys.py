"""runner.statements.keys: one count of a table's keys for audit and verify, meaning what the
constraint will mean for NULLs. No server."""

from __future__ import annotations

import dataclasses

from facts import LIVE, SPEC, text

from runner.declaration.artifacts import Relation
from runner.statements.keys import (
    KeyCounts,
    count_keys,
    count_references,
    key_shapes,
    null_key_shapes,
)


def test_a_group_of_null_key_rows_is_one_duplicated_key_only_where_nulls_are_equal() -> None:
    distinct = text(count_keys(LIVE, SPEC))
    equal = text(count_keys(LIVE, dataclasses.replace(SPEC, nulls="not_distinct")))
    assert ('count(*) filter (where key_rows > 1 and not ("key_1" is null or "key_2" is null))'
            " as duplicated_keys") in distinct
    assert "count(*) filter (where key_rows > 1) as duplicated_keys" in equal
    # Under nulls: distinct every NULL-key row is a key; under not_distinct each group is.
    assert ('+ coalesce(sum(key_rows) filter (where "key_1" is null or "key_2" is null), 0))'
            "::bigint as unique_rows") in distinct
    assert ('+ count(*) filter (where "key_1" is null or "key_2" is null))::bigint as'
            " unique_rows") in equal


def test_a_block_range_is_read_by_tid() -> None:
    assert ("""where ctid >= '(10,0)'::tid and ctid < '(20,0)'::tid"""
            in text(count_keys(LIVE, SPEC, (10, 20))))


def test_counts_add_up_over_tables_and_round_as_postgresql_does() -> None:
    total = KeyCounts(10, 4, 1, 2, "(1,a)") + KeyCounts(5, 5, 0)
    assert total == KeyCounts(15, 9, 1, 2, "(1,a)")
    assert (total.duplicate_rows, total.duplicate_pct, total.duplication_factor) == (
        6, 40.0, 1.7)
    assert KeyCounts(3, 2, 0).duplicate_pct == 33.33
    assert KeyCounts(0, 0, 0).duplicate_pct is None


ALTERNATIVE = dataclasses.replace(SPEC, nulls="not_distinct",
                                  alternative_key=("order_id", "sku", "note"))


def test_an_alternative_key_counts_what_it_adds_only_where_the_natural_key_has_a_null() -> None:
    counted = text(count_keys(LIVE, ALTERNATIVE))
    assert ('select "order_id", "sku", case when "order_id" is null or "sku" is null then'
            ' "note" end, count(*)') in counted
    # A NULL key is one in the natural key: the note is told apart, not counted as a NULL.
    assert '(where "key_1" is null or "key_2" is null)' in counted
    assert '"key_3" is null' not in counted


def test_key_shapes_of_an_alternative_key() -> None:
    shapes = key_shapes(ALTERNATIVE, {"order_id"})
    assert [(s.nulls, s.compared, s.checked) for s in shapes] == [
        ((), ("order_id", "sku"), ("sku",)),
        (("sku",), ("order_id", "note"), ("sku", "note")),
        (("sku", "note"), ("order_id",), ("sku", "note")),
    ]
    assert null_key_shapes(ALTERNATIVE, {"order_id"}, 180000) == shapes[1:]
    # Without one, NULLs equal need partial indexes only before 15; NULLs distinct, none.
    equal = dataclasses.replace(SPEC, nulls="not_distinct")
    assert null_key_shapes(equal, {"order_id"}, 180000) == []
    assert [s.nulls for s in null_key_shapes(equal, {"order_id"}, 140000)] == [("sku",)]
    assert [s.nulls for s in key_shapes(SPEC, set())] == [()]


def test_references_to_duplicates_are_counted_by_the_keep_rule_and_the_null_policy() -> None:
    child = Relation("Shop", "line notes")
    counted = text(count_references(LIVE, SPEC, ("id",), [(child, ("line",))]))
    # Under nulls: distinct a NULL-key row is a group of its own, so never removed.
    assert ('row_number() over (partition by "order_id", "sku", case when "order_id" is null'
            ' or "sku" is null then "id" end order by "id" desc) as dedup_rank') in counted
    assert 'on c."line" = removed."referenced_1"' in counted
    equal = text(count_references(LIVE, dataclasses.replace(SPEC, nulls="not_distinct"),
                                  ("id",), [(child, ("line",))]))
    assert 'partition by "order_id", "sku" order by' in equal
