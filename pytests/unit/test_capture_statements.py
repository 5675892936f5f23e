"""runner.statements.capture on hand-built facts: the trigger any writer may fire, and the
replay of its log into the new table. No server."""

from __future__ import annotations

import dataclasses
import re

from facts import LIVE, SPEC, column, table, text

from runner.declaration.artifacts import Relation
from runner.declaration.names import MAX_IDENTIFIER_BYTES, pg_name
from runner.statements import capture

CAPTURED = capture.Capture.before_swap(LIVE, "dedup_archive")
SHADOW = Relation("Shop", "order lines__dedup_new")
# A whole row tested for NULL: false as soon as any one column is NULL, whatever the row.
WHOLE_ROW_NULL_TEST = re.compile(r"_row\)?\s+is\s+(not\s+)?null")


def _replay(spec=SPEC, snapshot: str | None = "1000:1000:") -> list[str]:
    replay = capture.replay(spec, LIVE, SHADOW, CAPTURED.log, table().columns,
                            snapshot=snapshot)
    statements = []
    for field in dataclasses.fields(replay):
        value = getattr(replay, field.name)
        statements += [text(s) for s in (value if isinstance(value, list) else [value])
                       if s is not None]
    return statements


def test_the_trigger_runs_as_its_installer_with_a_search_path_no_writer_can_change() -> None:
    function = next(text(s) for s in capture.install(CAPTURED) if "create or replace function"
                    in text(s))
    assert function.startswith(
        'create or replace function "dedup_archive"."Shop__order lines__capture"() returns'
        " trigger language plpgsql security definer set search_path = pg_catalog, pg_temp as ")


def test_the_log_holds_whole_rows_of_the_tables_own_type_and_every_trigger_always_fires() -> None:
    statements = [text(s) for s in capture.install(CAPTURED)]
    assert ('old_row "Shop"."order lines", new_row "Shop"."order lines")'
            in statements[1])
    assert statements[-3:-1] == [
        'alter table "Shop"."order lines" enable always trigger "dedup_capture"',
        'alter table "Shop"."order lines" enable always trigger "dedup_capture_truncate"',
    ]


def test_the_replay_never_tests_a_whole_row_for_null() -> None:
    for spec in (SPEC, dataclasses.replace(SPEC, nulls="not_distinct")):
        found = [s for s in _replay(spec) if WHOLE_ROW_NULL_TEST.search(s)]
        assert found == []


def test_the_replay_skips_what_the_build_saw_and_without_a_snapshot_skips_nothing() -> None:
    seen = "not pg_visible_in_snapshot(xid, '1000:1000:'::pg_snapshot)"
    assert any(seen in s for s in _replay())
    assert not any("pg_visible_in_snapshot" in s for s in _replay(snapshot=None))


def test_a_rescanned_key_keeps_the_row_the_keep_rule_names() -> None:
    rescan = next(s for s in _replay() if "distinct on" in s and "dedup_rescan" in s)
    assert rescan.endswith('order by "order_id", "sku", "id" desc returning 1) update'
                           ' pg_temp."dedup_counts" set kept_rows = kept_rows + (select count(*)'
                           """ from changed) where live = '"Shop"."order lines"'""")


def test_under_nulls_distinct_a_null_key_row_is_a_group_of_its_own() -> None:
    own_group = 'case when "order_id" is null or "sku" is null then "id" end'
    assert any(own_group in s for s in _replay())
    assert not any(own_group in s for s in _replay(dataclasses.replace(SPEC,
                                                                       nulls="not_distinct")))


def test_names_stay_within_postgresqls_limit_and_apart() -> None:
    long = "a_table_name_that_goes_on_" * 3
    first, second = pg_name(long, "changes"), pg_name(long + "x", "changes")
    assert len(first.encode()) == len(second.encode()) == MAX_IDENTIFIER_BYTES
    assert first != second
    assert pg_name("short", "changes") == "short__changes"
    # Cut on a character, never inside one.
    cut = pg_name("ü" * 40, "x")
    assert re.fullmatch(r"ü+_[0-9a-f]{8}", cut) and len(cut.encode()) <= MAX_IDENTIFIER_BYTES


def _rescans(spec) -> list[str]:
    replay = capture.replay(spec, LIVE, SHADOW, CAPTURED.log, table().columns)
    return [text(s) for s in replay.rescan]


def test_a_rescan_matches_keys_by_what_an_index_on_the_key_serves_never_distinct_from(
        ) -> None:
    # order_id is NOT NULL, sku is not: a key without a NULL is one whose sku has a value.
    for spec in (SPEC, dataclasses.replace(SPEC, nulls="not_distinct")):
        rescans = _rescans(spec)
        by_equality = [s for s in rescans if '(r."sku" is not null) and' in s]
        assert len(by_equality) == 2
        assert all('."order_id" = r."order_id" and ' in s and '."sku" = r."sku"' in s
                   for s in by_equality)
        assert not any("distinct from" in s for s in rescans)


def test_only_where_nulls_are_equal_keys_with_a_null_are_rescanned_as_such_and_only_if_any(
        ) -> None:
    assert len(_rescans(SPEC)) == 2
    with_null = [s for s in _rescans(dataclasses.replace(SPEC, nulls="not_distinct"))
                 if '(r."sku" is null) and' in s]
    assert len(with_null) == 2
    assert all('."order_id" = r."order_id" and l."sku" is null' in s
               or '."order_id" = r."order_id" and s."sku" is null' in s for s in with_null)
    # The live table is read only when there is a key of the kind to rescan.
    insert = next(s for s in with_null if s.startswith("with changed as (insert"))
    assert 'where (select exists (select from dedup_rescan as r where (r."sku" is null)))' in insert


def test_each_combination_of_nullable_key_columns_has_statements_of_its_own() -> None:
    nullable = table(columns=(column("id", "bigint", True), column("order_id", "bigint"),
                              column("sku"), column("note")))
    replay = capture.replay(dataclasses.replace(SPEC, nulls="not_distinct"), LIVE, SHADOW,
                            CAPTURED.log, nullable.columns)
    patterns = [text(s).split(" where ", 1)[1].split(" and s.")[0] for s in replay.rescan
                if text(s).startswith("with changed as (delete")]
    assert patterns == [
        '(r."order_id" is not null and r."sku" is not null)',
        '(r."order_id" is null and r."sku" is not null)',
        '(r."order_id" is not null and r."sku" is null)',
        '(r."order_id" is null and r."sku" is null)',
    ]


def test_an_alternative_key_is_replayed_by_the_shape_of_each_rows_key() -> None:
    spec = dataclasses.replace(SPEC, nulls="not_distinct",
                               alternative_key=("order_id", "sku", "note"))
    replay = capture.replay(spec, LIVE, SHADOW, CAPTURED.log, table().columns)
    deletes = [text(s) for s in replay.rescan if text(s).startswith("with changed as (delete")]
    # The natural key whole, by itself; where sku is NULL, by the note too, NULL or not.
    assert [s.split(" where ", 1)[1].split(" returning")[0] for s in deletes] == [
        '(r."sku" is not null) and s."order_id" = r."order_id" and s."sku" = r."sku"',
        '(r."sku" is null and r."note" is not null) and s."order_id" = r."order_id"'
        ' and s."sku" is null and s."note" = r."note"',
        '(r."sku" is null and r."note" is null) and s."order_id" = r."order_id"'
        ' and s."sku" is null and s."note" is null',
    ]
    statements = _replay(spec)
    assert not any("distinct from" in text(s) for s in replay.rescan)
    # The candidates are grouped as the key groups are: the note only where sku is NULL.
    assert any('distinct on ("order_id", "sku", case when "order_id" is null or "sku" is null'
               ' then "note" end)' in s for s in statements)
    # Keys to rescan carry the note, which tells apart the keys with a NULL.
    assert any('(b.old_row)."note" as "note"' in s for s in statements)


def test_the_kept_rows_are_proven_by_a_probe_each_or_where_most_are_kept_by_one_join() -> None:
    def proof(most_rows_kept: bool) -> str:
        return text(capture.replay(SPEC, LIVE, SHADOW, CAPTURED.log, table().columns,
                                   most_rows_kept=most_rows_kept).all_rows_match)

    probes, joined = proof(False), proof(True)
    assert 'from "Shop"."order lines__dedup_new" as s where not coalesce((select ' in probes
    assert "join" not in probes
    assert joined.startswith(
        "select count(*) = 0, count(*) as rows_differing_from_live from "
        '"Shop"."order lines__dedup_new" as s left join "Shop"."order lines" as l on l.')
    # A kept row without a live row differs too: the join's NULLs must not pass as equal.
    assert " is null or not row(l.*)::record *= row(s.*)::record) and s." in joined
    # Either way, a row that a change waiting in the log will explain is not held against it.
    for statement in (probes, joined):
        assert statement.endswith("in ('U', 'D') union select (g.new_row).\"id\" from "
                                  '"dedup_archive"."Shop__order lines__changes" as g where g.op in '
                                  "('I', 'U'))")
