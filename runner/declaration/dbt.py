"""Running dbt in-process, against the database the libpq environment points at: the one way
the CLI, the tests, the model-checking harness and the benchmarks call it. The benchmarks run
it as `python -m runner.declaration.dbt PROJECT_DIR TARGET_DIR ARGS...`, a process of its own
as the `dbt` command is, which they time and can stop."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runner.errors import RunnerError


def invoke(args: list[str], project_dir: Path, *, target_dir: Path | None = None,
           profiles_dir: Path | None = None, callbacks: Sequence[Callable[[Any], None]] = (),
           quiet: bool = False):
    """dbt's result for `dbt ARGS` on the project. The profile is found as dbt finds it
    ($DBT_PROFILES_DIR), else in `profiles_dir`, else in the project; each callback gets every
    event dbt fires."""
    # Imported here: dbt takes about a second to import, and most commands never call it.
    from dbt.cli.main import dbtRunner

    command = [*args, "--project-dir", str(project_dir)]
    if "DBT_PROFILES_DIR" not in os.environ:
        command += ["--profiles-dir", str(profiles_dir or project_dir)]
    if target_dir is not None:
        command += ["--target-path", str(target_dir)]
    if quiet:
        command.append("--quiet")
    return dbtRunner(callbacks=list(callbacks)).invoke(command)


def run_dbt(args: list[str], project_dir: Path, *, target_dir: Path | None = None,
            quiet: bool = False) -> None:
    """`dbt ARGS`, refusing to go on when it fails."""
    if not invoke(args, project_dir, target_dir=target_dir, quiet=quiet).success:
        raise RunnerError(f"dbt {' '.join(args)} failed (its log is above): fix the cause and "
                          "run again")


if __name__ == "__main__":
    project, target, *dbt_args = sys.argv[1:]
    sys.exit(0 if invoke(dbt_args, Path(project), target_dir=Path(target), quiet=True).success
             else 1)
