"""The ETL keeps writing through capture, dbt build and the swap: nothing it writes is lost."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import psycopg
from conftest import TEST_SCALE, Database, _create_database

from runner import demo

PHOTOS = next(t for t in demo.CHILD_TABLES if t.name == "property_photos")


def write_like_the_etl(conninfo: dict, stop, results: Path) -> None:
    """The incident's ETL, in a process of its own: INSERT ... ON CONFLICT DO NOTHING, new
    photos and copies of old ones, about 400 a second, until told to stop."""
    layout = demo.Layout.at(PHOTOS, TEST_SCALE)
    inserted, latencies = [], []
    with psycopg.connect(autocommit=True, **conninfo) as conn:
        n = 0
        while not stop.is_set():
            if n % 2:
                key = n % layout.keys
                photo, property_pk = str(571000000 + key), key % layout.properties + 1
            else:
                photo, property_pk = f"writer-{n}", 1
            started = time.perf_counter()
            row = conn.execute(
                "insert into breezeway.property_photos (property_pk, photo_id, url)"
                " values (%s, %s, 'from the ETL') on conflict do nothing returning id",
                (property_pk, photo)).fetchone()
            latencies.append(time.perf_counter() - started)
            if row:
                inserted.append((row[0], photo))
            n += 1
            time.sleep(0.002)
    results.write_text(json.dumps({"inserted": inserted, "latencies": latencies}))


def test_a_concurrent_writer_loses_nothing_and_leaves_no_duplicates(server, pg_env,
                                                                    tmp_path) -> None:
    _create_database(server, "concurrent", template="demo_source")
    database = Database({**pg_env, "PGDATABASE": "concurrent"}, tmp_path / "target")
    stop = multiprocessing.Event()
    results = tmp_path / "writer.json"
    conninfo = {"host": pg_env["PGHOST"], "port": pg_env["PGPORT"], "user": pg_env["PGUSER"],
                "dbname": "concurrent"}
    writer = multiprocessing.Process(target=write_like_the_etl, args=(conninfo, stop, results))
    started = time.perf_counter()
    writer.start()
    try:
        assert database.runner("capture").exit_code == 0
        assert database.dbt("build", "--select", "source:breezeway.property_photos+",
                            "--exclude", "audit_duplicates", "tag:dedup_guard").success
        # Someone holds the table for a while as the swap begins: it must wait, retry, and let
        # the writer through between tries.
        holding = threading.Event()

        def hold_a_lock() -> None:
            with database.connect() as conn, conn.transaction():
                conn.execute("lock table breezeway.property_photos in access share mode")
                holding.set()
                time.sleep(0.5)

        holder = threading.Thread(target=hold_a_lock)
        holder.start()
        holding.wait(5)
        result = database.runner("swap", "--select", "property_photos",
                                 "--lock-timeout", "50ms")
        holder.join()
        time.sleep(0.3)
    finally:
        stop.set()
        writer.join(30)
    elapsed = time.perf_counter() - started
    assert writer.exitcode == 0
    assert result.exit_code == 0, result.output
    written = json.loads(results.read_text())
    inserted = [tuple(row) for row in written["inserted"]]
    latencies = sorted(written["latencies"])
    rate = len(latencies) / elapsed
    assert rate > 200, f"the writer must write a few hundred rows a second, wrote {rate:.0f}"

    with database.connect() as conn:
        archive = conn.execute("select archive_table from dedup_archive.swap_log").fetchone()[0]
        archive_id = psycopg.sql.Identifier("dedup_archive", archive)
        everywhere = {row[0] for row in conn.execute(psycopg.sql.SQL(
            "select id from {} union all select id from breezeway.property_photos"
        ).format(archive_id))}
        # Nothing lost: every row the writer was told it inserted is live or archived.
        assert {row_id for row_id, _ in inserted} <= everywhere
        # Every key the writer ever wrote is live, once.
        live_keys = dict(conn.execute(
            "select photo_id, count(*) from breezeway.property_photos group by photo_id"))
        assert {photo for _, photo in inserted} <= set(live_keys)
        assert set(live_keys.values()) == {1}
        # Each key keeps its latest row of all the original table ever had.
        wrong = conn.execute(psycopg.sql.SQL(
            "select count(*) from breezeway.property_photos as l"
            " join (select property_pk, photo_id, max(id) as id from {} group by 1, 2) as a"
            " using (property_pk, photo_id) where l.id <> a.id").format(archive_id)).fetchone()[0]
        assert wrong == 0
    worst = latencies[-1]
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"writer: {len(latencies)} inserts, {rate:.0f}/s, "
          f"p99 {p99 * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
    assert worst < 2.0, f"the writer stalled {worst:.2f} s"
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute("drop database concurrent with (force)")
