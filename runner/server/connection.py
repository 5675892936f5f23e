"""Connections: the database the user configured, or the embedded one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from runner.errors import RunnerError
from runner.server.embedded import EmbeddedPostgres, default_data_dir


def connect() -> psycopg.Connection:
    """An autocommit connection from the libpq environment (PGHOST, PGPORT, PGUSER, ...).

    Transactions are explicit `with conn.transaction()` blocks. The search path is only
    pg_catalog, so every name the runner prints or runs is qualified and means one thing.
    """
    try:
        conn = psycopg.connect(autocommit=True, application_name="runner", connect_timeout=10)
    except psycopg.OperationalError as error:
        where = f"{os.environ.get('PGHOST', 'localhost')}:{os.environ.get('PGPORT', '5432')}"
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "no answer"
        raise RunnerError(f"cannot connect to PostgreSQL at {where} ({reason}): check PGHOST, "
                          "PGPORT, PGUSER, PGPASSWORD and PGDATABASE, or unset PGHOST to use the "
                          "embedded server") from error
    conn.execute("set search_path = pg_catalog")
    return conn


def uses_embedded() -> bool:
    """No PGHOST in the environment means nothing is configured: use the embedded server."""
    return not os.environ.get("PGHOST")


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block, as dbt's profiles.yml reads them, then restore."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def database(project_dir: Path, *, keep_running: bool = False) -> Iterator[None]:
    """Make the libpq environment point at the database to work on for the duration.

    With PGHOST set that is the user's database, untouched. Otherwise the embedded server is
    started (or the running one reused) and its address exported, so that dbt's profiles.yml
    and psycopg both reach it; a server this call started is stopped after, unless kept.
    """
    if not uses_embedded():
        yield
        return
    server = EmbeddedPostgres(default_data_dir(project_dir))
    server.start()
    try:
        with environment(server.environ()):
            yield
    finally:
        if not keep_running:
            server.stop()
