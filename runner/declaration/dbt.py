"""Running dbt in-process, against the database the libpq environment points at."""

from __future__ import annotations

import os
from pathlib import Path

from runner.errors import RunnerError


def run_dbt(args: list[str], project_dir: Path) -> None:
    # Imported here: dbt takes about a second to import, and most commands never call it.
    from dbt.cli.main import dbtRunner

    command = [*args, "--project-dir", str(project_dir)]
    if "DBT_PROFILES_DIR" not in os.environ:
        command += ["--profiles-dir", str(project_dir)]
    result = dbtRunner().invoke(command)
    if not result.success:
        raise RunnerError(f"dbt {' '.join(args)} failed (its log is above): fix the cause and "
                          "run again")
