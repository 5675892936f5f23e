"""The SQL and the Python stay clean: sqlfluff (dbt templater, see .sqlfluff) and ruff."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import Database
from test_other_project import other_project_deps

PROJECT_DIR = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _sqlfluff_lint(models: Path, env: dict[str, str], *options: str) -> None:
    """Lint every model under `models`: no violation, none skipped."""
    result = _run(["sqlfluff", "lint", str(models.relative_to(PROJECT_DIR)), "--format", "json",
                   *options], env)
    assert result.returncode in (0, 1), f"sqlfluff failed:\n{result.stdout}\n{result.stderr}"
    files = json.loads(result.stdout)

    violations = [
        f"{file['filepath']}:{v['start_line_no']}:{v['start_line_pos']}: {v['code']} "
        f"{v['description']}"
        for file in files
        for v in file["violations"]
    ]
    # Macro output is reported at the model's line 1: run `sqlfluff render <model>` to see it.
    assert not violations, "sqlfluff found:\n" + "\n".join(violations)
    assert result.returncode == 0, result.stderr

    # Every model was linted: none was skipped, e.g. by .sqlfluffignore.
    linted = {Path(file["filepath"]).as_posix() for file in files}
    expected = {path.relative_to(PROJECT_DIR).as_posix() for path in models.rglob("*.sql")}
    assert linted == expected


def _lint_env(pg_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    # The dbt templater compiles the project, so it needs the database of profiles.yml; its
    # artifacts and logs go to tmp_path, not to the target/ and logs/ others may be using.
    return {
        **os.environ,
        **pg_env,
        "DBT_TARGET_PATH": str(tmp_path / "target"),
        "DBT_LOG_PATH": str(tmp_path / "logs"),
    }


def test_sqlfluff_lint_models_is_clean(pg_env: dict[str, str], tmp_path: Path) -> None:
    _sqlfluff_lint(PROJECT_DIR / "models", _lint_env(pg_env, tmp_path))


def test_sqlfluff_lint_integration_tests_is_clean(pg_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """The integration tests' models, the package's macros as a user's project calls them."""
    integration_tests = PROJECT_DIR / "integration_tests"
    env = _lint_env(pg_env, tmp_path)
    other_project_deps(Database(env, tmp_path / "target"))
    _sqlfluff_lint(integration_tests / "models", env,
                   "--config", str((integration_tests / ".sqlfluff").relative_to(PROJECT_DIR)))


def test_ruff_is_clean() -> None:
    result = _run(["ruff", "check", "--output-format", "concise", "runner", "pytests"])
    assert result.returncode == 0, f"ruff found:\n{result.stdout}\n{result.stderr}"
