"""`runner capture`: start, show and stop change captures, against the database.

Starting captures every chosen table or none: one transaction locks them all at once, with the
short lock_timeout of every runner lock, and installs each table's capture
(runner.statements.capture).
Stopping removes every trigger, function and log table a capture made, and the registry and
archive schema too once nothing else is in them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from runner.declaration import select
from runner.declaration.artifacts import DedupTarget, Relation
from runner.errors import RunnerError
from runner.execution import executor
from runner.execution.locking import LockOptions
from runner.server import catalog, privileges, swap_log
from runner.server.captures import Registered, reference_captured, registered_captures
from runner.statements import capture, repoint
from runner.statements.plan import (
    check_spec_columns,
    lookup_index,
    refuse_partitioned,
    refuse_unsupported,
)

# What shows, after a lost connection, whether a capture was started or stopped.
STATUS = "`runner capture --status`"


@dataclass(frozen=True)
class Started:
    started: list[Relation]
    already: list[Registered]
    """Tables whose capture was in place already: before a swap, or since one."""


def start(conn: psycopg.Connection, targets: list[DedupTarget], options: LockOptions,
          step_done: Callable[[str], None] | None = None) -> Started:
    """Capture the writes to every target's live table, or to none: every table is checked
    first, then all are captured in one transaction. `step_done` is called after each
    statement, for tests that interrupt the runner."""
    lives = {}
    for target in targets:
        lives[target.live] = catalog.read_live_table(conn, target.live)
        check_spec_columns(target, lives[target.live])
        if lives[target.live].enforcing_index(target.spec) is None:
            refuse_partitioned(target.spec, lives[target.live], conn.info.server_version)
            # Before the build no strategy is chosen yet: only what none handles stops it.
            refuse_unsupported(lives[target.live], in_place=target.spec.strategy != "swap")
    in_place = {r.capture.live: r for r in registered_captures(conn, options.archive_schema)
                if r.trigger is not None and r.log_exists}
    to_start = [t.live for t in targets if t.live not in in_place]
    already = [in_place[t.live] for t in targets if t.live in in_place]
    # The values the ETL writes into the foreign keys that point at a table that may be
    # swapped, for the swap to re-point those that name a row it removes (in place, the rows
    # move as the duplicates leave, and need no log).
    uncaptured_references = [
        c for t in targets if t.spec.references == "repoint" and t.spec.strategy != "in_place"
        and (t.live in to_start or in_place[t.live].capture.since_swap_of is None)
        for c in (repoint.ReferenceCapture.of(r, options.archive_schema)
                  for r in lives[t.live].references)
        if not reference_captured(conn, c)]
    if not to_start and not uncaptured_references:
        return Started([], already)
    referencing = [c.reference.table for c in uncaptured_references]
    locked = list(dict.fromkeys([*to_start, *referencing]))
    privileges.check(conn, "runner capture", [
        privileges.archive_schema(options.archive_schema),
        *(privileges.act_as_owner(table) for table in locked)])
    statements = [capture.ensure_schema(options.archive_schema),
                  capture.registry_table(options.archive_schema),
                  # All at once, so the runner never holds one while it queues for others.
                  sql.SQL("lock table {} in share row exclusive mode").format(
                      sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in locked))]
    for live in to_start:
        statements += capture.install(capture.Capture.before_swap(live, options.archive_schema))
    for reference_capture in uncaptured_references:
        statements += repoint.capture_install(reference_capture)
    executor.run_alone(conn, "capture", statements, options, locked,
                       doing=" to start their change capture", status=STATUS, step_done=step_done)
    return Started(to_start, already)


@dataclass(frozen=True)
class CaptureStatus:
    registered: Registered
    swapped_at: datetime | None
    """For a capture since a swap: when that swap was."""
    changes: int | None
    """Changes waiting in its log; None when the log is gone."""
    log_bytes: int | None
    references: tuple[str, ...] = ()
    """The foreign keys that point at the table whose written values are captured with it, for
    the swap to re-point them."""

    @property
    def state(self) -> str:
        r = self.registered
        if not r.live_exists:
            return f"broken: {r.capture.live} does not exist any more"
        if r.trigger is None:
            return "broken: its trigger is missing, writes are not captured"
        if not r.log_exists:
            return f"broken: its log {r.capture.log} is missing"
        if r.trigger == "D":
            return "broken: its trigger is disabled, writes are not captured"
        return "capturing"

    def as_row(self) -> dict:
        r = self.registered
        since = ("before the swap" if r.capture.since_swap_of is None
                 else f"since the swap at {swap_log.when(self.swapped_at)}"
                 if self.swapped_at else f"since the swap into {r.capture.since_swap_of}")
        return {"table": str(r.capture.live), "phase": since,
                "started": swap_log.when(r.started_at), "state": self.state,
                "changes": self.changes, "log_bytes": self.log_bytes,
                "log": str(r.capture.log), "references": ", ".join(self.references) or None}


def status(conn: psycopg.Connection, archive_schema: str) -> list[CaptureStatus]:
    swaps = {e.archive_table: e.swapped_at for e in swap_log.read(conn, archive_schema)
             if e.archive_table}
    found = []
    for registered in registered_captures(conn, archive_schema):
        log = registered.capture.log
        changes = log_bytes = None
        if registered.log_exists:
            changes, log_bytes = conn.execute(sql.SQL(
                "select count(*), pg_total_relation_size({}::regclass) from {}").format(
                    sql.Literal(sql.Identifier(log.schema, log.name).as_string()),
                    sql.Identifier(log.schema, log.name))).fetchone()
        references = tuple(
            c.reference.shown for c in _reference_captures_in_place(
                conn, registered.capture.live, archive_schema)
        ) if registered.live_exists else ()
        found.append(CaptureStatus(registered,
                                   swaps.get(registered.capture.since_swap_of), changes,
                                   log_bytes, references))
    return found


def _chosen(found: list[Registered], names: list[str] | None,
            archive_schema: str) -> list[Registered]:
    registry = f"{archive_schema}.{capture.REGISTRY}"
    if not found:
        raise RunnerError(f"no change capture to stop: {registry} records none")
    return select.chosen(
        found, names, lambda r: (r.capture.live.name, str(r.capture.live)),
        lambda name, known: f"--select {name}: no change capture of that table in {registry}; "
        f"captured: {', '.join(str(r.capture.live) for r in known)}")


def _reference_captures_in_place(conn: psycopg.Connection, table: Relation,
                             archive_schema: str) -> list[repoint.ReferenceCapture]:
    """The captures of the foreign keys that point at `table` that are in place: with its own
    capture, or left by a swap that gave up."""
    return [c for c in (repoint.ReferenceCapture.of(reference, archive_schema)
                        for reference in catalog.read_live_table(conn, table).references)
            if catalog.exists(conn, c.log)]


def stop(conn: psycopg.Connection, names: list[str] | None,
         options: LockOptions) -> list[CaptureStatus]:
    """Remove the chosen captures entirely, in one transaction; returns what they were."""
    chosen = _chosen(registered_captures(conn, options.archive_schema), names,
                     options.archive_schema)
    before = {s.registered.capture.live: s for s in status(conn, options.archive_schema)}
    privileges.check(conn, "runner capture --stop", [
        privileges.archive_schema(options.archive_schema),
        *(privileges.act_as_owner(r.capture.live) for r in chosen if r.live_exists)])
    statements = []
    for registered in chosen:
        table = registered.capture.live if registered.live_exists else None
        if table is not None:
            # A swap that was killed after building its index on the key left it behind, and
            # one that gave up left the captures of the foreign keys that point at the table.
            statements.append(sql.SQL("drop index if exists {}").format(lookup_index(table)))
            statements += [statement for left in _reference_captures_in_place(
                conn, table, options.archive_schema) for statement in repoint.capture_remove(left)]
        statements += capture.remove(registered.capture, table)
    statements += capture.drop_if_unused(options.archive_schema)
    executor.run_alone(conn, "capture --stop", statements, options,
                       [r.capture.live for r in chosen if r.live_exists],
                       doing=" to stop their change capture", status=STATUS)
    return [before[r.capture.live] for r in chosen]
