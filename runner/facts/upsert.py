"""The statement the ETL should load a table with: an upsert on the table's natural key.

The incident's ETL ran `INSERT ... ON CONFLICT DO NOTHING` on tables that had no unique
constraint, so nothing ever conflicted. Once a constraint enforces the natural key (`runner swap`
adds it), `INSERT ... ON CONFLICT (<key>) DO UPDATE` names it as the arbiter: a row whose key is
already there updates that row instead of adding another.

`read_upsert_table` reads the catalog; `choose_arbiter` and `build_upsert` are pure;
`upsert_statement` (a natural key of your own) and `manifest_upsert_statement` (the key declared
in the dbt YAML) put them together for ETL code that uses psycopg; `manifest_upserts` too, for a
table whose alternative key needs one statement per shape of key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.abc import AdaptContext

from runner.declaration import select
from runner.declaration.artifacts import (
    DedupTarget,
    KeepColumn,
    Relation,
    load_targets,
    target_names,
)
from runner.declaration.names import null_key_index_name
from runner.errors import RunnerError
from runner.server.catalog import read_live_table
from runner.statements.keys import KeyShape, beats, key_shapes


@dataclass(frozen=True)
class TableColumn:
    name: str
    generated_by_table: bool
    """Identity, serial (a nextval default) or generated: the table fills it, not the ETL."""


@dataclass(frozen=True)
class KeyElement:
    column: str | None
    """The column, when the element is a plain column; None for an expression."""
    expression: str
    """The element as pg_get_indexdef prints it."""


@dataclass(frozen=True)
class UniqueIndex:
    """A unique index ON CONFLICT can arbitrate on: valid and not deferrable."""

    name: str
    elements: tuple[KeyElement, ...]
    reads: frozenset[str]
    """The table columns its key elements read, plain or inside expressions."""
    predicate: str | None
    """The WHERE of a partial index, as pg_get_expr prints it."""


@dataclass(frozen=True)
class UpsertTable:
    relation: Relation
    columns: tuple[TableColumn, ...]
    unique_indexes: tuple[UniqueIndex, ...]


_OID = """
select c.oid from pg_class as c join pg_namespace as n on n.oid = c.relnamespace
where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p')
"""

_COLUMNS = """
select a.attname,
       a.attidentity <> '' or a.attgenerated <> ''
       or coalesce(starts_with(pg_get_expr(d.adbin, d.adrelid), 'nextval('), false)
from pg_attribute as a
left join pg_attrdef as d on d.adrelid = a.attrelid and d.adnum = a.attnum
where a.attrelid = %s and a.attnum > 0 and not a.attisdropped
order by a.attnum
"""

# PostgreSQL has no function that lists the columns an index expression reads; its stored
# node tree names each one as ":varattno <attnum>", the form every version since 8.3 writes.
_UNIQUE_INDEXES = """
select i.relname,
       array(select a.attname
             from generate_series(1, x.indnkeyatts) as k
             left join pg_attribute as a on a.attrelid = x.indrelid and a.attnum = x.indkey[k - 1]
             order by k),
       array(select pg_get_indexdef(x.indexrelid, k, true)
             from generate_series(1, x.indnkeyatts) as k order by k),
       array(select a.attname
             from regexp_matches(coalesce(x.indexprs::text, ''), ':varattno (\\d+)', 'g') as m
             join pg_attribute as a on a.attrelid = x.indrelid and a.attnum = m[1]::int),
       pg_get_expr(x.indpred, x.indrelid, true)
from pg_index as x
join pg_class as i on i.oid = x.indexrelid
where x.indrelid = %s and x.indisunique and x.indisvalid and x.indimmediate
order by i.relname
"""


def read_upsert_table(conn: psycopg.Connection, relation: Relation) -> UpsertTable:
    row = conn.execute(_OID, (relation.schema, relation.name)).fetchone()
    if row is None:
        raise RunnerError(f"table {relation} does not exist: check the schema and table name, "
                          "and the database you connect to")
    oid = row[0]
    indexes = []
    for name, columns, expressions, expression_columns, predicate in conn.execute(
        _UNIQUE_INDEXES, (oid,)
    ):
        indexes.append(UniqueIndex(
            name=name,
            elements=tuple(KeyElement(c, e) for c, e in zip(columns, expressions, strict=True)),
            reads=frozenset(c for c in columns + expression_columns if c is not None),
            predicate=predicate,
        ))
    return UpsertTable(
        relation=relation,
        columns=tuple(TableColumn(*r) for r in conn.execute(_COLUMNS, (oid,))),
        unique_indexes=tuple(indexes),
    )


def choose_arbiter(table: UpsertTable, natural_key: Sequence[str]) -> UniqueIndex:
    """The unique index whose key reads exactly the natural key's columns: a full index on
    plain columns first, then one on expressions, then a partial one; by name among equals."""
    candidates = [i for i in table.unique_indexes if i.reads == frozenset(natural_key)]
    if not candidates:
        raise _not_enforced(table.relation, natural_key)
    return min(candidates, key=lambda i: (
        i.predicate is not None, any(e.column is None for e in i.elements), i.name))


def _not_enforced(relation: Relation, natural_key: Sequence[str]) -> RunnerError:
    return RunnerError(f"no unique constraint or index on {relation} enforces its natural key "
                       f"({', '.join(natural_key)}) yet, so ON CONFLICT has nothing to match: "
                       "run `runner swap` first")


class _Identifier(sql.Identifier):
    """A name in a statement that takes %(name)s parameters, where psycopg reads every % as
    the start of one: a % in the name is doubled."""

    def as_bytes(self, context: AdaptContext | None = None) -> bytes:
        return super().as_bytes(context).replace(b"%", b"%%")


# How the drivers people load tables with write a parameter: psycopg's %(name)s, numbered $1
# (asyncpg, node-postgres, pgx, PREPARE), JDBC's ?, and :name (SQLAlchemy's text(), JDBI).
PLACEHOLDER_STYLES = ("psycopg", "numbered", "jdbc", "named")
_NAMED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class _Style:
    name: str = "psycopg"

    def identifier(self, *names: str) -> sql.Identifier:
        return _Identifier(*names) if self.name == "psycopg" else sql.Identifier(*names)

    def deparsed(self, text: str) -> sql.SQL:
        """SQL the server printed; for psycopg, its % doubled, as % starts a parameter."""
        return sql.SQL(text.replace("%", "%%") if self.name == "psycopg" else text)

    def parameter(self, relation: Relation, column: str, number: int) -> sql.Composable:
        if self.name == "numbered":
            return sql.SQL(f"${number}")
        if self.name == "jdbc":
            return sql.SQL("?")
        if self.name == "named":
            if not _NAMED.fullmatch(column):
                raise RunnerError(f"column {column!r} of {relation} cannot be a :name "
                                  "parameter: use --placeholders numbered or jdbc")
            return sql.SQL(f":{column}")
        if ")" in column:
            raise RunnerError(f"column {column!r} of {relation} contains ')', which a psycopg "
                              "%(name)s placeholder cannot: rename the column")
        return sql.Placeholder(column)


def _check_touch(table: UpsertTable, natural_key: Sequence[str], touch: Sequence[str]) -> None:
    generated = {c.name for c in table.columns if c.generated_by_table}
    for column in touch:
        if column not in {c.name for c in table.columns}:
            raise RunnerError(f"--touch {column}: {table.relation} has no such column; "
                              f"its columns: {', '.join(c.name for c in table.columns)}")
        if column in generated:
            raise RunnerError(f"--touch {column}: {table.relation} fills that column itself "
                              "(identity, serial or generated): touch a column the ETL writes")
        if column in natural_key:
            raise RunnerError(f"--touch {column}: that column is in the natural key, which an "
                              "upsert never changes: touch another column")


def _replaces(table: UpsertTable, keep: Sequence[KeepColumn],
              style: _Style) -> sql.Composed | bool:
    """Whether a row sent again replaces the one the table holds for its key, as the keep rule
    chooses between them: True always (no keep rule; or one led by a column the table numbers
    itself, descending, so a row sent later always comes first); False never (the same,
    ascending: the earliest stays); else the condition, on `excluded` and the table's row."""
    if not keep:
        return True
    if keep[0].column in {c.name for c in table.columns if c.generated_by_table}:
        return keep[0].descending
    return beats(keep, lambda c: sql.SQL("excluded.{}").format(style.identifier(c)),
                 lambda c: sql.SQL("{}.{}").format(style.identifier(table.relation.name),
                                                   style.identifier(c)))


def parameters(table: UpsertTable, touch: Sequence[str] = ()) -> list[str]:
    """The columns the upsert takes a parameter for, in the order of its placeholders."""
    return [c.name for c in table.columns if not c.generated_by_table and c.name not in touch]


def build_upsert(table: UpsertTable, natural_key: Sequence[str], arbiter: UniqueIndex,
                 touch: Sequence[str] = (), keep: Sequence[KeepColumn] = (),
                 placeholders: str = "psycopg") -> sql.Composed:
    """INSERT every column the table does not fill itself, one parameter each (psycopg's
    %(column)s, or as `placeholders` says, in the order `parameters` gives); on a conflict with
    the arbiter, set every non-key column from the new row, and each `touch` column to now()
    (on insert too), where the keep rule prefers the new row (see _replaces)."""
    _check_touch(table, natural_key, touch)
    style = _Style(placeholders)
    inserted = [c.name for c in table.columns if not c.generated_by_table]
    numbers = {c: n for n, c in enumerate(parameters(table, touch), 1)}
    values = [sql.SQL("now()") if c in touch else style.parameter(table.relation, c, numbers[c])
              for c in inserted]
    target = sql.SQL(", ").join(
        style.identifier(e.column) if e.column is not None
        else sql.SQL("({})").format(style.deparsed(e.expression))
        for e in arbiter.elements
    )
    predicate = (sql.SQL(" where {}").format(style.deparsed(arbiter.predicate))
                 if arbiter.predicate is not None else sql.SQL(""))
    assignments = [
        sql.SQL("{} = {}").format(
            style.identifier(c),
            sql.SQL("now()") if c in touch
            else sql.SQL("excluded.{}").format(style.identifier(c)),
        )
        for c in inserted if c not in natural_key
    ]
    replaces = _replaces(table, keep, style)
    if not assignments or replaces is False:
        action = sql.SQL("do nothing")
    elif replaces is True:
        action = sql.SQL("do update set {}").format(sql.SQL(", ").join(assignments))
    else:
        action = sql.SQL("do update set {}\nwhere {}").format(sql.SQL(", ").join(assignments),
                                                              replaces)
    return sql.SQL("insert into {table} ({columns})\nvalues ({values})\n"
                   "on conflict ({target}){predicate}\n{action}").format(
        table=style.identifier(table.relation.schema, table.relation.name),
        columns=sql.SQL(", ").join(style.identifier(c) for c in inserted),
        values=sql.SQL(", ").join(values),
        target=target,
        predicate=predicate,
        action=action,
    )


def upsert_statement(conn: psycopg.Connection, schema: str, table: str,
                     natural_key: Sequence[str], touch: Sequence[str] = ()) -> sql.Composed:
    """The upsert for a table and a natural key of your choosing, on the index that enforces it.

    Run it with `cursor.executemany(statement, rows)`, each row a dict keyed by column name.
    """
    facts = read_upsert_table(conn, Relation(schema, table))
    return build_upsert(facts, natural_key, choose_arbiter(facts, natural_key), touch)


@dataclass(frozen=True)
class ShapedUpsert:
    """The upsert for the rows of one shape of key: ON CONFLICT DO UPDATE arbitrates one unique
    index, and where the natural key has a NULL an alternative key has indexes of its own."""

    rows: str
    """Which rows it is for, said in words."""
    statement: sql.Composed
    shape: KeyShape
    parameters: tuple[str, ...] = ()
    """The columns it takes a parameter for, in the order of its placeholders."""

    def takes(self, row: Mapping[str, object]) -> bool:
        """Whether the ETL sends `row`, a dict keyed by column name, with this statement."""
        return all((row[k] is None) == (k in self.shape.nulls) for k in self.shape.checked)


def _shape_words(shape: KeyShape) -> str:
    said = []
    for columns, what in (([k for k in shape.checked if k in shape.nulls], "NULL"),
                          ([k for k in shape.checked if k not in shape.nulls], "not NULL")):
        if columns:
            said.append(f"{', '.join(columns)} {'is' if len(columns) == 1 else 'are'} {what}")
    return "rows whose " + " and ".join(said)


def target_upserts(conn: psycopg.Connection, target: DedupTarget, touch: Sequence[str] = (),
                   placeholders: str = "psycopg") -> list[ShapedUpsert]:
    """The upserts on the constraint that enforces the natural key as the dbt YAML declares it,
    NULL semantics included: a key enforced only in part (a partial index, or NULLs distinct
    where the YAML says not_distinct) is not enforced, and `runner swap` adds the constraint.
    One statement, but for an alternative key one per shape of key: the constraint's for the
    rows without a NULL in the natural key, then a partial index's for each shape with one."""
    live = read_live_table(conn, target.live)
    enforcing = live.enforcing_index(target.spec)
    if enforcing is None:
        raise _not_enforced(target.live, target.spec.natural_key)
    partial = live.null_key_indexes(target.spec) if not enforcing.nulls_not_distinct else []
    if partial and not target.spec.alternative_key:
        raise RunnerError(
            f"before PostgreSQL 15, {target.live} keeps its key unique with NULLs equal only by "
            f"{enforcing.name} and the partial unique indexes "
            f"{', '.join(i.name for i in partial)}, and ON CONFLICT DO UPDATE arbitrates one "
            "index: insert with ON CONFLICT DO NOTHING, which they all arbitrate, or upgrade "
            "to 15, where one UNIQUE NULLS NOT DISTINCT constraint can")
    facts = read_upsert_table(conn, target.live)
    arbiters = {i.name: i for i in facts.unique_indexes}
    if enforcing.name not in arbiters:
        raise RunnerError(f"{enforcing.name} on {target.live} is deferrable, and ON CONFLICT "
                          "cannot arbitrate on a deferrable constraint: make it NOT DEFERRABLE")
    shapes = key_shapes(target.spec, {c.name for c in live.columns if c.not_null})
    names = [enforcing.name, *(null_key_index_name(target.live.name, number)
                               for number in range(1, len(shapes)))]
    if not target.spec.alternative_key:
        # One statement, whatever NULLs a row's key has.
        shapes, names = [KeyShape((), target.spec.natural_key, ())], names[:1]
    return [ShapedUpsert("every row" if len(shapes) == 1 else _shape_words(shape),
                         build_upsert(facts, (*shape.compared, *shape.nulls), arbiters[name],
                                      touch, target.spec.keep, placeholders), shape,
                         tuple(parameters(facts, touch)))
            for shape, name in zip(shapes, names, strict=True)]


def target_upsert_statement(conn: psycopg.Connection, target: DedupTarget,
                            touch: Sequence[str] = ()) -> sql.Composed:
    """The one upsert for a table whose every row one constraint arbitrates (see
    target_upserts for one with an alternative key)."""
    upserts = target_upserts(conn, target, touch)
    if len(upserts) > 1:
        raise RunnerError(f"{target.live} has an alternative key, and each shape of its keys "
                          "has a unique index of its own to arbitrate: use manifest_upserts, "
                          "one statement per shape")
    return upserts[0].statement


def one_target(targets: Sequence[DedupTarget], name: str) -> DedupTarget:
    """The target a name means, in any of the forms `--select` takes."""
    matches = select.chosen(
        list(targets), [name], target_names,
        lambda name, known: f"{name}: no deduplicated table of that name in dbt's manifest; "
        f"known: {', '.join(t.live.name for t in known)}")
    if len(matches) > 1:
        raise RunnerError(f"{name} names several tables ({', '.join(str(t.live) for t in matches)})"
                          ": name one as schema.table")
    return matches[0]


def manifest_upsert_statement(conn: psycopg.Connection, target_dir: Path, table: str,
                              touch: Sequence[str] = ()) -> sql.Composed:
    """The upsert for a table the dbt project deduplicates, its natural key read from
    `target_dir/manifest.json` (run `dbt parse` or `dbt build` first)."""
    return target_upsert_statement(conn, one_target(load_targets(target_dir), table), touch)


def manifest_upserts(conn: psycopg.Connection, target_dir: Path, table: str,
                     touch: Sequence[str] = ()) -> list[ShapedUpsert]:
    """The upserts for a table the dbt project deduplicates, one per shape of key for one with
    an alternative key (see target_upserts); each `takes` the rows that are its own."""
    return target_upserts(conn, one_target(load_targets(target_dir), table), touch)
