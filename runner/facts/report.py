"""`runner report`: the incident report's "expected results", measured on this database.

Rows and sizes before and after come from what `runner swap` recorded in swap_log, sizes now
from the catalog. The example queries are derived per table from the catalog: the rows of one
parent (by the table's foreign key, else by the first column of its natural key) and the parent
joined with the table. Each runs with EXPLAIN (ANALYZE, BUFFERS) against the original table,
which stays untouched in the archive schema until `runner cleanup`, and against the
deduplicated live table, in read-only transactions under a statement_timeout.

`gather` is the one function that reads the database; the rest builds SQL or renders the
Report as Markdown, a self-contained HTML page or JSON, without touching it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.errors import RunnerError
from runner.server import catalog
from runner.server.swap_log import SWAP_LOG, LogEntry, latest_swaps, selected, when
from runner.units import elapsed_text

ONE_PARENT = "rows of one parent"
JOINED = "parent joined with the table"
ONE_KEY_VALUE = "rows of one key value"


@dataclass(frozen=True)
class ReportOptions:
    archive_schema: str
    select: list[str] | None = None
    queries: bool = True
    """False: sizes only, no example queries."""
    runs: int = 3
    """How often each query runs per side; the report gives the median."""
    timeout_ms: int = 30_000
    """statement_timeout of every query the report runs on a table."""


@dataclass(frozen=True)
class TableReport:
    """One table's current swap: swap_log's facts, and the catalog's sizes now."""

    live: Relation
    action: str
    """swap (the original moved to the archive) or constraint (only the constraint added)."""
    constraint: str
    """The natural key's UNIQUE constraint the swap added."""
    swapped_at: datetime
    rows_before: int
    rows_after: int
    bytes_before: int
    bytes_after: int
    bytes_now: int | None
    """None: the live table does not exist any more."""
    archive: Relation | None
    archive_bytes_now: int | None
    """None: the archive is gone (cleaned up, or there never was one)."""
    cleaned_at: datetime | None

    @property
    def removed(self) -> int:
        return self.rows_before - self.rows_after

    @property
    def freed(self) -> int:
        return self.bytes_before - self.bytes_after


@dataclass(frozen=True)
class Timing:
    """Medians over the runs of one query on one side."""

    milliseconds: float
    """EXPLAIN ANALYZE's Execution Time: planning excluded, no rows sent to the client."""
    rows: int
    buffers: int
    """Shared buffers hit plus read, the whole plan's."""


@dataclass(frozen=True)
class ExampleQuery:
    table: Relation
    kind: str
    title: str
    statement: str
    """As run against the live table; "before" runs it on the archive instead."""
    before: Timing | None
    """None: it did not finish within the statement_timeout."""
    after: Timing | None

    @property
    def speedup(self) -> float | None:
        if self.before is None or self.after is None or self.after.milliseconds <= 0:
            return None
        return self.before.milliseconds / self.after.milliseconds


@dataclass(frozen=True)
class Report:
    database: str
    generated_at: datetime
    archive_schema: str
    tables: tuple[TableReport, ...]
    queries: tuple[ExampleQuery, ...]
    queries_run: bool
    runs: int
    timeout_ms: int
    notes: tuple[str, ...]

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tables)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tables)

    @property
    def freed(self) -> int:
        """How much smaller the tables are than before: the disk has it back once runner
        cleanup drops the originals."""
        return sum(t.freed for t in self.tables)

    @property
    def kept_bytes(self) -> int:
        """What the originals still in the archive schema take now: what runner cleanup frees."""
        return sum(t.archive_bytes_now or 0 for t in self.tables)


@dataclass(frozen=True)
class ForeignKey:
    columns: tuple[str, ...]
    parent: Relation
    parent_columns: tuple[str, ...]


# SQL: pure functions of names.

def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def _columns(columns: tuple[str, ...]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


def most_rows_value(relation: Relation, columns: tuple[str, ...]) -> sql.Composed:
    """The value of `columns` that most rows share, as text: the seed's worst case."""
    return sql.SQL(
        "select {text} from {table} where {not_null} group by {cols}"
        " order by count(*) desc, {cols} limit 1"
    ).format(
        text=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns),
        table=_id(relation),
        not_null=sql.SQL(" and ").join(
            sql.SQL("{} is not null").format(sql.Identifier(c)) for c in columns),
        cols=_columns(columns),
    )


def rows_of_one(relation: Relation, columns: tuple[str, ...],
                values: tuple[str, ...]) -> sql.Composed:
    # Untyped literals: PostgreSQL reads each as its column's type, whatever that is.
    return sql.SQL("select * from {table} where {match}").format(
        table=_id(relation),
        match=sql.SQL(" and ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), sql.Literal(v))
            for c, v in zip(columns, values, strict=True)))


def joined_with_parent(relation: Relation, key: ForeignKey) -> sql.Composed:
    return sql.SQL("select p.*, c.* from {parent} as p left join {table} as c on {match}").format(
        parent=_id(key.parent), table=_id(relation),
        match=sql.SQL(" and ").join(
            sql.SQL("{} = {}").format(sql.Identifier("c", child), sql.Identifier("p", parent))
            for child, parent in zip(key.columns, key.parent_columns, strict=True)))


def explain(statement: sql.Composable) -> sql.Composed:
    return sql.SQL("explain (analyze, buffers, format json) {}").format(statement)


def choose_foreign_key(keys: list[ForeignKey], natural_key: tuple[str, ...]) -> ForeignKey | None:
    """The foreign key within the natural key (the parent the rows belong to), else the first."""
    within = [k for k in keys if set(k.columns) <= set(natural_key)]
    return (within or keys or [None])[0]


# Reading the database.

def _latest_swaps(conn: psycopg.Connection, options: ReportOptions) -> list[LogEntry]:
    """The latest swap_log entry of every table, or of the selected ones."""
    entries = latest_swaps(conn, options.archive_schema)
    if not entries:
        raise RunnerError(f"no swap recorded in {options.archive_schema}.{SWAP_LOG}: run "
                          "`runner swap` first")
    return selected(entries, options.select, options.archive_schema)


def _table_report(conn: psycopg.Connection, row: LogEntry, archive_schema: str) -> TableReport:
    archive = Relation(archive_schema, row.archive_table) if row.archive_table else None
    return TableReport(
        live=row.live, action=row.action, constraint=row.constraint_name,
        swapped_at=row.swapped_at, rows_before=row.rows_before, rows_after=row.rows_after,
        bytes_before=row.bytes_before, bytes_after=row.bytes_after,
        bytes_now=catalog.relation_size(conn, row.live), archive=archive,
        archive_bytes_now=catalog.relation_size(conn, archive) if archive else None,
        cleaned_at=row.cleaned_at)


@contextmanager
def read_only(conn: psycopg.Connection, timeout_ms: int) -> Iterator[None]:
    """A transaction that can change nothing, and whose statements stop after the timeout."""
    with conn.transaction():
        conn.execute("set transaction read only")
        conn.execute("select set_config('statement_timeout', %s, true)", (f"{timeout_ms}ms",))
        yield


def measure(conn: psycopg.Connection, statement: sql.Composable, runs: int,
            timeout_ms: int) -> Timing | None:
    """The medians of `runs` EXPLAIN ANALYZE runs; None when one outlasts the timeout."""
    plans = []
    try:
        with read_only(conn, timeout_ms):
            for _ in range(runs):
                ((plan,),) = conn.execute(explain(statement)).fetchall()
                plans.append(plan[0])
    except psycopg.errors.QueryCanceled:
        return None
    return Timing(
        milliseconds=statistics.median(p["Execution Time"] for p in plans),
        rows=statistics.median_low(p["Plan"]["Actual Rows"] for p in plans),
        buffers=statistics.median_low(
            p["Plan"]["Shared Hit Blocks"] + p["Plan"]["Shared Read Blocks"] for p in plans),
    )


def _foreign_keys(conn: psycopg.Connection, relation: Relation) -> list[ForeignKey]:
    return [ForeignKey(columns, parent, parent_columns)
            for parent, columns, parent_columns in catalog.foreign_key_columns(conn, relation)]


def _example_queries(conn: psycopg.Connection, table: TableReport, options: ReportOptions,
                     notes: list[str]) -> list[ExampleQuery]:
    live, archive = table.live, table.archive
    natural_key = catalog.constraint_columns(conn, table.live, table.constraint)
    key = choose_foreign_key(_foreign_keys(conn, live), natural_key)
    if key is None and not natural_key:
        notes.append(f"{live}: no foreign key, and no constraint {table.constraint} to read its "
                     "natural key from, to derive example queries from; sizes only.")
        return []
    columns = key.columns if key else natural_key[:1]
    try:
        with read_only(conn, options.timeout_ms):
            values = conn.execute(most_rows_value(archive, columns)).fetchone()
    except psycopg.errors.QueryCanceled:
        notes.append(f"{live}: finding the {', '.join(columns)} with the most rows in {archive} "
                     f"took longer than {elapsed_text(options.timeout_ms)}; no example queries.")
        return []
    shapes = []
    if values is not None:
        shown = ", ".join(f"{c} = {v}" for c, v in zip(columns, values, strict=True))
        kind, of = (ONE_PARENT, key.parent) if key else (ONE_KEY_VALUE, columns[0])
        shapes.append((kind, f"{live} of one {of} ({shown}: the most rows)",
                       lambda relation: rows_of_one(relation, columns, values)))
    if key:
        shapes.append((JOINED, f"{key.parent} joined with {live}",
                       lambda relation: joined_with_parent(relation, key)))
    return [
        ExampleQuery(
            table=live, kind=kind, title=title, statement=build(live).as_string(conn),
            before=measure(conn, build(archive), options.runs, options.timeout_ms),
            after=measure(conn, build(live), options.runs, options.timeout_ms))
        for kind, title, build in shapes
    ]


def _no_queries_because(table: TableReport) -> str | None:
    if table.action == "in_place":
        return (f"{table.live}: deduplicated in place, so the table before is not kept to compare "
                "with (only the rows removed are).")
    if table.action != "swap":
        return (f"{table.live}: the swap only added its natural key's constraint (it had no "
                "duplicates), so there is no original to compare with.")
    if table.bytes_now is None:
        return f"{table.live} does not exist any more: no example queries."
    if table.archive_bytes_now is None:
        dropped = (f"runner cleanup dropped its original {table.archive} at "
                   f"{when(table.cleaned_at)}" if table.cleaned_at
                   else f"its original {table.archive} is missing")
        return f"{table.live}: {dropped}, so the example queries' \"before\" is gone; sizes only."
    return None


def gather(conn: psycopg.Connection, options: ReportOptions) -> Report:
    """Every fact of the report: swap_log, the catalog, and the example queries' timings."""
    rows = _latest_swaps(conn, options)
    current = [row for row in rows if row.rolled_back_at is None]
    if not current:
        log = f"{options.archive_schema}.{SWAP_LOG}"
        which = (f" of {', '.join(options.select)} in {log}: the latest swap of each"
                 if options.select else f" in {log}: the latest swap of every table")
        raise RunnerError(f"no current swap{which} was rolled back; run `runner swap` first")
    notes = [f"{row.live}: its swap at {when(row.swapped_at)} was rolled back at "
             f"{when(row.rolled_back_at)}, so the table is not reported."
             for row in rows if row.rolled_back_at is not None]
    tables = [_table_report(conn, row, options.archive_schema) for row in current]
    queries: list[ExampleQuery] = []
    for table in tables if options.queries else []:
        reason = _no_queries_because(table)
        if reason:
            notes.append(reason)
        else:
            queries += _example_queries(conn, table, options, notes)
    return Report(
        database=conn.info.dbname, generated_at=datetime.now(timezone.utc),
        archive_schema=options.archive_schema, tables=tuple(tables), queries=tuple(queries),
        queries_run=options.queries, runs=options.runs, timeout_ms=options.timeout_ms,
        notes=tuple(notes))


# Rendering: pure functions of the Report.
