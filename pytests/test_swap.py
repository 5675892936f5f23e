"""runner swap against a real server: the result, what it keeps, and what it refuses."""

from __future__ import annotations

import csv
import io
import json

import psycopg
import pytest
from conftest import (
    TEST_SCALE,
    Database,
    Stopped,
    description,
    run_dbt,
    said,
    stop_at,
    task_photos_foreign_key_valid,
)
from psycopg import sql

from runner import demo
from runner.declaration.names import constraint_name, null_key_index_names, pg_name
from runner.errors import ConnectionLost, RunnerError
from runner.execution import locking
from runner.jobs import swap
from runner.server import swap_log

SWAPPED = [t.name for t in demo.CHILD_TABLES if t.name != "task_tags"]

def describe(conn: psycopg.Connection, table: str) -> dict:
    return description(conn, f"breezeway.{table}")


def schema_state(database: Database) -> list:
    with database.connect() as conn:
        return conn.execute(
            "select n.nspname, c.relname, c.relkind from pg_class as c"
            " join pg_namespace as n on n.oid = c.relnamespace"
            " where n.nspname in ('breezeway', 'dedup_archive') order by 1, 2"
        ).fetchall()


def test_swap_leaves_one_row_per_key_with_the_constraint_and_the_same_table(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        before = {table: describe(conn, table) for table in SWAPPED}
    result = fresh.runner("swap")
    assert result.exit_code == 0, result.output
    expected = demo.expected_counts(TEST_SCALE)
    with fresh.connect() as conn:
        for table in SWAPPED:
            after = describe(conn, table)
            name = constraint_name(table)
            # The only differences: the natural key's constraint, and its index; and where
            # the natural key has a NULL, the partial unique indexes of the alternative key.
            assert after["constraints"].pop(name).startswith("UNIQUE")
            assert name in after["indexes"].pop(name)
            partial = null_key_index_names(table) & set(after["indexes"])
            assert len(partial) == (2 if table == "reservation_guests" else 0), table
            for index in partial:
                assert " WHERE " in after["indexes"].pop(index), index
            assert after == before[table], table
            kept = [r[0] for r in conn.execute(f"select id from breezeway.{table}")]
            assert len(kept) == expected[table].unique
            assert set(kept) == demo.expected_kept_ids(table, TEST_SCALE)
            archived = conn.execute(
                "select archive_table, rows_before, rows_after from dedup_archive.swap_log"
                " where live_table = %s", (table,)
            ).fetchone()
            assert archived[1:] == (expected[table].total, expected[table].unique)
            archive_rows = conn.execute(
                f'select count(*) from dedup_archive."{archived[0]}"').fetchone()[0]
            assert archive_rows == expected[table].total
            # Analyzed before the lock: the planner knows the new table from the first query.
            analyzed = conn.execute(
                "select count(*) from pg_stats where schemaname = 'breezeway'"
                " and tablename = %s and attname = 'id'", (table,)).fetchone()[0]
            assert analyzed == 1, table
        # task_tags had no duplicates and its constraint all along: untouched.
        assert conn.execute("select count(*) from dedup_archive.swap_log"
                            " where live_table = 'task_tags'").fetchone()[0] == 0


def test_after_the_swap_the_etl_cannot_duplicate_again(fresh: Database) -> None:
    assert fresh.runner("swap").exit_code == 0
    with fresh.connect() as conn:
        # The ETL's own statement, replaying every row it already loaded: no target, no effect.
        replayed = conn.execute(
            "insert into breezeway.property_photos (property_pk, photo_id, url, thumbnail_url,"
            " caption, sort_order, exif) select property_pk, photo_id, url, thumbnail_url,"
            " caption, sort_order, exif from breezeway.property_photos on conflict do nothing"
        ).rowcount
        assert replayed == 0
        # The id sequence still numbers the table, after every id the original table used.
        new_id = conn.execute(
            "insert into breezeway.property_photos (property_pk, photo_id) values (1, 'new')"
            " returning id").fetchone()[0]
        assert new_id > demo.expected_counts(TEST_SCALE)["property_photos"].total
        # alternative_key: a re-sent guest without email conflicts; another is a new guest.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("insert into breezeway.reservation_guests (reservation_pk, guest_email,"
                         " guest_name) select reservation_pk, null, guest_name"
                         " from breezeway.reservation_guests where guest_email is null limit 1")
        assert conn.execute(
            "insert into breezeway.reservation_guests (reservation_pk, guest_email, guest_name)"
            " select reservation_pk, null, 'A new guest' from breezeway.reservation_guests"
            " where guest_email is null limit 1").rowcount == 1
        # nulls: backfill: the constraint is a plain UNIQUE, so an event the ETL still sends
        # without a request id is not refused (runner verify reports it as a NULL key).
        inserted = conn.execute(
            "insert into breezeway.business_events (request_id, event_type, ts)"
            " values (null, 'booking', now()), (null, 'booking', now())").rowcount
        assert inserted == 2


def test_a_second_swap_after_a_new_build_has_nothing_to_do(fresh: Database) -> None:
    assert fresh.runner("swap").exit_code == 0
    assert fresh.dbt("build").success
    result = fresh.runner("swap")
    assert result.exit_code == 0
    assert result.stdout.strip() == (
        "Nothing to do: every table is deduplicated and its natural key enforced."
    )


def test_dry_run_prints_every_statement_and_changes_nothing(fresh: Database) -> None:
    before = schema_state(fresh)
    result = fresh.runner("swap", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.count(" in access exclusive mode;") == 1
    assert result.output.count(" in share row exclusive mode;") == 1
    assert "alter table \"breezeway\".\"property_photos\" set schema \"dedup_archive\";" in (
        result.output)
    # Committed without waiting for the disk, then flushed by a commit of its own.
    assert result.output.count("set local synchronous_commit = off;") == 1
    # No JIT: it once compiled a statement under the lock for three quarters of it.
    assert result.output.count("set local jit = off;") == 1
    flushed = ("commit;\n-- wait for the commit to reach the disk: this transaction writes a "
               "message to the log, and its own commit, synchronous whatever the session's "
               "default, flushes the log up to it\nselect set_config('synchronous_commit', "
               "'on', true), pg_logical_emit_message(true, 'dedup_runner', 'flush');\n")
    # Then, after the commit, each foreign key of a new table checked on its own.
    validations = result.output[result.output.index(flushed) + len(flushed):].splitlines()
    assert validations[1::2] == [
        f'alter table "breezeway"."{table}" validate constraint "{table}_{column}_fkey";'
        for table, column in (("property_photos", "property_pk"),
                              ("reservation_guests", "reservation_pk"),
                              ("task_assignments", "task_pk"), ("task_photos", "task_pk"),
                              ("task_requirements", "task_pk"))]
    assert schema_state(fresh) == before


def test_select_swaps_only_the_named_tables(fresh: Database) -> None:
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        swapped = conn.execute("select live_table from dedup_archive.swap_log").fetchall()
    assert swapped == [("task_photos",)]


def _refused(database: Database, *args: str) -> str:
    before = schema_state(database)
    result = database.runner("swap", *args)
    assert result.exit_code == 4
    lines = said(result)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert schema_state(database) == before
    return lines[0]


def test_refuses_without_build_results(fresh: Database) -> None:
    (fresh.target_dir / "run_results.json").unlink()
    assert "run_results.json not found: run `dbt build` first" in _refused(fresh)


def test_refuses_when_a_test_failed_in_the_latest_build(fresh: Database) -> None:
    path = fresh.target_dir / "run_results.json"
    results = json.loads(path.read_text())
    for result in results["results"]:
        if result["unique_id"].startswith("test.dedup.dedup_reconciles_task_photos"):
            result["status"] = "fail"
    path.write_text(json.dumps(results))
    message = _refused(fresh)
    assert "dedup_reconciles_task_photos has status fail" in message
    assert "task_photos" in message


# The keep rule of the demo's tables, said independently of the replay: the row with the
# greatest id of each key, among every row the original table ended up with.
KEPT_FROM_ARCHIVE = """
select array_agg(a.id order by a.id) from dedup_archive.{archive} as a
where not exists (select from dedup_archive.{archive} as b
                  where b.property_pk = a.property_pk and b.photo_id is not distinct from
                  a.photo_id and b.id > a.id)
"""


def test_writes_after_the_build_are_replayed_under_the_keep_rule(fresh: Database) -> None:
    with fresh.connect() as conn:
        kept = [r[0] for r in conn.execute("select id from dedup.property_photos order by id")]
        conn.execute("insert into breezeway.property_photos (property_pk, photo_id, url)"
                     " values (1, 'new key', 'a photo nobody had')")
        conn.execute("insert into breezeway.property_photos (property_pk, photo_id, url)"
                     " select property_pk, photo_id, 'a newer copy of a kept row'"
                     " from breezeway.property_photos where id = %s", (kept[2],))
        conn.execute("delete from breezeway.property_photos where id = %s", (kept[0],))
        conn.execute("update breezeway.property_photos set caption = 'edited after the build'"
                     " where id = %s", (kept[1],))
        conn.execute("update breezeway.property_photos set caption = 'edited, not kept'"
                     " where id = (select min(id) from breezeway.property_photos)")
    result = fresh.runner("swap", "--select", "property_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        archive = conn.execute("select archive_table from dedup_archive.swap_log").fetchone()[0]
        expected = conn.execute(KEPT_FROM_ARCHIVE.format(archive=f'"{archive}"')).fetchone()[0]
        live = [r[0] for r in conn.execute("select id from breezeway.property_photos order by id")]
        assert live == expected
        assert conn.execute("select caption from breezeway.property_photos where id = %s",
                            (kept[1],)).fetchone()[0] == "edited after the build"
        assert conn.execute("select count(*) from breezeway.property_photos"
                            " where photo_id = 'new key'").fetchone()[0] == 1
        # The deleted kept row's key is kept by its next best copy, not lost.
        assert len(live) == len(kept) + 1


def test_refuses_without_change_capture(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("drop trigger dedup_capture on breezeway.task_photos")
    message = _refused(fresh)
    assert "breezeway.task_photos has no change capture: run `runner capture`" in message


def test_refuses_an_unknown_table_in_select(fresh: Database) -> None:
    assert "--select nope: no deduplicated table of that name" in _refused(
        fresh, "--select", "nope")


def test_gives_up_on_a_held_lock_and_names_the_holder(fresh: Database) -> None:
    with fresh.holding("lock table breezeway.task_photos in access share mode") as holder:
        message = _refused(fresh, "--lock-timeout", "200ms", "--lock-wait", "1s")
    assert "could not lock breezeway.business_events, breezeway.property_photos, " in message
    assert "tries of 200 ms over 1 s, nothing was changed" in message
    assert f"pid {holder}" in message


def test_when_the_etl_never_leaves_a_gap_it_says_what_would_help(fresh: Database) -> None:
    # The ETL writes between every two tries while a reader holds the table.
    def etl_writes(label: str) -> None:
        if label == "lock try timed out":
            with fresh.connect() as etl:
                etl.execute("insert into breezeway.task_photos (task_pk, photo_id, url)"
                            " values (1, 'again', 'from the ETL')")

    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"],
                               lock_timeout_ms=50, lock_wait_s=1)
    before = schema_state(fresh)
    with fresh.holding("lock table breezeway.task_photos in access share mode"), \
            fresh.connect() as conn, pytest.raises(RunnerError) as refused:
        swap.execute(conn, swap.make_plans(conn, options), options, after_step=etl_writes)
    message = str(refused.value)
    assert message.startswith("could not lock breezeway.task_photos, breezeway.tasks in ")
    assert "nothing was changed: the ETL kept writing (" in message
    assert message.endswith(": raise --lock-timeout, choose a quieter moment, or hold the "
                            "cut-over with --postpone-cut-over FILE until there is one")
    assert schema_state(fresh) == before


def _burst_before_the_lock(database: Database, rows: int = 1500):
    """A step hook: the ETL writes `rows` new rows at once just before the first lock try."""
    def step_done(label: str) -> None:
        if label == "catch-up before the lock":
            with database.connect() as etl:
                etl.execute("insert into breezeway.task_photos (task_pk, photo_id, url)"
                            " select 1, 'burst ' || n, 'from the ETL'"
                            " from generate_series(1, %s) as n", (rows,))
    return step_done


def test_a_burst_of_writes_before_the_lock_is_caught_up_outside_it(fresh: Database) -> None:
    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"],
                               lock_timeout_ms=50, lock_wait_s=30)
    with fresh.connect() as conn:
        result = swap.execute(conn, swap.make_plans(conn, options), options,
                              after_step=_burst_before_the_lock(fresh))
    # The first lock was given back rather than held while 1,500 writes were replayed.
    assert result.attempts == 2
    assert fresh.scalar("select count(*) from breezeway.task_photos"
                        " where photo_id like 'burst %'") == 1500


def test_an_etl_that_outpaces_the_catch_up_is_told_so(fresh: Database) -> None:
    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"],
                               lock_timeout_ms=50, lock_wait_s=0.001)
    before = schema_state(fresh)
    with fresh.connect() as conn, pytest.raises(RunnerError) as refused:
        swap.execute(conn, swap.make_plans(conn, options), options,
                     after_step=_burst_before_the_lock(fresh))
    assert str(refused.value).startswith("gave up after 1 tries over 0.001 s, nothing was "
                                         "changed: the ETL writes faster than the swap catches "
                                         "up outside the lock (1500 captured writes waited")
    assert schema_state(fresh) == before


LATEST_PHOTO = "select max(id) from breezeway.task_photos"


def _delete_before_every_lock_try(database: Database, deleted: list[int],
                                  table: str = "task_photos", latest: str = LATEST_PHOTO):
    """A step hook: the ETL deletes a kept row (by default of task_photos: the latest row of
    its key, which has older copies) just before each try of the lock."""
    def step_done(label: str) -> None:
        if label in ("catch-up before the lock", "caught up between tries"):
            with database.connect() as etl:
                deleted.append(etl.execute(sql.SQL("delete from {} where id = ({}) returning id")
                                           .format(sql.Identifier("breezeway", table),
                                                   sql.SQL(latest))).fetchone()[0])
    return step_done


def _lookup_indexes(database: Database) -> list[str]:
    return database.scalar("select coalesce(array_agg(relname), '{}') from pg_class"
                           " where relname like '%natural\\_key\\_lookup'")


def _kept_as_the_rule_says(database: Database, deleted: list[int]) -> None:
    """Every key keeps the latest of its rows there were at the swap."""
    with database.connect() as conn:
        kept = {row[0] for row in conn.execute("select id from breezeway.task_photos")}
        archive = swap_log.read(conn, swap_log.DEFAULT_ARCHIVE_SCHEMA)[-1].archive
        latest = {row[0] for row in conn.execute(sql.SQL(
            "select max(id) from {} where id <> all(%s) group by task_pk, photo_id").format(
                sql.Identifier(archive.schema, archive.name)), (deleted,))}
    assert kept == latest and not kept & set(deleted)


def test_an_etl_that_deletes_kept_rows_before_every_lock_try_does_not_stop_the_swap(
        fresh: Database) -> None:
    # The capture saw a delete before the swap: the swap builds an index on the key, by which
    # a delete of the last moments is replayed under the lock, and drops it there.
    deleted = [fresh.scalar("delete from breezeway.task_photos where id = (select max(id)"
                            " from breezeway.task_photos) returning id")]
    indexes_before = fresh.scalar("select count(*) from pg_index"
                                  " where indrelid = 'breezeway.task_photos'::regclass")
    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"],
                               lock_timeout_ms=50, lock_wait_s=5)
    with fresh.connect() as conn:
        result = swap.execute(conn, swap.make_plans(conn, options), options,
                              after_step=_delete_before_every_lock_try(fresh, deleted))
    assert result.attempts == 1 and len(deleted) == 2
    _kept_as_the_rule_says(fresh, deleted)
    assert _lookup_indexes(fresh) == []
    with fresh.connect() as conn:
        archive = swap_log.read(conn, swap_log.DEFAULT_ARCHIVE_SCHEMA)[-1].archive
        assert conn.execute("select count(*) from pg_index where indrelid = %s::regclass",
                            (f"{archive.schema}.{archive.name}",)).fetchone()[0] == indexes_before


def test_an_etl_that_begins_deleting_kept_rows_during_the_swap_is_caught_on_the_rerun(
        fresh: Database) -> None:
    deleted: list[int] = []
    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"],
                               lock_timeout_ms=50, lock_wait_s=1)
    before = schema_state(fresh)
    with fresh.connect() as conn, pytest.raises(RunnerError) as refused:
        swap.execute(conn, swap.make_plans(conn, options), options,
                     after_step=_delete_before_every_lock_try(fresh, deleted))
    assert str(refused.value).endswith(
        "nothing was changed: the ETL began deleting or re-keying kept rows during the swap, "
        "which without an index on the natural key are replayed only outside the lock; run "
        "`runner swap` again: having seen them, it first builds one without blocking writers")
    assert schema_state(fresh) == before
    with fresh.connect() as conn:
        result = swap.execute(conn, swap.make_plans(conn, options), options,
                              after_step=_delete_before_every_lock_try(fresh, deleted))
    assert result.attempts == 1
    _kept_as_the_rule_says(fresh, deleted)
    assert _lookup_indexes(fresh) == []


def test_deletes_of_kept_rows_whose_key_has_a_null_are_replayed_under_the_lock_too(
        fresh: Database) -> None:
    # A NULL email keys reservation_guests' rows by the alternative key, NULLs equal: IS NOT
    # DISTINCT FROM, which no index serves, would make each such delete under the lock a scan
    # of the table.
    guest_without_email = ("select max(id) from breezeway.reservation_guests"
                           " where guest_email is null")
    deleted = [fresh.scalar(f"delete from breezeway.reservation_guests"
                            f" where id = ({guest_without_email}) returning id")]
    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["reservation_guests"],
                               lock_timeout_ms=50, lock_wait_s=5)
    with fresh.connect() as conn:
        result = swap.execute(conn, swap.make_plans(conn, options), options,
                              after_step=_delete_before_every_lock_try(
                                  fresh, deleted, "reservation_guests", guest_without_email))
    assert result.attempts == 1 and len(deleted) == 2
    with fresh.connect() as conn:
        archive = swap_log.read(conn, swap_log.DEFAULT_ARCHIVE_SCHEMA)[-1].archive
        kept = conn.execute("select array_agg(id order by id) from breezeway.reservation_guests"
                            ).fetchone()[0]
        latest = conn.execute(sql.SQL(
            "select array_agg(id order by id) from (select max(id) as id from {}"
            " where id <> all(%s) group by reservation_pk, guest_email,"
            " case when guest_email is null then guest_name end) as k").format(
                sql.Identifier(archive.schema, archive.name)), (deleted,)).fetchone()[0]
    assert kept == latest
    assert _lookup_indexes(fresh) == []


def test_a_postponed_cut_over_catches_up_until_the_file_is_gone(fresh: Database,
                                                                tmp_path) -> None:
    flag = tmp_path / "postpone"
    flag.touch()
    postponed = []

    def operator(label: str) -> None:
        if label != "cut-over postponed":
            return
        postponed.append(label)
        if len(postponed) == 1:
            with fresh.connect() as etl:
                etl.execute("insert into breezeway.task_photos (task_pk, photo_id, url)"
                            " values (1, 'while postponed', 'from the ETL')")
        if len(postponed) == 2:
            flag.unlink()

    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"],
                               postpone=flag)
    with fresh.connect() as conn:
        swap.execute(conn, swap.make_plans(conn, options), options, after_step=operator)
        written = conn.execute("select count(*) from breezeway.task_photos"
                               " where photo_id = 'while postponed'").fetchone()[0]
    assert len(postponed) == 2
    assert written == 1


def test_an_open_transaction_on_a_parent_table_makes_it_give_up_not_block(
        fresh: Database) -> None:
    # Adding the new table's foreign key locks the parent against writers: that must wait no
    # longer than the lock timeout either, or the ETL would queue behind the runner.
    with fresh.holding("update breezeway.tasks set title = title where id = 1") as holder:
        message = _refused(fresh, "--select", "task_photos", "--lock-timeout", "100ms",
                           "--lock-wait", "1s")
    assert "could not lock breezeway.task_photos, breezeway.tasks in " in message
    assert "nothing was changed" in message
    assert f"pid {holder}" in message


def test_the_parent_table_takes_writes_until_the_cut_over(fresh: Database) -> None:
    # The foreign key is added under the cut-over's lock, not before it: while the swap builds
    # and proves the new table, a write to the parent that would wait at all fails here.
    written = []

    def write_to_the_parent(label: str) -> None:
        if label.startswith("replay before the lock of "):
            with fresh.connect() as etl:
                etl.execute("set lock_timeout = '1ms'")
                written.append(etl.execute("update breezeway.tasks set title = title"
                                           " where id = 1").rowcount)

    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"])
    with fresh.connect() as conn:
        result = swap.execute(conn, swap.make_plans(conn, options), options,
                              after_step=write_to_the_parent)
    assert written == [1]
    assert result.notes == []
    with fresh.connect() as conn:
        assert conn.execute("select conname, convalidated from pg_constraint"
                            " where conrelid = 'breezeway.task_photos'::regclass"
                            " and contype = 'f'").fetchall() == [("task_photos_task_pk_fkey",
                                                                   True)]


def test_a_run_stopped_before_the_foreign_keys_were_checked_is_finished_by_the_next(
        fresh: Database) -> None:
    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"])
    with fresh.connect() as conn, pytest.raises(Stopped):
        swap.execute(conn, swap.make_plans(conn, options), options,
                     after_step=stop_at("commit"))
    assert not task_photos_foreign_key_valid(fresh)
    assert "NOT VALID: task_photos_task_pk_fkey" in fresh.runner(
        "verify", "--select", "task_photos").output
    again = fresh.runner("swap", "--select", "task_photos")
    assert again.exit_code == 0, again.output
    assert "Nothing to do" in again.output
    assert task_photos_foreign_key_valid(fresh)


@pytest.mark.parametrize(("at", "committed", "says"), [
    ("lock", False, "nothing was changed, its transaction was rolled back; run `runner swap` "
                    "again"),
    ("commit", True, "after the swap committed (terminating connection due to administrator "
                     "command): it is done; run `runner swap` again for what follows the "
                     "commit"),
])
def test_a_lost_connection_is_reported_as_the_server_recorded_it(
        fresh: Database, at: str, committed: bool, says: str) -> None:
    def terminate_at(label: str) -> None:
        if label == at:
            with fresh.connect() as other:
                other.execute("select pg_terminate_backend(pid) from pg_stat_activity"
                              " where application_name = 'runner-under-test'")

    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"])
    with fresh.connect() as conn:
        conn.execute("set application_name = 'runner-under-test'")
        plans = swap.make_plans(conn, options)
        with pytest.raises(ConnectionLost) as lost:
            swap.execute(conn, plans, options, after_step=terminate_at)
    assert lost.value.committed is committed
    assert says in str(lost.value)
    with fresh.connect() as conn:
        assert len(swap_log.read(conn, swap_log.DEFAULT_ARCHIVE_SCHEMA)) == int(committed)
    again = fresh.runner("swap", "--select", "task_photos")
    assert again.exit_code == 0, again.output


def test_the_unique_index_waits_for_an_old_transaction_no_longer_than_lock_wait(
        fresh: Database) -> None:
    # CREATE INDEX CONCURRENTLY waits for every transaction with an older snapshot, even one
    # that never touched the table: bounded by --lock-wait, it gives up and drops its index.
    with fresh.connect() as conn:
        conn.execute("alter table breezeway.task_tags drop constraint task_tags_task_pk_tag_pk_key")
    with fresh.holding("set transaction isolation level repeatable read;"
                       " select count(*) from breezeway.tasks") as holder:
        message = _refused(fresh, "--select", "task_tags", "--lock-wait", "1s")
    assert ("the unique index of breezeway.task_tags could not be built within 1 s: CREATE "
            "INDEX CONCURRENTLY waits for every transaction older than it to end, and "
            f"pid {holder} ") in message
    assert "nothing was changed: retry when it ends, or raise --lock-wait" in message
    again = fresh.runner("swap", "--select", "task_tags", "--lock-wait", "1s")
    assert again.exit_code == 0, again.output
    with fresh.connect() as conn:
        assert conn.execute("select count(*) from pg_constraint where conname = %s",
                            (constraint_name("task_tags"),)).fetchone()[0] == 1


@pytest.mark.parametrize("after", ["int_task_photos_grouped_by_key", "task_photos"])
def test_the_build_and_the_swap_hold_while_the_etl_deletes_kept_rows(fresh: Database,
                                                                     after: str) -> None:
    # The ETL deletes a kept row once the key groups are built (before the kept rows are), or
    # once the kept rows are (before their tests run): the build's tests hold on what it read,
    # and the swap replays the delete.
    deleted = []

    def delete_a_kept_row(event) -> None:
        if (event.info.name == "NodeFinished" and not deleted
                and event.data.node_info.unique_id == f"model.dedup.{after}"):
            with fresh.connect() as etl:
                deleted.append(etl.execute(
                    "delete from breezeway.task_photos"
                    " where id = (select max(id) from breezeway.task_photos) returning id"
                ).fetchone()[0])

    build = run_dbt(["build", "--select", "source:breezeway.task_photos+"], fresh.env,
                    fresh.target_dir, callbacks=[delete_a_kept_row])
    assert deleted and build.success, build.exception
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        kept = {row[0] for row in conn.execute("select id from breezeway.task_photos")}
        archive = swap_log.read(conn, swap_log.DEFAULT_ARCHIVE_SCHEMA)[-1].archive
        # The keep rule on the rows there were at the swap: its key's next copy, if any.
        latest = {row[0] for row in conn.execute(sql.SQL(
            "select max(id) from {} group by task_pk, photo_id").format(
                sql.Identifier(archive.schema, archive.name)))}
    assert deleted[0] not in kept
    assert kept == latest
    assert len(kept) == len(demo.expected_kept_ids("task_photos", TEST_SCALE)) - (
        1 if deleted[0] in latest else 0)


def test_refuses_when_the_built_rows_differ_from_the_live_rows(fresh: Database) -> None:
    # Counts still reconcile, so only the checksum of the rows can tell.
    with fresh.connect() as conn:
        conn.execute("update dedup.property_photos set caption = 'edited'"
                     " where id = (select min(id) from dedup.property_photos)")
    message = _refused(fresh)
    assert "every kept row of breezeway.property_photos equals its live row" in message


def test_refuses_when_a_row_replayed_before_the_lock_differs_from_its_live_row(
        fresh: Database) -> None:
    # While the tables are checked one by one, the ETL inserts a photo, which is captured, and
    # someone changes it with the capture's trigger disabled for a moment. The catch-up replay
    # before the lock brings the insert in: only the check of the rows it touched can see that
    # the live row moved on.
    tampered = []

    def write_while_checking(label: str) -> None:
        if not label.startswith("replay before the lock of ") or tampered:
            return
        with fresh.connect() as etl:
            tampered.append(etl.execute(
                "insert into breezeway.property_photos (property_pk, photo_id, url)"
                " values (1, 'new while checking', 'from the ETL') returning id").fetchone()[0])
        with fresh.connect() as bypass, bypass.transaction():
            bypass.execute("alter table breezeway.property_photos disable trigger dedup_capture")
            bypass.execute("update breezeway.property_photos set url = 'uncaptured'"
                           " where id = %s", tampered)
            bypass.execute("alter table breezeway.property_photos"
                           " enable always trigger dedup_capture")

    before = schema_state(fresh)
    options = swap.SwapOptions(target_dir=fresh.target_dir)
    with fresh.connect() as conn, pytest.raises(RunnerError) as refused:
        conn.execute("set search_path = pg_catalog")
        swap.execute(conn, swap.make_plans(conn, options), options,
                     after_step=write_while_checking)
    assert tampered
    assert str(refused.value) == (
        "check failed, nothing was changed: every row the replay touched in "
        "breezeway.property_photos equals its live row, unless a captured write waits to "
        "explain it (rows_differing_from_live=1)")
    assert schema_state(fresh) == before


EVERYTHING_AROUND_A_TABLE = """
create function breezeway.touch() returns trigger language plpgsql as
    $$ begin new.last_sync_time := now(); return new; end $$;
create trigger touch_task_photos before update on breezeway.task_photos
    for each row execute function breezeway.touch();
create trigger quiet_task_photos before insert on breezeway.task_photos
    for each row execute function breezeway.touch();
alter table breezeway.task_photos disable trigger quiet_task_photos;
alter table breezeway.task_photos enable row level security;
alter table breezeway.task_photos force row level security;
create policy readers_read on breezeway.task_photos for select to breezeway_reader
    using (task_pk > 0);
grant update (url) on breezeway.task_photos to breezeway_reader;
create publication task_photos_out for table breezeway.task_photos;
alter table breezeway.task_photos replica identity using index task_photos_pkey;
alter table breezeway.task_photos alter column id drop default;
drop sequence breezeway.task_photos_id_seq;
alter table breezeway.task_photos alter column id
    add generated always as identity (start with 1000000 increment by 3);
select setval(pg_get_serial_sequence('breezeway.task_photos', 'id'), 2000000);
"""


def test_triggers_policies_identity_grants_publications_survive_the_swap(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute(EVERYTHING_AROUND_A_TABLE)
        before = describe(conn, "task_photos")
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        after = describe(conn, "task_photos")
        name = constraint_name("task_photos")
        after["constraints"].pop(name)
        after["indexes"].pop(name)
        assert after == before
        # The identity goes on from where the original's was, with its own increment.
        new_id = conn.execute("insert into breezeway.task_photos (task_pk, photo_id)"
                              " values (1, 'after the swap') returning id").fetchone()[0]
        assert new_id == 2000003


def test_refuses_a_build_older_than_the_live_tables_structure(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("alter table breezeway.task_photos add column taken_at timestamptz")
    message = _refused(fresh)
    assert "the live table changed since the build; run `dbt build`" in message


def test_a_second_runner_is_stopped_by_the_advisory_lock(fresh: Database) -> None:
    with fresh.connect() as other:
        other.execute("select pg_advisory_lock(%s)", (locking.ADVISORY_LOCK_KEY,))
        message = _refused(fresh)
    assert ("another runner command (capture, swap, rollback or cleanup) is changing this "
            "database") in message


def test_plan_says_what_it_locks_and_for_how_long(fresh: Database) -> None:
    before = schema_state(fresh)
    result = fresh.runner("plan", "--select", "task_photos", "--lock-timeout", "80ms")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "-- swap: 1 table(s) replaced, 0 deduplicated in place, 0 only constrained"
    assert lines[1].startswith("-- locks ACCESS EXCLUSIVE on breezeway.task_photos at once;"
                               " each try waits at most 80 ms")
    assert "none of which reads a whole table" in lines[2]
    assert lines[3].startswith("-- with it, SHARE ROW EXCLUSIVE on breezeway.tasks, which "
                               "holds their writers (not their readers) for the same moments")
    assert schema_state(fresh) == before


def test_json_reports_each_table_and_the_lock(fresh: Database) -> None:
    result = fresh.runner("swap", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = demo.expected_counts(TEST_SCALE)
    tables = {t["table"]: t for t in report["tables"]}
    photos = tables["breezeway.property_photos"]
    assert (photos["rows_before"], photos["rows_after"], photos["removed"]) == (
        expected["property_photos"].total, expected["property_photos"].unique,
        expected["property_photos"].duplicates)
    assert photos["archive"].startswith("dedup_archive.property_photos__")
    assert photos["bytes_after"] < photos["bytes_before"]
    assert tables["breezeway.task_tags"]["action"] == "nothing"
    assert 0 < report["lock_ms"] < 5000 and report["lock_attempts"] == 1


def test_csv_reports_a_row_per_table(fresh: Database) -> None:
    result = fresh.runner("swap", "--select", "task_photos", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = demo.expected_counts(TEST_SCALE)["task_photos"]
    assert [(r["table"], r["action"], int(r["rows_before"]), int(r["rows_after"]))
            for r in rows] == [("breezeway.task_photos", "swap", expected.total,
                                expected.unique)]


@pytest.mark.parametrize("table", ["property_photos", "ü" * 40, "a" * 63])
def test_names_the_runner_gives_fit_postgres_and_stay_apart(table: str) -> None:
    names = {constraint_name(table), pg_name(table, "dedup_new"), pg_name(table, "changes")}
    assert len(names) == 3
    assert all(len(name.encode()) <= 63 for name in names)
    assert constraint_name(table) == constraint_name(table)


def test_the_rows_reported_are_those_at_commit(fresh: Database) -> None:
    """The ETL writes between the build and the swap: new keys, copies, deletes. What the
    summary and swap_log say was there before and after is what the archive and the live
    table hold at commit, not what the build saw."""
    with fresh.connect() as conn:
        conn.execute("insert into breezeway.property_photos (property_pk, photo_id, url)"
                     " select 1, 'new ' || g, 'u' from generate_series(1, 5) as g")
        conn.execute("insert into breezeway.property_photos (property_pk, photo_id, url)"
                     " select property_pk, photo_id, url from breezeway.property_photos"
                     " order by id limit 3")
        conn.execute("delete from breezeway.property_photos"
                     " where id in (select id from breezeway.property_photos order by id limit 2)")
    result = fresh.runner("swap", "--select", "property_photos", "--format", "json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)["tables"][0]
    with fresh.connect() as conn:
        archive, rows_before, rows_after = conn.execute(
            "select archive_table, rows_before, rows_after from dedup_archive.swap_log"
            ).fetchone()
        archived = conn.execute(psycopg.sql.SQL("select count(*) from {}").format(
            psycopg.sql.Identifier("dedup_archive", archive))).fetchone()[0]
        live = conn.execute("select count(*) from breezeway.property_photos").fetchone()[0]
    built = demo.expected_counts(TEST_SCALE)["property_photos"]
    assert (rows_before, rows_after) == (archived, live)
    assert rows_before == built.total + 5 + 3 - 2
    assert (reported["rows_before"], reported["rows_after"], reported["removed"]) == (
        archived, live, archived - live)
