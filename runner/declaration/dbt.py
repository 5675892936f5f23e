"""Running dbt in-process, against the database the libpq environment points at: the one way
the CLI, the tests, the model-checking harness and the benchmarks call it. The benchmarks run
it as `python -m runner.declaration.dbt PROJECT_DIR TARGET_DIR ARGS...`, a process of its own
as the `dbt` command is, which they time and can stop."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from runner import progress
from runner.errors import RunnerError

# A node that takes longer than this is said on stderr during a quiet build.
SLOW_NODE_S = 2.0


@dataclass(frozen=True)
class DbtFlags:
    """dbt's own options that choose the profile, its target and the project's variables, as
    a user gives them to dbt."""

    profiles_dir: Path | None = None
    target: str | None = None
    vars: str | None = None

    def args(self) -> list[str]:
        return [*(["--target", self.target] if self.target else []),
                *(["--vars", self.vars] if self.vars else [])]

    def with_vars(self, runner_vars: dict[str, Any]) -> DbtFlags:
        """These flags with the runner's own variables beside the user's: dbt keeps only the
        last --vars it is given, so the two are one."""
        try:
            given = yaml.safe_load(self.vars) if self.vars else None
        except yaml.YAMLError:
            given = self.vars
        if given is not None and not isinstance(given, dict):
            raise RunnerError(f"--vars {self.vars!r} is not a YAML dictionary: give the "
                              "variables as dbt takes them, e.g. --vars '{name: value}'")
        return replace(self, vars=yaml.safe_dump({**(given or {}), **runner_vars},
                                                 default_flow_style=True).strip())


def invoke(args: list[str], project_dir: Path, *, target_dir: Path | None = None,
           profiles_dir: Path | None = None, callbacks: Sequence[Callable[[Any], None]] = (),
           quiet: bool = False):
    """dbt's result for `dbt ARGS` on the project. The profile is found in `profiles_dir`, else
    as dbt finds it ($DBT_PROFILES_DIR) where that is set, else in the project where it has a
    profiles.yml, else where dbt looks by default (the working directory, then ~/.dbt); each
    callback gets every event dbt fires."""
    # Imported here: dbt takes about a second to import, and most commands never call it.
    from dbt.cli.main import dbtRunner

    command = [*args, "--project-dir", str(project_dir)]
    if profiles_dir is not None:
        command += ["--profiles-dir", str(profiles_dir)]
    elif "DBT_PROFILES_DIR" not in os.environ and (project_dir / "profiles.yml").is_file():
        command += ["--profiles-dir", str(project_dir)]
    if target_dir is not None:
        command += ["--target-path", str(target_dir)]
    if quiet:
        command.append("--quiet")
    return dbtRunner(callbacks=list(callbacks)).invoke(command)


def log_file(project_dir: Path) -> Path:
    """Where dbt writes its log, quiet or not."""
    return Path(os.environ.get("DBT_LOG_PATH") or project_dir / "logs") / "dbt.log"


def _node_finished(event: Any) -> None:
    """A node dbt finished, on stderr while it is quiet: those that took a while, or every
    one with -v."""
    if event.info.name != "NodeFinished":
        return
    node, result = event.data.node_info, event.data.run_result
    seconds = float(result.execution_time)
    progress.say("dbt", f"dbt {node.resource_type} {node.node_name}: {result.status} in "
                 f"{seconds:.1f} s",
                 progress.NORMAL if seconds >= SLOW_NODE_S else progress.VERBOSE,
                 node=node.unique_id, status=result.status, seconds=round(seconds, 3))


def _packages_missing(project_dir: Path) -> bool:
    """Whether the project names packages that `dbt deps` has not installed: a fresh clone of
    a project made by `runner init` has none."""
    return ((project_dir / "packages.yml").is_file()
            and not (project_dir / "dbt_packages").is_dir())


def run_dbt(args: list[str], project_dir: Path, *, target_dir: Path | None = None,
            flags: DbtFlags = DbtFlags(), quiet: bool = False):
    """`dbt ARGS`, with the user's dbt flags, refusing to go on when it fails; its result.
    Quiet, it says the nodes it finishes as the runner's progress. Packages the project names
    and has not installed are installed first, as `dbt deps` does."""
    if args[:1] != ["deps"] and _packages_missing(project_dir):
        progress.say("dbt", "dbt deps: the project's packages are not installed yet")
        run_dbt(["deps"], project_dir, flags=DbtFlags(profiles_dir=flags.profiles_dir),
                quiet=True)
    result = invoke([*args, *flags.args()], project_dir, target_dir=target_dir,
                    profiles_dir=flags.profiles_dir, quiet=quiet,
                    callbacks=[_node_finished] if quiet else ())
    if not result.success:
        raise RunnerError(f"dbt {' '.join(args)} failed (its errors are above, its whole log in "
                          f"{log_file(project_dir)}): fix the cause and run again")
    return result


def outcome(result) -> str:
    """What a dbt command did to each kind of node, in one line: `models: 12 success; tests:
    30 pass, 2 warn`."""
    counts = Counter((str(r.node.resource_type), str(r.status)) for r in result.result.results)
    kinds = sorted({kind for kind, _ in counts})
    return "; ".join(
        f"{kind}s: " + ", ".join(f"{n} {status}" for (k, status), n in sorted(counts.items())
                                 if k == kind)
        for kind in kinds)


if __name__ == "__main__":
    project, target, *dbt_args = sys.argv[1:]
    sys.exit(0 if invoke(dbt_args, Path(project), target_dir=Path(target), quiet=True).success
             else 1)
