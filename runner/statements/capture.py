"""Change capture: every write to a live table, from `runner capture` until it is no longer needed.

A capture is a trigger on the live table that copies every inserted, updated and deleted row,
as a value of the table's own row type, with the writer's transaction id, into a log table in
the archive schema; a TRUNCATE is logged too, as one entry. Its function runs with the rights
of the role that installed it, so that any role allowed to write the table can go on writing
it, whatever it may do in the archive schema.

A capture has two lives:
  before the swap  `runner capture`, run before `dbt build`, starts it on the original table;
                   the swap replays it into the new table (below), then ends it;
  since the swap   the swap starts one on the new table in its own transaction, so a rollback
                   knows every row the ETL inserted, updated and deleted since
                   (runner.statements.restore);
                   it ends with the rollback, `runner capture --stop` or `runner cleanup`.
A registry table in the archive schema says which capture watches which table.

Replaying one batch of a capture into the new table of a swap, as a set:
  0. changes the build already saw (their transaction is visible in its snapshot) are skipped;
  1. keys to rescan: a kept row was deleted, or its key or keep columns changed, or a changed
     row's key has no kept row; only a scan of the live table can say which row of that key is
     now the one to keep (never under the lock);
  2. rows to keep: the latest version of each changed row that still exists, the best per key
     under the keep rule; each replaces the kept row of its key if it beats it, or fills the
     key if none is kept;
  3. the batch leaves the log, in the same transaction.
Every statement here is built from facts alone; runner.jobs.swap runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, Relation
from runner.declaration.names import pg_name
from runner.server.catalog import Column
from runner.statements.keys import (
    KeyShape,
    beats,
    group_terms,
    keep_order,
    key_shapes,
    key_terms,
    nulls_exactly,
    shape_matches,
)

TRIGGER = "dedup_capture"
TRUNCATE_TRIGGER = "dedup_capture_truncate"
TRIGGERS = (TRIGGER, TRUNCATE_TRIGGER)
REGISTRY = "captures"
BATCH_ROWS = 50_000
# Said on the archive schema when the runner creates it, so that stopping the last capture
# may drop the schema it created, and never one a user made.
SCHEMA_COMMENT = "Created by runner: what the swaps keep, and the logs of their captures."
# The temporary table in which a swap counts, per table, the rows the capture's log says were
# written since the build (inserted minus deleted) and the rows of the new table.
COUNTS = "dedup_counts"


@dataclass(frozen=True)
class Capture:
    live: Relation
    log: Relation
    function: Relation
    since_swap_of: str | None = None
    """The archive table of the swap this capture follows, for its rollback; None before."""

    @classmethod
    def before_swap(cls, live: Relation, archive_schema: str) -> Capture:
        return cls(live, Relation(archive_schema, pg_name(live.schema, live.name, "changes")),
                   Relation(archive_schema, pg_name(live.schema, live.name, "capture")))

    @classmethod
    def since_swap(cls, live: Relation, archive: Relation) -> Capture:
        return cls(live, Relation(archive.schema, pg_name(archive.name, "changes")),
                   Relation(archive.schema, pg_name(archive.name, "capture")), archive.name)


def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def ensure_schema(archive_schema: str) -> sql.Composed:
    """The archive schema, created (and marked as the runner's) only where there is none."""
    body = sql.SQL(
        "begin if not exists (select from pg_namespace where nspname = {name}) then"
        " create schema {schema}; comment on schema {schema} is {comment}; end if; end"
    ).format(name=sql.Literal(archive_schema), schema=sql.Identifier(archive_schema),
             comment=sql.Literal(SCHEMA_COMMENT))
    return sql.SQL("do {}").format(sql.Literal(body.as_string()))


def registry_table(archive_schema: str) -> sql.Composed:
    return sql.SQL(
        "create table if not exists {} (live_schema text not null, live_table text not null,"
        " log_table text not null, function_name text not null, since_swap_of text,"
        " xid xid8 not null, started_at timestamptz not null default now(),"
        " primary key (live_schema, live_table))"
    ).format(sql.Identifier(archive_schema, REGISTRY))


REMOVING_IN_PLACE = "dedup_runner.removing_in_place"
"""A setting an in-place run turns on, for its own transaction, while it moves duplicates to
its archive: the capture leaves those deletes out of its log, which then holds the ETL's writes
alone, and the cut-over counts them from the archive instead of scanning one log row per removed
row under the lock."""


def trigger_function(capture: Capture) -> sql.Composed:
    """The capture's trigger function: each row the ETL writes, as it was and as it is."""
    body = sql.SQL(
        "begin if tg_op = 'DELETE' and current_setting({removing}, true) = 'on' then"
        " return null; end if; insert into {log} (op, old_row, new_row) values (left(tg_op, 1),"
        " case when tg_op in ('UPDATE', 'DELETE') then old end,"
        " case when tg_op in ('INSERT', 'UPDATE') then new end); return null; end"
    ).format(log=_id(capture.log), removing=sql.Literal(REMOVING_IN_PLACE))
    # SECURITY DEFINER: the ETL's role needs no right in the archive schema; the fixed
    # search_path keeps the function from running anything a writer's path could offer.
    return sql.SQL(
        "create or replace function {}() returns trigger language plpgsql security definer"
        " set search_path = pg_catalog, pg_temp as {}"
    ).format(_id(capture.function), sql.Literal(body.as_string()))


def install(capture: Capture) -> list[sql.Composed]:
    """Log table, trigger function, triggers and registry entry, in an existing archive schema
    with its registry. The triggers need a short SHARE ROW EXCLUSIVE on the table."""
    live, log = _id(capture.live), _id(capture.log)
    return [
        # A log without its trigger is a leftover, incomplete by definition: start afresh.
        sql.SQL("drop table if exists {}").format(log),
        # Rows as values of the live table's own type: replayed exactly, no text round trip.
        sql.SQL(
            "create table {log} (change_id bigint generated always as identity primary key,"
            " op \"char\" not null, xid xid8 not null default pg_current_xact_id(),"
            " old_row {live}, new_row {live})"
        ).format(log=log, live=live),
        trigger_function(capture),
        *(sql.SQL("drop trigger if exists {} on {}").format(sql.Identifier(name), live)
          for name in TRIGGERS),
        sql.SQL(
            "create trigger {} after insert or update or delete on {} for each row"
            " execute function {}()"
        ).format(sql.Identifier(TRIGGER), live, _id(capture.function)),
        # TRUNCATE fires no row trigger: it is logged as one entry, which stops any replay.
        sql.SQL(
            "create trigger {} after truncate on {} for each statement execute function {}()"
        ).format(sql.Identifier(TRUNCATE_TRIGGER), live, _id(capture.function)),
        # Always, not only in origin sessions: rows a logical replication subscription applies
        # (session_replication_role = replica) are writes to capture too.
        *(sql.SQL("alter table {} enable always trigger {}").format(live, sql.Identifier(name))
          for name in TRIGGERS),
        sql.SQL(
            "insert into {} (live_schema, live_table, log_table, function_name, since_swap_of,"
            " xid) values ({}, {}, {}, {}, {}, pg_current_xact_id())"
            " on conflict (live_schema, live_table) do update set"
            " log_table = excluded.log_table, function_name = excluded.function_name,"
            " since_swap_of = excluded.since_swap_of, xid = excluded.xid,"
            " started_at = excluded.started_at"
        ).format(sql.Identifier(capture.log.schema, REGISTRY), sql.Literal(capture.live.schema),
                 sql.Literal(capture.live.name), sql.Literal(capture.log.name),
                 sql.Literal(capture.function.name), sql.Literal(capture.since_swap_of)),
    ]


def remove(capture: Capture, table: Relation | None = None) -> list[sql.Composed]:
    """Triggers, function, log and registry entry; `table` is where the triggers now are, or
    None when that table is gone."""
    triggers = [sql.SQL("drop trigger if exists {} on {}").format(
        sql.Identifier(name), _id(table)) for name in TRIGGERS] if table else []
    return [
        *triggers,
        sql.SQL("drop table if exists {}").format(_id(capture.log)),
        sql.SQL("drop function if exists {}()").format(_id(capture.function)),
        sql.SQL("delete from {} where live_schema = {} and live_table = {}").format(
            sql.Identifier(capture.log.schema, REGISTRY), sql.Literal(capture.live.schema),
            sql.Literal(capture.live.name)),
    ]


def drop_if_unused(archive_schema: str) -> list[sql.Composed]:
    """What the last capture leaves: the registry once empty, then the archive schema if the
    runner created it and nothing else is in it."""
    return [sql.SQL(
        "do $$ begin"
        " if not exists (select from {registry}) then drop table {registry}; end if;"
        " if not exists (select from pg_class where relnamespace = {schema}::regnamespace)"
        " and not exists (select from pg_proc where pronamespace = {schema}::regnamespace)"
        " and not exists (select from pg_type where typnamespace = {schema}::regnamespace)"
        " and obj_description({schema}::regnamespace, 'pg_namespace') = {comment}"
        " then drop schema {name}; end if; end $$"
    ).format(registry=sql.Identifier(archive_schema, REGISTRY),
             schema=sql.Literal(sql.Identifier(archive_schema).as_string()),
             comment=sql.Literal(SCHEMA_COMMENT), name=sql.Identifier(archive_schema))]


def registered(archive_schema: str) -> sql.Composed:
    """Every capture in the registry, with its triggers' state: (live_schema, live_table,
    log_table, function_name, since_swap_of, xid, started_at, live table exists, trigger
    enablement or None when the trigger is missing, log table exists)."""
    return sql.SQL(
        "select r.live_schema, r.live_table, r.log_table, r.function_name, r.since_swap_of,"
        " r.xid, r.started_at, c.oid is not null,"
        " (select t.tgenabled::text from pg_trigger as t where t.tgrelid = c.oid"
        " and t.tgname = {trigger}),"
        " to_regclass(format('%I.%I', {schema}::text, r.log_table)) is not null"
        " from {registry} as r"
        " left join pg_namespace as n on n.nspname = r.live_schema"
        " left join pg_class as c on c.relnamespace = n.oid and c.relname = r.live_table"
        " order by 1, 2"
    ).format(trigger=sql.Literal(TRIGGER), schema=sql.Literal(archive_schema),
             registry=sql.Identifier(archive_schema, REGISTRY))


def counts_table() -> sql.Composed:
    return sql.SQL(
        "create temp table {} (live text primary key, unseen_rows bigint not null default 0,"
        " kept_rows bigint not null default 0, removed_rows bigint not null default 0)"
        " on commit drop"
    ).format(sql.Identifier(COUNTS))


def counts_key(live: Relation) -> sql.Literal:
    return sql.Literal(_id(live).as_string())


def counted(live: Relation, statement: sql.Composable, sign: str = "+") -> sql.Composed:
    """`statement` (an INSERT or DELETE on the new table) counted into the new table's rows."""
    return sql.SQL(
        "with changed as ({statement} returning 1) update pg_temp.{counts}"
        " set kept_rows = kept_rows {sign} (select count(*) from changed) where live = {key}"
    ).format(statement=statement, counts=sql.Identifier(COUNTS), sign=sql.SQL(sign),
             key=counts_key(live))


@dataclass(frozen=True)
class Replay:
    """The statements that replay one batch of a table's log into its new table."""

    take_batch: list[sql.Composed]
    taken: sql.Composed
    """Returns how many changes the batch took from the log, seen by the build or not."""
    truncated: sql.Composed
    """Returns whether the batch holds a TRUNCATE the build did not see, after which no replay
    can be right."""
    needs_rescan: sql.Composed
    """Returns one boolean: whether this batch needs a scan of the live table."""
    rescan: list[sql.Composed]
    """Each key to rescan gets its best live row: found by an index on the live table's
    natural key, if it has one, or by a scan of the whole table."""
    apply: list[sql.Composed]
    touched_rows_match: sql.Composed
    """A check under the lock: every kept row this batch touched equals its live row."""
    touched_rows_settled: sql.Composed
    """A check before the lock: every kept row this batch touched equals its live row, unless
    a change waiting since explains it."""
    pending: sql.Composed
    """Returns how many changes wait in the log."""
    anything_pending: sql.Composed
    """Returns whether any change waits: one index probe, cheap enough for under the lock."""
    all_rows_match: sql.Composed
    """A check: every kept row equals its live row, unless a change waiting explains it."""


def backfilled(spec: DedupSpec, columns: tuple[Column, ...]) -> list[Column]:
    """The natural key columns whose NULLs the new table holds as fresh uuids (nulls: backfill)."""
    if spec.nulls != "backfill":
        return []
    return [c for c in columns if c.name in spec.natural_key]


def field(row: str, name: str) -> sql.Composed:
    """One column of a row value, as `(row).column`."""
    return sql.SQL("({}).{}").format(sql.SQL(row), sql.Identifier(name))


def same_as(original: str, new: str, columns: tuple[Column, ...], filled: dict[str, str],
            all_filled: bool = True) -> sql.Composed:
    """Row `new` (the deduplicated table's) is row `original`, up to the uuids a swap
    backfilled into NULL key columns (`filled`, column to type); `all_filled`: and `new` has
    no NULL left in them, as a swap leaves none. Rows are compared by their stored bytes
    (`*=`, as REFRESH MATERIALIZED VIEW CONCURRENTLY compares them): it holds for every type,
    with or without an equality operator, is no weaker than comparing their text, and spares
    turning both rows into text (2.4 s where text took 5.7, warm, for 2 million rows). Each
    side is cast to record: between two ROW() constructors an operator would compare column by
    column, and no column type has `*=`."""
    if not filled:
        return sql.SQL("row({}.*)::record *= row({}.*)::record").format(
            sql.SQL(original), sql.SQL(new))
    as_kept = sql.SQL(", ").join(
        (sql.SQL("coalesce({o}.{c}, {n}.{c})") if c.name in filled
         else sql.SQL("{o}.{c}")).format(o=sql.SQL(original), n=sql.SQL(new),
                                         c=sql.Identifier(c.name))
        for c in columns)
    same = sql.SQL("row({})::record *= row({}.*)::record").format(as_kept, sql.SQL(new))
    if not all_filled:
        return same
    no_null_left = sql.SQL(" and ").join(
        sql.SQL("{}.{} is not null").format(sql.SQL(new), sql.Identifier(c)) for c in filled)
    return sql.SQL("{} and {}").format(same, no_null_left)


@dataclass(frozen=True)
class _Tables:
    """What every statement of one table's replay is built from."""

    spec: DedupSpec
    live: Relation
    shadow: Relation
    log: Relation
    columns: tuple[Column, ...]
    overriding: bool
    snapshot: str | None

    @property
    def tiebreaker(self) -> sql.Identifier:
        return sql.Identifier(self.spec.tiebreaker)

    @property
    def nulls_equal(self) -> bool:
        return self.spec.nulls == "not_distinct"

    @property
    def filled(self) -> dict[str, str]:
        return {c.name: c.type for c in backfilled(self.spec, self.columns)}

    @property
    def insertable(self) -> list[str]:
        return [c.name for c in self.columns if not c.generated]

    def column_list(self) -> sql.Composed:
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.insertable)

    def override(self) -> sql.SQL:
        """Replayed rows keep their identity values."""
        return sql.SQL(" overriding system value" if self.overriding else "")

    def values(self, alias: str) -> sql.Composed:
        """The columns of a row as the new table holds it: a NULL key backfilled."""
        filled = self.filled
        return sql.SQL(", ").join(
            sql.SQL("coalesce({a}.{c}, cast(gen_random_uuid() as {t}))").format(
                a=sql.Identifier(alias), c=sql.Identifier(c), t=sql.SQL(filled[c]))
            if c in filled else sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c))
            for c in self.insertable)

    def same_key(self, left: str, right: str, right_is_row: bool = True) -> sql.Composed:
        """Keys equal as the constraint sees them: NULLs equal only under not_distinct."""
        operator = sql.SQL(" is not distinct from " if self.nulls_equal else " = ")
        right_of = fields_of(right) if right_is_row else columns_of(right)
        return sql.SQL(" and ").join(
            sql.SQL("{}{}{}").format(left_term, operator, right_term)
            for left_term, right_term in zip(key_terms(self.spec, columns_of(left)),
                                             key_terms(self.spec, right_of), strict=True))

    def shapes(self) -> list[KeyShape]:
        """The shapes of keys, which statements that an index on the key serves must tell
        apart: matched with `k = v` and `k is null`, which an index finds, where IS NOT
        DISTINCT FROM would make every match a scan of the whole table."""
        return key_shapes(self.spec, {c.name for c in self.columns if c.not_null})

    def null_in_key(self, row: str) -> sql.Composed:
        return sql.SQL("(") + sql.SQL(" or ").join(
            sql.SQL("{} is null").format(field(row, k)) for k in self.spec.natural_key
        ) + sql.SQL(")")

    def beats(self, new: str, old: str) -> sql.Composed:
        """`new` comes first in the keep order, with ORDER BY's NULL placement."""
        return beats(self.spec.keep, columns_of(new), columns_of(old))

    def keep_order(self) -> sql.Composed:
        return keep_order(self.spec)

    def unseen(self) -> sql.Composable:
        """A condition on a logged change: the build did not see it."""
        if self.snapshot is None:
            return sql.SQL("true")
        return sql.SQL("not pg_visible_in_snapshot(xid, {}::pg_snapshot)").format(
            sql.Literal(self.snapshot))


def _moves_rows(spec: DedupSpec, change: str) -> sql.Composed:
    """A condition on a logged change: it deleted a row, or changed its key or keep columns,
    after which only the live rows of its key can say which of them to keep."""
    def key_and_keep(row: str) -> sql.Composed:
        return sql.SQL(", ").join([*key_terms(spec, fields_of(row)),
                                   *(field(row, c) for c in spec.keep_columns)])
    return sql.SQL("({change}.op = 'D' or {change}.op = 'U' and row({old}) is distinct from"
                   " row({new}))").format(
        change=sql.SQL(change), old=key_and_keep(f"{change}.old_row"),
        new=key_and_keep(f"{change}.new_row"))


def rows_moved(spec: DedupSpec, log: Relation) -> sql.Composed:
    """Returns whether the log holds a change that deleted or re-keyed a row: an ETL that
    does so may do it again in the last moments before the cut-over."""
    return sql.SQL("select exists (select from {} as b where {})").format(
        _id(log), _moves_rows(spec, "b"))


def _take_batch(t: _Tables, batch_rows: int) -> list[sql.Composed]:
    # A NULL-key row is a group of its own unless NULLs are equal: it never needs a rescan.
    rescannable = sql.SQL("") if t.nulls_equal else sql.SQL(
        " and not {}").format(t.null_in_key("b.old_row"))
    return [
        sql.SQL("drop table if exists pg_temp.dedup_taken, pg_temp.dedup_batch,"
                " pg_temp.dedup_rescan, pg_temp.dedup_candidates"),
        sql.SQL("create temp table dedup_taken on commit drop as select change_id, op, xid,"
                " old_row, new_row from {} order by change_id limit {}").format(
                    _id(t.log), sql.Literal(batch_rows)),
        # What the build saw is in the new table already; the rest is replayed.
        sql.SQL("create temp table dedup_batch on commit drop as select change_id, op,"
                " old_row, new_row from dedup_taken where {}").format(t.unseen()),
        sql.SQL(
            "update pg_temp.{counts} set unseen_rows = unseen_rows + (select count(*) filter"
            " (where op = 'I') - count(*) filter (where op = 'D') from dedup_batch)"
            " where live = {key}"
        ).format(counts=sql.Identifier(COUNTS), key=counts_key(t.live)),
        # Keys whose kept row left or changed its key or keep columns, whose row came and
        # went within the batch, or that have no kept row at all: the build's kept rows are
        # read after its key groups, and a kept row the ETL deleted or re-keyed in between
        # left its key with none. The new table is probed by its indexes, row by row: hashing
        # all its tie-breakers for the few rows of a batch under the lock took 160 ms.
        sql.SQL(
            "create temp table dedup_rescan on commit drop as"
            " select distinct {keys} from dedup_batch as b"
            " where b.op in ('U', 'D'){rescannable}"
            " and (exists (select from {new} as s where s.{tb} = {old_tb}) or {old_tb} in"
            " (select {new_tb} from dedup_batch as n where n.op in ('I', 'U'))"
            " or not {key_kept})"
            " and {moves}"
        ).format(
            keys=sql.SQL(", ").join(
                sql.SQL("{} as {}").format(field("b.old_row", k), sql.Identifier(k))
                for k in t.spec.key_columns),
            rescannable=rescannable, old_tb=field("b.old_row", t.spec.tiebreaker),
            tb=t.tiebreaker, new=_id(t.shadow), new_tb=field("n.new_row", t.spec.tiebreaker),
            key_kept=_key_kept(t, "b.old_row"), moves=_moves_rows(t.spec, "b")),
    ]


def columns_of(alias: str) -> Callable[[str], sql.Composed]:
    return lambda k: sql.SQL("{}.{}").format(sql.SQL(alias), sql.Identifier(k))


def fields_of(row: str) -> Callable[[str], sql.Composed]:
    return lambda k: field(row, k)


def _key_kept(t: _Tables, row: str) -> sql.Composed:
    """The new table keeps a row of `row`'s key, found by its unique index."""
    def kept(shape: KeyShape) -> sql.Composed:
        return sql.SQL("exists (select from {new} as s where {match})").format(
            new=_id(t.shadow), match=shape_matches(t.spec, columns_of("s"), fields_of(row), shape))
    patterns = t.shapes()
    if len(patterns) == 1:
        return kept(patterns[0])
    return sql.SQL("(case {} end)").format(sql.SQL(" ").join(
        sql.SQL("when {} then {}").format(nulls_exactly(fields_of(row), shape), kept(shape))
        for shape in patterns))


def _rescan(t: _Tables) -> list[sql.Composed]:
    """Each key to rescan gives up its kept row and gets the best of its live rows, found by
    an index on the live table's key where it has one, or else by a hash join over it. One
    pair of statements per pattern of NULLs, each of which reads the live table only when a
    key of its pattern is to be rescanned."""
    keys = sql.SQL(", ").join(key_terms(t.spec, sql.Identifier))
    statements = []
    for shape in t.shapes():
        which = nulls_exactly(columns_of("r"), shape)

        def match(left: str, which=which, shape=shape) -> sql.Composed:
            return sql.SQL("{} and {}").format(
                which, shape_matches(t.spec, columns_of(left), columns_of("r"), shape))
        statements += [
            counted(t.live, sql.SQL("delete from {new} as s using dedup_rescan as r where {match}")
                    .format(new=_id(t.shadow), match=match("s")), "-"),
            counted(t.live, sql.SQL(
                "insert into {new} ({cols}){override} select distinct on ({keys}) {values}"
                " from {live} as l where (select exists (select from dedup_rescan as r"
                " where {which})) and exists (select from dedup_rescan as r where {match})"
                " order by {keys}, {keep}"
            ).format(new=_id(t.shadow), cols=t.column_list(), live=_id(t.live),
                     override=t.override(), values=t.values("l"), keys=keys, which=which,
                     match=match("l"), keep=t.keep_order())),
        ]
    return statements


def _by_null_pattern(t: _Tables, template: str, inserting: bool,
                     **parts: sql.Composable) -> list[sql.Composed]:
    """The statement for candidates of each pattern of NULLs in the key, matched so that the
    new table's unique index finds the kept row. Where NULLs are distinct a candidate whose
    key has one matches nothing, as under the constraint."""
    shadow, candidate = _id(t.shadow), columns_of("c")
    statements = [sql.SQL(template).format(
        new=shadow, keys_null=nulls_exactly(candidate, shape),
        match=shape_matches(t.spec, columns_of("s"), candidate, shape), **parts)
        for shape in t.shapes()]
    if inserting and not t.nulls_equal:
        some_null = sql.SQL("({})").format(sql.SQL(" or ").join(
            sql.SQL("{} is null").format(candidate(k)) for k in t.spec.natural_key))
        statements.append(sql.SQL(template).format(
            new=shadow, keys_null=some_null, match=sql.SQL("false"), **parts))
    return [counted(t.live, s, "+" if inserting else "-") for s in statements]


def _apply(t: _Tables) -> list[sql.Composed]:
    shadow, tb = _id(t.shadow), t.tiebreaker
    return [
        # A deleted or moved NULL-key row, a group of its own, simply goes.
        *([] if t.nulls_equal else [counted(t.live, sql.SQL(
            "delete from {new} where {tb} in (select {old_tb} from dedup_batch as b"
            " where b.op in ('U', 'D') and {null_key})").format(
                new=shadow, tb=tb, old_tb=field("b.old_row", t.spec.tiebreaker),
                null_key=t.null_in_key("b.old_row")), "-")]),
        sql.SQL(
            "create temp table dedup_candidates on commit drop as"
            " select distinct on ({group}) * from ("
            " select distinct on ({new_tb}) b.change_id, (b.new_row).*"
            " from dedup_batch as b where b.op in ('I', 'U')"
            " order by {new_tb}, b.change_id desc) as latest"
            " where not exists (select from dedup_batch as d where d.op = 'D'"
            " and {old_tb_d} = latest.{tb} and d.change_id > latest.change_id)"
            " and not exists (select from dedup_rescan as r where {rescanned})"
            " order by {group}, {keep}"
        ).format(group=sql.SQL(", ").join(group_terms(t.spec)),
                 new_tb=field("b.new_row", t.spec.tiebreaker),
                 old_tb_d=field("d.old_row", t.spec.tiebreaker), tb=tb,
                 rescanned=t.same_key("latest", "r", right_is_row=False), keep=t.keep_order()),
        # The new version of a kept row replaces it; a better row replaces the kept one.
        counted(t.live, sql.SQL(
            "delete from {new} where {tb} in (select {tb} from dedup_candidates)").format(
                new=shadow, tb=tb), "-"),
        *_by_null_pattern(
            t, "delete from {new} as s using dedup_candidates as c where {keys_null} and {match}"
            " and {beats}", False, beats=t.beats("c", "s")),
        *_by_null_pattern(
            t, "insert into {new} ({cols}){override} select {values} from dedup_candidates as c"
            " where {keys_null} and not exists (select from {new} as s where {match})", True,
            cols=t.column_list(), override=t.override(), values=t.values("c")),
        sql.SQL("delete from {log} where change_id in (select change_id from dedup_taken)").format(
            log=_id(t.log)),
    ]


def replay(spec: DedupSpec, live: Relation, shadow: Relation, log: Relation,
           columns: tuple[Column, ...], overriding: bool = False, snapshot: str | None = None,
           batch_rows: int = BATCH_ROWS, most_rows_kept: bool = False) -> Replay:
    """`snapshot` is the one dbt's build read the live table in (None: count every logged
    change as unseen). The new table's rows are counted in COUNTS as the replay changes them.
    `most_rows_kept`: the new table holds most of the live table's rows (few duplicates), so
    proving them all reads the live table once instead of probing it once per kept row."""
    t = _Tables(spec, live, shadow, log, columns, overriding, snapshot)
    tb, shadow_id = t.tiebreaker, _id(shadow)
    touched = sql.SQL(
        "select {old_tb} from dedup_batch as b union select {new_tb} from dedup_batch as b"
    ).format(old_tb=field("b.old_row", spec.tiebreaker),
             new_tb=field("b.new_row", spec.tiebreaker))
    # Whether the new table's row `s` is its live row, found by the tie-breaker's unique index.
    # A scalar subquery, so one index probe per new row: as a join, the planner may hash the
    # whole live table (a second for a 700K-row table, far more for the tables this is for)
    # where the new table has a few thousand rows. Where most rows are kept, the proof of them
    # all is that join instead (_all_rows_match).
    matches_live = sql.SQL(
        "coalesce((select {same} from {live} as l where l.{tb} = s.{tb}), false)"
    ).format(same=same_as("l", "s", columns, t.filled), live=_id(live), tb=tb)
    # The new table's rows this batch touched, found first: the planner would otherwise test
    # every row against the live table, a condition on the new table alone, before the join.
    touched_rows = sql.SQL(
        "with touched_rows as materialized (select * from {new} where {tb} in ({touched}))"
    ).format(new=shadow_id, tb=tb, touched=touched)
    # The rows a change waiting in the log names: the live table may have moved past them.
    # By the operation, never by `old_row is not null`: a row value with any NULL column is
    # not "not null".
    waiting = sql.SQL(
        "select (g.old_row).{tb} from {log} as g where g.op in ('U', 'D')"
        " union select (g.new_row).{tb} from {log} as g where g.op in ('I', 'U')"
    ).format(tb=tb, log=_id(log))
    return Replay(
        take_batch=_take_batch(t, batch_rows),
        taken=sql.SQL("select count(*) from dedup_taken"),
        truncated=sql.SQL("select exists (select from dedup_batch where op = 'T')"),
        needs_rescan=sql.SQL("select exists (select from dedup_rescan)"),
        rescan=_rescan(t),
        apply=_apply(t),
        touched_rows_match=sql.SQL(
            "{touched_rows} select count(*) = 0, count(*) as rows_differing_from_live"
            " from touched_rows as s where not {matches_live}"
        ).format(touched_rows=touched_rows, matches_live=matches_live),
        touched_rows_settled=sql.SQL(
            "{touched_rows} select count(*) = 0, count(*) as rows_differing_from_live"
            " from touched_rows as s where not {matches_live} and s.{tb} not in ({waiting})"
        ).format(touched_rows=touched_rows, matches_live=matches_live, tb=tb, waiting=waiting),
        pending=sql.SQL("select count(*) from {}").format(_id(log)),
        anything_pending=sql.SQL("select exists (select from {})").format(_id(log)),
        all_rows_match=_all_rows_match(t, matches_live, waiting, most_rows_kept),
    )


def _all_rows_match(t: _Tables, matches_live: sql.Composable, waiting: sql.Composable,
                    most_rows_kept: bool) -> sql.Composed:
    """Every kept row is its live row, unless a change waiting in the log explains it. Where
    few rows are kept, one index probe each; where most are, one join with the live table,
    which the planner hashes and scans once (in parallel where it can): with 1% duplicates in
    2 million rows, 6.3 s where the probes took 10.2 s from a cold cache (bench/proof.py)."""
    tb = t.tiebreaker
    if not most_rows_kept:
        return sql.SQL(
            "select count(*) = 0, count(*) as rows_differing_from_live from {new} as s"
            " where not {matches_live} and s.{tb} not in ({waiting})"
        ).format(new=_id(t.shadow), tb=tb, matches_live=matches_live, waiting=waiting)
    return sql.SQL(
        "select count(*) = 0, count(*) as rows_differing_from_live from {new} as s"
        " left join {live} as l on l.{tb} = s.{tb}"
        " where (l.{tb} is null or not {same}) and s.{tb} not in ({waiting})"
    ).format(new=_id(t.shadow), live=_id(t.live), tb=tb,
             same=same_as("l", "s", t.columns, t.filled), waiting=waiting)
