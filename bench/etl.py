"""How much the job gets in the way of a live ETL, against the same ETL alone in the same run.

    python bench/etl.py --scale 0.1 --clients 4 [--baseline 10] [--after 5] [--without KIND]

Generates the demo's property_photos (and its parents) at --scale on the embedded server (or
the server PGHOST points at), in a database of its own, and works on a copy of it (CREATE
DATABASE ... TEMPLATE). --clients processes then write to breezeway.property_photos as the
incident's ETL did, as a role with DML grants only that owns nothing, each statement of one of
these kinds (--without leaves a kind out):
  re-send   a copy of an existing row, INSERT ... SELECT ... ON CONFLICT DO NOTHING;
  new-key   a photo never seen, ON CONFLICT DO NOTHING; one in three with no thumbnail_url
            and no caption, one in ten with no photo_id (a NULL in the key);
  update    of the caption of a row;
  re-key    an update of a row's property_pk and photo_id to a key never seen;
  delete    of a row.
A client updates, re-keys and deletes only rows of its own: those it inserted, and its share of
the rows the demo's keep rule keeps. One more client updates breezeway.properties' rows (the
parent property_photos references) to themselves, to see whether the parent is ever held.
Every statement's latency is counted in the phase it started in:
  baseline        the ETL alone (--baseline seconds);
  capture         runner capture --select property_photos;
  dbt build       the models and tests of property_photos, as bench/run.py selects them;
  swap            runner swap --select property_photos;
  after           the ETL alone on the swapped table (--after seconds), then a look at the
                  rows it inserted until then;
  rollback        runner rollback --select property_photos;
  after rollback  the ETL alone on the original table again (--after seconds).
The job runs as the database's own user, through the `runner` and `dbt` commands, each given
--step-timeout. Prints, per phase and kind of statement, count, errors, p50, p99 and the worst
latency (and how far into the phase the worst began), and the p99 and the worst as multiples
of the baseline's p99 of that kind; the lock the swap and the rollback say they held; and
whether the ETL lost a row: every row a client was told it inserted (RETURNING id) and did not
delete itself must be, after the swap, in the live table or in the original the swap archived,
and after the rollback in the live table; no row a client deleted may be live again. Writes it
all as JSON to bench/results/. Exits 1 when a command of the job failed or ran out of time
(after printing what was measured until then and what the command's session was running) or
when a row was lost or came back. Not part of the test suite: pytests/test_concurrency.py
asserts the behaviour, this measures it. The cache is warm throughout: the baseline and the
job share it; a single worst stall is as often the disk's WAL flush as the job (it shows in
the baseline too), the p99 is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import run
from psycopg import sql

from runner import demo
from runner.server.swap_log import DEFAULT_ARCHIVE_SCHEMA, SWAP_LOG

RUNNER = str(Path(sys.executable).with_name("runner"))
TABLE = "property_photos"
PARENT = "properties"
SOURCE_DATABASE = "bench_etl_source"
DATABASE = "bench_etl"
# The ETL's grants go to a group role and its clients log in as a member, as in production;
# neither owns anything, so everything the ETL may do comes from the grants the swap copies.
ETL_GRANTS_ROLE = "bench_etl_writer"
ETL_LOGIN_ROLE = "bench_etl_client"
# Between statements, as an ETL that does work of its own between them: four clients write
# about 700 statements a second together here, each mostly waiting for its commit's WAL flush.
PAUSE_S = 0.005
# Connections made and statements prepared (psycopg prepares from the fifth execution on)
# before the baseline starts counting.
WARM_UP_S = 1.0
# One round of a client's statements: mostly re-sends, as the ETL's hourly reload was.
ROUND = ("re-send", "new-key", "re-send", "update", "re-send", "new-key", "re-send", "re-key",
         "re-send", "update", "delete")
CLIENT_KINDS = ("re-send", "new-key", "update", "re-key", "delete")
PARENT_KIND = "parent-update"
KINDS = (*CLIENT_KINDS, PARENT_KIND)
PHASES = ("baseline", "capture", "dbt build", "swap", "after", "rollback", "after rollback")
# The build of property_photos alone (bench/run.py's selection for one table): the guard's
# tests on the live table are no part of the job, and the audit reads every table's key groups.
BUILD_SELECTION = ["--select", f"source:breezeway.{TABLE}+",
                   "--exclude", "tag:dedup_guard", "audit_duplicates"]


@dataclass(frozen=True)
class DemoFacts:
    """What the clients need to know of the generated table to write as the ETL would."""

    properties: int
    kept_ids: list[int]
    """The ids the keep rule keeps before any write: the rows a swap would leave live."""
    last_generated_id: int
    """Ids above it are rows the clients inserted."""


class StepFailed(Exception):
    """A command of the job exited non-zero or ran out of time; the message says what it
    printed, or what its session was running when it was stopped."""


def live_table() -> sql.Identifier:
    return sql.Identifier(demo.DEMO_SCHEMA, TABLE)


def write_like_the_etl(client: int, clients: int, kinds: list[str], facts: DemoFacts,
                       conninfo: dict, stop, results: str) -> None:
    """One ETL client, until told to stop. Writes to results: [start, seconds, kind, error] of
    each statement (time.monotonic(), one clock for every process), [id, returned at] of each
    row it inserted and [id, started at] of each row it deleted."""
    chance = random.Random(client)
    statements, inserted, deleted = [], [], []
    # Rows only this client changes, so that no client waits for another's row lock.
    own_rows: list[int] = []
    own_kept = facts.kept_ids[client::clients]
    table = live_table()
    with psycopg.connect(autocommit=True, application_name=f"bench etl client {client}",
                         **conninfo) as conn:
        columns = sql.SQL(", ").join(sql.Identifier(name) for name, in conn.execute(
            "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0"
            " and not attisdropped and attname <> 'id' order by attnum",
            (f"{demo.DEMO_SCHEMA}.{TABLE}",)))
        resend = sql.SQL("insert into {t} ({c}) select {c} from {t} where id = %s"
                         " on conflict do nothing returning id").format(t=table, c=columns)
        new_key = sql.SQL(
            "insert into {} (property_pk, photo_id, url, thumbnail_url, caption, sort_order,"
            " exif) values (%s, %s, %s, %s, %s, %s, repeat(md5(%s), 24))"
            " on conflict do nothing returning id").format(table)
        update = sql.SQL("update {} set caption = %s where id = %s").format(table)
        rekey = sql.SQL("update {} set property_pk = %s, photo_id = %s where id = %s").format(
            table)
        delete = sql.SQL("delete from {} where id = %s returning id").format(table)

        def some_row_of_its_own(take: bool = False) -> int | None:
            """One of its inserted rows or of its kept ones, half and half while both last;
            taken out of its lists when it is to be deleted. None once it has neither, which
            a statement then matches no row with."""
            rows = own_rows if own_rows and (not own_kept or chance.random() < 0.5) else own_kept
            if not rows:
                return None
            return rows.pop(chance.randrange(len(rows))) if take else chance.choice(rows)

        def insert(statement: sql.Composed, values: tuple) -> None:
            row = conn.execute(statement, values).fetchone()
            if row:
                inserted.append([row[0], time.monotonic()])
                own_rows.append(row[0])

        rounds = [kind for kind in ROUND if kind in kinds]
        n = 0
        while not stop.is_set():
            kind = rounds[n % len(rounds)]
            error = None
            started = time.monotonic()
            try:
                if kind == "re-send":
                    insert(resend, (chance.choice(facts.kept_ids),))
                elif kind == "new-key":
                    photo = None if n % 10 == 1 else f"etl-{client}-{n}"
                    sparse = n % 3 == 0
                    url = f"https://photos.example.com/etl/{client}/{n}"
                    insert(new_key, (
                        chance.randint(1, facts.properties), photo, f"{url}/original.jpg",
                        None if sparse else f"{url}/thumb.jpg",
                        None if sparse else f"ETL photo {client}-{n}", n % 80, str(n)))
                elif kind == "update":
                    conn.execute(update, (f"edited by the ETL {n}", some_row_of_its_own()))
                elif kind == "re-key":
                    conn.execute(rekey, (chance.randint(1, facts.properties),
                                         f"etl-{client}-{n}-rekeyed", some_row_of_its_own()))
                elif kind == "delete":
                    victim = some_row_of_its_own(take=True)
                    # Nothing returned: the swap had taken the row out as a duplicate; it is
                    # still in the archive, and a rollback brings it back.
                    if conn.execute(delete, (victim,)).fetchone():
                        deleted.append([victim, started])
            except psycopg.Error as failure:
                error = str(failure).strip().splitlines()[0]
            statements.append([started, time.monotonic() - started, kind, error])
            if conn.closed:
                break
            n += 1
            time.sleep(PAUSE_S)
    Path(results).write_text(json.dumps(
        {"statements": statements, "inserted": inserted, "deleted": deleted}))


def touch_the_parent(facts: DemoFacts, conninfo: dict, stop, results: str) -> None:
    """Updates of breezeway.properties' rows to themselves, one after the other, until told
    to stop: any lock the job takes on the parent shows as a stall here. Writes its
    statements to results as write_like_the_etl does."""
    statements = []
    touch = sql.SQL("update {} set name = name where id = %s").format(
        sql.Identifier(demo.DEMO_SCHEMA, PARENT))
    with psycopg.connect(autocommit=True, application_name="bench etl parent", **conninfo) as conn:
        n = 0
        while not stop.is_set():
            error = None
            started = time.monotonic()
            try:
                conn.execute(touch, (n % facts.properties + 1,))
            except psycopg.Error as failure:
                error = str(failure).strip().splitlines()[0]
            statements.append([started, time.monotonic() - started, PARENT_KIND, error])
            if conn.closed:
                break
            n += 1
            time.sleep(PAUSE_S)
    Path(results).write_text(json.dumps({"statements": statements, "inserted": [],
                                         "deleted": []}))


def sessions_of_the_job() -> list[tuple[int, float, str]]:
    """The busy sessions of the job's commands on the bench's database (every session there
    but the ETL's and this one): pid, seconds into their statement, and the statement."""
    with run.connect_to(DATABASE) as conn:
        return conn.execute(
            "select pid, extract(epoch from now() - query_start)::float8, query"
            " from pg_stat_activity where datname = %s and usename <> %s"
            " and pid <> pg_backend_pid() and state <> 'idle'",
            (DATABASE, ETL_LOGIN_ROLE)).fetchall()


def job_step(arguments: list[str], timeout_s: float) -> str:
    """Run one command of the job from the project; what it printed. Raises StepFailed when it
    exits non-zero, or when it runs out of time: then it is killed, and so are the sessions it
    left running on the server, which would otherwise go on with their statement."""
    command = " ".join([Path(arguments[0]).name, *arguments[1:]])
    process = subprocess.Popen(arguments, cwd=run.PROJECT_DIR, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        sessions = sessions_of_the_job()
        process.kill()
        stdout, stderr = process.communicate()
        with run.connect_to(DATABASE) as conn:
            for pid, _, _ in sessions:
                conn.execute("select pg_terminate_backend(%s)", (pid,))
        running = "".join(f"\n  session {pid}, {seconds:.0f} s into: {query[:600]}"
                          for pid, seconds, query in sessions)
        raise StepFailed(f"`{command}` was still running after {timeout_s:.0f} s and was "
                         f"killed; the server was running{running or ' nothing of it'}\n"
                         f"{stderr}{stdout}") from None
    if process.returncode != 0:
        raise StepFailed(f"`{command}` exited {process.returncode}:\n{stderr}{stdout}")
    return stdout


def runner_command(command: str, *options: str) -> list[str]:
    return [RUNNER, command, "--project-dir", str(run.PROJECT_DIR), "--select", TABLE, *options]


def drop_what_the_bench_made() -> None:
    """The databases (with the sessions still on them), then the roles, which own nothing
    once the databases are gone."""
    with run.connect_to("postgres") as admin:
        for name in (DATABASE, SOURCE_DATABASE):
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(
                sql.Identifier(name)))
        for role in (ETL_LOGIN_ROLE, ETL_GRANTS_ROLE):
            admin.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def copy_source() -> None:
    """The database the bench works on, a copy of the generated one; it becomes PGDATABASE."""
    with run.connect_to("postgres") as admin:
        admin.execute(sql.SQL("create database {} template {}").format(
            sql.Identifier(DATABASE), sql.Identifier(SOURCE_DATABASE)))
    os.environ["PGDATABASE"] = DATABASE


def create_etl_roles() -> None:
    """DML on the demo schema's tables and their sequences, and nothing else."""
    schema = sql.Identifier(demo.DEMO_SCHEMA)
    grants, login = sql.Identifier(ETL_GRANTS_ROLE), sql.Identifier(ETL_LOGIN_ROLE)
    with run.connect_to(DATABASE) as conn:
        for statement in (
            sql.SQL("create role {} nologin").format(grants),
            sql.SQL("create role {} login in role {}").format(login, grants),
            sql.SQL("grant usage on schema {} to {}").format(schema, grants),
            sql.SQL("grant select, insert, update, delete on all tables in schema {} to {}")
            .format(schema, grants),
            sql.SQL("grant usage on all sequences in schema {} to {}").format(schema, grants),
        ):
            conn.execute(statement)


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of them at or below it."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def phase_of(moment: float, spans: dict[str, tuple[float, float]]) -> str | None:
    for name, (start, end) in spans.items():
        if start <= moment < end:
            return name
    return None


def latency_rows(statements: list[list], spans: dict[str, tuple[float, float]]) -> list[dict]:
    """Per phase and kind: count, errors, p50, p99 and worst in ms, when the worst began (s
    into its phase), and p99 and worst over the baseline's p99 of the kind."""
    seconds: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], int] = {}
    worst: dict[tuple[str, str], tuple[float, float]] = {}
    for started, took, kind, error in statements:
        phase = phase_of(started, spans)
        if phase is None:
            continue
        key = (phase, kind)
        seconds.setdefault(key, []).append(took)
        errors[key] = errors.get(key, 0) + (error is not None)
        if took > worst.get(key, (-1.0, 0.0))[0]:
            worst[key] = (took, started - spans[phase][0])
    baseline_p99 = {kind: percentile(sorted(seconds[("baseline", kind)]), 0.99)
                    for kind in KINDS if ("baseline", kind) in seconds}
    rows = []
    for phase in PHASES:
        for kind in KINDS:
            if (phase, kind) not in seconds:
                continue
            ordered = sorted(seconds[(phase, kind)])
            p99 = percentile(ordered, 0.99)
            base = baseline_p99.get(kind)
            rows.append({
                "phase": phase, "kind": kind, "count": len(ordered),
                "errors": errors[(phase, kind)],
                "p50_ms": percentile(ordered, 0.5) * 1000, "p99_ms": p99 * 1000,
                "max_ms": ordered[-1] * 1000, "max_at_s": worst[(phase, kind)][1],
                "p99_over_baseline_p99": p99 / base if base else None,
                "max_over_baseline_p99": ordered[-1] / base if base else None,
            })
    return rows


def swap_log_entries(conn: psycopg.Connection) -> list[tuple[str | None, str | None, bool]]:
    """property_photos' swaps: the original each archived, the deduplicated table its rollback
    set aside, and whether it was rolled back; none when no swap ever committed."""
    log = sql.Identifier(DEFAULT_ARCHIVE_SCHEMA, SWAP_LOG)
    if conn.execute("select to_regclass(%s) is null",
                    (f"{DEFAULT_ARCHIVE_SCHEMA}.{SWAP_LOG}",)).fetchone()[0]:
        return []
    return conn.execute(sql.SQL(
        "select archive_table, rolled_back_table, rolled_back_at is not null from {}"
        " where live_schema = %s and live_table = %s").format(log),
        (demo.DEMO_SCHEMA, TABLE)).fetchall()


def ids_of_the_etl(conn: psycopg.Connection, tables: list[sql.Identifier],
                   last_generated_id: int) -> set[int]:
    """The ids above the generated ones in these tables, in one snapshot, by primary key."""
    union = sql.SQL(" union all ").join(
        sql.SQL("select id from {} where id > %(last)s").format(t) for t in tables)
    return {row_id for row_id, in conn.execute(union, {"last": last_generated_id})}


def archives(entries: list[tuple[str | None, str | None, bool]]) -> list[str]:
    """The tables of the archive schema that hold property_photos' rows now: the original while
    its swap is in effect (a rollback makes it live again), the deduplicated table once the
    swap was rolled back."""
    return [name for archived, set_aside, rolled_back in entries
            if (name := set_aside if rolled_back else archived)]


def look_after_swap(facts: DemoFacts) -> dict:
    """The ids of the ETL's rows in the live table and in the archived original, and the
    moments the query began and ended: every row inserted before the one and not deleted
    before the other must be among them (checked once the clients are done)."""
    with run.connect_to(DATABASE) as conn:
        began = time.monotonic()
        archived = archives(swap_log_entries(conn))
        found = ids_of_the_etl(conn, [live_table(), *(
            sql.Identifier(DEFAULT_ARCHIVE_SCHEMA, name) for name in archived)],
            facts.last_generated_id)
        return {"began": began, "ended": time.monotonic(), "ids": found, "archives": archived}


def check_nothing_lost(after_swap: dict | None, inserted: list[list], deleted: list[list],
                       facts: DemoFacts) -> dict:
    """Every row a client inserted and had not deleted: after the swap, live or archived; now,
    live, unless a swap is still in effect (the rollback failed), and then live or archived.
    No row a client deleted may be live."""
    deleted_at = {row_id: at for row_id, at in deleted}
    due = {row_id for row_id, _ in inserted} - set(deleted_at)
    with run.connect_to(DATABASE) as conn:
        entries = swap_log_entries(conn)
        live = {row_id for row_id, in conn.execute(
            sql.SQL("select id from {} where id = any(%s)").format(live_table()),
            (sorted(due | set(deleted_at)),))}
        archived = ids_of_the_etl(conn, [
            sql.Identifier(DEFAULT_ARCHIVE_SCHEMA, name) for name in archives(entries)],
            facts.last_generated_id) if entries else set()
    swapped = any(not rolled_back for _, _, rolled_back in entries)
    checked = {"at the end": {
        "swap in effect": swapped, "expected": len(due),
        "lost": sorted(due - live - archived if swapped else due - live),
        "not live but archived": sorted((due - live) & archived),
        "deleted": len(deleted_at), "deleted but live": sorted(live & set(deleted_at)),
    }}
    if after_swap is not None:
        due_then = {row_id for row_id, returned in inserted if returned < after_swap["began"]
                    and deleted_at.get(row_id, math.inf) >= after_swap["ended"]}
        checked["after the swap"] = {"expected": len(due_then),
                                     "lost": sorted(due_then - after_swap["ids"]),
                                     "archives": after_swap["archives"]}
    return checked


def print_table(rows: list[dict]) -> None:
    print(f"{'phase':<16}{'kind':<15}{'count':>7}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'max at s':>9}{'p99/base':>10}{'max/base':>10}")
    previous = None
    for row in rows:
        phase = row["phase"] if row["phase"] != previous else ""
        previous = row["phase"]
        ratios = "".join("" if value is None else f"{value:>10.1f}"
                         for value in (row["p99_over_baseline_p99"],
                                       row["max_over_baseline_p99"]))
        print(f"{phase:<16}{row['kind']:<15}{row['count']:>7}{row['errors']:>7}"
              f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['max_ms']:>9.1f}"
              f"{row['max_at_s']:>9.1f}{ratios}")


def print_check(check: dict) -> None:
    if "after the swap" in check:
        then = check["after the swap"]
        print(f"after the swap: {then['expected']:,} rows the ETL inserted and kept, "
              f"{len(then['lost'])} in neither the live table nor "
              f"{', '.join(then['archives']) or 'an archive'}")
    end = check["at the end"]
    where = "live or archived (a swap is still in effect)" if end["swap in effect"] else "live"
    print(f"at the end: {end['expected']:,} rows the ETL inserted and kept, "
          f"{len(end['lost'])} not {where}, {len(end['not live but archived'])} archived but "
          f"not live; {end['deleted']:,} rows it deleted, {len(end['deleted but live'])} live "
          "again")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=4,
                        help="ETL processes writing to property_photos (one more updates its "
                             "parent)")
    parser.add_argument("--baseline", type=float, default=10.0,
                        help="seconds of the ETL alone before the job")
    parser.add_argument("--after", type=float, default=5.0,
                        help="seconds of the ETL alone after the swap and after the rollback")
    parser.add_argument("--without", action="append", default=[], choices=CLIENT_KINDS,
                        help="a kind of statement the clients leave out (repeatable)")
    parser.add_argument("--step-timeout", type=float, default=120.0,
                        help="seconds each command of the job may take before it is killed")
    args = parser.parse_args()
    kinds = [kind for kind in CLIENT_KINDS if kind not in args.without]
    if args.clients < 1 or not kinds:
        parser.error("the ETL needs one client or more, and one kind of statement or more")
    layout = demo.Layout.at(next(t for t in demo.CHILD_TABLES if t.name == TABLE), args.scale)
    facts = DemoFacts(properties=layout.properties,
                      kept_ids=sorted(demo.expected_kept_ids(TABLE, args.scale)),
                      last_generated_id=layout.total)

    server = run.Server()
    target = Path(tempfile.mkdtemp(prefix="bench-etl-target-"))
    spans: dict[str, tuple[float, float]] = {}
    said: dict[str, object] = {}
    failure = None
    try:
        drop_what_the_bench_made()
        run.check_disk(server, run.generated_bytes_at_most([TABLE], args.scale), "the demo data")
        generated_in = run.generate_source(SOURCE_DATABASE, args.scale, [TABLE])
        run.check_disk(server, run.database_bytes(SOURCE_DATABASE), "a copy of the data")
        copy_source()
        create_etl_roles()
        with run.connect_to(DATABASE) as conn:
            version = conn.execute("show server_version").fetchone()[0]
        # Untimed, as in bench/run.py: the capture reads the manifest, the build the parse.
        job_step(run.dbt_arguments("parse", target, []), args.step_timeout)

        def after_the_swap() -> dict:
            time.sleep(args.after)
            return look_after_swap(facts)

        timeout = args.step_timeout
        steps = {
            "baseline": lambda: time.sleep(args.baseline),
            "capture": lambda: job_step(
                runner_command("capture", "--target-path", str(target)), timeout),
            "dbt build": lambda: job_step(run.dbt_arguments("build", target, BUILD_SELECTION),
                                          timeout),
            "swap": lambda: json.loads(job_step(
                runner_command("swap", "--target-path", str(target), "--format", "json"), timeout)),
            "after": after_the_swap,
            "rollback": lambda: job_step(runner_command("rollback"), timeout),
            "after rollback": lambda: time.sleep(args.after),
        }
        stop = multiprocessing.Event()
        conninfo = {"host": os.environ["PGHOST"], "port": os.environ["PGPORT"],
                    "user": ETL_LOGIN_ROLE, "dbname": DATABASE}
        results = [target / f"client-{client}.json" for client in range(args.clients + 1)]
        clients = [multiprocessing.Process(target=write_like_the_etl, args=(
            client, args.clients, kinds, facts, conninfo, stop, str(results[client])))
            for client in range(args.clients)]
        clients.append(multiprocessing.Process(target=touch_the_parent, args=(
            facts, conninfo, stop, str(results[-1]))))
        for client in clients:
            client.start()
        try:
            time.sleep(WARM_UP_S)
            for name, step in steps.items():
                started = time.monotonic()
                try:
                    said[name] = step()
                finally:
                    spans[name] = (started, time.monotonic())
        except StepFailed as error:
            failure = str(error)
        finally:
            stop.set()
            for client in clients:
                client.join(30)
        written = [json.loads(path.read_text()) for path in results if path.exists()]
        if len(written) < len(clients):
            sys.exit(f"bench: {len(clients) - len(written)} of the {len(clients)} ETL clients "
                     "ended without writing their results (exit codes "
                     f"{[client.exitcode for client in clients]})")
        statements = [s for client in written for s in client["statements"]]
        inserted = [row for client in written for row in client["inserted"]]
        deleted = [row for client in written for row in client["deleted"]]
        check = check_nothing_lost(said.get("after"), inserted, deleted, facts)
    finally:
        drop_what_the_bench_made()
        server.stop()
        shutil.rmtree(target, ignore_errors=True)

    rows = latency_rows(statements, spans)
    swapped = said.get("swap")
    rollback_lock = re.search(r"locked for (\d+) ms \((\d+) tr", said.get("rollback", ""))
    errors: dict[str, int] = {}
    for _, _, kind, error in statements:
        if error is not None:
            errors[f"{kind}: {error}"] = errors.get(f"{kind}: {error}", 0) + 1
    rates = {name: sum(start <= s[0] < end for s in statements) / (end - start)
             for name, (start, end) in spans.items()}
    report = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scale": args.scale, "clients": args.clients, "kinds": kinds, "postgres": version,
        "generated_seconds": generated_in,
        "phase_seconds": {name: end - start for name, (start, end) in spans.items()},
        "statements_per_second": rates,
        "swap": {key: swapped[key] for key in ("lock_ms", "lock_attempts", "replayed_writes")}
        if swapped else None,
        "rollback": {"lock_ms": int(rollback_lock[1]) if rollback_lock else None,
                     "lock_attempts": int(rollback_lock[2]) if rollback_lock else None,
                     "output": said["rollback"].strip().splitlines()}
        if "rollback" in said else None,
        "failure": failure, "latency": rows, "errors": errors,
        "rows_inserted": len(inserted), "nothing_lost": check,
    }

    print(f"scale {args.scale}, {TABLE}, {args.clients} ETL clients ({', '.join(kinds)}) and "
          f"one on {PARENT}, PostgreSQL {version}, warm cache")
    print("  ".join(f"{name} {end - start:.1f} s ({rates[name]:.0f}/s)"
                    for name, (start, end) in spans.items()))
    print_table(rows)
    if swapped:
        print(f"swap: lock held {swapped['lock_ms']:.0f} ms, taken in "
              f"{swapped['lock_attempts']} tries, {swapped['replayed_writes']} captured writes "
              "replayed")
    if rollback_lock:
        print(f"rollback: lock held {rollback_lock[1]} ms, taken in {rollback_lock[2]} tries")
    for line in report["rollback"]["output"] if report["rollback"] else []:
        print(f"  {line}")
    for error, count in errors.items():
        print(f"error x{count}: {error}")
    print_check(check)
    run.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = run.RESULTS_DIR / f"etl-{report['when'].replace(':', '')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    if failure:
        sys.exit(f"bench: {failure}")
    lost = check["at the end"]["lost"] + check.get("after the swap", {}).get("lost", [])
    back = check["at the end"]["deleted but live"]
    if lost or back:
        sys.exit(f"bench: rows lost: {sorted(set(lost))[:20]}; deleted rows live again: "
                 f"{back[:20]}")


if __name__ == "__main__":
    try:
        main()
    except (psycopg.Error, StepFailed) as error:
        sys.exit(f"bench: {error}")
