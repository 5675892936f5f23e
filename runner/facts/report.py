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

import html
import json
import re
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import psycopg
from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.errors import RunnerError
from runner.server.swap_log import SWAP_LOG, LogEntry, latest_swaps, selected, when
from runner.units import size_text

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
        return sum(t.freed for t in self.tables)


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

_SIZE = "select pg_total_relation_size(to_regclass(format('%%I.%%I', %s::text, %s::text)))"

_FOREIGN_KEYS = """
select pn.nspname, p.relname,
       array(select a.attname from unnest(con.conkey) with ordinality as k(attnum, position)
             join pg_attribute as a on a.attrelid = con.conrelid and a.attnum = k.attnum
             order by k.position),
       array(select a.attname from unnest(con.confkey) with ordinality as k(attnum, position)
             join pg_attribute as a on a.attrelid = con.confrelid and a.attnum = k.attnum
             order by k.position)
from pg_constraint as con
join pg_class as p on p.oid = con.confrelid
join pg_namespace as pn on pn.oid = p.relnamespace
where con.conrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) and con.contype = 'f'
order by con.conname
"""

_CONSTRAINT_COLUMNS = """
select array(select a.attname from unnest(con.conkey) with ordinality as k(attnum, position)
             join pg_attribute as a on a.attrelid = con.conrelid and a.attnum = k.attnum
             order by k.position)
from pg_constraint as con
where con.conrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) and con.conname = %s
"""



def _size_of(conn: psycopg.Connection, relation: Relation) -> int | None:
    return conn.execute(_SIZE, (relation.schema, relation.name)).fetchone()[0]


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
        bytes_now=_size_of(conn, row.live), archive=archive,
        archive_bytes_now=_size_of(conn, archive) if archive else None,
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
    return [ForeignKey(tuple(columns), Relation(schema, table), tuple(parent_columns))
            for schema, table, columns, parent_columns
            in conn.execute(_FOREIGN_KEYS, (relation.schema, relation.name))]


def _natural_key(conn: psycopg.Connection, table: TableReport) -> tuple[str, ...]:
    row = conn.execute(_CONSTRAINT_COLUMNS,
                       (table.live.schema, table.live.name, table.constraint)).fetchone()
    return tuple(row[0]) if row else ()


def _example_queries(conn: psycopg.Connection, table: TableReport, options: ReportOptions,
                     notes: list[str]) -> list[ExampleQuery]:
    live, archive = table.live, table.archive
    natural_key = _natural_key(conn, table)
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
                     f"took longer than {duration(options.timeout_ms)}; no example queries.")
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

def duration(milliseconds: float) -> str:
    if milliseconds < 999.5:
        return f"{milliseconds:.3g} ms"
    seconds = milliseconds / 1000
    return f"{seconds:.3g} s" if seconds < 99.95 else f"{seconds:,.0f} s"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "0%"


def _improvement(query: ExampleQuery, timeout_ms: int) -> str:
    """How many times faster after; a lower bound when "before" outlasted the timeout."""
    if query.after is None:
        return "after timed out"
    before = query.before.milliseconds if query.before else timeout_ms
    if query.after.milliseconds <= 0:
        return ""
    ratio = before / query.after.milliseconds
    faster = ratio >= 1
    factor = ratio if faster else 1 / ratio
    shown = f"{factor:.1f}x" if factor < 100 else f"{factor:,.0f}x"
    return f"{'' if query.before else 'over '}{shown} {'faster' if faster else 'slower'}"


def _time(timing: Timing | None, timeout_ms: int) -> str:
    return f"over {duration(timeout_ms)}" if timing is None else duration(timing.milliseconds)


def _count(timing: Timing | None, field: str) -> str:
    return "" if timing is None else f"{getattr(timing, field):,}"


def _kept_in(table: TableReport) -> str:
    if table.archive is None:
        return "nothing to keep: only the constraint was added"
    if table.archive_bytes_now is not None:
        return f"{table.archive} ({size_text(table.archive_bytes_now)})"
    if table.cleaned_at is not None:
        return f"dropped by runner cleanup at {when(table.cleaned_at)}"
    return f"{table.archive}, missing"


def _table_rows(report: Report) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, one row per table and the total row, as text, for Markdown and HTML alike."""
    headers = ["Table", "Swapped", "Rows before", "Rows after", "Removed", "Size before",
               "Size after", "Freed", "Size now", "Original kept in"]
    rows = [[str(t.live), when(t.swapped_at), f"{t.rows_before:,}", f"{t.rows_after:,}",
             f"{t.removed:,} ({_percent(t.removed, t.rows_before)})", size_text(t.bytes_before),
             size_text(t.bytes_after), size_text(t.freed),
             size_text(t.bytes_now) if t.bytes_now is not None else "missing", _kept_in(t)]
            for t in report.tables]
    rows_before = sum(t.rows_before for t in report.tables)
    removed = sum(t.removed for t in report.tables)
    total = ["Total", "", f"{rows_before:,}", f"{sum(t.rows_after for t in report.tables):,}",
             f"{removed:,} ({_percent(removed, rows_before)})", size_text(report.bytes_before),
             size_text(report.bytes_after), size_text(report.freed), "", ""]
    return headers, rows, total


_TEXT_COLUMNS = frozenset({"Table", "Swapped", "Original kept in", "Query"})
"""The columns that are not numbers, aligned left; the others right."""


def _query_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    headers = ["Query", "Before", "After", "Improvement", "Rows before", "Rows after",
               "Buffers before", "Buffers after"]
    rows = [[f"{number}. {q.title}", _time(q.before, report.timeout_ms),
             _time(q.after, report.timeout_ms), _improvement(q, report.timeout_ms),
             _count(q.before, "rows"), _count(q.after, "rows"), _count(q.before, "buffers"),
             _count(q.after, "buffers")]
            for number, q in enumerate(report.queries, 1)]
    return headers, rows


def _freed_sentence(report: Report) -> str:
    return (f"{size_text(report.freed)} ({report.freed:,} bytes), "
            f"{_percent(report.freed, report.bytes_before)} of the "
            f"{size_text(report.bytes_before)} before")


SIZES_EXPLAINED = (
    "Rows and sizes before and after are what runner swap recorded at the swap; \"size now\" "
    "is the live table's today. A size is the table with its indexes and TOAST "
    "(pg_total_relation_size). Space freed is the sum over the tables of size before minus "
    "size after: the disk gets it back when runner cleanup drops the originals.")


def _queries_explained(report: Report) -> str:
    runs = "once" if report.runs == 1 else f"{report.runs} times"
    return (
        f"Each query ran {runs} on each side with EXPLAIN (ANALYZE, BUFFERS) in a read-only "
        "transaction: \"before\" on the original table, kept untouched in the archive schema, "
        "\"after\" on the deduplicated live table. Times are the median execution time "
        "(planning excluded, no rows sent to the client); rows and shared buffers (blocks hit "
        f"+ read) are medians too. Each statement stopped after {duration(report.timeout_ms)} "
        "(statement_timeout). \"One\" parent or key value is the one with the most rows "
        "before: the seed's worst case.")


def _title(report: Report) -> str:
    return f"Deduplication report: {report.database}"


_MARKDOWN_SPECIAL = re.compile(r"[\\`*<>\[\]|&~]|_+")


def _md(text: str) -> str:
    """Text that Markdown shows as it is, in a table cell too: names may hold any character.
    Underscores inside a word stay as they are, since they cannot start emphasis there."""
    flat = " ".join(text.splitlines())

    def escape(match: re.Match) -> str:
        found, start, end = match.group(), match.start(), match.end()
        if found[0] != "_":
            return "\\" + found
        within_word = (start > 0 and flat[start - 1].isalnum() and end < len(flat)
                       and flat[end].isalnum())
        return found if within_word else found.replace("_", "\\_")

    return _MARKDOWN_SPECIAL.sub(escape, flat)


def _md_table(headers: list[str], rows: list[list[str]],
              total: list[str] | None = None) -> list[str]:
    def line(cells: list[str]) -> str:
        return f"| {' | '.join(cells)} |"

    align = ["---" if header in _TEXT_COLUMNS else "---:" for header in headers]
    lines = [line([_md(c) for c in headers]), line(align),
             *(line([_md(c) for c in row]) for row in rows)]
    if total:
        lines.append(line([f"**{_md(c)}**" if c else "" for c in total]))
    return lines


def _fenced(code: str, language: str) -> list[str]:
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", code)), default=0))
    return [f"{fence}{language}", code, fence]


def to_markdown(report: Report) -> str:
    headers, rows, total = _table_rows(report)
    lines = [
        f"# {_md(_title(report))}", "",
        f"Generated {when(report.generated_at)} from {_md(report.archive_schema)}."
        f"{_md(SWAP_LOG)}.", "",
        "## Tables", "",
        *_md_table(headers, rows, total=total), "",
        f"**Total space freed: {_md(_freed_sentence(report))}.**", "",
        _md(SIZES_EXPLAINED), "",
        "## Example queries", "",
    ]
    if not report.queries_run:
        lines += ["Not run (--no-queries): sizes only.", ""]
    elif not report.queries:
        lines += ["None to run: see the notes.", ""]
    else:
        query_headers, query_rows = _query_rows(report)
        lines += [*_md_table(query_headers, query_rows), "",
                  _md(_queries_explained(report)), "",
                  "The queries as run after; before, the archived original takes the "
                  "table's place.", ""]
        for number, query in enumerate(report.queries, 1):
            lines += [f"{number}. {_md(query.title)}", "", *_fenced(query.statement, "sql"), ""]
    if report.notes:
        lines += ["## Notes", "", *(f"- {_md(note)}" for note in report.notes), ""]
    return "\n".join(lines).rstrip() + "\n"


def to_json(report: Report) -> str:
    def timing(value: Timing | None) -> dict | None:
        return asdict(value) if value else None

    return json.dumps({
        "database": report.database,
        "generated_at": report.generated_at.isoformat(),
        "swap_log": str(Relation(report.archive_schema, SWAP_LOG)),
        "tables": [
            {**asdict(t), "live": str(t.live), "archive": str(t.archive) if t.archive else None,
             "swapped_at": t.swapped_at.isoformat(),
             "cleaned_at": t.cleaned_at.isoformat() if t.cleaned_at else None,
             "removed": t.removed, "freed": t.freed}
            for t in report.tables
        ],
        "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
        "freed": report.freed,
        "queries_run": report.queries_run, "runs": report.runs, "timeout_ms": report.timeout_ms,
        "queries": [
            {"table": str(q.table), "kind": q.kind, "title": q.title, "statement": q.statement,
             "before": timing(q.before), "after": timing(q.after), "speedup": q.speedup}
            for q in report.queries
        ],
        "notes": list(report.notes),
    }, indent=2)


# HTML: one page, its CSS and bar charts inline, nothing fetched, every name escaped.

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1f24;
       max-width: 64rem; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left;
         vertical-align: top; }
th.n, td.n { text-align: right; white-space: nowrap; }
tr.total td { font-weight: 600; border-top: 2px solid #1b1f24; }
.freed { font-size: 1.3rem; }
.muted { color: #57606a; }
.legend span { display: inline-block; width: .9rem; height: .9rem; margin: 0 .3rem 0 1rem;
               vertical-align: middle; }
.legend .before, .bar.before { background: #c4554d; fill: #c4554d; }
.legend .after, .bar.after { background: #2f8f5b; fill: #2f8f5b; }
.bar.timed-out { opacity: .45; }
svg.chart { max-width: 100%; height: auto; }
svg.chart text { font: 12px system-ui, sans-serif; fill: #1b1f24; }
svg.chart text.label { font-weight: 600; }
pre { background: #f6f8fa; padding: .6rem .8rem; overflow-x: auto; }
"""

_CHART_WIDTH = 800
_LABEL_CHARACTERS = 100
"""About the width of the chart at 12 px; the bars' tooltips hold the whole label."""
_BAR_X = 60
_BAR_SPACE = 560
_BAR_HEIGHT = 14


@dataclass(frozen=True)
class _Bar:
    side: str
    """before or after: the bar's CSS class."""
    value: float
    text: str
    timed_out: bool = False


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def bar_chart(chart_id: str, title: str, groups: list[tuple[str, list[_Bar]]],
              scale_per_group: bool = False) -> str:
    """Horizontal bars, each group under its label, every value written; on one linear scale,
    or each group on its own, so that its longest bar spans the chart."""
    overall = max((bar.value for _, bars in groups for bar in bars), default=0) or 1
    parts, y = [], 0
    for label, bars in groups:
        largest = (max(bar.value for bar in bars) or 1) if scale_per_group else overall
        y += 16
        shown = (label if len(label) <= _LABEL_CHARACTERS
                 else label[:_LABEL_CHARACTERS - 1] + "\N{HORIZONTAL ELLIPSIS}")
        parts.append(f'<text class="label" x="0" y="{y}">{_e(shown)}</text>')
        y += 4
        for bar in bars:
            width = max(1.0, _BAR_SPACE * bar.value / largest) if bar.value > 0 else 0
            classes = f"bar {bar.side}{' timed-out' if bar.timed_out else ''}"
            middle = y + _BAR_HEIGHT - 3
            parts += [
                f'<text x="0" y="{middle}">{_e(bar.side)}</text>',
                f'<rect class="{classes}" x="{_BAR_X}" y="{y}" width="{width:.1f}" '
                f'height="{_BAR_HEIGHT}"><title>{_e(f"{label}, {bar.side}: {bar.text}")}'
                "</title></rect>",
                f'<text class="value" x="{_BAR_X + width + 6:.1f}" y="{middle}">'
                f"{_e(bar.text)}</text>",
            ]
            y += _BAR_HEIGHT + 3
        y += 8
    return (f'<svg id="{_e(chart_id)}" class="chart" width="{_CHART_WIDTH}" height="{y}" '
            f'viewBox="0 0 {_CHART_WIDTH} {y}" role="img" aria-label="{_e(title)}">'
            f"<title>{_e(title)}</title>{''.join(parts)}</svg>")


def _html_table(headers: list[str], rows: list[list[str]],
                total: list[str] | None = None) -> str:
    def cells(row: list[str], tag: str) -> str:
        numeric = ' class="n"'
        return "".join(
            f"<{tag}{'' if header in _TEXT_COLUMNS else numeric}>{_e(cell)}</{tag}>"
            for header, cell in zip(headers, row, strict=True))

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    if total:
        body += f'<tr class="total">{cells(total, "td")}</tr>'
    return f"<table><thead><tr>{cells(headers, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def _size_chart(report: Report) -> str:
    return bar_chart("sizes", "Size before and after the swap, per table", [
        (str(t.live), [_Bar("before", t.bytes_before, size_text(t.bytes_before)),
                       _Bar("after", t.bytes_after, size_text(t.bytes_after))])
        for t in report.tables])


def _query_chart(report: Report) -> str:
    def bar(side: str, timing: Timing | None) -> _Bar:
        if timing is None:
            return _Bar(side, report.timeout_ms, f"over {duration(report.timeout_ms)}",
                        timed_out=True)
        return _Bar(side, timing.milliseconds, duration(timing.milliseconds))

    # Times differ by orders of magnitude between queries: each on its own scale shows its
    # speed-up, and every bar says its time.
    return bar_chart(
        "query-times", "Example queries: median execution time before and after, each query "
        "on its own scale", [
            (f"{number}. {q.title}", [bar("before", q.before), bar("after", q.after)])
            for number, q in enumerate(report.queries, 1)], scale_per_group=True)


def to_html(report: Report) -> str:
    headers, rows, total = _table_rows(report)
    legend = ('<p class="legend muted"><span class="before"></span>before'
              '<span class="after"></span>after</p>')
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(_title(report))}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{_e(_title(report))}</h1>",
        f'<p class="muted">Generated {_e(when(report.generated_at))} from '
        f"{_e(Relation(report.archive_schema, SWAP_LOG))}.</p>",
        f'<p class="freed">Total space freed: <strong>{_e(_freed_sentence(report))}</strong>'
        ".</p>",
        "<h2>Tables</h2>", legend, _size_chart(report),
        _html_table(headers, rows, total), f'<p class="muted">{_e(SIZES_EXPLAINED)}</p>',
        "<h2>Example queries</h2>",
    ]
    if not report.queries_run:
        parts.append("<p>Not run (--no-queries): sizes only.</p>")
    elif not report.queries:
        parts.append("<p>None to run: see the notes.</p>")
    else:
        query_headers, query_rows = _query_rows(report)
        parts += [
            legend, _query_chart(report), _html_table(query_headers, query_rows),
            f'<p class="muted">{_e(_queries_explained(report))}</p>',
            "<p>The queries as run after; before, the archived original takes the table's "
            "place.</p>",
            *(f"<p>{number}. {_e(q.title)}</p><pre><code>{_e(q.statement)}</code></pre>"
              for number, q in enumerate(report.queries, 1)),
        ]
    if report.notes:
        parts += ["<h2>Notes</h2>", "<ul>",
                  *(f"<li>{_e(note)}</li>" for note in report.notes), "</ul>"]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
