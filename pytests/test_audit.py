"""runner audit against a real server: the seed's table 2.1 straight from the live tables, equal
to the dbt model audit_duplicates and to the demo's formula, and the unique indexes that explain
why ON CONFLICT DO NOTHING never fired."""

from __future__ import annotations

import csv
import io
import json
import shutil
from contextlib import nullcontext

from conftest import PROJECT_DIR, TEST_SCALE, Database, said
from test_other_project import OTHER_PROJECT, run_other_dbt
from test_other_project import shop as shop  # imported, its fixture is this module's too

from runner import demo
from runner.declaration import artifacts
from runner.declaration.names import constraint_name
from runner.facts import audit
from runner.present import audit_view
from runner.server.catalog import read_live_table
from runner.statements import keys
from runner.units import size_text

EXPECTED = demo.expected_counts(TEST_SCALE)
NAMES = [table.name for table in demo.CHILD_TABLES]
COUNT_FIELDS = ["total_rows", "unique_rows", "duplicate_rows", "duplicate_pct",
                "duplication_factor", "null_key_rows"]
MACHINE_FIELDS = ["table", "natural_key", "nulls", "alternative_key", *COUNT_FIELDS, "bytes",
                  "bytes_after_estimate", "natural_key_enforced_by", "unique_indexes",
                  "referenced_by"]


def audit_json(database: Database, *args: str) -> dict[str, dict]:
    result = database.runner("audit", "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return {row["table"]: row for row in json.loads(result.stdout)}


def test_counts_equal_the_dbt_audit_model_and_the_demo(built: Database) -> None:
    rows = audit_json(built)
    assert list(rows) == [f"breezeway.{name}" for name in sorted(NAMES)] + ["TOTAL"]
    with built.connect() as conn:
        modelled = {
            row[0]: dict(zip(COUNT_FIELDS, row[1:], strict=True))
            for row in conn.execute(
                "select source_table, total_rows, unique_rows, duplicate_rows, duplicate_pct,"
                " duplication_factor, null_key_rows from dedup_audit.audit_duplicates")
        }
    assert len(modelled) == len(NAMES)
    for name in NAMES:
        row = rows[f"breezeway.{name}"]
        counts = {field: row[field] for field in COUNT_FIELDS}
        # The dbt model's numeric(.., 2) and (.., 1) are the same decimals as the floats here.
        assert counts == {field: float(value) if field in ("duplicate_pct", "duplication_factor")
                          else value for field, value in modelled[f"breezeway.{name}"].items()}
        expected = EXPECTED[name]
        assert (row["total_rows"], row["unique_rows"], row["duplicate_rows"],
                row["null_key_rows"]) == (expected.total, expected.unique,
                                          expected.duplicates, expected.null_keys), name
    total = rows["TOTAL"]
    assert total["total_rows"] == sum(EXPECTED[name].total for name in NAMES)
    assert total["unique_rows"] == sum(EXPECTED[name].unique for name in NAMES)
    assert total["null_key_rows"] == sum(EXPECTED[name].null_keys for name in NAMES)
    assert total["bytes"] == sum(rows[f"breezeway.{name}"]["bytes"] for name in NAMES)


def test_the_nulls_policy_decides_what_a_null_key_counts(built: Database) -> None:
    """reservation_guests (not_distinct): all guests without email of one reservation are one
    guest. business_events (distinct, backfill): every event without a request is its own."""
    rows = audit_json(built, "--select", "reservation_guests", "--select", "business_events")
    guests = demo.Layout.at(demo.CHILD_TABLES[2], TEST_SCALE)
    assert guests.table.name == "reservation_guests"
    assert rows["breezeway.reservation_guests"]["null_key_rows"] == sum(
        guests.copies(key) for key in guests.null_email_keys())
    assert rows["breezeway.reservation_guests"]["unique_rows"] == guests.keys
    events = demo.Layout.at(demo.CHILD_TABLES[6], TEST_SCALE)
    assert events.table.name == "business_events" and events.null_rows > 1
    assert rows["breezeway.business_events"]["unique_rows"] == events.keys + events.null_rows


def test_the_readable_table_and_the_unique_indexes_below_it(built: Database) -> None:
    result = built.runner("audit")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "runner audit: breezeway" in lines[0]
    cells = {
        row[0]: row
        for row in ([cell.strip() for cell in line.split("│")[1:-1]]
                    for line in lines if line.startswith("│"))
    }
    with built.connect() as conn:
        photo_bytes = conn.execute(
            "select pg_total_relation_size('breezeway.property_photos')").fetchone()[0]
    photos = EXPECTED["property_photos"]
    assert cells["property_photos"] == [
        "property_photos", f"{photos.total:,}", f"{photos.unique:,}", f"{photos.duplicates:,}",
        str(round(100 * photos.duplicates / photos.total, 2)),
        str(round(photos.total / photos.unique, 1)), "0", size_text(photo_bytes),
        size_text(round(photo_bytes * photos.unique / photos.total)),
    ]
    assert cells["task_tags"][1:5] == [f"{EXPECTED['task_tags'].total:,}",
                                       f"{EXPECTED['task_tags'].unique:,}", "0", "0.0"]
    total = sum(EXPECTED[name].total for name in NAMES)
    assert cells["TOTAL"][1] == f"{total:,}"
    assert lines[-len(NAMES) - 1:] == [
        "Unique indexes (ON CONFLICT DO NOTHING skips a row only on a conflict in one):",
        "  business_events: business_events_pkey PRIMARY KEY (id); none enforces the natural key"
        " (request_id)",
        "  property_photos: property_photos_pkey PRIMARY KEY (id); none enforces the natural key"
        " (property_pk, photo_id)",
        "  reservation_guests: reservation_guests_pkey PRIMARY KEY (id); none enforces the"
        " natural key (reservation_pk, guest_email)",
        "  task_assignments: task_assignments_pkey PRIMARY KEY (id); none enforces the natural"
        " key (task_pk, assignee_id)",
        "  task_photos: task_photos_pkey PRIMARY KEY (id); none enforces the natural key"
        " (task_pk, photo_id)",
        "  task_requirements: task_requirements_pkey PRIMARY KEY (id); none enforces the natural"
        " key (task_pk, requirement_id)",
        "  task_tags: task_tags_pkey PRIMARY KEY (id); task_tags_task_pk_tag_pk_key UNIQUE"
        " (task_pk, tag_pk) <- the natural key",
    ]


def test_json_and_csv_give_the_same_rows(built: Database) -> None:
    rows = audit_json(built, "--select", "task_tags", "--select", "property_photos")
    assert list(rows) == ["breezeway.task_tags", "breezeway.property_photos", "TOTAL"]
    tags = rows["breezeway.task_tags"]
    assert list(tags) == MACHINE_FIELDS
    assert tags["natural_key"] == ["task_pk", "tag_pk"] and tags["nulls"] == "not_distinct"
    assert tags["natural_key_enforced_by"] == "task_tags_task_pk_tag_pk_key"
    assert tags["unique_indexes"] == [
        {"name": "task_tags_pkey", "definition": "PRIMARY KEY (id)",
         "enforces_natural_key": False},
        {"name": "task_tags_task_pk_tag_pk_key", "definition": "UNIQUE (task_pk, tag_pk)",
         "enforces_natural_key": True},
    ]
    assert rows["breezeway.property_photos"]["natural_key_enforced_by"] is None
    assert rows["TOTAL"]["total_rows"] == (EXPECTED["task_tags"].total
                                           + EXPECTED["property_photos"].total)

    result = built.runner("audit", "--format", "csv", "--select", "task_tags",
                          "--select", "property_photos")
    assert result.exit_code == 0, result.output
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert reader.fieldnames == MACHINE_FIELDS
    parsed = list(reader)
    assert [row["table"] for row in parsed] == list(rows)
    assert parsed[0]["natural_key"] == "task_pk, tag_pk"
    assert parsed[0]["unique_indexes"] == (
        "task_tags_pkey: PRIMARY KEY (id); task_tags_task_pk_tag_pk_key: UNIQUE (task_pk, tag_pk)")
    for row in parsed:
        for field in [*COUNT_FIELDS, "bytes", "bytes_after_estimate"]:
            assert row[field] == str(rows[row["table"]][field]), (row["table"], field)


def test_an_extra_unique_index_is_listed_and_does_not_enforce_the_key(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("create unique index photos_by_id_and_photo on breezeway.property_photos"
                     " (id, photo_id)")
        # On the natural key, but partial: it leaves every other row free to repeat.
        conn.execute("create unique index photos_partial_key on breezeway.property_photos"
                     " (property_pk, photo_id) where id < 0")
    row = audit_json(fresh, "--select", "property_photos")["breezeway.property_photos"]
    assert row["unique_indexes"] == [
        {"name": "photos_by_id_and_photo",
         "definition": "UNIQUE INDEX USING btree (id, photo_id)", "enforces_natural_key": False},
        {"name": "photos_partial_key",
         "definition": "UNIQUE INDEX USING btree (property_pk, photo_id) WHERE (id < 0)",
         "enforces_natural_key": False},
        {"name": "property_photos_pkey", "definition": "PRIMARY KEY (id)",
         "enforces_natural_key": False},
    ]
    assert row["natural_key_enforced_by"] is None
    assert row["duplicate_rows"] == EXPECTED["property_photos"].duplicates


def test_the_tables_that_reference_a_table_and_their_rows_that_point_at_duplicates(
        fresh: Database) -> None:
    kept = demo.expected_kept_ids("task_photos", TEST_SCALE)
    with fresh.connect() as conn:
        conn.execute("create table public.photo_likes (id serial primary key, photo_id bigint"
                     " references breezeway.task_photos (id), liked_by text)")
        # Every fifth photo liked: kept ones and removed copies alike; one like of no photo.
        conn.execute("insert into public.photo_likes (photo_id, liked_by) select id, 'a fan'"
                     " from breezeway.task_photos where id % 5 = 0 union all select null, 'x'")
        liked = [row[0] for row in conn.execute("select photo_id from public.photo_likes"
                                                " where photo_id is not null")]
    at_duplicates = len([photo for photo in liked if photo not in kept])
    assert 0 < at_duplicates < len(liked)
    row = audit_json(fresh, "--select", "task_photos")["breezeway.task_photos"]
    assert row["referenced_by"] == [
        {"constraint": "photo_likes_photo_id_fkey", "table": "public.photo_likes",
         "rows": len(liked) + 1, "rows_pointing_at_duplicates": at_duplicates}]
    readable = fresh.runner("audit", "--select", "task_photos")
    assert readable.stdout.splitlines()[-2:] == [
        "Referenced by (rows that point at a duplicate the swap would remove; runner swap "
        "refuses a table others reference):",
        f"  task_photos: public.photo_likes.photo_likes_photo_id_fkey, {at_duplicates:,} of "
        f"{len(liked) + 1:,} rows"]
    # A table nobody references says so by an empty list.
    assert audit_json(fresh, "--select", "task_tags")["breezeway.task_tags"][
        "referenced_by"] == []


def test_after_the_swap_no_duplicates_and_the_key_enforced(fresh: Database) -> None:
    swapped = fresh.runner("swap")
    assert swapped.exit_code == 0, swapped.output
    rows = audit_json(fresh)
    guests = demo.Layout.at(demo.CHILD_TABLES[2], TEST_SCALE)
    null_keys_left = {
        # not_distinct: one guest without email per reservation that had one.
        "reservation_guests": len(guests.null_email_keys()),
        # backfill: each event without a request got a request id of its own.
        "business_events": 0,
    }
    for name in NAMES:
        row = rows[f"breezeway.{name}"]
        assert (row["total_rows"], row["unique_rows"], row["duplicate_rows"],
                row["null_key_rows"]) == (EXPECTED[name].unique, EXPECTED[name].unique, 0,
                                          null_keys_left.get(name, 0)), name
        assert row["duplication_factor"] == 1.0 and row["duplicate_pct"] == 0.0
        enforcing = [index for index in row["unique_indexes"] if index["enforces_natural_key"]]
        expected_name = ("task_tags_task_pk_tag_pk_key" if name == "task_tags"
                         else constraint_name(name))
        assert [index["name"] for index in enforcing] == [expected_name], name
        assert row["natural_key_enforced_by"] == expected_name
    photos = rows["breezeway.property_photos"]["unique_indexes"]
    assert {"name": "property_photos__natural_key",
            "definition": "UNIQUE NULLS NOT DISTINCT (property_pk, photo_id)",
            "enforces_natural_key": True} in photos


def test_without_a_manifest_it_runs_dbt_parse_first(fresh: Database) -> None:
    shutil.rmtree(fresh.target_dir)
    rows = audit_json(fresh, "--project-dir", str(PROJECT_DIR), "--select", "task_assignments")
    assert (fresh.target_dir / "manifest.json").is_file()
    row = rows["breezeway.task_assignments"]
    assert (row["total_rows"], row["unique_rows"]) == (EXPECTED["task_assignments"].total,
                                                       EXPECTED["task_assignments"].unique)


def test_a_missing_table_is_one_error_line_before_any_scan(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("drop table breezeway.task_photos cascade")
    result = fresh.runner("audit")
    assert result.exit_code == 4
    assert result.stdout == ""
    assert result.output.splitlines() == [
        "Error: table breezeway.task_photos does not exist: check the source's schema and name "
        "in the dbt YAML (var breezeway_schema) and the database you connect to"
    ]


def test_reads_under_an_exclusive_lock_held_by_another_session(fresh: Database) -> None:
    """EXCLUSIVE conflicts with every lock but ACCESS SHARE: the audit finishes under it, so it
    takes no other. A lock_timeout turns a wait into a failure instead of a hung test."""
    impatient = Database({**fresh.env, "PGOPTIONS": "-c lock_timeout=5s"}, fresh.target_dir)
    with fresh.holding("lock table breezeway.task_requirements in exclusive mode"):
        row = audit_json(impatient, "--select", "task_requirements")
    assert row["breezeway.task_requirements"]["total_rows"] == EXPECTED["task_requirements"].total


def test_a_large_table_gets_an_estimate_and_its_block_ranges_add_up(built: Database) -> None:
    """Above the size threshold (here every table, at 0 bytes) the audit probes one block range
    and says how long the scan will take; the counts are those of the plain audit."""
    targets = artifacts.load_targets(built.target_dir)
    scans: list[audit.Scan] = []

    def watch(scan: audit.Scan) -> nullcontext:
        scans.append(scan)
        return nullcontext()

    with built.connect() as conn:
        conn.execute("set search_path = pg_catalog")
        results = audit.audit(conn, targets, watch, progress_above_bytes=0)
        photos = next(t for t in targets if t.live.name == "property_photos")
        blocks = conn.execute("select pg_relation_size('breezeway.property_photos')"
                              " / current_setting('block_size')::int").fetchone()[0]
        halves = [conn.execute(keys.count_keys(photos.live, photos.spec, part)).fetchone()
                  for part in ((0, blocks // 2), (blocks // 2, blocks))]
        probe_plan = "\n".join(row[0] for row in conn.execute(
            b"explain " + keys.count_keys(photos.live, photos.spec, (0, 1)).as_bytes(conn)))
    assert [scan.relation for scan in scans] == [t.live for t in targets]
    assert all(scan.estimate_seconds is not None and scan.estimate_seconds > 0 for scan in scans)
    for result in results:
        expected = EXPECTED[result.target.live.name]
        assert (result.counts.total_rows, result.counts.unique_rows,
                result.counts.null_key_rows) == (expected.total, expected.unique,
                                                 expected.null_keys)
    # Rows and NULL-key rows add up over block ranges; keys need not (one key spans both).
    assert sum(half[0] for half in halves) == EXPECTED["property_photos"].total
    assert all(0 < half[1] <= EXPECTED["property_photos"].unique for half in halves)
    assert "Tid Range Scan on property_photos" in probe_plan


def test_progress_lines_on_stderr_for_a_large_table(built: Database) -> None:
    from rich.console import Console

    stderr = io.StringIO()
    targets = artifacts.select_targets(artifacts.load_targets(built.target_dir), ["task_tags"])
    with built.connect() as conn:
        conn.execute("set search_path = pg_catalog")
        live = read_live_table(conn, targets[0].live)
        audit.audit_table(conn, targets[0], live,
                          audit_view.progress_on(Console(file=stderr), size_text),
                          progress_above_bytes=0)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("breezeway.task_tags: scanning ") and " about " in lines[0]
    assert lines[1].startswith("breezeway.task_tags: scanned in ")


def test_quoted_names_and_forbidden_null_keys(shop: Database) -> None:
    """"Order Lines" in "Shop", key ("Order ID", line_no), nulls: forbidden: rows that break the
    rule are counted as the constraint would see them, each NULL-key row a key of its own."""
    with shop.connect() as conn:
        conn.execute("""insert into "Shop"."Order Lines"
                        select md5('null line ' || v)::uuid, 'ORD-1', null, now(), 'no line'
                        from generate_series(1, 2) as v""")
    assert run_other_dbt(shop, "parse").success
    rows = audit_json(shop, "--project-dir", str(OTHER_PROJECT))
    row = rows["Shop.Order Lines"]
    # 5 orders x 3 lines x 4 loads, and the two rows without a line number.
    assert (row["total_rows"], row["unique_rows"], row["duplicate_rows"],
            row["null_key_rows"]) == (62, 17, 45, 2)
    assert row["natural_key"] == ["Order ID", "line_no"] and row["nulls"] == "forbidden"
    assert row["unique_indexes"] == [{"name": "Order Lines_pkey", "definition": "PRIMARY KEY (uid)",
                                      "enforces_natural_key": False}]


def test_a_partitioned_table_counts_every_partition_and_has_no_estimate(fresh: Database) -> None:
    """Not a demo table: any table the YAML may name. Two partitions, a key of two columns
    with NULLs under nulls: distinct, and sizes summed over the partitions."""
    with fresh.connect() as conn:
        conn.execute("""
            create table breezeway."Visits" (id bigint, "Day" int, guest text)
                partition by range ("Day");
            create table breezeway.visits_1 partition of breezeway."Visits"
                for values from (0) to (10);
            create table breezeway.visits_2 partition of breezeway."Visits"
                for values from (10) to (20);
            -- 20 days x 3 guests, each loaded twice; then 4 visits of day 5 with no guest.
            insert into breezeway."Visits"
            select row_number() over (), day, 'guest ' || g
            from generate_series(0, 19) as day, generate_series(1, 3) as g,
                 generate_series(1, 2) as copy;
            insert into breezeway."Visits" select 1000 + v, 5, null from generate_series(1, 4) as v;
        """)
        relation = artifacts.Relation("breezeway", "Visits")
        target = artifacts.DedupTarget(
            source="breezeway.Visits", live=relation, deduplicated=relation,
            key_groups=relation, spec=artifacts.DedupSpec(
                ("Day", "guest"), (artifacts.KeepColumn("id", False),), "distinct"),
            model_id="")
        conn.execute("set search_path = pg_catalog")
        scans: list[audit.Scan] = []
        result = audit.audit_table(
            conn, target, read_live_table(conn, relation),
            lambda scan: scans.append(scan) or nullcontext(), progress_above_bytes=0)
        sizes = conn.execute("select pg_total_relation_size('breezeway.visits_1')"
                             " + pg_total_relation_size('breezeway.visits_2')").fetchone()[0]
    assert (result.counts.total_rows, result.counts.unique_rows,
            result.counts.null_key_rows) == (124, 64, 4)
    assert result.bytes == sizes > 0
    assert scans == [audit.Scan(relation, scans[0].heap_bytes, None)]
    assert scans[0].heap_bytes > 0


def test_exclude_leaves_tables_out_by_any_name_select_takes(built: Database) -> None:
    rows = audit_json(built, "--exclude", "task_tags", "--exclude", "breezeway.business_events",
                      "--exclude", "breezeway.task_photos")
    assert set(rows) == {f"breezeway.{name}" for name in EXPECTED} - {
        "breezeway.task_tags", "breezeway.business_events", "breezeway.task_photos"} | {"TOTAL"}
    refused = built.runner("audit", "--exclude", "no_such_table")
    assert refused.exit_code == 4
    assert said(refused) == ["Error: --exclude no_such_table: no deduplicated table of that "
                             "name; known: " + ", ".join(sorted(EXPECTED))]


def test_several_tables_that_reference_one_table_are_each_counted(fresh: Database) -> None:
    kept = demo.expected_kept_ids("task_photos", TEST_SCALE)
    with fresh.connect() as conn:
        for name, step in (("photo_likes", 5), ("photo_flags", 3)):
            conn.execute(f"create table public.{name} (photo_id bigint"
                         f" references breezeway.task_photos (id))")
            conn.execute(f"insert into public.{name} select id from breezeway.task_photos"
                         f" where id % {step} = 0")
        counted = {name: [row[0] for row in conn.execute(f"select photo_id from public.{name}")]
                   for name in ("photo_likes", "photo_flags")}
    row = audit_json(fresh, "--select", "task_photos")["breezeway.task_photos"]
    assert row["referenced_by"] == [
        {"constraint": f"{name}_photo_id_fkey", "table": f"public.{name}",
         "rows": len(photos), "rows_pointing_at_duplicates": len(set(photos) - kept)}
        for name, photos in sorted(counted.items())]
