"""Materialized views that read a swapped table, on a real server: the swap creates them again
on the new table, filled from it, with their owner, grants, comment, options and indexes, and
the rollback creates them again on the original."""

from __future__ import annotations

import psycopg
from conftest import Database, said

from runner.demo import READER_ROLE

VIEWS = f"""
create materialized view breezeway.photos_per_task with (fillfactor = 90) as
    select task_pk, count(*) as photos from breezeway.task_photos group by task_pk;
create unique index photos_per_task_task on breezeway.photos_per_task (task_pk);
create index photos_per_task_photos on breezeway.photos_per_task (photos);
comment on materialized view breezeway.photos_per_task is 'photos per task, for the dashboard';
grant select on breezeway.photos_per_task to public;
alter materialized view breezeway.photos_per_task owner to {READER_ROLE};
create materialized view breezeway.photos_not_yet_counted as
    select count(*) as photos from breezeway.task_photos with no data;
"""
PER_TASK = "select task_pk, count(*) from breezeway.task_photos group by 1 order by 1"


def describe(conn: psycopg.Connection, name: str) -> tuple:
    """What makes the materialized view the one it is, but its rows."""
    return conn.execute(
        "select pg_get_viewdef(c.oid), c.reloptions, pg_get_userbyid(c.relowner),"
        " obj_description(c.oid, 'pg_class'), c.relispopulated, c.relacl::text[],"
        " array(select pg_get_indexdef(x.indexrelid) from pg_index as x"
        "       where x.indrelid = c.oid order by 1)"
        " from pg_class as c where c.oid = %s::regclass", (f"breezeway.{name}",)).fetchone()


def contents(conn: psycopg.Connection) -> list:
    return conn.execute("select task_pk, photos from breezeway.photos_per_task order by 1"
                        ).fetchall()


def test_the_swap_and_the_rollback_create_the_materialized_views_again_on_the_table_they_leave(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute(VIEWS)
        before = {name: describe(conn, name)
                  for name in ("photos_per_task", "photos_not_yet_counted")}
        counted_before = contents(conn)
        assert counted_before == conn.execute(PER_TASK).fetchall()
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        assert {name: describe(conn, name) for name in before} == before
        # Filled from the new table: one photo per key, no copy counted.
        counted_after = contents(conn)
        assert counted_after == conn.execute(PER_TASK).fetchall()
        assert sum(n for _, n in counted_after) < sum(n for _, n in counted_before)
        # Its unique index lets it be refreshed concurrently, as before.
        conn.execute("refresh materialized view concurrently breezeway.photos_per_task")
    result = fresh.runner("rollback", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        assert {name: describe(conn, name) for name in before} == before
        assert contents(conn) == counted_before


def test_a_view_that_reads_such_a_materialized_view_is_refused_before_anything_changes(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute(VIEWS)
        conn.execute("create view public.busy_tasks as"
                     " select task_pk from breezeway.photos_per_task where photos > 1")
        before = describe(conn, "photos_per_task")
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 4, result.output
    assert said(result) == [
        "Error: runner swap cannot yet carry breezeway.task_photos over: public.busy_tasks read "
        "materialized view breezeway.photos_per_task, which reads it; deduplicate it by hand or "
        "leave it out with --select"]
    with fresh.connect() as conn:
        assert describe(conn, "photos_per_task") == before
        assert conn.execute("select to_regclass('dedup_archive.swap_log')").fetchone()[0] is None


def test_a_reader_of_the_materialized_view_holds_the_swap_off_no_longer_than_the_lock_wait(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute(VIEWS)
        counted_before = contents(conn)
    with fresh.connect() as reader:
        reader.execute("begin")
        reader.execute("select count(*) from breezeway.photos_per_task")
        result = fresh.runner("swap", "--select", "task_photos", "--lock-wait", "1s")
        reader.execute("rollback")
    assert result.exit_code != 0, result.output
    # The reader is named, and what it runs.
    assert said(result)[-1].startswith(
        "Error: could not lock breezeway.task_photos, breezeway.tasks, "
        "breezeway.photos_not_yet_counted, breezeway.photos_per_task in ")
    assert "idle in transaction: select count(*) from breezeway.photos_per_task" in said(
        result)[-1]
    with fresh.connect() as conn:
        assert contents(conn) == counted_before
        assert conn.execute("select count(*) from breezeway.task_photos").fetchone()[0] > len(
            counted_before)
    assert fresh.runner("swap", "--select", "task_photos").exit_code == 0


def test_a_materialized_view_that_reads_the_table_through_a_view_is_refreshed(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("create view public.photos_seen as select task_pk from breezeway.task_photos;"
                     " create materialized view public.photos_seen_count as"
                     " select count(*) as photos from public.photos_seen")
        rows_before = conn.execute("select count(*) from breezeway.task_photos").fetchone()[0]
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    count = "select photos from public.photos_seen_count"
    with fresh.connect() as conn:
        rows_after = conn.execute("select count(*) from breezeway.task_photos").fetchone()[0]
        assert conn.execute(count).fetchone()[0] == rows_after < rows_before
    result = fresh.runner("rollback", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        assert conn.execute(count).fetchone()[0] == rows_before
