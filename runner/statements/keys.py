"""A table's rows counted by natural key, with the NULL semantics its YAML declares: one query for
`runner audit` before the swap and `runner verify` after it, meaning what dbt's key groups and
the natural key's constraint mean.

GROUP BY puts NULLs together, so a group whose key has a NULL is one key only when NULLs are
equal (`nulls: not_distinct`); under every other policy each of its rows is a key of its own,
as in a plain UNIQUE constraint and in the dbt models.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, Relation

NULLS_EQUAL = "not_distinct"


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
    key = [sql.Identifier(column) for column in spec.natural_key]
    # The groups' columns are renamed, so no key column can be mistaken for the count.
    grouped = [sql.Identifier(f"key_{number}") for number in range(1, len(key) + 1)]
    any_null = sql.SQL(" or ").join(sql.SQL("{} is null").format(column) for column in grouped)
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
