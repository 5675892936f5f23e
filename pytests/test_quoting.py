"""The same job on a schema whose name needs quoting: nothing may assume breezeway."""

from __future__ import annotations

import psycopg
from conftest import PROJECT_DIR, TEST_SCALE, Database, _create_database
from psycopg import sql

from runner import demo

# Mixed case, a space and a non-ASCII letter. Not a double quote: dbt-postgres quotes names
# without doubling embedded quotes, so no dbt model could read such a schema.
SCHEMA = "Breezeway Prodü"


def test_build_and_swap_on_a_schema_that_needs_quoting(server, tmp_path) -> None:
    _create_database(server, "quoted")
    database = Database({**server.environ(), "PGDATABASE": "quoted"}, tmp_path / "target")
    with database.connect() as conn:
        demo.generate(conn, TEST_SCALE, schema=SCHEMA)
    variables = f"{{breezeway_schema: '{SCHEMA}'}}"
    assert database.dbt("parse", "--vars", variables).success
    assert database.runner("capture", "--project-dir", str(PROJECT_DIR)).exit_code == 0
    assert database.dbt("build", "--vars", variables).success
    result = database.runner("swap", "--project-dir", str(PROJECT_DIR))
    assert result.exit_code == 0, result.output
    expected = demo.expected_counts(TEST_SCALE)
    with database.connect() as conn:
        for table in demo.CHILD_TABLES:
            rows = conn.execute(sql.SQL("select count(*) from {}").format(
                sql.Identifier(SCHEMA, table.name))).fetchone()[0]
            assert rows == expected[table.name].unique, table.name
        unique = conn.execute(
            "select count(*) from pg_constraint where contype = 'u'"
            " and connamespace = (select oid from pg_namespace where nspname = %s)", (SCHEMA,)
        ).fetchone()[0]
        assert unique == len(demo.CHILD_TABLES)
        view_rows = conn.execute(sql.SQL("select sum(photos) from {}").format(
            sql.Identifier(SCHEMA, "property_photo_counts"))).fetchone()[0]
        assert view_rows == expected["property_photos"].unique
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute("drop database quoted with (force)")
