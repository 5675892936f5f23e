"""Whether an in-place run on a table began and did not finish, as the database shows it."""

from __future__ import annotations

import psycopg

from runner.declaration.artifacts import DedupSpec
from runner.server import catalog
from runner.server.catalog import LiveTable
from runner.statements.in_place import GUARD_TRIGGER, InPlace


def started(conn: psycopg.Connection, live: LiveTable, spec: DedupSpec,
            archive_schema: str) -> bool:
    """Its guard is on the table, or its archive of removed rows is there: only in place
    finishes it, and nothing else may take the rows that archive holds for its own."""
    return (any(trigger.name == GUARD_TRIGGER for trigger in live.triggers)
            or catalog.exists(conn, InPlace.of(live, spec, archive_schema).archive))
