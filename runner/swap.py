"""Runs a swap plan: gathers the facts, then executes the statements of runner.plan in order.

One transaction does everything, so a crash or a kill at any point leaves the database as it
was. Inside it: build the new tables, replay the writes captured since the build until little
is left, then take the lock. The lock is tried with a short lock_timeout inside a savepoint and
retried with backoff, replaying meanwhile, so nobody waits behind the runner for longer than
that timeout. Under the lock only the last few captured writes are replayed, each proven
against its live row, before the renames; anything that would need a scan of a live table
gives the lock back and is done outside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql

from runner import artifacts, capture, catalog
from runner.errors import RunnerError
from runner.plan import (
    BuildCounts,
    Step,
    TablePlan,
    check_columns,
    check_spec_columns,
    lock_statement,
    lock_timeout,
    log_entry,
    log_table,
    plan_table,
)

DEFAULT_ARCHIVE_SCHEMA = "dedup_archive"
# One runner at a time per database: the key is arbitrary but fixed.
ADVISORY_LOCK_KEY = 4_242_001
# Replay outside the lock until fewer changes than this wait, so the lock covers only a few.
SMALL_ENOUGH = 200


@dataclass(frozen=True)
class SwapOptions:
    target_dir: Path
    select: list[str] | None = None
    archive_schema: str = DEFAULT_ARCHIVE_SCHEMA
    lock_timeout_ms: int = 100
    """How long one attempt waits for the lock: the longest anyone queues behind the runner."""
    lock_wait_s: float = 60.0
    """How long all attempts together may take before the runner gives up."""


@dataclass(frozen=True)
class SwapResult:
    plans: list[TablePlan]
    lock_ms: float
    """How long the live tables were held under ACCESS EXCLUSIVE."""
    attempts: int = 0
    replayed: int = 0
    """Captured writes replayed into the new tables."""


def build_counts(conn: psycopg.Connection, target: artifacts.DedupTarget) -> BuildCounts:
    relation = sql.Identifier(target.key_groups.schema, target.key_groups.name)
    try:
        rows, keys = conn.execute(
            sql.SQL("select coalesce(sum(dedup_rows), 0), count(*) from {}").format(relation)
        ).fetchone()
    except psycopg.errors.UndefinedTable as error:
        raise RunnerError(f"{target.key_groups} does not exist: run `dbt build`") from error
    return BuildCounts(int(rows), int(keys))


def captures(conn: psycopg.Connection, archive_schema: str) -> dict[tuple[str, str], int]:
    """The transaction id that started each live table's change capture still in place."""
    exists = conn.execute("select to_regclass(format('%%I.%%I', %s::text, %s::text))",
                          (archive_schema, capture.REGISTRY)).fetchone()[0]
    if exists is None:
        return {}
    rows = conn.execute(capture.installed(archive_schema)).fetchall()
    return {(schema, table): xid for schema, table, xid in rows}


def _check_capture_before_build(conn: psycopg.Connection, plan: TablePlan,
                                xid: int | None) -> None:
    live = plan.target.live
    advice = ("run `runner capture`, then `dbt build`, then `runner swap`, so that no write "
              "between the build and the swap is lost")
    if xid is None:
        raise RunnerError(f"{live} has no change capture: {advice}")
    groups = sql.Identifier(plan.target.key_groups.schema, plan.target.key_groups.name)
    seen = conn.execute(
        sql.SQL("select pg_visible_in_snapshot(%s::xid8, dedup_snapshot) from {} limit 1")
        .format(groups), (str(xid),)).fetchone()
    if seen is not None and seen[0] is not True:
        raise RunnerError(f"the change capture of {live} started after dbt read it: {advice}")


def make_plans(conn: psycopg.Connection, options: SwapOptions,
               stamp: datetime | None = None) -> list[TablePlan]:
    """Read dbt's artifacts and the catalog, refuse what is wrong, and plan every table."""
    targets = artifacts.select_targets(artifacts.load_targets(options.target_dir), options.select)
    artifacts.check_build(options.target_dir, targets)
    stamp = stamp or datetime.now(timezone.utc)
    started = captures(conn, options.archive_schema)
    plans = []
    for target in targets:
        live = catalog.read_live_table(conn, target.live)
        check_columns(target, live, catalog.relation_columns(conn, target.deduplicated))
        xid = started.get((target.live.schema, target.live.name))
        plan = plan_table(target, live, build_counts(conn, target), stamp,
                          options.archive_schema, captured_now=xid is not None)
        if plan.action == "swap":
            _check_capture_before_build(conn, plan, xid)
        plans.append(plan)
    return plans


# The locks end when the commit does, and a commit that waits for the disk holds them through a
# flush (here about 10 ms of a 50 ms lock). Committed asynchronously, the swap is visible at
# once and durable a moment later, as any later write's commit flushes it first; the runner
# waits for that flush before it reports, with a commit of its own.
ASYNC_COMMIT = Step("commit without waiting for the disk, so the locks end before the flush; "
                    "the flush is awaited after the commit, before anything is reported",
                    sql.SQL("set local synchronous_commit = off"))
FLUSH = Step("wait for the swap's commit to reach the disk: this transaction's own commit "
             "flushes the log up to it", sql.SQL("select pg_current_xact_id()"))


def _phases(plans: list[TablePlan], options: SwapOptions) -> tuple[list[Step], list[Step],
                                                                     list[Step]]:
    """The statements before the lock, the ones that take it, and the ones under it."""
    active = [p for p in plans if p.cutover or p.concurrent]
    before = [ASYNC_COMMIT,
              Step("record of every swap, for the summary, rollback and cleanup",
                   sql.SQL("create schema if not exists {}").format(
                       sql.Identifier(options.archive_schema))),
              Step("", log_table(options.archive_schema)),
              Step("", capture.registry_table(options.archive_schema))]
    for plan in active:
        before += plan.prepare
    locking = [
        Step("wait at most this long for the lock, so no session queues behind the runner for "
             "longer; on timeout, replay and try again",
             lock_timeout(options.lock_timeout_ms)),
        Step("all tables at once", lock_statement(active)),
    ]
    under_lock = []
    for plan in active:
        under_lock += plan.cutover
        if plan.action != "nothing":
            under_lock.append(Step(f"record the swap of {plan.target.live}",
                                   log_entry(plan, options.archive_schema)))
    return before, locking, under_lock


def _lock_summary(plans: list[TablePlan], options: SwapOptions) -> list[str]:
    """What the swap will lock, and for how long, before the statements themselves."""
    active = [p for p in plans if p.cutover or p.concurrent]
    _, _, under_lock = _phases(plans, options)
    tables = ", ".join(str(p.target.live) for p in active)
    lines = [
        f"-- swap: {sum(p.action == 'swap' for p in active)} table(s) replaced, "
        f"{sum(p.action == 'constraint' for p in active)} only constrained",
        f"-- locks ACCESS EXCLUSIVE on {tables} at once; each try waits at most "
        f"{options.lock_timeout_ms} ms, so no session queues behind the runner for longer, and "
        f"the tries go on for at most {options.lock_wait_s:g} s",
        f"-- holds it while it replays the writes captured since the last replay and runs "
        f"{len(under_lock)} catalog statements, none of which reads a whole table: "
        "milliseconds, growing with the writes of those last moments only",
    ]
    parents = sorted({parent for p in active for parent in p.parents})
    if parents:
        lines.append(f"-- before that, SHARE ROW EXCLUSIVE for a moment on {', '.join(parents)}"
                     " as the new tables get their foreign keys, with the same timeout")
    for plan in active:
        if plan.concurrent:
            lines.append(f"-- {plan.target.live}: its unique index is built CONCURRENTLY, "
                         "which never blocks writers")
    return lines


def render(conn: psycopg.Connection, plans: list[TablePlan], options: SwapOptions) -> str:
    """The exact SQL `execute` would run, in order, with why each statement is there."""
    lines = []
    for plan in plans:
        if plan.action == "nothing":
            lines.append(f"-- {plan.target.live}: nothing to do, no duplicates and the natural "
                         "key is already enforced")
    if not any(p.cutover or p.concurrent for p in plans):
        return "\n".join(lines)
    lines += _lock_summary(plans, options)

    def add(step: Step) -> None:
        if step.why:
            lines.append(f"-- {step.why}{' (must be true)' if step.check else ''}")
        lines.append(step.statement.as_string(conn) + ";")

    def add_replay(plan: TablePlan, under_lock: bool) -> None:
        replay = plan.replay
        lines.append(f"-- replay the writes captured on {plan.target.live}, a batch at a time, "
                     "until the log is empty" + (
                         "; a batch that needs a rescan gives the lock back" if under_lock
                         else ""))
        for statement in replay.take_batch:
            lines.append(statement.as_string(conn) + ";")
        lines.append("-- only when this is true: " + replay.needs_rescan.as_string(conn) + ";")
        for statement in replay.rescan:
            lines.append(statement.as_string(conn) + ";")
        for statement in replay.apply:
            lines.append(statement.as_string(conn) + ";")
        check = replay.touched_rows_match if under_lock else replay.touched_rows_settled
        lines.append("-- after each batch, must be true: " + check.as_string(conn) + ";")
        if not under_lock:
            lines.append("-- then must be true: " + replay.all_rows_match.as_string(conn) + ";")

    for plan in plans:
        for step in plan.concurrent:
            add(step)
    before, locking, under_lock = _phases(plans, options)
    lines.append("begin;")
    for step in before:
        add(step)
    for plan in plans:
        if plan.replay:
            add_replay(plan, under_lock=False)
    lines.append("-- once more for every table, for the writes made during the checks")
    lines.append("savepoint cutover;")
    for step in locking:
        add(step)
    for plan in plans:
        if plan.replay:
            add_replay(plan, under_lock=True)
    for step in under_lock:
        add(step)
    lines.append("release savepoint cutover;")
    lines.append("commit;")
    add(FLUSH)
    return "\n".join(lines)


def run_steps(conn: psycopg.Connection, steps: list[Step]) -> None:
    for step in steps:
        cursor = conn.execute(step.statement)
        if not step.check:
            continue
        row = cursor.fetchone()
        if not row or row[0] is not True:
            explained = zip(cursor.description[1:], row[1:], strict=True)
            details = ", ".join(f"{column.name}={value}" for column, value in explained)
            raise RunnerError(f"check failed, nothing was changed: {step.why} ({details})")


def _run_retrying(conn: psycopg.Connection, step: Step, deadline: float,
                  options: SwapOptions) -> None:
    """One step in a savepoint of its own, tried again while a lock it needs is held."""
    backoff = 0.05
    while True:
        try:
            with conn.transaction():
                run_steps(conn, [step])
            return
        except psycopg.errors.LockNotAvailable as error:
            if time.monotonic() > deadline:
                raise RunnerError(
                    f"could not get a lock for \"{step.why}\" within {options.lock_wait_s:g} "
                    f"s, nothing was changed; {error.diag.message_primary}: retry when the "
                    "session holding it finishes, or raise --lock-wait") from error
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


def run_batched(conn: psycopg.Connection, steps: list[Step]) -> None:
    """As run_steps, but consecutive statements go to the server as one string: under the lock
    the round trips, not the statements, are most of the time."""
    pending: list[Step] = []

    def flush() -> None:
        if pending:
            conn.execute(sql.SQL(";\n").join(step.statement for step in pending))
            pending.clear()

    for step in steps:
        if step.check:
            flush()
            run_steps(conn, [step])
        else:
            pending.append(step)
    flush()


class _NeedsRescan(Exception):
    """Under the lock, a captured write needs a scan of a live table: give the lock back."""


def _replay(conn: psycopg.Connection, plan: TablePlan, *, under_lock: bool) -> int:
    """Replay a table's captured writes into its new table until the log is empty (under the
    lock) or the remaining writes are few; returns how many were replayed."""
    replay = plan.replay
    replayed = 0
    while conn.execute(replay.anything_pending).fetchone()[0]:
        run_batched(conn, [Step("", statement) for statement in replay.take_batch])
        batch = conn.execute("select count(*) from dedup_batch").fetchone()[0]
        if batch == 0:
            return replayed
        if conn.execute(replay.needs_rescan).fetchone()[0]:
            if under_lock:
                raise _NeedsRescan
            for statement in replay.rescan:
                conn.execute(statement)
        run_batched(conn, [Step("", statement) for statement in replay.apply])
        replayed += batch
        if under_lock:
            run_steps(conn, [Step(f"every row the replay touched in {plan.target.live} equals its "
                             "live row", replay.touched_rows_match, check=True)])
            continue
        run_steps(conn, [Step(f"every row the replay touched in {plan.target.live} equals its "
                         "live row, unless a captured write waits to explain it",
                         replay.touched_rows_settled, check=True)])
        if conn.execute(replay.pending).fetchone()[0] < SMALL_ENOUGH:
            return replayed
    return replayed


def _lock_holders(conn: psycopg.Connection, plans: list[TablePlan]) -> str:
    return lock_holders(conn, [p.target.live for p in plans])


def lock_holders(conn: psycopg.Connection, tables: list[artifacts.Relation]) -> str:
    """Who holds a lock on these tables, for the message of a runner that gives up."""
    names = [f"{table.schema}.{table.name}" for table in tables]
    rows = conn.execute(
        """
        select distinct l.pid, coalesce(a.usename, '?'), coalesce(a.application_name, ''),
               coalesce(a.state, ''), left(coalesce(a.query, ''), 60)
        from pg_locks as l
        join pg_class as c on c.oid = l.relation
        join pg_namespace as n on n.oid = c.relnamespace
        left join pg_stat_activity as a on a.pid = l.pid
        where l.granted and l.pid <> pg_backend_pid()
            and n.nspname || '.' || c.relname = any(%s)
        """,
        (names,),
    ).fetchall()
    return "; ".join(f"pid {pid} ({user} {app} {state}: {query})"
                     for pid, user, app, state, query in rows) or "no holder left by now"


def execute(conn: psycopg.Connection, plans: list[TablePlan], options: SwapOptions,
            after_step: Callable[[str], None] | None = None) -> SwapResult:
    """Swap every planned table in one transaction; any failed check rolls all of them back.

    `after_step` is called with a label after each step, for tests that interrupt the runner.
    """
    active = [p for p in plans if p.cutover or p.concurrent]
    if not active:
        return SwapResult(plans, 0.0)
    step_done = after_step or (lambda label: None)
    if not conn.execute("select pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)).fetchone()[0]:
        raise RunnerError("another runner swap, rollback or cleanup is working on this "
                          "database: wait for it to finish, then run again")
    replaying = [p for p in active if p.replay]
    try:
        for plan in active:
            run_steps(conn, plan.concurrent)
            step_done(f"concurrent index of {plan.target.live}")
        before, locking, under_lock = _phases(plans, options)
        replayed = attempts = 0
        deadline = time.monotonic() + options.lock_wait_s
        with conn.transaction():
            # Every lock, not only the last one: adding a foreign key to a new table locks its
            # parent against writers, and must not make them queue behind the runner either.
            conn.execute(lock_timeout(options.lock_timeout_ms))
            for step in before:
                _run_retrying(conn, step, deadline, options)
                step_done(step.why)
            for plan in replaying:
                replayed += _replay(conn, plan, under_lock=False)
                run_steps(conn, [Step(f"every kept row of {plan.target.live} equals its live row, "
                                 "unless a captured write waits to explain it",
                                 plan.replay.all_rows_match, check=True)])
                step_done(f"replay before the lock of {plan.target.live}")
            # The ETL kept writing while the other tables were checked: what it wrote then is
            # replayed now, not under the lock.
            for plan in replaying:
                replayed += _replay(conn, plan, under_lock=False)
            step_done("catch-up replay before the lock")
            backoff = 0.05
            while True:
                attempts += 1
                try:
                    with conn.transaction():
                        run_steps(conn, locking)
                        locked_at = time.perf_counter()
                        step_done("lock")
                        for plan in replaying:
                            replayed += _replay(conn, plan, under_lock=True)
                        run_batched(conn, under_lock)
                        step_done("cutover")
                    break
                except (psycopg.errors.LockNotAvailable, _NeedsRescan) as reason:
                    if time.monotonic() > deadline:
                        if isinstance(reason, _NeedsRescan):
                            raise RunnerError(
                                f"gave up after {attempts} tries over {options.lock_wait_s:g} "
                                "s, nothing was changed: the ETL keeps deleting or re-keying "
                                "kept rows, which can only be replayed outside the lock; "
                                "pause it briefly, or raise --lock-wait") from reason
                        raise RunnerError(
                            f"could not lock the live tables in {attempts} tries of "
                            f"{options.lock_timeout_ms} ms over {options.lock_wait_s:g} s, "
                            f"nothing was changed; held by {_lock_holders(conn, active)}: "
                            "retry when they finish, or raise --lock-wait") from reason
                    if isinstance(reason, psycopg.errors.LockNotAvailable):
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 1.0)
                    for plan in replaying:
                        replayed += _replay(conn, plan, under_lock=False)
        lock_ms = (time.perf_counter() - locked_at) * 1000
        run_steps(conn, [FLUSH])
        return SwapResult(plans, lock_ms, attempts, replayed)
    except psycopg.errors.LockNotAvailable as error:
        raise RunnerError(f"gave up waiting for a lock, nothing was changed: "
                          f"{error.diag.message_primary}; retry when the session holding it "
                          "finishes") from error
    finally:
        conn.execute("select pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


def start_capture(conn: psycopg.Connection, targets: list[artifacts.DedupTarget],
                  options: SwapOptions) -> list[artifacts.Relation]:
    """Put the change capture on each target's live table; returns those newly captured.

    Each table is its own transaction: creating a trigger needs SHARE ROW EXCLUSIVE, which
    waits for the ETL's writes, so it is tried with the short lock_timeout and retried.
    """
    for target in targets:
        check_spec_columns(target, catalog.read_live_table(conn, target.live))
    already = captures(conn, options.archive_schema)
    started = []
    for target in targets:
        live = target.live
        if (live.schema, live.name) in already:
            continue
        statements = capture.install(capture.Capture.of(live, options.archive_schema))
        deadline = time.monotonic() + options.lock_wait_s
        backoff = 0.05
        while True:
            try:
                with conn.transaction():
                    conn.execute(lock_timeout(options.lock_timeout_ms))
                    for statement in statements:
                        conn.execute(statement)
                break
            except psycopg.errors.LockNotAvailable as error:
                if time.monotonic() > deadline:
                    raise RunnerError(
                        f"could not lock {live} to start its change capture within "
                        f"{options.lock_wait_s:g} s; held by "
                        f"{lock_holders(conn, [live])}: retry when they finish") from error
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        started.append(live)
    return started
