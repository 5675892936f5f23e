"""The whole job with the roles the README's "Roles" section tells a DBA to set up, and nothing
more: the tables' owner (no login), the job's login (a member of the owner), the ETL's login
(DML only) and a reader (read-only commands). Each command checks what it needs before it
changes anything and names what is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import PROJECT_DIR, Database, _create_database, said
from psycopg import sql

OWNER, JOB, ETL, READER = "app_owner", "dedup_job", "app_etl", "app_reader"
ROLES = (JOB, ETL, READER, OWNER)
# The job's password: the test server trusts every local connection, but libpq sends it, and
# no output, log or artifact may show it.
SECRET = "never-shown-Zq8x"


def _as(database: Database, role: str) -> Database:
    password = {"PGPASSWORD": SECRET} if role == JOB else {}
    return Database({**database.env, "PGUSER": role, **password}, database.target_dir)


def _set_up_roles(conn: psycopg.Connection, dbname: str) -> None:
    """The README's grants, word for word where they name a real table."""
    conn.execute(f"create role {OWNER} nologin")
    conn.execute(f"create role {JOB} login in role {OWNER} password '{SECRET}'")
    conn.execute(f"create role {ETL} login")
    conn.execute(f"create role {READER} login")
    conn.execute(f"alter schema breezeway owner to {OWNER}")
    for (relation,) in conn.execute(
            "select c.oid::regclass::text from pg_class as c join pg_namespace as n"
            " on n.oid = c.relnamespace where n.nspname = 'breezeway'"
            " and c.relkind in ('r', 'v', 'm')").fetchall():
        conn.execute(sql.SQL("alter table {} owner to {}").format(
            sql.SQL(relation), sql.Identifier(OWNER)))
    # The job: builds dbt's schemas and the archive schema.
    conn.execute(sql.SQL("grant create on database {} to {}").format(
        sql.Identifier(dbname), sql.Identifier(JOB)))
    # The ETL: writes the tables, nothing else.
    conn.execute(f"grant usage on schema breezeway to {ETL}")
    conn.execute(f"grant select, insert, update, delete on all tables in schema breezeway"
                 f" to {ETL}")
    conn.execute(f"grant usage on all sequences in schema breezeway to {ETL}")
    # The reader: audit, verify and report.
    conn.execute(f"grant usage on schema breezeway to {READER}")
    conn.execute(f"grant select on all tables in schema breezeway to {READER}")
    conn.execute(f"alter default privileges for role {JOB} grant usage on schemas to {READER}")
    conn.execute(f"alter default privileges for role {JOB} grant select on tables to {READER}")


@pytest.fixture
def roles(server, pg_env, tmp_path: Path) -> Iterator[Database]:
    """The demo data as generated, owned by OWNER, the roles set up; the superuser's view."""
    _create_database(server, "roles", template="demo_source")
    database = Database({**pg_env, "PGDATABASE": "roles"}, tmp_path / "target")
    with database.connect() as conn:
        _set_up_roles(conn, "roles")
    yield database
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute("drop database roles with (force)")
        for role in ROLES:
            admin.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def _ran(database: Database, *args: str) -> list[str]:
    result = database.runner(*args)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    return said(result)


def _etl_writes(database: Database, note: str) -> None:
    with _as(database, ETL).connect() as conn:
        conn.execute("insert into breezeway.task_photos (task_pk, photo_id, url)"
                     " values (1, %s, 'from the etl') on conflict do nothing", (note,))
        conn.execute("update breezeway.task_photos set url = %s"
                     " where id = (select max(id) from breezeway.task_photos)", (note,))
        conn.execute("delete from breezeway.task_photos"
                     " where id = (select min(id) from breezeway.task_photos)")


def test_the_whole_job_as_the_documented_roles(roles: Database) -> None:
    job, reader = _as(roles, JOB), _as(roles, READER)
    _ran(reader, "audit")
    _ran(job, "capture")
    _etl_writes(roles, "captured before the swap")
    assert job.dbt("build").success
    _etl_writes(roles, "after the build")
    _ran(job, "swap")
    _etl_writes(roles, "captured since the swap")
    _ran(job, "verify")
    _ran(reader, "report", "--no-queries")
    _ran(reader, "capture", "--status")
    _ran(job, "rollback", "--select", "task_photos")
    _etl_writes(roles, "after the rollback")
    _ran(job, "cleanup", "--older-than", "1ms")
    _ran(job, "report", "--format", "json")
    for path in [*roles.target_dir.rglob("*"), *(PROJECT_DIR / "logs").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    with roles.connect() as conn:
        kept = conn.execute("select count(*) from dedup_archive.swap_log"
                            " where swap_log::text like %s", (f"%{SECRET}%",)).fetchone()[0]
    assert kept == 0


def test_no_secret_in_the_refusal_of_a_connection(roles: Database) -> None:
    unreachable = Database({**_as(roles, JOB).env, "PGPORT": "1"}, roles.target_dir)
    result = unreachable.runner("capture")
    assert result.exit_code == 3
    assert "cannot connect to PostgreSQL at 127.0.0.1:1" in result.output
    assert SECRET not in result.output


def _catalog(database: Database) -> list:
    with database.connect() as conn:
        return conn.execute(
            "select n.nspname, c.relname, c.relkind, pg_get_userbyid(c.relowner)"
            " from pg_class as c join pg_namespace as n on n.oid = c.relnamespace"
            " where n.nspname !~ '^(pg_|information_schema)' order by 1, 2").fetchall()


def _refused(database: Database, *args: str) -> str:
    before = _catalog(database)
    result = database.runner(*args)
    assert result.exit_code == 4, result.output
    assert _catalog(database) == before
    return said(result)[-1]


def test_a_job_role_that_cannot_act_as_the_owner_is_told_which_grant_it_lacks(
        roles: Database) -> None:
    # It may read the tables, as many roles may, but no longer acts as their owner.
    with roles.connect() as conn:
        conn.execute(f"revoke {OWNER} from {JOB}")
        conn.execute(f"grant usage on schema breezeway to {JOB}")
        conn.execute(f"grant select on all tables in schema breezeway to {JOB}")
    assert _refused(_as(roles, JOB), "capture", "--select", "task_photos") == (
        f"Error: runner capture needs to act as the owner of breezeway.task_photos as role "
        f"{JOB}: grant {OWNER} to {JOB}, or run as a role that has it; nothing was changed")


def test_a_job_role_that_cannot_make_the_archive_schema_is_told_so(roles: Database) -> None:
    with roles.connect() as conn:
        conn.execute(f"revoke create on database roles from {JOB}")
    assert _refused(_as(roles, JOB), "capture").endswith(
        f"needs USAGE and CREATE on schema dedup_archive (or CREATE on the database, to make it)"
        f" as role {JOB}: grant create on database roles to {JOB}, or run as a role that has"
        " it; nothing was changed")


def test_a_swap_whose_new_table_the_owner_could_not_own_is_refused_before_it_starts(
        roles: Database) -> None:
    job = _as(roles, JOB)
    _ran(job, "capture")
    assert job.dbt("build").success
    # The tables' owner may no longer create tables in their schema, so a table made in it
    # could not be given to it.
    with roles.connect() as conn:
        conn.execute("alter schema breezeway owner to postgres")
        conn.execute(f"grant usage on schema breezeway to {OWNER}, {ETL}, {READER}")
        conn.execute(f"grant create on schema breezeway to {JOB}")
    assert _refused(job, "swap", "--select", "task_photos") == (
        f"Error: runner swap needs the owner of breezeway.task_photos to have CREATE on schema"
        f" breezeway as role {JOB}: grant create on schema breezeway to {OWNER}, or run as a"
        " role that has it; nothing was changed")
