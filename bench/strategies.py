"""Swap against in place against auto, on identical copies of one table, in one run:

    python bench/strategies.py                                  # 2 million rows, 1% and 99.7%
    python bench/strategies.py --rows 4000000 --share 0.01 --share 0.25 --share 0.5
    python bench/strategies.py --share 0.01 --share 0.15 --referenced 10

For each share of duplicate rows, a table of that many rows (an id, a key, a 256-byte text and a
load time; a key's copies loaded later, the latest kept) in a project of its own made with
`runner init` and `runner add` (with --referenced N, a table of notes points at every N-th row,
copies included, for both strategies to re-point); then on a fresh copy of it each, from a cold
cache where the machine allows it (root on the embedded server), else warm and marked so:
  floor     one sequential scan of the table;
  index     CREATE UNIQUE INDEX CONCURRENTLY on the natural key of the table with its
            duplicates deleted: the one step in place cannot do without, timed alone;
  by hand   in place as a DBA would run it by hand, bare: the removed rows archived and
            deleted in one statement, that index, the constraint (no writer, guard or proof;
            not with --referenced, whose notes would forbid the DELETE);
  swap      `runner build` (capture, then dbt build) and `runner swap` with strategy: swap,
            each also timed on its own;
  in_place  the same with strategy: in_place;
  auto      the same with strategy: auto: `runner build` chooses from the audit's count, and
            the swap follows.
During each job a writer in a process of its own re-sends copies of rows with INSERT ... ON
CONFLICT DO NOTHING, as the ETL did; its p99 and worst write are printed. Also: the database's
growth at its peak (sampled every 50 ms) and after the job, the WAL the server wrote, and how
long the cut-over held the table's lock. Prints ratios to the faster strategy and to the floor,
and writes JSON to bench/results/. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import items
import psycopg
import yaml
from psycopg import sql
from run import RESULTS_DIR, Server, connect_to, timed

from runner.jobs import swap
from runner.server.connection import connect

SOURCE = "bench_strategies_source"
COPY = "bench_strategies"
STRATEGIES = ("swap", "in_place", "auto")


def load(rows: int, share: float, referenced: int | None) -> int:
    """The source database with public.items (and public.item_notes pointing at every
    `referenced`-th item); returns its unique keys."""
    with connect_to("postgres") as admin:
        for name in (COPY, SOURCE):
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(
                sql.Identifier(name)))
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(SOURCE)))
    with connect_to(SOURCE) as conn:
        keys = items.create(conn, rows, share)
        if referenced:
            items.add_notes(conn, referenced)
        conn.execute("vacuum analyze")
    return keys


def make_project(directory: Path) -> None:
    runner = [sys.executable, "-m", "runner"]
    subprocess.run([*runner, "init", str(directory), "--quiet"], check=True)
    subprocess.run([*runner, "add", "public.items", "--key", "k", "--keep", "id",
                    "--project-dir", str(directory), "--quiet"], check=True)


def declare(project: Path, strategy: str) -> None:
    """The table's meta.dedup says `strategy`; its models follow (`runner models`)."""
    path = next((project / "models").rglob("_public__sources.yml"))
    document = yaml.safe_load(path.read_text())
    document["sources"][0]["tables"][0]["config"]["meta"]["dedup"]["strategy"] = strategy
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    subprocess.run([sys.executable, "-m", "runner", "models", "--project-dir", str(project),
                    "--quiet"], check=True)


def floor_scan() -> float:
    with connect_to(COPY) as conn:
        conn.execute("set enable_indexscan = off")
        conn.execute("set enable_bitmapscan = off")
        return timed(lambda: conn.execute("select count(*) from public.items").fetchone())


def unique_index_alone(server: Server) -> float:
    """The natural key's unique index, built CONCURRENTLY on a copy without duplicates (the
    latest row of each key kept), from a cold cache."""
    fresh_copy()
    with connect_to(COPY) as conn:
        conn.execute("delete from public.items as a using public.items as b"
                     " where a.k = b.k and a.id < b.id")
        conn.execute("vacuum analyze public.items")
    server.empty_caches()
    with connect_to(COPY) as conn:
        return timed(lambda: conn.execute(
            "create unique index concurrently items_k on public.items (k)"))


def by_hand(server: Server) -> float:
    """In place as a DBA would run it by hand, bare: no writer, no guard, no proof of the
    archive, no re-pointing. The removed rows moved to an archive in one statement, then the
    natural key's unique index built CONCURRENTLY and made the constraint; on a fresh copy,
    from a cold cache."""
    fresh_copy()
    server.empty_caches()
    with connect_to(COPY) as conn:
        return timed(lambda: [conn.execute(statement) for statement in (
            "create table public.items_removed (like public.items)",
            "with removed as (delete from public.items as a where exists (select from"
            " public.items as b where b.k = a.k and b.id > a.id) returning a.*)"
            " insert into public.items_removed select * from removed",
            "create unique index concurrently items_k on public.items (k)",
            "alter table public.items add constraint items_k unique using index items_k")])


def fresh_copy() -> None:
    with connect_to("postgres") as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(
            sql.Identifier(COPY)))
        admin.execute(sql.SQL("create database {} template {}").format(
            sql.Identifier(COPY), sql.Identifier(SOURCE)))


def resend_copies(conninfo: dict, stop, results: str) -> None:
    """Copies of existing rows, ~500 a second; writes [start, seconds] of each to results."""
    writes = []
    with psycopg.connect(autocommit=True, **conninfo) as conn:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            conn.execute("insert into public.items (k, payload, loaded_at) select k, payload,"
                         " now() from public.items where id = %s on conflict do nothing",
                         (n % 1000 + 1,))
            writes.append([started, time.monotonic() - started])
            n += 1
            time.sleep(0.002)
    Path(results).write_text(json.dumps(writes))


class PeakSize:
    """The database's size, sampled every 50 ms while the block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with connect_to(COPY) as conn:
            while not self._stop.is_set():
                size = conn.execute("select pg_database_size(current_database())").fetchone()[0]
                self.peak = max(self.peak, size)
                time.sleep(0.05)

    def __enter__(self) -> PeakSize:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def database_size() -> int:
    with connect_to(COPY) as conn:
        return conn.execute("select pg_database_size(current_database())").fetchone()[0]


def wal_bytes() -> int:
    with connect_to(COPY) as conn:
        return int(conn.execute("select wal_bytes from pg_stat_wal").fetchone()[0])


def job(server: Server, project: Path, strategy: str) -> dict:
    """Build and swap on a fresh copy, with the writer writing throughout."""
    fresh_copy()
    os.environ["PGDATABASE"] = COPY
    declare(project, strategy)
    target = project / "target"
    server.empty_caches()
    before, wal_before = database_size(), wal_bytes()
    stop, results = multiprocessing.Event(), project / "writer.json"
    conninfo = {"host": os.environ["PGHOST"], "port": os.environ["PGPORT"],
                "user": os.environ.get("PGUSER", "postgres"), "dbname": COPY}
    writer = multiprocessing.Process(target=resend_copies, args=(conninfo, stop, str(results)))
    writer.start()
    try:
        with PeakSize() as peak:
            build = timed(lambda: subprocess.run(
                [sys.executable, "-m", "runner", "build", "--project-dir", str(project),
                 "--quiet"], check=True, stdout=subprocess.DEVNULL))
            options = swap.SwapOptions(target_dir=target)
            started = time.perf_counter()
            with connect() as conn:
                plans = swap.make_plans(conn, options)
                result = swap.execute(conn, plans, options)
            swapped = time.perf_counter() - started
    finally:
        stop.set()
        writer.join()
    latencies = sorted(s for _, s in json.loads(results.read_text()))
    return {"seconds": build + swapped, "build": build,
            "swap": swapped, "chose": plans[0].action, "why": plans[0].why,
            "peak_growth": peak.peak - before, "growth_after": database_size() - before,
            "wal": wal_bytes() - wal_before, "lock_ms": result.lock_ms,
            "writer_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "writer_worst_ms": latencies[-1] * 1000, "writes": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--share", type=float, action="append", dest="shares",
                        help="share of duplicate rows (repeatable) [default: 0.01 and 0.997]")
    parser.add_argument("--strategy", action="append", dest="strategies", choices=STRATEGIES,
                        help="only these (repeatable) [default: all three]")
    parser.add_argument("--referenced", type=int, metavar="N",
                        help="a table of notes points at every N-th row [default: none]")
    args = parser.parse_args()
    shares = args.shares or [0.01, 0.997]
    strategies = args.strategies or list(STRATEGIES)
    server = Server()
    workdir = Path(tempfile.mkdtemp(prefix="bench-strategies-"))
    project = workdir / "project"
    measured = []
    try:
        make_project(project)
        for share in shares:
            keys = load(args.rows, share, args.referenced)
            index = unique_index_alone(server)
            # By hand, a removed row that a note points at could not be deleted.
            hand = None if args.referenced else by_hand(server)
            for strategy in strategies:
                fresh_copy()
                server.empty_caches()
                floor = floor_scan()
                measured.append({"rows": args.rows, "share": share, "keys": keys,
                                 "referenced_every": args.referenced,
                                 "strategy": strategy, "floor": floor, "index": index,
                                 "by_hand": hand,
                                 **job(server, project, strategy)})
                print(json.dumps(measured[-1]), flush=True)
    finally:
        with connect_to("postgres") as admin:
            for name in (COPY, SOURCE):
                admin.execute(sql.SQL("drop database if exists {} with (force)").format(
                    sql.Identifier(name)))
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    cache = "cold" if server.cold else "WARM (not root or not embedded: caches not emptied)"
    notes = f", notes on every {args.referenced}-th row" if args.referenced else ""
    print(f"\n{args.rows:,} rows{notes}, {cache} cache")
    print(f"{'share':>7} {'strategy':<9}{'chose':<9}{'seconds':>8}{'x floor':>8}{'x best':>7}"
          f"{'build':>6}{'swap':>6}{'peak MB':>8}{'after MB':>9}{'WAL MB':>8}{'lock ms':>8}"
          f"{'p99 ms':>7}{'worst':>7}")
    for share in shares:
        rows = [m for m in measured if m["share"] == share]
        best = min(m["seconds"] for m in rows if m["strategy"] != "auto")
        for m in rows:
            print(f"{share:>7.1%} {m['strategy']:<9}{m['chose']:<9}{m['seconds']:>8.1f}"
                  f"{m['seconds'] / m['floor']:>8.1f}{m['seconds'] / best:>7.2f}"
                  f"{m['build']:>6.1f}{m['swap']:>6.1f}"
                  f"{m['peak_growth'] / 1e6:>8.0f}{m['growth_after'] / 1e6:>9.0f}"
                  f"{m['wal'] / 1e6:>8.0f}{m['lock_ms']:>8.0f}{m['writer_p99_ms']:>7.1f}"
                  f"{m['writer_worst_ms']:>7.0f}")
        print(f"{'':>8}floor {rows[0]['floor']:.2f} s (one sequential scan); unique index "
              f"alone {rows[0]['index']:.2f} s, {rows[0]['index'] / rows[0]['floor']:.1f}x "
              "the floor (CREATE UNIQUE INDEX CONCURRENTLY without duplicates)")
        if rows[0]["by_hand"] is not None:
            print(f"{'':>8}in place by hand {rows[0]['by_hand']:.2f} s, "
                  f"{rows[0]['by_hand'] / rows[0]['floor']:.1f}x the floor (archive and "
                  "DELETE the removed rows, the unique index CONCURRENTLY, the constraint: no "
                  "writer, guard or proof)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"strategies-{when}.json"
    out.write_text(json.dumps({"cold_cache": server.cold, "measured": measured}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
