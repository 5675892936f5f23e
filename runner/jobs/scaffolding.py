"""`runner init`, `runner add` and `runner models`: the user's dbt project on disk, laid out,
declared and derived as runner.declaration.scaffold says."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from runner.declaration import scaffold
from runner.declaration.artifacts import Relation, refuse_double_quotes
from runner.declaration.dbt import run_dbt
from runner.declaration.project import bundled_project
from runner.errors import RunnerError


def init(project: Path, name: str | None = None) -> list[str]:
    """A new dbt project in `project`, with this runner's dbt package installed (`dbt deps`);
    returns the files written. Refused where a dbt project is already."""
    if (project / "dbt_project.yml").exists():
        raise RunnerError(f"{project} has a dbt_project.yml already: add tables to it with "
                          "`runner add`, or choose another directory")
    files = scaffold.project_files(scaffold.dbt_name(name or project.resolve().name),
                                   bundled_project())
    _write(project, files)
    run_dbt(["deps"], project, quiet=True)
    return sorted(files)


@dataclass(frozen=True)
class Added:
    declared_in: str
    written: list[str]
    """The model files `runner models` wrote or rewrote for it."""


def add(project: Path, relation: Relation, spec: dict, source: str | None = None,
        name: str | None = None) -> Added:
    """Declare `relation` under its source with `spec` as its meta.dedup, then derive the
    project's models; nothing is written when the spec is refused."""
    if not (project / "dbt_project.yml").is_file():
        raise RunnerError(f"no dbt project in {project}: create one with `runner init "
                          f"{project}` first")
    source = scaffold.dbt_name(source or relation.schema)
    table = scaffold.dbt_name(name or relation.name)
    scaffold.checked_spec(f"{source}.{table}", spec)
    refuse_double_quotes(f"{source}.{table}", {"schema": relation.schema,
                                                "table": relation.name})
    path = project / scaffold.source_file(source)
    if path.is_file() and scaffold.written_by_hand(path.read_text()):
        raise RunnerError(f"{scaffold.source_file(source)} has comments or anchors, which "
                          "rewriting it would lose: add the table's entry there by hand, then "
                          "run `runner models`")
    document = yaml.safe_load(path.read_text()) if path.is_file() else None
    document = scaffold.added(document, source, relation.schema,
                              scaffold.table_entry(table, relation.name, spec))
    models = _expected(project, extra=scaffold.Declared(
        source, table, scaffold.source_file(source), strategy=spec.get("strategy", "auto")))
    _write(project, {scaffold.source_file(source): yaml.safe_dump(document, sort_keys=False)})
    return Added(scaffold.source_file(source), write_models(project, models))


def _expected(project: Path, extra: scaffold.Declared | None = None) -> dict[str, str]:
    tables = scaffold.declared(project)
    if extra is not None and extra not in tables:
        tables.append(extra)
    return scaffold.model_files(tables)


def write_models(project: Path, expected: dict[str, str] | None = None) -> list[str]:
    """Every file the declarations need, written where it differs; generated files no
    declaration needs any more removed. Returns what changed."""
    expected = _expected(project) if expected is None else expected
    changed = [path for path, text in expected.items()
               if not (project / path).is_file() or (project / path).read_text() != text]
    _write(project, {path: expected[path] for path in changed})
    for path in scaffold.generated_files(project):
        if path not in expected:
            (project / path).unlink()
            changed.append(path)
    return sorted(changed)


def check_models(project: Path) -> list[str]:
    """Where the generated files drifted from the declarations: empty when none did."""
    return scaffold.drift(project, _expected(project))


def _write(project: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(text)
