"""The statements `runner suggest-keys` reads a table with: a sample of it, and per candidate
key how its rows group and whether the other columns are the same within each group. Built
from names alone; runner.facts.suggest runs them.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, Relation
from runner.statements.keys import key_terms

SAMPLE = "dedup_key_sample"


def take_sample(relation: Relation, percent: float | None) -> list[sql.Composed]:
    """The rows to look at first, in a temporary table: a repeatable Bernoulli sample of
    `percent` of them, or all when None."""
    sampled = sql.SQL("") if percent is None else sql.SQL(
        " tablesample bernoulli ({}) repeatable (0)").format(sql.Literal(percent))
    return [
        sql.SQL("drop table if exists pg_temp.{}").format(sql.Identifier(SAMPLE)),
        sql.SQL("create temp table {} as select * from {}{}").format(
            sql.Identifier(SAMPLE), sql.Identifier(relation.schema, relation.name), sampled),
    ]


def _as_text(columns: Sequence[str]) -> sql.Composed:
    return sql.SQL("row({})::text").format(sql.SQL(", ").join(map(sql.Identifier, columns)))


def _any_null(columns: Sequence[str]) -> sql.Composed:
    return sql.SQL("({})").format(sql.SQL(" or ").join(
        sql.SQL("{} is null").format(sql.Identifier(c)) for c in columns))


def groups_within(source: sql.Composable, key: Sequence[str],
                  others: Sequence[str]) -> sql.Composed:
    """How `source`'s rows group by `key`: rows, rows whose key has a NULL, keys without one,
    keys with one (NULLs equal); then, per column of `others`, the distinct (key, column)
    pairs among the rows whose key has no NULL, and among those whose key has one. A column is
    the same within each group exactly where its pairs are as many as the keys."""
    null = _any_null(key)
    pairs = [sql.SQL("count(distinct {}) filter (where {}{})").format(
                 _as_text([*key, other]), sql.SQL("" if with_null else "not "), null)
             for with_null in (False, True) for other in others]
    return sql.SQL(
        "select count(*), count(*) filter (where {null}),"
        " count(distinct {key}) filter (where not {null}),"
        " count(distinct {key}) filter (where {null}){pairs} from {source}"
    ).format(null=null, key=_as_text(key), source=source,
             pairs=sql.SQL("").join(sql.SQL(", {}").format(p) for p in pairs))


def alike_within(source: sql.Composable, key: Sequence[str], extra: str,
                 others: Sequence[str]) -> sql.Composed:
    """Among the rows whose `key` has a NULL, grouped by it and `extra` (NULLs equal): the
    groups, then per column of `others` the distinct (key, extra, column) triples."""
    null = _any_null(key)
    return sql.SQL("select count(distinct {}) filter (where {}){} from {}").format(
        _as_text([*key, extra]), null, sql.SQL("").join(
            sql.SQL(", count(distinct {}) filter (where {})").format(
                _as_text([*key, extra, other]), null) for other in others), source)


def widths(source: sql.Composable, columns: Sequence[str]) -> sql.Composed:
    """Each column's average width in bytes, in order: a narrow key makes a small index."""
    return sql.SQL("select {} from {}").format(sql.SQL(", ").join(
        sql.SQL("coalesce(avg(pg_column_size({})), 0)::float8").format(sql.Identifier(c))
        for c in columns), source)


def sample() -> sql.Identifier:
    return sql.Identifier("pg_temp", SAMPLE)


def differing_groups(relation: Relation, spec: DedupSpec, others: Sequence[str]) -> sql.Composed:
    """The key groups (under the spec's NULL semantics) whose rows differ in any of `others`,
    and one such key, as a row literal: none where the key is a key of these rows."""
    key = key_terms(spec, sql.Identifier)
    # Where NULLs are not equal, the rows whose key has one are each a key of their own.
    own = sql.SQL("") if spec.nulls == "not_distinct" else sql.SQL(" where not {}").format(
        _any_null(spec.natural_key))
    return sql.SQL(
        "select count(*), min(example) from (select row({key})::text as example from {table}"
        "{own} group by {key} having count(distinct {others}) > 1) as differing"
    ).format(key=sql.SQL(", ").join(key), table=sql.Identifier(relation.schema, relation.name),
             own=own, others=_as_text(others))
