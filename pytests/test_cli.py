"""The runner command as a user meets it: the quick start's main job and the embedded server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PROJECT_DIR, TEST_SCALE, Database

from runner.cli import cli

RUNNER = [sys.executable, "-m", "runner"]


@pytest.fixture
def own_server_env() -> Iterator[dict[str, str]]:
    """An environment with no database configured and a private place for the embedded one."""
    base = Path(tempfile.mkdtemp(prefix="runner-cli-"))
    base.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {"RUNNER_DATA_DIR": str(base / "pg"), "DBT_TARGET_PATH": str(base / "target")}
    yield env
    subprocess.run([*RUNNER, "db", "stop"], env=env, cwd=PROJECT_DIR, check=False)
    shutil.rmtree(base, ignore_errors=True)


def test_demo_runs_the_whole_job_on_its_own_server(own_server_env: dict[str, str]) -> None:
    done = subprocess.run([*RUNNER, "demo", "--scale", "0.001"], env=own_server_env,
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for table in ("property_photos", "task_requirements", "reservation_guests"):
        assert table in done.stdout
    assert "Every original row is kept in dedup_archive." in done.stdout
    assert "dedup_archive.property_photos__" in done.stdout
    assert "runner swap:" in done.stdout
    # dbt's own log goes to its file; the screen has the steps and what the build did.
    summary = next(line for line in done.stdout.splitlines() if line.startswith("dbt build: "))
    assert "models: " in summary and "tests: " in summary and " pass" in summary
    assert summary.endswith("(its log: logs/dbt.log)")
    assert "Command `cli build` succeeded" in (PROJECT_DIR / "logs" / "dbt.log").read_text()
    assert "OK created" not in done.stdout + done.stderr
    # Nothing is left running after the command.
    status = subprocess.run([*RUNNER, "db", "env"], env=own_server_env, cwd=PROJECT_DIR,
                            capture_output=True, text=True)
    assert status.returncode == 4
    assert "the embedded server is not running" in status.stderr


def test_db_start_env_stop(own_server_env: dict[str, str]) -> None:
    started = subprocess.run([*RUNNER, "db", "start"], env=own_server_env, cwd=PROJECT_DIR,
                             capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    exported = subprocess.run([*RUNNER, "db", "env"], env=own_server_env, cwd=PROJECT_DIR,
                              capture_output=True, text=True).stdout
    variables = dict(line.removeprefix("export ").split("=", 1) for line in exported.split("\n")
                     if line)
    assert variables["PGHOST"] == "127.0.0.1" and int(variables["PGPORT"]) > 0
    import psycopg

    with psycopg.connect(host=variables["PGHOST"], port=variables["PGPORT"],
                         user=variables["PGUSER"], dbname=variables["PGDATABASE"]) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    stopped = subprocess.run([*RUNNER, "db", "stop"], env=own_server_env, cwd=PROJECT_DIR,
                             capture_output=True, text=True)
    assert stopped.stdout.strip() == "Embedded PostgreSQL stopped."


def test_demo_refuses_a_configured_database(own_server_env: dict[str, str]) -> None:
    done = subprocess.run([*RUNNER, "demo"], env={**own_server_env, "PGHOST": "db.invalid"},
                          cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 4
    assert done.stderr.strip().startswith("Error: runner demo replaces the breezeway schema")


def test_an_unreachable_database_is_one_line(own_server_env: dict[str, str]) -> None:
    env = {**own_server_env, "PGHOST": "127.0.0.1", "PGPORT": "1"}
    done = subprocess.run([*RUNNER, "swap"], env=env, cwd=PROJECT_DIR, capture_output=True,
                          text=True)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: cannot connect to PostgreSQL at 127.0.0.1:1")


def test_any_variable_that_chooses_a_database_is_the_users_never_the_embedded_server(
        own_server_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    env = {**own_server_env, "PGPORT": str(port), "PGUSER": "etl"}
    done = subprocess.run([*RUNNER, "swap"], env=env, cwd=PROJECT_DIR, capture_output=True,
                          text=True)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"Error: cannot connect to PostgreSQL at the local socket:{port} (")
    assert "configured by PGPORT, PGUSER)" in lines[0]
    assert not Path(own_server_env["RUNNER_DATA_DIR"]).exists()


def test_the_embedded_server_ignores_the_users_other_libpq_variables_and_says_it_is_used(
        own_server_env: dict[str, str]) -> None:
    env = {**own_server_env, "PGSSLMODE": "require", "PGPASSFILE": "/nonexistent/pgpass",
           "PGOPTIONS": "-c statement_timeout=1"}
    done = subprocess.run([*RUNNER, "generate", "--scale", "0.001", "--table", "task_tags"],
                          env=env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "  database: the embedded server, 127.0.0.1:" in done.stderr
    assert ("(none of PGHOST, PGHOSTADDR, PGPORT, PGUSER, PGDATABASE, PGSERVICE is set)"
            in done.stderr)


def test_a_service_file_chooses_the_database_as_libpq_reads_it(fresh: Database,
                                                                tmp_path: Path) -> None:
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[the shop]\nhost={fresh.env['PGHOST']}\nport={fresh.env['PGPORT']}\n"
                        f"user={fresh.env['PGUSER']}\ndbname={fresh.name}\nsslmode=disable\n")
    env = {"PGHOST": None, "PGPORT": None, "PGUSER": None, "PGDATABASE": None,
           "PGSERVICEFILE": str(services), "PGSERVICE": "the shop",
           "DBT_TARGET_PATH": str(fresh.target_dir)}
    result = CliRunner().invoke(cli, ["swap", "--select", "task_photos"], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (f"  database: {fresh.env['PGUSER']}@{fresh.env['PGHOST']}:{fresh.env['PGPORT']}/"
            f"{fresh.name} (configured by PGSERVICE)") in result.output
    with fresh.connect() as conn:
        assert conn.execute("select count(*) from dedup_archive.swap_log").fetchone()[0] == 1


@pytest.mark.parametrize("how", ["options", "key=value", "uri"])
def test_the_database_can_be_named_on_the_command_line_as_psql_takes_it(fresh: Database,
                                                                        how: str) -> None:
    host, port, user = fresh.env["PGHOST"], fresh.env["PGPORT"], fresh.env["PGUSER"]
    given = {
        "options": ["-h", host, "-p", port, "-U", user, "-d", fresh.name],
        "key=value": ["--dsn", f"host={host} port={port} user={user} dbname={fresh.name}"
                               " sslmode=disable"],
        # The URI names another database: -d overrides it, as in psql.
        "uri": ["--dsn", f"postgresql://{user}@{host}:{port}/postgres?sslmode=disable",
                "-d", fresh.name],
    }[how]
    env = {"PGHOST": None, "PGPORT": None, "PGUSER": None, "PGDATABASE": None,
           "DBT_TARGET_PATH": str(fresh.target_dir)}
    result = CliRunner().invoke(cli, ["swap", "--select", "task_photos", *given], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"  database: {user}@{host}:{port}/{fresh.name} (configured by " in result.output
    with fresh.connect() as conn:
        assert conn.execute("select count(*) from dedup_archive.swap_log").fetchone()[0] == 1
    # For the command alone: nothing of it is left in this process's environment.
    assert "PGDATABASE" not in os.environ or os.environ["PGDATABASE"] != fresh.name


def test_a_connection_string_libpq_cannot_read_is_bad_usage(own_server_env) -> None:
    done = subprocess.run([*RUNNER, "audit", "--dsn", "host=db.invalid port"],
                          env=own_server_env, cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 2
    assert "Invalid value for '--dsn': not a connection string libpq reads (" in done.stderr
    unreachable = subprocess.run([*RUNNER, "swap", "-h", "127.0.0.1", "-p", "1"],
                                 env=own_server_env, cwd=PROJECT_DIR, capture_output=True,
                                 text=True)
    assert unreachable.returncode == 3
    assert unreachable.stderr.strip().startswith(
        "Error: cannot connect to PostgreSQL at 127.0.0.1:1")


def _swap_says(database: Database, *flags: str) -> list[str]:
    result = database.runner("swap", "--select", "task_photos", *flags)
    assert result.exit_code == 0, result.output
    return result.stderr.splitlines()


def test_stderr_says_every_step_with_verbose_and_nothing_with_quiet(fresh: Database) -> None:
    verbose = _swap_says(fresh, "-v")
    assert verbose[0].startswith("  database: ")
    steps = [line.strip().split(": ")[0] for line in verbose[1:]]
    # Every step, the quick ones too: the lock, the cut-over and the commit among them.
    assert {"lock", "cutover", "commit"} <= set(steps)
    rolled_back = fresh.runner("rollback", "--select", "task_photos", "-q")
    assert rolled_back.exit_code == 0, rolled_back.output
    assert rolled_back.stderr == ""


def test_stderr_says_one_json_object_a_line_with_log_format_json(fresh: Database) -> None:
    events = [json.loads(line) for line in _swap_says(fresh, "--log-format", "json")]
    assert events[0]["event"] == "database" and events[0]["message"].startswith("database: ")
    steps = [e for e in events if e["event"] == "step"]
    assert {"lock", "cutover"} <= {e["step"] for e in steps}
    assert all(isinstance(e["seconds"], float | int) and e["at"] for e in steps)


def test_the_demo_says_its_steps_and_with_verbose_each_node_dbt_finishes(
        own_server_env) -> None:
    done = subprocess.run([*RUNNER, "demo", "--scale", str(TEST_SCALE), "-v"],
                          env=own_server_env, cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    steps = [line.strip() for line in done.stderr.splitlines()]
    assert any(line.startswith("generate: task_photos: ") for line in steps)
    assert any(line.startswith("dbt model task_photos: success in ") for line in steps)
    assert any(line.startswith("dbt test ") for line in steps)
