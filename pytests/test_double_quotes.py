"""Names that hold a double quote, on a real server. A column may be named so: the dbt package
doubles the quote wherever it names one, and both strategies deduplicate such a table. A
database, schema or table may not: dbt itself writes their names undoubled, so the runner
refuses them, in one line, before it changes anything."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from conftest import Database, _create_database, said
from psycopg import sql

TABLE = """
create table public.{name} (
    "i""d" bigint generated always as identity primary key,
    "k""ey" text not null,
    "pay""load" text
);
-- 40 keys; the first 10 loaded three times, the rest once.
insert into public.{name} ("k""ey", "pay""load")
select 'key "' || k || '"', 'load ' || v
from generate_series(1, 40) as k, generate_series(1, 3) as v
where k <= 10 or v = 1
order by v, k;
"""


@pytest.fixture
def quoted(server, tmp_path, request):
    """A database of its own, named by the test: `request.param` may hold a double quote."""
    name = getattr(request, "param", "double_quotes")
    _create_database(server, name)
    yield Database({**server.environ(), "PGDATABASE": name}, tmp_path / "target")
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


def _project_with(database: Database, project: Path, strategies: dict[str, str]) -> None:
    """A project of one's own declaring each table, keyed by `k"ey`, the latest `i"d` kept."""
    assert database.runner("init", str(project)).exit_code == 0
    for table, strategy in strategies.items():
        with database.connect() as conn:
            conn.execute(TABLE.format(name=table))
        added = database.runner("add", f"public.{table}", "--key", 'k"ey', "--keep", 'i"d:desc',
                                "--strategy", strategy, "--project-dir", str(project))
        assert added.exit_code == 0, added.output


def test_columns_named_with_a_double_quote_are_deduplicated_by_either_strategy(
        quoted: Database, tmp_path: Path) -> None:
    project = tmp_path / "mine"
    _project_with(quoted, project, {"swapped": "swap", "in_place": "in_place"})
    for command in ("build", "swap", "verify"):
        result = quoted.runner(command, "--project-dir", str(project))
        assert result.exit_code == 0, result.output
    with quoted.connect() as conn:
        actions = dict(conn.execute("select live_table, action from dedup_archive.swap_log"))
        assert actions == {"swapped": "swap", "in_place": "in_place"}
        for table in actions:
            live = sql.Identifier("public", table)
            kept = conn.execute(sql.SQL(
                'select "k""ey", "i""d", "pay""load" from {} order by 1').format(live)).fetchall()
            assert len(kept) == 40
            # The latest load of each key: the first ten keys' third, the others' only one.
            assert all(payload == ("load 3" if int(key.split('"')[1]) <= 10 else "load 1")
                       for key, _, payload in kept), table
            archive = conn.execute(
                "select archive_table from dedup_archive.swap_log where live_table = %s",
                (table,)).fetchone()[0]
            archived = conn.execute(sql.SQL('select "i""d" from {}').format(
                sql.Identifier("dedup_archive", archive))).fetchall()
            # The swap keeps every original row there; in place, the removed ones alone.
            assert len(archived) == (60 if table == "swapped" else 20), table
            unique = conn.execute(
                "select count(*) from pg_constraint where contype = 'u'"
                " and conrelid = %s::regclass", (live.as_string(),)).fetchone()[0]
            assert unique == 1, table


def test_a_schema_or_table_named_with_a_double_quote_is_refused_by_add(
        quoted: Database, tmp_path: Path) -> None:
    project = tmp_path / "mine"
    assert quoted.runner("init", str(project)).exit_code == 0
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    for relation, what, name in (('odd"schema.lines', "schema", 'odd"schema'),
                                 ('public.odd"lines', "table", 'odd"lines')):
        refused = quoted.runner("add", relation, "--key", "k", "--keep", "id",
                                "--project-dir", str(project))
        assert refused.exit_code == 4
        (line,) = said(refused)
        assert line.endswith(f"dbt writes names between double quotes without doubling one "
                             f"inside, and the {what} {name!r} holds one: rename the {what}")
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before


@pytest.mark.parametrize("quoted", ['odd"database'], indirect=True)
def test_a_database_named_with_a_double_quote_is_refused_before_the_capture(
        quoted: Database, tmp_path: Path) -> None:
    project = tmp_path / "mine"
    _project_with(quoted, project, {"lines": "auto"})
    for command in ("build", "capture", "swap"):
        refused = quoted.runner(command, "--project-dir", str(project))
        assert refused.exit_code == 4, refused.output
        assert said(refused) == [
            "Error: source public.lines: dbt writes names between double quotes without "
            "doubling one inside, and the database 'odd\"database' holds one: rename the "
            "database"], command
    with quoted.connect() as conn:
        assert conn.execute("select count(*) from pg_trigger where not tgisinternal"
                            ).fetchone()[0] == 0
        assert conn.execute("select count(*) from pg_namespace where nspname not like 'pg_%'"
                            " and nspname not in ('public', 'information_schema')"
                            ).fetchone()[0] == 0
        assert conn.execute('select count(*) from public.lines').fetchone()[0] == 60
