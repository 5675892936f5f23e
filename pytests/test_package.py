"""The package as pip installs it, outside any clone: the wheel holds the runner and the dbt
project it reads, and `runner demo` runs from it in an empty directory."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import tomllib
from conftest import PROJECT_DIR, TEST_SCALE, Database, _create_database, said

from runner.declaration.project import PROJECT_FILES, PROJECT_FOLDERS


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from this clone, as it would be published."""
    into = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "-w", str(into), str(PROJECT_DIR)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (found,) = into.glob("pg_dedup_runner-*.whl")
    return found


def _clean_environment(**more: str) -> dict[str, str]:
    """This process's environment without anything that chooses a database, a dbt project or
    a runner's data."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PG", "DBT_", "RUNNER_", "VIRTUAL_ENV"))} | more


def _empty_directory() -> Path:
    # Not pytest's tmp_path: that is 0700, and as root the embedded server runs as nobody.
    empty = Path(tempfile.mkdtemp(prefix="runner-wheel-"))
    empty.chmod(0o755)
    return empty


def test_the_wheel_holds_every_package_of_the_runner_and_its_dbt_project(
        wheel: Path, tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    on_disk = {str(p.relative_to(PROJECT_DIR)) for p in (PROJECT_DIR / "runner").rglob("*.py")}
    assert on_disk <= names
    shipped = {name.removeprefix("runner/dbt_project/") for name in names
               if name.startswith("runner/dbt_project/")}
    for name in PROJECT_FILES:
        assert name in shipped
    for folder in PROJECT_FOLDERS:
        in_clone = {str(p.relative_to(PROJECT_DIR)) for p in (PROJECT_DIR / folder).rglob("*")
                    if p.is_file()}
        assert in_clone and in_clone <= shipped, folder
    # The name on PyPI is the distribution's; the command stays `runner`.
    metadata = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]
    assert metadata["name"] == "pg-dedup-runner"
    assert metadata["scripts"] == {"runner": "runner.cli:main"}

    # Installed where nothing else is, the demo runs in an empty directory, on the embedded
    # server, with the dbt project the wheel brought.
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                                "--target", str(site), str(wheel)], capture_output=True,
                               text=True)
    assert installed.returncode == 0, installed.stderr
    empty = _empty_directory()
    env = _clean_environment(PYTHONPATH=str(site))
    which = subprocess.run([sys.executable, "-c", "import runner; print(runner.__file__)"],
                           env=env, cwd=empty, capture_output=True, text=True, check=True)
    assert which.stdout.strip().startswith(str(site))
    demo = subprocess.run([sys.executable, "-m", "runner", "demo", "--scale", str(TEST_SCALE)],
                          env=env, cwd=empty, capture_output=True, text=True)
    stopped = subprocess.run([sys.executable, "-m", "runner", "db", "stop", "--project-dir",
                              "runner-demo"], env=env, cwd=empty, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert stopped.returncode == 0, stopped.stderr
    assert "  the demo's dbt project, copied to runner-demo" in demo.stderr
    assert (empty / "runner-demo" / "dbt_project.yml").is_file()
    assert "dbt build: " in demo.stdout and "runner swap" in demo.stdout


def test_the_dbt_package_is_the_runners_own_version() -> None:
    import runner

    macro = (PROJECT_DIR / "macros" / "spec" / "dedup_version.sql").read_text()
    assert f'return("{runner.__version__}")' in macro


def test_artifacts_built_with_another_version_of_the_dbt_package_are_refused(
        fresh: Database) -> None:
    manifest_path = fresh.target_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    macro = manifest["macros"]["macro.dedup.dedup_version"]
    macro["macro_sql"] = macro["macro_sql"].replace('return("', 'return("0.0.9-')
    manifest_path.write_text(json.dumps(manifest))
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 4, result.output
    (line,) = said(result)
    assert line.startswith(f"Error: {fresh.target_dir}/manifest.json was built with version "
                           "0.0.9-")
    assert line.endswith("point packages.yml at this runner's own (`local:` the path `runner "
                         "package-path` prints), then `dbt deps` and `dbt build` again")
    with fresh.connect() as conn:
        assert conn.execute("select to_regclass('dedup_archive.swap_log')").fetchone()[0] is None


ORDER_LINES = """
create schema "Shop";
create table "Shop"."Order Lines" (
    uid uuid primary key default gen_random_uuid(),
    "Order ID" text not null,
    line_no integer not null,
    "Product Name" text not null,
    loaded_at timestamptz not null default clock_timestamp()
);
-- 40 orders of 3 lines, each line sent three times by an ETL that never conflicted.
insert into "Shop"."Order Lines" ("Order ID", line_no, "Product Name")
select 'ORD-' || o, l, 'Product ' || (l % 2)
from generate_series(1, 3) as sent, generate_series(1, 40) as o, generate_series(1, 3) as l;
"""


def test_the_readmes_own_database_path_from_a_fresh_venv(wheel: Path, server,
                                                         tmp_path: Path) -> None:
    """The README's "A project of your own, from nothing" as a new user runs it: the wheel in a
    fresh venv outside any clone, a server of its own, a table the demo does not have; every
    command the README gives, the `runner add` line the one suggest-keys printed."""
    _create_database(server, "own_shop")
    database = Database({**server.environ(), "PGDATABASE": "own_shop"}, tmp_path / "unused")
    with database.connect() as conn:
        conn.execute(ORDER_LINES)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    home = _empty_directory()
    env = _clean_environment(**database.env)

    def runner(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(venv / "bin" / "runner"), *args], env=env, cwd=home,
                              capture_output=True, text=True)
        log = home / "mine" / "logs" / "dbt.log"
        assert done.returncode == 0, (args, done.stdout, done.stderr,
                                      log.read_text()[-3000:] if log.is_file() else "")
        return done

    runner("init", "mine")
    suggested = runner("suggest-keys", "Shop.Order Lines").stdout.splitlines()[-1]
    prefix = "or declared in a project of yours (runner init): "
    assert suggested.startswith(prefix)
    add = shlex.split(suggested.removeprefix(prefix))
    assert add == ["runner", "add", "Shop.Order Lines", "--key", "Order ID,line_no",
                   "--keep", "uid"]
    runner(*add[1:], "--project-dir", "mine")
    runner("build", "--project-dir", "mine")
    plan = runner("swap", "--dry-run", "--project-dir", "mine").stdout
    assert 'lock table "Shop"."Order Lines" in access exclusive mode' in plan
    runner("swap", "--project-dir", "mine")
    runner("verify", "--project-dir", "mine")
    with database.connect() as conn:
        assert conn.execute('select count(*) from "Shop"."Order Lines"').fetchone()[0] == 120
        assert conn.execute("select count(*) from dedup_archive.swap_log").fetchone()[0] == 1
