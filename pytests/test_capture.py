"""runner capture against a real server: a start, a status and a stop that leaves no trace, for
any role the ETL writes as, all tables or none."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from conftest import Database, _create_database, said
from psycopg import sql

from runner.declaration import artifacts
from runner.declaration.names import pg_name
from runner.errors import ConnectionLost
from runner.execution import locking
from runner.jobs import capturing
from runner.server import swap_log

CATALOG = """
select jsonb_build_object(
    'schemas', (select jsonb_agg(nspname order by nspname) from pg_namespace
                where nspname !~ '^(pg_|information_schema)'),
    'relations', (select jsonb_agg(array[n.nspname, c.relname, c.relkind::text]
                                   order by n.nspname, c.relname)
                  from pg_class as c join pg_namespace as n on n.oid = c.relnamespace
                  where n.nspname !~ '^(pg_|information_schema)'),
    'functions', (select jsonb_agg(p.oid::regprocedure::text order by 1)
                  from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace
                  where n.nspname !~ '^(pg_|information_schema)'),
    'triggers', (select jsonb_agg(array[tgrelid::regclass::text, tgname, tgenabled::text]
                                  order by 1, 2)
                 from pg_trigger where not tgisinternal),
    'types', (select jsonb_agg(t.typname order by 1) from pg_type as t
              join pg_namespace as n on n.oid = t.typnamespace
              where n.nspname !~ '^(pg_|information_schema)'),
    'dependencies', (select count(*) from pg_depend as d
                     join pg_class as c on d.classid = 'pg_class'::regclass and c.oid = d.objid
                     join pg_namespace as n on n.oid = c.relnamespace
                     where n.nspname !~ '^(pg_|information_schema)')
)
"""


def catalog(database: Database) -> dict:
    with database.connect() as conn:
        return conn.execute(CATALOG).fetchone()[0]


@pytest.fixture
def uncaptured(server, built: Database, tmp_path) -> Iterator[Database]:
    """The demo data as generated, never captured, with the built fixture's artifacts."""
    _create_database(server, "uncaptured", template="demo_source")
    yield Database({**built.env, "PGDATABASE": "uncaptured"}, built.target_dir)
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute("drop database uncaptured with (force)")


def ran(database: Database, *args: str) -> str:
    result = database.runner(*args)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_stopped_capture_leaves_no_trace(uncaptured: Database) -> None:
    before = catalog(uncaptured)
    assert "breezeway.property_photos" in ran(uncaptured, "capture")
    with uncaptured.connect() as conn:
        conn.execute("insert into breezeway.property_photos (property_pk, photo_id)"
                     " values (1, 'captured')")
        # While captured, a column's type cannot change: the log holds the table's row type.
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("alter table breezeway.property_photos alter column caption type text")
    status = json.loads(ran(uncaptured, "capture", "--status", "--format", "json"))
    photos = next(row for row in status if row["table"] == "breezeway.property_photos")
    assert (photos["phase"], photos["state"], photos["changes"]) == (
        "before the swap", "capturing", 1)
    assert photos["log_bytes"] > 0
    assert len(status) == 7
    # What a swap killed after building its index on the key leaves: stop takes it too.
    with uncaptured.connect() as conn:
        conn.execute(sql.SQL("create index {} on breezeway.property_photos (property_pk,"
                             " photo_id)").format(sql.Identifier(pg_name(
                                 "property_photos", "natural_key_lookup"))))
    stopped = ran(uncaptured, "capture", "--stop")
    assert "Stopped capturing writes to breezeway.property_photos (1 logged changes dropped)." in (
        stopped)
    assert catalog(uncaptured) == before
    with uncaptured.connect() as conn:
        conn.execute("alter table breezeway.property_photos alter column caption type text")


def test_stop_keeps_an_archive_schema_that_holds_anything_else(uncaptured: Database) -> None:
    with uncaptured.connect() as conn:
        conn.execute("create schema dedup_archive")
    ran(uncaptured, "capture", "--select", "task_photos")
    ran(uncaptured, "capture", "--stop", "--select", "task_photos")
    with uncaptured.connect() as conn:
        # The user's schema stays, as the runner found it: empty.
        assert conn.execute("select count(*) from pg_class where relnamespace ="
                            " 'dedup_archive'::regnamespace").fetchone()[0] == 0


def test_any_role_allowed_to_write_the_table_writes_on_while_it_is_captured(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("create role etl_writer login")
        conn.execute("grant usage on schema breezeway to etl_writer")
        conn.execute("grant select, insert, update, delete on all tables in schema breezeway"
                     " to etl_writer")
        conn.execute("grant usage on all sequences in schema breezeway to etl_writer")
    etl = Database({**fresh.env, "PGUSER": "etl_writer"}, fresh.target_dir)
    try:
        def write() -> None:
            with etl.connect() as conn:
                conn.execute("insert into breezeway.task_photos (task_pk, photo_id)"
                             " values (1, 'from the etl role') on conflict do nothing")
                conn.execute("update breezeway.task_photos set url = 'edited by the etl role'"
                             " where id = (select max(id) from breezeway.task_photos)")
                conn.execute("delete from breezeway.task_photos"
                             " where id = (select min(id) from breezeway.task_photos)")

        write()   # captured before the swap
        ran(fresh, "swap", "--select", "task_photos")
        write()   # captured since the swap
        status = json.loads(ran(fresh, "capture", "--status", "--format", "json"))
        photos = next(row for row in status if row["table"] == "breezeway.task_photos")
        assert photos["phase"].startswith("since the swap at ")
        assert (photos["state"], photos["changes"]) == ("capturing", 2)
        output = ran(fresh, "rollback", "--select", "task_photos")
        assert "(0 inserted, 1 updated, 1 deleted rows)" in output
        # Back on the original, uncaptured: the role still writes.
        write()
    finally:
        with fresh.connect() as conn:
            conn.execute("drop owned by etl_writer")
            conn.execute("drop role etl_writer")


def test_capture_starts_on_every_table_or_on_none(uncaptured: Database) -> None:
    before = catalog(uncaptured)
    with uncaptured.holding("lock table breezeway.task_tags in share mode"):
        result = uncaptured.runner("capture", "--lock-timeout", "50ms", "--lock-wait", "1s")
    assert result.exit_code == 4, result.output
    assert said(result)[0].startswith("Error: could not lock breezeway.business_events, "), (
        result.output)
    assert catalog(uncaptured) == before


def _capture_status(database: Database) -> list:
    return [(row["table"], row["state"])
            for row in json.loads(ran(database, "capture", "--status", "--format", "json"))]


def _cut_after(database: Database, pid: int, steps: int):
    """A step hook that terminates backend `pid` once `steps` steps are done."""
    done: list[str] = []

    def step_done(label: str) -> None:
        done.append(label)
        if len(done) == steps:
            with database.connect() as other:
                other.execute("select pg_terminate_backend(%s)", (pid,))

    return step_done


def test_a_capture_interrupted_at_any_statement_is_wholly_there_or_not_and_says_which(
        server, built: Database, uncaptured: Database) -> None:
    """The runner's connection is cut after each statement of the capture's one transaction,
    and right after its commit: all tables are captured, or none; what the runner says is what
    the server recorded; a rerun finishes."""
    # Two tables, to be all or none of: each of the others adds the same statements again.
    targets = artifacts.select_targets(artifacts.load_targets(built.target_dir),
                                       ["task_photos", "task_tags"])
    options = locking.LockOptions(swap_log.DEFAULT_ARCHIVE_SCHEMA, lock_timeout_ms=50)
    labels: list[str] = []
    with psycopg.connect(autocommit=True, **{**server.conninfo, "dbname": "uncaptured"}) as c:
        c.execute(sql.SQL("create database {} template uncaptured").format(
            sql.Identifier("capture_count")))
    counting = Database({**uncaptured.env, "PGDATABASE": "capture_count"}, built.target_dir)
    with counting.connect() as conn:
        conn.execute("set search_path = pg_catalog")
        capturing.start(conn, targets, options, step_done=labels.append)
    everything = _capture_status(counting)
    assert len(everything) == len(targets) and labels[-1] == "commit", labels
    before = catalog(uncaptured)
    for number, label in enumerate(labels, 1):
        name = f"capture_cut_{number}"
        with psycopg.connect(autocommit=True, **server.conninfo) as admin:
            admin.execute(sql.SQL("create database {} template uncaptured").format(
                sql.Identifier(name)))
        database = Database({**uncaptured.env, "PGDATABASE": name}, built.target_dir)
        try:
            with pytest.raises(ConnectionLost) as lost, database.connect() as conn:
                conn.execute("set search_path = pg_catalog")
                capturing.start(conn, targets, options, step_done=_cut_after(
                    database, conn.info.backend_pid, number))
            assert lost.value.committed is (label == "commit"), (label, str(lost.value))
            if label == "commit":
                assert "it is done; `runner capture --status` shows it" in str(lost.value)
                assert _capture_status(database) == everything
            else:
                assert "nothing was changed" in str(lost.value)
                assert catalog(database) == before, f"cut after {label}"
            ran(database, "capture", "--select", "task_photos", "--select", "task_tags")
            assert _capture_status(database) == everything
        finally:
            with psycopg.connect(autocommit=True, **server.conninfo) as admin:
                admin.execute(sql.SQL("drop database {} with (force)").format(
                    sql.Identifier(name)))
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute("drop database capture_count with (force)")


def test_a_truncate_while_captured_stops_the_swap(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("truncate breezeway.task_photos")
        conn.execute("insert into breezeway.task_photos (task_pk, photo_id)"
                     " values (1, 'after'), (1, 'after'), (1, 'other')")
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 4, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: breezeway.task_photos was truncated after dbt read it, so the build no longer "
        "says which rows to keep; nothing was changed: run `dbt build` again, then `runner "
        "swap`")
    # The build that follows sees the truncate, and the swap then skips it as seen.
    assert fresh.dbt("build", "--select", "source:breezeway.task_photos+",
                     "--exclude", "audit_duplicates", "tag:dedup_guard").success
    ran(fresh, "swap", "--select", "task_photos")
    with fresh.connect() as conn:
        assert conn.execute("select array_agg(photo_id order by photo_id)"
                            " from breezeway.task_photos").fetchone()[0] == ["after", "other"]


def test_a_truncate_since_the_swap_stops_the_rollback(fresh: Database) -> None:
    ran(fresh, "swap", "--select", "task_photos")
    with fresh.connect() as conn:
        conn.execute("truncate breezeway.task_photos")
    result = fresh.runner("rollback")
    assert result.exit_code == 4
    assert "cannot roll back breezeway.task_photos: it was truncated since the swap" in (
        result.output)
