"""Bring a swap's archived original up to date with every write captured since the swap.

A rollback does not infer what the ETL did to the deduplicated table: the swap started a
change capture on it in its own transaction, and its log says. Each row is known by its
tie-breaker, unique in the original as in the deduplicated table. One batch of the log, as a
set:
  1. per tie-breaker the batch touches: whether it first arrived (an insert, or an update that
     moved a row to it) or was there already, and its final version, or none;
  2. a tie-breaker that arrives but is held in the original by a duplicate the swap removed
     cannot be restored beside it: the rollback refuses;
  3. the original's rows with those tie-breakers go, and the final versions come in;
  4. proven before it goes on: exactly as many rows went as the original had with those
     tie-breakers, exactly as many came as have a final version, and each is that version;
  5. the batch leaves the log.
Then every row of the deduplicated table is proven to be in the original as it is now (one
index probe each): the log left nothing out. With the original counted before the first batch
against the rows the swap recorded at its commit, the restored table is the original rows with
every later write, and nothing else.

Every statement here is built from facts alone; runner.jobs.rollback runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.server.catalog import Column
from runner.statements.capture import field, same_as

BATCH_ROWS = 50_000
# The temporary table in which a rollback counts, per table, the writes it carried over.
COUNTS = "restore_counts"


def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def counts_table() -> sql.Composed:
    return sql.SQL(
        "create temp table {} (live text primary key, inserted bigint not null default 0,"
        " updated bigint not null default 0, deleted bigint not null default 0,"
        " rows_now bigint not null) on commit drop"
    ).format(sql.Identifier(COUNTS))


def counts_key(live: Relation) -> sql.Literal:
    return sql.Literal(_id(live).as_string())


@dataclass(frozen=True)
class Restore:
    """The statements that carry one batch of the log over to the original, and the checks."""

    archive_rows: sql.Composed
    """A check: the original still holds the rows the swap recorded at its commit; also
    starts the count of its rows."""
    take_batch: list[sql.Composed]
    taken: sql.Composed
    """Returns how many changes the batch took."""
    truncated: sql.Composed
    """Returns whether the batch holds a TRUNCATE: which rows it took cannot be known."""
    no_reused_tiebreaker: sql.Composed
    """A check: no tie-breaker the batch brings in is held by a row the swap removed."""
    apply: list[sql.Composed]
    batch_applied: sql.Composed
    """A check: the batch took and gave exactly the rows it names, each as the log has it."""
    touched_rows_in_archive: sql.Composed
    """A check under the lock: every row of the live table the batch touched is in the
    original as it is."""
    touched_rows_settled: sql.Composed
    """The same check before the lock, but for rows a change waiting since explains."""
    all_rows_in_archive: sql.Composed
    """A check: every row of the live table is in the original, unless a waiting change
    explains it."""
    pending: sql.Composed
    anything_pending: sql.Composed
    carried: sql.Composed
    """Returns (inserted, updated, deleted, rows of the restored table) so far."""


def restore(live: Relation, archive: Relation, log: Relation, columns: tuple[Column, ...],
            tiebreaker: str, backfilled: tuple[str, ...], rows_at_swap: int,
            batch_rows: int = BATCH_ROWS) -> Restore:
    """`live` is the deduplicated table now live, `archive` the original, `log` the capture
    since the swap; `backfilled` are the key columns whose NULLs the swap filled with uuids,
    `rows_at_swap` the original's rows at the swap's commit."""
    tb = sql.Identifier(tiebreaker)
    archive_id, live_id, log_id = _id(archive), _id(live), _id(log)
    key = counts_key(live)
    counts = sql.Identifier(COUNTS)
    insertable = [c.name for c in columns if not c.generated]
    filled = {c.name: c.type for c in columns if c.name in backfilled}
    override = sql.SQL(" overriding system value" if any(c.identity for c in columns) else "")
    touched = sql.SQL("select t.tb from restore_touched as t")
    in_archive = sql.SQL(
        "coalesce((select {same} from {archive} as a where a.{tb} = l.{tb}), false)"
    ).format(same=same_as("a", "l", columns, filled, all_filled=False), archive=archive_id, tb=tb)
    # Rows a change waiting in the log names: the archive has not caught up with them yet.
    waiting = sql.SQL(
        "select (g.old_row).{tb} from {log} as g where g.op in ('U', 'D')"
        " union select (g.new_row).{tb} from {log} as g where g.op in ('I', 'U')"
    ).format(tb=tb, log=log_id)
    touched_rows = sql.SQL(
        "with touched_rows as materialized (select * from {live} where {tb} in ({touched}))"
    ).format(live=live_id, tb=tb, touched=touched)
    return Restore(
        archive_rows=sql.SQL(
            "insert into pg_temp.{counts} (live, rows_now) select {key}, count(*) from {archive}"
            " returning rows_now = {expected}, rows_now as archive_rows,"
            " {expected} as rows_at_the_swap"
        ).format(counts=counts, key=key, archive=archive_id, expected=sql.Literal(rows_at_swap)),
        take_batch=[
            sql.SQL("drop table if exists pg_temp.restore_batch, pg_temp.restore_touched,"
                    " pg_temp.restore_expected"),
            sql.SQL("create temp table restore_batch on commit drop as select change_id, op,"
                    " old_row, new_row from {} order by change_id limit {}").format(
                        log_id, sql.Literal(batch_rows)),
            # A change leaves its old tie-breaker before it arrives at the new one.
            sql.SQL(
                "create temp table restore_touched on commit drop as"
                " with touches as ("
                " select b.change_id, 0 as step, {old_tb} as tb, false as arrives,"
                " null::{live} as version from restore_batch as b where b.op in ('U', 'D')"
                " union all"
                " select b.change_id, 1, {new_tb}, true, b.new_row from restore_batch as b"
                " where b.op in ('I', 'U'))"
                " select tb, (array_agg(arrives order by change_id, step))[1] as arrives_first,"
                " (array_agg(arrives order by change_id desc, step desc))[1] as stays,"
                " (array_agg(version order by change_id desc, step desc))[1] as final_row"
                " from touches group by tb"
            ).format(old_tb=field("b.old_row", tiebreaker), new_tb=field("b.new_row", tiebreaker),
                     live=live_id),
            sql.SQL(
                "create temp table restore_expected on commit drop as select"
                " (select count(*) from {archive} as a where a.{tb} in ({touched})) as deletes,"
                " (select count(*) from restore_touched where stays) as inserts,"
                " 0::bigint as deleted, 0::bigint as inserted"
            ).format(archive=archive_id, tb=tb, touched=touched),
        ],
        taken=sql.SQL("select count(*) from restore_batch"),
        truncated=sql.SQL("select exists (select from restore_batch where op = 'T')"),
        no_reused_tiebreaker=sql.SQL(
            "select count(*) = 0, count(*) as reused_tiebreakers, min(t.tb::text) as example"
            " from restore_touched as t where t.arrives_first"
            " and exists (select from {archive} as a where a.{tb} = t.tb)"
        ).format(archive=archive_id, tb=tb),
        apply=[
            sql.SQL(
                "with gone as (delete from {archive} as a using restore_touched as t"
                " where a.{tb} = t.tb returning 1)"
                " update pg_temp.restore_expected set deleted = (select count(*) from gone)"
            ).format(archive=archive_id, tb=tb),
            sql.SQL(
                "with came as (insert into {archive} ({cols}){override} select {values}"
                " from restore_touched as t where t.stays returning 1)"
                " update pg_temp.restore_expected set inserted = (select count(*) from came)"
            ).format(archive=archive_id,
                     cols=sql.SQL(", ").join(sql.Identifier(c) for c in insertable),
                     override=override,
                     values=sql.SQL(", ").join(field("t.final_row", c) for c in insertable)),
            sql.SQL(
                "update pg_temp.{counts} as c set"
                " inserted = c.inserted + b.inserted, updated = c.updated + b.updated,"
                " deleted = c.deleted + b.deleted,"
                " rows_now = c.rows_now + e.inserted - e.deleted"
                " from (select count(*) filter (where op = 'I') as inserted,"
                " count(*) filter (where op = 'U') as updated,"
                " count(*) filter (where op = 'D') as deleted from restore_batch) as b,"
                " restore_expected as e where c.live = {key}"
            ).format(counts=counts, key=key),
            sql.SQL("delete from {} where change_id in (select change_id from restore_batch)"
                    ).format(log_id),
        ],
        batch_applied=sql.SQL(
            "select e.deleted = e.deletes and e.inserted = e.inserts and m.differing = 0,"
            " e.deletes as rows_to_take, e.deleted as rows_taken,"
            " e.inserts as rows_to_give, e.inserted as rows_given,"
            " m.differing as rows_not_as_logged"
            " from restore_expected as e, (select count(*) as differing"
            " from restore_touched as t where case when t.stays then not coalesce("
            "(select row(a.*)::text = (t.final_row)::text from {archive} as a where a.{tb} = t.tb),"
            " false) else exists (select from {archive} as a where a.{tb} = t.tb) end) as m"
        ).format(archive=archive_id, tb=tb),
        touched_rows_in_archive=sql.SQL(
            "{touched_rows} select count(*) = 0, count(*) as rows_missing_from_archive"
            " from touched_rows as l where not {in_archive}"
        ).format(touched_rows=touched_rows, in_archive=in_archive),
        touched_rows_settled=sql.SQL(
            "{touched_rows} select count(*) = 0, count(*) as rows_missing_from_archive"
            " from touched_rows as l where not {in_archive} and l.{tb} not in ({waiting})"
        ).format(touched_rows=touched_rows, in_archive=in_archive, tb=tb, waiting=waiting),
        all_rows_in_archive=sql.SQL(
            "select count(*) = 0, count(*) as rows_missing_from_archive from {live} as l"
            " where not {in_archive} and l.{tb} not in ({waiting})"
        ).format(live=live_id, in_archive=in_archive, tb=tb, waiting=waiting),
        pending=sql.SQL("select count(*) from {}").format(log_id),
        anything_pending=sql.SQL("select exists (select from {})").format(log_id),
        carried=sql.SQL(
            "select inserted, updated, deleted, rows_now from pg_temp.{} where live = {}"
        ).format(counts, key),
    )
