"""--select, the same for every command: by any name a table is known by, in the order named,
each once."""

from __future__ import annotations

import dataclasses

import pytest
from facts import TARGET

from runner.declaration import artifacts, select
from runner.declaration.artifacts import Relation
from runner.errors import RunnerError

TABLES = ["shop.orders", "shop.order lines", "audit.orders"]


def _known_as(table: str) -> tuple[str, ...]:
    return (table, table.split(".")[1])


def _unknown(name: str, tables: list[str]) -> str:
    return f"--select {name}: none; known: {', '.join(tables)}"


def test_no_name_selects_all_and_names_select_in_their_order_each_once() -> None:
    assert select.chosen(TABLES, None, _known_as, _unknown) == TABLES
    assert select.chosen(TABLES, ["order lines", "orders", "audit.orders"], _known_as,
                         _unknown) == ["shop.order lines", "shop.orders", "audit.orders"]


def test_a_name_that_selects_nothing_stops_with_the_commands_message() -> None:
    with pytest.raises(RunnerError, match=r"^--select order: none; known: shop.orders, "):
        select.chosen(TABLES, ["orders", "order"], _known_as, _unknown)


def test_exclude_leaves_out_by_the_same_names_and_refuses_a_name_of_nothing() -> None:
    other = dataclasses.replace(TARGET, source="shop.refunds", live=Relation("Shop", "refunds"),
                                model_id="model.shop.refunds")
    targets = [TARGET, other]
    assert artifacts.select_targets(targets, None, ["shop.refunds"]) == [TARGET]
    assert artifacts.select_targets(targets, ["refunds", "order lines"], ["Shop.order lines"]
                                    ) == [other]
    with pytest.raises(RunnerError, match=r"^--exclude nope: no deduplicated table of that "
                                          r"name; known: order lines, refunds$"):
        artifacts.select_targets(targets, None, ["nope"])
    with pytest.raises(RunnerError, match=r"^--exclude leaves no table to work on"):
        artifacts.select_targets(targets, ["refunds"], ["refunds"])
