"""What `runner plan` prints before a build: per table, what the swap would do, lock, write,
re-point and refuse, as SQL comments like the rest of the plan."""

from __future__ import annotations

from collections.abc import Callable

from runner.facts.preview import Preview
from runner.statements.plan import said_of_deletes


def lines(previews: list[Preview], missing: str, size: Callable[[int], str]) -> list[str]:
    said = [f"-- {missing}: what `runner swap` would do, from the catalog, the YAML and one "
            "scan of each table; the statements themselves come once it is built"]
    for p in previews:
        counts, live = p.audited.counts, p.target.live
        head = (f"-- {live}: {counts.total_rows:,} rows, {counts.unique_rows:,} kept, "
                f"{counts.duplicate_rows:,} removed")
        if p.refused:
            said += [f"{head}: refused: {p.refused}"]
            continue
        if p.action == "nothing":
            said.append(f"{head}: nothing to do, its natural key is enforced by "
                        f"{p.audited.enforced_by}")
            continue
        if p.action == "constraint":
            said += [f"{head}: only its natural key's constraint, from a unique index built "
                     "CONCURRENTLY, which blocks no writer; the table is not replaced",
                     f"--   locks ACCESS EXCLUSIVE on {live} for the milliseconds it takes "
                     "to make the index the constraint"]
            continue
        if p.action == "in_place":
            said += [f"{head}: in place, because {p.why}; the removed rows are kept in the "
                     "archive schema, the table is not replaced",
                     f"--   dbt build reads the key columns in one scan, as the audit's took "
                     f"{p.scan_seconds:.1f} s; then the removed rows are deleted a batch of keys "
                     "at a time, and the unique index is built CONCURRENTLY",
                     f"--   the cut-over locks ACCESS EXCLUSIVE on {live} for the milliseconds "
                     "it takes to make the index the constraint", *_repointed(p),
                     *([f"--   {said_of_deletes(p.fired_by_deletes)}"]
                       if p.fired_by_deletes else [])]
            continue
        said += [
            f"{head}: swap, because {p.why}; every original row is kept, in the archive schema",
            f"--   dbt build writes the new table, {counts.unique_rows:,} rows (about "
            f"{size(p.audited.bytes_after)} of its {size(p.audited.bytes)}), after its key "
            f"groups read the key columns in one scan, as the audit's took {p.scan_seconds:.1f} s",
            f"--   the cut-over locks ACCESS EXCLUSIVE on {', '.join(map(str, p.locked))} at "
            "once, for milliseconds",
        ]
        if p.held_for_writes:
            said.append(f"--   and SHARE ROW EXCLUSIVE on {', '.join(map(str, p.held_for_writes))}"
                        ", whose writers wait the same moments")
        said += _repointed(p)
    return said


def _repointed(p: Preview) -> list[str]:
    return [f"--   re-points {r.rows_pointing_at_duplicates:,} of the {r.rows:,} rows of "
            f"{r.table} (foreign key {r.constraint})" for r in p.references]
