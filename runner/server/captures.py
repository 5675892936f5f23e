"""The registry of change captures in the archive schema, as the server holds it: which capture
watches which table, since when, and whether its trigger and log are still there."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.server import catalog
from runner.statements import capture, repoint


@dataclass(frozen=True)
class Registered:
    """A change capture from the archive schema's registry."""

    capture: capture.Capture
    xid: int
    """The transaction that installed it."""
    started_at: datetime
    trigger: str | None
    """How its trigger is enabled (pg_trigger.tgenabled), or None when it is missing."""
    live_exists: bool
    log_exists: bool


def registered_captures(conn: psycopg.Connection, archive_schema: str) -> list[Registered]:
    """Every capture the registry holds, whatever its state."""
    if not catalog.exists(conn, Relation(archive_schema, capture.REGISTRY)):
        return []
    return [Registered(capture.Capture(Relation(schema, table), Relation(archive_schema, log),
                                       Relation(archive_schema, function), since_swap_of),
                       int(xid), started_at, trigger, live_exists, log_exists)
            for (schema, table, log, function, since_swap_of, xid, started_at, live_exists,
                 trigger, log_exists) in conn.execute(capture.registered(archive_schema))]


def reference_captured(conn: psycopg.Connection, c: repoint.ReferenceCapture) -> bool:
    """Whether the values written into a foreign key are logged: its trigger fires and its log
    is there."""
    return conn.execute(
        "select to_regclass(%s) is not null and exists (select from pg_trigger"
        " where tgrelid = %s::regclass and tgname = %s and tgenabled <> 'D')",
        (sql.Identifier(c.log.schema, c.log.name).as_string(),
         sql.Identifier(c.reference.table.schema, c.reference.table.name).as_string(),
         c.trigger)).fetchone()[0]
