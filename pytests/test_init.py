"""A user's own project from nothing, on a real server: `runner init`, `runner add` for a
table unlike the demo's (quoted names, a text key, a uuid tie-breaker, a keep rule on two
columns, NULL keys forbidden), then build, swap and verify it; `runner models --check` says
when the generated files drift from the declaration."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from conftest import Database, said
from test_other_project import EXPECTED_KEPT, shop  # noqa: F401 (a fixture)

from runner.declaration.project import bundled_project

ADD = ["add", "Shop.Order Lines", "--key", "Order ID,line_no",
       "--keep", "updated_at:desc,uid:desc", "--nulls", "forbidden"]


def test_init_add_build_swap_and_verify_a_table_of_ones_own(shop: Database,  # noqa: F811
                                                            tmp_path: Path) -> None:
    project = tmp_path / "mine"
    made = shop.runner("init", str(project))
    assert made.exit_code == 0, made.output
    assert yaml.safe_load((project / "packages.yml").read_text()) == {
        "packages": [{"local": str(bundled_project())}]}
    assert yaml.safe_load((project / "dbt_project.yml").read_text())["name"] == "mine"
    # As a fresh clone of it has them: not installed. The runner installs them when it needs.
    shutil.rmtree(project / "dbt_packages")
    added = shop.runner(*ADD, "--project-dir", str(project))
    assert added.exit_code == 0, added.output
    declared = yaml.safe_load((project / "models/staging/shop/_shop__sources.yml").read_text())
    assert declared["sources"] == [{"name": "shop", "schema": "Shop", "tables": [{
        "name": "order_lines", "identifier": "Order Lines",
        "config": {"meta": {"dedup": {
            "natural_key": ["Order ID", "line_no"],
            "keep": [{"column": "updated_at", "order": "desc"},
                     {"column": "uid", "order": "desc"}],
            "nulls": "forbidden"}}},
        "data_tests": ["dedup.dedup_tiebreaker_unique"]}]}]
    assert (project / "models/deduplicated/order_lines.sql").is_file()
    checked = shop.runner("models", "--check", "--project-dir", str(project))
    assert checked.exit_code == 0, checked.output

    built = shop.runner("build", "--project-dir", str(project))
    assert built.exit_code == 0, built.output
    swapped = shop.runner("swap", "--project-dir", str(project))
    assert swapped.exit_code == 0, swapped.output
    verified = shop.runner("verify", "--project-dir", str(project))
    assert verified.exit_code == 0, verified.output
    with shop.connect() as conn:
        live = {row[0] for row in conn.execute('select uid from "Shop"."Order Lines"')}
        expected = {row[0] for row in conn.execute(
            EXPECTED_KEPT.replace('"Shop"."Order Lines"', 'dedup_archive.'
                                  + conn.execute("select quote_ident(archive_table) from"
                                                 " dedup_archive.swap_log").fetchone()[0]))}
    assert len(live) == 15 and live == expected


def test_models_check_fails_when_a_generated_file_drifts_and_models_puts_it_back(
        tmp_path: Path) -> None:
    from click.testing import CliRunner

    from runner.cli import cli

    project = tmp_path / "mine"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(project)]).exit_code == 0
    assert runner.invoke(cli, [*ADD, "--project-dir", str(project)]).exit_code == 0
    kept_rows = project / "models/deduplicated/order_lines.sql"
    kept_rows.write_text(kept_rows.read_text() + "-- edited by hand\n")
    (project / "models/removed/removed_order_lines.sql").unlink()
    checked = runner.invoke(cli, ["models", "--check", "--project-dir", str(project)])
    assert checked.exit_code == 1
    assert checked.output.splitlines() == [
        "models/deduplicated/order_lines.sql differs from what its meta.dedup makes",
        "models/removed/removed_order_lines.sql is missing"]
    written = runner.invoke(cli, ["models", "--project-dir", str(project)])
    assert written.exit_code == 0, written.output
    assert runner.invoke(cli, ["models", "--check", "--project-dir",
                               str(project)]).exit_code == 0


def test_what_init_and_add_refuse_changes_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from runner.cli import cli

    project = tmp_path / "mine"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(project)]).exit_code == 0
    again = runner.invoke(cli, ["init", str(project)])
    assert again.exit_code == 4
    assert said(again) == [f"Error: {project} has a dbt_project.yml already: add tables to it "
                           "with `runner add`, or choose another directory"]
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    sideways = runner.invoke(cli, ["add", "Shop.Order Lines", "--key", "Order ID",
                                   "--keep", "uid:sideways", "--project-dir", str(project)])
    assert sideways.exit_code == 4
    assert said(sideways) == [
        'Error: source shop.order_lines: each keep entry needs column and order (asc or '
        'desc), got {"column": "uid", "order": "sideways"}']
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before
    assert runner.invoke(cli, [*ADD, "--project-dir", str(project)]).exit_code == 0
    twice = runner.invoke(cli, [*ADD, "--project-dir", str(project)])
    assert twice.exit_code == 4
    assert said(twice) == ["Error: source shop declares order_lines already: edit its "
                           "meta.dedup there, then run `runner models`"]


def test_the_demo_projects_models_are_what_its_declarations_make() -> None:
    """The demo is generated as a project of one's own is: `runner models --check`, as CI runs
    it, finds nothing to change."""
    from click.testing import CliRunner
    from conftest import PROJECT_DIR

    from runner.cli import cli

    checked = CliRunner().invoke(cli, ["models", "--check", "--project-dir", str(PROJECT_DIR)])
    assert checked.exit_code == 0, checked.output


def test_models_describe_the_columns_as_the_source_entry_does(tmp_path: Path) -> None:
    """dbt docs shows a column's description on every model that keeps the column, written
    once under the source table; the project's front page is its own overview."""
    from click.testing import CliRunner

    from runner.cli import cli

    project = tmp_path / "mine"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(project)]).exit_code == 0
    assert (project / "models/overview.md").read_text().startswith("{% docs __overview__ %}\n")
    assert runner.invoke(cli, [*ADD, "--project-dir", str(project)]).exit_code == 0
    sources = project / "models/staging/shop/_shop__sources.yml"
    declared = yaml.safe_load(sources.read_text())
    columns = [{"name": "Order ID", "description": "The order: \"ORD-\" and a number.\n",
                "quote": True},
               {"name": "line_no", "description": "Its place in the order."},
               {"name": "uid"}]
    declared["sources"][0]["tables"][0]["columns"] = columns
    sources.write_text(yaml.safe_dump(declared, sort_keys=False))
    assert runner.invoke(cli, ["models", "--check", "--project-dir", str(project)]).exit_code == 1
    assert runner.invoke(cli, ["models", "--project-dir", str(project)]).exit_code == 0
    models = yaml.safe_load((project / "models/deduplicated/_order_lines__models.yml").read_text())
    described = [{"name": "Order ID", "description": 'The order: "ORD-" and a number.',
                  "quote": True},
                 {"name": "line_no", "description": "Its place in the order."}]
    by_name = {model["name"]: model for model in models["models"]}
    for model in ("stg_shop__order_lines", "order_lines", "removed_order_lines"):
        assert by_name[model]["columns"] == described, model
    assert "columns" not in by_name["int_order_lines_grouped_by_key"]
