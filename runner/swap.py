"""Runs a swap plan: gathers the facts, then executes the statements of runner.plan in order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql

from runner import artifacts, catalog
from runner.errors import RunnerError
from runner.plan import (
    BuildCounts,
    Step,
    TablePlan,
    check_columns,
    lock_statement,
    log_entry,
    log_table,
    plan_table,
)

DEFAULT_ARCHIVE_SCHEMA = "dedup_archive"
# One runner at a time per database: the key is arbitrary but fixed.
ADVISORY_LOCK_KEY = 4_242_001


@dataclass(frozen=True)
class SwapOptions:
    target_dir: Path
    select: list[str] | None = None
    archive_schema: str = DEFAULT_ARCHIVE_SCHEMA
    lock_timeout_ms: int = 5000


@dataclass(frozen=True)
class SwapResult:
    plans: list[TablePlan]
    lock_ms: float
    """How long the live tables were held under ACCESS EXCLUSIVE."""


def build_counts(conn: psycopg.Connection, target: artifacts.DedupTarget) -> BuildCounts:
    relation = sql.Identifier(target.key_groups.schema, target.key_groups.name)
    try:
        rows, keys = conn.execute(
            sql.SQL("select coalesce(sum(dedup_rows), 0), count(*) from {}").format(relation)
        ).fetchone()
    except psycopg.errors.UndefinedTable as error:
        raise RunnerError(f"{target.key_groups} does not exist: run `dbt build`") from error
    return BuildCounts(int(rows), int(keys))


def make_plans(conn: psycopg.Connection, options: SwapOptions,
               stamp: datetime | None = None) -> list[TablePlan]:
    """Read dbt's artifacts and the catalog, refuse what is wrong, and plan every table."""
    targets = artifacts.select_targets(artifacts.load_targets(options.target_dir), options.select)
    artifacts.check_build(options.target_dir, targets)
    stamp = stamp or datetime.now(timezone.utc)
    plans = []
    for target in targets:
        live = catalog.read_live_table(conn, target.live)
        check_columns(target, live, catalog.relation_columns(conn, target.deduplicated))
        plans.append(plan_table(target, live, build_counts(conn, target), stamp,
                                options.archive_schema))
    return plans


def _transaction_phases(plans: list[TablePlan],
                       options: SwapOptions) -> tuple[list[Step], list[Step], list[Step]]:
    """The statements before the lock, the ones that take it, and the ones under it."""
    active = [p for p in plans if p.action != "nothing"]
    before = [Step("record of every swap, for the summary, rollback and cleanup",
                   sql.SQL("create schema if not exists {}").format(
                       sql.Identifier(options.archive_schema))),
              Step("", log_table(options.archive_schema))]
    for plan in active:
        before += plan.prepare
    locking = [
        Step("wait at most this long for each lock, so no session queues behind the runner for "
             "longer", sql.SQL("set local lock_timeout = {}").format(
                 sql.Literal(f"{options.lock_timeout_ms}ms"))),
        Step("all tables at once", lock_statement(active)),
    ]
    under_lock = []
    for plan in active:
        under_lock += plan.cutover
        under_lock.append(Step(f"record the swap of {plan.target.live}",
                               log_entry(plan, options.archive_schema)))
    return before, locking, under_lock


def render(conn: psycopg.Connection, plans: list[TablePlan], options: SwapOptions) -> str:
    """The exact SQL `execute` would run, in order, with why each statement is there."""
    lines = []
    for plan in plans:
        if plan.action == "nothing":
            lines.append(f"-- {plan.target.live}: nothing to do, no duplicates and the natural "
                         "key is already enforced")
    if not any(p.action != "nothing" for p in plans):
        return "\n".join(lines)

    def add(step: Step) -> None:
        if step.why:
            lines.append(f"-- {step.why}{' (must be true)' if step.check else ''}")
        lines.append(step.statement.as_string(conn) + ";")

    for plan in plans:
        for step in plan.concurrent:
            add(step)
    lines.append("begin;")
    for phase in _transaction_phases(plans, options):
        for step in phase:
            add(step)
    lines.append("commit;")
    return "\n".join(lines)


def _run(conn: psycopg.Connection, steps: list[Step]) -> None:
    for step in steps:
        cursor = conn.execute(step.statement)
        if not step.check:
            continue
        row = cursor.fetchone()
        if not row or row[0] is not True:
            explained = zip(cursor.description[1:], row[1:], strict=True)
            details = ", ".join(f"{column.name}={value}" for column, value in explained)
            raise RunnerError(f"check failed, nothing was changed: {step.why} ({details})")


def _lock_holders(conn: psycopg.Connection, plans: list[TablePlan]) -> str:
    names = [f"{p.target.live.schema}.{p.target.live.name}" for p in plans]
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


def execute(conn: psycopg.Connection, plans: list[TablePlan], options: SwapOptions) -> SwapResult:
    """Swap every planned table in one transaction; any failed check rolls all of them back."""
    active = [p for p in plans if p.action != "nothing"]
    if not active:
        return SwapResult(plans, 0.0)
    if not conn.execute("select pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)).fetchone()[0]:
        raise RunnerError("another runner swap is working on this database: wait for it to "
                          "finish, then run again")
    try:
        for plan in active:
            _run(conn, plan.concurrent)
        before, locking, under_lock = _transaction_phases(plans, options)
        try:
            with conn.transaction():
                _run(conn, before)
                _run(conn, locking)
                locked_at = time.perf_counter()
                _run(conn, under_lock)
            lock_ms = (time.perf_counter() - locked_at) * 1000
        except psycopg.errors.LockNotAvailable as error:
            raise RunnerError(
                f"could not lock the live tables within {options.lock_timeout_ms} ms, nothing "
                f"was changed; held by {_lock_holders(conn, active)}: retry when they finish, "
                "or raise --lock-timeout") from error
        return SwapResult(plans, lock_ms)
    finally:
        conn.execute("select pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
