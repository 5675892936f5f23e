"""Random histories of a table's life, checked step by step against a model of what it must hold.

A history starts from one of the shapes of histories.py loaded with duplicates, and goes on with
the ETL's writes (new keys, re-sent copies, NULL keys, updates, re-keys, deletes) interleaved
with capture, dbt build, swap, rollback, capture --stop and cleanup; a swap or rollback may have
the ETL write while it works and someone hold a lock it needs, and may be killed at one of its
steps (its backend terminated, its process killed with SIGKILL, or the server crashed with
`pg_ctl stop -m immediate`), then run again. After every step the database must be what the
model (history_model.py) says: the live table and every archive row by row, the catalog of the
live table as it was but for the natural key's constraint, the captures in place, the archives
inert, nothing left over.

Hypothesis draws the histories and, when one fails, shrinks it to a minimal one and prints it
step by step with how to reproduce it. The suite runs a fixed set of each shape (derandomized);
a long run, N of each shape:

    pytest -n 0 pytests/test_histories.py --soak 60 [--hypothesis-seed N]
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import histories
import psycopg
import pytest
from conftest import PROJECT_DIR, description, say_at_the_end
from history_model import Model, difference, key_of, same_table
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

from runner.declaration import dbt
from runner.declaration.artifacts import load_targets, select_targets
from runner.declaration.names import constraint_name, null_key_index_names, pg_name
from runner.errors import RunnerError
from runner.execution import locking
from runner.jobs import capturing, cleanup, rollback, swap
from runner.server import swap_log
from runner.server.connection import environment
from runner.server.embedded import EmbeddedPostgres

DATABASE = "histories"
SUITE_HISTORIES = 14
STEPS = 16
DURING_BUILD = [None, "key groups", "kept rows"]
KILLS = (None, None, "terminate", "sigkill", "crash")
LOCK_TIMEOUT_MS = 50
# What a killed swap may leave on the live table, for the next run: the unique index of a
# table that needs only its constraint (and before 15 its partial ones), the index on the key
# for replaying deletes under the lock.
BUILT_OUTSIDE_TRANSACTIONS = ("natural_key_new", "natural_key_lookup")
# The runner's backend, for the kills.
APPLICATION = "runner-in-a-history"

class Harness:
    """A server of the test's own (the histories crash it), the dbt project of the shapes, and
    one database that every history starts afresh."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.server = EmbeddedPostgres(base / "pg", dbname="postgres")
        self.server.start()
        self.project = base / "project"
        self.target = base / "target"
        histories.write_project(self.project, PROJECT_DIR)
        self.env = {**self.server.environ(), "PGDATABASE": DATABASE}
        with self.admin() as admin:
            admin.execute(sql.SQL("create database {}").format(sql.Identifier(DATABASE)))
        for args in (["deps"], ["parse"]):
            assert self.dbt(*args).success, args
        self._etl: psycopg.Connection | None = None

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(autocommit=True, **self.server.conninfo)

    def connect(self, user: str | None = None) -> psycopg.Connection:
        conn = psycopg.connect(autocommit=True, **{
            **self.server.conninfo, "dbname": DATABASE, "user": user or "postgres"})
        return conn

    def dbt(self, *args: str, callbacks=()):
        with environment(self.env):
            return dbt.invoke(list(args), self.project,
                              target_dir=None if args[0] == "deps" else self.target,
                              profiles_dir=PROJECT_DIR, callbacks=callbacks, quiet=True)

    def fresh_database(self) -> None:
        self.close_etl()
        with self.admin() as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(
                sql.Identifier(DATABASE)))
            admin.execute(sql.SQL("create database {}").format(sql.Identifier(DATABASE)))
        (self.target / "run_results.json").unlink(missing_ok=True)

    def etl(self) -> psycopg.Connection:
        """The ETL's connection, as a role with DML grants only."""
        if self._etl is None or self._etl.closed:
            self._etl = self.connect(histories.ETL_ROLE)
        return self._etl

    def close_etl(self) -> None:
        if self._etl is not None:
            self._etl.close()
            self._etl = None

    def crash(self) -> None:
        """The server stops as if the machine lost power; it recovers on the next start."""
        self.server._run_tool("pg_ctl stop", ["stop", "-D", str(self.server.data_dir),
                                              "-m", "immediate", "-w"])

    def recover(self) -> None:
        self.close_etl()
        self.server.start()
        assert self.server.environ()["PGPORT"] == self.env["PGPORT"]

    def terminate_runner(self) -> None:
        with self.connect() as conn:
            conn.execute("select pg_terminate_backend(pid) from pg_stat_activity"
                         " where application_name = %s", (APPLICATION,))

    def wait_for_runner_to_go(self) -> None:
        with self.connect() as conn:
            for _ in range(200):
                if not conn.execute("select count(*) from pg_stat_activity where"
                                    " application_name = %s", (APPLICATION,)).fetchone()[0]:
                    return
                time.sleep(0.05)
        raise AssertionError("the killed runner's backend is still there")


@pytest.fixture(scope="module")
def harness() -> Harness:
    base = Path(tempfile.mkdtemp(prefix="runner-histories-"))
    base.chmod(0o755)
    harness = Harness(base)
    yield harness
    harness.close_etl()
    harness.server.stop()
    shutil.rmtree(base, ignore_errors=True)


def summary(seen: collections.Counter) -> str:
    return ", ".join(f"{count} {what}" for what, count in sorted(seen.items()))


def _killed(label: str) -> str:
    """What a kill at the step labelled `label` left: the commit is durable by then."""
    return "killed after commit" if label == "commit" else "killed"


class Killed(Exception):
    """The runner was stopped at the step the history chose."""


class Histories(RuleBasedStateMachine):
    h: Harness
    # What the run went through, for its summary.
    seen: ClassVar[collections.Counter] = collections.Counter()
    progress: ClassVar[Callable[[str], None] | None] = None

    def load_table(self, shape: str, keys: int, copies: int, seed: int, start: str) -> None:
        """A table of the shape, `keys` natural keys loaded up to `copies` times each; most
        histories start where the documented flow has its swap to do. (The rule that draws
        them is histories_of's.)"""
        shape = next(s for s in histories.SHAPES if s.name == shape)
        self.seen["histories"] += 1
        if self.progress and self.seen["histories"] % 10 == 0:
            self.progress(f"{self.seen['histories']} histories: {summary(self.seen)}")
        self.h.fresh_database()
        self.model = Model(shape)
        with self.h.connect() as conn:
            histories.create(conn, shape)
        histories.initial_rows(self.model, random.Random(seed), self.h.etl(), keys, copies)
        self.catalog_before = self._describe()
        if start == "captured and built":
            self.capture()
            self.build()

    # The ETL.

    def _some_row(self, data) -> tuple:
        tbs = sorted(self.model.live, key=repr)
        tb = tbs[data.draw(st.integers(0, len(tbs) - 1), label="row")]
        return tb, self.model.live[tb]

    def _a_key(self, data) -> dict:
        """A key for a write: new, one the table has (a re-send), or with a NULL."""
        shape = self.model.shape
        keys = histories.keys_of(self.model)
        how = data.draw(st.sampled_from(["new", "existing", "null"]), label="key")
        if how == "existing" and keys:
            chosen = keys[data.draw(st.integers(0, len(keys) - 1), label="which key")]
            return dict(zip(shape.key_columns, chosen, strict=True))
        key = {c: self.model.fresh_key(shape.column(c)) for c in shape.key_columns}
        if how == "null" and shape.nullable_key:
            nulled = shape.nullable_key[:data.draw(st.integers(1, len(shape.nullable_key)),
                                                    label="NULLs")]
            key.update(dict.fromkeys(nulled, None))
        return key

    def _write(self, data) -> None:
        """One write of the ETL, as it makes them, on the live table and on the model."""
        model, conn = self.model, self.h.etl()
        kind = data.draw(st.sampled_from(["insert", "insert", "update", "re-key", "delete"]),
                         label="write")
        if kind == "insert" or not model.live:
            row = histories.new_row(model, self._a_key(data), "sent")
            stored = histories.insert(conn, model, row)
            expected = model.insert_takes(row)
            assert (stored is not None) == expected, (
                f"insert of {row}: {'skipped' if stored is None else 'taken'}, the model "
                f"says {'taken' if expected else 'skipped'}")
            if stored is not None:
                model.inserted(histories.as_sent(model.shape, row, stored))
            return
        tb, row = self._some_row(data)
        if kind == "delete":
            histories.delete(conn, model, tb)
            model.deleted(tb)
            return
        changes = {"payload": f"edited at {model.clock}"}
        if kind == "re-key":
            changes.update(self._a_key(data))
        counter = next((c.name for c in model.shape.columns if c.values == "updates"), None)
        new = {**row, **changes, **({counter: row[counter] + 1} if counter else {})}
        stored = histories.update(conn, model, tb, changes)
        expected = model.update_takes(tb, new)
        assert (stored is not None) == expected, (
            f"update of {tb} to {changes}: {'refused' if stored is None else 'taken'}, the "
            f"model says {'taken' if expected else 'refused'}")
        if stored is not None:
            model.updated(tb, new)

    @rule(writes=st.integers(1, 6), data=st.data())
    def etl_writes(self, writes: int, data) -> None:
        for _ in range(writes):
            self.seen["writes"] += 1
            self._write(data)

    # The runner.

    def _targets(self):
        return select_targets(load_targets(self.h.target), [self.model.shape.table])

    def _connect(self) -> psycopg.Connection:
        conn = self.h.connect()
        conn.execute("set search_path = pg_catalog")
        conn.execute("select set_config('application_name', %s, false)", (APPLICATION,))
        return conn

    @precondition(lambda self: not self.model.constrained)
    @rule(before=st.integers(0, 4), after=st.integers(0, 4), kill=st.sampled_from(KILLS),
          at=st.integers(1, 40), writes=st.integers(0, 3), hold=st.integers(0, 2),
          data=st.data())
    def job(self, before: int, after: int, kill, at, writes, hold, data) -> None:
        """The documented flow, the ETL writing throughout: capture, build, swap."""
        self.capture()
        self.etl_writes(before, data) if before else None
        self.build()
        self.etl_writes(after, data) if after else None
        self.swap(kill, at, writes, hold, data)

    @rule(kill=st.sampled_from(KILLS), at=st.integers(1, 12))
    def capture(self, kill: str | None = None, at: int = 0) -> None:
        """runner capture, maybe killed at one of its statements or right after its commit:
        captured wholly or not at all, and a rerun finishes."""
        result = self._run("capture", kill, at, 0, 0, None)
        if result.startswith("killed"):
            self.seen[f"capture {result} ({kill})"] += 1
            if result == "killed after commit":
                self.model.capture_started()
            self.database_is_the_model()
            result = self._run("capture", None, 0, 0, 0, None)
        assert result == "capture", f"runner capture: {result}"
        self.model.capture_started()

    @rule(during=st.sampled_from(DURING_BUILD), writes=st.integers(1, 3), data=st.data())
    def build(self, during: str | None = None, writes: int = 0, data=None) -> None:
        """dbt build; the ETL may write once it has built the key groups (what it saw of the
        table, for the model), or once it has built the kept rows, before their tests."""
        name = self.model.shape.name
        after = {"key groups": f"model.histories.int_{name}_grouped_by_key",
                 "kept rows": f"model.histories.{name}"}.get(during)
        # dbt calls back on its worker thread, where nothing may be drawn: it waits there
        # while this thread writes.
        reached, resume, outcome = threading.Event(), threading.Event(), []

        def pause_meanwhile(event) -> None:
            if (after and not reached.is_set() and event.info.name == "NodeFinished"
                    and event.data.node_info.unique_id == after):
                reached.set()
                resume.wait(timeout=300)

        building = threading.Thread(target=lambda: outcome.append(self.h.dbt(
            "build", "--select", f"source:harness.{name}+", callbacks=[pause_meanwhile])))
        building.start()
        while building.is_alive() and not reached.wait(timeout=0.05):
            pass
        seen = reached.is_set()
        try:
            if seen:
                self.model.built()
                for _ in range(writes):
                    self._write(data)
        finally:
            resume.set()
            building.join()
        result = outcome[0]
        assert result.success, result.exception or [
            (r.node.name, r.status, r.message) for r in result.result.results
            if r.status not in ("success", "pass")]
        if seen:
            self.seen[f"writes during the build, after the {during}"] += 1
        else:
            self.model.built()

    def _hook(self, kill: str | None, at: int, writes: int, hold: int, holder, data):
        """The runner's step callback: the ETL writes at the steps before the lock, the held
        lock goes after `hold` failed tries, and the runner is killed at step `at`."""
        state = {"steps": 0, "writes": writes, "timeouts": 0, "locked": False}

        def step_done(label: str) -> None:
            state["steps"] += 1
            if label == "lock":
                state["locked"] = True
            if label == "lock try timed out":
                state["timeouts"] += 1
                if holder is not None and state["timeouts"] >= hold:
                    holder.execute("rollback")
            if not state["locked"] and state["writes"] > 0:
                state["writes"] -= 1
                self._write(data)
            if kill is not None and state["steps"] == at:
                if kill == "crash":
                    self.h.crash()
                else:
                    self.h.terminate_runner()
                raise Killed(label)

        return step_done

    def _run(self, command: str, kill: str | None, at: int, writes: int, hold: int,
             data) -> str:
        """Run capture, swap or rollback with what the history chose; returns what it did
        (capture; swap, constraint, nothing; restore, constraint), refused, or killed."""
        table = self.model.shape.table
        if kill == "sigkill":
            env = {**os.environ, **self.h.env, "PGAPPNAME": APPLICATION}
            finished = subprocess.run(
                [sys.executable, str(Path(__file__).with_name("history_kill.py")), command,
                 str(self.h.target), table, str(at)],
                env=env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
            if finished.returncode == -9:
                self.h.wait_for_runner_to_go()
                return _killed(finished.stderr.splitlines()[-1])
            assert finished.returncode in (0, 1), finished.stderr
            return finished.stdout.strip() if finished.returncode == 0 else "refused"
        holder = None
        if hold:
            holder = self.h.connect()
            holder.execute("begin")
            holder.execute(sql.SQL("lock table {} in access share mode").format(
                histories.table_id(self.model.shape)))
        hook = self._hook(kill, at, writes, hold, holder, data)
        try:
            with self._connect() as conn:
                if command == "capture":
                    planned = "capture"
                    capturing.start(conn, self._targets(),
                                    locking.LockOptions(swap_log.DEFAULT_ARCHIVE_SCHEMA,
                                                        LOCK_TIMEOUT_MS), step_done=hook)
                elif command == "swap":
                    options = swap.SwapOptions(self.h.target, select=[table],
                                               lock_timeout_ms=LOCK_TIMEOUT_MS, lock_wait_s=30)
                    plans = swap.make_plans(conn, options)
                    planned = plans[0].action
                    swap.execute(conn, plans, options, after_step=hook)
                else:
                    options = rollback.RollbackOptions(select=[table],
                                                       lock_timeout_ms=LOCK_TIMEOUT_MS,
                                                       lock_wait_s=30)
                    plans = rollback.make_plans(conn, options)
                    planned = histories.rollback_action(plans[0])
                    rollback.execute(conn, plans, options, after_step=hook)
            return planned
        except RunnerError:
            return "refused"
        except (Killed, psycopg.OperationalError) as error:
            if kill == "crash":
                self.h.recover()
            else:
                self.h.wait_for_runner_to_go()
            return _killed(error.args[0] if isinstance(error, Killed) else "")
        finally:
            if holder is not None:
                holder.close()

    def _command(self, command: str, kill, at, writes, hold, data) -> None:
        model = self.model
        outcome = model.swap_outcome() if command == "swap" else model.rollback_outcome()
        working = outcome in ("swap", "restore")
        result = self._run(command, kill, at, writes if working else 0,
                           hold if working and kill != "sigkill" else 0, data)
        self.seen[f"{command} {outcome}"] += 1
        if result == "killed after commit":
            # Wholly after, but for the foreign keys it adds NOT VALID and checks after its
            # commit: the next run checks them.
            self.seen[f"{command} killed after commit ({kill})"] += 1
            model.swapped(outcome) if command == "swap" else model.rolled_back(outcome)
            outcome = model.swap_outcome() if command == "swap" else model.rollback_outcome()
            if command == "rollback" and outcome == "refused" and working and (
                    "parent" in model.shape.extras):
                outcome = "finish"
            result = self._run(command, None, 0, 0, 0, data)
            assert result == outcome, f"runner {command}: {result}, the model says {outcome}"
            return
        if result == "killed":
            self.seen[f"{command} killed ({kill})"] += 1
            # Wholly before (but for the indexes a swap builds outside any transaction, which
            # the next run uses or drops): check it, then run it again. In place, each batch
            # commits: every row is live or archived, once.
            if outcome == "in_place":
                self.every_row_live_or_removed()
            else:
                self.database_is_the_model(built_indexes_allowed=True)
            outcome = model.swap_outcome() if command == "swap" else model.rollback_outcome()
            result = self._run(command, None, 0, 0, 0, data)
        assert result == outcome, f"runner {command}: {result}, the model says {outcome}"
        if command == "swap":
            model.swapped(outcome)
        else:
            model.rolled_back(outcome)

    @precondition(lambda self: self.model.build is not None)
    @rule(kill=st.sampled_from(KILLS), at=st.integers(1, 40), writes=st.integers(0, 3),
          hold=st.integers(0, 2), data=st.data())
    def swap(self, kill, at, writes, hold, data) -> None:
        self._command("swap", kill, at, writes, hold, data)

    @precondition(lambda self: bool(self.model.swaps))
    @rule(kill=st.sampled_from(KILLS), at=st.integers(1, 40), writes=st.integers(0, 3),
          hold=st.integers(0, 2), data=st.data())
    def rollback(self, kill, at, writes, hold, data) -> None:
        self._command("rollback", kill, at, writes, hold, data)

    @precondition(lambda self: self.model.capture_stop_outcome() == "stop")
    @rule()
    def stop_capture(self) -> None:
        expected = self.model.capture_stop_outcome()
        try:
            with self._connect() as conn:
                capturing.stop(conn, [self.model.shape.table],
                               locking.LockOptions(swap_log.DEFAULT_ARCHIVE_SCHEMA,
                                                   LOCK_TIMEOUT_MS))
            result = "stop"
        except RunnerError:
            result = "refused"
        assert result == expected, f"runner capture --stop: {result}, the model says {expected}"
        if result == "stop":
            self.model.capture_stopped()

    @precondition(lambda self: bool(self.model.swaps))
    @rule()
    def clean_up(self) -> None:
        with self._connect() as conn:
            options = locking.LockOptions(swap_log.DEFAULT_ARCHIVE_SCHEMA, LOCK_TIMEOUT_MS)
            items = cleanup.plan_cleanup(conn, options.archive_schema, timedelta(0))
            if items:
                cleanup.execute(conn, items, options)
        self.model.cleaned_up()

    # What must hold after every step.

    def _describe(self) -> dict:
        """The live table's catalog, but for the views dbt's own models are (they come with
        the first build)."""
        with self.h.connect() as conn:
            found = description(conn, histories.table_id(self.model.shape).as_string())
        found["views"] = {name: view for name, view in (found["views"] or {}).items()
                          if not name.startswith("dedup_")} or None
        return found

    @invariant()
    def database_is_the_model(self, built_indexes_allowed: bool = False) -> None:
        model, shape = self.model, self.model.shape
        self.seen["checks"] += 1
        with self.h.connect() as conn:
            live = histories.read(conn, shape, histories.table_id(shape))
            assert same_table(model.live, live), f"live table: {difference(model.live, live)}"
            kept = self._kept(conn)
            expected = model.kept()
            assert len(kept) == len(expected), f"{len(kept)} tables kept, {len(expected)} expected"
            for number, (relation, rows) in enumerate(zip(kept, expected, strict=True)):
                found = histories.read(conn, shape, relation)
                assert same_table(rows, found), f"kept table {number}: {difference(rows, found)}"
                self._inert(conn, relation)
            self._captured_as_modelled(conn)
            # A partitioned table's are its partitions'.
            tables = [shape.table] + ([f"{shape.table}_{remainder}" for remainder in (0, 1)]
                                      if "partitioned" in shape.extras else [])
            allowed = [*(f"{table}__{suffix}" for table in tables
                         for suffix in BUILT_OUTSIDE_TRANSACTIONS),
                       *null_key_index_names(shape.table, pending=True)
                       ] if built_indexes_allowed else []
            leftovers = conn.execute(
                "select array_agg(relname order by relname) from pg_class where (relname like"
                " '%%dedup_new%%' or (relkind = 'i' and oid in (select indexrelid from pg_index"
                " where not indisvalid))) and relname <> all(%s)", (allowed,)).fetchone()[0]
            assert leftovers is None, f"left over: {leftovers}"
        catalog = self._describe()
        expected_catalog = self.catalog_before
        for name in allowed:
            catalog["indexes"].pop(name, None)
        if model.constrained:
            name = constraint_name(shape.table)
            assert catalog["constraints"].pop(name).startswith("UNIQUE"), catalog["constraints"]
            assert name in catalog["indexes"].pop(name)
            # The partial unique indexes beside it: before PostgreSQL 15 where NULLs are equal,
            # and an alternative key's on every version.
            for partial in null_key_index_names(shape.table) & set(catalog["indexes"]):
                assert " WHERE " in catalog["indexes"].pop(partial), partial
        assert catalog == expected_catalog

    def every_row_live_or_removed(self) -> None:
        """What an in-place run stopped before its commit leaves: each row the model holds is
        in the live table or in the run's archive, and in only one."""
        shape = self.model.shape
        with self.h.connect() as conn:
            live = histories.read(conn, shape, histories.table_id(shape))
            removing = sql.Identifier("dedup_archive",
                                      pg_name(histories.SCHEMA, shape.table, "removing"))
            removed = histories.read(conn, shape, removing) if conn.execute(
                "select to_regclass(%s)", (removing.as_string(),)).fetchone()[0] else {}
        assert not set(live) & set(removed), "rows both live and removed"
        everywhere = {**live, **removed}
        assert same_table(self.model.live, everywhere), difference(self.model.live, everywhere)

    def _kept(self, conn: psycopg.Connection) -> list[sql.Identifier]:
        exists = conn.execute("select to_regclass('dedup_archive.swap_log')").fetchone()[0]
        if exists is None:
            return []
        rows = conn.execute(
            "select archive_table, rolled_back_table, rolled_back_at is not null and action ="
            " 'swap' from dedup_archive.swap_log where action in ('swap', 'in_place')"
            " and cleaned_at is null order by swapped_at").fetchall()
        return [sql.Identifier("dedup_archive", copy if set_aside else archive)
                for archive, copy, set_aside in rows]

    def _inert(self, conn: psycopg.Connection, relation: sql.Identifier) -> None:
        name = relation.as_string()
        foreign_keys, firing = conn.execute(
            "select (select count(*) from pg_constraint where conrelid = %s::regclass"
            " and contype = 'f'), (select count(*) from pg_trigger where tgrelid = %s::regclass"
            " and not tgisinternal and tgenabled <> 'D')", (name, name)).fetchone()
        assert (foreign_keys, firing) == (0, 0), f"{name}: not inert"

    def _captured_as_modelled(self, conn: psycopg.Connection) -> None:
        model = self.model
        current = model.current
        expected = model.capture is not None or (
            current is not None and current.kind == "swap" and current.capture)
        triggers = conn.execute(
            "select count(*) from pg_trigger where tgname = 'dedup_capture'"
            " and tgrelid = %s::regclass",
            (histories.table_id(model.shape).as_string(),)).fetchone()[0]
        assert triggers == (1 if expected else 0), (
            f"{triggers} capture triggers, the model says {'one' if expected else 'none'}")


def histories_of(shape: str) -> type[Histories]:
    """The state machine, its histories all of one shape: each shape gets its share of them,
    which a draw among all shapes does not promise."""
    class OfShape(Histories):
        @initialize(shape=st.just(shape), keys=st.integers(2, 10), copies=st.integers(1, 5),
                    seed=st.integers(0, 2**32 - 1),
                    start=st.sampled_from(["captured and built", "as the ETL left it"]))
        def load(self, shape: str, keys: int, copies: int, seed: int, start: str) -> None:
            self.load_table(shape, keys, copies, seed, start)

    OfShape.__name__ = f"HistoriesOf_{shape}"
    return OfShape


@pytest.mark.parametrize("shape", [shape.name for shape in histories.SHAPES])
def test_histories(harness: Harness, shape: str, request: pytest.FixtureRequest,
                   capsys: pytest.CaptureFixture) -> None:
    soak = request.config.getoption("--soak")
    Histories.h = harness
    Histories.seen.clear()

    def progress(line: str) -> None:
        # A long run shows how far it got, past pytest's capture, even if it is stopped.
        with capsys.disabled():
            print(line, flush=True)

    Histories.progress = staticmethod(progress) if soak else None
    started = time.monotonic()
    try:
        run_state_machine_as_test(histories_of(shape), settings=settings(
            max_examples=soak or -(-SUITE_HISTORIES // len(histories.SHAPES)),
            stateful_step_count=STEPS, derandomize=not soak, deadline=None, database=None,
            print_blob=True, suppress_health_check=list(HealthCheck)))
    finally:
        say_at_the_end(request.node, f"histories of {shape}", f"histories of {shape} in "
                       f"{time.monotonic() - started:.0f} s: {summary(Histories.seen)}")


def test_the_model_keeps_what_the_keep_rule_says() -> None:
    """The oracle itself, on a case worked out by hand: latest id wins, NULLs equal."""
    shape = histories.SHAPES[0]
    model = Model(shape)
    rows = {1: {"id": 1, "k": 7, "payload": "a", "updates": 0},
            2: {"id": 2, "k": 7, "payload": "b", "updates": 0},
            3: {"id": 3, "k": None, "payload": "c", "updates": 0},
            4: {"id": 4, "k": None, "payload": "d", "updates": 0}}
    model.live = rows
    model.built()
    model.capture = 0
    assert model.swap_outcome() == "swap"
    model.swapped("swap")
    assert sorted(model.live) == [2, 4]
    assert key_of(shape, model.live[4]) == (None,)
    assert model.swaps[0].archive == rows
