"""Time the swap's proof that every kept row equals its live row, in its two forms, against one
sequential scan of the live table, in one run:

    python bench/proof.py                                   # 2 million rows, 1% and 99.7%
    python bench/proof.py --rows 4000000 --share 0.01 --share 0.5

For each share of duplicate rows, a table of that many rows (an id, a key, a 256-byte text and a
load time, the copies of a key loaded again later) and its kept rows, the latest copy of each
key, as dbt builds them; then, each from a cold cache where the machine allows it (root on the
embedded server), else warm and marked so:
  floor   one sequential scan of the live table;
  probes  the proof as a probe of the live table's id index per kept row;
  join    the proof as one join of the kept rows with the live table.
Both proofs are the runner's own statements (runner.statements.capture.replay), run against a
real change capture's log. The swap takes the join where at least half the rows are kept.
Prints the ratios to the floor and writes JSON to bench/results/. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

import items
from psycopg import sql
from run import RESULTS_DIR, Server, connect_to

from runner.declaration.artifacts import DedupSpec, KeepColumn, Relation
from runner.server import catalog
from runner.server.connection import connect
from runner.statements import capture

DATABASE = "bench_proof"
ARCHIVE = "dedup_archive"
LIVE = Relation("public", "items")
KEPT = Relation("public", "items_kept")
SPEC = DedupSpec(("k",), (KeepColumn("id", True),), "not_distinct", ())


def load(rows: int, share: float) -> tuple[int, int]:
    """The live table, its kept rows and a change capture; returns (rows, kept rows)."""
    with connect() as admin:
        admin.autocommit = True
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(
            sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(DATABASE)))
    with connect_to(DATABASE) as conn:
        items.create(conn, rows, share)
        conn.execute("create table public.items_kept as select distinct on (k) * from"
                     " public.items order by k, id desc")
        conn.execute("create unique index on public.items_kept (id)")
        conn.execute("vacuum analyze public.items, public.items_kept")
        conn.execute(capture.ensure_schema(ARCHIVE))
        conn.execute(capture.registry_table(ARCHIVE))
        with conn.transaction():
            for statement in capture.install(capture.Capture.before_swap(LIVE, ARCHIVE)):
                conn.execute(statement)
        kept = conn.execute("select count(*) from public.items_kept").fetchone()[0]
    return rows, kept


def measure(server: Server, statement: sql.Composable) -> float:
    server.empty_caches()
    with connect_to(DATABASE) as conn:
        started = time.perf_counter()
        conn.execute(statement).fetchone()
        return time.perf_counter() - started


def run(server: Server, rows: int, share: float) -> dict:
    rows, kept = load(rows, share)
    with connect_to(DATABASE) as conn:
        columns = catalog.read_live_table(conn, LIVE).columns

    def proof(most_rows_kept: bool) -> sql.Composed:
        return capture.replay(SPEC, LIVE, KEPT, capture.Capture.before_swap(LIVE, ARCHIVE).log,
                              columns, most_rows_kept=most_rows_kept).all_rows_match

    floor = measure(server, sql.SQL("select count(*) from (select * from {} offset 0) as t"
                                    ).format(sql.Identifier(LIVE.schema, LIVE.name)))
    probes, joined = measure(server, proof(False)), measure(server, proof(True))
    return {"rows": rows, "kept": kept, "share": share, "floor_s": floor, "probes_s": probes,
            "join_s": joined, "swap_takes": "join" if 2 * kept >= rows else "probes"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--share", type=float, action="append",
                        help="share of the rows that are duplicates (repeatable); 0.01 and "
                             "0.997 by default")
    options = parser.parse_args()
    server = Server()
    try:
        results = [run(server, options.rows, share) for share in options.share or [0.01, 0.997]]
    finally:
        server.stop()
    cache = "cold" if server.cold else "warm (not root, or not the embedded server)"
    print(f"{'duplicates':>10} {'rows':>11} {'kept':>11} {'floor':>8} {'probes':>16}"
          f" {'join':>16}  swap takes   ({cache} cache)")
    for r in results:
        print(f"{r['share']:>10.1%} {r['rows']:>11,} {r['kept']:>11,} {r['floor_s']:>7.2f}s"
              f" {r['probes_s']:>7.2f}s {r['probes_s'] / r['floor_s']:>6.1f}x"
              f" {r['join_s']:>7.2f}s {r['join_s'] / r['floor_s']:>6.1f}x  {r['swap_takes']}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"proof-{stamp}.json").write_text(json.dumps(
        {"cache": cache, "results": results}, indent=2))


if __name__ == "__main__":
    main()
