"""The dbt project this package ships, versioned with the runner that reads its artifacts: in
a wheel it is runner/dbt_project; in a clone, the clone's own top directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from runner.errors import RunnerError

# What of it a dbt project needs: pyproject.toml's package-data for runner.dbt_project lists
# the same.
PROJECT_FILES = ("dbt_project.yml", "profiles.yml", "selectors.yml")
PROJECT_FOLDERS = ("macros", "models", "snapshots", "tests")


def bundled_project() -> Path:
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "dbt_project", here.parent):
        if (candidate / "dbt_project.yml").is_file() and (candidate / "macros").is_dir():
            return candidate
    raise RunnerError(f"the dbt project this runner ships is missing from {here}: reinstall "
                      "pg-dedup-runner")


def copy_bundled_project(destination: Path) -> Path:
    """The shipped project, copied to `destination` (made if needed, files already there kept
    unless shipped): a place of its own for dbt's target/ and logs/ and the embedded server."""
    source = bundled_project()
    destination.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(source / name, destination / name)
    for name in PROJECT_FOLDERS:
        shutil.copytree(source / name, destination / name, dirs_exist_ok=True)
    return destination
