"""The ETL keeps writing through capture, dbt build and the swap, as a role that does not own the
table: inserts with NULL columns, re-sends, updates, re-keys and deletes, and writes to the
parent table. Nothing it writes is lost, what it deleted stays deleted, and it is not held up
while the swap waits for its lock. This asserts behaviour only; how fast the
writer goes and how long it stalls is measured by bench/run.py."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import psycopg
from conftest import TEST_SCALE, Database, _create_database

from runner import demo
from runner.jobs import swap

PHOTOS = next(t for t in demo.CHILD_TABLES if t.name == "property_photos")
ETL_ROLE = "concurrent_etl"
# Generous: only a writer that is blocked waits this long.
PATIENCE_S = 60


def write_like_the_etl(conninfo: dict, stop, written, results: Path) -> None:
    """The incident's ETL, in a process of its own and as a role with DML grants only, until
    told to stop: INSERT ... ON CONFLICT DO NOTHING of new photos (their other columns NULL)
    and of copies of old ones; updates, re-keys and deletes of photos it made itself, whose
    fate it alone decides; and updates of the parent table. `written` counts the statements
    that returned; what each did goes to `results`."""
    layout = demo.Layout.at(PHOTOS, TEST_SCALE)
    made: dict[str, int] = {}
    fate = {"inserted": [], "deleted": [], "updated": {}, "rekeyed": {}}
    with psycopg.connect(autocommit=True, **conninfo) as conn:
        n = 0
        while not stop.is_set():
            mine = sorted(made)
            action = n % 7
            if action in (1, 3):
                key = n % layout.keys
                insert = (str(571000000 + key), key % layout.properties + 1)
            elif action in (0, 6) or len(mine) < 3:
                insert = (f"writer-{n}", 1)
            else:
                insert = None
                photo = mine[n % len(mine)]
            if insert:
                row = conn.execute(
                    "insert into breezeway.property_photos (property_pk, photo_id, url)"
                    " values (%s, %s, 'from the ETL') on conflict do nothing returning id",
                    (insert[1], insert[0])).fetchone()
                if row:
                    fate["inserted"].append((row[0], insert[0]))
                    if insert[0].startswith("writer-"):
                        made[insert[0]] = row[0]
            elif action == 2:
                conn.execute("update breezeway.property_photos set url = %s"
                             " where property_pk = 1 and photo_id = %s", (f"update {n}", photo))
                fate["updated"][photo] = f"update {n}"
            elif action == 4:
                conn.execute("delete from breezeway.property_photos"
                             " where property_pk = 1 and photo_id = %s", (photo,))
                fate["deleted"].append(made.pop(photo))
                fate["updated"].pop(photo, None)
            else:
                new = f"writer-{n}-rekeyed"
                conn.execute("update breezeway.property_photos set photo_id = %s"
                             " where property_pk = 1 and photo_id = %s", (new, photo))
                made[new] = made.pop(photo)
                fate["rekeyed"][photo] = new
                if photo in fate["updated"]:
                    fate["updated"][new] = fate["updated"].pop(photo)
            if n % 5 == 0:
                conn.execute("update breezeway.properties set city = city where id = %s",
                             (n % layout.properties + 1,))
            with written.get_lock():
                written.value += 1
            n += 1
            time.sleep(0.002)
    fate["live"] = made
    results.write_text(json.dumps(fate))


def wait_for_writes(written, count: int) -> None:
    """Until the writer has written `count` more rows; fails if it cannot."""
    target = written.value + count
    deadline = time.monotonic() + PATIENCE_S
    while written.value < target:
        assert time.monotonic() < deadline, f"the writer wrote {written.value} rows and stopped"
        time.sleep(0.01)


def start_the_etl(server, pg_env, name: str, tmp_path: Path):
    """A copy of the demo named `name`, its ETL role, and the ETL writing to it in a process
    of its own: the database, the writer, its stop event, its count and its results file."""
    _create_database(server, name, template="demo_source")
    database = Database({**pg_env, "PGDATABASE": name}, tmp_path / "target")
    with database.connect() as conn:
        conn.execute(f"create role {ETL_ROLE} login")
        conn.execute(f"grant usage on schema breezeway to {ETL_ROLE}")
        conn.execute(f"grant select, insert, update, delete on breezeway.property_photos,"
                     f" breezeway.properties to {ETL_ROLE}")
        conn.execute(f"grant usage on all sequences in schema breezeway to {ETL_ROLE}")
    stop = multiprocessing.Event()
    written = multiprocessing.Value("i", 0)
    results = tmp_path / "writer.json"
    conninfo = {"host": pg_env["PGHOST"], "port": pg_env["PGPORT"], "user": ETL_ROLE,
                "dbname": name}
    writer = multiprocessing.Process(target=write_like_the_etl,
                                     args=(conninfo, stop, written, results))
    writer.start()
    return database, writer, stop, written, results


def capture_and_build_while_writing(database: Database, written) -> None:
    """`runner capture`, then dbt build of the photos, the writer writing before each."""
    wait_for_writes(written, 10)
    assert database.runner("capture").exit_code == 0
    wait_for_writes(written, 10)
    assert database.dbt("build", "--select", "source:breezeway.property_photos+",
                        "--exclude", "audit_duplicates", "tag:dedup_guard").success


def test_a_concurrent_writer_loses_nothing_and_leaves_no_duplicates(server, pg_env,
                                                                    tmp_path) -> None:
    database, writer, stop, written, results = start_the_etl(server, pg_env, "concurrent",
                                                             tmp_path)
    waited_for_the_lock = []
    try:
        capture_and_build_while_writing(database, written)
        # Someone holds the table as the swap begins: it must wait, retry, and let the writer
        # through between tries; the hold ends once the writer got through.
        holder = database.connect()
        holder.execute("begin")
        holder.execute("lock table breezeway.property_photos in access share mode")

        def between_tries(label: str) -> None:
            if label.startswith("replay before the lock"):
                wait_for_writes(written, 10)
            if label == "lock try timed out" and not waited_for_the_lock:
                waited_for_the_lock.append(written.value)
                wait_for_writes(written, 10)
                holder.execute("rollback")

        options = swap.SwapOptions(target_dir=database.target_dir, select=["property_photos"],
                                   lock_timeout_ms=50)
        with database.connect() as conn:
            conn.execute("set search_path = pg_catalog")
            result = swap.execute(conn, swap.make_plans(conn, options), options,
                                  after_step=between_tries)
        holder.close()
        wait_for_writes(written, 10)
    finally:
        stop.set()
        writer.join(30)
    assert writer.exitcode == 0
    assert waited_for_the_lock and result.attempts > 1
    assert result.replayed > 0
    fate = json.loads(results.read_text())
    deleted = set(fate["deleted"])
    assert deleted and fate["updated"] and fate["rekeyed"], "the writer did all it does"

    with database.connect() as conn:
        archive = conn.execute("select archive_table from dedup_archive.swap_log").fetchone()[0]
        archive_id = psycopg.sql.Identifier("dedup_archive", archive)
        everywhere = {row[0] for row in conn.execute(psycopg.sql.SQL(
            "select id from {} union all select id from breezeway.property_photos"
        ).format(archive_id))}
        # Nothing lost: every row the writer inserted and did not delete is live or archived.
        assert {row_id for row_id, _ in fate["inserted"]} - deleted <= everywhere
        live = {photo: (row_id, url) for row_id, photo, url in conn.execute(
            "select id, photo_id, url from breezeway.property_photos")}
        live_keys = dict(conn.execute(
            "select photo_id, count(*) from breezeway.property_photos group by photo_id"))
        # No duplicate; every key the writer wrote and kept is live, as it last wrote it.
        assert set(live_keys.values()) == {1}
        assert {photo for _, photo in fate["inserted"]} - set(fate["rekeyed"]) - {
            photo for row_id, photo in fate["inserted"] if row_id in deleted} <= set(live)
        assert {photo: live[photo][0] for photo in fate["live"]} == fate["live"]
        assert {photo: live[photo][1] for photo in fate["updated"]} == fate["updated"]
        # What it deleted or re-keyed away is gone.
        assert not {photo for row_id, photo in fate["inserted"] if row_id in deleted} & set(live)
        assert not set(fate["rekeyed"]) & set(live)
        # Each key keeps its latest row of all the original table ever had.
        wrong = conn.execute(psycopg.sql.SQL(
            "select count(*) from breezeway.property_photos as l"
            " join (select property_pk, photo_id, max(id) as id from {} group by 1, 2) as a"
            " using (property_pk, photo_id) where l.id <> a.id").format(archive_id)).fetchone()[0]
        assert wrong == 0
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute("drop database concurrent with (force)")
        admin.execute(f"drop role {ETL_ROLE}")
