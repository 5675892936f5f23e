"""`runner suggest-keys`: candidate natural keys of a table, found in its data.

A natural key is a set of columns under which the table's other business columns are the same
in every row: the copies of one real-world row. Surrogate ids (identity, serial, a unique
column of its own) and load times (timestamps that differ between copies) say nothing about
that, so they are set aside first, from the catalog. Then, on a sample of the rows:
  1. every set of up to `max_columns` business columns is tried, smallest first; a set is a
     candidate when every other business column is the same within each of its groups (load
     times may differ), and no smaller candidate is inside it;
  2. a candidate whose key has NULLs where those rows are not all alike is offered with those
     rows each a row of their own (nulls: distinct), and, where a further column groups them
     into copies, with it as an alternative key (the incident's guests without email);
  3. a candidate that leaves out a column by which the table references its parent is offered
     with it too: child rows are identified within their parent;
  4. a unique index on business columns is a key the table already holds: no two rows share
     it, so no sample shows it, and it comes first.
The best candidates are then counted exactly on the whole table, as `runner audit` would count
them, with the key groups whose rows still differ. Reads only.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import psycopg

from runner.declaration.artifacts import DedupSpec, KeepColumn, Relation
from runner.errors import RunnerError
from runner.server import catalog
from runner.statements import candidates
from runner.statements.keys import KeyCounts, count_keys

# Types whose values differ between copies of one row when the ETL stamps its loads.
LOAD_TIME_TYPES = ("timestamp without time zone", "timestamp with time zone")
SAMPLE_ROWS = 20_000
MAX_COLUMNS = 3
SHOWN = 3


@dataclass(frozen=True)
class Candidate:
    natural_key: tuple[str, ...]
    nulls: str = "not_distinct"
    alternative_key: tuple[str, ...] = ()
    differ_between_copies: tuple[str, ...] = ()
    """Load times that differ within its groups in the sample."""
    scoped: bool = False
    """Whether it is a smaller candidate with the columns that reference the parent added."""
    indexed: bool = False
    """Whether an index of the table is on exactly these columns."""
    enforced: bool = False
    """Whether a unique index of the table holds it already."""
    sample_null_rows: int = 0


@dataclass(frozen=True)
class Checked:
    """A candidate counted on the whole table."""

    candidate: Candidate
    spec: DedupSpec
    counts: KeyCounts
    differing_groups: int
    """Key groups whose rows differ in a business column: none for a true key."""
    differing_example: str | None
    copies_equal: bool | None = None
    """Where no column can break ties: whether every key's copies are equal in every column,
    as keep: any needs."""


@dataclass(frozen=True)
class Suggestion:
    relation: Relation
    surrogates: tuple[str, ...]
    load_times: tuple[str, ...]
    sampled_rows: int
    checked: list[Checked] = field(default_factory=list)
    tiebreaker: str | None = None
    """A unique NOT NULL column to end the keep rule with: the latest copy wins."""


def _surrogates(live: catalog.LiveTable, defaults: dict[str, str]) -> list[str]:
    unique = {index.key_columns[0] for index in live.indexes
              if index.unique and index.valid and not index.partial
              and len(index.key_columns) == 1}
    return [c.name for c in live.columns
            if c.identity or c.generated or c.name in unique
            or "nextval(" in defaults.get(c.name, "")]


@dataclass(frozen=True)
class _Grouped:
    """How the sample's rows group by a key."""

    null_rows: int
    """Rows with a NULL in the key."""
    copies: bool
    """Whether some rows without a NULL share a key: without, the key says nothing."""
    copies_per_key: float
    """Rows per key, among the rows without a NULL in it."""
    varying: set[str]
    """The columns that vary within the groups of rows without a NULL in the key."""
    null_varying: set[str]
    """Those that vary among the rows with one, grouped with NULLs equal."""


def _same_within(conn: psycopg.Connection, key: tuple[str, ...], others: list[str]) -> _Grouped:
    row = conn.execute(candidates.groups_within(candidates.sample(), key, others)).fetchone()
    rows, null_rows, keys, null_keys = row[:4]
    pairs, null_pairs = row[4:4 + len(others)], row[4 + len(others):]
    return _Grouped(null_rows, rows - null_rows > keys, (rows - null_rows) / max(keys, 1),
                    {c for c, n in zip(others, pairs, strict=True) if n != keys},
                    {c for c, n in zip(others, null_pairs, strict=True) if n != null_keys})


def _telling_apart(conn: psycopg.Connection, key: tuple[str, ...], business: list[str]
                   ) -> tuple[str, int] | None:
    """The column that, where the key has a NULL, groups those rows into copies alike but for
    their load times; with how many groups it makes of them."""
    for extra in (c for c in business if c not in key):
        others = [c for c in business if c not in key and c != extra]
        groups, *triples = conn.execute(
            candidates.alike_within(candidates.sample(), key, extra, others)).fetchone()
        if all(n == groups for n in triples):
            return extra, groups
    return None


def _with_nulls(conn: psycopg.Connection, key: tuple[str, ...], business: list[str],
                load_times: list[str], grouped: _Grouped) -> list[tuple[str, tuple[str, ...]]]:
    """The NULL policies the sample allows the key: (nulls, alternative_key) each. Rows with a
    NULL in it that are alike are one row (not_distinct); rows that differ are either each a
    row of their own (distinct), or copies of the rows a further column tells apart. The
    reading that comes first: copies, where they come about as often as the other rows'
    copies do (re-sent with them, as the incident's guests without email were); else each a
    row of its own, which never merges two."""
    if not grouped.null_rows or not grouped.null_varying - set(load_times):
        return [("not_distinct", ())]
    found = _telling_apart(conn, key, business)
    if found is None:
        return [("distinct", ())]
    extra, groups = found
    copies = [("not_distinct", (*key, extra))]
    as_often = grouped.null_rows / groups <= 2 * max(grouped.copies_per_key, 1.0)
    return [*copies, ("distinct", ())] if as_often else [("distinct", ()), *copies]


def _candidates(conn: psycopg.Connection, business: list[str], load_times: list[str],
                parents: list[str], max_columns: int) -> list[Candidate]:
    found: list[Candidate] = []
    for size in range(1, max_columns + 1):
        for key in itertools.combinations(business, size):
            if any(set(c.natural_key) <= set(key) for c in found if not c.scoped):
                continue
            others = [c for c in business if c not in key]
            grouped = _same_within(conn, key, others + load_times)
            if not grouped.copies or grouped.varying - set(load_times):
                continue
            differ = tuple(c for c in load_times if c in grouped.varying | grouped.null_varying)
            missing = tuple(p for p in parents if p not in key)
            for nulls, alternative in _with_nulls(conn, key, business, load_times, grouped):
                found.append(Candidate(key, nulls, alternative, differ,
                                       sample_null_rows=grouped.null_rows))
                if missing:
                    found.append(Candidate(
                        (*missing, *key), nulls,
                        (*missing, *alternative) if alternative else (), differ, scoped=True,
                        sample_null_rows=grouped.null_rows))
    return found


def _enforced(live: catalog.LiveTable, business: list[str], not_null: set[str]
              ) -> list[Candidate]:
    """The keys the table's unique indexes hold on business columns alone."""
    return [Candidate(index.key_columns,
                      "not_distinct" if index.nulls_not_distinct
                      or set(index.key_columns) <= not_null else "distinct",
                      indexed=True, enforced=True)
            for index in live.indexes if index.unique and index.valid and not index.partial
            and all(column in business for column in index.key_columns)]


def _ranked(found: list[Candidate], parents: list[str],
            width: dict[str, float]) -> list[Candidate]:
    """A key a unique index holds first; then child rows are identified within their parent;
    then the fewest columns, the fewest NULLs, an index already there, the narrowest key (an
    identifier, more than a text)."""
    def order(c: Candidate) -> tuple:
        scope = [k for k in c.natural_key if k in parents]
        return (not c.enforced, not scope, len(c.natural_key) - len(scope), c.sample_null_rows,
                not c.indexed, sum(width[k] for k in c.natural_key), c.natural_key)
    return sorted(found, key=order)


def _copies_equal(conn: psycopg.Connection, relation: Relation, spec: DedupSpec,
                  live: catalog.LiveTable) -> bool:
    """Whether every key's copies are equal in every column, load times and ids included."""
    rest = [c.name for c in live.columns if c.name not in spec.key_columns]
    return not rest or conn.execute(
        candidates.differing_groups(relation, spec, rest)).fetchone()[0] == 0


def suggest(conn: psycopg.Connection, relation: Relation, sample_rows: int = SAMPLE_ROWS,
            max_columns: int = MAX_COLUMNS, shown: int = SHOWN) -> Suggestion:
    if not catalog.exists(conn, relation):
        raise RunnerError(f"no table {relation}: name it as schema.table")
    live = catalog.read_live_table(conn, relation)
    defaults, estimate = catalog.defaults_and_estimate(conn, relation)
    surrogates = _surrogates(live, defaults)
    load_times = [c.name for c in live.columns
                  if c.name not in surrogates and c.type in LOAD_TIME_TYPES]
    business = [c.name for c in live.columns if c.name not in surrogates + load_times]
    if not business:
        raise RunnerError(f"{relation} has no column but surrogate ids and load times: no "
                          "natural key can be found in it")
    parents = [column for _, columns, _ in catalog.foreign_key_columns(conn, relation)
               for column in columns if column in business]
    percent = None if 0 <= estimate <= sample_rows else min(100.0, 100.0 * sample_rows
                                                               / max(estimate, 1))
    for statement in candidates.take_sample(relation, percent):
        conn.execute(statement)
    sampled = conn.execute(f"select count(*) from pg_temp.{candidates.SAMPLE}").fetchone()[0]
    indexed = {index.key_columns for index in live.indexes if index.valid and not index.partial}
    not_null = {c.name for c in live.columns if c.not_null}
    enforced = _enforced(live, business, not_null)
    held = {frozenset(c.natural_key) for c in enforced}
    found = [*enforced, *(
        dataclasses.replace(c, indexed=tuple(sorted(c.natural_key)) in {
            tuple(sorted(k)) for k in indexed})
        for c in _candidates(conn, business, load_times, parents, max_columns)
        if frozenset(c.natural_key) not in held)]
    tiebreaker = next((s for s in surrogates if s in not_null
                       and any(i.key_columns == (s,) and i.unique for i in live.indexes)), None)
    keep = (KeepColumn(tiebreaker or business[0], True),)
    checked = []
    width = dict(zip(business, conn.execute(
        candidates.widths(candidates.sample(), business)).fetchone(), strict=True))
    for candidate in _ranked(found, parents, width)[:shown]:
        spec = DedupSpec(candidate.natural_key, keep, candidate.nulls,
                         candidate.alternative_key)
        counts = KeyCounts(*conn.execute(count_keys(relation, spec)).fetchone())
        others = [c for c in business if c not in spec.key_columns]
        differing, example = conn.execute(
            candidates.differing_groups(relation, spec, others)).fetchone()
        checked.append(Checked(candidate, spec, counts, differing, example,
                               None if tiebreaker else _copies_equal(conn, relation, spec,
                                                                     live)))
    return Suggestion(relation, tuple(surrogates), tuple(load_times), sampled, checked,
                      tiebreaker)
