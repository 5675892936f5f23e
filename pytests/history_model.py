"""What a deduplicated table and its archives must hold, worked out in Python alone: the oracle of
the histories test (test_histories.py). No database here.

A table is a dict from tie-breaker to row, the row a dict from column to value. The model knows
the keep rule, the NULL policy and what the UNIQUE constraint the swap adds lets in, and keeps
for each swap what its archive must hold and what a rollback must give back.
"""

from __future__ import annotations

import copy
import functools
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from runner.statements.plan import IN_PLACE_UP_TO

CLOCK_START = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Backfilled:
    """A NULL key the swap filled with a fresh uuid: equal to no other value, and matched by any
    non-NULL value the database holds in its place."""

    def __repr__(self) -> str:
        return "<backfilled>"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    """The SQL type and constraints, as in CREATE TABLE."""
    values: str
    """What the harness writes: key_int, key_text, key_uuid, payload, clock, version, parent,
    updates (a trigger's count), or generated (the table fills it, read back)."""
    nullable: bool = False


@dataclass(frozen=True)
class Shape:
    """One table a history runs on, with its dedup spec and what else it has around it."""

    name: str
    """The dbt source table and model name."""
    table: str
    """The table's name in the database."""
    columns: tuple[Column, ...]
    natural_key: tuple[str, ...]
    keep: tuple[tuple[str, bool], ...]
    """(column, descending), ending in the tie-breaker."""
    nulls: str
    extras: frozenset[str] = frozenset()
    """view, grant, trigger, parent, partitioned (by the hash of its key's first column)."""
    alternative_key: tuple[str, ...] = ()
    strategy: str = "swap"
    """meta.dedup's strategy: swap, in_place, or auto."""

    def __repr__(self) -> str:
        return f"<shape {self.name}>"

    @property
    def tiebreaker(self) -> str:
        return self.keep[-1][0]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The natural key's columns, and those the alternative key adds."""
        return self.natural_key + tuple(c for c in self.alternative_key
                                        if c not in self.natural_key)

    @property
    def nullable_key(self) -> list[str]:
        return [c for c in self.key_columns if self.column(c).nullable]


def key_of(shape: Shape, row: dict) -> tuple:
    """The row's key: its natural key, and where that has a NULL the alternative key's other
    columns (None where it has none)."""
    natural = tuple(row[c] for c in shape.natural_key)
    more = shape.key_columns[len(natural):]
    return natural + tuple(row[c] if _has_null(natural) else None for c in more)


def _has_null(key: tuple) -> bool:
    return any(value is None for value in key)


def conflicts(shape: Shape, key: tuple, rows: dict, ignore=None) -> bool:
    """Whether a row with `key` conflicts, under the natural key's UNIQUE constraint, with one
    of `rows` (but the row with tie-breaker `ignore`)."""
    if _has_null(key) and shape.nulls != "not_distinct":
        return False
    return any(key_of(shape, row) == key for tb, row in rows.items() if tb != ignore)


def _compare(a, b, descending: bool) -> int:
    """ORDER BY's comparison of one column: NULLs last ascending, first descending."""
    if a == b:
        return 0
    if a is None:
        return -1 if descending else 1
    if b is None:
        return 1 if descending else -1
    result = (a > b) - (a < b)
    return -result if descending else result


def keep_rule(shape: Shape, rows: dict) -> dict:
    """The rows a swap keeps: per natural key the first in the keep order; a row with a NULL in
    its key is a group of its own unless NULLs are equal; under backfill such a key gets a
    uuid."""
    groups: dict = {}
    for tb, row in rows.items():
        key = key_of(shape, row)
        group = (key, tb) if _has_null(key) and shape.nulls != "not_distinct" else (key,)
        groups.setdefault(group, []).append(row)

    def order(a: dict, b: dict) -> int:
        for column, descending in shape.keep:
            result = _compare(a[column], b[column], descending)
            if result:
                return result
        return 0

    kept = {}
    for members in groups.values():
        row = dict(min(members, key=functools.cmp_to_key(order)))
        if shape.nulls == "backfill":
            for column in shape.natural_key:
                if row[column] is None:
                    row[column] = Backfilled()
        kept[row[shape.tiebreaker]] = row
    return kept


def duplicates(shape: Shape, rows: dict) -> int:
    return len(rows) - len(keep_rule(shape, rows))


def matches(expected, actual) -> bool:
    if isinstance(expected, Backfilled):
        return actual is not None
    return expected == actual


def same_table(expected: dict, actual: dict) -> bool:
    """Tables equal, tie-breaker by tie-breaker and column by column."""
    return expected.keys() == actual.keys() and all(
        all(matches(value, actual[tb][column]) for column, value in row.items())
        for tb, row in expected.items())


def difference(expected: dict, actual: dict) -> str:
    """What differs, briefly, for a failure's message."""
    missing = sorted(map(str, expected.keys() - actual.keys()))[:5]
    extra = sorted(map(str, actual.keys() - expected.keys()))[:5]
    changed = [f"{tb}: expected {row}, found {actual[tb]}" for tb, row in expected.items()
               if tb in actual and not all(matches(v, actual[tb][c]) for c, v in row.items())]
    return (f"{len(expected)} rows expected, {len(actual)} found; missing {missing}, "
            f"unexpected {extra}, differing {changed[:3]}")


@dataclass
class SwapRecord:
    """One swap of the table and what it left."""

    kind: str
    """swap (the table replaced), in_place (its duplicates removed) or constraint (only the
    constraint added)."""
    archive: dict = field(default_factory=dict)
    """The original, as it must be in the archive schema; in place, the rows removed."""
    restored: dict = field(default_factory=dict)
    """What a rollback must give back: the original with every later write."""
    rolled_back: bool = False
    cleaned: bool = False
    """runner cleanup dropped what it kept: the archive, or the copy a rollback set aside."""
    rolled_back_copy: dict = field(default_factory=dict)
    """After a rollback: the deduplicated table as it was set aside."""
    capture: bool = True
    """Whether the writes since the swap are still captured, so it can be rolled back."""


@dataclass
class Model:
    """The state of one table and everything the runner keeps of it."""

    shape: Shape
    live: dict = field(default_factory=dict)
    clock: int = 0
    capture: int | None = None
    """When the capture of the original started (a step number), if it is in place."""
    build: int | None = None
    """When the latest build read the table, and what it saw."""
    built_rows: dict = field(default_factory=dict)
    swaps: list[SwapRecord] = field(default_factory=list)
    steps: int = 0
    next_key: int = 1000

    def tick(self) -> int:
        self.steps += 1
        return self.steps

    def now(self) -> datetime:
        self.clock += 1
        return CLOCK_START + timedelta(seconds=self.clock)

    @property
    def current(self) -> SwapRecord | None:
        """The table's latest swap, if it is in effect, cleaned up or not."""
        if self.swaps and not self.swaps[-1].rolled_back:
            return self.swaps[-1]
        return None

    @property
    def constrained(self) -> bool:
        """The natural key's constraint is on the table: its latest swap was not rolled back."""
        return self.current is not None

    # The ETL's writes, on the live table; each returns whether it took effect.

    def inserted(self, row: dict) -> None:
        self.live[row[self.shape.tiebreaker]] = row
        self._also_restored(row[self.shape.tiebreaker], row)

    def updated(self, tb, row: dict) -> None:
        self.live[tb] = row
        self._also_restored(tb, row)

    def deleted(self, tb) -> None:
        del self.live[tb]
        self._also_restored(tb, None)

    def _also_restored(self, tb, row: dict | None) -> None:
        current = self.current
        if current is None or current.kind != "swap" or not current.capture:
            return
        if row is None:
            current.restored.pop(tb, None)
        else:
            current.restored[tb] = copy.copy(row)

    def insert_takes(self, row: dict) -> bool:
        """ON CONFLICT DO NOTHING inserts it unless the constraint is there and conflicts."""
        return not (self.constrained and conflicts(self.shape, key_of(self.shape, row),
                                                   self.live))

    def update_takes(self, tb, row: dict) -> bool:
        """An update that changes the key fails on a conflict once the constraint is there."""
        return not (self.constrained and conflicts(self.shape, key_of(self.shape, row),
                                                   self.live, ignore=tb))

    # The runner's commands: each returns what it must do (None: refuse).

    def capture_started(self) -> None:
        if self.current is not None and self.current.kind == "swap" and self.current.capture:
            return
        if self.capture is None:
            self.capture = self.tick()

    def built(self) -> None:
        self.build = self.tick()
        self.built_rows = copy.deepcopy(self.live)

    def swap_outcome(self) -> str:
        """nothing, constraint, swap, or refused."""
        if self.build is None:
            return "refused"
        if self.constrained:
            return "nothing"
        if duplicates(self.shape, self.built_rows) == 0:
            # The unique index, built concurrently, meets whatever duplicates came since.
            return "refused" if duplicates(self.shape, self.live) else "constraint"
        if self.capture is None or self.capture > self.build:
            return "refused"
        return self.strategy()

    def strategy(self) -> str:
        """swap or in_place, as `runner swap` chooses for a table with duplicates: `auto`
        removes them in place where at most IN_PLACE_UP_TO of the built rows are duplicates."""
        if self.shape.strategy != "auto":
            return self.shape.strategy
        if "partitioned" in self.shape.extras:
            return "in_place"
        share = duplicates(self.shape, self.built_rows) / len(self.built_rows)
        return "in_place" if self.shape.nulls != "backfill" and share <= IN_PLACE_UP_TO else "swap"

    def swapped(self, outcome: str) -> None:
        self.tick()
        if outcome == "nothing":
            self.capture = None
        elif outcome == "constraint":
            self.swaps.append(SwapRecord("constraint"))
            self.capture = None
        elif outcome == "swap":
            archive = copy.deepcopy(self.live)
            self.swaps.append(SwapRecord("swap", archive=archive,
                                         restored=copy.deepcopy(archive)))
            self.live = keep_rule(self.shape, self.live)
            self.capture = None
        elif outcome == "in_place":
            kept = keep_rule(self.shape, self.live)
            self.swaps.append(SwapRecord("in_place", archive={
                tb: row for tb, row in self.live.items() if tb not in kept}, capture=False))
            self.live = kept
            self.capture = None

    def rollback_outcome(self) -> str:
        current = self.current
        if current is None:
            return "refused"
        if current.kind == "constraint":
            return "constraint"
        if current.kind == "in_place":
            return "refused" if current.cleaned else "in_place"
        return "restore" if current.capture and not current.cleaned else "refused"

    def rolled_back(self, outcome: str) -> None:
        self.tick()
        current = self.current
        if outcome == "constraint":
            current.rolled_back = True
        elif outcome == "in_place":
            # The removed rows come back, and stay in the archive until cleanup.
            self.live = {**self.live, **copy.deepcopy(current.archive)}
            current.rolled_back = True
        elif outcome == "restore":
            current.rolled_back_copy = self.live
            self.live = current.restored
            current.restored = {}
            current.archive = {}
            current.rolled_back = True

    def capture_stop_outcome(self) -> str:
        current = self.current
        since_swap = current is not None and current.kind == "swap" and current.capture
        return "stop" if self.capture is not None or since_swap else "refused"

    def capture_stopped(self) -> None:
        self.tick()
        self.capture = None
        if self.current is not None:
            self.current.capture = False

    def cleaned_up(self) -> None:
        self.tick()
        for record in self.swaps:
            if record.kind in ("swap", "in_place") and not record.cleaned:
                record.cleaned = True
                record.capture = False
                record.archive = {}
                record.rolled_back_copy = {}

    def kept(self) -> list[dict]:
        """What the archive schema must hold, swap by swap, in the order of the swaps."""
        kept = []
        for record in self.swaps:
            if record.kind not in ("swap", "in_place") or record.cleaned:
                continue
            kept.append(record.rolled_back_copy if record.rolled_back and record.kind == "swap"
                        else record.archive)
        return kept

    def fresh_key(self, column: Column):
        self.next_key += 1
        if column.values == "key_int":
            return self.next_key
        if column.values == "key_uuid":
            return uuid.uuid5(uuid.NAMESPACE_OID, str(self.next_key))
        return f"k{self.next_key}"
