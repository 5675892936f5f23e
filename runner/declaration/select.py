"""What `--select` names, the same way for every command: a table by its name, its
schema.table, or whatever else a command knows it by (a dbt source name), in the order named,
each once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from runner.errors import RunnerError

Item = TypeVar("Item")


def chosen(items: list[Item], names: list[str] | None,
           known_as: Callable[[Item], tuple[str, ...]],
           unknown: Callable[[str, list[Item]], str]) -> list[Item]:
    """The items the names select, or all of them when none is named; a name that selects
    nothing stops the command with `unknown(name, items)`."""
    if not names:
        return items
    found: list[Item] = []
    for name in names:
        matches = [item for item in items if name in known_as(item)]
        if not matches:
            raise RunnerError(unknown(name, items))
        found += [item for item in matches if item not in found]
    return found
