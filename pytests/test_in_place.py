"""In place: a table with few duplicates loses only them, to an archive, and is never replaced;
the ETL writes on meanwhile, a run stopped anywhere is finished by the next, and a rollback
puts back exactly the rows it removed."""

from __future__ import annotations

import json
from collections import Counter

import psycopg
import pytest
from conftest import Database, _create_database, said
from psycopg import sql
from test_concurrency import (
    ETL_ROLE,
    capture_and_build_while_writing,
    start_the_etl,
    wait_for_writes,
)
from test_crash import _kill_after
from test_other_project import (  # noqa: F401
    EXPECTED_KEPT,
    run_other_dbt,
    shop,
)

from runner.errors import ConnectionLost, RunnerError
from runner.jobs import swap
from runner.statements import in_place

PROJECT = ("--project-dir", str(__import__("test_other_project").OTHER_PROJECT))
LINES = '"Shop"."Order Lines"'
# 995 more orders of one line, loaded once: with the fixture's 60 rows of 15 keys, 45 of 1,055
# rows are duplicates (4.3%), which `auto` removes in place.
LOADED_ONCE = f"""insert into {LINES}
select md5('once-' || o)::uuid, 'ORD-' || o, 1, timestamptz '2025-01-01', 'loaded once'
from generate_series(6, 1000) as o"""


def _rows(conn: psycopg.Connection, table: str = LINES) -> Counter:
    return Counter(row for (row,) in conn.execute(f"select row(t.*)::text from {table} as t"))


def _archive(conn: psycopg.Connection) -> str | None:
    if not conn.execute("select to_regclass('dedup_archive.swap_log')").fetchone()[0]:
        return None
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
    assert ("-- Shop.Order Lines: in place, because 4.3% of its rows are duplicates, at most 15%"
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
    verified = few.runner("verify", "--format", "json", *PROJECT)
    assert verified.exit_code == 0, verified.output
    assert (f"{archive.replace(chr(34), '')} holds the 45 rows removed in place, which a "
            "rollback puts back") in verified.output
    reported = few.runner("report", *PROJECT)
    assert reported.exit_code == 0, reported.output
    assert "deduplicated in place" in reported.output

    rolled = few.runner("rollback", *PROJECT)
    assert rolled.exit_code == 0, rolled.output
    with few.connect() as conn:
        assert _rows(conn) == before
        conn.execute(f"""insert into {LINES} values
                     (gen_random_uuid(), 'ORD-7', 1, now(), 'sent again')""")
    cleaned = few.runner("cleanup", "--older-than", "0s", *PROJECT)
    assert cleaned.exit_code == 0, cleaned.output
    with few.connect() as conn:
        assert conn.execute("select to_regclass(%s)", (archive,)).fetchone()[0] is None


def test_a_rollback_that_a_trigger_would_change_stops_and_changes_nothing(
        few: Database) -> None:
    """The rows put back go through the table's BEFORE INSERT triggers: one that changes them
    would make the restore inexact, so the rollback checks what went in against the archive,
    and stops; without the trigger it puts back exactly what was removed."""
    with few.connect() as conn:
        before = _rows(conn)
    assert few.runner("swap", *PROJECT).exit_code == 0
    with few.connect() as conn:
        deduplicated = _rows(conn)
        conn.execute("create function public.stamp_note() returns trigger language plpgsql"
                     " as $$begin new.note := 'stamped'; return new; end$$")
        conn.execute(f"create trigger stamp_note before insert on {LINES} for each row"
                     " execute function public.stamp_note()")
    stopped = few.runner("rollback", *PROJECT)
    assert stopped.exit_code == 4, stopped.output
    (line,) = [line for line in said(stopped) if line.startswith("Error:")]
    assert line == (
        "Error: check failed, nothing was changed: the rows the run removed go back into "
        "Shop.Order Lines as the archive holds them, as many and with the same checksum (a "
        "trigger of Shop.Order Lines that changes or skips a row put back would fail it: "
        "disable it for the rollback) (archived_rows=45, rows_put_back=45, "
        "same_checksum=False)")
    with few.connect() as conn:
        assert _rows(conn) == deduplicated
        assert conn.execute("select rolled_back_at is null from dedup_archive.swap_log"
                            ).fetchone()[0]
        conn.execute(f"drop trigger stamp_note on {LINES}")
    rolled = few.runner("rollback", *PROJECT)
    assert rolled.exit_code == 0, rolled.output
    with few.connect() as conn:
        assert _rows(conn) == before


def _database_like(server, template: Database, name: str) -> Database:
    _create_database(server, name, template=template.name)
    return Database({**template.env, "PGDATABASE": name}, template.target_dir)


def _drop(server, database: Database) -> None:
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute(sql.SQL("drop database {} with (force)").format(
            sql.Identifier(database.name)))


def live_and_archived(conn: psycopg.Connection, table: str) -> Counter:
    """Every row of `table` and of every in-place archive, finished (in swap_log) or not."""
    archives = [name for (name,) in conn.execute(
        "select format('%I.%I', 'dedup_archive', relname) from pg_class"
        " where relnamespace = 'dedup_archive'::regnamespace and relname like '%removing'")]
    if conn.execute("select to_regclass('dedup_archive.swap_log')").fetchone()[0]:
        archives += [name for (name,) in conn.execute(
            "select format('%I.%I', 'dedup_archive', archive_table) from dedup_archive.swap_log")]
    return sum((_rows(conn, archive) for archive in archives), _rows(conn, table))


def kill_after_each_step_then_rerun(server, database: Database, options: swap.SwapOptions,
                                    killed, rerun) -> list[str]:
    """On a copy of `database` per step of its run: the run killed after that step, then
    `killed(conn, label)`, a rerun, and `rerun(conn, label)`. Returns the steps."""
    labels: list[str] = []
    counting = _database_like(server, database, f"{database.name}_count")
    try:
        with counting.connect() as conn:
            swap.execute(conn, swap.make_plans(conn, options), options,
                         after_step=labels.append)
    finally:
        _drop(server, counting)
    for number, label in enumerate(labels):
        copy = _database_like(server, database, f"{database.name}_kill_{number}")
        try:
            with (pytest.raises((ConnectionLost, psycopg.OperationalError)),
                  copy.connect() as conn):
                conn.execute("set application_name = 'runner-under-test'")
                swap.execute(conn, swap.make_plans(conn, options), options,
                             after_step=_kill_after(copy, number + 1))
            with copy.connect() as conn:
                killed(conn, label)
            with copy.connect() as conn:
                swap.execute(conn, swap.make_plans(conn, options), options)
            with copy.connect() as conn:
                rerun(conn, label)
        finally:
            _drop(server, copy)
    return labels


def test_a_kill_after_any_step_loses_nothing_and_a_rerun_finishes(
        server, few: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sixteen rows a batch: the 15 duplicated keys of four rows each take four.
    monkeypatch.setattr(in_place, "BATCH_ROWS", 16)
    with few.connect() as conn:
        before = _rows(conn)
        expected = _rows(conn, f"(select * from {LINES} where uid in ({EXPECTED_KEPT}))")

    def killed(conn: psycopg.Connection, label: str) -> None:
        assert live_and_archived(conn, LINES) == before, f"killed after {label!r}"
        # Nothing but the run deleted rows: the capture's log holds none of its deletes.
        logs = [name for (name,) in conn.execute(
            "select format('%I.%I', 'dedup_archive', log_table) from dedup_archive.captures")]
        assert [conn.execute(f"select count(*) from {log} where op = 'D'").fetchone()[0]
                for log in logs] == [0] * len(logs), f"killed after {label!r}"

    def rerun(conn: psycopg.Connection, label: str) -> None:
        assert _rows(conn) == expected, f"rerun after a kill after {label!r}"
        assert _rows(conn) + _rows(conn, _archive(conn)) == before
        assert _leftovers(conn) == []

    labels = kill_after_each_step_then_rerun(server, few, _options(few), killed, rerun)
    assert [label for label in labels if label.startswith("batch")] == [
        f"batch {n} of 4 of Shop.Order Lines" for n in range(1, 5)]
    assert {"lookup index of Shop.Order Lines", "guard of Shop.Order Lines",
            "concurrent index of Shop.Order Lines", "lock", "commit"} <= set(labels)


def test_an_invalid_unique_index_left_behind_is_dropped_and_built_again(few: Database) -> None:
    with few.connect() as conn:
        # What a build that met duplicates leaves: an INVALID index under the pending name.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"""create unique index concurrently "Order Lines__natural_key_new"
                         on {LINES} ("Order ID", line_no)""")
        assert conn.execute("""select not indisvalid from pg_index
                            where indexrelid = '"Shop"."Order Lines__natural_key_new"'::regclass
                            """).fetchone()[0]
    planned = few.runner("swap", "--dry-run", *PROJECT)
    assert ('drop index concurrently if exists "Shop"."Order Lines__natural_key_new"'
            in planned.output)
    swapped = few.runner("swap", *PROJECT)
    assert swapped.exit_code == 0, swapped.output
    with few.connect() as conn:
        assert conn.execute(f"""select indexrelid::regclass::text, indisvalid from pg_index
                            where indrelid = '{LINES}'::regclass and indisunique
                            and not indisprimary""").fetchall() == [
            ('"Shop"."Order Lines__natural_key"', True)]


def _once_the_guard_goes(database: Database, statement: str):
    """A step hook: `statement`, once the batches are done and the guard gone."""
    def step_done(label: str) -> None:
        if label == "guard dropped of Shop.Order Lines":
            with database.connect() as conn:
                conn.execute(statement)

    return step_done


def test_each_proof_of_the_archive_stops_the_run_before_the_cut_over(few: Database) -> None:
    """Before the lock, every archived row must lose to a live row of its key, and none may be
    live still: each made false, as a fault of the run would, stops it with nothing changed;
    once the fault is gone a rerun finishes."""
    archive = "dedup_archive.\"Shop__Order Lines__removing\""
    lost = (f"insert into {archive} values (gen_random_uuid(), 'ORD-LOST', 1, now(),"
            " 'no live row beats it')")
    with pytest.raises(RunnerError, match="every archived row lost to a live row of its key "
                                          r"\(archived_rows_no_live_row_beats=1\)"):
        _swap(few, after_step=_once_the_guard_goes(few, lost))
    key = "(\"Order ID\", line_no) = ('ORD-1', 1)"
    with few.connect() as conn:
        conn.execute(f"delete from {archive} where \"Order ID\" = 'ORD-LOST'")
        kept = conn.execute(f"select uid from {LINES} where {key}").fetchone()[0]
    with pytest.raises(RunnerError, match=r"no archived row is live still "
                                          r"\(archived_rows_live_still=1\)"):
        _swap(few, after_step=_once_the_guard_goes(
            few, f"update {LINES} set uid = (select uid from {archive} where {key} limit 1)"
                 f" where {key}"))
    with few.connect() as conn:
        assert conn.execute("select count(*) from dedup_archive.swap_log").fetchone()[0] == 0
        conn.execute(f"update {LINES} set uid = %s where {key}", (kept,))
    _swap(few)
    with few.connect() as conn:
        assert conn.execute("select action, rows_after from dedup_archive.swap_log"
                            ).fetchall() == [("in_place", 1010)]


def test_a_trigger_that_keeps_rows_from_being_deleted_stops_the_run_and_loses_nothing(
        shop: Database) -> None:  # noqa: F811
    """A BEFORE DELETE trigger that returns NULL keeps its row: the batch stops, naming the
    cause, where the unique index would otherwise fail run after run. The table's AFTER DELETE
    triggers fire for each removed row, as for any DELETE; the plan says both fire."""
    archive = "dedup_archive.\"Shop__Order Lines__removing\""
    with shop.connect() as conn:
        conn.execute(LOADED_ONCE)
        before = _rows(conn)
        conn.execute("create table public.deleted_lines (uid uuid)")
        conn.execute("create function public.log_deleted() returns trigger language plpgsql"
                     " as $$begin insert into public.deleted_lines values (old.uid);"
                     " return null; end$$")
        conn.execute(f"create trigger log_deleted after delete on {LINES} for each row"
                     " execute function public.log_deleted()")
        conn.execute("create function public.keep_first_loads() returns trigger language plpgsql"
                     " as $$begin if old.note = 'version 1' then return null; end if;"
                     " return old; end$$")
        conn.execute(f"create trigger keep_first_loads before delete on {LINES} for each row"
                     " execute function public.keep_first_loads()")
    fired = ("its own triggers keep_first_loads, log_deleted fire on DELETE, as in place "
             "removes each duplicate (a swap fires none)")
    assert run_other_dbt(shop, "parse").success
    previewed = shop.runner("plan", *PROJECT)
    assert f"--   {fired}\n" in previewed.output, previewed.output
    assert shop.runner("capture", *PROJECT).exit_code == 0
    assert run_other_dbt(shop, "build").success
    planned = shop.runner("swap", "--dry-run", *PROJECT)
    assert f"-- Shop.Order Lines: {fired}\n" in planned.output, planned.output

    stopped = shop.runner("swap", *PROJECT)
    assert stopped.exit_code == 4, stopped.output
    assert said(stopped) == [
        "Error: check failed, nothing was changed: every row of the batch's keys that a live "
        "row beats was deleted (a trigger, rule or row security policy of Shop.Order Lines "
        "keeps the rest: swap the table, strategy: swap, or disable it for the run) "
        "(beaten_rows_not_deleted=15)"]
    with shop.connect() as conn:
        assert _rows(conn) + _rows(conn, archive) == before
        assert conn.execute("select count(*) from dedup_archive.swap_log").fetchone()[0] == 0
        conn.execute(f"drop trigger keep_first_loads on {LINES}")
    finished = shop.runner("swap", *PROJECT)
    assert finished.exit_code == 0, finished.output
    with shop.connect() as conn:
        assert conn.execute("select action, rows_after from dedup_archive.swap_log"
                            ).fetchall() == [("in_place", 1010)]
        assert _rows(conn) + _rows(conn, _archive(conn)) == before
        assert Counter(conn.execute("select uid from public.deleted_lines")) == Counter(
            conn.execute(f"select uid from {_archive(conn)}"))


def test_a_table_others_reference_is_deduplicated_in_place_by_auto_its_key_untouched(
        few: Database) -> None:
    """auto goes by the share alone: a foreign key into the table is followed in place
    (test_in_place_references has the whole story), and stays the one it was."""
    with few.connect() as conn:
        conn.execute(f"""create table "Shop".notes (id int primary key,
                     line uuid references {LINES} (uid) on delete cascade)""")
        conn.execute('create index on "Shop".notes (line)')
        conn.execute(f"""insert into "Shop".notes select row_number() over (), uid
                     from {LINES} where "Order ID" in ('ORD-1', 'ORD-2')""")
        key = conn.execute("select oid from pg_constraint where conname = 'notes_line_fkey'"
                           ).fetchone()[0]
        pointed = conn.execute(f"""select n.id, l."Order ID", l.line_no from "Shop".notes as n
                               join {LINES} as l on l.uid = n.line order by n.id""").fetchall()
    assert few.runner("capture", *PROJECT).exit_code == 0
    assert run_other_dbt(few, "build").success
    planned = few.runner("swap", "--dry-run", *PROJECT)
    assert planned.exit_code == 0, planned.output
    assert ("-- Shop.Order Lines: in place, because 4.3% of its rows are duplicates, at most 15%"
            in planned.output)
    swapped = few.runner("swap", *PROJECT)
    assert swapped.exit_code == 0, swapped.output
    with few.connect() as conn:
        assert conn.execute("select oid from pg_constraint where conname = 'notes_line_fkey'"
                            ).fetchone()[0] == key
        assert conn.execute(f"""select n.id, l."Order ID", l.line_no from "Shop".notes as n
                            join {LINES} as l on l.uid = n.line order by n.id""").fetchall() == (
            pointed)
        assert conn.execute(f"select count(*) from {LINES} where uid in (select line from"
                            f' "Shop".notes) and uid not in ({EXPECTED_KEPT})').fetchone()[0] == 0
        assert _leftovers(conn) == []


def declare_strategy(target_dir, table: str, strategy: str = "in_place") -> None:
    """The built project's manifest as if the table's meta.dedup said this strategy."""
    manifest_path = target_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for node in manifest["sources"].values():
        if node["name"] == table:
            for meta in (node["meta"], node["config"]["meta"]):
                meta["dedup"]["strategy"] = strategy
    manifest_path.write_text(json.dumps(manifest))


def test_a_concurrent_writer_loses_nothing_and_leaves_no_duplicates_in_place(
        server, pg_env, tmp_path) -> None:
    """The ETL of test_concurrency, as a role that does not own the table, writes through
    every step of an in-place run of the demo's photos: its re-sent copies, new rows,
    updates, re-keys and deletes."""
    database, writer, stop, written, results = start_the_etl(server, pg_env,
                                                             "concurrent_in_place", tmp_path)
    steps: list[str] = []
    try:
        capture_and_build_while_writing(database, written)
        declare_strategy(database.target_dir, "property_photos")

        def write_meanwhile(label: str) -> None:
            # After each step before the lock: under it the writer waits, as it should.
            steps.append(label)
            if label.endswith(" of breezeway.property_photos"):
                wait_for_writes(written, 5)

        options = swap.SwapOptions(target_dir=database.target_dir, select=["property_photos"])
        with database.connect() as conn:
            plans = swap.make_plans(conn, options)
            assert [plan.action for plan in plans] == ["in_place"]
            swap.execute(conn, plans, options, after_step=write_meanwhile)
        wait_for_writes(written, 10)
    finally:
        stop.set()
        writer.join(30)
    assert writer.exitcode == 0
    assert "guard of breezeway.property_photos" in steps
    fate = json.loads(results.read_text())
    deleted = set(fate["deleted"])
    assert deleted and fate["updated"] and fate["rekeyed"], "the writer did all it does"
    with database.connect() as conn:
        archive = sql.Identifier("dedup_archive", conn.execute(
            "select archive_table from dedup_archive.swap_log").fetchone()[0])
        everywhere = Counter(row[0] for row in conn.execute(sql.SQL(
            "select id from {} union all select id from breezeway.property_photos"
        ).format(archive)))
        # Nothing lost, nothing twice: every row the writer inserted and did not delete is
        # live or archived, once.
        assert {row_id for row_id, _ in fate["inserted"]} - deleted <= set(everywhere)
        assert set(everywhere.values()) == {1}
        live = {photo: (row_id, url) for row_id, photo, url in conn.execute(
            "select id, photo_id, url from breezeway.property_photos")}
        assert conn.execute("select count(*) = count(distinct (property_pk, photo_id))"
                            " from breezeway.property_photos").fetchone()[0]
        assert {photo: live[photo][0] for photo in fate["live"]} == fate["live"]
        assert {photo: live[photo][1] for photo in fate["updated"]} == fate["updated"]
        assert not {photo for row_id, photo in fate["inserted"] if row_id in deleted} & set(live)
        assert not set(fate["rekeyed"]) & set(live)
        # Each key keeps the latest of its rows, live or archived.
        wrong = conn.execute(sql.SQL(
            "select count(*) from breezeway.property_photos as l join {} as a"
            " using (property_pk, photo_id) where a.id > l.id").format(archive)).fetchone()[0]
        assert wrong == 0
        assert _leftovers(conn) == []
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute("drop database concurrent_in_place with (force)")
        admin.execute(f"drop role {ETL_ROLE}")


def test_declared_in_place_the_build_copies_no_kept_row(shop: Database,  # noqa: F811
                                                         tmp_path) -> None:
    """`runner add --strategy in_place`: the kept-rows model is a view, the tests read it,
    and the swap is in place whatever the duplicates' share (75% here)."""
    project = tmp_path / "mine"
    assert shop.runner("init", str(project)).exit_code == 0
    added = shop.runner("add", "Shop.Order Lines", "--key", "Order ID,line_no",
                        "--keep", "updated_at:desc,uid:desc", "--nulls", "forbidden",
                        "--strategy", "in_place", "--project-dir", str(project))
    assert added.exit_code == 0, added.output
    assert (project / "models/deduplicated/order_lines.sql").read_text().splitlines()[2] == (
        "{{ config(materialized='view') }}")
    with shop.connect() as conn:
        before = _rows(conn)
        expected = _rows(conn, f"(select * from {LINES} where uid in ({EXPECTED_KEPT}))")
    built = shop.runner("build", "--project-dir", str(project))
    assert built.exit_code == 0, built.output
    with shop.connect() as conn:
        assert conn.execute("select relkind from pg_class where oid = 'dedup.order_lines'"
                            "::regclass").fetchone()[0] == "v"
    planned = shop.runner("swap", "--dry-run", "--project-dir", str(project))
    assert ("-- Shop.Order Lines: in place, because its meta.dedup says strategy: in_place"
            in planned.output)
    swapped = shop.runner("swap", "--project-dir", str(project))
    assert swapped.exit_code == 0, swapped.output
    with shop.connect() as conn:
        assert _rows(conn) == expected and sum(expected.values()) == 15
        assert _rows(conn) + _rows(conn, _archive(conn)) == before


def test_runner_build_builds_a_view_where_auto_will_choose_in_place(shop: Database,  # noqa: F811
                                                                     tmp_path) -> None:
    """Under `auto`, `runner build` counts the duplicates first: 4.3% here, so the kept rows
    are a view, never copied, and the swap follows the build's choice. The user's own --vars
    reach dbt beside the runner's choice."""
    with shop.connect() as conn:
        conn.execute(LOADED_ONCE)
        before = _rows(conn)
        expected = _rows(conn, f"(select * from {LINES} where uid in ({EXPECTED_KEPT}))")
    project = tmp_path / "mine"
    assert shop.runner("init", str(project)).exit_code == 0
    added = shop.runner("add", "Shop.Order Lines", "--key", "Order ID,line_no",
                        "--keep", "updated_at:desc,uid:desc", "--nulls", "forbidden",
                        "--project-dir", str(project))
    assert added.exit_code == 0, added.output
    built = shop.runner("build", "--vars", "{owner: mine}", "--project-dir", str(project))
    assert built.exit_code == 0, built.output
    assert ("shop.order_lines: deduplicated in place, because 4.3% of its rows are "
            "duplicates, at most 15%") in built.output
    with shop.connect() as conn:
        assert conn.execute("select relkind from pg_class where oid = 'dedup.order_lines'"
                            "::regclass").fetchone()[0] == "v"
    ran = json.loads((shop.target_dir / "run_results.json").read_text())
    assert ran["args"]["vars"] == {"owner": "mine", "dedup_in_place": ["shop.order_lines"]}
    # Built again, choosing alike: dbt finds every variable as it was, and parses nothing anew.
    log = project / "logs" / "dbt.log"
    logged_before = len(log.read_text())
    again = shop.runner("build", "--vars", "{owner: mine}", "--project-dir", str(project))
    assert again.exit_code == 0, again.output
    logged = log.read_text()[logged_before:]
    assert logged.count("Nothing changed, skipping partial parsing.") == 2
    assert "Unable to do partial parsing" not in logged
    planned = shop.runner("swap", "--dry-run", "--project-dir", str(project))
    assert ("-- Shop.Order Lines: in place, because runner build chose it, and built the kept "
            "rows as a view, not a copy") in planned.output
    swapped = shop.runner("swap", "--project-dir", str(project))
    assert swapped.exit_code == 0, swapped.output
    with shop.connect() as conn:
        assert _rows(conn) == expected
        assert _rows(conn) + _rows(conn, _archive(conn)) == before
