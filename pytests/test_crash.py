"""Killed at any step, the swap leaves the database as it was, and a rerun finishes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from conftest import PROJECT_DIR, TEST_SCALE, Database, _create_database
from psycopg import sql
from test_references import EXACTLY, LIKES, liked_keys
from test_swap import schema_state

from runner import demo
from runner.errors import ConnectionLost
from runner.execution.executor import FLUSH, run_steps
from runner.jobs import swap

TABLE = "task_photos"


def _copy(server, built: Database, name: str) -> Database:
    """A copy of the built database, with a materialized view on the table, which the swap
    creates again in its cut-over, and a table that references it, whose rows it re-points."""
    _create_database(server, name, template=built.name)
    database = Database({**built.env, "PGDATABASE": name}, built.target_dir)
    with database.connect() as conn:
        conn.execute(f"create materialized view breezeway.{TABLE}_per_task as"
                     f" select task_pk, count(*) as photos from breezeway.{TABLE} group by 1")
        conn.execute(LIKES)
    assert database.runner("capture").exit_code == 0
    return database


def archive_of(conn: psycopg.Connection) -> str:
    """The original table, as the latest swap kept it."""
    return conn.execute(
        "select format('%%I.%%I', 'dedup_archive', archive_table) from dedup_archive.swap_log"
        " where live_table = %s order by swapped_at desc limit 1", (TABLE,)).fetchone()[0]


def _drop(server, database: Database) -> None:
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute(sql.SQL("drop database {} with (force)").format(
            sql.Identifier(database.name)))


def _state(database: Database) -> tuple:
    with database.connect() as conn:
        rows = conn.execute(f"select count(*), sum(id) from breezeway.{TABLE}").fetchone()
        triggers = conn.execute("select count(*) from pg_trigger"
                                " where tgname like 'dedup_%'").fetchone()[0]
        likes = conn.execute(EXACTLY).fetchall()
    return schema_state(database), rows, triggers, likes


def _swap(database: Database, after_step=None) -> None:
    options = swap.SwapOptions(target_dir=database.target_dir, select=[TABLE])
    with database.connect() as conn:
        conn.execute("set search_path = pg_catalog")
        swap.execute(conn, swap.make_plans(conn, options), options, after_step=after_step)


def _swapped_correctly(database: Database) -> None:
    with database.connect() as conn:
        kept = {r[0] for r in conn.execute(f"select id from breezeway.{TABLE}")}
        counted = conn.execute(f"select sum(photos) from breezeway.{TABLE}_per_task").fetchone()
        liked = liked_keys(conn)
        original = liked_keys(conn, archive_of(conn))
    assert kept == demo.expected_kept_ids(TABLE, TEST_SCALE)
    assert counted == (len(kept),)
    assert liked == original


def _kill_after(database: Database, steps: int):
    """A step hook that terminates the runner's backend once `steps` steps are done."""
    done: list[str] = []

    def step_done(label: str) -> None:
        done.append(label)
        if len(done) == steps:
            with database.connect() as other:
                other.execute("select pg_terminate_backend(pid) from pg_stat_activity"
                              " where application_name = 'runner-under-test'")

    return step_done


def _steps(server, built: Database) -> list[str]:
    database = _copy(server, built, "crash_count")
    labels: list[str] = []
    try:
        _swap(database, after_step=labels.append)
    finally:
        _drop(server, database)
    return labels


def test_a_kill_at_every_step_leaves_all_as_it_was_and_a_rerun_finishes(server,
                                                                         built) -> None:
    # As it was, until the commit; after it, as it should be, but for the foreign key that
    # is checked after the commit, which the rerun checks.
    steps = _steps(server, built)
    assert "lock" in steps and "cutover" in steps
    for number, label in enumerate(steps):
        database = _copy(server, built, f"crash_{number}")
        try:
            before = _state(database)

            # What the runner says is what the server recorded.
            with pytest.raises(ConnectionLost) as lost:
                options = swap.SwapOptions(target_dir=database.target_dir, select=[TABLE])
                with database.connect() as conn:
                    conn.execute("set application_name = 'runner-under-test'")
                    plans = swap.make_plans(conn, options)
                    swap.execute(conn, plans, options,
                                 after_step=_kill_after(database, number + 1))
            assert lost.value.committed is (label == "commit"), (label, str(lost.value))
            if label == "commit":
                _swapped_correctly(database)
            else:
                assert _state(database) == before, f"killed after {label!r}"
            _swap(database)
            _swapped_correctly(database)
        finally:
            _drop(server, database)


def test_killing_the_runner_while_it_waits_for_the_lock(server, built) -> None:
    database = _copy(server, built, "crash_sigkill")
    try:
        before = _state(database)
        env = {**os.environ, **database.env, "DBT_TARGET_PATH": str(database.target_dir)}
        with database.holding(f"lock table breezeway.{TABLE} in access share mode"):
            runner = subprocess.Popen(
                [sys.executable, "-m", "runner", "swap", "--select", TABLE, "--lock-wait", "60s"],
                cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            with database.connect() as conn:
                for _ in range(200):
                    waiting = conn.execute(
                        "select count(*) from pg_stat_activity where application_name = 'runner'"
                        " and state = 'idle in transaction'").fetchone()[0]
                    if waiting:
                        break
                    time.sleep(0.05)
            time.sleep(0.3)
            runner.send_signal(signal.SIGKILL)
            runner.wait(10)
        # The server notices the dead client and rolls its transaction back.
        with database.connect() as conn:
            for _ in range(100):
                if not conn.execute("select count(*) from pg_stat_activity"
                                    " where application_name = 'runner'").fetchone()[0]:
                    break
                time.sleep(0.1)
        assert _state(database) == before
        _swap(database)
        _swapped_correctly(database)
    finally:
        _drop(server, database)


@pytest.mark.parametrize("session_default", ["on", "off"])
def test_the_flush_after_a_cut_over_reaches_the_disk(server, session_default: str) -> None:
    """A cut-over commits without waiting for the disk; the runner reports it only after a
    commit of its own has flushed the log past it, whatever the session's synchronous_commit.
    Read from the server's own flush position: a crash loses nothing before it."""
    name = f"flush_{session_default}"
    _create_database(server, name)
    try:
        with psycopg.connect(autocommit=True, **{**server.conninfo, "dbname": name}) as conn:
            conn.execute("create table marks (n int)")
            conn.execute(f"set synchronous_commit = {session_default}")
            for n in range(5):
                with conn.transaction():
                    conn.execute("set local synchronous_commit = off")
                    conn.execute("insert into marks values (%s)", (n,))
                committed = conn.execute("select pg_current_wal_insert_lsn()").fetchone()[0]
                run_steps(conn, [FLUSH])
                assert conn.execute("select pg_current_wal_flush_lsn() >= %s::pg_lsn",
                                    (committed,)).fetchone()[0], n
    finally:
        with psycopg.connect(autocommit=True, **server.conninfo) as admin:
            admin.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))
