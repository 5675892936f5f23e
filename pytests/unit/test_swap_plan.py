"""runner.statements.plan on hand-built facts: which plan a table gets, and the statements of
each named step, in order, exactly as `--dry-run` prints them. No server."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest
from facts import LIVE, NATURAL_KEY, PARENT, PRIMARY_KEY, TARGET, column, table, text

from runner.declaration.artifacts import Relation
from runner.errors import RunnerError
from runner.server.catalog import Grant, Index, LiveTable, MaterializedView, Partition
from runner.statements import capture, plan

STAMP = datetime(2026, 12, 1, 8, 30, tzinfo=timezone.utc)
CAPTURED = capture.Capture.before_swap(LIVE, "dedup_archive")
DUPLICATES = plan.BuildCounts(rows=10, keys=4, snapshot="1000:1000:")
NONE = plan.BuildCounts(rows=4, keys=4, snapshot="1000:1000:")


def _plan(live=None, counts=DUPLICATES, captured=CAPTURED, **options) -> plan.TablePlan:
    return plan.plan_table(TARGET, live or table(), counts, STAMP, "dedup_archive", captured,
                           **options)


def _statements(steps: list[plan.Step]) -> list[str]:
    return [text(step.statement) for step in steps]


def _index_of(statements: list[str], start: str) -> int:
    return next(i for i, s in enumerate(statements) if s.startswith(start))


def test_a_table_with_duplicates_gets_a_swap_beside_it_and_an_archive_named_for_the_moment(
        ) -> None:
    planned = _plan()
    assert planned.action == "swap"
    assert (str(planned.shadow), str(planned.archive)) == (
        "Shop.order lines__dedup_new", "dedup_archive.order lines__20261201083000")
    assert planned.parents == (PARENT,)
    assert planned.concurrent == []


def test_the_new_table_is_the_owners_from_its_start_and_filled_from_dbts_kept_rows() -> None:
    prepared = _statements(_plan().prepare)
    assert prepared[:3] == [
        'drop table if exists "Shop"."order lines__dedup_new"',
        'create table "Shop"."order lines__dedup_new" (like "Shop"."order lines" including all'
        ' excluding indexes excluding identity)',
        'alter table "Shop"."order lines__dedup_new" owner to "app owner"',
    ]
    fill = prepared[_index_of(prepared, "with changed as (insert into")]
    assert ('insert into "Shop"."order lines__dedup_new" ("id", "order_id", "sku", "note")'
            ' select "id", "order_id", "sku", "note" from "dedup"."order_lines"') in fill
    # The unique indexes are built before the lock, never under it.
    assert 'create unique index "order lines__natural_key_new" on' in " ".join(prepared)
    assert ('alter table "Shop"."order lines__dedup_new" add constraint "order lines__dedup_new_0"'
            " PRIMARY KEY (id)") in prepared


def test_under_the_lock_the_names_change_hands_in_an_order_that_keeps_every_name_free(
        ) -> None:
    cut = _statements(_plan().cutover)
    order = [
        'alter table "Shop"."order lines__dedup_new" add constraint "order lines_order_id_fkey"'
        ' FOREIGN KEY (order_id) REFERENCES "Shop".orders(id) not valid',
        'alter table "Shop"."order lines" rename constraint "order lines_pkey" to',
        'alter sequence "Shop"."order lines_id_seq" owned by "Shop"."order lines__dedup_new"."id"',
        'alter table "Shop"."order lines" set schema "dedup_archive"',
        'alter table "dedup_archive"."order lines" rename to "order lines__20261201083000"',
        'alter table "dedup_archive"."order lines__20261201083000" drop constraint'
        ' "order lines_order_id_fkey"',
        'alter table "Shop"."order lines__dedup_new" rename to "order lines"',
        'alter table "Shop"."order lines" add constraint "order lines__natural_key" unique using'
        ' index "order lines__natural_key_new"',
        'grant INSERT on "Shop"."order lines" to "app_etl"',
        """comment on table "Shop"."order lines" is 'one row per line'""",
        'insert into "dedup_archive"."swap_log"',
    ]
    positions = [_index_of(cut, start) for start in order]
    assert positions == sorted(positions), [cut[p] for p in sorted(positions)]
    # The capture before the swap ends in it; the one for a rollback begins in it.
    assert cut[0] == 'drop trigger if exists "dedup_capture" on "Shop"."order lines"'
    assert cut[-1].startswith('insert into "dedup_archive"."captures"')


def test_the_foreign_key_added_not_valid_is_checked_after_the_commit() -> None:
    assert _statements(_plan().validate) == [
        'alter table "Shop"."order lines" validate constraint "order lines_order_id_fkey"']
    already_not_valid = table(foreign_keys=((
        "order lines_order_id_fkey",
        'FOREIGN KEY (order_id) REFERENCES "Shop".orders(id) NOT VALID', PARENT),))
    assert _plan(already_not_valid).validate == []


def test_no_duplicates_and_no_constraint_gets_the_index_built_concurrently_then_the_constraint(
        ) -> None:
    planned = _plan(counts=NONE)
    assert planned.action == "constraint"
    assert _statements(planned.concurrent) == [
        'drop index concurrently if exists "Shop"."order lines__natural_key_new"',
        'create unique index concurrently "order lines__natural_key_new" on "Shop"."order lines"'
        ' ("order_id", "sku")',
    ]
    assert _statements(planned.cutover)[0] == (
        'alter table "Shop"."order lines" add constraint "order lines__natural_key" unique using'
        ' index "order lines__natural_key_new"')


def test_a_key_enforced_already_with_no_duplicates_needs_nothing_but_ending_the_capture(
        ) -> None:
    planned = _plan(table(indexes=(PRIMARY_KEY, NATURAL_KEY)), counts=NONE)
    assert planned.action == "nothing"
    assert _statements(planned.cutover) == _statements(
        [plan.Step("", s) for s in capture.remove(CAPTURED, LIVE)])


def test_an_index_that_lets_nulls_differ_does_not_enforce_a_key_whose_nulls_are_equal() -> None:
    target = dataclasses.replace(TARGET, spec=dataclasses.replace(TARGET.spec,
                                                                  nulls="not_distinct"))
    nulls_differ = dataclasses.replace(NATURAL_KEY, nulls_not_distinct=False)
    assert table(indexes=(nulls_differ,)).enforcing_index(target.spec) is None
    assert table(indexes=(NATURAL_KEY,)).enforcing_index(target.spec) == NATURAL_KEY


def test_the_index_an_interrupted_run_left_is_dropped_and_built_again() -> None:
    leftover = Index("order lines__natural_key_new", "USING btree (order_id, sku)", None, None,
                     ("order_id", "sku"), unique=True, valid=True, partial=False,
                     nulls_not_distinct=True)
    planned = _plan(table(indexes=(PRIMARY_KEY, leftover)), counts=NONE)
    assert planned.action == "constraint"
    assert _statements(planned.concurrent)[0] == (
        'drop index concurrently if exists "Shop"."order lines__natural_key_new"')


def test_a_table_with_duplicates_and_no_capture_is_refused_with_what_to_run() -> None:
    with pytest.raises(RunnerError, match=r"^Shop.order lines has no change capture: run "
                                          r"`runner capture`, then `dbt build`"):
        _plan(captured=None)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"kind": "f"}, "it is not a plain table (partitioned or foreign)"),
    ({"parents": ("Shop.lines",)}, "it inherits from Shop.lines"),
    ({"children": ("Shop.old_lines",)}, "tables inherit from it (Shop.old_lines)"),
])
def test_what_a_swap_cannot_carry_over_is_refused_before_anything_runs(changes,
                                                                       reason) -> None:
    with pytest.raises(RunnerError) as refused:
        _plan(table(**changes))
    assert reason in str(refused.value)


def test_not_valid_reads_a_foreign_keys_definition() -> None:
    assert plan.not_valid("FOREIGN KEY (a) REFERENCES t(id) NOT VALID") == (
        "FOREIGN KEY (a) REFERENCES t(id)", False)
    assert plan.not_valid("FOREIGN KEY (a) REFERENCES t(id)") == (
        "FOREIGN KEY (a) REFERENCES t(id)", True)


LOOKUP = Index("order lines__natural_key_lookup", "USING btree (order_id, sku)", None, None,
               ("order_id", "sku"), unique=False, valid=True, partial=False,
               nulls_not_distinct=False)
DROP_LOOKUP = 'drop index "Shop"."order lines__natural_key_lookup"'


def test_an_etl_that_only_inserts_gets_no_index_and_no_rescan_under_the_lock() -> None:
    planned = _plan()
    assert (planned.lookup, planned.rescan_under_lock) == ([], False)
    assert DROP_LOOKUP not in _statements(planned.cutover)


def test_an_etl_that_deletes_or_rekeys_gets_an_index_of_the_swaps_own_dropped_under_the_lock(
        ) -> None:
    planned = _plan(rows_moved=True)
    assert _statements(planned.lookup) == [
        'create index concurrently "order lines__natural_key_lookup" on "Shop"."order lines"'
        ' ("order_id", "sku")']
    assert planned.rescan_under_lock
    # Dropped first, so that the original moves to the archive as it was.
    assert _statements(planned.cutover)[0] == DROP_LOOKUP


def test_the_index_a_killed_swap_left_is_used_if_valid_rebuilt_if_not_and_never_copied(
        ) -> None:
    reused = _plan(table(indexes=(PRIMARY_KEY, LOOKUP)))
    assert (reused.lookup, reused.rescan_under_lock) == ([], True)
    assert _statements(reused.cutover)[0] == DROP_LOOKUP
    assert "natural_key_lookup" not in " ".join(_statements(reused.prepare))
    invalid = dataclasses.replace(LOOKUP, valid=False)
    rebuilt = _plan(table(indexes=(PRIMARY_KEY, invalid)), rows_moved=True)
    assert [s.split(" on ")[0] for s in _statements(rebuilt.lookup)] == [
        'drop index concurrently if exists "Shop"."order lines__natural_key_lookup"',
        'create index concurrently "order lines__natural_key_lookup"']
    dropped = _plan(table(indexes=(PRIMARY_KEY, invalid)))
    assert (_statements(dropped.lookup), dropped.rescan_under_lock) == (
        ['drop index concurrently if exists "Shop"."order lines__natural_key_lookup"'], False)


def test_a_users_own_index_on_the_key_serves_the_rescan_and_stays() -> None:
    own = dataclasses.replace(LOOKUP, name="by key and more",
                              method="USING btree (sku, order_id, note)",
                              key_columns=("sku", "order_id", "note"))
    planned = _plan(table(indexes=(PRIMARY_KEY, own)), rows_moved=True)
    assert (planned.lookup, planned.rescan_under_lock) == ([], True)
    assert DROP_LOOKUP not in _statements(planned.cutover)
    assert 'create index "order lines__dedup_new_1"' in " ".join(_statements(planned.prepare))
    for unusable in (dataclasses.replace(own, partial=True), dataclasses.replace(own, valid=False),
                     dataclasses.replace(own, key_columns=("sku", None)),
                     dataclasses.replace(own, method="USING hash (sku)"),
                     dataclasses.replace(own, key_columns=("sku", "note", "order_id"))):
        assert table(indexes=(unusable,)).key_lookup_index(TARGET.spec) is None


NULLS_EQUAL = dataclasses.replace(TARGET, spec=dataclasses.replace(TARGET.spec,
                                                                   nulls="not_distinct"))
BEFORE_15 = 140000


def test_before_15_nulls_equal_are_a_partial_unique_index_beside_the_constraint() -> None:
    planned = plan.plan_table(NULLS_EQUAL, table(), DUPLICATES, STAMP, "dedup_archive",
                              CAPTURED, server_version=BEFORE_15)
    prepared = _statements(planned.prepare)
    assert ('create unique index "order lines__natural_key_new" on'
            ' "Shop"."order lines__dedup_new" ("order_id", "sku")') in prepared
    assert ('create unique index "order lines__natural_key_new_nulls__1" on'
            ' "Shop"."order lines__dedup_new" ("order_id") where "sku" is null') in prepared
    assert "nulls not distinct" not in " ".join(prepared)
    cutover = _statements(planned.cutover)
    constraint = _index_of(cutover, 'alter table "Shop"."order lines" add constraint '
                                    '"order lines__natural_key" unique using index')
    assert cutover[constraint + 1] == (
        'alter index "Shop"."order lines__natural_key_new_nulls__1" rename to'
        ' "order lines__natural_key_nulls__1"')
    from_15 = plan.plan_table(NULLS_EQUAL, table(), DUPLICATES, STAMP, "dedup_archive",
                              CAPTURED)
    assert ('create unique index "order lines__natural_key_new" on'
            ' "Shop"."order lines__dedup_new" ("order_id", "sku") nulls not distinct'
            ) in _statements(from_15.prepare)
    assert "nulls__1" not in " ".join(_statements(from_15.prepare + from_15.cutover))


def test_before_15_each_combination_of_nullable_key_columns_has_its_index() -> None:
    nullable = table(columns=(column("id", "bigint", True), column("order_id", "bigint"),
                              column("sku"), column("note")))
    planned = plan.plan_table(NULLS_EQUAL, nullable, NONE, STAMP, "dedup_archive", CAPTURED,
                              server_version=BEFORE_15)
    assert planned.action == "constraint"
    assert [s.split(" on ")[1] for s in _statements(planned.concurrent)
            if s.startswith("create unique index concurrently")] == [
        '"Shop"."order lines" ("order_id", "sku")',
        '"Shop"."order lines" ("sku") where "order_id" is null',
        '"Shop"."order lines" ("order_id") where "sku" is null',
        '"Shop"."order lines" ((true)) where "order_id" is null and "sku" is null',
    ]
    # Whatever fails to build is dropped again, and an interrupted run's are dropped first.
    assert [text(i) for i in planned.built_concurrently] == [
        '"Shop"."order lines__natural_key_new"', *(
            f'"Shop"."order lines__natural_key_new_nulls__{n}"' for n in (1, 2, 3))]
    assert len([s for s in _statements(planned.concurrent) if s.startswith("drop")]) == 4


def test_before_15_the_key_is_enforced_only_with_every_partial_index_in_place() -> None:
    distinct = dataclasses.replace(NATURAL_KEY, name="order lines__natural_key",
                                   nulls_not_distinct=False)
    partial = Index("order lines__natural_key_nulls__1", 'USING btree (order_id) WHERE (sku IS'
                    ' NULL)', None, None, ("order_id",), unique=True, valid=True, partial=True,
                    nulls_not_distinct=False)
    assert table(indexes=(distinct,)).enforcing_index(NULLS_EQUAL.spec) is None
    assert table(indexes=(distinct, partial)).enforcing_index(NULLS_EQUAL.spec) == distinct
    invalid = dataclasses.replace(partial, valid=False)
    assert table(indexes=(distinct, invalid)).enforcing_index(NULLS_EQUAL.spec) is None


ALTERNATIVE = dataclasses.replace(TARGET, spec=dataclasses.replace(
    TARGET.spec, nulls="not_distinct", alternative_key=("order_id", "sku", "note")))


def test_an_alternative_key_is_a_partial_unique_index_per_shape_of_null_on_every_version(
) -> None:
    for version in (BEFORE_15, plan.NULLS_NOT_DISTINCT_VERSION):
        planned = plan.plan_table(ALTERNATIVE, table(), DUPLICATES, STAMP, "dedup_archive",
                                  CAPTURED, server_version=version)
        prepared = [s.split(" on ")[1] for s in _statements(planned.prepare)
                    if s.startswith("create unique index")]
        # The constraint's NULLs differ: a key with a NULL is the alternative key's.
        assert prepared == [
            '"Shop"."order lines__dedup_new" ("order_id", "sku")',
            '"Shop"."order lines__dedup_new" ("order_id", "note") where "sku" is null',
            '"Shop"."order lines__dedup_new" ("order_id") where "sku" is null and "note" is null',
        ], version
        cutover = _statements(planned.cutover)
        assert [s for s in cutover if "_nulls__" in s] == [
            f'alter index "Shop"."order lines__natural_key_new_nulls__{n}" rename to'
            f' "order lines__natural_key_nulls__{n}"' for n in (1, 2)]


def test_an_alternative_key_is_enforced_only_by_a_constraint_whose_nulls_differ_and_its_indexes(
) -> None:
    distinct = dataclasses.replace(NATURAL_KEY, name="order lines__natural_key",
                                   nulls_not_distinct=False)
    partial = [Index(f"order lines__natural_key_nulls__{n}", "USING btree (order_id)", None,
                     None, ("order_id",), unique=True, valid=True, partial=True,
                     nulls_not_distinct=False) for n in (1, 2)]
    spec = ALTERNATIVE.spec
    assert table(indexes=(distinct,)).enforcing_index(spec) is None
    assert table(indexes=(distinct, partial[0])).enforcing_index(spec) is None
    assert table(indexes=(distinct, *partial)).enforcing_index(spec) == distinct
    # NULLS NOT DISTINCT makes one guest of all those without email on a reservation.
    equal = dataclasses.replace(distinct, nulls_not_distinct=True)
    assert table(indexes=(equal, *partial)).enforcing_index(spec) is None


def test_a_materialized_view_that_reads_the_table_is_created_again_under_the_lock() -> None:
    view = MaterializedView(
        Relation("Shop", "line totals"), " SELECT order_id, count(*) AS lines\n   FROM"
        ' "Shop"."order lines"\n  GROUP BY order_id;', ("fillfactor=90",), "report owner",
        "per order", False, (Grant("app_reader", "SELECT", grantable=False),),
        ('CREATE UNIQUE INDEX "line totals_order" ON "Shop"."line totals" USING btree'
         " (order_id)",), ())
    planned = plan.plan_table(TARGET, table(materialized_views=(view,)), DUPLICATES, STAMP,
                              "dedup_archive", CAPTURED)
    cutover = _statements(planned.cutover)
    first = _index_of(cutover, 'drop materialized view "Shop"."line totals"')
    # After the new table took the name, so that the definition reads it.
    assert first > _index_of(cutover, 'alter table "Shop"."order lines__dedup_new" rename to'
                                      ' "order lines"')
    assert cutover[first + 1:first + 6] == [
        'create materialized view "Shop"."line totals" with ("fillfactor" = \'90\') as  SELECT'
        ' order_id, count(*) AS lines\n   FROM "Shop"."order lines"\n  GROUP BY order_id with'
        " no data",
        'alter materialized view "Shop"."line totals" owner to "report owner"',
        'grant SELECT on "Shop"."line totals" to "app_reader"',
        'comment on materialized view "Shop"."line totals" is \'per order\'',
        'CREATE UNIQUE INDEX "line totals_order" ON "Shop"."line totals" USING btree (order_id)',
    ]
    assert planned.materialized_views == (view.relation,)


def _partitioned(key: tuple[str | None, ...] = ("order_id",)) -> LiveTable:
    """The order lines partitioned by order, one partition hashed again, two levels deep."""
    def below(name: str, leaf: bool = True) -> Partition:
        return Partition(Relation("Shop", name), leaf)

    return table(kind="p", partition_key=key, partitions=(
        below("lines 1"), below("lines 2", leaf=False), below("lines 2a"), below("lines 2b")))


def test_a_partitioned_table_is_deduplicated_in_place_each_partition_indexed_on_its_own(
        ) -> None:
    planned = _plan(_partitioned(), kept_rows_copied=True)
    assert (planned.action, planned.why) == (
        "in_place", "it is partitioned, which only in place keeps as it is")
    assert [s for s in _statements(planned.lookup) if s.startswith("create")] == [
        f'create index concurrently "{leaf}__natural_key_lookup" on "Shop"."{leaf}"'
        ' ("order_id", "sku")' for leaf in ("lines 1", "lines 2a", "lines 2b")]
    assert [s for s in _statements(planned.concurrent) if s.startswith("create")] == [
        f'create unique index concurrently "{leaf}__natural_key_new" on "Shop"."{leaf}"'
        ' ("order_id", "sku")' for leaf in ("lines 1", "lines 2a", "lines 2b")]
    cutover = _statements(planned.cutover)
    # Each partition's index becomes its constraint, then the parent's takes them in.
    constraints = [s for s in cutover if " add constraint " in s]
    assert constraints == [
        *(f'alter table "Shop"."{leaf}" add constraint "{leaf}__natural_key" unique using index'
          f' "{leaf}__natural_key_new"' for leaf in ("lines 1", "lines 2a", "lines 2b")),
        'alter table "Shop"."order lines" add constraint "order lines__natural_key" unique'
        ' ("order_id", "sku")']
    assert [s for s in cutover if "natural_key_lookup" in s] == [
        f'drop index if exists "Shop"."{leaf}__natural_key_lookup"'
        for leaf in ("lines 1", "lines 2a", "lines 2b")]


@pytest.mark.parametrize(("live", "spec", "refusal"), [
    (_partitioned(("order_id", "placed_on")), {},
     "Shop.order lines is partitioned by (order_id, placed_on), and PostgreSQL's unique "
     "constraint on a partitioned table must hold every column it is partitioned by: add "
     "placed_on to natural_key, or declare each partition as a table of its own"),
    (_partitioned((None,)), {},
     "Shop.order lines is partitioned by an expression, which no unique constraint can hold: "
     "declare each partition as a table of its own instead"),
    (_partitioned(), {"strategy": "swap"},
     "Shop.order lines: it is partitioned, and a swap would put a plain table in its place; "
     "set strategy: in_place or auto, which deduplicate it where it is"),
    (table(is_partition=True, parents=("Shop.lines",)), {"strategy": "swap"},
     "Shop.order lines: it is a partition of Shop.lines, and a swap would put a plain table in "
     "its place; set strategy: in_place or auto, which deduplicate it where it is"),
])
def test_what_a_partitioned_table_cannot_have_is_refused(live, spec, refusal) -> None:
    target = dataclasses.replace(TARGET, spec=dataclasses.replace(TARGET.spec, **spec))
    with pytest.raises(RunnerError) as refused:
        plan.plan_table(target, live, DUPLICATES, STAMP, "dedup_archive", CAPTURED)
    assert str(refused.value) == refusal
