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


@dataclass(frozen=True)
class _Restoring:
    """What every statement of one table's restore is built from: `live` the deduplicated
    table now live, `archive` the original, `log` the capture since the swap; `backfilled` the
    key columns whose NULLs the swap filled with uuids."""

    live: Relation
    archive: Relation
    log: Relation
    columns: tuple[Column, ...]
    tiebreaker: str
    backfilled: tuple[str, ...]

    @property
    def tb(self) -> sql.Identifier:
        return sql.Identifier(self.tiebreaker)

    @property
    def key(self) -> sql.Literal:
        return counts_key(self.live)

    @property
    def insertable(self) -> list[str]:
        return [c.name for c in self.columns if not c.generated]

    @property
    def override(self) -> sql.SQL:
        """Restored rows keep their identity values."""
        return sql.SQL(" overriding system value" if any(c.identity for c in self.columns)
                       else "")

    def in_archive(self) -> sql.Composed:
        """Whether the live table's row `l` is in the original as it is."""
        filled = {c.name: c.type for c in self.columns if c.name in self.backfilled}
        return sql.SQL(
            "coalesce((select {same} from {archive} as a where a.{tb} = l.{tb}), false)"
        ).format(same=same_as("a", "l", self.columns, filled, all_filled=False),
                 archive=_id(self.archive), tb=self.tb)

    def waiting(self) -> sql.Composed:
        """Rows a change waiting in the log names: the original has not caught up with them."""
        return sql.SQL(
            "select (g.old_row).{tb} from {log} as g where g.op in ('U', 'D')"
            " union select (g.new_row).{tb} from {log} as g where g.op in ('I', 'U')"
        ).format(tb=self.tb, log=_id(self.log))

    def touched_rows(self) -> sql.Composed:
        return sql.SQL(
            "with touched_rows as materialized (select * from {live} where {tb} in ({touched}))"
        ).format(live=_id(self.live), tb=self.tb, touched=TOUCHED)


TOUCHED = sql.SQL("select t.tb from restore_touched as t")


def _count_the_original(r: _Restoring, rows_at_swap: int) -> sql.Composed:
    return sql.SQL(
        "insert into pg_temp.{counts} (live, rows_now) select {key}, count(*) from {archive}"
        " returning rows_now = {expected}, rows_now as archive_rows,"
        " {expected} as rows_at_the_swap"
    ).format(counts=sql.Identifier(COUNTS), key=r.key, archive=_id(r.archive),
             expected=sql.Literal(rows_at_swap))


def _take_batch(r: _Restoring, batch_rows: int) -> list[sql.Composed]:
    """Step 1: the batch, and per tie-breaker it touches what arrives first, what stays, and
    the final version; with what the original should give up and take."""
    return [
        sql.SQL("drop table if exists pg_temp.restore_batch, pg_temp.restore_touched,"
                " pg_temp.restore_expected"),
        sql.SQL("create temp table restore_batch on commit drop as select change_id, op,"
                " old_row, new_row from {} order by change_id limit {}").format(
                    _id(r.log), sql.Literal(batch_rows)),
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
        ).format(old_tb=field("b.old_row", r.tiebreaker),
                 new_tb=field("b.new_row", r.tiebreaker), live=_id(r.live)),
        sql.SQL(
            "create temp table restore_expected on commit drop as select"
            " (select count(*) from {archive} as a where a.{tb} in ({touched})) as deletes,"
            " (select count(*) from restore_touched where stays) as inserts,"
            " 0::bigint as deleted, 0::bigint as inserted"
        ).format(archive=_id(r.archive), tb=r.tb, touched=TOUCHED),
    ]


def _no_reused_tiebreaker(r: _Restoring) -> sql.Composed:
    """Step 2."""
    return sql.SQL(
        "select count(*) = 0, count(*) as reused_tiebreakers, min(t.tb::text) as example"
        " from restore_touched as t where t.arrives_first"
        " and exists (select from {archive} as a where a.{tb} = t.tb)"
    ).format(archive=_id(r.archive), tb=r.tb)


def _apply(r: _Restoring) -> list[sql.Composed]:
    """Steps 3 and 5: the touched rows go, their final versions come, the counts follow, the
    batch leaves the log."""
    archive = _id(r.archive)
    return [
        sql.SQL(
            "with gone as (delete from {archive} as a using restore_touched as t"
            " where a.{tb} = t.tb returning 1)"
            " update pg_temp.restore_expected set deleted = (select count(*) from gone)"
        ).format(archive=archive, tb=r.tb),
        sql.SQL(
            "with came as (insert into {archive} ({cols}){override} select {values}"
            " from restore_touched as t where t.stays returning 1)"
            " update pg_temp.restore_expected set inserted = (select count(*) from came)"
        ).format(archive=archive, cols=sql.SQL(", ").join(sql.Identifier(c)
                                                          for c in r.insertable),
                 override=r.override,
                 values=sql.SQL(", ").join(field("t.final_row", c) for c in r.insertable)),
        sql.SQL(
            "update pg_temp.{counts} as c set"
            " inserted = c.inserted + b.inserted, updated = c.updated + b.updated,"
            " deleted = c.deleted + b.deleted,"
            " rows_now = c.rows_now + e.inserted - e.deleted"
            " from (select count(*) filter (where op = 'I') as inserted,"
            " count(*) filter (where op = 'U') as updated,"
            " count(*) filter (where op = 'D') as deleted from restore_batch) as b,"
            " restore_expected as e where c.live = {key}"
        ).format(counts=sql.Identifier(COUNTS), key=r.key),
        sql.SQL("delete from {} where change_id in (select change_id from restore_batch)"
                ).format(_id(r.log)),
    ]


def _batch_applied(r: _Restoring) -> sql.Composed:
    """Step 4."""
    return sql.SQL(
        "select e.deleted = e.deletes and e.inserted = e.inserts and m.differing = 0,"
        " e.deletes as rows_to_take, e.deleted as rows_taken,"
        " e.inserts as rows_to_give, e.inserted as rows_given,"
        " m.differing as rows_not_as_logged"
        " from restore_expected as e, (select count(*) as differing"
        " from restore_touched as t where case when t.stays then not coalesce("
        "(select row(a.*)::text = (t.final_row)::text from {archive} as a where a.{tb} = t.tb),"
        " false) else exists (select from {archive} as a where a.{tb} = t.tb) end) as m"
    ).format(archive=_id(r.archive), tb=r.tb)


def _rows_in_archive(r: _Restoring) -> tuple[sql.Composed, sql.Composed, sql.Composed]:
    """The touched rows in the original, under the lock and before it; then every row."""
    missing = sql.SQL("count(*) = 0, count(*) as rows_missing_from_archive")
    return (
        sql.SQL("{touched_rows} select {missing} from touched_rows as l where not {in_archive}"
                ).format(touched_rows=r.touched_rows(), missing=missing,
                         in_archive=r.in_archive()),
        sql.SQL("{touched_rows} select {missing} from touched_rows as l where not {in_archive}"
                " and l.{tb} not in ({waiting})").format(
            touched_rows=r.touched_rows(), missing=missing, in_archive=r.in_archive(),
            tb=r.tb, waiting=r.waiting()),
        sql.SQL("select {missing} from {live} as l where not {in_archive} and l.{tb} not in"
                " ({waiting})").format(missing=missing, live=_id(r.live),
                                       in_archive=r.in_archive(), tb=r.tb,
                                       waiting=r.waiting()),
    )


def restore(live: Relation, archive: Relation, log: Relation, columns: tuple[Column, ...],
            tiebreaker: str, backfilled: tuple[str, ...], rows_at_swap: int,
            batch_rows: int = BATCH_ROWS) -> Restore:
    """The restore of one table (see _Restoring), `rows_at_swap` the original's rows at the
    swap's commit, in the steps of the module's docstring."""
    r = _Restoring(live, archive, log, columns, tiebreaker, backfilled)
    under_lock, settled, everything = _rows_in_archive(r)
    return Restore(
        archive_rows=_count_the_original(r, rows_at_swap),
        take_batch=_take_batch(r, batch_rows),
        taken=sql.SQL("select count(*) from restore_batch"),
        truncated=sql.SQL("select exists (select from restore_batch where op = 'T')"),
        no_reused_tiebreaker=_no_reused_tiebreaker(r),
        apply=_apply(r),
        batch_applied=_batch_applied(r),
        touched_rows_in_archive=under_lock,
        touched_rows_settled=settled,
        all_rows_in_archive=everything,
        pending=sql.SQL("select count(*) from {}").format(_id(log)),
        anything_pending=sql.SQL("select exists (select from {})").format(_id(log)),
        carried=sql.SQL(
            "select inserted, updated, deleted, rows_now from pg_temp.{} where live = {}"
        ).format(sql.Identifier(COUNTS), r.key),
    )
