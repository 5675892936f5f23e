"""Connections: the database the user configured, or the embedded one, said out loud.

A database is configured by any of libpq's variables that choose a server or a database
(SERVER_VARIABLES), read by libpq itself, a service file included; the embedded server is used
only when none is set. The rest of libpq's variables (SSL mode, password file, ...) apply to
the user's database as in psql, and never to the embedded server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import psycopg.conninfo

from runner import progress
from runner.errors import ConnectionProblem, RunnerError
from runner.server.embedded import EmbeddedPostgres, default_data_dir

SERVER_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE")
# What dbt's profiles.yml reads, from the connection libpq made: a service file or a default
# socket directory reaches dbt as the host, port, user and database they stand for.
_EXPORTED = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
             "password": "PGPASSWORD", "sslmode": "PGSSLMODE"}


# libpq's connection parameters and the variables it reads them from: a --dsn or -h/-p/-U/-d
# given to a command sets them, so libpq, psql's rules and dbt's profiles.yml all see it.
_PARAMETER_VARIABLES = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "user": "PGUSER",
    "dbname": "PGDATABASE", "password": "PGPASSWORD", "passfile": "PGPASSFILE",
    "service": "PGSERVICE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "connect_timeout": "PGCONNECT_TIMEOUT",
    "options": "PGOPTIONS", "target_session_attrs": "PGTARGETSESSIONATTRS",
    "gssencmode": "PGGSSENCMODE", "channel_binding": "PGCHANNELBINDING",
}


def chosen_variables(dsn: str | None, host: str | None, port: int | None, user: str | None,
                     dbname: str | None) -> dict[str, str]:
    """The libpq variables a command's --dsn (a connection string or URI) and -h/-p/-U/-d
    stand for, the options over the string; refused when the string is not one libpq reads."""
    given: dict[str, str] = {}
    if dsn:
        try:
            parsed = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as error:
            raise RunnerError(f"not a connection string libpq reads ("
                              f"{str(error).strip().splitlines()[0]}): give key=value pairs "
                              "or a postgresql:// URI") from error
        unknown = sorted(set(parsed) - set(_PARAMETER_VARIABLES))
        if unknown:
            raise RunnerError(f"it sets {', '.join(unknown)}, which the runner cannot hand on "
                              "to dbt: set it in the environment instead")
        given.update({_PARAMETER_VARIABLES[k]: str(v) for k, v in parsed.items()})
    for variable, value in (("PGHOST", host), ("PGPORT", port), ("PGUSER", user),
                            ("PGDATABASE", dbname)):
        if value is not None:
            given[variable] = str(value)
    return given


def connect() -> psycopg.Connection:
    """An autocommit connection from the libpq environment (PGHOST, PGPORT, PGUSER, ...).

    Transactions are explicit `with conn.transaction()` blocks. The search path is only
    pg_catalog, so every name the runner prints or runs is qualified and means one thing.
    """
    try:
        conn = psycopg.connect(autocommit=True, application_name="runner", connect_timeout=10)
    except psycopg.OperationalError as error:
        where = (f"service {os.environ['PGSERVICE']}" if os.environ.get("PGSERVICE") else
                 f"{os.environ.get('PGHOST', 'the local socket')}:"
                 f"{os.environ.get('PGPORT', '5432')}")
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "no answer"
        raise ConnectionProblem(
            f"cannot connect to PostgreSQL at {where} ({reason}; configured by "
            f"{', '.join(configured_by()) or 'nothing'}): check {', '.join(SERVER_VARIABLES)} "
            "and PGPASSWORD, or unset them all to use the embedded server") from error
    conn.execute("set search_path = pg_catalog")
    return conn


def configured_by() -> list[str]:
    """The variables that choose the user's database, as set."""
    return [name for name in SERVER_VARIABLES if os.environ.get(name)]


def uses_embedded() -> bool:
    """None of libpq's variables that choose a database is set: use the embedded server."""
    return not configured_by()


def _announce(where: str) -> None:
    """Which database a command works on, on stderr, with the progress of its steps."""
    progress.say("database", f"database: {where}")


@contextmanager
def environment(variables: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """Set environment variables for a block, as dbt's profiles.yml reads them, and unset
    `unset`, then restore."""
    previous = {name: os.environ.get(name) for name in (*variables, *unset)}
    for name in unset:
        os.environ.pop(name, None)
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _resolved() -> dict[str, str]:
    """The user's database as libpq reaches it, as the variables dbt's profiles.yml reads."""
    with connect() as conn:
        info = conn.info
        found = {"host": info.host, "port": str(info.port), "user": info.user,
                 "dbname": info.dbname, "password": info.password,
                 "sslmode": info.get_parameters().get("sslmode", "")}
    return {_EXPORTED[key]: value for key, value in found.items() if value}


@contextmanager
def database(project_dir: Path, *, keep_running: bool = False,
             changes: bool = False) -> Iterator[None]:
    """Make the libpq environment point at the database to work on for the duration, and say
    which on stderr when the command `changes` it.

    With one of SERVER_VARIABLES set that is the user's database, as libpq reaches it.
    Otherwise the embedded server is started (or the running one reused) and its address
    exported, the user's other libpq variables set aside, so that dbt's profiles.yml and
    psycopg both reach it; a server this call started is stopped after, unless kept.
    """
    if not uses_embedded():
        exported = _resolved()
        if changes:
            _announce(f"{exported['PGUSER']}@{exported['PGHOST']}:{exported['PGPORT']}/"
                      f"{exported['PGDATABASE']} (configured by {', '.join(configured_by())})")
        with environment(exported):
            yield
        return
    server = EmbeddedPostgres(default_data_dir(project_dir))
    with environment({}, unset=tuple(name for name in os.environ if name.startswith("PG"))):
        server.start()
        try:
            with environment(server.environ()):
                if changes:
                    _announce(f"the embedded server, {server.environ()['PGHOST']}:"
                              f"{server.port}/{server.dbname} (none of "
                              f"{', '.join(SERVER_VARIABLES)} is set)")
                yield
        finally:
            if not keep_running:
                server.stop()
