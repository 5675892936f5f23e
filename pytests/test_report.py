"""runner report against a real server: the numbers it states per table and per query, the
HTML page, and what it says before a swap, after a rollback and after a cleanup."""

from __future__ import annotations

import html as html_module
import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import browser
import psycopg
import pytest
from conftest import SCREENSHOTS, TEST_SCALE, Database, _create_database
from psycopg import sql
from test_other_project import OTHER_PROJECT, run_other_dbt
from test_other_project import shop as shop  # imported, its fixture is this module's too
from test_swap import SWAPPED, schema_state

from runner import demo
from runner.declaration.artifacts import Relation
from runner.facts import report
from runner.present import report_view
from runner.units import size_text

CELL = re.compile(r"(?<!\\)\|")
FREED = re.compile(r"Total space freed: (.+?) \(([\d,]+) bytes\)")
TO_FREE = re.compile(r"Space runner cleanup will free: (.+?) \(([\d,]+) bytes\), which the "
                     r"originals kept in dedup_archive take until then; the tables then take "
                     r"(.+?) where they took (.+?), ([\d.]+)% less")
ONE_PARENT = re.compile(r"^\d+\. breezeway\.(\w+) of one breezeway\.(\w+) \(\w+ = (\d+): "
                        r"the most rows\)$")
JOINED = re.compile(r"^\d+\. breezeway\.(\w+) joined with breezeway\.(\w+)$")


@pytest.fixture(scope="module")
def swapped(server, built: Database, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Database]:
    """One swapped copy of the built database, for the tests that only run the report."""
    name = "report_swapped"
    _create_database(server, name, template=built.name)
    target_dir = tmp_path_factory.mktemp("report") / "target"
    shutil.copytree(built.target_dir, target_dir)
    database = Database({**built.env, "PGDATABASE": name}, target_dir)
    result = database.runner("swap")
    assert result.exit_code == 0, result.output
    yield database
    with psycopg.connect(autocommit=True, **server.conninfo) as conn:
        conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


def reported(database: Database, *args: str) -> str:
    result = database.runner("report", *args)
    assert result.exit_code == 0, result.output
    return result.output


def md_table(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the Markdown table under `## heading`, cells unescaped, bold removed."""
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    if not lines:
        return []

    def cells(line: str) -> list[str]:
        return [re.sub(r"\\(.)", r"\1", cell.strip().removeprefix("**").removesuffix("**"))
                for cell in CELL.split(line.strip())[1:-1]]

    headers = cells(lines[0])
    return [dict(zip(headers, cells(line), strict=True)) for line in lines[2:]]


def number(cell: str) -> int:
    return int(cell.split(" ")[0].replace(",", ""))


def archives_size(database: Database) -> int:
    """What the originals the swaps kept take on disk now."""
    with database.connect() as conn:
        return conn.execute(
            "select sum(pg_total_relation_size(format('dedup_archive.%I', archive_table)))"
            " from dedup_archive.swap_log where rolled_back_at is null").fetchone()[0]


def swap_log_bytes(database: Database) -> dict[str, tuple[int, int]]:
    with database.connect() as conn:
        return {table: (before, after) for table, before, after in conn.execute(
            "select live_table, bytes_before, bytes_after from dedup_archive.swap_log"
            " where rolled_back_at is null")}


def test_one_row_per_swapped_table_with_rows_and_sizes_before_and_after(
        swapped: Database) -> None:
    before = schema_state(swapped)
    markdown = reported(swapped, "--no-queries")
    assert schema_state(swapped) == before
    expected = demo.expected_counts(TEST_SCALE)
    logged = swap_log_bytes(swapped)
    rows = {row["Table"]: row for row in md_table(markdown, "Tables")}
    assert set(rows) == {f"breezeway.{table}" for table in SWAPPED} | {"Total"}
    with swapped.connect() as conn:
        for table in SWAPPED:
            row = rows[f"breezeway.{table}"]
            assert number(row["Rows before"]) == expected[table].total
            assert number(row["Rows after"]) == expected[table].unique
            assert number(row["Removed"]) == expected[table].duplicates
            size_before, size_after = logged[table]
            assert size_before > size_after
            assert (row["Size before"], row["Size after"], row["Smaller by"]) == (
                size_text(size_before), size_text(size_after),
                size_text(size_before - size_after))
            now = conn.execute("select pg_total_relation_size(%s::regclass)",
                               (f"breezeway.{table}",)).fetchone()[0]
            assert row["Size now"] == size_text(now)
            assert row["Original kept in"].startswith(f"dedup_archive.{table}__")
    total = rows["Total"]
    assert number(total["Rows before"]) == sum(expected[t].total for t in SWAPPED)
    assert number(total["Rows after"]) == sum(expected[t].unique for t in SWAPPED)
    assert total["Smaller by"] == size_text(sum(b - a for b, a in logged.values()))
    # Nothing is freed before runner cleanup: the originals still take their space.
    assert FREED.search(markdown) is None
    to_free = TO_FREE.search(markdown)
    assert to_free, markdown
    assert number(to_free.group(2)) == archives_size(swapped) > 0
    assert to_free.group(1) == size_text(number(to_free.group(2)))
    assert (to_free.group(3), to_free.group(4)) == (total["Size after"], total["Size before"])
    assert "Not run (--no-queries): sizes only." in markdown


def parent_counts(table: str, parent: str) -> dict[int, tuple[int, int]]:
    """Per parent id: its rows after the swap (its keys) and before (every copy of them)."""
    layout = demo.Layout.at(next(t for t in demo.CHILD_TABLES if t.name == table), TEST_SCALE)
    parents = getattr(layout, parent)
    counts = {}
    for parent_id in range(1, parents + 1):
        keys = [k for k in range(layout.keys) if k % parents + 1 == parent_id]
        counts[parent_id] = (len(keys), sum(layout.copies(k) for k in keys))
    return counts


def test_example_queries_return_one_parents_rows_before_and_after(swapped: Database) -> None:
    markdown = reported(swapped)
    queries = md_table(markdown, "Example queries")
    by_title = {row["Query"]: row for row in queries}
    one_parent = [ONE_PARENT.match(title) for title in by_title]
    joined = [JOINED.match(title) for title in by_title]
    with_parent = [t for t in SWAPPED if t != "business_events"]
    assert sorted(m.group(1) for m in one_parent if m) == sorted(with_parent)
    assert sorted(m.group(2) for m in joined if m) == sorted(with_parent)
    for match in filter(None, one_parent):
        table, parent, chosen = match.group(1), match.group(2), int(match.group(3))
        counts = parent_counts(table, parent)
        # The worst case: the parent with the most rows before, the first of equals.
        assert chosen == max(sorted(counts), key=lambda p: counts[p][1])
        row = by_title[match.group(0)]
        assert (number(row["Rows after"]), number(row["Rows before"])) == counts[chosen]
    for match in filter(None, joined):
        table, parent = match.group(2), match.group(1)
        layout = demo.Layout.at(next(t for t in demo.CHILD_TABLES if t.name == table),
                                TEST_SCALE)
        childless = sum(1 for after, _ in parent_counts(table, parent).values() if after == 0)
        row = by_title[match.group(0)]
        assert number(row["Rows after"]) == layout.keys + childless
        assert number(row["Rows before"]) == layout.total + childless
    # No foreign key: the rows of the request_id most often repeated, kept once.
    events = demo.Layout.at(next(t for t in demo.CHILD_TABLES if t.name == "business_events"),
                            TEST_SCALE)
    (row,) = [row for title, row in by_title.items()
              if re.match(r"\d+\. breezeway\.business_events of one request_id \(request_id = ",
                          title)]
    assert (number(row["Rows after"]), number(row["Rows before"])) == (1, events.copies(0))
    for row in queries:
        assert re.fullmatch(r"[\d.]+ m?s", row["Before"]) and re.fullmatch(r"[\d.]+ m?s",
                                                                            row["After"])
        assert number(row["Buffers before"]) > number(row["Buffers after"]) > 0
        assert re.fullmatch(r"[\d.,]+x (faster|slower)", row["Improvement"])
    assert "ran 3 times on each side with EXPLAIN (ANALYZE, BUFFERS) in a read-only " \
           "transaction" in markdown
    assert "the median execution time" in markdown
    assert "select * from \"breezeway\".\"property_photos\" where \"property_pk\" = '" in markdown


def test_queries_run_read_only_and_stop_at_the_timeout(swapped: Database) -> None:
    with swapped.connect() as conn:
        rows = conn.execute("select count(*) from breezeway.property_photos").fetchone()[0]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            report.measure(conn, sql.SQL("delete from breezeway.property_photos"), 1, 10_000)
        assert conn.execute("select count(*) from breezeway.property_photos").fetchone()[0] \
            == rows == demo.expected_counts(TEST_SCALE)["property_photos"].unique
        started = time.monotonic()
        assert report.measure(conn, sql.SQL("select pg_sleep(5)"), 3, 100) is None
        assert time.monotonic() - started < 2


VOID_TAGS = frozenset({"meta", "br", "hr", "img", "link", "input"})


class Page(HTMLParser):
    """Tags as parsed: end tags must close the innermost open one."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.problems: list[str] = []
        self.tags: list[tuple[str, dict, tuple[str, ...]]] = []
        """(tag, attributes, enclosing svg ids)"""
        self.svg: list[str] = []
        self.text: list[str] = []
        self.svg_text: list[tuple[tuple[str, ...], str, str]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes, tuple(self.svg)))
        if tag == "svg":
            self.svg.append(attributes.get("id", ""))
        if tag not in VOID_TAGS:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
            return
        self.open.pop()
        if tag == "svg":
            self.svg.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self.open and self.open[-1] == "text":
            attributes, within = self.tags[-1][1], self.tags[-1][2]
            self.svg_text.append((within, attributes.get("class", ""), data))

    def labels(self, svg_id: str, kind: str) -> list[str]:
        """The texts of one class in a chart: its ticks, its labels."""
        return [data for within, kind_of, data in self.svg_text
                if svg_id in within and kind_of == kind]

    def bars(self, svg_id: str, side: str) -> list[float]:
        return [float(a["width"]) for tag, a, within in self.tags
                if tag == "rect" and svg_id in within and a["class"].split()[:2] == ["bar", side]]


def parsed(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    assert parser.problems == [] and parser.open == [], (parser.problems, parser.open)
    return parser


def test_html_page_is_self_contained_with_a_bar_per_table_and_side(
        swapped: Database, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    assert reported(swapped, "--html", str(path), "--runs", "1") == \
        f"Wrote the report to {path}.\n"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    html = parsed(page)
    assert "http" not in page
    assert not [tag for tag, attributes, _ in html.tags
                if tag in ("script", "link", "img", "iframe") or {"src", "href"} & set(attributes)]
    logged = swap_log_bytes(swapped)
    sizes_before, sizes_after = html.bars("sizes", "before"), html.bars("sizes", "after")
    assert len(sizes_before) == len(sizes_after) == len(SWAPPED)
    assert all(before > after for before, after in zip(sizes_before, sizes_after, strict=True))
    # One scale: the largest original is the longest bar.
    largest = max(logged, key=lambda table: logged[table][0])
    assert sizes_before.index(max(sizes_before)) == sorted(logged).index(largest)
    # Two queries for each table with a parent, one for business_events.
    queries = 2 * (len(SWAPPED) - 1) + 1
    assert len(html.bars("query-times", "before")) == len(html.bars("query-times", "after")) \
        == queries
    text = "".join(html.text)
    for table in SWAPPED:
        assert f"breezeway.{table}" in text


# Once the page has laid itself out at the window's width: what sticks out to the right (a
# statement may scroll inside its own box), and which table cells cut their text off.
MEASURE = """
const width = document.documentElement.clientWidth;
const outside = [...document.body.querySelectorAll("*")]
  .filter(e => !e.parentElement.closest("pre"))
  .filter(e => e.getBoundingClientRect().right > width + 0.5)
  .map(e => e.tagName + " " + e.textContent.trim().slice(0, 80));
const clipped = [...document.querySelectorAll("th, td")]
  .filter(e => e.scrollWidth > e.clientWidth + 0.5).map(e => e.textContent);
document.body.dataset.measured = JSON.stringify({
  width, scrollWidth: document.documentElement.scrollWidth, outside, clipped,
  tables: document.querySelectorAll("table").length});
"""


def measured_in(chromium, page: Path) -> dict:
    dom = chromium.dom(browser.with_script(page, MEASURE, "measured.html").as_uri(), width=1280)
    return json.loads(html_module.unescape(re.search(r'data-measured="([^"]*)"', dom).group(1)))


def test_the_page_fits_a_1280_pixel_window(swapped: Database, chromium, tmp_path: Path) -> None:
    real = tmp_path / "report.html"
    reported(swapped, "--html", str(real), "--runs", "1")
    # The longest names PostgreSQL allows, with nowhere to break a line.
    longest = tmp_path / "longest.html"
    longest.write_text(report_view.to_html(synthetic_report("n" * 63)), encoding="utf-8")
    for page, tables in ((real, 3), (longest, 3)):
        found = measured_in(chromium, page)
        assert found["width"] == 1280
        assert (found["scrollWidth"], found["outside"], found["clipped"]) == (1280, [], []), page
        assert found["tables"] == tables
    chromium.screenshot(real.as_uri(), SCREENSHOTS / "report.png", height=2400)


def synthetic_report(name: str) -> report.Report:
    """A report by hand, for what the database would make awkward: any name at all."""
    live = Relation("s", name)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    return report.Report(
        database=name, generated_at=at, archive_schema="dedup_archive",
        tables=(report.TableReport(
            live=live, action="swap", constraint=f"{name}__natural_key", swapped_at=at,
            rows_before=100, rows_after=10, bytes_before=81920, bytes_after=8192,
            bytes_now=8192, archive=Relation("dedup_archive", f"{name}__20260102030405"),
            archive_bytes_now=81920, cleaned_at=None),),
        queries=(report.ExampleQuery(
            table=live, kind=report.ONE_KEY_VALUE, title=f"{live} of one {name} (x = 1)",
            statement=f'select * from "s"."{name}" -- ```',
            before=report.Timing(12.5, 10, 40), after=report.Timing(0.5, 1, 2)),
                 report.ExampleQuery(
            table=live, kind=report.JOINED, title=f"s.parent joined with {live}",
            statement="select 1", before=None, after=report.Timing(0.5, 10, 3))),
        queries_run=True, runs=3, timeout_ms=30_000, notes=(f"{live}: a note",))


def test_every_name_is_escaped_in_html_and_markdown() -> None:
    name = 'a<b>&"c\'|`*_d_'
    built = synthetic_report(name)
    page = report_view.to_html(built)
    assert name not in page and "<b>" not in page
    assert html_escaped(name) in page
    html = parsed(page)
    assert sum(name in text for text in html.text) >= 5
    assert len(html.bars("sizes", "before")) == len(html.bars("sizes", "after")) == 1
    markdown = report_view.to_markdown(built)
    # Verbatim in a code block only: everywhere else Markdown would read it as HTML.
    prose = re.sub(r"(`{3,})sql\n.*?\n\1", "", markdown, flags=re.DOTALL)
    assert "<b>" not in prose and "<b>" in markdown
    (row, total) = md_table(markdown, "Tables")
    assert row["Table"] == f"s.{name}" and total["Table"] == "Total"
    assert row["Smaller by"] == size_text(81920 - 8192) == "72.0 kB"
    assert ("Space runner cleanup will free: 80.0 kB (81,920 bytes), which the originals kept "
            "in dedup_archive take until then; the tables then take 8.0 kB where they took "
            "80.0 kB, 90.00% less.") in markdown
    (query, timed_out) = md_table(markdown, "Example queries")
    assert query["Query"] == f"1. s.{name} of one {name} (x = 1)"
    assert query["Improvement"] == "25.0x faster"
    # Past the statement_timeout "before" is a lower bound, drawn as long as the timeout.
    assert (timed_out["Before"], timed_out["Improvement"], timed_out["Rows before"]) == (
        "over 30 s", "over 60,000x faster", "")
    # One logarithmic scale for all the queries, from the mark below the fastest (0.5 ms) to
    # the first at or above the slowest (the 30 s timeout), drawn on 640 pixels; likewise the
    # sizes, from 1 kB below 8 kB to 100 kB.
    assert html.labels("query-times", "tick") == [
        "0.1 ms", "1 ms", "10 ms", "100 ms", "1 s", "10 s", "100 s"]
    per_decade = 640 / 6
    assert html.bars("query-times", "before") == pytest.approx(
        [per_decade * math.log10(12.5 / 0.1), per_decade * math.log10(30_000 / 0.1)], abs=0.05)
    assert html.bars("query-times", "after") == pytest.approx(
        [per_decade * math.log10(0.5 / 0.1)] * 2, abs=0.05)
    assert html.labels("sizes", "tick") == ["1 kB", "10 kB", "100 kB"]
    assert html.bars("sizes", "before") + html.bars("sizes", "after") == pytest.approx(
        [320 * math.log10(80), 320 * math.log10(8)], abs=0.05)
    assert [a["class"] for tag, a, _ in html.tags if tag == "rect"][-2:] == [
        "bar before timed-out", "bar after"]
    # The statement's own backticks cannot close its code block.
    assert f"````sql\nselect * from \"s\".\"{name}\" -- ```\n````" in markdown


def html_escaped(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


def test_json_and_select(swapped: Database) -> None:
    data = json.loads(reported(swapped, "--format", "json", "--no-queries",
                               "--select", "property_photos"))
    (table,) = data["tables"]
    expected = demo.expected_counts(TEST_SCALE)["property_photos"]
    assert (table["live"], table["rows_before"], table["rows_after"]) == (
        "breezeway.property_photos", expected.total, expected.unique)
    assert table["freed"] == data["freed"] == table["bytes_before"] - table["bytes_after"] > 0
    assert data["queries"] == [] and data["queries_run"] is False
    result = swapped.runner("report", "--select", "no_such_table")
    assert result.exit_code == 4
    assert result.output.startswith("Error: --select no_such_table: dedup_archive.swap_log "
                                    "records no swap of that table; swapped: breezeway.")


def test_before_any_swap_one_line_and_exit_1(fresh: Database) -> None:
    result = fresh.runner("report")
    assert result.exit_code == 4
    assert result.output == ("Error: no swap recorded in dedup_archive.swap_log: run "
                             "`runner swap` first\n")


def test_a_rolled_back_swap_is_not_reported_as_current(fresh: Database) -> None:
    assert fresh.runner("swap").exit_code == 0
    rollback = fresh.runner("rollback", "--select", "property_photos")
    assert rollback.exit_code == 0, rollback.output
    markdown = reported(fresh, "--no-queries")
    tables = {row["Table"] for row in md_table(markdown, "Tables")}
    assert tables == {f"breezeway.{t}" for t in SWAPPED if t != "property_photos"} | {"Total"}
    assert re.search(r"- breezeway\.property_photos: its swap at .+ was rolled back at .+, "
                     r"so the table is not reported\.", markdown), markdown
    assert number(TO_FREE.search(markdown).group(2)) == archives_size(fresh)
    selected = fresh.runner("report", "--select", "property_photos")
    assert selected.exit_code == 4
    assert selected.output == ("Error: no current swap of property_photos in "
                               "dedup_archive.swap_log: the latest swap of each was rolled back; "
                               "run `runner swap` first\n")
    assert fresh.runner("rollback").exit_code == 0
    result = fresh.runner("report")
    assert result.exit_code == 4
    assert result.output == ("Error: no current swap in dedup_archive.swap_log: the latest swap "
                             "of every table was rolled back; run `runner swap` first\n")


def test_after_cleanup_sizes_only_and_the_queries_before_is_gone(fresh: Database) -> None:
    assert fresh.runner("swap").exit_code == 0
    logged = swap_log_bytes(fresh)
    cleanup = fresh.runner("cleanup", "--older-than", "0s")
    assert cleanup.exit_code == 0, cleanup.output
    markdown = reported(fresh)
    expected = demo.expected_counts(TEST_SCALE)
    rows = {row["Table"]: row for row in md_table(markdown, "Tables")}
    for table in SWAPPED:
        row = rows[f"breezeway.{table}"]
        assert number(row["Rows before"]) == expected[table].total
        assert row["Size before"] == size_text(logged[table][0])
        assert row["Original kept in"].startswith("dropped by runner cleanup at ")
        assert re.search(rf"- {re.escape(f'breezeway.{table}')}: runner cleanup dropped its "
                         r"original .+ at .+, so the example queries' \"before\" is gone; "
                         r"sizes only\.", markdown), table
    assert md_table(markdown, "Example queries") == []
    assert "None to run: see the notes." in markdown
    assert number(FREED.search(markdown).group(2)) == sum(b - a for b, a in logged.values())
    assert TO_FREE.search(markdown) is None


def test_quoted_names_and_a_table_without_foreign_keys(shop: Database) -> None:
    assert run_other_dbt(shop, "parse").success
    project = ("--project-dir", str(OTHER_PROJECT))
    assert shop.runner("capture", *project).exit_code == 0
    assert run_other_dbt(shop, "build").success
    assert shop.runner("swap", *project).exit_code == 0
    markdown = reported(shop, *project)
    (table, _) = md_table(markdown, "Tables")
    assert (table["Table"], number(table["Rows before"]), number(table["Rows after"])) == (
        "Shop.Order Lines", 60, 15)
    # 5 orders of 3 lines, each loaded 4 times; the first order of equals is the worst case.
    (query,) = md_table(markdown, "Example queries")
    assert query["Query"] == "1. Shop.Order Lines of one Order ID (Order ID = ORD-1: the most rows)"
    assert (number(query["Rows before"]), number(query["Rows after"])) == (12, 3)
    assert """select * from "Shop"."Order Lines" where "Order ID" = 'ORD-1'""" in markdown
