"""runner rollback and runner cleanup against a real server: what comes back, what is kept,
what is refused."""

from __future__ import annotations

import collections
import re

import psycopg
import pytest
from conftest import TEST_SCALE, Database, Stopped, said, stop_at, task_photos_foreign_key_valid
from psycopg import sql
from test_other_project import EXPECTED_KEPT, OTHER_PROJECT, run_other_dbt
from test_other_project import shop as shop  # imported, its fixture is this module's too
from test_swap import SWAPPED, describe, schema_state

from runner import demo
from runner.declaration.names import constraint_name
from runner.errors import RunnerError
from runner.execution import locking
from runner.jobs import rollback

CONTENT = "select count(*), md5(string_agg(t::text, ',' order by t::text)) from {} as t"


def content(conn: psycopg.Connection, table: str, schema: str = "breezeway") -> tuple:
    """Every row, duplicates included, as a count and a checksum of the sorted rows."""
    return conn.execute(sql.SQL(CONTENT).format(sql.Identifier(schema, table))).fetchone()


def rows_by_id(conn: psycopg.Connection, table: str) -> dict[int, str]:
    return dict(conn.execute(sql.SQL("select id, md5(t::text) from {} as t").format(
        sql.Identifier("breezeway", table))).fetchall())


def swap_log(database: Database) -> list:
    with database.connect() as conn:
        return conn.execute("select to_jsonb(l) from dedup_archive.swap_log as l"
                            " order by swapped_at, live_table").fetchall()


def swapped(database: Database, *args: str) -> None:
    result = database.runner("swap", *args)
    assert result.exit_code == 0, result.output


def rolled_back(database: Database, *args: str) -> str:
    result = database.runner("rollback", *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def refused(database: Database, *args: str) -> str:
    """A one-line error, exit 1, and the schemas and swap log as they were."""
    before = schema_state(database), _log_if_any(database)
    result = database.runner(*args)
    assert result.exit_code == 4, result.output
    lines = said(result)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert (schema_state(database), _log_if_any(database)) == before
    return lines[0]


def _log_if_any(database: Database) -> list:
    with database.connect() as conn:
        if conn.execute("select to_regclass('dedup_archive.swap_log')").fetchone()[0] is None:
            return []
    return swap_log(database)


def test_rollback_restores_every_original_row_and_the_writes_since_the_swap(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        before = {table: content(conn, table) for table in SWAPPED}
        expected = rows_by_id(conn, "property_photos")
    swapped(fresh)
    with fresh.connect() as conn:
        kept = [r[0] for r in conn.execute("select id from breezeway.property_photos order by id")]
        new_id = conn.execute(
            "insert into breezeway.property_photos (property_pk, photo_id, url)"
            " values (1, 'after the swap', 'a new photo') returning id").fetchone()[0]
        conn.execute("update breezeway.property_photos set caption = 'edited after the swap'"
                     " where id = %s", (kept[1],))
        conn.execute("delete from breezeway.property_photos where id = %s", (kept[0],))
        written = rows_by_id(conn, "property_photos")
    del expected[kept[0]]
    expected[kept[1]] = written[kept[1]]
    expected[new_id] = written[new_id]

    output = rolled_back(fresh)
    assert (f"breezeway.property_photos: the original table is live again, {len(expected):,} "
            "rows, with the writes made since the swap (1 inserted, 1 updated, 1 deleted "
            "rows)") in output
    assert re.search(r"Live tables locked for \d+ ms", output), output
    with fresh.connect() as conn:
        assert rows_by_id(conn, "property_photos") == expected
        for table in SWAPPED:
            if table != "property_photos":
                assert content(conn, table) == before[table], table
        # The deduplicated table is kept, nothing dropped: as it was, with the later writes.
        copy = conn.execute("select rolled_back_table from dedup_archive.swap_log"
                            " where live_table = 'property_photos'").fetchone()[0]
        assert copy.startswith("property_photos__") and copy.endswith("__rolled_back")
        assert content(conn, copy, "dedup_archive")[0] == len(kept)
        # The view reads the original again.
        photos = conn.execute("select sum(photos) from breezeway.property_photo_counts")
        assert photos.fetchone()[0] == len(expected)


def test_after_rollback_the_catalog_is_as_before_the_swap(fresh: Database) -> None:
    with fresh.connect() as conn:
        before = {table: describe(conn, table) for table in SWAPPED}
    swapped(fresh)
    rolled_back(fresh)
    with fresh.connect() as conn:
        for table in SWAPPED:
            after = describe(conn, table)
            assert constraint_name(table) not in after["constraints"]
            assert after == before[table], table
        # Every table the swap kept in the archive is still there: the originals went back,
        # the deduplicated tables stay.
        archived = {name for (name,) in conn.execute(
            "select relname from pg_class where relnamespace = 'dedup_archive'::regnamespace"
            " and relkind = 'r'")}
        for table in SWAPPED:
            assert sum(name.startswith(f"{table}__") and name.endswith("__rolled_back")
                       for name in archived) == 1
        # The next id goes on after the writes made while the deduplicated table was live.
        new_id = conn.execute("insert into breezeway.task_photos (task_pk) values (1)"
                              " returning id").fetchone()[0]
        assert new_id > demo.expected_counts(TEST_SCALE)["task_photos"].total
    for entry in swap_log(fresh):
        assert entry[0]["rolled_back_at"] is not None


def test_a_new_swap_after_a_rollback_and_a_rollback_of_it(fresh: Database) -> None:
    with fresh.connect() as conn:
        before = {table: content(conn, table) for table in SWAPPED}
    swapped(fresh)
    rolled_back(fresh)
    # The rollback ended the deduplicated tables' role, not the job: start it again.
    captured = fresh.runner("capture")
    assert captured.exit_code == 0, captured.output
    assert fresh.dbt("build").success
    swapped(fresh)
    expected = demo.expected_counts(TEST_SCALE)
    with fresh.connect() as conn:
        for table in SWAPPED:
            assert content(conn, table)[0] == expected[table].unique, table
    log = [entry for (entry,) in swap_log(fresh)]
    assert len(log) == 2 * len(SWAPPED)
    assert [e["rolled_back_at"] is None for e in log] == (
        [False] * len(SWAPPED) + [True] * len(SWAPPED))
    rolled_back(fresh)
    with fresh.connect() as conn:
        for table in SWAPPED:
            assert content(conn, table) == before[table], table


def test_the_capture_since_the_swap_ends_with_the_rollback(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    captured = fresh.runner("capture", "--select", "task_photos")
    assert captured.exit_code == 0, captured.output
    assert ("breezeway.task_photos: captured since its swap, for a rollback; nothing to "
            "start.") in captured.output
    rolled_back(fresh)
    with fresh.connect() as conn:
        assert conn.execute("select count(*) from pg_trigger where tgname like 'dedup_capture%'"
                            " and tgrelid::regclass::text like '%task_photos%'").fetchone()[0] == 0
        assert conn.execute("select count(*) from dedup_archive.captures"
                            " where live_table = 'task_photos'").fetchone()[0] == 0
        assert conn.execute("select count(*) from pg_class where relname like"
                            " 'task_photos__%__changes'").fetchone()[0] == 0
    # The original is live again, and a new swap starts with a capture of its own.
    assert "Capturing writes to breezeway.task_photos" in fresh.runner(
        "capture", "--select", "task_photos").output


def test_rollback_of_a_swap_that_only_added_the_constraint(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("alter table breezeway.task_tags drop constraint task_tags_task_pk_tag_pk_key")
        before = describe(conn, "task_tags")
    swapped(fresh, "--select", "task_tags")
    with fresh.connect() as conn:
        assert constraint_name("task_tags") in describe(conn, "task_tags")["constraints"]
    output = rolled_back(fresh)
    assert "breezeway.task_tags: dropped the constraint task_tags__natural_key." in output
    with fresh.connect() as conn:
        assert describe(conn, "task_tags") == before


def test_rollback_on_quoted_names_a_uuid_tiebreaker_and_an_identity_column(
        shop: Database) -> None:
    identity = """select pg_get_serial_sequence('"Shop"."Order Lines"', 'n')"""
    with shop.connect() as conn:
        conn.execute('alter table "Shop"."Order Lines"'
                     " add column n bigint generated always as identity")
        before = content(conn, "Order Lines", "Shop")
        sequence = conn.execute(identity).fetchone()[0]
    assert run_other_dbt(shop, "parse").success
    assert shop.runner("capture", "--project-dir", str(OTHER_PROJECT)).exit_code == 0
    assert run_other_dbt(shop, "build").success
    swapped(shop, "--project-dir", str(OTHER_PROJECT))
    with shop.connect() as conn:
        assert content(conn, "Order Lines", "Shop")[0] == len(
            conn.execute(EXPECTED_KEPT).fetchall())
        conn.execute("""update "Shop"."Order Lines" set note = 'edited' where line_no = 1""")
        inserted = conn.execute(
            """insert into "Shop"."Order Lines" (uid, "Order ID", line_no, updated_at)"""
            " values (gen_random_uuid(), 'ORD-6', 1, now()) returning n").fetchone()[0]
    rolled_back(shop, "--select", "Shop.Order Lines")
    with shop.connect() as conn:
        after = content(conn, "Order Lines", "Shop")
        edited = conn.execute("""select count(*) from "Shop"."Order Lines"
                              where note = 'edited'""").fetchone()[0]
        assert conn.execute(identity).fetchone()[0] == sequence
        # The identity goes on after the row inserted while the deduplicated table was live.
        assert conn.execute(
            """insert into "Shop"."Order Lines" (uid, "Order ID", line_no, updated_at)"""
            " values (gen_random_uuid(), 'ORD-7', 1, now()) returning n").fetchone()[0] == (
                inserted + 1)
    assert after[0] == before[0] + 1
    assert edited == 5


def test_the_original_keeps_its_triggers_which_do_not_fire_again(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("create function breezeway.touch() returns trigger language plpgsql as"
                     " $$ begin new.caption := new.caption || ' (touched)'; return new; end $$")
        conn.execute("create trigger touch before update on breezeway.property_photos"
                     " for each row execute function breezeway.touch()")
        conn.execute("create publication dedup_rollback for table breezeway.task_photos")
    swapped(fresh)
    with fresh.connect() as conn:
        kept = conn.execute("select max(id) from breezeway.property_photos").fetchone()[0]
        conn.execute("update breezeway.property_photos set url = 'moved' where id = %s", (kept,))
    rolled_back(fresh)
    with fresh.connect() as conn:
        # Fired once, by the ETL's update on the deduplicated table; not again by the rollback.
        caption = conn.execute("select caption from breezeway.property_photos where id = %s",
                               (kept,)).fetchone()[0]
        assert caption.endswith(" (touched)") and caption.count("(touched)") == 1
        assert conn.execute("select tgenabled from pg_trigger where tgname = 'touch'"
                            " and tgrelid = 'breezeway.property_photos'::regclass"
                            ).fetchone()[0] == "O"
        assert conn.execute("select array_agg(prrelid::regclass::text) from pg_publication_rel"
                            ).fetchone()[0] == ["breezeway.task_photos"]


def test_refuses_when_there_is_nothing_to_roll_back(fresh: Database) -> None:
    message = refused(fresh, "rollback")
    assert "nothing to roll back: dedup_archive.swap_log records no swap" in message
    swapped(fresh, "--select", "task_photos")
    message = refused(fresh, "rollback", "--select", "property_photos")
    assert "--select property_photos: dedup_archive.swap_log records no swap of that table" in (
        message)
    rolled_back(fresh)
    message = refused(fresh, "rollback")
    assert "nothing to roll back: every swap in dedup_archive.swap_log was rolled back" in message
    message = refused(fresh, "rollback", "--select", "task_photos")
    assert "nothing to roll back for breezeway.task_photos: its latest swap" in message


def test_refuses_when_the_archive_was_dropped_by_hand(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    archive = swap_log(fresh)[0][0]["archive_table"]
    with fresh.connect() as conn:
        conn.execute(sql.SQL("drop table {}").format(sql.Identifier("dedup_archive", archive)))
    message = refused(fresh, "rollback")
    assert (f"cannot roll back breezeway.task_photos: its archive dedup_archive.{archive} is "
            "missing") in message


def test_refuses_when_the_capture_since_the_swap_was_stopped(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    archive = swap_log(fresh)[0][0]["archive_table"]
    stopped = fresh.runner("capture", "--stop", "--select", "task_photos")
    assert stopped.exit_code == 0, stopped.output
    assert "Its swap can no longer be rolled back" in stopped.output
    message = refused(fresh, "rollback")
    assert message == (
        f"Error: cannot roll back breezeway.task_photos: nothing was changed; the original rows "
        f"stay in dedup_archive.{archive}, but the writes made since the swap are no longer "
        "captured (its capture was stopped), so a rollback would lose them: restore them by "
        "hand, or leave the table out with --select")


def test_refuses_when_the_capture_since_the_swap_was_disabled(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    with fresh.connect() as conn:
        conn.execute("alter table breezeway.task_photos disable trigger dedup_capture")
    message = refused(fresh, "rollback")
    assert "the capture of the writes since the swap is broken (its trigger was disabled)" in (
        message)


def test_refuses_while_another_runner_works(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    with fresh.connect() as other:
        other.execute("select pg_advisory_lock(%s)", (locking.ADVISORY_LOCK_KEY,))
        message = refused(fresh, "rollback")
    assert ("another runner command (capture, swap, rollback or cleanup) is changing this "
            "database") in message


def test_gives_up_on_a_held_lock_and_names_the_holder(fresh: Database) -> None:
    swapped(fresh)
    with fresh.holding("lock table breezeway.task_photos in access share mode") as holder:
        message = refused(fresh, "rollback", "--lock-timeout", "200ms", "--lock-wait", "1s")
    assert "tries of 200 ms over 1 s, nothing was changed" in message
    assert f"pid {holder}" in message


def test_when_the_etl_never_leaves_a_gap_it_says_what_would_help(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")

    def etl_writes(label: str) -> None:
        if label == "lock try timed out":
            with fresh.connect() as etl:
                etl.execute("insert into breezeway.task_photos (task_pk, photo_id, url)"
                            " values (1, 'new again', 'from the ETL') on conflict do nothing")
                etl.execute("update breezeway.task_photos set url = 'edited'"
                            " where photo_id = 'new again'")

    options = rollback.RollbackOptions(select=["task_photos"], lock_timeout_ms=50,
                                       lock_wait_s=1)
    before = schema_state(fresh)
    with fresh.holding("lock table breezeway.task_photos in access share mode"), \
            fresh.connect() as conn, pytest.raises(RunnerError) as refused_:
        rollback.execute(conn, rollback.make_plans(conn, options), options,
                         after_step=etl_writes)
    message = str(refused_.value)
    assert "nothing was changed: the ETL kept writing (" in message
    assert " captured writes came meanwhile, " in message
    assert message.endswith(": raise --lock-timeout, choose a quieter moment, or hold the "
                            "cut-over with --postpone-cut-over FILE until there is one")
    assert schema_state(fresh) == before


def test_a_burst_of_writes_before_the_lock_is_carried_over_outside_it(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")

    def burst(label: str) -> None:
        if label == "catch-up before the lock":
            with fresh.connect() as etl:
                etl.execute("insert into breezeway.task_photos (task_pk, photo_id, url)"
                            " select 1, 'burst ' || n, 'from the ETL'"
                            " from generate_series(1, 1500) as n")

    options = rollback.RollbackOptions(select=["task_photos"], lock_timeout_ms=50,
                                       lock_wait_s=30)
    with fresh.connect() as conn:
        result = rollback.execute(conn, rollback.make_plans(conn, options), options,
                                  after_step=burst)
    # The first lock was given back rather than held while 1,500 writes were carried over.
    assert result.attempts == 2
    assert fresh.scalar("select count(*) from breezeway.task_photos"
                        " where photo_id like 'burst %'") == 1500


def test_dry_run_prints_every_statement_and_changes_nothing(fresh: Database) -> None:
    swapped(fresh)
    before = schema_state(fresh), swap_log(fresh)
    result = fresh.runner("rollback", "--dry-run")
    assert result.exit_code == 0, result.output
    # The originals first, which nobody else uses; then the live tables with them, at once.
    assert result.output.count("lock table ") == 2
    assert ('alter table "breezeway"."property_photos" rename to '
            '"property_photos__') in result.output
    # The foreign keys the originals get back are validated after the commit, in the open.
    after_commit = result.output.split("\ncommit;\n")[1]
    assert after_commit.count(" validate constraint ") == len(SWAPPED) - 1, after_commit
    assert (schema_state(fresh), swap_log(fresh)) == before


BYTES_FREED = re.compile(r"Freed .+ \(([\d,]+) bytes\) in total")


def test_cleanup_drops_what_the_swap_kept_and_rollback_then_refuses(fresh: Database) -> None:
    swapped(fresh)
    log = [entry for (entry,) in swap_log(fresh)]
    result = fresh.runner("cleanup", "--older-than", "0s")
    assert result.exit_code == 0, result.output
    freed = BYTES_FREED.search(result.output)
    assert freed and int(freed.group(1).replace(",", "")) > 0, result.output
    with fresh.connect() as conn:
        for entry in log:
            assert entry["archive_table"] in result.output
            assert conn.execute("select to_regclass(format('dedup_archive.%%I', %s::text))",
                                (entry["archive_table"],)).fetchone()[0] is None
    assert all(entry[0]["cleaned_at"] is not None for entry in swap_log(fresh))
    message = refused(fresh, "rollback")
    assert "runner cleanup dropped its archive" in message
    again = fresh.runner("cleanup", "--older-than", "0s")
    assert again.stdout.startswith("Nothing to clean up"), again.output


def test_cleanup_after_a_rollback_keeps_the_restored_tables(fresh: Database) -> None:
    with fresh.connect() as conn:
        before = {table: content(conn, table) for table in SWAPPED}
    swapped(fresh)
    rolled_back(fresh)
    result = fresh.runner("cleanup", "--older-than", "0s")
    assert result.exit_code == 0, result.output
    assert "__rolled_back" in result.output
    with fresh.connect() as conn:
        assert conn.execute("select count(*) from pg_class where relkind = 'r'"
                            " and relnamespace = 'dedup_archive'::regnamespace"
                            " and relname ~ '__rolled_back$'").fetchone()[0] == 0
        for table in SWAPPED:
            assert content(conn, table) == before[table], table


def test_cleanup_stops_at_a_view_on_an_archive(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    archive = swap_log(fresh)[0][0]["archive_table"]
    with fresh.connect() as conn:
        conn.execute(sql.SQL("create view public.audit as select * from {}").format(
            sql.Identifier("dedup_archive", archive)))
    message = refused(fresh, "cleanup", "--older-than", "0s")
    assert "nothing was dropped: cannot drop table" in message
    assert "view public.audit depends on table" in message


def test_cleanup_within_the_retention_drops_nothing(fresh: Database) -> None:
    swapped(fresh)
    before = schema_state(fresh), swap_log(fresh)
    for args in (("--older-than", "7d"), ("--older-than", "0s", "--dry-run")):
        result = fresh.runner("cleanup", *args)
        assert result.exit_code == 0, result.output
        assert (schema_state(fresh), swap_log(fresh)) == before
    assert fresh.runner("cleanup", "--older-than", "7d").stdout.startswith(
        "Nothing to clean up: no swap older than 7d")


def rows_as_text(conn: psycopg.Connection, table: str) -> collections.Counter:
    """Every row of the live table, duplicates included, as a multiset of its text."""
    return collections.Counter(r[0] for r in conn.execute(sql.SQL(
        "select t::text from {} as t").format(sql.Identifier("breezeway", table))))


AFTER_THE_SWAP = {
    "nothing": [],
    "insert": ["insert into breezeway.property_photos (property_pk, photo_id, url)"
               " values (1, 'new after the swap', 'u')"],
    "update": ["update breezeway.property_photos set caption = 'edited'"
               " where id = (select min(id) from breezeway.property_photos)"],
    "delete": ["delete from breezeway.property_photos"
               " where id = (select max(id) from breezeway.property_photos)"],
    "re-key": ["update breezeway.property_photos set photo_id = 'moved'"
               " where id = (select min(id) from breezeway.property_photos)"],
    "re-send": ["insert into breezeway.property_photos (property_pk, photo_id, url)"
                " select property_pk, photo_id, url from breezeway.property_photos"
                " on conflict do nothing"],
    "all of them": ["insert into breezeway.property_photos (property_pk, photo_id, url)"
                    " values (1, 'new after the swap', 'u')",
                    "update breezeway.property_photos set caption = 'edited'"
                    " where id = (select min(id) from breezeway.property_photos)",
                    "delete from breezeway.property_photos"
                    " where id = (select max(id) from breezeway.property_photos)",
                    "insert into breezeway.property_photos (property_pk, photo_id, url)"
                    " values (1, 'new after the swap', 'u') on conflict do nothing"],
}


@pytest.mark.parametrize("writes", AFTER_THE_SWAP, ids=list(AFTER_THE_SWAP))
def test_rollback_gives_back_the_originals_and_every_later_write_exactly(
        fresh: Database, writes: str) -> None:
    """The documented flow with the ETL running: a newer copy of a key arrives between the
    build and the swap (latest wins, so the swap keeps it instead of the build's row), then
    the ETL writes to the deduplicated table. The rollback must give back every original row,
    the one the swap replaced included, with exactly the later writes applied."""
    with fresh.connect() as conn:
        conn.execute("insert into breezeway.property_photos (property_pk, photo_id, url)"
                     " select property_pk, photo_id, 'resent' from breezeway.property_photos"
                     " where id = (select max(id) from breezeway.property_photos)")
        originals = rows_as_text(conn, "property_photos")
    swapped(fresh, "--select", "property_photos")
    with fresh.connect() as conn:
        before_writes = rows_as_text(conn, "property_photos")
        for statement in AFTER_THE_SWAP[writes]:
            conn.execute(statement)
        after_writes = rows_as_text(conn, "property_photos")
    # The later writes, as the deduplicated table saw them: what left it, and what came.
    expected = originals - (before_writes - after_writes) + (after_writes - before_writes)
    output = rolled_back(fresh, "--select", "property_photos")
    with fresh.connect() as conn:
        assert rows_as_text(conn, "property_photos") == expected
    assert f"is live again, {sum(expected.values()):,} rows" in output


def test_after_the_swap_a_parent_row_can_go_and_the_rollback_says_what_it_left(
        fresh: Database) -> None:
    """The archive holds no parent row, so the application can delete one once the live rows
    that point at it are gone. The rollback gives the original its foreign key back, validated
    after the commit; the original's duplicates still point at that parent, so it stays NOT
    VALID, enforced for every new row, and the rollback says so."""
    swapped(fresh)
    with fresh.connect() as conn:
        task = conn.execute("select max(task_pk) from breezeway.task_photos").fetchone()[0]
        for child in ("task_photos", "task_requirements", "task_assignments", "task_tags"):
            conn.execute(sql.SQL("delete from {} where task_pk = %s").format(
                sql.Identifier("breezeway", child)), (task,))
        conn.execute("delete from breezeway.tasks where id = %s", (task,))
    output = rolled_back(fresh)
    assert ("Note: foreign key task_photos_task_pk_fkey of breezeway.task_photos, checked "
            "without blocking writers: not validated (Key (task_pk)=") in output
    with fresh.connect() as conn:
        validated = conn.execute(
            "select convalidated from pg_constraint where conname = 'task_photos_task_pk_fkey'"
            " and conrelid = 'breezeway.task_photos'::regclass").fetchone()[0]
        assert validated is False
        orphans = conn.execute("select count(*) from breezeway.task_photos where task_pk = %s",
                               (task,)).fetchone()[0]
        assert orphans > 0
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("insert into breezeway.task_photos (task_pk) values (%s)", (task,))


def test_the_original_gets_its_foreign_keys_back_validated(fresh: Database) -> None:
    swapped(fresh)
    rolled_back(fresh)
    with fresh.connect() as conn:
        keys = conn.execute("select conrelid::regclass::text, convalidated from pg_constraint"
                            " where contype = 'f' and connamespace = 'breezeway'::regnamespace"
                            " order by 1").fetchall()
        archived = conn.execute("select count(*) from pg_constraint where contype = 'f'"
                                " and connamespace = 'dedup_archive'::regnamespace"
                                ).fetchone()[0]
    assert [validated for _, validated in keys] == [True] * len(keys)
    assert {table for table, _ in keys} >= {f"breezeway.{t}" for t in SWAPPED
                                             if t != "business_events"}
    # The deduplicated tables set aside are as inert as the archives were.
    assert archived == 0


def test_a_rollback_stopped_before_its_foreign_keys_were_checked_is_finished_by_the_next(
        fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")

    options = rollback.RollbackOptions(select=["task_photos"])
    with fresh.connect() as conn, pytest.raises(Stopped):
        rollback.execute(conn, rollback.make_plans(conn, options), options,
                         after_step=stop_at("commit"))
    assert not task_photos_foreign_key_valid(fresh)
    dry_run = rolled_back(fresh, "--dry-run")
    assert dry_run.strip().splitlines()[-1] == (
        'alter table "breezeway"."task_photos" validate constraint "task_photos_task_pk_fkey";')
    assert rolled_back(fresh).strip() == (
        "breezeway.task_photos: rolled back already; the foreign keys a stopped run left "
        "unchecked were checked now (1).")
    assert task_photos_foreign_key_valid(fresh)
    assert refused(fresh, "rollback") == (
        "Error: nothing to roll back: every swap in dedup_archive.swap_log was rolled back "
        "already")


def test_a_materialized_view_made_since_the_swap_reads_the_original_after_the_rollback(
        fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    with fresh.connect() as conn:
        conn.execute("create materialized view public.photo_counts as"
                     " select count(*) as photos from breezeway.task_photos")
        deduplicated = conn.execute("select photos from public.photo_counts").fetchone()[0]
        conn.execute("create view public.photo_totals as select photos from public.photo_counts")
    # A view that reads it would keep reading the one the rollback drops.
    assert refused(fresh, "rollback") == (
        "Error: cannot roll back breezeway.task_photos: public.photo_totals read materialized "
        "view public.photo_counts, which reads it, and would keep reading the one it drops: "
        "drop them, roll back, then create them again")
    with fresh.connect() as conn:
        conn.execute("drop view public.photo_totals")
    rolled_back(fresh, "--select", "task_photos")
    with fresh.connect() as conn:
        photos = conn.execute("select photos from public.photo_counts").fetchone()[0]
        assert photos == conn.execute("select count(*) from breezeway.task_photos").fetchone()[0]
    assert photos > deduplicated
