"""`runner cleanup`: drop what swaps and rollbacks kept, once nobody can want it back.

Past the retention age, each swap's archive (or, after a rollback, the deduplicated table it
set aside) is dropped, and the change capture that was there for a rollback ends with it; the
swap's row in swap_log stays, marked cleaned, so that a rollback says why it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import psycopg
from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.errors import RunnerError
from runner.execution import locking
from runner.execution.executor import run_steps
from runner.execution.locking import LockOptions, lock_timeout
from runner.server import catalog, privileges, swap_log
from runner.server.captures import Registered, registered_captures
from runner.server.swap_log import LogEntry, when
from runner.statements import capture
from runner.statements.plan import Step


@dataclass(frozen=True)
class CleanupItem:
    entry: LogEntry
    drop: tuple[Relation, ...]
    """What the swap and its rollback kept, as far as it still exists."""
    capture: Registered | None = None
    """The capture since the swap, there for a rollback that will no longer be possible."""


@dataclass(frozen=True)
class CleanupResult:
    items: list[CleanupItem]
    freed: list[tuple[Relation, int]]
    """Each dropped table with its total size, indexes and TOAST included."""


def kept_by(entry: LogEntry) -> list[Relation]:
    """What a swap left in the archive schema; after a rollback its archive is the live table
    again, and what is kept instead is the deduplicated table. With either go the records of
    the rows it re-pointed."""
    records = [Relation(entry.archive_schema, r.record) for r in entry.repointed]
    if entry.action == "in_place" and entry.archive:
        # The rows the run removed; after a rollback, copies of rows live again.
        return [entry.archive, *records]
    if entry.action != "swap" or not entry.archive:
        return []
    if entry.rolled_back_at is None:
        return [entry.archive, *records]
    if entry.rolled_back_table:
        return [Relation(entry.archive_schema, entry.rolled_back_table), *records]
    return records


def plan_cleanup(conn: psycopg.Connection, archive_schema: str,
                 older_than: timedelta) -> list[CleanupItem]:
    """Every swap older than the age whose leftovers were not cleaned up yet."""
    entries = swap_log.read(conn, archive_schema,
                            " where action in ('swap', 'in_place') and cleaned_at is null"
                            " and swapped_at < now() - %s::interval", (older_than,))
    captures = {r.capture.since_swap_of: r for r in registered_captures(conn, archive_schema)
                if r.capture.since_swap_of}
    return [CleanupItem(entry, tuple(r for r in kept_by(entry) if catalog.exists(conn, r)),
                        captures.get(entry.archive_table)
                        if entry.rolled_back_at is None else None)
            for entry in entries]


def cleanup_steps(items: list[CleanupItem], archive_schema: str) -> list[Step]:
    steps = []
    for item in items:
        entry = item.entry
        if item.capture is not None:
            live = item.capture.capture.live if item.capture.live_exists else None
            steps += [Step(f"the capture of {entry.live} since the swap was for a rollback, "
                           "which its archive's drop rules out: it ends", statement)
                      for statement in capture.remove(item.capture.capture, live)]
        # No cascade: a view someone built on an archive must stop the cleanup, not vanish.
        steps += [Step(f"drop {relation}, kept by the swap of {entry.live} at "
                       f"{when(entry.swapped_at)}",
                       sql.SQL("drop table {}").format(sql.Identifier(relation.schema,
                                                                      relation.name)))
                  for relation in item.drop]
        steps.append(Step("so that a rollback says the archive was cleaned up",
                          swap_log.mark_cleaned(entry, archive_schema)))
    return steps


def _phases(items: list[CleanupItem], options: LockOptions) -> tuple[list[Step], list[Step]]:
    dropped = [r for item in items for r in item.drop]
    # DROP also locks the parents its foreign keys reference, which the ETL writes: the
    # timeout keeps it from making the ETL queue, as for the swap.
    locking_steps = [Step("wait at most this long for each lock, here and in each drop",
                          lock_timeout(options.lock_timeout_ms))]
    if dropped:
        locking_steps.append(Step("the tables to drop, all at once",
                                  sql.SQL("lock table {} in access exclusive mode").format(
                                      sql.SQL(", ").join(sql.Identifier(r.schema, r.name)
                                                         for r in dropped))))
    return locking_steps, cleanup_steps(items, options.archive_schema)


def sizes(relations: list[Relation]) -> sql.Composed:
    return sql.SQL("select array[{}]::bigint[]").format(sql.SQL(", ").join(
        sql.SQL("pg_total_relation_size({}::regclass)").format(
            sql.Literal(sql.Identifier(r.schema, r.name).as_string()))
        for r in relations))


def render(conn: psycopg.Connection, items: list[CleanupItem], options: LockOptions) -> str:
    locking_steps, steps = _phases(items, options)
    lines = ["begin;"]
    for step in [*locking_steps, *steps]:
        if step.why:
            lines.append(f"-- {step.why}")
        lines.append(step.statement.as_string(conn) + ";")
    lines.append("commit;")
    return "\n".join(lines)


def execute(conn: psycopg.Connection, items: list[CleanupItem],
            options: LockOptions) -> CleanupResult:
    """Drop everything the items name and mark their swap_log rows, in one transaction."""
    privileges.check(conn, "runner cleanup", [
        privileges.archive_schema(options.archive_schema),
        *(privileges.act_as_owner(r) for item in items for r in item.drop),
        *(privileges.act_as_owner(item.entry.live) for item in items
          if item.capture and item.capture.live_exists)])
    locking_steps, steps = _phases(items, options)
    dropped = [r for item in items for r in item.drop]
    freed: list[tuple[Relation, int]] = []

    def drop() -> None:
        run_steps(conn, locking_steps)
        freed.clear()
        if dropped:
            freed.extend(zip(dropped, conn.execute(sizes(dropped)).fetchone()[0], strict=True))
        try:
            run_steps(conn, steps)
        except psycopg.errors.DependentObjectsStillExist as error:
            detail = (error.diag.message_detail or "").splitlines()
            raise RunnerError(f"nothing was dropped: {error.diag.message_primary} "
                              f"({'; '.join(detail)}); drop or move those objects first"
                              ) from error

    with locking.one_runner(conn), conn.transaction():
        locking.retry_until(conn, drop, wait_s=options.lock_wait_s,
                            gave_up=locking.could_not_lock(conn, dropped, options.lock_timeout_ms,
                                                           options.lock_wait_s))
    return CleanupResult(items, freed)
