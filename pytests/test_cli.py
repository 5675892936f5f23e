"""The runner command as a user meets it: the quick start's main job and the embedded server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROJECT_DIR

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
    # Nothing is left running after the command.
    status = subprocess.run([*RUNNER, "db", "env"], env=own_server_env, cwd=PROJECT_DIR,
                            capture_output=True, text=True)
    assert status.returncode == 1
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
    done = subprocess.run([*RUNNER, "demo"], env={**own_server_env, "PGHOST": "192.0.2.1"},
                          cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("Error: runner demo replaces the breezeway schema")


def test_an_unreachable_database_is_one_line(own_server_env: dict[str, str]) -> None:
    env = {**own_server_env, "PGHOST": "127.0.0.1", "PGPORT": "1"}
    done = subprocess.run([*RUNNER, "swap"], env=env, cwd=PROJECT_DIR, capture_output=True,
                          text=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: cannot connect to PostgreSQL at 127.0.0.1:1")
