"""Facts about live tables, read from PostgreSQL's catalog. Reads only; never writes."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from runner.artifacts import DedupSpec, Relation
from runner.errors import RunnerError


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool
    identity: bool
    generated: bool


@dataclass(frozen=True)
class Index:
    name: str
    method: str
    """What follows the table in pg_get_indexdef: "USING btree (col) [INCLUDE ...] [WHERE ...]"."""
    constraint: str | None
    """The PRIMARY KEY, UNIQUE or EXCLUDE constraint the index backs, if any."""
    constraint_definition: str | None
    key_columns: tuple[str | None, ...]
    """Plain key columns in order; None for an expression."""
    unique: bool
    valid: bool
    partial: bool
    nulls_not_distinct: bool


@dataclass(frozen=True)
class View:
    relation: Relation
    definition: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Grant:
    grantee: str | None
    """None is PUBLIC."""
    privilege: str
    grantable: bool


@dataclass(frozen=True)
class LiveTable:
    relation: Relation
    owner: str
    columns: tuple[Column, ...]
    indexes: tuple[Index, ...]
    foreign_keys: tuple[tuple[str, str], ...]
    """(name, definition) of the constraints by which this table references others."""
    referenced_by: tuple[str, ...]
    """Foreign keys of other tables that point at this one, as table.constraint."""
    views: tuple[View, ...]
    grants: tuple[Grant, ...]
    comment: str | None
    owned_sequences: tuple[tuple[str, str, str], ...]
    """(schema, sequence, column) of the sequences a column of this table owns."""
    triggers: tuple[str, ...]
    row_security: bool
    policies: int
    options: tuple[str, ...]
    kind: str
    materialized_views: tuple[str, ...]
    published: bool
    replica_identity: str

    def column_names(self) -> list[str]:
        return [column.name for column in self.columns]

    def enforcing_index(self, spec: DedupSpec) -> Index | None:
        """A valid unique index that already enforces the natural key as the spec means it."""
        not_null = {column.name for column in self.columns if column.not_null}
        for index in self.indexes:
            if not (index.unique and index.valid and not index.partial):
                continue
            if None in index.key_columns or set(index.key_columns) != set(spec.natural_key):
                continue
            nulls_equal = index.nulls_not_distinct or set(spec.natural_key) <= not_null
            if spec.nulls == "not_distinct" and not nulls_equal:
                continue
            return index
        return None


_TABLE = """
select c.oid, c.relkind, pg_get_userbyid(c.relowner), obj_description(c.oid, 'pg_class'),
       c.relrowsecurity, coalesce(c.reloptions, '{}'), c.relreplident
from pg_class as c
join pg_namespace as n on n.oid = c.relnamespace
where n.nspname = %s and c.relname = %s
"""

_COLUMNS = """
select attname, format_type(atttypid, atttypmod), attnotnull, attidentity <> '', attgenerated <> ''
from pg_attribute
where attrelid = %s and attnum > 0 and not attisdropped
order by attnum
"""

_INDEXES = """
select i.relname,
       -- Cut the known prefix "CREATE [UNIQUE] INDEX <name> ON <schema>.<table> " by its
       -- length, not by searching for " USING ", which a quoted name may contain.
       substr(pg_get_indexdef(x.indexrelid), length(
           'CREATE ' || case when x.indisunique then 'UNIQUE ' else '' end || 'INDEX '
           || quote_ident(i.relname) || ' ON ' || quote_ident(tn.nspname) || '.'
           || quote_ident(t.relname) || ' ') + 1),
       con.conname, pg_get_constraintdef(con.oid),
       array(
           select a.attname
           from unnest(x.indkey::int2[]) with ordinality as k(attnum, position)
           left join pg_attribute as a on a.attrelid = x.indrelid and a.attnum = k.attnum
           where k.position <= x.indnkeyatts
           order by k.position
       ),
       x.indisunique, x.indisvalid, x.indpred is not null or x.indexprs is not null,
       {nulls_not_distinct}
from pg_index as x
join pg_class as i on i.oid = x.indexrelid
join pg_class as t on t.oid = x.indrelid
join pg_namespace as tn on tn.oid = t.relnamespace
left join pg_constraint as con on con.conindid = x.indexrelid and con.conrelid = x.indrelid
    and con.contype in ('p', 'u', 'x')
where x.indrelid = %s
order by i.relname
"""

_FOREIGN_KEYS = """
select conname, pg_get_constraintdef(oid)
from pg_constraint
where conrelid = %s and contype = 'f'
order by conname
"""

_REFERENCED_BY = """
select conrelid::regclass::text || '.' || quote_ident(conname)
from pg_constraint
where confrelid = %s and contype = 'f' and conrelid <> confrelid
order by 1
"""

_DEPENDENT_VIEWS = """
select distinct n.nspname, v.relname, pg_get_viewdef(v.oid), coalesce(v.reloptions, '{}'),
       v.relkind
from pg_depend as d
join pg_rewrite as r on r.oid = d.objid
join pg_class as v on v.oid = r.ev_class
join pg_namespace as n on n.oid = v.relnamespace
where d.classid = 'pg_rewrite'::regclass and d.refobjid = %s and v.oid <> %s
order by 1, 2
"""

_GRANTS = """
select case when a.grantee = 0 then null else pg_get_userbyid(a.grantee) end,
       a.privilege_type, a.is_grantable
from pg_class as c, aclexplode(c.relacl) as a
where c.oid = %s and a.grantee <> c.relowner
order by 1 nulls first, 2
"""

_OWNED_SEQUENCES = """
select sn.nspname, s.relname, a.attname
from pg_depend as d
join pg_class as s on s.oid = d.objid and s.relkind = 'S'
join pg_namespace as sn on sn.oid = s.relnamespace
join pg_attribute as a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
where d.classid = 'pg_class'::regclass and d.refobjid = %s and d.deptype in ('a', 'i')
order by 1
"""

_TRIGGERS = "select tgname from pg_trigger where tgrelid = %s and not tgisinternal order by 1"
_POLICIES = "select count(*) from pg_policy where polrelid = %s"
_PUBLISHED = "select exists (select from pg_publication_rel where prrelid = %s)"


def server_version(conn: psycopg.Connection) -> int:
    return conn.info.server_version


def read_live_table(conn: psycopg.Connection, relation: Relation) -> LiveTable:
    row = conn.execute(_TABLE, (relation.schema, relation.name)).fetchone()
    if row is None:
        raise RunnerError(f"table {relation} does not exist: check the source's schema and name "
                          "in the dbt YAML (var breezeway_schema) and the database you connect to")
    oid, kind, owner, comment, row_security, options, replica_identity = row
    nulls_not_distinct = "x.indnullsnotdistinct" if server_version(conn) >= 150000 else "false"
    indexes = conn.execute(
        _INDEXES.format(nulls_not_distinct=nulls_not_distinct), (oid,)
    ).fetchall()
    views = conn.execute(_DEPENDENT_VIEWS, (oid, oid)).fetchall()
    return LiveTable(
        relation=relation,
        owner=owner,
        columns=tuple(Column(*r) for r in conn.execute(_COLUMNS, (oid,))),
        indexes=tuple(
            Index(
                name=r[0], method=r[1], constraint=r[2], constraint_definition=r[3],
                key_columns=tuple(r[4]), unique=r[5], valid=r[6], partial=r[7],
                nulls_not_distinct=r[8],
            )
            for r in indexes
        ),
        foreign_keys=tuple(tuple(r) for r in conn.execute(_FOREIGN_KEYS, (oid,))),
        referenced_by=tuple(r[0] for r in conn.execute(_REFERENCED_BY, (oid,))),
        views=tuple(
            View(Relation(r[0], r[1]), r[2], tuple(r[3])) for r in views if r[4] == "v"
        ),
        materialized_views=tuple(f"{r[0]}.{r[1]}" for r in views if r[4] != "v"),
        grants=tuple(Grant(*r) for r in conn.execute(_GRANTS, (oid,))),
        comment=comment,
        owned_sequences=tuple(tuple(r) for r in conn.execute(_OWNED_SEQUENCES, (oid,))),
        triggers=tuple(r[0] for r in conn.execute(_TRIGGERS, (oid,))),
        row_security=row_security,
        policies=conn.execute(_POLICIES, (oid,)).fetchone()[0],
        options=tuple(options),
        kind=kind,
        published=conn.execute(_PUBLISHED, (oid,)).fetchone()[0],
        replica_identity=replica_identity,
    )


def relation_columns(conn: psycopg.Connection, relation: Relation) -> list[tuple[str, str]]:
    """(name, type) of a table's columns in order; empty when it does not exist."""
    return conn.execute(
        """
        select a.attname, format_type(a.atttypid, a.atttypmod)
        from pg_attribute as a
        join pg_class as c on c.oid = a.attrelid
        join pg_namespace as n on n.oid = c.relnamespace
        where n.nspname = %s and c.relname = %s and a.attnum > 0 and not a.attisdropped
        order by a.attnum
        """,
        (relation.schema, relation.name),
    ).fetchall()
