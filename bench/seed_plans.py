"""The incident documents' own plans, as written, for the benchmark to run side by side.

Each is the documents' SQL with the table's name, natural key and keep order put in; nothing
else is changed, including what they get wrong (both skip or merge NULL keys their way).
"""

from __future__ import annotations

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, Relation


def _keys(spec: DedupSpec) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(k) for k in spec.natural_key)


def _order(spec: DedupSpec) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(e.column), sql.SQL("desc" if e.descending
                                                                    else "asc"))
        for e in spec.keep)


def path_a(table: Relation, spec: DedupSpec) -> list[sql.Composed]:
    """000_648f24a0cfaa4c82.txt, Path A, steps 3 and 4: archive the duplicates found by ranked
    ctids, DELETE ... USING the ranking, then CREATE UNIQUE INDEX CONCURRENTLY. Each statement
    on its own, as pasted into a console (CONCURRENTLY cannot run in a transaction)."""
    t = sql.Identifier(table.schema, table.name)
    archive = sql.Identifier(table.schema, f"{table.name}_dupes_archived")
    not_null = sql.SQL(" and ").join(
        sql.SQL("{} is not null").format(sql.Identifier(k)) for k in spec.natural_key)
    ranked = sql.SQL(
        "with ranked as (select ctid, row_number() over (partition by {keys}"
        " order by {order}, ctid asc) as rn from {t} where {not_null})"
    ).format(keys=_keys(spec), order=_order(spec), t=t, not_null=not_null)
    return [
        sql.SQL("create table if not exists {} as select * from {} where false").format(
            archive, t),
        sql.SQL("{ranked}, dupes as (select ctid from ranked where rn > 1)"
                " insert into {archive} select b.* from {t} as b join dupes as d"
                " on b.ctid = d.ctid").format(ranked=ranked, archive=archive, t=t),
        sql.SQL("{ranked} delete from {t} as b using ranked as r"
                " where b.ctid = r.ctid and r.rn > 1").format(ranked=ranked, t=t),
        sql.SQL("create unique index concurrently if not exists {} on {} ({})").format(
            sql.Identifier(f"ux_{table.name}_key"), t, _keys(spec)),
    ]


def seed_003(table: Relation, spec: DedupSpec) -> list[sql.Composed]:
    """003_9b81cec79fade74f.txt, Part 4.2 steps 2, 5, 6 and 7 in one transaction (Part 4.3):
    DISTINCT ON into a temp table, TRUNCATE, reinsert, add the constraint. Step 4, the full
    backup copy, is "optional" there and left out, as in the timing the issue quotes."""
    t = sql.Identifier(table.schema, table.name)
    unique = sql.Identifier(f"{table.name}_unique")
    return [
        sql.SQL("create temp table {} as select distinct on ({keys}) * from {t}"
                " order by {keys}, {order}").format(unique, keys=_keys(spec), t=t,
                                                    order=_order(spec)),
        sql.SQL("truncate table {}").format(t),
        sql.SQL("insert into {} select * from {}").format(t, unique),
        sql.SQL("alter table {} add constraint {} unique ({})").format(
            t, sql.Identifier(f"uq_{table.name}_natural_key"), _keys(spec)),
    ]
