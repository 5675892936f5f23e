"""The rooms of runner/ and what each may touch, checked from the source: a newcomer can rely
on the tree. Pure rooms (the declaration and the statement builders) never run a statement;
each room imports only from the rooms below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "runner"
BASE = {"errors", "units", "progress", "version"}
MAY_IMPORT = {
    "declaration": BASE | {"declaration"},
    # The builders take the facts the server's catalog reads, as its dataclasses.
    "statements": BASE | {"declaration", "server", "statements"},
    "server": BASE | {"declaration", "server", "statements"},
    "execution": BASE | {"declaration", "server", "statements", "execution"},
    "jobs": BASE | {"declaration", "server", "statements", "execution", "jobs"},
    "facts": BASE | {"declaration", "server", "statements", "execution", "facts"},
    "present": BASE | {"declaration", "server", "statements", "facts", "present"},
    "demo": BASE,
}
# Drawing for people happens in one room, and the CLI.
DRAWS = {"rich"}
PURE = ("declaration", "statements")
# What running SQL or reaching a server looks like from Python.
RUNS_SQL = {"execute", "executemany", "fetchone", "fetchall", "connect", "cursor"}


def _room(path: Path) -> str:
    relative = path.relative_to(RUNNER)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _modules() -> list[Path]:
    return sorted(p for p in RUNNER.rglob("*.py") if _room(p) in MAY_IMPORT)


def _imported_rooms(tree: ast.AST) -> set[str]:
    rooms = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "runner" or node.module.startswith("runner.")):
            parts = node.module.split(".")
            if len(parts) > 1:
                rooms.add(parts[1])
            else:
                rooms.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            rooms.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("runner."))
    return rooms


def test_every_module_has_a_room() -> None:
    rooms = {_room(p) for p in RUNNER.rglob("*.py")}
    assert rooms - set(MAY_IMPORT) == {"__init__", "__main__", "cli", "errors", "units",
                                        "progress", "version"}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(RUNNER)))
def test_a_room_imports_only_from_the_rooms_below_it(path: Path) -> None:
    room = _room(path)
    found = _imported_rooms(ast.parse(path.read_text()))
    assert found <= MAY_IMPORT[room], f"{room} may not import {sorted(found - MAY_IMPORT[room])}"


@pytest.mark.parametrize("path", [p for p in _modules() if _room(p) != "present"],
                         ids=lambda p: str(p.relative_to(RUNNER)))
def test_only_the_presentation_draws(path: Path) -> None:
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & DRAWS


@pytest.mark.parametrize("path", [p for p in _modules() if _room(p) in PURE],
                         ids=lambda p: str(p.relative_to(RUNNER)))
def test_the_pure_rooms_never_run_a_statement(path: Path) -> None:
    calls = {node.func.attr for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not calls & RUNS_SQL, f"calls {sorted(calls & RUNS_SQL)}"
