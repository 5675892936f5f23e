"""The rows of other tables that point at a table, counted by whether they point at a duplicate
its keep rule removes: what `runner audit` shows and a swap's plan re-points."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from runner.declaration.artifacts import DedupSpec
from runner.server.catalog import LiveTable, Reference
from runner.statements.keys import count_references


@dataclass(frozen=True)
class ReferenceCount:
    """A foreign key of another table that points at the table, and how many of its rows
    point at a duplicate the keep rule removes."""

    constraint: str
    table: str
    rows: int
    rows_pointing_at_duplicates: int


def reference_counts(conn: psycopg.Connection, spec: DedupSpec,
                     live: LiveTable) -> tuple[ReferenceCount, ...]:
    """Per foreign key that points at the table, its rows that point at a duplicate: one scan
    of the table for all the keys that point at the same columns."""
    by_referenced: dict[tuple[str, ...], list[Reference]] = {}
    for reference in live.references:
        by_referenced.setdefault(reference.referenced, []).append(reference)
    counted = {}
    for referenced, references in by_referenced.items():
        row = conn.execute(count_references(
            live.relation, spec, referenced,
            [(r.table, r.columns) for r in references])).fetchone()
        for number, reference in enumerate(references):
            counted[reference] = ReferenceCount(reference.constraint, str(reference.table),
                                                *row[2 * number:2 * number + 2])
    return tuple(counted[reference] for reference in live.references)
