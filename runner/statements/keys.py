"""A table's rows counted by natural key, with the NULL semantics its YAML declares: one query for
`runner audit` before the swap and `runner verify` after it, meaning what dbt's key groups and
the natural key's constraint mean.

GROUP BY puts NULLs together, so a group whose key has a NULL is one key only when NULLs are
equal (`nulls: not_distinct`); under every other policy each of its rows is a key of its own,
as in a plain UNIQUE constraint and in the dbt models.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, KeepColumn, Relation

NULLS_EQUAL = "not_distinct"
# The first version with UNIQUE NULLS NOT DISTINCT.
NULLS_NOT_DISTINCT_VERSION = 150000


@dataclass(frozen=True)
class KeyShape:
    """Which of a key's nullable columns are NULL in a row, and so which columns tell its key
    apart from the other keys of its shape. Statements that an index on the key must serve are
    written once per shape, with `k = v` and `k IS NULL`: IS NOT DISTINCT FROM, which would
    cover them all, no index serves."""

    nulls: tuple[str, ...]
    compared: tuple[str, ...]
    checked: tuple[str, ...]
    """The nullable columns that make the shape: each NULL if in `nulls`, NOT NULL if not."""


def _subsets(columns: Sequence[str]) -> list[tuple[str, ...]]:
    return [subset for size in range(len(columns) + 1)
            for subset in itertools.combinations(columns, size)]


def key_shapes(spec: DedupSpec, not_null: set[str]) -> list[KeyShape]:
    """Every shape a key can have, the one without a NULL first. Unless NULLs are equal a key
    with a NULL is its row's own and has no shape to match: only the first is there. Where the
    natural key has a NULL, an alternative key tells its rows apart by its other columns too,
    themselves NULL or not."""
    nullable = tuple(k for k in spec.natural_key if k not in not_null)
    whole = KeyShape((), spec.natural_key, nullable)
    if spec.nulls != NULLS_EQUAL:
        return [whole]
    more = tuple(c for c in spec.told_apart_by if c not in not_null)
    shapes = [whole]
    for nulls in _subsets(nullable)[1:]:
        for more_nulls in _subsets(more):
            null = nulls + more_nulls
            shapes.append(KeyShape(
                null, tuple(c for c in (*spec.natural_key, *spec.told_apart_by) if c not in null),
                nullable + more))
    return shapes


def nulls_exactly(of: Callable[[str], sql.Composable], shape: KeyShape) -> sql.Composed:
    """The key's nullable columns, each `of` the row named, are NULL as in `shape`."""
    terms = [sql.SQL("{} is {}null").format(of(k), sql.SQL("" if k in shape.nulls else "not "))
             for k in shape.checked]
    return sql.SQL("({})").format(sql.SQL(" and ").join(terms or [sql.SQL("true")]))


def shape_matches(spec: DedupSpec, left: Callable[[str], sql.Composable],
                  right: Callable[[str], sql.Composable], shape: KeyShape) -> sql.Composed:
    """The keys are equal, for a `right` whose key has `shape`, as an index on the key finds
    them."""
    return sql.SQL(" and ").join(
        sql.SQL("{} is null").format(left(k)) if k in shape.nulls
        else sql.SQL("{} = {}").format(left(k), right(k))
        for k in spec.key_columns if k in shape.nulls or k in shape.compared)


def null_key_shapes(spec: DedupSpec, not_null: set[str], server_version: int) -> list[KeyShape]:
    """The shapes with a NULL that the natural key's constraint does not hold, each held by a
    partial unique index of its own: an alternative key's, on any version; and before
    PostgreSQL 15, where no constraint makes NULLs equal, those of a key whose NULLs are."""
    if not spec.alternative_key and server_version >= NULLS_NOT_DISTINCT_VERSION:
        return []
    return key_shapes(spec, not_null)[1:]


def beats(keep: Sequence[KeepColumn], new: Callable[[str], sql.Composable],
          old: Callable[[str], sql.Composable]) -> sql.Composed:
    """The row `new` (each column `new` of its name) comes before the row `old` in the keep
    order, with ORDER BY's NULL placement: NULLs last ascending, first descending."""
    terms, equal_so_far = [], []
    for entry in keep:
        n, o = new(entry.column), old(entry.column)
        if entry.descending:
            better = sql.SQL("({n} > {o} or ({n} is null and {o} is not null))")
        else:
            better = sql.SQL("({n} < {o} or ({n} is not null and {o} is null))")
        terms.append(sql.SQL(" and ").join([*equal_so_far, better.format(n=n, o=o)]))
        equal_so_far.append(sql.SQL("{} is not distinct from {}").format(n, o))
    return sql.SQL("(") + sql.SQL(" or ").join(terms) + sql.SQL(")")


def keep_order(spec: DedupSpec) -> sql.Composed:
    """The keep rule as an ORDER BY, its first row the one kept."""
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(e.column),
                                sql.SQL("desc" if e.descending else "asc"))
        for e in spec.keep)


def key_terms(spec: DedupSpec, of: Callable[[str], sql.Composable]) -> list[sql.Composable]:
    """What a row's key is, NULLs equal (as GROUP BY and IS NOT DISTINCT FROM hold them), `of`
    the row named: the natural key's columns, and each column the alternative key adds where
    the natural key has a NULL (a NULL where it has none)."""
    terms: list[sql.Composable] = [of(k) for k in spec.natural_key]
    if spec.told_apart_by:
        some_null = sql.SQL(" or ").join(sql.SQL("{} is null").format(of(k))
                                         for k in spec.natural_key)
        terms += [sql.SQL("case when {} then {} end").format(some_null, of(c))
                  for c in spec.told_apart_by]
    return terms


@dataclass(frozen=True)
class KeyCounts:
    """The seed's table 2.1 for one table: rows, unique natural keys, NULL-key rows; and the
    keys that have more than one row, with one of them to show."""

    total_rows: int
    unique_rows: int
    """Rows left after deduplication: one per key, plus every NULL-key row unless NULLs are
    equal (nulls: not_distinct)."""
    null_key_rows: int
    duplicated_keys: int = 0
    example: str | None = None
    """One duplicated key, as a row literal."""

    @property
    def duplicate_rows(self) -> int:
        return self.total_rows - self.unique_rows

    @property
    def duplicate_pct(self) -> float | None:
        return _rounded(100 * self.duplicate_rows, self.total_rows, "0.01")

    @property
    def duplication_factor(self) -> float | None:
        return _rounded(self.total_rows, self.unique_rows, "0.1")

    def __add__(self, other: KeyCounts) -> KeyCounts:
        return KeyCounts(self.total_rows + other.total_rows,
                         self.unique_rows + other.unique_rows,
                         self.null_key_rows + other.null_key_rows,
                         self.duplicated_keys + other.duplicated_keys,
                         self.example or other.example)


def _rounded(numerator: int, denominator: int, places: str) -> float | None:
    """numerator / denominator rounded half away from zero, as PostgreSQL's round(numeric)
    rounds it in audit_duplicates, so that both report the same figures."""
    if not denominator:
        return None
    return float((Decimal(numerator) / Decimal(denominator)).quantize(Decimal(places),
                                                                      ROUND_HALF_UP))


def count_keys(relation: Relation, spec: DedupSpec,
               blocks: tuple[int, int] | None = None) -> sql.Composed:
    """KeyCounts' fields, in order, in one GROUP BY on the key columns. `blocks` limits the
    scan to heap blocks [first, last), a TID Range Scan."""
    key = key_terms(spec, sql.Identifier)
    # The groups' columns are renamed, so no key column can be mistaken for the count.
    grouped = [sql.Identifier(f"key_{number}") for number in range(1, len(key) + 1)]
    any_null = sql.SQL(" or ").join(sql.SQL("{} is null").format(column)
                                    for column in grouped[:len(spec.natural_key)])
    null_key_rows = sql.SQL("coalesce(sum(key_rows) filter (where {}), 0)").format(any_null)
    nulls_equal = spec.nulls == NULLS_EQUAL
    null_keys = (sql.SQL("count(*) filter (where {})").format(any_null)
                 if nulls_equal else null_key_rows)
    # A group of NULL-key rows is one duplicated key only where NULLs are equal.
    duplicated = (sql.SQL("key_rows > 1") if nulls_equal
                  else sql.SQL("key_rows > 1 and not ({})").format(any_null))
    where = sql.SQL("")
    if blocks is not None:
        where = sql.SQL("\n    where ctid >= {}::tid and ctid < {}::tid").format(
            sql.Literal(f"({blocks[0]},0)"), sql.Literal(f"({blocks[1]},0)"))
    return sql.SQL(
        "select\n"
        "    coalesce(sum(key_rows), 0)::bigint as total_rows,\n"
        "    (count(*) filter (where not ({any_null})) + {null_keys})::bigint as unique_rows,\n"
        "    {null_key_rows}::bigint as null_key_rows,\n"
        "    count(*) filter (where {duplicated}) as duplicated_keys,\n"
        "    min(row({grouped})::text) filter (where {duplicated}) as example\n"
        "from (\n"
        "    select {key}, count(*)\n"
        "    from {table}{where}\n"
        "    group by {key}\n"
        ") as key_groups ({grouped}, key_rows)"
    ).format(
        any_null=any_null, null_keys=null_keys, null_key_rows=null_key_rows,
        duplicated=duplicated, key=sql.SQL(", ").join(key),
        table=sql.Identifier(relation.schema, relation.name), where=where,
        grouped=sql.SQL(", ").join(grouped),
    )


def group_terms(spec: DedupSpec) -> list[sql.Composable]:
    """What makes rows one key group, as the key groups and the constraint mean it: the key's
    terms, and unless NULLs are equal, a NULL-key row's own tie-breaker."""
    group = key_terms(spec, sql.Identifier)
    if spec.nulls != NULLS_EQUAL:
        group.append(sql.SQL("case when {} then {} end").format(
            sql.SQL(" or ").join(sql.SQL("{} is null").format(sql.Identifier(k))
                                 for k in spec.natural_key), sql.Identifier(spec.tiebreaker)))
    return group


def count_references(relation: Relation, spec: DedupSpec, referenced: Sequence[str],
                     children: Sequence[tuple[Relation, Sequence[str]]]) -> sql.Composed:
    """For each child table and its columns that point at `referenced`: its rows, and how many
    of them point at a row of the table that its keep rule removes (any but the first of its
    key's rows in the keep order). One scan of the table, for every child."""
    pointed = [sql.Identifier(f"referenced_{n}") for n in range(1, len(referenced) + 1)]
    counts = []
    for child, columns in children:
        child_id = sql.Identifier(child.schema, child.name)
        counts.append(sql.SQL(
            "(select count(*) from {child}),"
            " (select count(*) from {child} as c join removed on {join})").format(
            child=child_id,
            join=sql.SQL(" and ").join(sql.SQL("c.{} = removed.{}").format(sql.Identifier(c), p)
                                       for c, p in zip(columns, pointed, strict=True))))
    return sql.SQL(
        "with removed as materialized ("
        "select {pointed_as} from (select {referenced}, row_number() over (partition by {group}"
        " order by {keep}) as dedup_rank from {table}) as ranked where dedup_rank > 1"
        ") select {counts}"
    ).format(
        table=sql.Identifier(relation.schema, relation.name),
        pointed_as=sql.SQL(", ").join(sql.SQL("{} as {}").format(sql.Identifier(r), p)
                                      for r, p in zip(referenced, pointed, strict=True)),
        referenced=sql.SQL(", ").join(map(sql.Identifier, dict.fromkeys(referenced))),
        group=sql.SQL(", ").join(group_terms(spec)),
        keep=keep_order(spec),
        counts=sql.SQL(", ").join(counts))
