"""`runner suggest-keys` on a real server: on the demo it finds the keys the incident's plan
declares, the guests' alternative key among them, from the data alone, and counts each as
`runner audit` counts the key the YAML declares."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
import yaml
from conftest import PROJECT_DIR, Database, _create_database, said
from psycopg import sql

from runner import demo


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


# Large enough that no column is unique by chance, as sort_order (k % 80) is among the few
# dozen photos of the suite's scale.
REALISTIC_SCALE = 0.02


@pytest.fixture(scope="module")
def realistic(server, built: Database) -> Iterator[Database]:
    name = "suggest_realistic"
    _create_database(server, name)
    database = Database({**built.env, "PGDATABASE": name}, built.target_dir)
    with database.connect() as conn:
        demo.generate(conn, REALISTIC_SCALE)
    yield database
    with psycopg.connect(autocommit=True, **server.conninfo) as conn:
        conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


def test_the_first_candidate_of_every_child_table_is_the_key_its_yaml_declares(
        realistic: Database) -> None:
    declared = yaml.safe_load((PROJECT_DIR / "models/staging/breezeway/"
                               "_breezeway__sources.yml").read_text())
    specs = {table["name"]: table["config"]["meta"]["dedup"]
             for source in declared["sources"] for table in source["tables"]
             if "dedup" in (table.get("config") or {}).get("meta", {})}
    assert len(specs) == len(demo.CHILD_TABLES)
    for table, spec in specs.items():
        (first, *_) = suggested(realistic, f"breezeway.{table}")["candidates"]
        assert (first["natural_key"], first["alternative_key"]) == (
            spec["natural_key"], spec.get("alternative_key")), table
    # task_tags has no duplicates to show its key: its unique constraint holds it.
    (tags, *_) = suggested(realistic, "breezeway.task_tags")["candidates"]
    assert tags["enforced"] and tags["duplicate_rows"] == 0


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
