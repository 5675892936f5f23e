"""Runs a swap plan: gathers the facts, then executes runner.statements.plan's steps in order.

One transaction does everything, so a crash or a kill at any point leaves the database as it
was. Inside it: build the new tables, replay the writes captured since the build until little
is left, then take the lock. The lock is tried with a short lock_timeout inside a savepoint and
retried with backoff, replaying meanwhile, so nobody waits behind the runner for longer than
that timeout. Under the lock only the last few captured writes are replayed, each proven
against its live row, before the renames; anything that would need a scan of a live table
gives the lock back and is done outside it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql

from runner.declaration import artifacts
from runner.declaration.artifacts import Relation
from runner.errors import ConnectionLost, RunnerError
from runner.execution import executor, locking
from runner.execution.executor import ASYNC_COMMIT, NO_JIT, run_batched, run_steps
from runner.execution.locking import lock_timeout
from runner.server import captures, catalog, in_place_runs, privileges, references, swap_log
from runner.statements import capture, repoint
from runner.statements.in_place_repoint import InPlaceRepointing
from runner.statements.plan import (
    BuildCounts,
    Step,
    TablePlan,
    check_columns,
    left_to_validate,
    lock_statement,
    lookup_index,
    parents,
    parents_lock_statement,
    plan_table,
    referencing,
    said_of_deletes,
)


@dataclass(frozen=True)
class SwapOptions:
    target_dir: Path
    select: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    archive_schema: str = swap_log.DEFAULT_ARCHIVE_SCHEMA
    lock_timeout_ms: int = 100
    """How long one attempt waits for the lock: the longest anyone queues behind the runner."""
    lock_wait_s: float = 60.0
    """How long all attempts together may take before the runner gives up."""
    postpone: Path | None = None
    """While this file exists, the swap catches up with the ETL instead of cutting over."""


@dataclass(frozen=True)
class SwapResult:
    plans: list[TablePlan]
    lock_ms: float
    """How long the live tables were held under ACCESS EXCLUSIVE."""
    attempts: int = 0
    replayed: int = 0
    """Captured writes replayed into the new tables."""
    rows: dict[Relation, tuple[int, int]] = field(default_factory=dict)
    """Per table, the rows of the original and of the new table at commit."""
    notes: list[str] = field(default_factory=list)
    """What the commit left to do by hand: foreign keys that could not be validated."""
    repointed: dict[repoint.Repointing | InPlaceRepointing, int] = field(default_factory=dict)
    """Per foreign key that points at a deduplicated table, the rows the run moved."""


def build_counts(conn: psycopg.Connection, target: artifacts.DedupTarget) -> BuildCounts:
    relation = sql.Identifier(target.key_groups.schema, target.key_groups.name)
    try:
        rows, keys, snapshot = conn.execute(sql.SQL(
            "select coalesce(sum(dedup_rows), 0), count(*),"
            " (select dedup_snapshot::text from {} limit 1) from {}").format(relation, relation)
        ).fetchone()
    except psycopg.errors.UndefinedTable as error:
        raise RunnerError(f"{target.key_groups} does not exist: run `dbt build`") from error
    return BuildCounts(int(rows), int(keys), snapshot)


def _check_capture_before_build(conn: psycopg.Connection, plan: TablePlan, xid: int) -> None:
    if plan.counts.snapshot is None:
        return
    seen = conn.execute("select pg_visible_in_snapshot(%s::xid8, %s::pg_snapshot)",
                        (str(xid), plan.counts.snapshot)).fetchone()[0]
    if not seen:
        raise RunnerError(f"the change capture of {plan.target.live} started after dbt read "
                          "it: run `runner capture`, then `dbt build`, then `runner swap`, so "
                          "that no write between the build and the swap is lost")


def _swapped_since_build(conn: psycopg.Connection, archive_schema: str, live: Relation,
                         snapshot: str | None) -> bool:
    """Whether the table's latest swap, still in effect, committed after the build read it."""
    if snapshot is None or not swap_log.exists(conn, archive_schema):
        return False
    row = conn.execute(sql.SQL(
        "select rolled_back_at is null and not pg_visible_in_snapshot(xid, %s::pg_snapshot)"
        " from {} where live_schema = %s and live_table = %s order by swapped_at desc limit 1"
    ).format(sql.Identifier(archive_schema, swap_log.SWAP_LOG)),
        (snapshot, live.schema, live.name)).fetchone()
    return bool(row and row[0])


def make_plans(conn: psycopg.Connection, options: SwapOptions,
               stamp: datetime | None = None) -> list[TablePlan]:
    """Read dbt's artifacts and the catalog, refuse what is wrong, and plan every table."""
    targets = artifacts.select_targets(artifacts.load_targets(options.target_dir), options.select,
                                       options.exclude)
    artifacts.check_build(options.target_dir, targets)
    stamp = stamp or datetime.now(timezone.utc)
    before_swap = {(r.capture.live.schema, r.capture.live.name): r
                   for r in captures.registered_captures(conn, options.archive_schema)
                   if r.capture.since_swap_of is None and r.trigger is not None}
    latest = {entry.live: entry for entry in swap_log.latest_swaps(conn, options.archive_schema)}
    plans = []
    swapped = frozenset(target.live for target in targets)
    for target in targets:
        live = catalog.read_live_table(conn, target.live)
        check_columns(target, live, catalog.relation_columns(conn, target.deduplicated))
        counts = build_counts(conn, target)
        registered = before_swap.get((target.live.schema, target.live.name))
        plan = plan_table(
            target, live, counts, stamp, options.archive_schema,
            registered.capture if registered else None,
            swapped_since_build=_swapped_since_build(conn, options.archive_schema, target.live,
                                                     counts.snapshot),
            server_version=conn.info.server_version,
            rows_moved=bool(registered) and conn.execute(capture.rows_moved(
                target.spec, registered.capture.log)).fetchone()[0], swapped=swapped,
            references_captured=frozenset(
                r.constraint for r in live.references if captures.reference_captured(
                    conn, repoint.ReferenceCapture.of(r, options.archive_schema))),
            kept_rows_copied=not catalog.is_view(conn, target.deduplicated),
            in_place_started=in_place_runs.started(conn, live, target.spec,
                                                   options.archive_schema))
        if plan.action in ("swap", "in_place"):
            _check_capture_before_build(conn, plan, registered.xid)
        if plan.action == "nothing":
            plan.validate = left_to_validate(live, latest.get(target.live))
        plans.append(plan)
    return plans


def archive_schema_steps(archive_schema: str) -> list[Step]:
    """The archive schema and the tables every swap and capture writes to."""
    return [Step("the archive schema, made if there is none", capture.ensure_schema(
                archive_schema)),
            Step("the record of every swap, for the summary, rollback and cleanup",
                 swap_log.table(archive_schema)),
            Step("", swap_log.repointed_column(archive_schema)),
            Step("the registry of change captures", capture.registry_table(archive_schema))]


def _phases(plans: list[TablePlan], options: SwapOptions) -> tuple[list[Step], list[Step],
                                                                     list[Step]]:
    """The statements before the lock, the ones that take it, and the ones under it."""
    active = [p for p in plans if p.cutover or p.concurrent]
    before = [ASYNC_COMMIT, NO_JIT,
              # Every lock, not only the cut-over's: no session may queue behind the runner
              # for longer than one try at any step.
              Step("wait at most this long for each lock, so no session queues behind the "
                   "runner for longer; on timeout, try again",
                   lock_timeout(options.lock_timeout_ms)),
              *archive_schema_steps(options.archive_schema),
              Step("", capture.counts_table())]
    for plan in active:
        before += plan.prepare
    # The parents first: the live tables, which the ETL writes most, are then held from the
    # moment the last lock is had, and the lock measured from then is the whole of their wait.
    locking_steps = [
        Step("wait at most this long for the lock, so no session queues behind the runner for "
             "longer; on timeout, replay and try again",
             lock_timeout(options.lock_timeout_ms)),
        *([Step("the parent tables of the new tables' foreign keys, against writes for the "
                "moment of the cut-over, as the keys are added", parents_lock_statement(active))]
          if parents(active) else []),
        Step("all tables at once", lock_statement(active)),
    ]
    under_lock = [step for plan in active for step in plan.cutover]
    return before, locking_steps, under_lock


def _lock_summary(plans: list[TablePlan], options: SwapOptions) -> list[str]:
    """What the swap will lock, and for how long, before the statements themselves."""
    active = [p for p in plans if p.cutover or p.concurrent]
    _, _, under_lock = _phases(plans, options)
    tables = ", ".join(str(p.target.live) for p in active)
    lines = [
        f"-- swap: {sum(p.action == 'swap' for p in active)} table(s) replaced, "
        f"{sum(p.action == 'in_place' for p in active)} deduplicated in place, "
        f"{sum(p.action == 'constraint' for p in active)} only constrained",
        f"-- locks ACCESS EXCLUSIVE on {tables} at once; each try waits at most "
        f"{options.lock_timeout_ms} ms, so no session queues behind the runner for longer, and "
        f"the tries go on for at most {options.lock_wait_s:g} s",
        f"-- holds it while it replays the writes captured since the last replay and runs "
        f"{len(under_lock)} catalog statements, none of which reads a whole table: "
        "milliseconds, growing with the writes of those last moments only",
    ]
    if referencing(active):
        lines.append(f"-- with them {', '.join(map(str, referencing(active)))}, whose foreign keys "
                     "are added again against the new tables; the rows of theirs that point at "
                     "a removed duplicate are moved to the kept row of its key before the lock, "
                     "and row-locked until the commit")
    if parents(active):
        lines.append(f"-- with it, SHARE ROW EXCLUSIVE on {', '.join(map(str, parents(active)))},"
                     " which holds their writers (not their readers) for the same moments, as "
                     "the new tables get their foreign keys NOT VALID; their rows are checked "
                     "after the commit, which blocks no writer")
    for plan in active:
        if plan.concurrent:
            lines.append(f"-- {plan.target.live}: its unique index is built CONCURRENTLY, "
                         "which never blocks writers")
        if plan.in_place:
            lines.append(f"-- {plan.target.live}: deduplicated in place before the lock, a "
                         "batch of keys per transaction, and its guard dropped once its unique "
                         "index is valid; under the lock the index becomes the constraint")
        elif any(step.statement.as_string().startswith("create") for step in plan.lookup):
            lines.append(f"-- {plan.target.live}: an index on its natural key is built "
                         "CONCURRENTLY first, so that a delete or re-key of the last moments is "
                         "replayed under the lock; the swap drops it there")
    return lines


def _repoint_summary(conn: psycopg.Connection, plan: TablePlan) -> list[str]:
    """How many rows of each referencing table the swap re-points, as the live rows say now."""
    if not plan.repointings:
        return []
    counted = references.reference_counts(conn, plan.target.spec,
                                          catalog.read_live_table(conn, plan.target.live))
    return [f"-- {plan.target.live}: {count.rows_pointing_at_duplicates:,} of the {count.rows:,} "
            f"rows of {count.table} point at a duplicate the swap removes (foreign key "
            f"{count.constraint}) and move to the kept row of its key"
            for count in counted]


def _replay_lines(conn: psycopg.Connection, plan: TablePlan, under_lock: bool) -> list[str]:
    replay = plan.replay
    lines = [f"-- replay the writes captured on {plan.target.live}, a batch at a time, until the "
             "log is empty" + ("; a batch that needs a rescan gives the lock back"
                                if under_lock and not plan.rescan_under_lock else "")]
    lines += [statement.as_string(conn) + ";" for statement in replay.take_batch]
    lines.append("-- a TRUNCATE stops the swap: " + replay.truncated.as_string(conn) + ";")
    lines.append("-- only when this is true: " + replay.needs_rescan.as_string(conn) + ";")
    lines += [statement.as_string(conn) + ";" for statement in [*replay.rescan, *replay.apply]]
    lines += [step.statement.as_string(conn) + ";" for step in _note_changed(plan)]
    check = replay.touched_rows_match if under_lock else replay.touched_rows_settled
    lines.append("-- after each batch, must be true: " + check.as_string(conn) + ";")
    if not under_lock:
        lines.append("-- then must be true: " + replay.all_rows_match.as_string(conn) + ";")
        if plan.repointings:
            lines.append(f"-- once, then after each replay: the rows that point at "
                         f"{plan.target.live} move to the kept rows")
            for step in _repoint_setup(plan):
                lines.append(step.statement.as_string(conn) + ";")
    for step in _moves(plan, under_lock) if plan.repointings else []:
        lines.append(("-- must be true: " if step.check else "")
                     + step.statement.as_string(conn) + ";")
    return lines


def render(conn: psycopg.Connection, plans: list[TablePlan], options: SwapOptions) -> str:
    """The exact SQL `execute` would run, in order, with why each statement is there."""
    lines = [f"-- {plan.target.live}: nothing to do, no duplicates and the natural key is "
             "already enforced" for plan in plans if plan.action == "nothing"]
    if not any(p.cutover or p.concurrent for p in plans):
        return "\n".join(lines)
    lines += _lock_summary(plans, options)
    for plan in plans:
        lines += _repoint_summary(conn, plan)
    for plan in plans:
        if plan.in_place:
            lines += _in_place_lines(conn, plan, options)
        for steps in (plan.concurrent, [] if plan.in_place else plan.lookup):
            for step in _concurrent_steps(steps, options) if steps else []:
                lines += executor.explained(conn, step)
        if plan.in_place:
            lines += ["begin;", *(line for step in _guard_dropped(plan, options)
                                  for line in executor.explained(conn, step)), "commit;"]
    before, locking_steps, under_lock = _phases(plans, options)
    replaying = [plan for plan in plans if plan.replay]
    lines += executor.script(
        conn, before,
        lambda locked: [line for plan in replaying
                        for line in _replay_lines(conn, plan, under_lock=locked)],
        locking_steps, under_lock, [step for plan in plans for step in plan.validate])
    return "\n".join(lines)


class _NeedsRescan(locking.Retry):
    """Under the lock, a captured write needs a scan of a live table: give the lock back."""


def _replay(conn: psycopg.Connection, plan: TablePlan, *, under_lock: bool,
            for_at_most_s: float | None = None, after_batch: list[Step] | None = None) -> int:
    """Replay a table's captured writes into its new table until the log is empty (under the
    lock) or the remaining writes are few, or, outside the lock, `for_at_most_s` has passed
    (the lock tries catch up with the rest); returns how many were replayed. `after_batch`
    runs after each batch is applied."""
    after_batch = after_batch or []
    replay = plan.replay
    replayed = 0
    deadline = None if for_at_most_s is None else time.monotonic() + for_at_most_s
    if under_lock:
        executor.check_few_under_lock(conn.execute(replay.pending).fetchone()[0])
    while conn.execute(replay.anything_pending).fetchone()[0]:
        run_batched(conn, [Step("", statement) for statement in replay.take_batch])
        if conn.execute(replay.taken).fetchone()[0] == 0:
            return replayed
        if conn.execute(replay.truncated).fetchone()[0]:
            raise RunnerError(f"{plan.target.live} was truncated after dbt read it, so the "
                              "build no longer says which rows to keep; nothing was changed: "
                              "run `dbt build` again, then `runner swap`")
        if conn.execute(replay.needs_rescan).fetchone()[0]:
            if under_lock and not plan.rescan_under_lock:
                raise _NeedsRescan
            for statement in replay.rescan:
                conn.execute(statement)
        run_batched(conn, [Step("", statement) for statement in replay.apply])
        run_steps(conn, after_batch)
        replayed += conn.execute("select count(*) from pg_temp.dedup_batch").fetchone()[0]
        if under_lock:
            run_steps(conn, [Step(f"every row the replay touched in {plan.target.live} equals its "
                             "live row", replay.touched_rows_match, check=True)])
            continue
        run_steps(conn, [Step(f"every row the replay touched in {plan.target.live} equals its "
                         "live row, unless a captured write waits to explain it",
                         replay.touched_rows_settled, check=True)])
        if executor.caught_up(conn.execute(replay.pending).fetchone()[0], deadline):
            return replayed
    return replayed


def _repoint_setup(plan: TablePlan) -> list[Step]:
    return [Step(f"the rows of {r.reference.table} that point at rows of {plan.target.live} "
                 "the new table does not keep, queued to move to the kept row of their key",
                 statement)
            for r in plan.repointings for statement in repoint.setup(r)]


def _refuse_to_hold_up(conn: psycopg.Connection) -> None:
    """Between the lock's tries: a session that waits for rows the swap re-pointed (or for the
    kept rows their foreign keys checked) waits until the commit, and the table lock it holds
    meanwhile keeps the swap from it: give up at once rather than hold it up until --lock-wait."""
    waiting = catalog.waiting_for_this_session(conn)
    if waiting:
        raise RunnerError(f"gave up, nothing was changed: {waiting} waits for rows the swap "
                          "re-pointed, or for the kept rows they now point at, and holds a lock "
                          "the swap needs; run `runner swap` again when the ETL pauses, or set "
                          "references: refuse for the table")


def _note_changed(plan: TablePlan) -> list[Step]:
    return [Step(f"{r.reference.shown}: the rows of the batch that the ETL updated, which may "
                 "have left the key of the rows moved to or from them",
                 repoint.note_changed(r, sql.Identifier("pg_temp", "dedup_batch")))
            for r in plan.repointings]


def _moves(plan: TablePlan, under_lock: bool) -> list[Step]:
    """A round of re-pointing for each reference into the table; under the lock, the last."""
    steps = []
    for r in plan.repointings:
        steps += [Step(f"{r.reference.shown}: the rows that point at a row the new table does "
                       "not keep move to the kept row of its key", statement)
                  for statement in repoint.move(r)]
        steps.append(Step(f"{r.reference.shown}: every row that pointed at a row moved in this "
                          "round points at its kept row (a trigger or a policy of "
                          f"{r.reference.table} could have kept one from it)",
                          repoint.all_moved(r), check=True))
        if under_lock:
            steps.append(Step(f"{r.reference.shown}: no row is left pointing at a removed row",
                              repoint.nothing_left(r), check=True))
    return steps


def _move(conn: psycopg.Connection, plan: TablePlan, under_lock: bool,
          options: SwapOptions) -> None:
    """A round of re-pointing, tried again when a row it moves is locked by a writer for
    longer than the lock timeout: the try is undone, and nobody waits behind it meanwhile."""
    locking.retry_until(
        conn, lambda: run_steps(conn, _moves(plan, under_lock)), wait_s=options.lock_wait_s,
        gave_up=lambda tries, error: (
            f"could not re-point the rows that point at {plan.target.live} in {tries} tries "
            f"over {options.lock_wait_s:g} s, nothing was changed: writers kept them locked "
            f"({error.diag.message_primary}); retry when the ETL pauses, or raise --lock-wait"))


def _concurrent_steps(steps: list[Step], options: SwapOptions) -> list[Step]:
    """Statements that cannot run in a transaction, each wait of theirs bounded."""
    return [
        Step("CREATE INDEX CONCURRENTLY waits for every transaction older than it to end: "
             "at most --lock-wait, then it gives up", sql.SQL("set lock_timeout = {}").format(
                 sql.Literal(f"{round(options.lock_wait_s * 1000)}ms"))),
        *steps,
        Step("", sql.SQL("reset lock_timeout")),
    ]


def _drop_built(conn: psycopg.Connection, indexes: list[sql.Identifier],
                options: SwapOptions) -> str:
    """Drops indexes built for this run, waiting for their lock one try at most (DROP INDEX
    CONCURRENTLY would wait for old transactions as their build did); says what is left."""
    try:
        with conn.transaction():
            conn.execute(lock_timeout(options.lock_timeout_ms))
            for index in indexes:
                conn.execute(sql.SQL("drop index if exists {}").format(index))
        return "nothing was changed"
    except psycopg.errors.LockNotAvailable:
        return "its index is left, for the next run to use or drop"


def _in_place_rerun(spec: artifacts.DedupSpec) -> str:
    """What to do when in place meets rows of one key that the unique index refuses."""
    if spec.any_copy:
        return ("keep: any removes only copies equal to the one it keeps, and these differ: "
                "delete the wrong ones, then run `runner swap` again")
    return "the guard archives them as they land: run `runner swap` again"


def _build_concurrently(conn: psycopg.Connection, steps: list[Step],
                        indexes: list[sql.Identifier], what: str, options: SwapOptions,
                        rerun: str | None = None) -> None:
    """An index built without blocking writers. One that meets duplicates or waits too long
    fails, and leaves itself INVALID: dropped again, so that nothing is changed. `rerun`: what
    to do about duplicates written meanwhile, if not a new build."""
    bounded = _concurrent_steps(steps, options)
    try:
        run_steps(conn, bounded)
    except psycopg.errors.UniqueViolation as error:
        run_steps(conn, [bounded[-1]])
        _drop_built(conn, indexes, options)
        detail = (error.diag.message_detail or "").rstrip(".")
        raise RunnerError(f"{what} cannot be built: rows that share a natural key were written "
                          f"since dbt read the table ({detail or 'no detail given'}); "
                          + (rerun or "nothing was changed: run `dbt build` again, then "
                             "`runner swap`")) from error
    except psycopg.errors.LockNotAvailable as error:
        waited_for = catalog.oldest_transactions(conn)
        run_steps(conn, [bounded[-1]])
        left = _drop_built(conn, indexes, options)
        raise RunnerError(f"{what} could not be built within {options.lock_wait_s:g} s: CREATE "
                          f"INDEX CONCURRENTLY waits for every transaction older than it to "
                          f"end, and {waited_for} had not; {left}: retry when it ends, or raise "
                          "--lock-wait") from error


def _rows_at_commit(conn: psycopg.Connection,
                    archive_schema: str) -> dict[Relation, tuple[int, int]]:
    """What this transaction recorded in swap_log: rows before and after, at commit."""
    rows = conn.execute(sql.SQL(
        "select live_schema, live_table, rows_before, rows_after from {}"
        " where xid = pg_current_xact_id()").format(
            sql.Identifier(archive_schema, swap_log.SWAP_LOG))).fetchall()
    return {Relation(schema, table): (before, after) for schema, table, before, after in rows}


def needs(plans: list[TablePlan], options: SwapOptions) -> list[privileges.Need]:
    """What the role must be allowed for every change the plans make."""
    found = []
    for plan in plans:
        live = plan.target.live
        if plan.action == "nothing":
            found += [privileges.act_as_owner(live)] if plan.validate else []
            continue
        found += [privileges.act_as_owner(live), privileges.archive_schema(options.archive_schema)]
        if plan.action == "in_place":
            found += [privileges.act_as_owner(r.reference.table)
                      for r in plan.in_place.repointings]
        if plan.action == "swap":
            found += [privileges.create_in(live.schema), privileges.owner_creates_in(live),
                      privileges.read(plan.target.deduplicated),
                      *(privileges.reference(parent) for parent in plan.parents),
                      *(privileges.act_as_owner(r.reference.table) for r in plan.repointings)]
    return found


def _gave_up(options: SwapOptions, could_not_lock: Callable[[int, Exception], str]
             ) -> Callable[[int, Exception], str]:
    """The message when the cut-over's lock could not be had, or held to no use, in time."""
    def message(tries: int, reason: Exception) -> str:
        if isinstance(reason, _NeedsRescan):
            return (f"gave up after {tries} tries over {options.lock_wait_s:g} s, nothing was "
                    "changed: the ETL began deleting or re-keying kept rows during the swap, "
                    "which without an index on the natural key are replayed only outside the "
                    "lock; run `runner swap` again: having seen them, it first builds one "
                    "without blocking writers")
        return could_not_lock(tries, reason)
    return message


def _gave_up_before(options: SwapOptions, step: Step) -> Callable[[int, Exception], str]:
    """The message when a step before the lock could not get a lock of its own."""
    return lambda tries, error: (
        f"could not get a lock for \"{step.why}\" within {options.lock_wait_s:g} s, "
        f"nothing was changed; {error.diag.message_primary}: retry when the session "
        "holding it finishes, or raise --lock-wait")


def _guard_steps(plan: TablePlan, options: SwapOptions) -> list[Step]:
    """One transaction: the archive, and the guard that resolves each key the ETL writes."""
    work = plan.in_place
    return [Step("wait at most this long for the table's lock, then try again",
                 lock_timeout(options.lock_timeout_ms)),
            *archive_schema_steps(options.archive_schema),
            Step("where the removed rows go, every column as it was", work.archive_table()),
            Step("the guard: after a row lands, its key's rows the keep rule does not keep go "
                 "to the archive", work.guard_function()),
            Step("the capture leaves the run's own deletes out of its log: they are counted from "
                 "the archive", capture.trigger_function(plan.capture)),
            *(Step("on the live table, which needs a moment's SHARE ROW EXCLUSIVE", statement)
              for statement in work.guard_trigger()),
            *(Step(f"{r.reference.shown} points at the table: where its moved rows are "
                   "recorded, and a trigger that points a row the ETL writes at a removed row "
                   "to the kept row of its key instead", statement)
              for r in work.repointings for statement in r.setup())]


def _collect_steps(plan: TablePlan) -> list[Step]:
    return [Step("the keys to visit: dbt's duplicated keys and the keys written since the "
                 "build, numbered in batches", statement)
            for statement in plan.in_place.collect_keys(plan.target.key_groups,
                                                        plan.capture.log, plan.counts.snapshot)]


def _remove_steps(plan: TablePlan, options: SwapOptions) -> list[Step]:
    """One transaction per batch of keys."""
    return [Step("wait at most this long for a row's lock, then try the batch again",
                 lock_timeout(options.lock_timeout_ms)),
            *(Step(why, statement, check)
              for why, statement, check in plan.in_place.remove_batch())]


def _guard_dropped(plan: TablePlan, options: SwapOptions) -> list[Step]:
    """Once the unique index is valid it keeps the key, and the guard goes, before the lock:
    from then on the archive holds what it will hold, and is counted outside the lock."""
    return [Step("wait at most this long for the table's lock, then try again",
                 lock_timeout(options.lock_timeout_ms)),
            *(Step("the unique index keeps the key from now on: the guard goes", statement)
              for statement in plan.in_place.undo_guard())]


def _drop_guard(conn: psycopg.Connection, plan: TablePlan, options: SwapOptions) -> None:
    locking.retry_until(
        conn, lambda: run_steps(conn, _guard_dropped(plan, options)),
        wait_s=options.lock_wait_s,
        gave_up=locking.could_not_lock(conn, _guarded(plan), options.lock_timeout_ms,
                                       options.lock_wait_s, " to drop the guard's trigger"))


def _guarded(plan: TablePlan) -> list[Relation]:
    """The tables that get the in-place run's triggers: the live one, and those whose foreign
    keys point at it."""
    return [plan.target.live, *(r.reference.table for r in plan.in_place.repointings)]


def _in_place_lines(conn: psycopg.Connection, plan: TablePlan,
                    options: SwapOptions) -> list[str]:
    """The in-place steps before the unique index, as --dry-run prints them."""
    def each(steps: list[Step]) -> list[str]:
        return [line for step in steps for line in executor.explained(conn, step)]

    return [f"-- {plan.target.live}: in place, because {plan.why}",
            *([f"-- {plan.target.live}: {said_of_deletes(plan.fired_by_deletes)}"]
              if plan.fired_by_deletes else []),
            *(each(_concurrent_steps(plan.lookup, options)) if plan.lookup else []),
            "begin;", *each(_guard_steps(plan, options)), "commit;",
            "begin;", *each(_collect_steps(plan)), "commit;",
            "-- for each batch = 0, 1, ... while the keys to visit have one:",
            "begin;", *each(_remove_steps(plan, options)), "commit;"]


def _remove_in_place(conn: psycopg.Connection, plan: TablePlan, options: SwapOptions,
                     step_done: Callable[[str], None]) -> None:
    """The in-place steps before the unique index (runner.statements.in_place): each commits on
    its own, and a run stopped anywhere between them is finished by the next."""
    work, live = plan.in_place, plan.target.live
    if plan.lookup:
        _build_concurrently(conn, plan.lookup, plan.lookup_built or [lookup_index(live)],
                            f"the index on the natural key of {live}", options)
        step_done(f"lookup index of {live}")
    locking.retry_until(
        conn, lambda: run_steps(conn, _guard_steps(plan, options)), wait_s=options.lock_wait_s,
        gave_up=locking.could_not_lock(conn, _guarded(plan), options.lock_timeout_ms,
                                       options.lock_wait_s, " for the guard's trigger"))
    step_done(f"guard of {live}")
    with conn.transaction():
        run_steps(conn, _collect_steps(plan))
    batches = conn.execute(work.batches()).fetchone()[0]
    step_done(f"keys of {live}")
    for batch in range(batches):
        def attempt(batch: int = batch) -> None:
            try:
                run_steps(conn, _remove_steps(plan, options), {"batch": batch})
            except psycopg.errors.UniqueViolation as error:
                raise RunnerError(_moved_into_a_duplicate(live, error)) from error
        locking.retry_until(
            conn, attempt, wait_s=options.lock_wait_s,
            gave_up=lambda tries, error: (
                f"could not remove the duplicates of {live} in {tries} tries over "
                f"{options.lock_wait_s:g} s: writers kept their rows locked "
                f"({error.diag.message_primary}); what was removed is in {work.archive} and "
                "the guard keeps the keys written meanwhile: run `runner swap` again"))
        step_done(f"batch {batch + 1} of {batches} of {live}")


def _moved_into_a_duplicate(live: Relation, error: psycopg.errors.UniqueViolation) -> str:
    """A row of a referencing table that, moved to the kept row, would have the key of another
    row of that table: the two are duplicates of their own, which the run does not settle."""
    diag = error.diag
    return (f"the rows that point at duplicates of {live} cannot all move to the kept rows: "
            f"{diag.schema_name}.{diag.table_name} would hold two rows with one key "
            f"({(diag.message_detail or '').rstrip('.')}: {diag.constraint_name}); nothing of "
            f"this batch was changed: deduplicate {diag.schema_name}.{diag.table_name} first, "
            "or delete one of the two, then run `runner swap` again")


@contextlib.contextmanager
def _lookup_indexes(conn: psycopg.Connection, active: list[TablePlan], options: SwapOptions,
                    step_done: Callable[[str], None]) -> Iterator[None]:
    """The swap's own indexes on natural keys, for the cut-over it wraps: the commit drops
    them; a swap that gives up drops them too, and a lost connection leaves them to the next
    run, which uses them."""
    built = []
    try:
        for plan in active:
            if plan.lookup:
                built.append(lookup_index(plan.target.live))
                _build_concurrently(conn, plan.lookup, [built[-1]],
                                    f"the index on the natural key of {plan.target.live}",
                                    options)
                step_done(f"lookup index of {plan.target.live}")
        yield
    except Exception as error:
        if conn.broken or isinstance(error, ConnectionLost):
            raise
        left = [_drop_built(conn, [index], options) for index in built]
        if isinstance(error, RunnerError) and left != ["nothing was changed"] * len(left):
            raise RunnerError(f"{error}; its index on the natural key is left, for the next "
                              "run to use") from error
        raise


def execute(conn: psycopg.Connection, plans: list[TablePlan], options: SwapOptions,
            after_step: Callable[[str], None] | None = None) -> SwapResult:
    """Swap every planned table in one transaction; any failed check rolls all of them back.

    `after_step` is called with a label after each step, and after each lock try that timed
    out, for progress and for tests that interrupt the runner or write meanwhile.
    """
    privileges.check(conn, "runner swap", needs(plans, options))
    active = [p for p in plans if p.cutover or p.concurrent]
    validate = [step for plan in plans for step in plan.validate]
    if not active:
        with locking.one_runner(conn):
            return SwapResult(plans, 0.0, notes=executor.validate_after_commit(
                conn, validate, options.lock_timeout_ms, options.lock_wait_s))
    step_done = after_step or (lambda label: None)
    replaying = [p for p in active if p.replay]
    replayed = 0
    rows: dict[Relation, tuple[int, int]] = {}
    before, locking_steps, under_lock = _phases(plans, options)

    repointing: set[Relation] = set()

    def replay(plan: TablePlan, under_lock: bool) -> None:
        nonlocal replayed
        replayed += _replay(conn, plan, under_lock=under_lock,
                            for_at_most_s=None if under_lock else options.lock_wait_s,
                            after_batch=_note_changed(plan) if plan.target.live in repointing
                            else [])
        if plan.target.live in repointing:
            _move(conn, plan, under_lock, options)

    def replay_all(under_lock: bool = False) -> None:
        for plan in replaying:
            replay(plan, under_lock)

    def prepare(plan: TablePlan) -> None:
        replay(plan, under_lock=False)
        run_steps(conn, [Step(f"every kept row of {plan.target.live} equals its live row, "
                              "unless a captured write waits to explain it",
                              plan.replay.all_rows_match, check=True)])
        if plan.repointings:
            run_steps(conn, _repoint_setup(plan))
            repointing.add(plan.target.live)
            _move(conn, plan, under_lock=False, options=options)

    def cut_over() -> None:
        replay_all(under_lock=True)
        run_batched(conn, under_lock)
        rows.update(_rows_at_commit(conn, options.archive_schema))

    replayed_between_tries = 0

    def replay_between_tries() -> None:
        nonlocal replayed_between_tries
        if any(p.repointings for p in active):
            _refuse_to_hold_up(conn)
        already = replayed
        replay_all()
        replayed_between_tries += replayed - already

    could_not_lock = locking.could_not_lock(
        conn, [*(p.target.live for p in active), *referencing(active), *parents(active),
               *(view for p in active for view in p.materialized_views)], options.lock_timeout_ms,
        options.lock_wait_s, writes_between_tries=lambda: replayed_between_tries)

    with locking.one_runner(conn):
        for plan in active:
            if plan.in_place:
                _remove_in_place(conn, plan, options, step_done)
        for plan in active:
            if plan.concurrent:
                _build_concurrently(
                    conn, plan.concurrent, plan.built_concurrently,
                    f"the unique index of {plan.target.live}", options,
                    rerun=_in_place_rerun(plan.target.spec) if plan.in_place else None)
                step_done(f"concurrent index of {plan.target.live}")
            if plan.in_place:
                _drop_guard(conn, plan, options)
                step_done(f"guard dropped of {plan.target.live}")
        with _lookup_indexes(conn, [p for p in active if not p.in_place], options, step_done):
            result = executor.cut_over(conn, executor.CutOver(
                command="swap", before=before,
                prepare=[(f"replay before the lock of {plan.target.live}",
                          lambda plan=plan: prepare(plan)) for plan in replaying],
                catch_up=replay_all, between_tries=replay_between_tries,
                take_lock=locking_steps, under_lock=cut_over,
                lock_wait_s=options.lock_wait_s, gave_up=_gave_up(options, could_not_lock),
                gave_up_before=lambda step: _gave_up_before(options, step),
                validate=validate, lock_timeout_ms=options.lock_timeout_ms,
                postpone=options.postpone), step_done)
    repointed = [*(r for plan in active for r in plan.repointings),
                 *(r.at(plan.archive) for plan in active if plan.in_place
                   for r in plan.in_place.repointings)]
    moved = {r: conn.execute(repoint.moved_rows(r.record)).fetchone()[0] for r in repointed}
    return SwapResult(plans, result.lock_ms, result.attempts, replayed, rows, result.notes,
                      moved)
