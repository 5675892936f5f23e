"""One embedded PostgreSQL server for the whole suite, started here: the tests never skip.

The demo data is generated once and built by dbt once; a test that changes anything works on its
own copy, made with CREATE DATABASE ... TEMPLATE, which costs a fraction of a second.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from runner import demo
from runner.cli import cli
from runner.declaration import dbt
from runner.server.connection import environment
from runner.server.embedded import EmbeddedPostgres

PROJECT_DIR = Path(__file__).resolve().parents[1]
TEST_SCALE = 0.003
SCREENSHOTS = PROJECT_DIR / "screenshots"
"""Where the tests that look at a page leave what they saw, for people to look at too."""


DESCRIBE = """
select jsonb_build_object(
    'columns', (select jsonb_agg(jsonb_build_array(attname, format_type(atttypid, atttypmod),
                    attnotnull, pg_get_expr(d.adbin, d.adrelid)) order by attnum)
                from pg_attribute left join pg_attrdef as d on d.adrelid = attrelid
                    and d.adnum = attnum
                where attrelid = c.oid and attnum > 0 and not attisdropped),
    'indexes', (select coalesce(jsonb_object_agg(i.relname, pg_get_indexdef(x.indexrelid)),
                                '{}')
                from pg_index as x join pg_class as i on i.oid = x.indexrelid
                where x.indrelid = c.oid),
    'constraints', (select coalesce(jsonb_object_agg(conname, pg_get_constraintdef(oid)), '{}')
                    from pg_constraint where conrelid = c.oid),
    'grants', (select jsonb_agg(a::text order by a::text) from aclexplode(c.relacl) as a),
    'owner', pg_get_userbyid(c.relowner),
    'comment', obj_description(c.oid, 'pg_class'),
    'options', c.reloptions,
    'replica_identity', c.relreplident,
    'sequences', (select jsonb_agg(s.oid::regclass::text order by 1) from pg_depend as d
                  join pg_class as s on s.oid = d.objid and s.relkind = 'S'
                  where d.refobjid = c.oid and d.deptype in ('a', 'i')),
    'identity', (select jsonb_object_agg(attname, attidentity) from pg_attribute
                 where attrelid = c.oid and attidentity <> ''),
    'column_grants', (select jsonb_object_agg(attname, attacl::text) from pg_attribute
                      where attrelid = c.oid and attacl is not null),
    'triggers', (select jsonb_object_agg(tgname, jsonb_build_array(pg_get_triggerdef(oid),
                     tgenabled)) from pg_trigger where tgrelid = c.oid and not tgisinternal
                     and tgname not in ('dedup_capture', 'dedup_capture_truncate')),
    'row_security', jsonb_build_array(c.relrowsecurity, c.relforcerowsecurity),
    'policies', (select jsonb_agg(to_jsonb(p) - 'tablename' order by policyname)
                 from pg_policies as p where p.schemaname = n.nspname
                 and p.tablename = c.relname),
    'publications', (select jsonb_agg(pubname order by pubname) from pg_publication_rel
                     join pg_publication on pg_publication.oid = prpubid where prrelid = c.oid),
    'replica_identity_index', (select i.relname from pg_index as x join pg_class as i
                               on i.oid = x.indexrelid
                               where x.indrelid = c.oid and x.indisreplident),
    'views', (select jsonb_object_agg(v.oid::regclass::text, pg_get_viewdef(v.oid))
              from pg_depend as d join pg_rewrite as r on r.oid = d.objid
              join pg_class as v on v.oid = r.ev_class
              where d.refobjid = c.oid and v.oid <> c.oid)
)
from pg_class as c
join pg_namespace as n on n.oid = c.relnamespace
where c.oid = %s::regclass
"""


def description(conn: psycopg.Connection, table: str) -> dict:
    """What makes a table the table it is to everything around it, from the catalog: the
    swap must leave all of it as it was but for the natural key's constraint."""
    return conn.execute(DESCRIBE, (table,)).fetchone()[0]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", type=int, default=0, metavar="N",
                     help="Run N random histories of each shape in test_histories.py instead "
                          "of the suite's fixed few.")


SAID = "said"
"""A user property of a test's report: a line for the end of the run, [topic, line]. A test
records it on its item, so that it reaches the run's summary from whichever worker ran it;
of a topic's lines the last recorded is shown."""
_said: dict[str, str] = {}


def say_at_the_end(item: pytest.Item, topic: str, line: str) -> None:
    item.user_properties.append((SAID, [topic, line]))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == SAID:
            _said[value[0]] = value[1]


def pytest_terminal_summary(terminalreporter) -> None:
    """What the tests had to say of the whole run: which PostgreSQL versions it tried and what
    became of each, what the histories did."""
    for topic in sorted(_said):
        terminalreporter.write_line(_said[topic])


def run_dbt(args: list[str], env: dict[str, str], target_dir: Path, callbacks=()):
    """dbt in-process against the database in env, as the CLI runs it; returns dbt's result
    object. Each callback gets every event dbt fires."""
    with environment(env):
        return dbt.invoke(args, PROJECT_DIR, target_dir=target_dir, callbacks=callbacks,
                          quiet=True)


@dataclass
class Database:
    """A database of the test server, with the dbt artifacts that describe it."""

    env: dict[str, str]
    target_dir: Path

    @property
    def name(self) -> str:
        return self.env["PGDATABASE"]

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(autocommit=True, **{
            "host": self.env["PGHOST"], "port": self.env["PGPORT"],
            "user": self.env["PGUSER"], "dbname": self.name,
        })

    def scalar(self, query, params=None):
        with self.connect() as conn:
            return conn.execute(query, params).fetchone()[0]

    def runner(self, *args: str) -> Result:
        """The CLI as a user runs it against this database, with this build's artifacts."""
        return CliRunner().invoke(
            cli, [*args], env={**self.env, "DBT_TARGET_PATH": str(self.target_dir)},
            catch_exceptions=False,
        )

    def dbt(self, *args: str):
        return run_dbt(list(args), self.env, self.target_dir)

    @contextmanager
    def holding(self, statement: str) -> Iterator[int]:
        """Another session runs `statement` and keeps its transaction open, with whatever
        locks it took, until the block ends; yields that session's pid."""
        with self.connect() as conn, conn.transaction():
            conn.execute(statement)
            yield conn.info.backend_pid


@contextmanager
def project_of_ones_own(server: EmbeddedPostgres, directory: Path, name: str, tables: str,
                        declared: list[str]) -> Iterator[tuple[Database, Path]]:
    """A database `name` holding `tables`, and in `directory` a project that `runner init`
    made and `runner add` declared `declared` in; the database is dropped afterwards."""
    _create_database(server, name)
    database = Database({**server.environ(), "PGDATABASE": name}, directory / "target")
    with database.connect() as conn:
        conn.execute(tables)
    project = directory / "project"
    made = database.runner("init", str(project))
    assert made.exit_code == 0, made.output
    added = database.runner(*declared, "--project-dir", str(project))
    assert added.exit_code == 0, added.output
    try:
        yield database, project
    finally:
        with psycopg.connect(autocommit=True, **server.conninfo) as admin:
            admin.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


class Stopped(Exception):
    """A runner stopped by a test at one of its steps, as a kill would stop it."""


def stop_at(label: str):
    """A step hook that stops the runner once the step labelled `label` is done."""
    def step_done(done: str) -> None:
        if done == label:
            raise Stopped(label)
    return step_done


def task_photos_foreign_key_valid(database: Database) -> bool:
    """Whether task_photos' foreign key to tasks is validated (false: NOT VALID)."""
    with database.connect() as conn:
        return conn.execute(
            "select convalidated from pg_constraint where conname = 'task_photos_task_pk_fkey'"
            " and conrelid = 'breezeway.task_photos'::regclass").fetchone()[0]


def said(result: Result) -> list[str]:
    """What a command said, without the progress of its slow steps and lock tries, which it
    reports on stderr as indented lines."""
    return [line for line in result.output.splitlines()
            if line.strip() and not line.startswith("  ")]


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium, headless: this machine's, or fetched at test time."""
    import browser

    SCREENSHOTS.mkdir(exist_ok=True)
    return browser.chromium()


@pytest.fixture(scope="session")
def server() -> Iterator[EmbeddedPostgres]:
    # Not pytest's tmp_path: that is 0700, and as root the server runs as nobody.
    base = Path(tempfile.mkdtemp(prefix="runner-tests-"))
    base.chmod(0o755)
    postgres = EmbeddedPostgres(base / "pg", dbname="postgres")
    postgres.start()
    yield postgres
    postgres.stop()
    shutil.rmtree(base, ignore_errors=True)


def _create_database(server: EmbeddedPostgres, name: str, template: str | None = None) -> None:
    with psycopg.connect(autocommit=True, **server.conninfo) as conn:
        conn.execute(sql.SQL("create database {}{}").format(
            sql.Identifier(name),
            sql.SQL(" template {}").format(sql.Identifier(template)) if template else sql.SQL(""),
        ))


@pytest.fixture(scope="session")
def pg_env(server: EmbeddedPostgres) -> dict[str, str]:
    """libpq variables for a database holding the demo data at TEST_SCALE, never changed."""
    _create_database(server, "demo_source")
    env = {**server.environ(), "PGDATABASE": "demo_source"}
    with psycopg.connect(autocommit=True, **{**server.conninfo, "dbname": "demo_source"}) as conn:
        demo.generate(conn, TEST_SCALE)
    return env


@pytest.fixture(scope="session")
def built(server: EmbeddedPostgres, pg_env: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Database:
    """The demo data after one `dbt build`: read it, never change it (use `fresh`)."""
    _create_database(server, "built", template="demo_source")
    database = Database({**pg_env, "PGDATABASE": "built"}, tmp_path_factory.mktemp("target"))
    captured = database.runner("capture")
    assert captured.exit_code == 0, captured.output
    result = database.dbt("build")
    assert result.success, result.exception
    return database


_copies = itertools.count()


@pytest.fixture
def fresh(server: EmbeddedPostgres, built: Database, tmp_path: Path) -> Iterator[Database]:
    """A private copy of the built database, with a private copy of its dbt artifacts."""
    name = f"copy_{next(_copies)}"
    _create_database(server, name, template=built.name)
    target_dir = tmp_path / "target"
    shutil.copytree(built.target_dir, target_dir)
    yield Database({**built.env, "PGDATABASE": name}, target_dir)
    with psycopg.connect(autocommit=True, **server.conninfo) as conn:
        conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))
