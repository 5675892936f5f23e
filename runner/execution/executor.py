"""The one executor: runs the steps the builders make, and the online cut-over that a swap
and a rollback share.

A cut-over is one transaction in five named phases:
  1. before: statements that need a lock others may hold for a moment, each tried alone;
  2. prepare: each table caught up with what the ETL wrote since, and proven, outside the lock;
  3. catch up: what the ETL wrote during those proofs, once more outside the lock, and again
     every second for as long as the operator postpones the cut-over (a file that exists);
  4. cut over: the lock on every table at once, the last few writes, the catalog changes; a
     try that times out gives every lock back, catches up again and tries again;
  5. commit without waiting for the disk, then wait for the flush before anything reports.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.errors import ConnectionLost, RunnerError
from runner.execution import locking
from runner.statements.plan import Step

# The locks end when the commit does, and a commit that waits for the disk holds them through a
# flush (here about 10 ms of a 50 ms lock). Committed asynchronously, the change is visible at
# once and durable a moment later, as any later write's commit flushes it first; the runner
# waits for that flush before it reports, with a commit of its own.
ASYNC_COMMIT = Step("commit without waiting for the disk, so the locks end before the flush; "
                    "the flush is awaited after the commit, before anything is reported",
                    sql.SQL("set local synchronous_commit = off"))
# The replay's statements touch a few rows by index, but a subplan the planner cannot size
# makes their estimated cost pass jit_above_cost: compiling one of them under the lock took
# 150 ms of a 200 ms lock, to run for less than one.
NO_JIT = Step("no JIT: the statements here run for microseconds, and compiling one took "
              "longer than the whole lock should", sql.SQL("set local jit = off"))
POSTPONED_CATCH_UP_S = 1.0
# Catch up outside the lock until fewer captured writes than this wait, so the lock covers few.
SMALL_ENOUGH = 200
# More than this waiting once the lock is had, and the lock is given back: the ETL wrote
# faster than the catch-up, and carrying it all over under the lock would hold the ETL up.
MOST_UNDER_LOCK = 5 * SMALL_ENOUGH
# A commit flushes the log only if its transaction wrote to it: one that merely took an id
# (pg_current_xact_id()) writes nothing, and its commit waited for nothing. A transactional
# message does write, anyone may emit one, and logical decoding passes it on only to a consumer
# that asks for messages.
FLUSH = Step("wait for the commit to reach the disk: this transaction writes a message to the "
             "log, and its own commit, synchronous whatever the session's default, flushes the "
             "log up to it", sql.SQL("select set_config('synchronous_commit', 'on', true),"
                                     " pg_logical_emit_message(true, 'dedup_runner', 'flush')"))
IDENTIFY = Step("the transaction's id: a runner that loses its connection asks the server by "
                "it whether the change committed", sql.SQL("select pg_current_xact_id()"))


def run_steps(conn: psycopg.Connection, steps: list[Step], params: dict | None = None) -> None:
    for step in steps:
        cursor = conn.execute(step.statement, params)
        if not step.check:
            continue
        row = cursor.fetchone()
        if not row or row[0] is not True:
            explained = zip(cursor.description[1:], row[1:], strict=True)
            details = ", ".join(f"{column.name}={value}" for column, value in explained)
            raise RunnerError(f"check failed, nothing was changed: {step.why} ({details})")


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


class TooMuchToCatchUp(locking.Retry):
    """Under the lock, more captured writes wait than a lock should cover: give it back."""

    def __init__(self, waiting: int) -> None:
        super().__init__(waiting)
        self.waiting = waiting


def check_few_under_lock(waiting: int) -> None:
    """Give the lock back (a retry) when too many captured writes wait to be caught up."""
    if waiting > MOST_UNDER_LOCK:
        raise TooMuchToCatchUp(waiting)


def caught_up(waiting: int, deadline: float | None) -> bool:
    """Outside the lock: few enough writes wait, or the time for catching up has run out and
    the lock tries take over."""
    return waiting < SMALL_ENOUGH or (deadline is not None and time.monotonic() > deadline)


def _too_much_to_catch_up(command: str, wait_s: float, tries: int,
                          reason: TooMuchToCatchUp) -> str:
    return (f"gave up after {tries} tries over {wait_s:g} s, nothing was changed: the ETL "
            f"writes faster than the {command} catches up outside the lock ({reason.waiting} "
            "captured writes waited at the last try); pause it briefly, choose a quieter "
            "moment, or hold the cut-over with --postpone-cut-over FILE until there is one")


@dataclass(frozen=True)
class CutOver:
    """What one command's cut-over runs in each phase (see the module's docstring)."""

    command: str
    """swap or rollback: what the messages call it."""
    before: list[Step]
    prepare: list[tuple[str, Callable[[], None]]]
    """Per table: the label reported once it is done, and the catch-up with its proof."""
    catch_up: Callable[[], None]
    between_tries: Callable[[], None]
    """The catch-up after a lock try that failed."""
    take_lock: list[Step]
    under_lock: Callable[[], None]
    lock_wait_s: float
    gave_up: Callable[[int, Exception], str]
    """The message when the lock could not be had within lock_wait_s."""
    gave_up_before: Callable[[Step], Callable[[int, Exception], str]]
    """The message when a step before the lock could not get its own."""
    validate: list[Step]
    """After the commit: the foreign keys added NOT VALID, each checked on its own."""
    lock_timeout_ms: int
    postpone: Path | None = None
    """While this file exists the cut-over waits, catching up; lock_wait_s counts from then."""


@dataclass(frozen=True)
class CutOverResult:
    lock_ms: float
    attempts: int
    notes: list[str]
    """The foreign keys that could not be validated, with what to do."""


def cut_over(conn: psycopg.Connection, plan: CutOver,
             step_done: Callable[[str], None]) -> CutOverResult:
    """Run a cut-over in one transaction; any failed check or lock given up changes nothing.

    `step_done` is called with a label after each step and after each lock try that failed,
    for progress and for tests that interrupt the runner or write meanwhile."""
    deadline = time.monotonic() + plan.lock_wait_s
    locked_at = 0.0

    def attempt() -> None:
        nonlocal locked_at
        run_steps(conn, plan.take_lock)
        locked_at = time.perf_counter()
        step_done("lock")
        plan.under_lock()
        step_done("cutover")

    def try_failed(reason: Exception) -> None:
        step_done("lock try timed out" if isinstance(reason, psycopg.errors.LockNotAvailable)
                  else "lock given back for a rescan")
        plan.between_tries()
        step_done("caught up between tries")

    with _told_truly(conn, plan.command,
                     done=f"run `runner {plan.command}` again for what follows the commit (its "
                     "foreign keys are checked), then `runner verify`",
                     find_out=f"`runner {plan.command} --dry-run`") as transaction:
        with conn.transaction():
            transaction.identify()
            attempts = _phases(conn, plan, deadline, attempt, try_failed, step_done)
        lock_ms = (time.perf_counter() - locked_at) * 1000
        run_steps(conn, [FLUSH])
        step_done("commit")
        notes = validate_after_commit(conn, plan.validate, plan.lock_timeout_ms,
                                      plan.lock_wait_s)
    return CutOverResult(lock_ms, attempts, notes)


def explained(conn: psycopg.Connection, step: Step) -> list[str]:
    """A step as --dry-run prints it: why it is there, then the statement."""
    why = [f"-- {step.why}{' (must be true)' if step.check else ''}"] if step.why else []
    return [*why, step.statement.as_string(conn) + ";"]


def script(conn: psycopg.Connection, before: list[Step], catch_up: Callable[[bool], list[str]],
           take_lock: list[Step], under_lock: list[Step], validate: list[Step]) -> list[str]:
    """What cut_over runs, in its order, each statement with why it is there: what --dry-run
    prints. `catch_up` gives the lines of the catch-up outside the lock (False) and under it
    (True)."""
    def each(steps: list[Step]) -> list[str]:
        return [line for step in steps for line in explained(conn, step)]

    return [
        "begin;", *explained(conn, IDENTIFY), *each(before), *catch_up(False),
        "-- once more for every table, for the writes made meanwhile, and after each lock try "
        "that timed out",
        "savepoint cutover;", *each(take_lock), *catch_up(True), *each(under_lock),
        "release savepoint cutover;", "commit;", *explained(conn, FLUSH), *each(validate),
    ]


def _phases(conn: psycopg.Connection, plan: CutOver, deadline: float,
            attempt: Callable[[], None], try_failed: Callable[[Exception], None],
            step_done: Callable[[str], None]) -> int:
    """Phases 1 to 4 in the open transaction; returns how many tries the lock took."""
    for step in plan.before:
        locking.retry_until(conn, lambda step=step: run_steps(conn, [step]),
                            wait_s=deadline - time.monotonic(),
                            gave_up=plan.gave_up_before(step))
        step_done(step.why)
    for label, prepare in plan.prepare:
        prepare()
        step_done(label)
    plan.catch_up()
    step_done("catch-up before the lock")
    if plan.postpone is not None and plan.postpone.exists():
        while plan.postpone.exists():
            time.sleep(POSTPONED_CATCH_UP_S)
            plan.catch_up()
            step_done("cut-over postponed")
        deadline = time.monotonic() + plan.lock_wait_s
    def gave_up(tries: int, reason: Exception) -> str:
        if isinstance(reason, TooMuchToCatchUp):
            return _too_much_to_catch_up(plan.command, plan.lock_wait_s, tries, reason)
        return plan.gave_up(tries, reason)

    return locking.retry_until(conn, attempt, wait_s=max(0.0, deadline - time.monotonic()),
                               gave_up=gave_up, between=try_failed)


def _xact_status(conn: psycopg.Connection, xid: str, wait_s: float = 10.0) -> str | None:
    """committed, aborted, in progress, or None (too old to know). A backend that lost its
    client may report the error before it has rolled back: a moment is given for that."""
    deadline = time.monotonic() + wait_s
    while True:
        status = conn.execute("select pg_xact_status(%s::xid8)", (xid,)).fetchone()[0]
        if status != "in progress" or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def run_alone(conn: psycopg.Connection, command: str, statements: list[sql.Composable],
              options: locking.LockOptions, tables: list[Relation], *, doing: str,
              status: str, step_done: Callable[[str], None] | None = None) -> None:
    """`statements` in one transaction, as the only runner, tried until their locks are had:
    all of them, or none. A lost connection is reported as the server recorded it, with
    `status`, the command that shows what was made. `step_done` is called with each
    statement's number once it ran, and with "commit"."""
    step_done = step_done or (lambda label: None)

    def run() -> None:
        conn.execute(locking.lock_timeout(options.lock_timeout_ms))
        for number, statement in enumerate(statements, 1):
            conn.execute(statement)
            step_done(f"statement {number}")

    with (_told_truly(conn, command, done=f"{status} shows it", find_out=status) as transaction,
          locking.one_runner(conn)):
        with conn.transaction():
            transaction.identify()
            locking.retry_until(conn, run, wait_s=options.lock_wait_s,
                                gave_up=locking.could_not_lock(
                                    conn, tables, options.lock_timeout_ms, options.lock_wait_s,
                                    doing))
        step_done("commit")


class _Identified:
    """The transaction a command runs in, once the server has said its id."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.xid: str | None = None

    def identify(self) -> None:
        self.xid = str(self.conn.execute(IDENTIFY.statement).fetchone()[0])


@contextlib.contextmanager
def _told_truly(conn: psycopg.Connection, command: str, *, done: str,
                find_out: str) -> Iterator[_Identified]:
    """A lost connection in the block is reported as the server recorded the transaction
    the block identified: not begun, rolled back, still ending, or committed."""
    transaction = _Identified(conn)
    try:
        yield transaction
    except psycopg.OperationalError as error:
        if not conn.broken:
            raise
        raise _lost(conn.info.dsn, transaction.xid, command, error, done=done,
                    find_out=find_out) from error


def _lost(dsn: str, xid: str | None, command: str, error: psycopg.OperationalError, *,
          done: str, find_out: str) -> ConnectionLost:
    """What a lost connection left, as the server tells it from a connection of its own:
    `done` says what to do once it committed, `find_out` how to see whether it did."""
    said = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if xid is None:
        return ConnectionLost(f"the connection was lost as the {command} began ({said}): "
                              f"nothing was changed; run `runner {command}` again", False)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as asked:
            status = _xact_status(asked, xid)
            if status == "committed":
                run_steps(asked, [FLUSH])
    except psycopg.OperationalError:
        return ConnectionLost(
            f"the connection was lost during the {command} ({said}) and the server does not "
            f"answer: once it is back, {find_out} says whether the {command} was made "
            "(nothing or all of it was: one transaction)", None)
    if status == "committed":
        return ConnectionLost(
            f"the connection was lost after the {command} committed ({said}): it is done; "
            f"{done}", True)
    if status == "in progress":
        return ConnectionLost(
            f"the connection was lost during the {command} ({said}), and its transaction "
            f"{xid} is still ending on the server: wait for it, then {find_out} says whether "
            "it was made", None)
    return ConnectionLost(f"the connection was lost during the {command} ({said}): nothing was "
                          f"changed, its transaction was rolled back; run `runner {command}` "
                          "again", False)


def validate_after_commit(conn: psycopg.Connection, steps: list[Step], lock_timeout_ms: int,
                          lock_wait_s: float) -> list[str]:
    """Validate foreign keys added NOT VALID, each in a transaction of its own that blocks no
    writer; what fails stays NOT VALID, enforced for every new row, and is returned as a note
    of what to do by hand."""
    notes = []
    for step in steps:
        try:
            locking.retry_until(
                conn, lambda step=step: (conn.execute(locking.lock_timeout(lock_timeout_ms)),
                                         conn.execute(step.statement)),
                wait_s=lock_wait_s,
                gave_up=lambda tries, error, step=step: f"could not lock for {step.why}")
        except (RunnerError, psycopg.errors.ForeignKeyViolation) as error:
            said = getattr(getattr(error, "diag", None), "message_detail", None) or str(error)
            notes.append(f"{step.why}: not validated ({said}); it holds for every new row: fix "
                         f"the rows it names, then {step.statement.as_string(conn)}")
    return notes
