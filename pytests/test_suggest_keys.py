"""`runner suggest-keys` on a real server: on the demo it finds the keys the incident's plan
declares, the guests' alternative key among them, from the data alone, and counts each as
`runner audit` counts the key the YAML declares."""

from __future__ import annotations

import json

from conftest import Database, said


def suggested(database: Database, table: str) -> dict:
    result = database.runner("suggest-keys", table, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def audited(database: Database, table: str) -> dict:
    result = database.runner("audit", "--select", table, "--format", "json")
    assert result.exit_code == 0, result.output
    (row,) = [r for r in json.loads(result.stdout) if r["table"] == f"breezeway.{table}"]
    return row


def test_the_seeds_keys_are_found_and_counted_as_the_audit_counts_them(built: Database) -> None:
    for table, key, alternative in [
            ("task_photos", ["task_pk", "photo_id"], None),
            ("reservation_guests", ["reservation_pk", "guest_email"],
             ["reservation_pk", "guest_email", "guest_name"]),
            ("task_requirements", ["task_pk", "requirement_id"], None)]:
        found = suggested(built, f"breezeway.{table}")
        assert found["surrogates"] == ["id"] and found["load_times"] == ["last_sync_time"]
        assert found["tiebreaker"] == "id"
        (candidate,) = [c for c in found["candidates"]
                        if c["natural_key"] == key and c["alternative_key"] == alternative]
        audit = audited(built, table)
        assert (candidate["rows"], candidate["unique_rows"], candidate["duplicate_rows"]) == (
            audit["total_rows"], audit["unique_rows"], audit["duplicate_rows"]), table
        # A true key: its copies differ only in the time of their load.
        assert candidate["groups_that_differ"] == 0
        assert candidate["differ_between_copies"] == ["last_sync_time"]


def test_the_request_id_of_the_events_is_found_with_its_timestamp_set_aside(
        built: Database) -> None:
    found = suggested(built, "breezeway.business_events")
    assert found["load_times"] == ["ts"]
    keys = {(tuple(c["natural_key"]), c["nulls"]) for c in found["candidates"]}
    # The events without a request id differ: each is one (the plan backfills them).
    assert (("request_id",), "distinct") in keys


def test_the_best_is_printed_as_meta_dedup(built: Database) -> None:
    result = built.runner("suggest-keys", "breezeway.task_photos")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-7:] == [
        "The first, as its source's meta.dedup:",
        "  config:",
        "    meta:",
        "      dedup:",
        '        natural_key: ["task_pk", "photo_id"]',
        "        keep: [{column: id, order: desc}]   # the latest copy",
        "or declared in a project of yours (runner init): runner add breezeway.task_photos "
        "--key task_pk,photo_id --keep id",
    ]


def test_a_table_whose_rows_all_differ_has_no_candidate(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("create table public.readings (id bigserial primary key, sensor int,"
                     " reading int, taken_at timestamptz not null default now());"
                     " insert into public.readings (sensor, reading)"
                     " select i % 3, i from generate_series(1, 50) as i;"
                     " insert into public.readings (sensor, reading)"
                     " select i % 3, i + 100 from generate_series(1, 50) as i")
    result = fresh.runner("suggest-keys", "public.readings", "--max-columns", "1")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        "No candidate of up to 1 columns: in the sample, every column set either has no two "
        "rows alike or leaves rows that differ in another column; raise --max-columns or "
        "--sample-rows (a table with few duplicates holds few of them in a sample)")


def test_a_table_that_is_not_there_is_refused(built: Database) -> None:
    result = built.runner("suggest-keys", "breezeway.no_such_table")
    assert result.exit_code == 4, result.output
    assert said(result) == ["Error: no table breezeway.no_such_table: name it as schema.table"]
    unqualified = built.runner("suggest-keys", "task_photos")
    assert unqualified.exit_code == 2, unqualified.output
    assert "'task_photos': name the table as schema.table" in unqualified.output
