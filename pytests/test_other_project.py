"""A user's project unlike the demo: quoted names, a text key, a uuid tie-breaker, a keep rule
on two columns and NULL keys forbidden, with this project installed as a dbt package."""

from __future__ import annotations

import fcntl
import re
import shutil
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from conftest import PROJECT_DIR, Database, _create_database

from runner.declaration import dbt
from runner.server.connection import environment

OTHER_PROJECT = PROJECT_DIR / "integration_tests"

TABLE = """
create schema "Shop";
create table "Shop"."Order Lines" (
    uid uuid primary key,
    "Order ID" text not null,
    line_no integer,
    updated_at timestamptz not null,
    note text
);
-- 5 orders of 3 lines, each line loaded 4 times by updates; the last two loads of every line
-- share a timestamp, so the greatest uid must break the tie.
insert into "Shop"."Order Lines"
select md5(o || '-' || l || '-' || v)::uuid, 'ORD-' || o, l,
       timestamptz '2025-01-01' + least(v, 3) * interval '1 day', 'version ' || v
from generate_series(1, 5) as o, generate_series(1, 3) as l, generate_series(1, 4) as v;
"""

# The row to keep, said differently from the macro's DISTINCT ON: no row of the same key is
# later, or as late with a greater uid.
EXPECTED_KEPT = """
select t.uid from "Shop"."Order Lines" as t
where not exists (
    select from "Shop"."Order Lines" as other
    where other."Order ID" = t."Order ID" and other.line_no = t.line_no
        and (other.updated_at, other.uid) > (t.updated_at, t.uid)
)
"""


def run_other_dbt(database: Database, *args: str):
    return run_dbt_in(OTHER_PROJECT, database, *args)


def other_project_deps(database: Database) -> None:
    """`dbt deps` in the integration project, once for the whole run: each worker of the suite
    builds in it, and a reinstall while another builds leaves that build without the package."""
    with open(OTHER_PROJECT / "dbt_packages.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (OTHER_PROJECT / "dbt_packages" / "dedup").exists():
            assert run_other_dbt(database, "deps").success


@pytest.fixture
def shop(server, tmp_path, request):
    name = f"shop_{request.node.name[-20:].lower()}"
    _create_database(server, name)
    database = Database({**server.environ(), "PGDATABASE": name}, tmp_path / "target")
    with database.connect() as conn:
        conn.execute(TABLE)
    other_project_deps(database)
    yield database
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute(f'drop database "{name}" with (force)')


def test_multi_column_keep_rule_and_swap_on_quoted_names(shop: Database) -> None:
    assert run_other_dbt(shop, "parse").success
    captured = shop.runner("capture", "--project-dir", str(OTHER_PROJECT))
    assert captured.exit_code == 0, captured.output
    assert run_other_dbt(shop, "build").success
    with shop.connect() as conn:
        expected = {row[0] for row in conn.execute(EXPECTED_KEPT)}
        kept = {row[0] for row in conn.execute('select uid from dedup."Order Lines"')}
    assert len(expected) == 15
    assert kept == expected
    result = shop.runner("swap", "--project-dir", str(OTHER_PROJECT))
    assert result.exit_code == 0, result.output
    with shop.connect() as conn:
        live = {row[0] for row in conn.execute('select uid from "Shop"."Order Lines"')}
        constraint = conn.execute(
            "select pg_get_constraintdef(oid) from pg_constraint"
            " where conrelid = '\"Shop\".\"Order Lines\"'::regclass and contype = 'u'"
        ).fetchone()[0]
    assert live == expected
    # nulls: forbidden needs no NULLS NOT DISTINCT: no NULL key gets past the tests.
    assert constraint == 'UNIQUE ("Order ID", line_no)'


def test_a_null_key_fails_the_build_when_nulls_are_forbidden(shop: Database) -> None:
    with shop.connect() as conn:
        conn.execute("""insert into "Shop"."Order Lines" values
                     (gen_random_uuid(), 'ORD-9', null, now(), 'no line number')""")
    result = run_other_dbt(shop, "build")
    assert not result.success
    failed = {r.node.name for r in result.result.results if r.status == "fail"}
    assert any("dedup_natural_key_unique_order_lines" in name for name in failed)
    refused = shop.runner("swap", "--project-dir", str(OTHER_PROJECT))
    assert refused.exit_code == 4
    assert "has status fail in the latest dbt build" in refused.output


def test_few_duplicates_are_proven_by_one_join_that_still_catches_a_differing_row(
        shop: Database, tmp_path: Path) -> None:
    """Where most rows are kept, the swap proves them all against the live table in one join
    instead of a probe each: the same proof, which still refuses a kept row that differs."""
    swapping = project_with_nulls("forbidden", tmp_path, "strategy: swap")
    project = ("--project-dir", str(swapping))
    with shop.connect() as conn:
        # 1,995 orders of one line, loaded once: 45 of 2,055 rows are duplicates.
        conn.execute("""insert into "Shop"."Order Lines"
                     select md5('once-' || o)::uuid, 'ORD-' || o, 1, timestamptz '2025-01-01',
                            'loaded once'
                     from generate_series(6, 2000) as o""")
    assert run_dbt_in(swapping, shop, "deps").success
    assert shop.runner("capture", *project).exit_code == 0
    assert run_dbt_in(swapping, shop, "build").success
    dry_run = shop.runner("swap", "--dry-run", *project)
    assert dry_run.exit_code == 0, dry_run.output
    proof = next(line for line in dry_run.output.splitlines()
                 if line.startswith("-- then must be true: "))
    assert ' left join "Shop"."Order Lines" as l on l."uid" = s."uid"' in proof
    with shop.connect() as conn:
        edited = conn.execute("""update dedup."Order Lines" set note = 'edited'
                              where "Order ID" = 'ORD-1500' returning uid""").fetchone()[0]
    refused = shop.runner("swap", *project)
    assert refused.exit_code == 4
    assert "(rows_differing_from_live=1)" in refused.output
    with shop.connect() as conn:
        conn.execute("""update dedup."Order Lines" set note = 'loaded once' where uid = %s""",
                     (edited,))
        expected = {row[0] for row in conn.execute(EXPECTED_KEPT)}
    swapped = shop.runner("swap", *project)
    assert swapped.exit_code == 0, swapped.output
    with shop.connect() as conn:
        live = {row[0] for row in conn.execute('select uid from "Shop"."Order Lines"')}
    assert len(live) == 2010 and live == expected


def project_with_nulls(policy: str, tmp_path: Path, more: str = "") -> Path:
    """A copy of the other project whose order lines declare another NULL policy, and `more`
    meta.dedup lines."""
    project = tmp_path / "project"
    shutil.copytree(OTHER_PROJECT, project, ignore=shutil.ignore_patterns("dbt_packages"))
    (project / "packages.yml").write_text(f"packages:\n  - local: {PROJECT_DIR}\n")
    sources = project / "models" / "staging" / "_shop__sources.yml"
    sources.write_text(sources.read_text().replace(
        "nulls: forbidden", f"nulls: {policy}" + "".join(f"\n              {line}"
                                                         for line in more.splitlines())))
    return project


def run_dbt_in(project: Path, database: Database, *args: str):
    with environment({**database.env, "DBT_TARGET_PATH": str(database.target_dir)}):
        return dbt.invoke(list(args), project, profiles_dir=PROJECT_DIR, quiet=True)


def test_backfill_on_a_key_column_that_cannot_hold_a_uuid_stops_the_build_naming_it(
        shop: Database, tmp_path: Path) -> None:
    project = project_with_nulls("backfill", tmp_path)
    assert run_dbt_in(project, shop, "deps").success
    result = run_dbt_in(project, shop, "build")
    assert not result.success
    messages = " ".join(str(r.message) for r in result.result.results if r.status == "error")
    assert ("nulls: backfill fills NULL keys with gen_random_uuid(), but natural key column "
            "line_no is integer, which cannot hold one; use nulls: distinct or forbidden"
            in messages)


def _three_alike_null_key_rows(shop: Database, tmp_path: Path) -> Path:
    """Three rows alike but for their uuid, with a NULL in the key; the project under nulls:
    distinct, its packages installed."""
    with shop.connect() as conn:
        conn.execute("""insert into "Shop"."Order Lines"
                     select gen_random_uuid(), 'ORD-1', null, now(), 'no line number'
                     from generate_series(1, 3)""")
    project = project_with_nulls("distinct", tmp_path)
    assert run_dbt_in(project, shop, "deps").success
    return project


def test_nulls_distinct_keeps_every_null_key_row_through_the_swap(shop: Database,
                                                                    tmp_path: Path) -> None:
    """Under nulls: distinct each row with a NULL in its key is a row of its own, as a plain
    UNIQUE constraint sees it: all are kept, however alike, and the constraint allows more."""
    project = _three_alike_null_key_rows(shop, tmp_path)
    assert run_dbt_in(project, shop, "parse").success
    captured = shop.runner("capture", "--project-dir", str(project))
    assert captured.exit_code == 0, captured.output
    assert run_dbt_in(project, shop, "build").success
    with shop.connect() as conn:
        # Written between the build and the swap: the replay keeps it as a row of its own.
        conn.execute("""insert into "Shop"."Order Lines"
                     values (gen_random_uuid(), 'ORD-1', null, now(), 'no line number')""")
    result = shop.runner("swap", "--project-dir", str(project))
    assert result.exit_code == 0, result.output
    with shop.connect() as conn:
        rows, null_rows = conn.execute(
            'select count(*), count(*) filter (where line_no is null) from "Shop"."Order Lines"'
        ).fetchone()
        constraint = conn.execute(
            "select pg_get_constraintdef(oid) from pg_constraint"
            " where conrelid = '\"Shop\".\"Order Lines\"'::regclass and contype = 'u'"
        ).fetchone()[0]
        conn.execute("""insert into "Shop"."Order Lines"
                     values (gen_random_uuid(), 'ORD-1', null, now(), 'one more')""")
    assert (rows, null_rows) == (15 + 4, 4)
    assert constraint == 'UNIQUE ("Order ID", line_no)'


# What each build's models hold, row for row, in schemas named after DEDUP_SCHEMA; the key
# groups without the snapshot only PostgreSQL's SQL records.
BUILT_ROWS = {
    "key groups": 'select "Order ID", line_no, dedup_null_row, dedup_kept, dedup_rows'
                  " from {schema}_work.int_order_lines_grouped_by_key",
    "kept rows": 'select * from {schema}."Order Lines"',
    "removed rows": "select * from {schema}.removed_order_lines",
    "audit": "select * from {schema}_audit.audit_order_lines",
}


def test_the_portable_sql_deduplicates_as_the_postgresql_sql_does(shop: Database,
                                                                  tmp_path: Path) -> None:
    """The package's default__ implementations, for adapters other than PostgreSQL, run here
    on PostgreSQL (integration_tests/macros/portable_sql.sql) and build what its postgres__
    ones build, NULL keys of their own (nulls: distinct) included."""
    package_sql = "\n".join(path.read_text() for path in (PROJECT_DIR / "macros").rglob("*.sql"))
    overrides = (OTHER_PROJECT / "macros" / "portable_sql.sql").read_text()
    pattern = r"\{% macro (postgres__\w+)\("
    assert set(re.findall(pattern, overrides)) == set(re.findall(pattern, package_sql))

    project = _three_alike_null_key_rows(shop, tmp_path)
    postgresql = run_dbt_in(project, shop, "build")
    assert postgresql.success
    portable_database = Database({**shop.env, "DEDUP_SCHEMA": "portable"}, tmp_path / "portable")
    portable = run_dbt_in(project, portable_database, "build",
                          "--vars", "{dedup_portable_sql: true}")
    assert portable.success

    compiled = {result.node.name: result.node.compiled_code
                for result in portable.result.results}
    assert "row_number() over" in compiled["int_order_lines_grouped_by_key"]
    assert "distinct on" not in compiled["int_order_lines_grouped_by_key"]
    assert "= any(array(" not in compiled["order_lines"]
    assert "select 1 from" in compiled["removed_order_lines"]
    assert "filter (where" not in compiled["audit_order_lines"]
    assert not any("pg_catalog" in code for name, code in compiled.items()
                   if name.startswith("dedup_tiebreaker_unique"))

    with shop.connect() as conn:
        for what, query in BUILT_ROWS.items():
            built = {schema: conn.execute(query.format(schema=schema)).fetchall()
                     for schema in ("dedup", "portable")}
            assert built["dedup"], what
            assert Counter(built["portable"]) == Counter(built["dedup"]), what
