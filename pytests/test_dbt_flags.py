"""dbt's own conventions, where the runner runs dbt itself (`dbt parse` when there is no
manifest): the profile found where dbt finds it, and --profiles-dir, --target and --vars."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import PROJECT_DIR, Database, said

from runner.cli import cli

PROFILE = """
dedup:
  target: default
  outputs:
    default: &default
      type: postgres
      host: "{{ env_var('PGHOST') }}"
      port: "{{ env_var('PGPORT') | as_number }}"
      user: "{{ env_var('PGUSER') }}"
      password: ""
      dbname: "{{ env_var('PGDATABASE') }}"
      schema: dedup
      threads: 1
    other:
      <<: *default
      schema: elsewhere
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project as a user keeps it in a repository of their own: no profiles.yml in it,
    nor in the working directory, where dbt looks first."""
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "project"
    shutil.copytree(PROJECT_DIR, copy, ignore=shutil.ignore_patterns(
        ".*", "target", "dbt_packages", "logs", "bench", "pytests", "runner", "*.egg-info",
        "profiles.yml"))
    return copy


def _runner(database: Database, project: Path, home: Path, *args: str) -> Result:
    env = {**database.env, "HOME": str(home), "DBT_TARGET_PATH": None, "DBT_PROFILES_DIR": None}
    return CliRunner().invoke(cli, [*args, "--project-dir", str(project)], env=env,
                              catch_exceptions=False)


def _home_with_a_profile(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / ".dbt").mkdir(parents=True)
    (home / ".dbt" / "profiles.yml").write_text(PROFILE)
    return home


def test_a_profile_in_the_home_directory_is_found_as_dbt_finds_it(
        fresh: Database, project: Path, tmp_path: Path) -> None:
    nowhere = _runner(fresh, project, tmp_path / "empty home", "audit", "--select", "task_tags")
    assert nowhere.exit_code == 4, nowhere.output
    assert "dbt parse failed" in said(nowhere)[-1]
    found = _runner(fresh, project, _home_with_a_profile(tmp_path), "audit", "--select",
                    "task_tags", "--format", "json")
    assert found.exit_code == 0, found.output
    assert [row["table"] for row in json.loads(found.stdout)] == ["breezeway.task_tags", "TOTAL"]


def test_target_and_vars_reach_dbt(fresh: Database, project: Path, tmp_path: Path) -> None:
    home = _home_with_a_profile(tmp_path)
    other = _runner(fresh, project, home, "audit", "--select", "task_tags", "--target", "other",
                    "--target-path", str(tmp_path / "other"))
    assert other.exit_code == 0, other.output
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    schemas = {node["schema"] for node in manifest["nodes"].values()
               if node["resource_type"] == "model" and "deduplicated" in node["tags"]}
    assert schemas == {"elsewhere"}
    # The live tables' schema is a variable of the project: a schema of no tables is refused.
    elsewhere = _runner(fresh, project, home, "audit", "--select", "task_tags", "--vars",
                        "{breezeway_schema: no_such_schema}", "--target-path",
                        str(tmp_path / "vars"))
    assert elsewhere.exit_code == 4, elsewhere.output
    assert said(elsewhere) == [
        "Error: table no_such_schema.task_tags does not exist: check the source's schema and "
        "name in the dbt YAML (var breezeway_schema) and the database you connect to"]
    explicit = _runner(fresh, project, tmp_path / "empty home", "audit", "--select",
                       "task_tags", "--profiles-dir", str(home / ".dbt"), "--target-path",
                       str(tmp_path / "explicit"))
    assert explicit.exit_code == 0, explicit.output
