"""One meaning of meta.dedup: the dbt macro that reads it for the models and the runner that
reads it from the manifest before any model is compiled refuse the same mistakes, in the same
order and words."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import Database, run_dbt

from runner.declaration.artifacts import parse_spec
from runner.errors import RunnerError

KEEP = [{"column": "id", "order": "desc"}]
MISTAKES = {
    "no meta.dedup": {},
    "meta.dedup not a mapping": {"dedup": "photo_id"},
    "a misspelt key": {"dedup": {"natural_keys": ["a"], "natural_key": ["a"], "keep": KEEP}},
    "a natural key that is a string": {"dedup": {"natural_key": "a, b", "keep": KEEP}},
    "an empty natural key": {"dedup": {"natural_key": [], "keep": KEEP}},
    "a natural key column that is a number": {"dedup": {"natural_key": ["a", 1], "keep": KEEP}},
    "no keep rule": {"dedup": {"natural_key": ["a"]}},
    "a keep entry without order": {"dedup": {"natural_key": ["a"], "keep": [{"column": "id"}]}},
    "a keep entry that is a name": {"dedup": {"natural_key": ["a"], "keep": ["id"]}},
    "an unknown NULL policy": {"dedup": {"natural_key": ["a"], "keep": KEEP, "nulls": "maybe"}},
    "an alternative key that is a string": {
        "dedup": {"natural_key": ["a"], "keep": KEEP, "alternative_key": "a, b"}},
    "an alternative key without the natural key": {
        "dedup": {"natural_key": ["a", "b"], "keep": KEEP, "alternative_key": ["a", "c"]}},
    "an alternative key that adds nothing": {
        "dedup": {"natural_key": ["a", "b"], "keep": KEEP, "alternative_key": ["b", "a"]}},
    "an empty alternative key": {"dedup": {"natural_key": ["a"], "keep": KEEP,
                                           "alternative_key": []}},
    "an alternative key with NULLs distinct": {
        "dedup": {"natural_key": ["a"], "keep": KEEP, "nulls": "distinct",
                  "alternative_key": ["a", "b"]}},
    "an unknown reference policy": {
        "dedup": {"natural_key": ["a"], "keep": KEEP, "references": "cascade"}},
    "a reference policy that is a list": {
        "dedup": {"natural_key": ["a"], "keep": KEEP, "references": ["refuse"]}},
    "an unknown strategy": {
        "dedup": {"natural_key": ["a"], "keep": KEEP, "strategy": "rebuild"}},
    "in place with NULLs backfilled": {
        "dedup": {"natural_key": ["a"], "keep": KEEP, "nulls": "backfill",
                  "strategy": "in_place"}},
    "a keep rule that is a word other than any": {"dedup": {"natural_key": ["a"],
                                                            "keep": "latest"}},
    "any copy, swapped": {"dedup": {"natural_key": ["a"], "keep": "any", "strategy": "swap"}},
    "any copy, with NULLs backfilled": {
        "dedup": {"natural_key": ["a"], "keep": "any", "nulls": "backfill"}},
}


@pytest.fixture(scope="module")
def project(built: Database, tmp_path_factory: pytest.TempPathFactory) -> Database:
    """dbt's artifacts of its own: run-operation writes them."""
    target = tmp_path_factory.mktemp("spec_parity") / "target"
    shutil.copytree(built.target_dir, target)
    return Database(built.env, target)


def _macro_says(project: Database, meta: dict) -> str:
    events = []
    source_node = {"source_name": "shop", "name": "order lines", "config": {"meta": meta}}
    result = run_dbt(["run-operation", "dedup_spec_from_source",
                      "--args", json.dumps({"source_node": source_node})],
                     project.env, project.target_dir, callbacks=[events.append])
    assert not result.success
    error = next(e for e in events if e.info.name == "RunningOperationCaughtError")
    said = error.data.exc.splitlines()[1].strip()
    assert said.startswith("dedup: ")
    return said.removeprefix("dedup: ")


@pytest.mark.parametrize("meta", MISTAKES.values(), ids=MISTAKES.keys())
def test_the_macro_and_the_runner_refuse_a_mistake_in_the_same_words(project: Database,
                                                                     meta: dict) -> None:
    with pytest.raises(RunnerError) as refused:
        parse_spec("shop.order lines", meta)
    assert str(refused.value) == _macro_says(project, meta)


def test_an_alternative_key_is_read_with_what_it_adds_to_the_natural_key() -> None:
    spec = parse_spec("shop.guests", {"dedup": {
        "natural_key": ["reservation_pk", "guest_email"], "keep": KEEP,
        "alternative_key": ["reservation_pk", "guest_name", "guest_email", "guest_name"]}})
    assert spec.alternative_key == ("reservation_pk", "guest_name", "guest_email")
    assert spec.told_apart_by == ("guest_name",)
    assert spec.nulls == "not_distinct"
