"""The runner's dbt variables beside the user's --vars: dbt keeps only the last --vars."""

from __future__ import annotations

import pytest
import yaml

from runner.declaration.dbt import DbtFlags
from runner.errors import RunnerError


def test_the_runner_s_vars_join_the_user_s() -> None:
    flags = DbtFlags(target="prod", vars="{breezeway_schema: etl, day: 2026-12-06}")
    joined = flags.with_vars({"dedup_in_place": ["etl.guests"]})
    assert joined.args()[:2] == ["--target", "prod"]
    assert yaml.safe_load(joined.args()[3]) == {
        "breezeway_schema": "etl", "day": yaml.safe_load("2026-12-06"),
        "dedup_in_place": ["etl.guests"]}
    assert yaml.safe_load(DbtFlags().with_vars({"dedup_in_place": []}).vars) == {
        "dedup_in_place": []}


@pytest.mark.parametrize("given", ["[a, b]", "just words", "{unclosed: [1"])
def test_vars_that_are_not_a_dictionary_are_refused_in_one_line(given: str) -> None:
    with pytest.raises(RunnerError) as refused:
        DbtFlags(vars=given).with_vars({"dedup_in_place": []})
    assert "is not a YAML dictionary" in str(refused.value)
    assert "\n" not in str(refused.value)
