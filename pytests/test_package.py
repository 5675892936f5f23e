"""The package as pip installs it, outside any clone: the wheel holds the runner and the dbt
project it reads, and `runner demo` runs from it in an empty directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tomllib
from conftest import PROJECT_DIR, TEST_SCALE, Database, said

from runner.declaration.project import PROJECT_FILES, PROJECT_FOLDERS


def test_the_wheel_holds_every_package_of_the_runner_and_its_dbt_project(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "-w", str(tmp_path), str(PROJECT_DIR)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("pg_dedup_runner-*.whl")
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
    empty = Path(tempfile.mkdtemp(prefix="runner-wheel-"))
    empty.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "DBT_", "RUNNER_"))} | {"PYTHONPATH": str(site)}
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
