"""`runner plan` before `runner capture` and `dbt build`: what the swap would do to each table,
from the catalog, the YAML and the audit's one scan of it, without any artifact of a build.

Per table: whether it would be swapped, only constrained, or left alone; what the cut-over
would lock; what the build would write; the rows of other tables it would re-point; what it
would refuse, in the words the swap would refuse it with; and the scan the audit measured,
which the build's key groups repeat over the narrow key columns. Reads only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg

from runner.declaration.artifacts import DedupTarget, Relation
from runner.errors import RunnerError
from runner.facts import audit
from runner.server import catalog, in_place_runs, swap_log
from runner.server.references import ReferenceCount
from runner.statements.plan import (
    BuildCounts,
    choose_strategy,
    fired_by_deletes,
    refuse_partitioned,
    refuse_references,
    refuse_unsupported,
)


@dataclass(frozen=True)
class Preview:
    target: DedupTarget
    audited: audit.TableAudit
    scan_seconds: float
    """How long the audit's scan of it took: the build's key groups read as much."""
    action: str
    """swap, in_place, constraint or nothing, as the swap would choose from these numbers."""
    locked: tuple[Relation, ...]
    """What the cut-over holds under ACCESS EXCLUSIVE."""
    held_for_writes: tuple[Relation, ...]
    """The parents of its foreign keys, under SHARE ROW EXCLUSIVE for the same moments."""
    refused: str | None
    """What the swap would refuse it with, as it would say it."""
    why: str = ""
    """Why it would be swapped or deduplicated in place."""
    fired_by_deletes: tuple[str, ...] = ()
    """In place: the table's own triggers that its DELETEs fire."""

    @property
    def references(self) -> tuple[ReferenceCount, ...]:
        return self.audited.references


def _action(audited: audit.TableAudit) -> str:
    if audited.counts.duplicate_rows:
        return "swap"
    return "nothing" if audited.enforced_by else "constraint"


def preview(conn: psycopg.Connection, targets: list[DedupTarget]) -> list[Preview]:
    swapped = {t.live for t in targets}
    found = []
    for target in targets:
        live = catalog.read_live_table(conn, target.live)
        started = time.perf_counter()
        (audited,) = audit.audit(conn, [target])
        scan_seconds = time.perf_counter() - started
        action, why = _action(audited), ""
        refused = None
        try:
            if action != "nothing":
                refuse_partitioned(target.spec, live, conn.info.server_version)
            if action == "swap":
                action, why = choose_strategy(
                    target.spec, BuildCounts(audited.counts.total_rows,
                                             audited.counts.unique_rows), live,
                    interrupted=in_place_runs.started(conn, live, target.spec,
                                                      swap_log.DEFAULT_ARCHIVE_SCHEMA))
            if action != "nothing":
                refuse_unsupported(live, in_place=action != "swap")
            if action in ("swap", "in_place"):
                # Captured or not, `runner capture` captures every reference it needs.
                refuse_references(target.spec, live, swapped,
                                  {r.constraint for r in live.references},
                                  conn.info.server_version, in_place=action == "in_place")
        except RunnerError as error:
            refused = str(error)
        repointed = tuple(r.table for r in live.references) if action == "swap" else ()
        found.append(Preview(
            target, audited, scan_seconds, action,
            locked=(target.live, *repointed) if action != "nothing" else (),
            held_for_writes=tuple(dict.fromkeys(p for _, _, p in live.foreign_keys))
            if action == "swap" else (),
            refused=refused, why=why,
            fired_by_deletes=fired_by_deletes(live) if action == "in_place" else ()))
    return found
