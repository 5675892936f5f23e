"""Change capture: every write to a live table between `runner capture` and the swap's commit.

`runner capture`, run before `dbt build`, puts a trigger on each live table that copies every
inserted, updated and deleted row, as a value of the table's own row type, into a log table.
The swap replays the log into the new table under the keep rule, before and under its lock, so
the ETL can keep writing throughout. The replay is idempotent: a change that the build already
saw leaves the new table as it was, so the log may start before the build's snapshot.

Replaying one batch of the log, as a set:
  1. keys to rescan: a kept row was deleted, or its key or keep columns changed; only a scan of
     the live table can say which row of that key is now the one to keep (never under the lock);
  2. rows to keep: the latest version of each changed row that still exists, the best per key
     under the keep rule; each replaces the kept row of its key if it beats it, or fills the
     key if none is kept;
  3. the batch leaves the log, in the same transaction.
Every statement here is built from facts alone; runner.swap runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from runner.artifacts import DedupSpec, Relation
from runner.catalog import Column
from runner.names import pg_name

TRIGGER = "dedup_capture"
REGISTRY = "captures"
BATCH_ROWS = 50_000


@dataclass(frozen=True)
class Capture:
    live: Relation
    log: Relation
    function: Relation

    @classmethod
    def of(cls, live: Relation, archive_schema: str) -> Capture:
        return cls(
            live=live,
            log=Relation(archive_schema, pg_name(live.schema, live.name, "changes")),
            function=Relation(archive_schema, pg_name(live.schema, live.name, "capture")),
        )


def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def registry_table(archive_schema: str) -> sql.Composed:
    return sql.SQL(
        "create table if not exists {} (live_schema text not null, live_table text not null,"
        " log_table text not null, xid xid8 not null,"
        " started_at timestamptz not null default now(), primary key (live_schema, live_table))"
    ).format(sql.Identifier(archive_schema, REGISTRY))


def install(capture: Capture) -> list[sql.Composed]:
    """Log table, trigger function and trigger; the trigger needs a short SHARE ROW EXCLUSIVE."""
    live, log = _id(capture.live), _id(capture.log)
    body = sql.SQL(
        "begin insert into {log} (op, old_row, new_row) values (left(tg_op, 1),"
        " case when tg_op <> 'INSERT' then old end, case when tg_op <> 'DELETE' then new end);"
        " return null; end"
    ).format(log=log)
    registry = sql.Identifier(capture.log.schema, REGISTRY)
    return [
        sql.SQL("create schema if not exists {}").format(sql.Identifier(capture.log.schema)),
        registry_table(capture.log.schema),
        # A log without its trigger is a leftover, incomplete by definition: start afresh.
        sql.SQL("drop table if exists {}").format(log),
        # Rows as values of the live table's own type: replayed exactly, no text round trip.
        sql.SQL(
            "create table {log} (change_id bigserial primary key,"
            " op \"char\" not null, old_row {live}, new_row {live})"
        ).format(log=log, live=live),
        sql.SQL(
            "create or replace function {}() returns trigger language plpgsql as {}"
        ).format(_id(capture.function), sql.Literal(body.as_string())),
        sql.SQL("drop trigger if exists {} on {}").format(sql.Identifier(TRIGGER), live),
        sql.SQL(
            "create trigger {} after insert or update or delete on {} for each row"
            " execute function {}()"
        ).format(sql.Identifier(TRIGGER), live, _id(capture.function)),
        sql.SQL(
            "insert into {} (live_schema, live_table, log_table, xid)"
            " values ({}, {}, {}, pg_current_xact_id()) on conflict (live_schema, live_table)"
            " do update set log_table = excluded.log_table, xid = excluded.xid,"
            " started_at = excluded.started_at"
        ).format(registry, sql.Literal(capture.live.schema), sql.Literal(capture.live.name),
                 sql.Literal(capture.log.name)),
    ]


def remove(capture: Capture, table: Relation | None = None) -> list[sql.Composed]:
    """Trigger, function, log and registry entry; `table` is where the trigger now is."""
    return [
        sql.SQL("drop trigger if exists {} on {}").format(
            sql.Identifier(TRIGGER), _id(table or capture.live)),
        sql.SQL("drop table if exists {}").format(_id(capture.log)),
        sql.SQL("drop function if exists {}()").format(_id(capture.function)),
        sql.SQL("delete from {} where live_schema = {} and live_table = {}").format(
            sql.Identifier(capture.log.schema, REGISTRY), sql.Literal(capture.live.schema),
            sql.Literal(capture.live.name)),
    ]


def installed(archive_schema: str) -> sql.Composed:
    """(live_schema, live_table, xid) of every table whose trigger is in place."""
    return sql.SQL(
        "select r.live_schema, r.live_table, r.xid from {} as r"
        " where exists (select from pg_trigger as t join pg_class as c on c.oid = t.tgrelid"
        " join pg_namespace as n on n.oid = c.relnamespace where t.tgname = {}"
        " and n.nspname = r.live_schema and c.relname = r.live_table)"
    ).format(sql.Identifier(archive_schema, REGISTRY), sql.Literal(TRIGGER))


@dataclass(frozen=True)
class Replay:
    """The statements that replay one batch of a table's log into its new table."""

    take_batch: list[sql.Composed]
    needs_rescan: sql.Composed
    """Returns one boolean: whether this batch needs a scan of the live table."""
    rescan: list[sql.Composed]
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


def kept_record_columns(spec: DedupSpec, columns: tuple[Column, ...]) -> list[str]:
    """What the record of kept rows holds per row: the tie-breaker, and the values backfilled
    into its key, so that a rollback can tell them from the ETL's own writes."""
    return [spec.tiebreaker, *(c.name for c in backfilled(spec, columns))]


def replay(spec: DedupSpec, live: Relation, shadow: Relation, log: Relation, kept: Relation,
           columns: tuple[Column, ...], overriding: bool = False,
           batch_rows: int = BATCH_ROWS) -> Replay:
    """`kept` records the tie-breakers of the new table's rows, kept up to date batch by batch
    so that the lock never waits for it to be copied."""
    L, S, G, K = _id(live), _id(shadow), _id(log), _id(kept)
    # Replayed rows keep their identity values.
    override = sql.SQL(" overriding system value" if overriding else "")
    tb = sql.Identifier(spec.tiebreaker)
    col = sql.Identifier
    insertable = [c.name for c in columns if not c.generated]
    cols = sql.SQL(", ").join(col(c) for c in insertable)
    nulls_equal = spec.nulls == "not_distinct"
    filled = {c.name: c.type for c in backfilled(spec, columns)}

    def values(alias: str) -> sql.Composed:
        """The columns of a row as the new table holds it: a NULL key backfilled."""
        return sql.SQL(", ").join(
            sql.SQL("coalesce({a}.{c}, cast(gen_random_uuid() as {t}))").format(
                a=sql.Identifier(alias), c=col(c), t=sql.SQL(filled[c]))
            if c in filled else sql.SQL("{}.{}").format(sql.Identifier(alias), col(c))
            for c in insertable)

    def same_as_live(live_row: str, new_row: str) -> sql.Composed:
        """The new table's row is the live row, up to the uuids backfilled into its key."""
        if not filled:
            return sql.SQL("{}::text = {}::text").format(sql.SQL(live_row), sql.SQL(new_row))
        as_kept = sql.SQL(", ").join(
            (sql.SQL("coalesce({l}.{c}, {n}.{c})") if c.name in filled
             else sql.SQL("{l}.{c}")).format(l=sql.SQL(live_row), n=sql.SQL(new_row),
                                             c=col(c.name))
            for c in columns)
        no_null_left = sql.SQL(" and ").join(
            sql.SQL("{}.{} is not null").format(sql.SQL(new_row), col(c)) for c in filled)
        return sql.SQL("row({})::text = row({}.*)::text and {}").format(
            as_kept, sql.SQL(new_row), no_null_left)

    def kept_record(alias: str | None) -> sql.Composed:
        names = kept_record_columns(spec, columns)
        if alias is None:
            return sql.SQL(", ").join(col(c) for c in names)
        return sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(alias), col(c))
                                  for c in names)

    def field(row: str, name: str) -> sql.Composed:
        return sql.SQL("({}).{}").format(sql.SQL(row), col(name))

    def same_key(left: str, right: str, right_is_row: bool = True) -> sql.Composed:
        """Keys equal as the constraint sees them: NULLs equal only under not_distinct."""
        operator = sql.SQL(" is not distinct from " if nulls_equal else " = ")
        return sql.SQL(" and ").join(
            sql.SQL("{}.{}{}{}").format(sql.SQL(left), col(k), operator,
                                        field(right, k) if right_is_row
                                        else sql.SQL("{}.{}").format(sql.SQL(right), col(k)))
            for k in spec.natural_key)

    def null_in_key(row: str) -> sql.Composed:
        return sql.SQL("(") + sql.SQL(" or ").join(
            sql.SQL("{} is null").format(field(row, k)) for k in spec.natural_key) + sql.SQL(")")

    def beats(new: str, old: str) -> sql.Composed:
        """`new` comes first in the keep order, with ORDER BY's NULL placement."""
        terms, equal_so_far = [], []
        for entry in spec.keep:
            n = sql.SQL("{}.{}").format(sql.SQL(new), col(entry.column))
            o = sql.SQL("{}.{}").format(sql.SQL(old), col(entry.column))
            if entry.descending:
                better = sql.SQL("({n} > {o} or ({n} is null and {o} is not null))")
            else:
                better = sql.SQL("({n} < {o} or ({n} is not null and {o} is null))")
            terms.append(sql.SQL(" and ").join(
                [*equal_so_far, better.format(n=n, o=o)]))
            equal_so_far.append(sql.SQL("{} is not distinct from {}").format(n, o))
        return sql.SQL("(") + sql.SQL(" or ").join(terms) + sql.SQL(")")

    keep_order = sql.SQL(", ").join(
        sql.SQL("{} {}").format(col(e.column), sql.SQL("desc" if e.descending else "asc"))
        for e in spec.keep)
    key_and_keep = list(dict.fromkeys([*spec.natural_key, *(e.column for e in spec.keep)]))
    changed = sql.SQL("row({}) is distinct from row({})").format(
        sql.SQL(", ").join(field("b.old_row", c) for c in key_and_keep),
        sql.SQL(", ").join(field("b.new_row", c) for c in key_and_keep))
    # A NULL-key row is a group of its own unless NULLs are equal: it never needs a rescan.
    rescannable = sql.SQL("") if nulls_equal else sql.SQL(
        " and not {}").format(null_in_key("b.old_row"))
    group = sql.SQL(", ").join(col(k) for k in spec.natural_key)
    if not nulls_equal:
        group = group + sql.SQL(", case when {} then {} end").format(
            sql.SQL(" or ").join(sql.SQL("{} is null").format(col(k)) for k in spec.natural_key),
            tb)

    take_batch = [
        sql.SQL("drop table if exists pg_temp.dedup_batch, pg_temp.dedup_rescan,"
                " pg_temp.dedup_candidates"),
        sql.SQL("create temp table dedup_batch on commit drop as select change_id, op, old_row,"
                " new_row from {} order by change_id limit {}").format(
                    G, sql.Literal(batch_rows)),
        # Keys whose kept row left or changed its key or keep columns, or whose row came and
        # went within the batch.
        sql.SQL(
            "create temp table dedup_rescan on commit drop as"
            " select distinct {keys} from dedup_batch as b"
            " where b.op in ('U', 'D'){rescannable}"
            " and ({old_tb} in (select {tb} from {S}) or {old_tb} in"
            " (select {new_tb} from dedup_batch as n where n.op in ('I', 'U')))"
            " and (b.op = 'D' or {changed})"
        ).format(
            keys=sql.SQL(", ").join(
                sql.SQL("{} as {}").format(field("b.old_row", k), col(k))
                for k in spec.natural_key),
            rescannable=rescannable, old_tb=field("b.old_row", spec.tiebreaker), tb=tb, S=S,
            new_tb=field("n.new_row", spec.tiebreaker), changed=changed),
    ]
    rescan = [
        sql.SQL("delete from {S} as s using dedup_rescan as r where {match}").format(
            S=S, match=same_key("s", "r", right_is_row=False)),
        sql.SQL(
            "insert into {S} ({cols}){override} select distinct on ({keys}) {values} from {L}"
            " as l where exists (select from dedup_rescan as r where {match})"
            " order by {keys}, {keep}"
        ).format(S=S, cols=cols, L=L, override=override, values=values("l"),
                 keys=sql.SQL(", ").join(col(k) for k in spec.natural_key),
                 match=same_key("l", "r", right_is_row=False), keep=keep_order),
        # A rescan changes rows beyond the batch: bring the record of kept rows level.
        sql.SQL("delete from {K} as k where not exists (select from {S} as s"
                " where s.{tb} = k.{tb})").format(K=K, S=S, tb=tb),
        sql.SQL("insert into {K} select {kept} from {S} as s where not exists"
                " (select from {K} as k where k.{tb} = s.{tb})").format(
                    K=K, S=S, tb=tb, kept=kept_record("s")),
    ]
    touched = sql.SQL(
        "select {old_tb} from dedup_batch as b union select {new_tb} from dedup_batch as b"
    ).format(old_tb=field("b.old_row", spec.tiebreaker),
             new_tb=field("b.new_row", spec.tiebreaker))

    def by_null_pattern(template: str, **parts: sql.Composable) -> list[sql.Composed]:
        """The statement for candidates whose key has no NULL, matched with = so that the new
        table's unique index finds the kept row; and, where NULLs are equal, for the few whose
        key has one, matched with IS NOT DISTINCT FROM, which no index serves. Where NULLs are
        distinct such a candidate matches nothing, as under the constraint."""
        equal = sql.SQL(" and ").join(
            sql.SQL("s.{k} = c.{k}").format(k=col(k)) for k in spec.natural_key)
        no_null = sql.SQL("not ({})").format(sql.SQL(" or ").join(
            sql.SQL("c.{} is null").format(col(k)) for k in spec.natural_key))
        some_null = sql.SQL("({})").format(sql.SQL(" or ").join(
            sql.SQL("c.{} is null").format(col(k)) for k in spec.natural_key))
        statements = [sql.SQL(template).format(S=S, keys_null=no_null, match=equal, **parts)]
        if nulls_equal:
            statements.append(sql.SQL(template).format(
                S=S, keys_null=some_null, match=same_key("s", "c", right_is_row=False),
                **parts))
        elif "insert" in template:
            statements.append(sql.SQL(template).format(
                S=S, keys_null=some_null, match=sql.SQL("false"), **parts))
        return statements

    apply = [
        # A deleted or moved NULL-key row, a group of its own, simply goes.
        *([] if nulls_equal else [sql.SQL(
            "delete from {S} where {tb} in (select {old_tb} from dedup_batch as b"
            " where b.op in ('U', 'D') and {null_key})").format(
                S=S, tb=tb, old_tb=field("b.old_row", spec.tiebreaker),
                null_key=null_in_key("b.old_row"))]),
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
        ).format(group=group, new_tb=field("b.new_row", spec.tiebreaker),
                 old_tb_d=field("d.old_row", spec.tiebreaker), tb=tb,
                 rescanned=same_key("latest", "r", right_is_row=False), keep=keep_order),
        # The new version of a kept row replaces it; a better row replaces the kept one.
        sql.SQL("delete from {S} where {tb} in (select {tb} from dedup_candidates)").format(
            S=S, tb=tb),
        *by_null_pattern(
            "delete from {S} as s using dedup_candidates as c where {keys_null} and {match}"
            " and {beats}", beats=beats("c", "s")),
        *by_null_pattern(
            "insert into {S} ({cols}){override} select {values} from dedup_candidates as c"
            " where {keys_null} and not exists (select from {S} as s where {match})",
            cols=cols, override=override, values=values("c")),
        # Which rows are kept, for rollback: this batch's rows leave or join the record.
        sql.SQL("delete from {K} where {tb} in ({touched})").format(
            K=K, tb=tb, touched=touched),
        sql.SQL("insert into {K} select {kept} from {S} where {tb} in ({touched})").format(
            K=K, tb=tb, S=S, touched=touched, kept=kept_record(None)),
        sql.SQL("delete from {G} where change_id in (select change_id from dedup_batch)").format(
            G=G),
    ]
    # Whether the new table's row `s` is its live row, found by the tie-breaker's unique index.
    # A scalar subquery, so one index probe per new row: as a join, the planner may hash the
    # whole live table, each row cast to text (a second for a 700K-row table, far more for the
    # tables this is for) where the new table has a few thousand rows.
    matches_live = sql.SQL(
        "coalesce((select {same} from {L} as l where l.{tb} = s.{tb}), false)"
    ).format(same=same_as_live("l", "s"), L=L, tb=tb)
    # The new table's rows this batch touched, found first: the planner would otherwise test
    # every row against the live table, a condition on the new table alone, before the join.
    touched_rows = sql.SQL(
        "with touched_rows as materialized (select * from {S} where {tb} in ({touched}))"
    ).format(S=S, tb=tb, touched=touched)
    # The rows a change waiting in the log names: the live table may have moved past them.
    waiting = sql.SQL(
        "select (g.old_row).{tb} from {G} as g where g.old_row is not null"
        " union select (g.new_row).{tb} from {G} as g where g.new_row is not null"
    ).format(tb=tb, G=G)
    return Replay(
        take_batch=take_batch,
        needs_rescan=sql.SQL("select exists (select from dedup_rescan)"),
        rescan=rescan,
        apply=apply,
        touched_rows_match=sql.SQL(
            "{touched_rows} select count(*) = 0, count(*) as rows_differing_from_live"
            " from touched_rows as s where not {matches_live}"
        ).format(touched_rows=touched_rows, matches_live=matches_live),
        touched_rows_settled=sql.SQL(
            "{touched_rows} select count(*) = 0, count(*) as rows_differing_from_live"
            " from touched_rows as s where not {matches_live} and s.{tb} not in ({waiting})"
        ).format(touched_rows=touched_rows, matches_live=matches_live, tb=tb, waiting=waiting),
        pending=sql.SQL("select count(*) from {}").format(G),
        anything_pending=sql.SQL("select exists (select from {})").format(G),
        all_rows_match=sql.SQL(
            "select count(*) = 0, count(*) as rows_differing_from_live from {S} as s"
            " where not {matches_live} and s.{tb} not in ({waiting})"
        ).format(S=S, tb=tb, matches_live=matches_live, waiting=waiting),
    )
