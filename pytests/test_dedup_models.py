"""The dbt models and tests, on demo data whose right answers the generator states."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_SCALE, Database, run_dbt

from runner import demo

TABLES = [table.name for table in demo.CHILD_TABLES]


def test_audit_reports_the_generators_counts_exactly(built: Database) -> None:
    with built.connect() as conn:
        rows = conn.execute(
            "select source_table, total_rows, unique_rows, duplicate_rows, null_key_rows,"
            " duplicate_pct, duplication_factor from dedup_audit.audit_duplicates"
        ).fetchall()
    expected = demo.expected_counts(TEST_SCALE)
    audited = {row[0]: row[1:] for row in rows}
    assert set(audited) == {f"breezeway.{name}" for name in TABLES}
    for name, counts in expected.items():
        total, unique, duplicates, null_keys, pct, factor = audited[f"breezeway.{name}"]
        assert (total, unique, duplicates, null_keys) == (
            counts.total, counts.unique, counts.duplicates, counts.null_keys
        ), name
        assert float(pct) == pytest.approx(100 * counts.duplicates / counts.total, abs=0.005)
        assert float(factor) == pytest.approx(counts.total / counts.unique, abs=0.05)


@pytest.mark.parametrize("table", TABLES)
def test_the_kept_row_of_every_key_is_the_one_the_keep_rule_names(built: Database,
                                                                   table: str) -> None:
    with built.connect() as conn:
        kept = {row[0] for row in conn.execute(f"select id from dedup.{table}")}
    assert kept == demo.expected_kept_ids(table, TEST_SCALE)


@pytest.mark.parametrize("table", TABLES)
def test_kept_and_removed_rows_partition_the_source(built: Database, table: str) -> None:
    with built.connect() as conn:
        source = conn.execute(f"select count(*), count(distinct id) from breezeway.{table}")
        source_rows, source_ids = source.fetchone()
        union_ids = conn.execute(
            f"select count(*), count(distinct id) from (select id from dedup.{table}"
            f" union all select id from dedup.removed_{table}) as both_sides"
        ).fetchone()
    assert union_ids == (source_rows, source_ids)


def test_guests_without_email_are_kept_one_per_name_and_their_copies_go(built: Database) -> None:
    layout = demo.Layout.at(
        next(t for t in demo.CHILD_TABLES if t.name == "reservation_guests"), TEST_SCALE
    )
    with built.connect() as conn:
        live = conn.execute(
            "select count(*), count(distinct (reservation_pk, guest_name)),"
            " max(n) from breezeway.reservation_guests"
            " join (select reservation_pk, count(distinct guest_name) as n"
            "       from breezeway.reservation_guests where guest_email is null"
            "       group by reservation_pk) as per_reservation using (reservation_pk)"
            " where guest_email is null").fetchone()
        kept = conn.execute(
            "select count(*), count(distinct (reservation_pk, guest_name))"
            " from dedup.reservation_guests where guest_email is null").fetchone()
    guests = len(layout.null_email_keys())
    # Re-sent copies of several guests without email on one reservation, as the demo makes.
    assert live[0] > live[1] == guests and live[2] > 1
    assert kept == (guests, guests)


def test_events_without_a_request_id_are_all_kept_each_with_a_fresh_request_id(
        built: Database) -> None:
    """nulls: backfill (seed 000, Step 2): every NULL-key event is kept, and the kept copy
    carries a uuid of its own, so the deduplicated table has no NULL key."""
    with built.connect() as conn:
        live_null = conn.execute(
            "select count(*) from breezeway.business_events where request_id is null"
        ).fetchone()[0]
        kept_null, backfilled, distinct_backfilled, colliding = conn.execute(
            "select count(*) filter (where k.request_id is null),"
            " count(*) filter (where l.request_id is null),"
            " count(distinct k.request_id) filter (where l.request_id is null),"
            " count(*) filter (where l.request_id is null and k.request_id in"
            "   (select request_id from breezeway.business_events where request_id is not null))"
            " from dedup.business_events as k join breezeway.business_events as l using (id)"
        ).fetchone()
    assert live_null == demo.expected_counts(TEST_SCALE)["business_events"].null_keys > 1
    assert (kept_null, backfilled, distinct_backfilled, colliding) == (0, live_null, live_null, 0)


def test_every_dbt_test_passed_and_guards_every_table(built: Database) -> None:
    results = json.loads((built.target_dir / "run_results.json").read_text())
    tests = {r["unique_id"]: r["status"] for r in results["results"]
             if r["unique_id"].startswith("test.")}
    assert tests and set(tests.values()) == {"pass"}
    for table in TABLES:
        for kind in ("dedup_natural_key_unique", "dedup_reconciles", "dedup_tiebreaker_unique"):
            assert any(kind in test and table in test for test in tests), (kind, table)


def _failing_tests(database: Database, select: str) -> set[str]:
    result = database.dbt("test", "--select", select)
    return {r.node.name for r in result.result.results if r.status == "fail"}


def test_an_injected_duplicate_fails_the_uniqueness_test(fresh: Database) -> None:
    assert _failing_tests(fresh, "property_photos") == set()
    with fresh.connect() as conn:
        conn.execute("insert into dedup.property_photos select * from dedup.property_photos"
                     " order by id limit 1")
    failing = _failing_tests(fresh, "property_photos")
    assert "dedup_natural_key_unique_property_photos" in failing


def test_uniqueness_tests_mean_what_the_constraints_will_mean_for_nulls(fresh: Database) -> None:
    with fresh.connect() as conn:
        # nulls: backfill (business_events): a NULL key left in the deduplicated table fails.
        conn.execute("insert into dedup.business_events (id, request_id, event_type, ts)"
                     " values (-1, null, 'booking', now())")
        # alternative_key (reservation_guests): a second copy of a guest without email is a
        # duplicate; another guest without email on the same reservation is not.
        conn.execute("insert into dedup.reservation_guests select -1, reservation_pk, null,"
                     " guest_name, phone, last_sync_time from dedup.reservation_guests"
                     " where guest_email is null limit 1")
    failing = _failing_tests(fresh, "business_events reservation_guests")
    assert "dedup_natural_key_unique_reservation_guests" in failing
    assert "dedup_natural_key_unique_business_events" in failing


def test_another_guest_without_email_on_a_reservation_is_no_duplicate(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("insert into dedup.reservation_guests select -1, reservation_pk, null,"
                     " 'Another guest', phone, last_sync_time from dedup.reservation_guests"
                     " where guest_email is null limit 1")
    failing = _failing_tests(fresh, "reservation_guests")
    # The tests ran: the row is none the key groups chose.
    assert "dedup_reconciles_reservation_guests" in failing
    assert "dedup_natural_key_unique_reservation_guests" not in failing


@pytest.mark.parametrize("damage", [
    # lost: one key fewer than the build found
    "delete from dedup.task_photos where id = (select min(id) from dedup.task_photos)",
    # invented: as many rows as keys, but one is no source row
    "update dedup.task_photos set id = -id where id = (select min(id) from dedup.task_photos)",
    # repeated: as many rows as keys, all from the source, but one twice and one not at all
    "update dedup.task_photos set id = (select max(id) from dedup.task_photos)"
    " where id = (select min(id) from dedup.task_photos)",
], ids=["lost", "invented", "repeated"])
def test_a_kept_row_lost_invented_or_repeated_fails_reconciliation(
    fresh: Database, damage: str
) -> None:
    with fresh.connect() as conn:
        conn.execute(damage)
    assert "dedup_reconciles_task_photos" in _failing_tests(fresh, "task_photos")


def test_key_groups_get_little_memory_to_hash_and_room_to_sort(fresh: Database) -> None:
    # property_photos keeps by its tie-breaker alone (a hash aggregate); business_events by
    # ts, then id (a sort). The hooks' statements are in dbt's events, with their model.
    hooks: dict[str, list[str]] = {}

    def collect(event) -> None:
        if event.info.name == "SQLQuery" and "work_mem" in event.data.sql:
            node = event.data.node_info.unique_id
            hooks.setdefault(node.rsplit(".", 1)[-1], []).append(event.data.sql)

    models = ["int_property_photos_grouped_by_key", "int_business_events_grouped_by_key"]
    result = run_dbt(["run", "--select", *models], fresh.env, fresh.target_dir,
                     callbacks=[collect])
    assert result.success
    assert {model: [sql.split("*/")[-1].strip() for sql in statements]
            for model, statements in hooks.items()} == {
        "int_property_photos_grouped_by_key": ["set local work_mem = '16MB'"],
        "int_business_events_grouped_by_key": ["set local work_mem = '512MB'"],
    }


def test_docs_show_the_lineage_from_sources_through_models_to_tests(fresh: Database) -> None:
    result = fresh.dbt("docs", "generate")
    assert result.success
    manifest = json.loads((fresh.target_dir / "manifest.json").read_text())
    catalog = json.loads((fresh.target_dir / "catalog.json").read_text())
    children = manifest["child_map"]
    source = "source.dedup.breezeway.property_photos"
    staging = "model.dedup.stg_breezeway__property_photos"
    key_groups = "model.dedup.int_property_photos_grouped_by_key"
    kept = "model.dedup.property_photos"
    assert staging in children[source]
    assert key_groups in children[staging]
    assert kept in children[key_groups]
    assert "model.dedup.removed_property_photos" in children[kept]
    assert any(child.startswith("test.dedup.dedup_natural_key_unique_property_photos")
               for child in children[kept])
    assert kept in catalog["nodes"] and source in catalog["sources"]
