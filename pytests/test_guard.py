"""The guard of a user's CI after the swap, against a real server: uniqueness tests on the live
tables, the view of their audit numbers and its snapshot (selectors.yml), which a plain
`dbt build` leaves out and `runner swap` does not count."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import psycopg
import yaml
from conftest import PROJECT_DIR, TEST_SCALE, Database, _create_database, run_dbt, said
from psycopg import sql
from test_swap import SWAPPED

from runner import demo
from runner.declaration.artifacts import GUARD_TAG

# The command of README.md and examples/ci/dedup-guard.yml, checked against both below.
GUARD = ["build", "--selector", "dedup_guard",
         "--warn-error-options", '{"error": ["LogTestResult"]}']
WORKFLOW = PROJECT_DIR / "examples" / "ci" / "dedup-guard.yml"
EXPECTED = demo.expected_counts(TEST_SCALE)
TABLES = {table.name: table for table in demo.CHILD_TABLES}
AUDIT_COLUMNS = sql.SQL("source_table, total_rows, unique_rows, duplicate_rows, null_key_rows")


def duplicate_keys(name: str) -> int:
    """Natural keys that more than one row shares, by the generator's formula, plus the rows
    with a NULL key where the YAML wants none left (business_events: nulls: backfill): the
    failures a uniqueness test reports."""
    layout = demo.Layout.at(TABLES[name], TEST_SCALE)
    shared = sum(1 for key in range(layout.keys) if layout.copies(key) > 1)
    return shared + (layout.null_rows if name == "business_events" else 0)


def audit_row(name: str) -> tuple:
    """What the audit says of a demo table before the swap."""
    counts = EXPECTED[name]
    return (f"breezeway.{name}", counts.total, counts.unique, counts.duplicates, counts.null_keys)


def swapped_audit_row(name: str) -> tuple:
    """What the audit says of a demo table after the swap: one row per key, and of the rows
    with a NULL in their key, one per key where NULLs are equal, none where they were backfilled."""
    layout = demo.Layout.at(TABLES[name], TEST_SCALE)
    # business_events' NULL request_ids were backfilled with uuids.
    null_keys = {"reservation_guests": len(layout.null_email_keys())}.get(name, 0)
    unique = EXPECTED[name].unique
    return (f"breezeway.{name}", unique, unique, 0, null_keys)


def guard(database: Database, target_dir: Path, *args: str) -> tuple[bool, dict[str, tuple]]:
    """Run the guard as a user's CI does, in its own target directory (so the build's
    run_results, which `runner swap` reads, stay as they are); return whether it passed and
    each live table's uniqueness test as (status, failures)."""
    result = run_dbt([*GUARD, *args], database.env, target_dir)
    assert result.exception is None, result.exception
    statuses = statuses_by_node(target_dir)
    assert statuses["model.dedup.live_duplicates"] == ("success", None)
    assert statuses["snapshot.dedup.live_duplicates_history"] == ("success", None)
    return result.success, live_table_tests(target_dir)


def statuses_by_node(target_dir: Path) -> dict[str, tuple]:
    results = json.loads((target_dir / "run_results.json").read_text())
    return {r["unique_id"]: (r["status"], r["failures"]) for r in results["results"]}


def live_table_tests(target_dir: Path) -> dict[str, tuple]:
    """The guard-tagged tests of the latest invocation, by the live table each tests."""
    manifest = json.loads((target_dir / "manifest.json").read_text())
    tests = {}
    for node_id, status in statuses_by_node(target_dir).items():
        node = manifest["nodes"][node_id]
        if node["resource_type"] == "test" and GUARD_TAG in node["tags"]:
            (source_id,) = node["depends_on"]["nodes"]
            tests[manifest["sources"][source_id]["name"]] = status
    return tests


def own_target(database: Database, tmp_path: Path) -> Path:
    """A copy of the build's target directory, so that dbt can parse partially."""
    return Path(shutil.copytree(database.target_dir, tmp_path / "guard"))


def audit(database: Database, model: str) -> list[tuple]:
    with database.connect() as conn:
        return conn.execute(sql.SQL("select {} from {} order by source_table collate \"C\"")
                            .format(AUDIT_COLUMNS, sql.Identifier("dedup_audit", model)))\
            .fetchall()


def test_a_plain_dbt_build_runs_no_part_of_the_guard(built: Database) -> None:
    manifest = json.loads((built.target_dir / "manifest.json").read_text())
    executable = {node_id: node for node_id, node in manifest["nodes"].items()
                  if node["resource_type"] in ("model", "test", "snapshot", "seed")}
    guard_nodes = {node["name"] for node in executable.values() if GUARD_TAG in node["tags"]}
    assert guard_nodes == {"live_duplicates", "live_duplicates_history"} | {
        f"source_dedup_natural_key_unique_breezeway_{name}_" for name in TABLES}
    ran = set(statuses_by_node(built.target_dir))
    # Everything else ran, the guard nothing: it adds no work to the build.
    assert ran == {node_id for node_id, node in executable.items()
                   if GUARD_TAG not in node["tags"]}
    with built.connect() as conn:
        assert conn.execute("select to_regclass('dedup_audit.live_duplicates'),"
                            " to_regclass('dedup_audit.live_duplicates_history')").fetchone() \
            == (None, None)


def test_before_the_swap_the_guard_fails_on_exactly_the_tables_with_duplicates(
        fresh: Database, tmp_path: Path) -> None:
    passed, tests = guard(fresh, own_target(fresh, tmp_path))
    assert not passed
    assert tests == {name: ("fail", duplicate_keys(name)) if name in SWAPPED else ("pass", 0)
                     for name in TABLES}
    assert {name for name in TABLES if duplicate_keys(name) == 0} == {"task_tags"}
    # The view says what the build's audit says, from the live tables, table by table.
    assert audit(fresh, "live_duplicates") == sorted(map(audit_row, TABLES))
    assert audit(fresh, "live_duplicates") == audit(fresh, "audit_duplicates")


def test_after_the_swap_the_guard_passes(fresh: Database, tmp_path: Path) -> None:
    result = fresh.runner("swap")
    assert result.exit_code == 0, result.output
    passed, tests = guard(fresh, own_target(fresh, tmp_path))
    assert passed
    assert tests == {name: ("pass", 0) for name in TABLES}
    assert audit(fresh, "live_duplicates") == sorted(map(swapped_audit_row, TABLES))


def test_the_snapshot_records_the_swap_and_the_duplicates_coming_back(
        fresh: Database, tmp_path: Path) -> None:
    target_dir = own_target(fresh, tmp_path)
    assert not guard(fresh, target_dir)[0]
    result = fresh.runner("swap")
    assert result.exit_code == 0, result.output
    assert guard(fresh, target_dir)[0]
    result = fresh.runner("rollback")
    assert result.exit_code == 0, result.output
    assert not guard(fresh, target_dir)[0]

    with fresh.connect() as conn:
        rows = conn.execute(sql.SQL(
            "select {}, dbt_valid_from, dbt_valid_to from dedup_audit.live_duplicates_history"
            " order by source_table, dbt_valid_from").format(AUDIT_COLUMNS)).fetchall()
    history: dict[str, list] = {}
    for row in rows:
        history.setdefault(row[0].removeprefix("breezeway."), []).append(row)
    assert set(history) == set(TABLES)
    for name in SWAPPED:
        versions = history[name]
        assert [v[:5] for v in versions] == [
            audit_row(name), swapped_audit_row(name), audit_row(name)], name
        # Each version is closed when the next begins; the last, the duplicates, is current.
        assert [v[6] for v in versions] == [versions[1][5], versions[2][5], None], name
    # task_tags never had a duplicate: one version, never closed.
    assert [v[:5] + v[6:] for v in history["task_tags"]] == [(*audit_row("task_tags"), None)]


def test_swap_ignores_guard_tests_run_with_the_build_but_not_a_failed_dedup_test(
        fresh: Database) -> None:
    # An explicit selection replaces the default selector: the build and the guard together.
    result = fresh.dbt("build", "--select", "fqn:*", "tag:dedup_guard")
    assert result.success, result.exception
    # Severity warn: they report the duplicates, and every model that reads the tables built.
    assert live_table_tests(fresh.target_dir) == {
        name: ("warn", duplicate_keys(name)) if name in SWAPPED else ("pass", 0)
        for name in TABLES}
    statuses = statuses_by_node(fresh.target_dir)
    assert {status for status, _ in statuses.values()} == {"success", "pass", "warn"}

    # As the guard's own command reports them, failed; and one of the build's own tests failed.
    manifest = json.loads((fresh.target_dir / "manifest.json").read_text())
    (build_test,) = [node_id for node_id, node in manifest["nodes"].items()
                     if node["name"] == "dedup_natural_key_unique_property_photos"]
    path = fresh.target_dir / "run_results.json"
    results = json.loads(path.read_text())
    for result in results["results"]:
        if result["status"] == "warn" or result["unique_id"] == build_test:
            result["status"] = "fail"
    path.write_text(json.dumps(results))
    refused = fresh.runner("swap")
    assert refused.exit_code == 4
    assert said(refused)[0].startswith("Error: dedup_natural_key_unique_property_photos has "
                                       "status fail in the latest dbt build"), refused.output

    for result in results["results"]:
        if result["unique_id"] == build_test:
            result["status"] = "pass"
    path.write_text(json.dumps(results))
    swapped = fresh.runner("swap")
    assert swapped.exit_code == 0, swapped.output
    with fresh.connect() as conn:
        assert conn.execute("select count(*) from breezeway.property_photos").fetchone()[0] \
            == EXPECTED["property_photos"].unique


SCHEMA = "Breezeway Gärd"


def test_the_guard_on_a_schema_that_needs_quoting(server, tmp_path: Path) -> None:
    _create_database(server, "guard_quoted")
    database = Database({**server.environ(), "PGDATABASE": "guard_quoted"}, tmp_path / "target")
    try:
        with database.connect() as conn:
            demo.generate(conn, TEST_SCALE, schema=SCHEMA)
        passed, tests = guard(database, database.target_dir,
                              "--vars", f"{{breezeway_schema: '{SCHEMA}'}}")
        assert not passed
        assert tests == {name: ("fail", duplicate_keys(name)) if name in SWAPPED
                         else ("pass", 0) for name in TABLES}
        # source_table names the dbt source, breezeway, whatever schema it reads.
        assert audit(database, "live_duplicates") == sorted(map(audit_row, TABLES))
    finally:
        with psycopg.connect(autocommit=True, **server.conninfo) as admin:
            admin.execute("drop database guard_quoted with (force)")


def test_the_documented_command_is_the_one_tested() -> None:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["guard"]["steps"]
    commands = [shlex.split(step["run"]) for step in steps if "run" in step]
    assert ["dbt", *GUARD] in [command[:len(GUARD) + 1] for command in commands]
    assert shlex.join(["dbt", *GUARD]) in (PROJECT_DIR / "README.md").read_text()
