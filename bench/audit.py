"""Time `runner audit` against the floor, each from a cold cache, in one run.

    python bench/audit.py --scale 0.1                                  # every demo table
    python bench/audit.py --scale 1.0 --table property_photos [--with-ranges]

Generates the demo tables once with bench/run.py's machinery (the embedded server, or the one
PGHOST points at; cold caches as root on the embedded server), parses the dbt project once, then
measures from a cold cache each:
  floor        one sequential scan of each table (bench/run.py's);
  runner audit `runner audit --select ...` as a user runs it, a process of its own (its Python
               modules read back into the page cache first: only the database is cold);
  audit call   the same audit in this process: the database's share, without Python's start;
  ranges       with --with-ranges, the alternative the audit does not use: block ranges (TID
               Range Scans) on two connections, partial counts per key merged here.
Checks the audit's counts against the demo's formula, prints the ratios and writes JSON to
bench/results/. The audit only reads, so every phase runs on the same database.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql
from run import (
    PROJECT_DIR,
    RESULTS_DIR,
    Server,
    check_disk,
    connect_to,
    dbt,
    floor_scan,
    generate_source,
    generated_bytes_at_most,
    timed,
)

from runner import demo
from runner.declaration import artifacts
from runner.facts import audit
from runner.server.connection import connect
from runner.units import size_text

RUNNER = str(Path(sys.executable).with_name("runner"))
RANGES = 64
CONNECTIONS = 2


def runner_audit(tables: list[str], target: Path) -> tuple[float, list[dict], str]:
    """The CLI from a cold database, but with Python's own files read back into the page cache
    that emptying the caches dropped too: a user's Python is rarely cold, their table may be."""
    subprocess.run([sys.executable, "-c", "import runner.cli, runner.facts.audit, rich.progress"],
                   check=True)
    command = [RUNNER, "audit", "--project-dir", str(PROJECT_DIR), "--target-path", str(target),
               "--format", "json", *[arg for t in tables for arg in ("--select", t)]]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, json.loads(done.stdout), done.stderr


def audit_call(targets: list[artifacts.DedupTarget]) -> tuple[float, dict[str, float | None]]:
    """The library's audit with the CLI's probe and estimate, the estimates noted, not shown."""
    estimates: dict[str, float | None] = {}

    def note(scan: audit.Scan) -> nullcontext:
        estimates[str(scan.relation)] = scan.estimate_seconds
        return nullcontext()

    with connect() as conn:
        return timed(lambda: audit.audit(conn, targets, note)), estimates


def _key_counts_in(target: artifacts.DedupTarget, first: int, last: int) -> sql.Composed:
    key = sql.SQL(", ").join(sql.Identifier(c) for c in target.spec.natural_key)
    return sql.SQL(
        "select {key}, count(*) from {table}"
        " where ctid >= {first}::tid and ctid < {last}::tid group by {key}"
    ).format(key=key, table=sql.Identifier(target.live.schema, target.live.name),
             first=sql.Literal(f"({first},0)"), last=sql.Literal(f"({last},0)"))


def block_ranges(targets: list[artifacts.DedupTarget]) -> tuple[float, dict[str, int]]:
    """Each table in RANGES block ranges over CONNECTIONS connections, merged per key here."""
    unique: dict[str, int] = {}
    started = time.perf_counter()
    for target in targets:
        with connect() as conn:
            blocks = conn.execute(
                "select pg_relation_size(format('%%I.%%I', %s::text, %s::text)::regclass)"
                " / current_setting('block_size')::int",
                (target.live.schema, target.live.name)).fetchone()[0]
        step = max(1, -(-blocks // RANGES))
        pending: queue.Queue = queue.Queue()
        for first in range(0, blocks, step):
            pending.put(first)
        merged: Counter = Counter()
        lock = threading.Lock()

        def scan(target=target, step=step, pending=pending, merged=merged, lock=lock) -> None:
            with connect() as conn:
                conn.execute(sql.SQL("set work_mem = {}").format(sql.Literal(audit.WORK_MEM)))
                while True:
                    try:
                        first = pending.get_nowait()
                    except queue.Empty:
                        return
                    groups = conn.execute(_key_counts_in(target, first, first + step)).fetchall()
                    with lock:
                        for *key, rows in groups:
                            merged[tuple(key)] += rows

        workers = [threading.Thread(target=scan) for _ in range(CONNECTIONS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        # Only the demo's NULL-free keys are compared, so NULL policies do not matter here.
        unique[target.live.name] = len(merged)
    return time.perf_counter() - started, unique


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--table", action="append", dest="tables",
                        help="a demo child table (repeatable); all by default")
    parser.add_argument("--with-ranges", action="store_true",
                        help="also time block ranges merged per key, the rejected alternative")
    args = parser.parse_args()
    tables = [t.name for t in demo.child_tables(args.tables)]
    expected = demo.expected_counts(args.scale)

    server = Server()
    # The generated tables only: the audit makes no copy.
    check_disk(server, generated_bytes_at_most(tables, args.scale), "the demo data")
    target = Path(tempfile.mkdtemp(prefix="bench-audit-target-"))
    source = "bench_audit"
    phases: dict[str, float] = {}
    try:
        phases["generate"] = generate_source(source, args.scale, tables)
        with connect() as conn:
            version = conn.execute("show server_version").fetchone()[0]
        dbt("parse", [], target)
        targets = artifacts.select_targets(artifacts.load_targets(target), tables)

        server.empty_caches()
        phases["floor"] = sum(floor_scan(tables).values())
        server.empty_caches()
        phases["runner audit"], rows, progress = runner_audit(tables, target)
        server.empty_caches()
        phases["audit call"], estimates = audit_call(targets)
        unique_by_ranges = None
        if args.with_ranges:
            server.empty_caches()
            phases["ranges"], unique_by_ranges = block_ranges(targets)
    finally:
        with connect_to("postgres") as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(
                sql.Identifier(source)))
        server.stop()
        shutil.rmtree(target, ignore_errors=True)

    measured = {row["table"]: row for row in rows}
    wrong = [name for name in tables
             if (measured[f"{demo.DEMO_SCHEMA}.{name}"]["total_rows"],
                 measured[f"{demo.DEMO_SCHEMA}.{name}"]["unique_rows"],
                 measured[f"{demo.DEMO_SCHEMA}.{name}"]["null_key_rows"])
             != (expected[name].total, expected[name].unique, expected[name].null_keys)]
    wrong += [name for name, unique in (unique_by_ranges or {}).items()
              if expected[name].null_keys == 0 and unique != expected[name].unique]
    ratios = {f"{phase} / floor": phases[phase] / phases["floor"]
              for phase in ("runner audit", "audit call", "ranges") if phase in phases}
    report = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scale": args.scale, "tables": tables, "cold_cache": server.cold, "postgres": version,
        "seconds": phases, "ratios": ratios, "audit_stderr": progress.splitlines(),
        "audit_call_estimates": estimates,
        "bytes": sum(measured[f"{demo.DEMO_SCHEMA}.{name}"]["bytes"] for name in tables),
        "counts_as_expected": not wrong,
    }
    cache = "cold" if server.cold else "WARM (not root or not embedded: caches not emptied)"
    print(f"scale {args.scale}, {', '.join(tables)} ({size_text(report['bytes'])}), "
          f"PostgreSQL {version}, {cache} cache")
    print(f"{'phase':<14}{'seconds':>10}{'x floor':>10}")
    for phase, seconds in phases.items():
        print(f"{phase:<14}{seconds:>10.2f}{seconds / phases['floor']:>10.2f}")
    for line in report["audit_stderr"]:
        print(f"runner audit said: {line}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"audit-{report['when'].replace(':', '')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    if wrong:
        sys.exit(f"bench: the audit's counts differ from the demo's for {', '.join(wrong)}")


if __name__ == "__main__":
    try:
        main()
    except psycopg.Error as error:
        sys.exit(f"bench: {error}")
