"""runner report for people and machines: Markdown, JSON, and a self-contained HTML page
with its charts."""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import asdict, dataclass

from runner.declaration.artifacts import Relation
from runner.facts.report import ExampleQuery, Report, TableReport, Timing
from runner.server.swap_log import SWAP_LOG, when
from runner.units import elapsed_text, size_text


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
    if timing is None:
        return f"over {elapsed_text(timeout_ms)}"
    return elapsed_text(timing.milliseconds)


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
               "Size after", "Smaller by", "Size now", "Original kept in"]
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


def _space_sentence(report: Report) -> str:
    """The space the swaps give back, said as freed only once runner cleanup freed it: until
    then the originals kept in the archive schema hold it, and more."""
    if not report.kept_bytes:
        return (f"Total space freed: {size_text(report.freed)} ({report.freed:,} bytes), "
                f"{_percent(report.freed, report.bytes_before)} of the "
                f"{size_text(report.bytes_before)} before")
    return (f"Space runner cleanup will free: {size_text(report.kept_bytes)} "
            f"({report.kept_bytes:,} bytes), which the originals kept in "
            f"{report.archive_schema} take until then; the tables then take "
            f"{size_text(report.bytes_after)} where they took {size_text(report.bytes_before)}, "
            f"{_percent(report.freed, report.bytes_before)} less")


SIZES_EXPLAINED = (
    "Rows and sizes before and after are what runner swap recorded at the swap; \"size now\" "
    "is the live table's today. A size is the table with its indexes and TOAST "
    "(pg_total_relation_size). \"Smaller by\" is size before minus size after: the disk "
    "gets it back when runner cleanup drops the originals, and not before.")


def _queries_explained(report: Report) -> str:
    runs = "once" if report.runs == 1 else f"{report.runs} times"
    return (
        f"Each query ran {runs} on each side with EXPLAIN (ANALYZE, BUFFERS) in a read-only "
        "transaction: \"before\" on the original table, kept untouched in the archive schema, "
        "\"after\" on the deduplicated live table. Times are the median execution time "
        "(planning excluded, no rows sent to the client); rows and shared buffers (blocks hit "
        f"+ read) are medians too. Each statement stopped after {elapsed_text(report.timeout_ms)} "
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
        f"**{_md(_space_sentence(report))}.**", "",
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
       max-width: 76rem; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left;
         vertical-align: top; overflow-wrap: anywhere; }
th.n, td.n { text-align: right; white-space: nowrap; }
tr.total td { font-weight: 600; border-top: 2px solid #1b1f24; }
.freed { font-size: 1.2rem; font-weight: 600; }
.muted { color: #57606a; }
.legend span { display: inline-block; width: .9rem; height: .9rem; margin: 0 .3rem 0 1rem;
               vertical-align: middle; }
.legend .before, .bar.before { background: #c4554d; fill: #c4554d; }
.legend .after, .bar.after { background: #2f8f5b; fill: #2f8f5b; }
.bar.timed-out { opacity: .45; }
svg.chart { max-width: 100%; height: auto; }
svg.chart text { font: 12px system-ui, sans-serif; fill: #1b1f24; }
svg.chart text.label { font-weight: 600; }
svg.chart text.tick { fill: #57606a; text-anchor: middle; }
svg.chart line.tick { stroke: #d0d7de; }
pre { background: #f6f8fa; padding: .6rem .8rem; overflow-x: auto; }
"""

_CHART_WIDTH = 800
_LABEL_CHARACTERS = 100
"""About the width of the chart at 12 px; the bars' tooltips hold the whole label."""
_BAR_X = 60
_BAR_SPACE = 640
_BAR_HEIGHT = 14
_SHORTEST_BAR = 2.0
"""A value at the bottom of the scale is still a bar one can see."""


@dataclass(frozen=True)
class _Bar:
    side: str
    """before or after: the bar's CSS class."""
    value: float
    text: str
    timed_out: bool = False


@dataclass(frozen=True)
class LogScale:
    """One logarithmic scale for every bar of a chart: bars compare across groups, and a value
    a thousand times smaller than another is still a bar, not a line."""

    ticks: tuple[tuple[float, str], ...]
    """The marked values, ascending, with their labels; the first and last bound the scale."""

    @classmethod
    def spanning(cls, values: list[float], marks: list[tuple[float, str]]) -> LogScale:
        """From the mark below the smallest value to the first mark at or above the largest,
        so that the smallest bar has a length of its own."""
        shown = [v for v in values if v > 0] or [marks[0][0]]
        low = max((i for i, (mark, _) in enumerate(marks) if mark < min(shown)), default=0)
        high = min((i for i, (mark, _) in enumerate(marks) if mark >= max(shown)),
                   default=len(marks) - 1)
        return cls(tuple(marks[low:max(high, low + 1) + 1]))

    def position(self, value: float) -> float:
        """Where the value lies from the scale's start, in pixels, within the chart."""
        low, high = math.log10(self.ticks[0][0]), math.log10(self.ticks[-1][0])
        share = (math.log10(value) - low) / (high - low)
        return _BAR_SPACE * min(1.0, max(0.0, share))

    def length(self, value: float) -> float:
        return max(_SHORTEST_BAR, self.position(value)) if value > 0 else 0.0


SIZE_MARKS = [(m * 1024 ** power, f"{m} {unit}")
              for power, unit in enumerate(("B", "kB", "MB", "GB", "TB")) for m in (1, 10, 100)]
TIME_MARKS = [(10.0 ** power, elapsed_text(10.0 ** power)) for power in range(-4, 8)]


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def bar_chart(chart_id: str, title: str, groups: list[tuple[str, list[_Bar]]],
              marks: list[tuple[float, str]]) -> str:
    """Horizontal bars, each group under its label, every value written, all on one
    logarithmic scale whose marks run down the chart."""
    scale = LogScale.spanning([bar.value for _, bars in groups for bar in bars], marks)
    parts, y = [], 16
    tick_x = [(_BAR_X + scale.position(value), label) for value, label in scale.ticks]
    parts += [f'<text class="tick" x="{x:.1f}" y="{y}">{_e(label)}</text>' for x, label in tick_x]
    y += 4
    for label, bars in groups:
        y += 16
        shown = (label if len(label) <= _LABEL_CHARACTERS
                 else label[:_LABEL_CHARACTERS - 1] + "\N{HORIZONTAL ELLIPSIS}")
        parts.append(f'<text class="label" x="0" y="{y}">{_e(shown)}</text>')
        y += 4
        for bar in bars:
            width = scale.length(bar.value)
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
    grid = "".join(f'<line class="tick" x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{y}"/>'
                   for x, _ in tick_x)
    return (f'<svg id="{_e(chart_id)}" class="chart" width="{_CHART_WIDTH}" height="{y}" '
            f'viewBox="0 0 {_CHART_WIDTH} {y}" role="img" aria-label="{_e(title)}">'
            f"<title>{_e(title)}</title>{grid}{''.join(parts)}</svg>")


def _html_table(headers: list[str], rows: list[list[str]], total: list[str] | None = None,
                columns: list[str] | None = None) -> str:
    """The table, or only the named columns of it."""
    shown = [i for i, header in enumerate(headers) if columns is None or header in columns]

    def cells(row: list[str], tag: str) -> str:
        numeric = ' class="n"'
        return "".join(
            f"<{tag}{'' if headers[i] in _TEXT_COLUMNS else numeric}>{_e(row[i])}</{tag}>"
            for i in shown)

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    if total:
        body += f'<tr class="total">{cells(total, "td")}</tr>'
    return f"<table><thead><tr>{cells(headers, 'th')}</tr></thead><tbody>{body}</tbody></table>"


_CHANGED_COLUMNS = ["Table", "Rows before", "Rows after", "Removed", "Size before", "Size after",
                    "Smaller by"]
_KEPT_COLUMNS = ["Table", "Swapped", "Size now", "Original kept in"]
"""The page shows the tables' columns as two tables, what changed and where the originals are,
so that each fits a 1280-pixel screen."""


def _size_chart(report: Report) -> str:
    return bar_chart("sizes", "Size before and after the swap, per table, on one logarithmic "
                     "scale", [
        (str(t.live), [_Bar("before", t.bytes_before, size_text(t.bytes_before)),
                       _Bar("after", t.bytes_after, size_text(t.bytes_after))])
        for t in report.tables], SIZE_MARKS)


def _query_chart(report: Report) -> str:
    def bar(side: str, timing: Timing | None) -> _Bar:
        if timing is None:
            return _Bar(side, report.timeout_ms, f"over {elapsed_text(report.timeout_ms)}",
                        timed_out=True)
        return _Bar(side, timing.milliseconds, elapsed_text(timing.milliseconds))

    return bar_chart(
        "query-times", "Example queries: median execution time before and after, on one "
        "logarithmic scale", [
            (f"{number}. {q.title}", [bar("before", q.before), bar("after", q.after)])
            for number, q in enumerate(report.queries, 1)], TIME_MARKS)


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
        f'<p class="freed">{_e(_space_sentence(report))}.</p>',
        "<h2>Tables</h2>", legend, _size_chart(report),
        _html_table(headers, rows, total, _CHANGED_COLUMNS),
        _html_table(headers, rows, columns=_KEPT_COLUMNS),
        f'<p class="muted">{_e(SIZES_EXPLAINED)}</p>',
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
