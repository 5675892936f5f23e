"""The locks the runner takes, taken one way everywhere.

One runner command changes a database at a time (an advisory lock). Table locks are tried with
a short lock_timeout inside a savepoint and tried again with backoff until a deadline, so that
no session ever queues behind the runner for longer than one try, and nothing is ever killed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import psycopg
from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.errors import RunnerError
from runner.server.catalog import lock_holders

# One runner at a time per database: the key is arbitrary but fixed.
ADVISORY_LOCK_KEY = 4_242_001
FIRST_PAUSE_S = 0.05
LONGEST_PAUSE_S = 1.0


@dataclass(frozen=True)
class LockOptions:
    """Where the runner keeps what it makes, and how it takes locks."""

    archive_schema: str
    lock_timeout_ms: int = 100
    """How long one try waits for a lock: the longest anyone queues behind the runner."""
    lock_wait_s: float = 60.0
    """How long all tries together may take before the runner gives up."""


def lock_timeout(milliseconds: int) -> sql.Composed:
    """How long this transaction waits for any lock before it gives up and tries again."""
    return sql.SQL("set local lock_timeout = {}").format(sql.Literal(f"{milliseconds}ms"))


@contextmanager
def one_runner(conn: psycopg.Connection) -> Iterator[None]:
    """Hold the database's runner lock for the block, or refuse at once if another has it."""
    if not conn.execute("select pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)).fetchone()[0]:
        raise RunnerError("another runner command (capture, swap, rollback or cleanup) is "
                          "changing this database: wait for it to finish, then run again")
    try:
        yield
    except BaseException:
        # The first error is the one to report: after a lost connection the unlock fails too,
        # and the server has released the lock with the session anyway.
        with suppress(psycopg.Error):
            conn.execute("select pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
        raise
    conn.execute("select pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


class Retry(Exception):
    """Raised inside an attempt to give its savepoint back and try again, as a lock timeout
    does: the attempt found work that must be done outside it first."""


def retry_until(conn: psycopg.Connection, attempt: Callable[[], None], *, wait_s: float,
                gave_up: Callable[[int, Exception], str],
                between: Callable[[Exception], None] | None = None) -> int:
    """Run `attempt` in a savepoint until it completes; returns how many tries it took.

    A lock timeout (or a Retry) rolls the savepoint back, which also releases every lock the
    try took; after a pause for a lock (doubling up to a second) `between` runs outside the
    savepoint, then the next try. Past `wait_s` the runner gives up with `gave_up(tries,
    error)` as the message, having changed nothing the savepoint covered.
    """
    deadline = time.monotonic() + wait_s
    pause = FIRST_PAUSE_S
    tries = 0
    while True:
        tries += 1
        try:
            with conn.transaction():
                attempt()
            return tries
        except (psycopg.errors.LockNotAvailable, Retry) as reason:
            if time.monotonic() > deadline:
                raise RunnerError(gave_up(tries, reason)) from reason
            if isinstance(reason, psycopg.errors.LockNotAvailable):
                time.sleep(pause)
                pause = min(pause * 2, LONGEST_PAUSE_S)
            if between is not None:
                between(reason)


def could_not_lock(conn: psycopg.Connection, tables: list[Relation], timeout_ms: int,
                   wait_s: float, doing: str = "",
                   writes_between_tries: Callable[[], int] | None = None
                   ) -> Callable[[int, Exception], str]:
    """The message of a runner that gave up on `tables` (`doing` says what for), naming who
    holds them now; and, when the ETL kept writing between the tries (as many captured writes
    as `writes_between_tries` says), what would help."""
    def message(tries: int, error: Exception) -> str:
        gave_up = (f"could not lock {', '.join(map(str, tables))}{doing} in {tries} tries of "
                   f"{timeout_ms} ms over {wait_s:g} s, nothing was changed")
        writes = writes_between_tries() if writes_between_tries else 0
        if writes:
            return (f"{gave_up}: the ETL kept writing ({writes} captured writes came "
                    f"meanwhile, {writes / tries:.1f} a try; held last by "
                    f"{lock_holders(conn, tables)}): raise --lock-timeout, choose a quieter "
                    "moment, or hold the cut-over with --postpone-cut-over FILE until there "
                    "is one")
        return (f"{gave_up}; held by {lock_holders(conn, tables)}: retry when they finish, or "
                "raise --lock-wait")
    return message

