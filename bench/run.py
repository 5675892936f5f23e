"""Time the whole job against the floor and against the incident documents' own plans.

    python bench/run.py --scale 0.1                       # every demo table
    python bench/run.py --scale 1.0 --table property_photos [--explain] [--skip-seed-plans]

Generates the demo data once on the embedded server (or the server PGHOST points at), then
works on identical copies of it (CREATE DATABASE ... TEMPLATE), each from a cold cache where the
machine allows it (root: restart PostgreSQL and drop the OS page cache; otherwise the numbers
are warm and marked so):
  floor      one sequential scan of each child table's heap (index scans are switched off: a
             plain count(*) would be answered from the primary key);
  dbt start  dbt's fixed cost: a build that selects nothing, after an untimed dbt parse;
  dbt build  the dedup models and their tests for the chosen tables;
  swap       runner swap of the chosen tables, and how long it held the lock; meanwhile a
             writer in a process of its own re-inserts copies of rows into the first table, as
             the ETL did, from before the build until after the rollback;
  rollback   runner rollback of the same tables right after, the writer still writing (copies,
             and updates the capture since the swap logs): not part of the job, timed for its
             lock beside the swap's;
  path A     000_648f24a0cfaa4c82.txt's Path A, as written, on its own copy;
  seed 003   003_9b81cec79fade74f.txt's Part 4.2, as written, on its own copy.
After each, the live tables' rows and bytes, without and with indexes, also as multiples of
the unique rows copied compactly (CREATE TABLE AS of this project's result: no slack).
Prints one table with the ratios and writes it as JSON to bench/results/. Not part of the test
suite: at scale 1.0 Path A alone takes minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import seed_plans
import yaml
from psycopg import sql

from runner import demo
from runner.declaration import artifacts
from runner.execution import locking
from runner.facts import audit
from runner.jobs import capturing, rollback, swap
from runner.server.connection import connect, uses_embedded
from runner.server.embedded import EmbeddedPostgres, default_data_dir

PROJECT_DIR = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_DIR / "bench" / "results"


class Server:
    """The database under test, and how to empty every cache between phases."""

    def __init__(self) -> None:
        self.embedded = None
        if uses_embedded():
            self.embedded = EmbeddedPostgres(default_data_dir(PROJECT_DIR), dbname="bench")
            self.embedded.start()
            os.environ.update(self.embedded.environ())
        self.cold = self.embedded is not None and os.geteuid() == 0

    def empty_caches(self) -> None:
        """Restart PostgreSQL (shared buffers) and drop the OS page cache, as root only."""
        if not self.cold:
            return
        self.embedded.stop(force=True)
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        self.embedded.start()
        # Most likely the same port (dbt then keeps its partial parse); the same database.
        os.environ["PGPORT"] = self.embedded.environ()["PGPORT"]

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _written() -> tuple[int, int]:
    """WAL bytes the whole server has written, and temporary-file bytes of this database."""
    with connect() as conn:
        wal, temp = conn.execute(
            "select (select wal_bytes from pg_stat_wal)::bigint, temp_bytes"
            " from pg_stat_database where datname = current_database()").fetchone()
    return wal, temp


@contextlib.contextmanager
def counting_writes(name: str, writes: dict[str, tuple[int, int]]):
    """writes[name] = (WAL bytes, temp-file bytes) written while the block ran."""
    wal_before, temp_before = _written()
    yield
    wal_after, temp_after = _written()
    writes[name] = (wal_after - wal_before, temp_after - temp_before)


def floor_scan(tables: list[str]) -> dict[str, float]:
    """Seconds of one sequential scan of each table, one after the other."""
    with connect() as conn:
        conn.execute("set enable_indexscan = off")
        conn.execute("set enable_indexonlyscan = off")
        conn.execute("set enable_bitmapscan = off")
        seconds = {}
        for table in tables:
            statement = sql.SQL("select count(*) from {}").format(
                sql.Identifier(demo.DEMO_SCHEMA, table))
            started = time.perf_counter()
            conn.execute(statement).fetchone()
            seconds[table] = time.perf_counter() - started
        return seconds


def node_seconds_by_table(target: Path, tables: list[str]) -> dict[str, dict[str, float]]:
    """From the build's run_results: per table, the seconds of the nodes that read it alone
    ("nodes"), and of its key-groups model among them ("key groups"). A node that reads
    several of the tables (the audit) counts under "shared". Nodes ran two at a time, so
    these overlap in time and their sum can exceed the build's."""
    manifest = json.loads((target / "manifest.json").read_text())
    results = json.loads((target / "run_results.json").read_text())["results"]
    parents = manifest["parent_map"]
    targets = artifacts.select_targets(artifacts.load_targets(target), tables)
    project = manifest["metadata"]["project_name"]
    sources = {f"source.{project}.{t.source}": t.name for t in targets}
    key_groups = {t.key_groups.name: t.name for t in targets}

    def tables_read(node: str, seen: set[str]) -> set[str]:
        if node in sources:
            return {sources[node]}
        found = set()
        for parent in parents.get(node, []):
            if parent not in seen:
                seen.add(parent)
                found |= tables_read(parent, seen)
        return found

    seconds = {t: {"nodes": 0.0, "key groups": 0.0} for t in [*tables, "shared"]}
    for result in results:
        read = tables_read(result["unique_id"], set())
        owner = read.pop() if len(read) == 1 else "shared"
        seconds[owner]["nodes"] += result["execution_time"]
        alias = manifest["nodes"][result["unique_id"]].get("alias")
        if key_groups.get(alias) == owner:
            seconds[owner]["key groups"] += result["execution_time"]
    return seconds


def dbt_arguments(command: str, target: Path, selection: list[str]) -> list[str]:
    """dbt invoked the runner's one way, in a process of its own, as the `dbt` command is."""
    return [sys.executable, "-m", "runner.declaration.dbt", str(PROJECT_DIR), str(target),
            command, *selection]


def dbt(command: str, selection: list[str], target: Path, *, show: bool = True) -> float:
    """Seconds the dbt command took; show=False hides what it prints (compile prints SQL)."""
    output = None if show else subprocess.DEVNULL
    return timed(lambda: subprocess.run(dbt_arguments(command, target, selection), check=True,
                                        stdout=output))


def explain_key_groups(targets: list[artifacts.DedupTarget], target: Path) -> dict[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of each table's key-groups query, as dbt compiles it, under the
    settings its model's pre-hooks make: the audit's, and for a keep rule of several columns,
    which sorts, the project's dedup_sort_work_mem (macro dedup_key_groups_work_mem); nothing is
    written."""
    sort_work_mem = yaml.safe_load(
        (PROJECT_DIR / "dbt_project.yml").read_text())["vars"]["dedup_sort_work_mem"]
    models = [t.key_groups.name for t in targets]
    # The views they read, which only the build would create otherwise.
    dbt("run", ["--select", *[f"+{m}" for m in models], "--exclude", *models], target)
    dbt("compile", ["--select", *models], target, show=False)
    nodes = json.loads((target / "manifest.json").read_text())["nodes"].values()
    explained = {}
    with connect() as conn:
        for table in targets:
            node = next(n for n in nodes if n["resource_type"] == "model"
                        and (n["schema"], n["alias"]) == (table.key_groups.schema,
                                                          table.key_groups.name))
            with conn.transaction():
                for setting in audit.session_settings():
                    conn.execute(setting)
                if len(table.spec.keep) > 1:
                    conn.execute(sql.SQL("set local work_mem = {}").format(
                        sql.Literal(sort_work_mem)))
                plan = conn.execute(sql.SQL("explain (analyze, buffers) {}").format(
                    sql.SQL(node["compiled_code"]))).fetchall()
            explained[table.name] = "\n".join(line for line, in plan)
    return explained


def write_like_the_etl(conninfo: dict, table: str, stop, results: str) -> None:
    """Copies of existing rows, INSERT ... ON CONFLICT DO NOTHING, and every fourth time an
    update of the latest row, ~500 writes a second. Writes [start, seconds] of each to results;
    time.monotonic() is one clock for every process."""
    writes = []
    with psycopg.connect(autocommit=True, **conninfo) as conn:
        columns = [r[0] for r in conn.execute(
            "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0"
            " and not attisdropped and attname <> 'id' order by attnum",
            (f"{demo.DEMO_SCHEMA}.{table}",))]
        statement = sql.SQL(
            "insert into {t} ({cols}) select {cols} from {t} where id = %s"
            " on conflict do nothing").format(
                t=sql.Identifier(demo.DEMO_SCHEMA, table),
                cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns))
        # After the swap the copies conflict with the kept rows; the updates go on being writes
        # for the capture since the swap, which a rollback carries over.
        touch = sql.SQL("update {t} set {c} = {c} where id = (select max(id) from {t})").format(
            t=sql.Identifier(demo.DEMO_SCHEMA, table), c=sql.Identifier(columns[-1]))
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            if n % 4 == 3:
                conn.execute(touch)
            else:
                conn.execute(statement, (n % 1000 + 1,))
            writes.append([started, time.monotonic() - started])
            n += 1
            time.sleep(0.002)
    Path(results).write_text(json.dumps(writes))


def _when(moment: float, spans: dict[str, tuple[float, float]]) -> str:
    """Which phase a moment fell in, and how far into it."""
    for name, (start, end) in spans.items():
        if start <= moment <= end:
            return f"{moment - start:.1f} s into {name}"
    return "between phases"


def _copy(source: str, name: str) -> None:
    """A fresh copy to measure on; the one measured before it is dropped, so that the disk
    holds the source and one copy at a time."""
    with connect_to("postgres") as admin:
        previous = os.environ.get("PGDATABASE")
        if previous and previous not in (source, name):
            _drop(admin, previous)
        _drop(admin, name)
        admin.execute(sql.SQL("create database {} template {}").format(
            sql.Identifier(name), sql.Identifier(source)))
    os.environ["PGDATABASE"] = name


def _drop(admin: psycopg.Connection, name: str) -> None:
    admin.execute(sql.SQL("drop database if exists {} with (force)").format(
        sql.Identifier(name)))


def check_disk(server: Server, need: int, what: str) -> None:
    """Exit unless the embedded server's disk has `need` bytes free, plus room for the WAL
    written in between (a run at scale 1.0 filled a disk once). Only that disk can be checked."""
    if server.embedded is None:
        return
    need += 10 * 2**30
    free = shutil.disk_usage(server.embedded.data_dir).free
    if free < need:
        sys.exit(f"bench: {free / 2**30:.0f} GiB free beside {server.embedded.data_dir}, "
                 f"about {need / 2**30:.0f} GiB needed for {what}: free some space or "
                 "choose a smaller --scale or fewer --table")


def generated_bytes_at_most(tables: list[str], scale: float) -> int:
    """An upper bound on the demo tables' size before they exist: every row as wide as a
    property photo's."""
    rows = sum(count.total for name, count in demo.expected_counts(scale).items()
               if name in tables)
    return rows * 1100


def database_bytes(name: str) -> int:
    with connect_to("postgres") as admin:
        return admin.execute("select pg_database_size(%s)", (name,)).fetchone()[0]


def generate_source(name: str, scale: float, tables: list[str]) -> float:
    """A new database `name` with the demo data, which becomes PGDATABASE; the seconds that
    generating took."""
    with connect_to("postgres") as admin:
        _drop(admin, name)
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    os.environ["PGDATABASE"] = name
    with connect() as conn:
        return timed(lambda: demo.generate(conn, scale, tables=tables))


def connect_to(dbname: str) -> psycopg.Connection:
    return psycopg.connect(autocommit=True, dbname=dbname)


# The rows' space: the main fork of the heap and of its TOAST table. The free space and
# visibility maps are left out: a table not yet vacuumed has none, and at small scale their few
# pages per table would outweigh the rows.
ROW_BYTES = """
    pg_relation_size(%(t)s::regclass)
    + coalesce(pg_relation_size(nullif((select reltoastrelid from pg_class
                                        where oid = %(t)s::regclass), 0)), 0)
"""


def _measure(tables: list[str]) -> tuple[int, int, int]:
    """Rows, the rows' bytes (ROW_BYTES) and total bytes (with indexes and maps) of the live
    tables."""
    with connect() as conn:
        rows = table_bytes = total_bytes = 0
        for table in tables:
            name = f"{demo.DEMO_SCHEMA}.{table}"
            rows += conn.execute(sql.SQL("select count(*) from {}").format(
                sql.Identifier(demo.DEMO_SCHEMA, table))).fetchone()[0]
            sizes = conn.execute(f"select {ROW_BYTES}, pg_total_relation_size(%(t)s::regclass)",
                                 {"t": name}).fetchone()
            table_bytes += sizes[0]
            total_bytes += sizes[1]
    return rows, table_bytes, total_bytes


def _compact_bytes(tables: list[str]) -> int:
    """The live tables' rows copied into new tables, their ROW_BYTES: the space the unique rows
    take with no slack, against which the space each plan leaves is compared."""
    with connect() as conn, conn.transaction():
        total = 0
        for table in tables:
            conn.execute(sql.SQL("create temporary table compact_copy on commit drop as"
                                 " select * from {}").format(
                sql.Identifier(demo.DEMO_SCHEMA, table)))
            total += conn.execute(f"select {ROW_BYTES}", {"t": "compact_copy"}).fetchone()[0]
            conn.execute("drop table compact_copy")
    return total


def _timed_statements(statements: list[sql.Composed], in_transaction: bool) -> float:
    with connect() as conn:
        started = time.perf_counter()
        if in_transaction:
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement)
        else:
            for statement in statements:
                conn.execute(statement)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--table", action="append", dest="tables",
                        help="a demo child table (repeatable); all by default")
    parser.add_argument("--skip-seed-plans", action="store_true",
                        help="time only this project against the floor")
    parser.add_argument("--explain", action="store_true",
                        help="also print EXPLAIN (ANALYZE, BUFFERS) of each key-groups query, "
                             "from a cold cache, before the build")
    args = parser.parse_args()
    tables = [t.name for t in demo.child_tables(args.tables)]
    every_table = len(tables) == len(demo.CHILD_TABLES)
    # The CI guard's tests on the live tables are no part of the job (a plain `dbt build`
    # leaves them out, but an explicit --select replaces that default).
    # The audit model reads every table's key groups, so it needs them all built.
    selection = ["--select", *[f"source:breezeway.{t}+" for t in tables],
                 "--exclude", "tag:dedup_guard", *([] if every_table else ["audit_duplicates"])]

    server = Server()
    check_disk(server, generated_bytes_at_most(tables, args.scale), "the demo data")
    target = Path(tempfile.mkdtemp(prefix="bench-target-"))
    source = "bench_source"
    phases: dict[str, float] = {}
    writes: dict[str, tuple[int, int]] = {}
    after: dict[str, tuple[int, int, int]] = {}
    try:
        phases["generate"] = generate_source(source, args.scale, tables)
        before = _measure(tables)
        # Beside the source: one copy at a time, and Path A's archive of the duplicates.
        copies = 1 if args.skip_seed_plans else 2
        check_disk(server, copies * database_bytes(source), f"{copies} copies of the data")

        _copy(source, "bench_ours")
        server.empty_caches()
        with counting_writes("floor", writes):
            floors = floor_scan(tables)
            phases["floor"] = sum(floors.values())
        # Untimed, as any project that has been parsed before: dbt start and dbt build then
        # both read the partial parse, as they would on a user's machine.
        dbt("parse", [], target)
        phases["dbt start"] = dbt("build", ["--select", "tag:selects_nothing"], target)
        options = swap.SwapOptions(target_dir=target, select=tables)
        specs = {t.live.name: t for t in artifacts.select_targets(
            artifacts.load_targets(target), tables)}
        explained = {}
        if args.explain:
            server.empty_caches()
            explained = explain_key_groups(list(specs.values()), target)
        with connect() as conn:
            capturing.start(conn, list(specs.values()),
                            locking.LockOptions(options.archive_schema))
        server.empty_caches()
        stop = multiprocessing.Event()
        writer_results = target / "writer.json"
        conninfo = {name.lower().removeprefix("pg"): os.environ[name]
                    for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE")}
        conninfo["dbname"] = conninfo.pop("database")
        writer = multiprocessing.Process(target=write_like_the_etl, args=(
            conninfo, tables[0], stop, str(writer_results)))
        writer.start()
        spans: dict[str, tuple[float, float]] = {}
        try:
            with counting_writes("dbt build", writes):
                started = time.monotonic()
                phases["dbt build"] = dbt("build", selection, target)
                spans["dbt build"] = (started, time.monotonic())
            with counting_writes("swap", writes), connect() as conn:
                started = time.monotonic()
                result = swap.execute(conn, swap.make_plans(conn, options), options)
                spans["swap"] = (started, time.monotonic())
                phases["swap"] = spans["swap"][1] - started
            after["this project"] = _measure(tables)
            compact = _compact_bytes(tables)
            # The rollback, as an operator would run it while the ETL writes: not part of the
            # job, timed for its lock beside the swap's.
            with counting_writes("rollback", writes), connect() as conn:
                started = time.monotonic()
                undo = rollback.RollbackOptions(select=[
                    plan.target.live.name for plan in result.plans if plan.action != "nothing"])
                undone = rollback.execute(conn, rollback.make_plans(conn, undo), undo)
                spans["rollback"] = (started, time.monotonic())
                phases["rollback"] = spans["rollback"][1] - started
        finally:
            time.sleep(0.5)
            stop.set()
            writer.join()
        by_table = node_seconds_by_table(target, tables)
        timed_writes = json.loads(writer_results.read_text())
        latencies = sorted(seconds for _, seconds in timed_writes)
        worst_at = _when(max(timed_writes, key=lambda w: w[1])[0], spans)
        with connect() as conn:
            version = conn.execute("show server_version").fetchone()[0]

        if not args.skip_seed_plans:
            for name, build, in_transaction in (
                ("path A", seed_plans.path_a, False), ("seed 003", seed_plans.seed_003, True),
            ):
                _copy(source, f"bench_{name.replace(' ', '_')}")
                server.empty_caches()
                statements = [s for t in tables for s in build(specs[t].live, specs[t].spec)]
                with counting_writes(name, writes):
                    phases[name] = _timed_statements(statements, in_transaction)
                after[name] = _measure(tables)
    finally:
        with connect_to("postgres") as admin:
            for name in (os.environ.get("PGDATABASE"), source):
                if name and name != "postgres":
                    _drop(admin, name)
        server.stop()
        shutil.rmtree(target, ignore_errors=True)

    job = phases["dbt build"] + phases["swap"]
    ratios = {"job / floor": job / phases["floor"]}
    for name in ("path A", "seed 003"):
        if name in phases:
            ratios[f"{name} / job"] = phases[name] / job
    report = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scale": args.scale, "tables": tables, "cold_cache": server.cold,
        "postgres": version, "seconds": phases, "job_seconds": job, "ratios": ratios,
        "wal_and_temp_bytes": writes,
        "per_table": {t: {"floor": floors.get(t), **seconds} for t, seconds in by_table.items()},
        "key_groups_plans": explained,
        "lock_ms": result.lock_ms, "lock_attempts": result.attempts,
        "replayed_writes": result.replayed,
        "rollback_lock_ms": undone.lock_ms, "rollback_lock_attempts": undone.attempts,
        "rollback_carried_writes": {str(t): list(c) for t, c in undone.carried.items()},
        "dbt_start_share_of_job": phases["dbt start"] / job,
        "writer": {"writes": len(latencies),
                   "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
                   "worst_ms": latencies[-1] * 1000, "worst_at": worst_at},
        "rows_and_bytes_before": before, "rows_and_bytes_after": after,
        "unique_rows_compact_bytes": compact,
        "space_after_over_compact": {
            name: {"table": table / compact, "with_indexes": total / compact}
            for name, (_, table, total) in after.items()},
    }
    cache = "cold" if server.cold else "WARM (not root or not embedded: caches not emptied)"
    for table, plan in explained.items():
        print(f"key groups of {table}, {cache} cache:\n{plan}\n")
    print(f"scale {args.scale}, {', '.join(tables)}, PostgreSQL {version}, {cache} cache")
    print(f"{'phase':<14}{'seconds':>10}{'x floor':>10}{'WAL MB':>10}{'temp MB':>10}")
    for phase, seconds in phases.items():
        wal, temp = (f"{n / 1e6:>10,.0f}" for n in writes[phase]) if phase in writes else ("", "")
        print(f"{phase:<14}{seconds:>10.2f}{seconds / phases['floor']:>10.2f}{wal:>10}{temp:>10}")
    print(f"{'job':<14}{job:>10.2f}{job / phases['floor']:>10.2f}"
          "   (dbt build + swap; dbt start is inside dbt build)")
    print("  ".join(f"{name} {value:.1f}x" for name, value in ratios.items()))
    print(f"\n{'per table':<20}{'floor':>8}{'nodes':>8}{'x floor':>9}{'key groups':>12}"
          f"{'x floor':>9}   (build nodes from run_results; dbt start and swap not included)")
    for table, seconds in by_table.items():
        floor = floors.get(table)
        nodes, groups = seconds["nodes"], seconds["key groups"]
        if floor is None:
            print(f"{table:<20}{'':>8}{nodes:>8.2f}")
        else:
            print(f"{table:<20}{floor:>8.2f}{nodes:>8.2f}{nodes / floor:>9.2f}"
                  f"{groups:>12.2f}{groups / floor:>9.2f}")
    print()
    print(f"rows / table bytes / with indexes before: {before[0]:,} / {before[1]:,} / "
          f"{before[2]:,}; the unique rows copied compactly: {compact:,} table bytes")
    for name, (rows, table, total) in after.items():
        print(f"after {name}: {rows:,} / {table:,} ({table / compact:.2f}x compact) / "
              f"{total:,} ({total / compact:.2f}x)")
    print(f"writer on {tables[0]}: {len(latencies)} writes, p99 "
          f"{report['writer']['p99_ms']:.1f} ms, worst {report['writer']['worst_ms']:.1f} ms "
          f"({worst_at}); "
          f"{result.replayed} captured writes replayed; lock held {result.lock_ms:.0f} ms, "
          f"taken in {result.attempts} tries")
    carried = sum(i + u + d for i, u, d, _ in undone.carried.values())
    print(f"rollback (not in the job): {phases['rollback']:.2f} s, {carried} writes since the "
          f"swap carried over; lock held {undone.lock_ms:.0f} ms, taken in {undone.attempts} "
          "tries")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"run-{report['when'].replace(':', '')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    try:
        main()
    except psycopg.Error as error:
        sys.exit(f"bench: {error}")
