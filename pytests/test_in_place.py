"""In place: a table with few duplicates loses only them, to an archive, and is never replaced;
the ETL writes on meanwhile, a run stopped anywhere is finished by the next, and a rollback
puts back exactly the rows it removed."""

from __future__ import annotations

from collections import Counter

import psycopg
import pytest
from conftest import Database
from test_other_project import EXPECTED_KEPT, run_other_dbt, shop  # noqa: F401

from runner.jobs import rollback, swap

PROJECT = ("--project-dir", str(__import__("test_other_project").OTHER_PROJECT))
LINES = '"Shop"."Order Lines"'
# 995 more orders of one line, loaded once: with the fixture's 60 rows of 15 keys, 45 of 1,055
# rows are duplicates (4.3%), which `auto` removes in place.
LOADED_ONCE = f"""insert into {LINES}
select md5('once-' || o)::uuid, 'ORD-' || o, 1, timestamptz '2025-01-01', 'loaded once'
from generate_series(6, 1000) as o"""


def _rows(conn: psycopg.Connection, table: str = LINES) -> Counter:
    return Counter(conn.execute(f"select row(t.*)::text from {table} as t").fetchall())


def _archive(conn: psycopg.Connection) -> str | None:
    row = conn.execute("select format('%I.%I', 'dedup_archive', archive_table)"
                       " from dedup_archive.swap_log order by swapped_at desc limit 1").fetchone()
    return row[0] if row else None


def _leftovers(conn: psycopg.Connection) -> list[str]:
    """What an in-place run makes for itself and must not leave behind."""
    return [name for (name,) in conn.execute(
        "select tgname::text from pg_trigger where tgname = 'dedup_in_place_guard'"
        " union all select proname::text from pg_proc where proname like '%guard'"
        " union all select relname::text from pg_class where relname like '%keys_to_visit'"
        "   or relname like '%removing' or relname like '%natural_key_lookup'"
        "   or relname like '%natural_key_new%'")]


@pytest.fixture
def few(shop: Database) -> Database:  # noqa: F811
    with shop.connect() as conn:
        conn.execute(LOADED_ONCE)
    assert run_other_dbt(shop, "parse").success
    assert shop.runner("capture", *PROJECT).exit_code == 0
    assert run_other_dbt(shop, "build").success
    return shop


def _options(database: Database) -> swap.SwapOptions:
    return swap.SwapOptions(target_dir=database.target_dir)


def _swap(database: Database, after_step=None) -> list:
    options = _options(database)
    with database.connect() as conn:
        plans = swap.make_plans(conn, options)
        swap.execute(conn, plans, options, after_step=after_step)
    return plans


def test_few_duplicates_leave_in_place_and_a_rollback_puts_back_exactly_those(
        few: Database) -> None:
    with few.connect() as conn:
        before = _rows(conn)
        expected = _rows(conn, f"(select * from {LINES} where uid in ({EXPECTED_KEPT}))")
        oid = conn.execute(f"select '{LINES}'::regclass::oid").fetchone()[0]
    planned = few.runner("swap", "--dry-run", *PROJECT)
    assert planned.exit_code == 0, planned.output
    assert ("-- Shop.Order Lines: in place, because 4.3% of its rows are duplicates, at most 25%"
            in planned.output)
    assert "create trigger" in planned.output and "create table" not in planned.output.replace(
        "create table if not exists", "")
    swapped = few.runner("swap", *PROJECT)
    assert swapped.exit_code == 0, swapped.output
    with few.connect() as conn:
        after, archive = _rows(conn), _archive(conn)
        removed = _rows(conn, archive)
        assert conn.execute(f"select '{LINES}'::regclass::oid").fetchone()[0] == oid
        assert conn.execute("select action, rows_before, rows_after from dedup_archive.swap_log"
                            ).fetchall() == [("in_place", 1055, 1010)]
        assert _leftovers(conn) == []
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"""insert into {LINES} values
                         (gen_random_uuid(), 'ORD-7', 1, now(), 'sent again')""")
    assert after == expected and sum(after.values()) == 1010
    assert after + removed == before
    verified = few.runner("verify", *PROJECT)
    assert verified.exit_code == 0, verified.output

    rolled = few.runner("rollback", *PROJECT)
    assert rolled.exit_code == 0, rolled.output
    with few.connect() as conn:
        assert _rows(conn) == before
        conn.execute(f"""insert into {LINES} values
                     (gen_random_uuid(), 'ORD-7', 1, now(), 'sent again')""")
