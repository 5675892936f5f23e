"""The swap's pure builders on hand-built facts: no server, milliseconds."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest
from psycopg import sql

from runner.declaration.artifacts import DedupSpec, DedupTarget, KeepColumn, Relation
from runner.errors import RunnerError
from runner.server.catalog import Column, LiveTable, MaterializedView, Reference
from runner.statements import capture, plan

LIVE = Relation("shop", "order lines")
SPEC = DedupSpec(("order_id", "line"), (KeepColumn("id", True),), "not_distinct")
TARGET = DedupTarget("shop.order lines", LIVE, Relation("dedup", "order lines"),
                     Relation("dedup_work", "groups"), SPEC, "model.x.order_lines")


def live_table(*, nullable_key: bool = True, **changes) -> LiveTable:
    columns = (Column("id", "bigint", True, "", False),
               Column("order_id", "text", not nullable_key, "", False),
               Column("line", "integer", True, "", False))
    table = LiveTable(
        relation=LIVE, owner="app", columns=columns, indexes=(), foreign_keys=(),
        references=(), views=(), grants=(), comment=None, owned_sequences=(), triggers=(),
        row_security=False, force_row_security=False, policies=(), options=(), kind="r",
        materialized_views=(), publications=(), replica_identity="d",
        replica_identity_index=None, column_grants=(), identity_sequences=())
    return dataclasses.replace(table, **changes)


def as_text(statement: sql.Composable) -> str:
    """A statement as PostgreSQL would receive it, without a connection: names and literals
    here are plain ASCII, which every client encoding spells the same."""
    return statement.as_string(None)


@pytest.mark.parametrize("version", [130000, 140000, 150000])
def test_not_distinct_on_a_key_that_cannot_be_null_needs_no_nulls_clause(version: int) -> None:
    live = live_table(nullable_key=False)
    index = plan._unique_index(SPEC, live, "key_new", sql.Identifier(LIVE.schema, LIVE.name),
                               version)
    assert plan.partial_key_shapes(SPEC, live, version) == []
    assert as_text(index) == ('create unique index "key_new" on "shop"."order lines" '
                              '("order_id", "line")')


def test_not_distinct_on_a_nullable_key_is_enforced_with_nulls_not_distinct() -> None:
    index = plan._unique_index(SPEC, live_table(), "key_new",
                               sql.Identifier(LIVE.schema, LIVE.name), 150000)
    assert as_text(index).endswith(' ("order_id", "line") nulls not distinct')


@pytest.mark.parametrize(("changes", "says"), [
    ({"is_partition": True, "parents": ("shop.all lines",)},
     "it is a partition of shop.all lines, which a swap would take it out of"),
    ({"parents": ("shop.base",)}, "it inherits from shop.base"),
    ({"children": ("shop.old lines",)}, "tables inherit from it (shop.old lines)"),
    ({"kind": "p"}, "it is not a plain table (partitioned or foreign)"),
    ({"materialized_views": (MaterializedView(
        Relation("shop", "totals"), " SELECT 1;", (), "app owner", None, True, (), (),
        ("shop.totals_by_day",)),)},
     "shop.totals_by_day read materialized view shop.totals, which reads it"),
    ({"foreign_keys": (("lines_parent_fkey", "FOREIGN KEY (parent) REFERENCES shop.lines(id)",
                        LIVE),)},
     "it references itself (lines_parent_fkey)"),
])
def test_what_the_swap_cannot_carry_over_is_refused_by_name(changes: dict, says: str) -> None:
    with pytest.raises(RunnerError) as refused:
        plan.refuse_unsupported(live_table(**changes))
    assert str(refused.value) == (f"runner swap cannot yet carry shop.order lines over: {says}; "
                                  "deduplicate it by hand or leave it out with --select")


REFUNDS = Reference("refunds_line_fkey", Relation("shop", "refunds"), ("line",), ("id",),
                    "shop.refunds.refunds_line_fkey", "FOREIGN KEY (line) REFERENCES "
                    'shop."order lines"(id)', True, ("id",), True)


@pytest.mark.parametrize(("reference", "spec", "swapped", "in_place", "says"), [
    (REFUNDS, {"references": "refuse"}, set(), False,
     "runner swap does not replace shop.order lines: foreign keys point at it "
     "(shop.refunds.refunds_line_fkey) and its meta.dedup says references: refuse; set "
     "references: repoint to move their rows to the kept rows, or leave it out with --exclude"),
    (REFUNDS, {"references": "refuse"}, set(), True,
     "runner swap does not deduplicate shop.order lines: foreign keys point at it "
     "(shop.refunds.refunds_line_fkey) and its meta.dedup says references: refuse; set "
     "references: repoint to move their rows to the kept rows, or leave it out with --exclude"),
    (REFUNDS, {"any_copy": True}, set(), True,
     "foreign keys point at shop.order lines (shop.refunds.refunds_line_fkey), so its rows "
     "differ in the columns they point at, and keep: any removes only copies equal in every "
     "column: declare keep with a tie-breaker instead"),
    (REFUNDS, {}, {Relation("shop", "refunds")}, True,
     "shop.refunds is deduplicated in the same run as shop.order lines, whose rows its foreign "
     "key refunds_line_fkey re-points: swap shop.order lines first, then shop.refunds "
     "(--select)"),
    (dataclasses.replace(REFUNDS, indexed=False), {}, set(), True,
     "shop.refunds.refunds_line_fkey points at shop.order lines, and no index of shop.refunds "
     "starts with (line), without which finding the rows that point at each removed row is a "
     "scan: create one (create index concurrently on shop.refunds (line)), then run `runner "
     "swap` again"),
    (dataclasses.replace(REFUNDS, row_key=()), {}, set(), False,
     "shop.refunds.refunds_line_fkey points at shop.order lines, and shop.refunds has no "
     "primary key, by which a rollback would put back the rows it re-points: add one, or set "
     "references: refuse for shop.order lines"),
])
def test_references_that_cannot_be_re_pointed_are_refused_by_name(
        reference: Reference, spec: dict, swapped: set, in_place: bool, says: str) -> None:
    with pytest.raises(RunnerError) as refused:
        plan.refuse_references(dataclasses.replace(TARGET.spec, **spec),
                               live_table(references=(reference,)), swapped,
                               {"refunds_line_fkey"}, in_place=in_place)
    assert str(refused.value) == says


def test_in_place_needs_no_capture_of_the_references_nor_a_not_valid_key() -> None:
    """In place the foreign keys stay as they are: nothing is added again NOT VALID, and no
    written value is read from a capture."""
    partitioned = dataclasses.replace(REFUNDS, partitioned=True)
    plan.refuse_references(TARGET.spec, live_table(references=(partitioned,)), set(), set(),
                           server_version=130000, in_place=True)
    with pytest.raises(RunnerError, match="is partitioned, and before PostgreSQL 18"):
        plan.refuse_references(TARGET.spec, live_table(references=(partitioned,)), set(),
                               set(), server_version=130000)
    with pytest.raises(RunnerError, match="are not captured"):
        plan.refuse_references(TARGET.spec, live_table(references=(REFUNDS,)), set(), set())


def test_a_table_with_duplicates_and_no_capture_is_refused() -> None:
    with pytest.raises(RunnerError) as refused:
        plan.plan_table(TARGET, live_table(), plan.BuildCounts(10, 4, None),
                        datetime(2026, 12, 1, tzinfo=timezone.utc), "dedup_archive", None)
    assert "has no change capture: run `runner capture`" in str(refused.value)


def test_the_archive_is_made_inert_and_a_capture_follows_the_swap() -> None:
    live = live_table(foreign_keys=(("lines_order_fkey", "FOREIGN KEY (order_id) REFERENCES "
                                     "shop.orders(id)", Relation("shop", "orders")),))
    stamp = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    captured = capture.Capture.before_swap(LIVE, "dedup_archive")
    planned = plan.plan_table(TARGET, live, plan.BuildCounts(10, 4, "1:1:"), stamp,
                              "dedup_archive", captured)
    cutover = [as_text(step.statement) for step in planned.cutover]
    archive = '"dedup_archive"."order lines__20261201120000"'
    moved = cutover.index('alter table "shop"."order lines" set schema "dedup_archive"')
    dropped = cutover.index(f'alter table {archive} drop constraint "lines_order_fkey"')
    assert moved < dropped
    # The capture of the original ends first; the one of the new table starts last.
    assert cutover[0] == 'drop trigger if exists "dedup_capture" on "shop"."order lines"'
    assert cutover[-1].startswith('insert into "dedup_archive"."captures"')
    assert "'order lines__20261201120000'" in cutover[-1]


@pytest.mark.parametrize(("definition", "validated_after"), [
    ("FOREIGN KEY (order_id) REFERENCES shop.orders(id)", True),
    ("FOREIGN KEY (order_id) REFERENCES shop.orders(id) NOT VALID", False),
])
def test_foreign_keys_come_under_the_lock_not_valid_and_are_checked_after_it(
        definition: str, validated_after: bool) -> None:
    # Added before the lock, a foreign key would hold its parent against writers from then to
    # the commit; validated under the lock, for a scan of the new table.
    live = live_table(foreign_keys=(("lines_order_fkey", definition, Relation("shop", "orders")),))
    planned = plan.plan_table(TARGET, live, plan.BuildCounts(10, 4, "1:1:"),
                              datetime(2026, 12, 1, tzinfo=timezone.utc), "dedup_archive",
                              capture.Capture.before_swap(LIVE, "dedup_archive"))
    added = ('alter table "shop"."order lines__dedup_new" add constraint "lines_order_fkey" '
             "FOREIGN KEY (order_id) REFERENCES shop.orders(id) not valid")
    assert not any("foreign key" in as_text(step.statement).lower() for step in planned.prepare)
    assert added in [as_text(step.statement) for step in planned.cutover]
    assert [as_text(step.statement) for step in planned.validate] == (
        ['alter table "shop"."order lines" validate constraint "lines_order_fkey"']
        if validated_after else [])
    assert planned.parents == (Relation("shop", "orders"),)
    assert as_text(plan.parents_lock_statement([planned])) == (
        'lock table "shop"."orders" in share row exclusive mode')
