"""runner audit for people and machines: the progress of a long scan, the table of counts
in the seed's shape, the unique indexes found, and the foreign keys that point at each table."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict

from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar

from runner import progress
from runner.facts.audit import Scan, TableAudit, Watch, total
from runner.statements.keys import KeyCounts


class _EstimatedBar(ProgressColumn):
    """Fills with the time elapsed against the estimate, as no running query reports how far
    it got; stops short of full until the scan ends. Pulses where there is no estimate."""

    def render(self, task: Task) -> ProgressBar:
        estimate = task.fields["estimate"]
        if estimate is None:
            return ProgressBar(total=None, width=30)
        return ProgressBar(total=estimate, completed=min(task.elapsed or 0, 0.99 * estimate),
                           width=30)


def progress_on(console: Console, size: Callable[[int], str]) -> Watch:
    """A Watch that says on `console` what a long scan will take, shows a bar while it runs
    (on a terminal), then says what it took."""

    @contextmanager
    def watch(scan: Scan) -> Iterator[None]:
        about = (f"about {_seconds(scan.estimate_seconds)}" if scan.estimate_seconds is not None
                 else "no estimate for a partitioned table")
        console.print(f"{scan.relation}: scanning {size(scan.heap_bytes)}, {about}",
                      highlight=False)
        started = time.perf_counter()
        if console.is_terminal:
            with Progress(TextColumn("{task.description}"), _EstimatedBar(),
                          TimeElapsedColumn(), console=console, transient=True) as progress:
                progress.add_task(str(scan.relation), total=None,
                                  estimate=scan.estimate_seconds)
                yield
        else:
            yield
        console.print(f"{scan.relation}: scanned in {_seconds(time.perf_counter() - started)}",
                      highlight=False)

    return watch


def progress_as_events(size: Callable[[int], str]) -> Watch:
    """A Watch that says what a long scan will take, and then took, as progress events."""

    @contextmanager
    def watch(scan: Scan) -> Iterator[None]:
        progress.say("scan", f"{scan.relation}: scanning {size(scan.heap_bytes)}",
                     table=str(scan.relation), heap_bytes=scan.heap_bytes,
                     estimate_seconds=scan.estimate_seconds)
        started = time.perf_counter()
        yield
        progress.say("scanned", f"{scan.relation}: scanned", table=str(scan.relation),
                     seconds=round(time.perf_counter() - started, 3))

    return watch


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def rows(audits: list[TableAudit], output_format: str,
         size: Callable[[int], str]) -> list[dict]:
    """One row per table and a TOTAL row: for people, sizes readable (the unique indexes
    follow the table, `index_lines`); for machines (json, csv), exact, with the indexes."""
    counts, total_bytes, total_after = total(audits)
    if output_format == "table":
        return [
            _readable_row(table.target.live.name, table.counts, size(table.bytes),
                          size(table.bytes_after))
            for table in audits
        ] + [_readable_row("TOTAL", counts, size(total_bytes), size(total_after))]
    as_text = output_format == "csv"
    machine = [
        {
            "table": str(table.target.live),
            "natural_key": (", ".join(table.target.spec.natural_key) if as_text
                            else list(table.target.spec.natural_key)),
            "nulls": table.target.spec.nulls,
            "alternative_key": (", ".join(table.target.spec.alternative_key) if as_text
                                else list(table.target.spec.alternative_key)) or None,
            **_count_fields(table.counts),
            "bytes": table.bytes,
            "bytes_after_estimate": table.bytes_after,
            "natural_key_enforced_by": table.enforced_by,
            "unique_indexes": (
                "; ".join(f"{i.name}: {i.definition}" for i in table.unique_indexes)
                if as_text else [asdict(i) for i in table.unique_indexes]
            ),
            "referenced_by": (
                "; ".join(f"{r.table}.{r.constraint}: {r.rows_pointing_at_duplicates} of "
                          f"{r.rows}" for r in table.references)
                if as_text else [asdict(r) for r in table.references]
            ),
        }
        for table in audits
    ]
    machine.append({
        "table": "TOTAL", "natural_key": None, "nulls": None, "alternative_key": None,
        **_count_fields(counts),
        "bytes": total_bytes, "bytes_after_estimate": total_after,
        "natural_key_enforced_by": None, "unique_indexes": None, "referenced_by": None,
    })
    return machine


def _count_fields(counts: KeyCounts) -> dict:
    """The names and order of the dbt model audit_duplicates."""
    return {
        "total_rows": counts.total_rows,
        "unique_rows": counts.unique_rows,
        "duplicate_rows": counts.duplicate_rows,
        "duplicate_pct": counts.duplicate_pct,
        "duplication_factor": counts.duplication_factor,
        "null_key_rows": counts.null_key_rows,
    }


def _readable_row(table: str, counts: KeyCounts, size_now: str, size_after: str) -> dict:
    return {
        "table": table,
        "rows": counts.total_rows,
        "unique": counts.unique_rows,
        "duplicates": counts.duplicate_rows,
        "dup %": counts.duplicate_pct,
        "factor": counts.duplication_factor,
        "NULL keys": counts.null_key_rows,
        "size": size_now,
        "after (est.)": size_after,
    }


def index_lines(audits: list[TableAudit]) -> str:
    """Per table, its unique indexes: ON CONFLICT DO NOTHING skips a row only when one of
    them conflicts, so a table whose natural key none enforces takes every copy."""
    lines = ["Unique indexes (ON CONFLICT DO NOTHING skips a row only on a conflict in one):"]
    for table in audits:
        key = f"({', '.join(table.target.spec.natural_key)})"
        listed = "; ".join(
            f"{i.name} {i.definition}" + (" <- the natural key" if i.enforces_natural_key else "")
            for i in table.unique_indexes
        ) or "none"
        verdict = "" if table.enforced_by else f"; none enforces the natural key {key}"
        lines.append(f"  {table.target.live.name}: {listed}{verdict}")
    return "\n".join(lines)


def reference_lines(audits: list[TableAudit]) -> str:
    """Per table that others reference, their foreign keys and how many of their rows point
    at a duplicate the keep rule removes; nothing if no table is referenced."""
    referenced = [table for table in audits if table.references]
    if not referenced:
        return ""
    lines = ["Referenced by (rows that point at a duplicate the swap would remove; runner swap "
             "refuses a table others reference):"]
    for table in referenced:
        listed = "; ".join(f"{r.table}.{r.constraint}, {r.rows_pointing_at_duplicates:,} of "
                           f"{r.rows:,} rows" for r in table.references)
        lines.append(f"  {table.target.live.name}: {listed}")
    return "\n".join(lines)


def title(audits: list[TableAudit]) -> str:
    schemas = sorted({table.target.live.schema for table in audits})
    return f"runner audit: {', '.join(schemas)}"
