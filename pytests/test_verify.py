"""runner verify against a real server: every check passes after a swap with the demo's exact
numbers, each fails on what it is there to catch, and verify itself changes nothing."""

from __future__ import annotations

import dataclasses
import json
import re

import psycopg
import pytest
from click.testing import CliRunner
from conftest import TEST_SCALE, Database
from test_other_project import OTHER_PROJECT, run_other_dbt
from test_other_project import shop as shop  # imported, its fixture is this module's too

from runner import demo
from runner.cli import cli
from runner.declaration import artifacts
from runner.declaration.names import constraint_name
from runner.facts import verify

CHECKS = ["duplicates", "null keys", "natural key constraint", "indexes valid",
          "foreign keys valid", "sequences", "archive", "size", "idempotent"]
TABLES = [table.name for table in demo.CHILD_TABLES]
# The key columns and the foreign key of each demo table, as demo.generate creates them.
NATURAL_KEYS = {
    "property_photos": "property_pk, photo_id", "task_requirements": "task_pk, requirement_id",
    "reservation_guests": "reservation_pk, guest_email", "task_assignments": "task_pk, assignee_id",
    "task_photos": "task_pk, photo_id", "task_tags": "task_pk, tag_pk",
    "business_events": "request_id",
}
FOREIGN_KEYS = {
    "property_photos": "property_photos_property_pk_fkey",
    "task_requirements": "task_requirements_task_pk_fkey",
    "reservation_guests": "reservation_guests_reservation_pk_fkey",
    "task_assignments": "task_assignments_task_pk_fkey",
    "task_photos": "task_photos_task_pk_fkey",
    "task_tags": "task_tags_task_pk_fkey",
}
SAMPLE = 100


def verified(database: Database, *args: str, exit_code: int) -> tuple[dict, str]:
    """The JSON rows by (table, check), and the last line, of a `runner verify` that exits so."""
    result = database.runner("verify", "--format", "json", *args)
    assert result.exit_code == exit_code, result.output
    rows = json.loads(result.stdout)
    assert [row["check"] for row in rows] == CHECKS * (len(rows) // len(CHECKS))
    by_check = {(row["table"].removeprefix("breezeway."), row["check"]):
                (row["result"], row["detail"]) for row in rows}
    return by_check, result.stderr.strip().splitlines()[-1]


def keys_with_copies(table: str) -> int:
    layout = demo.Layout.at(next(t for t in demo.CHILD_TABLES if t.name == table), TEST_SCALE)
    return sum(layout.copies(key) > 1 for key in range(layout.keys))


def null_email_rows_kept() -> int:
    """reservation_guests after the swap: each guest without email once."""
    table = next(t for t in demo.CHILD_TABLES if t.name == "reservation_guests")
    return len(demo.Layout.at(table, TEST_SCALE).null_email_keys())


def policies(database: Database) -> dict[str, str]:
    """Each table's NULL policy, as the dbt YAML declares it; alternative_key for a table whose
    NULL keys have one."""
    return {t.name: "alternative_key" if t.spec.alternative_key else t.spec.nulls
            for t in artifacts.load_targets(database.target_dir)}


def null_key_rows_kept(table: str, policy: str) -> int:
    """Rows with a NULL key after the swap: one per NULL key where NULLs are equal, every such
    row where each is its own, none where the build filled them in."""
    if table == "reservation_guests":
        return null_email_rows_kept()
    return demo.expected_counts(TEST_SCALE)[table].null_keys if policy == "distinct" else 0


def null_keys_detail(rows: int, policy: str) -> str:
    if not rows:
        return f"no NULL in the key (nulls: {policy})"
    if policy in ("forbidden", "backfill"):
        return (f"NULL in the key: {rows:,} rows, which nulls: {policy} does not allow: fill "
                "them in or delete them, then add NOT NULL")
    if policy == "alternative_key":
        return (f"NULL in the key: {rows:,} rows, keyed by the alternative key "
                "(reservation_pk, guest_email, guest_name)")
    meaning = "equal to each other" if policy == "not_distinct" else "each its own key"
    return f"NULL in the key: {rows:,} rows, {meaning} (nulls: {policy})"


def swapped(database: Database, *args: str) -> None:
    result = database.runner("swap", *args)
    assert result.exit_code == 0, result.output


def test_after_the_swap_every_check_passes_with_the_exact_numbers(fresh: Database) -> None:
    swapped(fresh)
    with fresh.connect() as conn:
        archives = dict(conn.execute("select live_table, archive_table from"
                                     " dedup_archive.swap_log").fetchall())
    checks, last_line = verified(fresh, exit_code=0)
    assert last_line == f"All {len(TABLES) * len(CHECKS)} checks passed."
    assert len(checks) == len(TABLES) * len(CHECKS)
    expected = demo.expected_counts(TEST_SCALE)
    for table, nulls in policies(fresh).items():
        counts = expected[table]
        details = {check: detail for (name, check), (result, detail) in checks.items()
                   if name == table and result == "ok"}
        assert list(details) == CHECKS, (table, checks)
        assert details["duplicates"] == f"{counts.unique:,} rows, one per key"
        null_rows = null_key_rows_kept(table, nulls)
        assert details["null keys"] == null_keys_detail(null_rows, nulls)
        if table == "task_tags":
            # Never swapped: it had its constraint, on NOT NULL columns, all along.
            assert details["natural key constraint"] == (
                "constraint task_tags_task_pk_tag_pk_key on (task_pk, tag_pk), key columns "
                "NOT NULL, valid")
        elif nulls == "alternative_key":
            # One partial unique index where the email is NULL, one where the name is too.
            assert details["natural key constraint"] == (
                f"constraint {constraint_name(table)} on ({NATURAL_KEYS[table]}), the "
                "alternative key (reservation_pk, guest_email, guest_name) where it has a NULL "
                "by 2 partial unique indexes (reservation_guests__natural_key_nulls__1, "
                "reservation_guests__natural_key_nulls__2), valid")
        else:
            semantics = "NULLS NOT DISTINCT" if nulls == "not_distinct" else "NULLs distinct"
            assert details["natural key constraint"] == (
                f"constraint {constraint_name(table)} on ({NATURAL_KEYS[table]}), "
                f"{semantics}, valid")
        # Primary key and natural key; the tables with a parent have their foreign key's index;
        # an alternative key has its partial indexes.
        indexes = (3 if table in FOREIGN_KEYS else 2) + 2 * (nulls == "alternative_key")
        assert details["indexes valid"] == f"{indexes} indexes, all valid"
        assert details["foreign keys valid"] == (
            f"1 validated: {FOREIGN_KEYS[table]}" if table in FOREIGN_KEYS else "no foreign keys")
        # The sequence goes on from the original's: after every id the original table used.
        highest = max(demo.expected_kept_ids(table, TEST_SCALE))
        assert details["sequences"] == (
            f"breezeway.{table}_id_seq: next {counts.total + 1:,}, max(id) {highest:,}")
        if table == "task_tags":
            assert re.fullmatch(
                rf"{counts.unique:,} rows, \S+ \S+ now; no swap in effect in "
                r"dedup_archive\.swap_log to compare with", details["size"]), details["size"]
        else:
            assert re.fullmatch(
                rf"{counts.unique:,} rows, \S+ \S+ now; swap at \S+ \S+ UTC: "
                rf"{counts.total:,} rows, \S+ \S+ before, {counts.unique:,} rows, \S+ \S+ after",
                details["size"]), details["size"]
        # NULL-key rows are sampled too: after the swap none is left where NULLs are distinct,
        # and where they are equal each conflicts with its kept row.
        assert details["idempotent"] == (
            f"{min(SAMPLE, counts.unique):,} existing rows replayed, 0 inserted")
        if table == "task_tags":
            assert details["archive"] == ("no archive: no swap that replaced the table is in "
                                          "effect")
        else:
            assert details["archive"] == (
                f"dedup_archive.{archives[table]} holds the original rows and constrains, "
                "fires and publishes nothing; the writes since the swap are captured, so it "
                "can be rolled back")


def test_before_the_swap_the_duplicates_and_the_replay_fail(fresh: Database) -> None:
    # On a copy: the replay's inserts are rolled back, but they advance the sequences.
    checks, last_line = verified(fresh, exit_code=1)
    expected = demo.expected_counts(TEST_SCALE)
    nulls = policies(fresh)
    duplicated = [table for table in TABLES if expected[table].duplicates]
    assert duplicated == [table for table in TABLES if table != "task_tags"]
    # NULL keys the build fills in or refuses are still in the live table.
    null_keys_left = {(table, "null keys") for table in TABLES
                      if expected[table].null_keys and nulls[table] in ("forbidden", "backfill")}
    assert null_keys_left == ({("business_events", "null keys")}
                              if nulls["business_events"] == "backfill" else set())
    failed = {(table, check) for (table, check), (result, _) in checks.items()
              if result == "FAIL"}
    assert failed == null_keys_left | {
        (table, check) for table in duplicated
        for check in ("duplicates", "natural key constraint", "idempotent")}
    assert last_line == (f"{len(failed)} of {len(TABLES) * len(CHECKS)} checks failed: fix what "
                         "each FAIL row says, then run `runner verify` again.")
    for table in duplicated:
        counts = expected[table]
        assert checks[table, "duplicates"][1].startswith(
            f"{counts.total:,} rows for {counts.unique:,} keys; keys with copies: "
            f"{keys_with_copies(table):,}, rows too many: {counts.duplicates:,} (e.g. key (")
        assert checks[table, "natural key constraint"][1] == (
            f"no unique constraint or index on ({NATURAL_KEYS[table]}): run runner swap, "
            "which adds it")
        assert checks[table, "null keys"][1] == null_keys_detail(counts.null_keys, nulls[table])
        replayable = counts.total - (counts.null_keys if nulls[table] != "not_distinct" else 0)
        replayed = min(SAMPLE, replayable)
        assert checks[table, "idempotent"][1] == (
            f"{replayed:,} of {replayed:,} existing rows replayed were inserted again: the ETL "
            "duplicates them; add the natural key's constraint (runner swap)")
        assert checks[table, "sequences"][1] == (
            f"breezeway.{table}_id_seq: next {counts.total + 1:,}, max(id) {counts.total:,}")
        assert checks[table, "size"][1].endswith(
            "now; no swap in effect in dedup_archive.swap_log to compare with")
    assert checks["task_tags", "idempotent"] == ("ok", "9 existing rows replayed, 0 inserted")


def test_an_invalid_index_is_reported(fresh: Database) -> None:
    swapped(fresh, "--select", "property_photos")
    with fresh.connect() as conn:
        # Every photo of the demo belongs to the same property: the build fails, its index stays.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("create unique index concurrently photos_by_property"
                         " on breezeway.property_photos (property_pk)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("create unique index concurrently task_photos_key"
                         " on breezeway.task_photos (task_pk, photo_id)")
    checks, last_line = verified(fresh, "--select", "property_photos", "--select", "task_photos",
                                 exit_code=1)
    assert checks["property_photos", "indexes valid"] == ("FAIL", (
        "INVALID: photos_by_property (a failed CREATE INDEX CONCURRENTLY, or one still "
        "running): DROP INDEX CONCURRENTLY and build it again"))
    # The natural key's own constraint is intact.
    assert checks["property_photos", "natural key constraint"][0] == "ok"
    assert checks["task_photos", "natural key constraint"] == ("FAIL", (
        "unique index task_photos_key on (task_pk, photo_id) is INVALID, left by a failed "
        "CREATE UNIQUE INDEX CONCURRENTLY: drop it and build it again"))
    assert checks["task_photos", "indexes valid"][1].startswith("INVALID: task_photos_key ")
    failed = sorted(key for key, (result, _) in checks.items() if result == "FAIL")
    assert failed == [("property_photos", "indexes valid"), ("task_photos", "duplicates"),
                      ("task_photos", "idempotent"), ("task_photos", "indexes valid"),
                      ("task_photos", "natural key constraint")]
    assert last_line.startswith(f"5 of {2 * len(CHECKS)} checks failed")


def test_a_sequence_behind_or_owned_elsewhere_is_reported(fresh: Database) -> None:
    swapped(fresh)
    highest = max(demo.expected_kept_ids("task_photos", TEST_SCALE))
    with fresh.connect() as conn:
        conn.execute("select setval('breezeway.task_photos_id_seq', %s)", (highest - 1,))
        conn.execute("alter sequence breezeway.task_assignments_id_seq owned by none")
    checks, _ = verified(fresh, "--select", "task_photos", "--select", "task_assignments",
                         exit_code=1)
    assert checks["task_photos", "sequences"] == ("FAIL", (
        f"breezeway.task_photos_id_seq: next {highest:,}, max(id) {highest:,}: the next insert "
        "would reuse a value; SELECT setval('breezeway.task_photos_id_seq', max(id)) FROM "
        "breezeway.task_photos"))
    assert checks["task_assignments", "sequences"] == ("FAIL", (
        "breezeway.task_assignments_id_seq numbers id but no column owns it: ALTER SEQUENCE "
        "breezeway.task_assignments_id_seq OWNED BY breezeway.task_assignments.id"))
    assert sorted(key for key, (result, _) in checks.items() if result == "FAIL") == [
        ("task_assignments", "sequences"), ("task_photos", "sequences")]


def test_a_sequence_unowned_before_the_swap_is_not_the_swaps_failure(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("alter sequence breezeway.task_assignments_id_seq owned by none")
    swapped(fresh, "--select", "task_assignments")
    checks, _ = verified(fresh, "--select", "task_assignments", exit_code=0)
    total = demo.expected_counts(TEST_SCALE)["task_assignments"].total
    highest = max(demo.expected_kept_ids("task_assignments", TEST_SCALE))
    assert checks["task_assignments", "sequences"] == ("ok", (
        f"breezeway.task_assignments_id_seq: next {total + 1:,}, max(id) {highest:,}; no column "
        "owns it, as before the swap (not the swap's doing); to tie it to the table: ALTER "
        "SEQUENCE breezeway.task_assignments_id_seq OWNED BY breezeway.task_assignments.id"))


def test_an_archive_that_constrains_or_fires_is_reported(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    with fresh.connect() as conn:
        archive = conn.execute("select archive_table from dedup_archive.swap_log").fetchone()[0]
        conn.execute(psycopg.sql.SQL(
            "alter table {} add constraint back foreign key (task_pk) references"
            " breezeway.tasks (id)").format(psycopg.sql.Identifier("dedup_archive", archive)))
    checks, _ = verified(fresh, "--select", "task_photos", exit_code=1)
    assert checks["task_photos", "archive"] == ("FAIL", (
        f"dedup_archive.{archive} is not inert: its foreign keys back hold rows of their "
        f"parents: ALTER TABLE dedup_archive.{archive} DROP CONSTRAINT each"))
    with fresh.connect() as conn:
        conn.execute(psycopg.sql.SQL("alter table {} drop constraint back").format(
            psycopg.sql.Identifier("dedup_archive", archive)))
    stopped = fresh.runner("capture", "--stop", "--select", "task_photos")
    assert stopped.exit_code == 0, stopped.output
    checks, _ = verified(fresh, "--select", "task_photos", exit_code=0)
    assert checks["task_photos", "archive"] == ("ok", (
        f"dedup_archive.{archive} holds the original rows and constrains, fires and publishes "
        "nothing; the writes since the swap are not captured, so it cannot be rolled back"))


def test_a_foreign_key_not_valid_is_reported(fresh: Database) -> None:
    swapped(fresh)
    with fresh.connect() as conn:
        conn.execute("alter table breezeway.task_requirements"
                     " drop constraint task_requirements_task_pk_fkey")
        conn.execute("alter table breezeway.task_requirements add constraint"
                     " task_requirements_task_pk_fkey foreign key (task_pk)"
                     " references breezeway.tasks (id) not valid")
    checks, last_line = verified(fresh, "--select", "task_requirements", exit_code=1)
    assert checks["task_requirements", "foreign keys valid"] == ("FAIL", (
        "NOT VALID: task_requirements_task_pk_fkey: the rows it had when it was added were "
        "never checked; ALTER TABLE breezeway.task_requirements VALIDATE CONSTRAINT "
        "task_requirements_task_pk_fkey"))
    assert [key for key, (result, _) in checks.items() if result == "FAIL"] == [
        ("task_requirements", "foreign keys valid")]
    assert last_line.startswith(f"1 of {len(CHECKS)} checks failed")


def events_verified_as(database: Database, policy: str) -> dict[str, tuple[bool, str]]:
    """verify's checks of business_events, had its YAML declared `nulls: policy`."""
    events = next(t for t in artifacts.load_targets(database.target_dir)
                  if t.name == "business_events")
    target = dataclasses.replace(events, spec=dataclasses.replace(events.spec, nulls=policy))
    with database.connect() as conn:
        results = verify.verify(conn, [target], verify.VerifyOptions("dedup_archive"))
    return {r.check: (r.ok, r.detail) for r in results}


NEW_EVENTS_WITHOUT_REQUEST = 3


@pytest.mark.parametrize("policy", ["not_distinct", "distinct", "forbidden", "backfill"])
def test_the_null_policy_decides_what_a_null_key_means(fresh: Database, policy: str) -> None:
    """After the swap the ETL writes events without a request_id; the plain UNIQUE on
    request_id lets each in. What that means is the policy's, read from DedupSpec.nulls."""
    swapped(fresh, "--select", "business_events")
    with fresh.connect() as conn:
        conn.execute("insert into breezeway.business_events (request_id, event_type, ts)"
                     " select null, 'booking', now() from generate_series(1, %s)",
                     (NEW_EVENTS_WITHOUT_REQUEST,))
        # Whatever the YAML says, those are the only NULL keys left after the swap.
        rows, nulls = conn.execute("select count(*), count(*) filter (where request_id is null)"
                                   " from breezeway.business_events").fetchone()
    assert nulls == NEW_EVENTS_WITHOUT_REQUEST + null_key_rows_kept(
        "business_events", policies(fresh)["business_events"])
    checks = events_verified_as(fresh, policy)
    assert checks["null keys"] == (policy in ("not_distinct", "distinct"),
                                   null_keys_detail(nulls, policy))
    failed = [check for check, (ok, _) in checks.items() if not ok]
    if policy == "not_distinct":
        # The NULL keys are one key: its copies are duplicates the constraint does not stop.
        assert checks["duplicates"] == (False, (
            f"{rows:,} rows for {rows - nulls + 1:,} keys; keys with copies: 1, rows too many: "
            f"{nulls - 1:,} (e.g. key ()); deduplicate: runner capture, dbt build, runner swap"))
        assert checks["natural key constraint"] == (False, (
            "unique index business_events__natural_key on (request_id) treats NULLs as "
            "distinct; nulls: not_distinct needs UNIQUE NULLS NOT DISTINCT"))
        # The replay samples the NULL-key rows first: the constraint lets each in again.
        assert checks["idempotent"] == (False, (
            f"{nulls:,} of {SAMPLE} existing rows replayed were inserted again, each with a "
            "NULL in the key, which the table's unique constraint treats as distinct where "
            "nulls: not_distinct makes NULLs equal: enforce the key with NULLS NOT DISTINCT "
            "(runner swap does)"))
        assert failed == ["duplicates", "natural key constraint", "idempotent"]
        return
    assert checks["duplicates"] == (True, f"{rows:,} rows, one per key")
    # A re-sent NULL-key row conflicts with nothing: the ETL is not idempotent for them, and
    # verify says so under every policy that lets them be rows of their own.
    assert checks["idempotent"] == (False, (
        f"{nulls:,} of {SAMPLE} existing rows replayed were inserted again, each with a NULL "
        f"in the key, which under nulls: {policy} conflicts with nothing, so every re-send "
        "adds a row: give those rows a key (nulls: backfill), or declare nulls: not_distinct"))
    assert failed == (["idempotent"] if policy == "distinct" else ["null keys", "idempotent"])


def test_a_unique_index_treating_nulls_as_equal_is_wrong_when_they_are_distinct(
        fresh: Database) -> None:
    swapped(fresh, "--select", "business_events")
    with fresh.connect() as conn:
        conn.execute("alter table breezeway.business_events"
                     " drop constraint business_events__natural_key")
        # Under nulls: distinct NULL-key events are kept, and would block this index.
        conn.execute("delete from breezeway.business_events where request_id is null")
        conn.execute("create unique index events_by_request on breezeway.business_events"
                     " (request_id) nulls not distinct")
    checks = events_verified_as(fresh, "distinct")
    assert checks["natural key constraint"] == (False, (
        "events_by_request treats NULLs as equal, but under nulls: distinct every NULL-key row "
        "is its own: the ETL's ON CONFLICT DO NOTHING drops them; rebuild it without NULLS NOT "
        "DISTINCT"))
    assert [check for check, (ok, _) in checks.items() if not ok] == ["natural key constraint"]
    # Where NULLs are equal, or never left in the table, the same index is right.
    for policy in ("not_distinct", "backfill"):
        assert events_verified_as(fresh, policy)["natural key constraint"] == (True, (
            "unique index events_by_request on (request_id), NULLS NOT DISTINCT, valid"))


def relations_and_rows(database: Database) -> list[tuple]:
    """Every relation of every schema but the catalog's, with the row count of each table."""
    with database.connect() as conn:
        relations = conn.execute(
            "select n.nspname, c.relname, c.relkind from pg_class as c"
            " join pg_namespace as n on n.oid = c.relnamespace"
            " where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')"
            " order by 1, 2").fetchall()
        return [(schema, name, kind, conn.execute(
                    psycopg.sql.SQL("select count(*) from {}").format(
                        psycopg.sql.Identifier(schema, name))).fetchone()[0]
                 if kind == "r" else None)
                for schema, name, kind in relations]


def test_verify_changes_nothing(fresh: Database) -> None:
    # Unswapped first: the replay inserts rows there, and must roll them back.
    before = relations_and_rows(fresh)
    assert fresh.runner("verify").exit_code == 1
    assert relations_and_rows(fresh) == before
    swapped(fresh)
    before = relations_and_rows(fresh)
    assert fresh.runner("verify").exit_code == 0
    assert relations_and_rows(fresh) == before


def test_the_replay_gives_up_on_a_lock_instead_of_queueing(fresh: Database) -> None:
    # SHARE lets verify read the table, but not insert into it.
    with fresh.holding("lock table breezeway.task_tags in share mode"):
        checks, _ = verified(fresh, "--select", "task_tags", "--lock-timeout", "50ms",
                             exit_code=1)
    assert checks["task_tags", "idempotent"] == ("FAIL", (
        "waited 50 ms for a lock another session holds (the ETL?) and gave up: run runner "
        "verify again"))
    assert checks["task_tags", "duplicates"] == ("ok", "9 rows, one per key")


def test_table_and_csv_formats(fresh: Database) -> None:
    swapped(fresh, "--select", "task_photos")
    as_csv = fresh.runner("verify", "--select", "task_photos", "--format", "csv")
    assert as_csv.exit_code == 0, as_csv.output
    lines = as_csv.stdout.splitlines()
    assert lines[0] == "table,check,result,detail"
    assert [line.split(",")[1] for line in lines[1:]] == CHECKS
    assert lines[-1] == ("breezeway.task_photos,idempotent,ok,"
                         "\"78 existing rows replayed, 0 inserted\"")
    sampled = fresh.runner("verify", "--select", "task_photos", "--format", "csv",
                           "--sample", "5")
    assert sampled.stdout.splitlines()[-1] == ("breezeway.task_photos,idempotent,ok,"
                                               "\"5 existing rows replayed, 0 inserted\"")
    as_table = fresh.runner("verify", "--select", "task_photos")
    assert as_table.exit_code == 0
    assert "runner verify" in as_table.stdout
    assert "natural key constraint" in as_table.stdout
    assert as_table.stderr.strip() == f"All {len(CHECKS)} checks passed."


def one_line_error(result, exit_code: int = 4) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_bad_input_is_one_line(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("alter table breezeway.task_photos rename column photo_id to picture_id")
        conn.execute("alter table breezeway.task_tags rename to task_labels")
    assert one_line_error(fresh.runner("verify", "--select", "task_photos")) == (
        "Error: natural key column(s) ['photo_id'] of breezeway.task_photos are not columns of "
        "breezeway.task_photos: fix natural_key in the dbt YAML")
    assert one_line_error(fresh.runner("verify", "--select", "task_tags")).startswith(
        "Error: table breezeway.task_tags does not exist: ")
    unreachable = CliRunner().invoke(cli, ["verify"], env={
        **fresh.env, "PGHOST": "127.0.0.1", "PGPORT": "1",
        "DBT_TARGET_PATH": str(fresh.target_dir)})
    assert one_line_error(unreachable, exit_code=3).startswith(
        "Error: cannot connect to PostgreSQL at 127.0.0.1:1")
    assert one_line_error(fresh.runner("verify", "--select", "no_such_table")).startswith(
        "Error: --select no_such_table: no deduplicated table of that name")


def test_a_role_that_may_not_insert_is_one_line(fresh: Database) -> None:
    """A read-only monitoring role cannot replay the ETL's statement: say so, once."""
    with fresh.connect() as conn:
        conn.execute("create role verify_monitor login")
        conn.execute("grant usage on schema breezeway, dedup_archive to verify_monitor")
        conn.execute("grant select on all tables in schema breezeway to verify_monitor")
        conn.execute("grant select on all sequences in schema breezeway to verify_monitor")
        conn.execute("grant select on all tables in schema dedup_archive to verify_monitor")
    try:
        result = CliRunner().invoke(cli, ["verify", "--select", "task_tags"], env={
            **fresh.env, "PGUSER": "verify_monitor", "DBT_TARGET_PATH": str(fresh.target_dir)})
        assert one_line_error(result) == (
            "Error: permission denied for table task_tags: run runner verify as a role that may "
            "read these tables, their sequences and those of dedup_archive, and insert into the "
            "tables (its inserts are always rolled back)")
    finally:
        with fresh.connect() as conn:
            conn.execute("drop owned by verify_monitor")
            conn.execute("drop role verify_monitor")


def test_quoted_names_with_a_sequence(shop: Database) -> None:
    with shop.connect() as conn:
        conn.execute('alter table "Shop"."Order Lines" add column "Load Nº" bigserial')
    assert run_other_dbt(shop, "parse").success
    assert shop.runner("capture", "--project-dir", str(OTHER_PROJECT)).exit_code == 0
    assert run_other_dbt(shop, "build").success
    before = shop.runner("verify", "--project-dir", str(OTHER_PROJECT), "--format", "json")
    assert before.exit_code == 1, before.output
    assert {row["check"] for row in json.loads(before.stdout) if row["result"] == "FAIL"} == {
        "duplicates", "natural key constraint"}
    swapped(shop, "--project-dir", str(OTHER_PROJECT))
    result = shop.runner("verify", "--project-dir", str(OTHER_PROJECT), "--format", "json")
    assert result.exit_code == 0, result.output
    details = {row["check"]: row["detail"] for row in json.loads(result.stdout)}
    with shop.connect() as conn:
        highest = conn.execute('select max("Load Nº") from "Shop"."Order Lines"').fetchone()[0]
    # 5 orders of 3 lines loaded 4 times each: 60 rows, 15 kept, and a key of text.
    assert details["duplicates"] == "15 rows, one per key"
    assert details["null keys"] == "no NULL in the key (nulls: forbidden)"
    assert details["natural key constraint"] == (
        'constraint Order Lines__natural_key on (Order ID, line_no), NULLs distinct, valid')
    # Numbered 1 to 60; the verify before the swap replayed all 60 rows, and a rolled-back
    # insert still takes its numbers from the sequence.
    assert details["sequences"] == (
        f"Shop.Order Lines_Load Nº_seq: next 121, max(Load Nº) {highest}")
    assert details["idempotent"] == "15 existing rows replayed, 0 inserted"
