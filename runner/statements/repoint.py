"""Re-pointing: the rows of other tables that point at a duplicate a swap removes are moved to
the kept row of the same key, in the swap's own transaction, so that no reference dangles.

For each foreign key that points at the live table (a reference), three sources say which
referenced values may have to move:
  the start   every value the referencing table points at whose row the new table does not
              keep, read once before the lock;
  its writes  a capture on the referencing table, installed and committed by the swap before
              its transaction, logs the values the ETL writes into the foreign key since;
  the replay  a row that leaves the new table (the ETL replaced a kept row by a better one, or
              deleted it) gives up its references to the row that now keeps its key: a
              trigger on the new table, which is the swap's alone, queues its values.
A queued value moves once its row is not kept and the row that keeps its key is in the live
table too (the replay may lag behind the ETL before the lock; under it, never). Each moved row
is recorded with the value it had, for a rollback to put back. Under the lock the queue ends
empty, the foreign key is added again against the new table, NOT VALID, and checked after the
commit. Every statement here is built from facts alone; runner.jobs.swap runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, Relation
from runner.declaration.names import pg_name
from runner.server.catalog import Column, Reference
from runner.statements.keys import key_shapes, nulls_exactly, shape_matches


def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def _columns(alias: str) -> Callable[[str], sql.Composed]:
    return lambda name: sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(name))


def _list(terms: list[sql.Composable]) -> sql.Composed:
    return sql.SQL(", ").join(terms)


def _names(names: list[str]) -> sql.Composed:
    return _list([sql.Identifier(n) for n in names])


def _renamed(terms: list[sql.Composable], names: list[str]) -> sql.Composed:
    return _list([sql.SQL("{} as {}").format(t, sql.Identifier(n))
                  for t, n in zip(terms, names, strict=True)])


def _equal(left: list[sql.Composable], right: list[sql.Composable]) -> sql.Composed:
    return sql.SQL(" and ").join(sql.SQL("{} = {}").format(a, b)
                                 for a, b in zip(left, right, strict=True))


def _numbered(prefix: str, columns: tuple[str, ...]) -> list[str]:
    """The record's names for the columns of the foreign key (`was_1`, `now_1`, ...) and of the
    referencing table's primary key (`row_key_1`, ...)."""
    return [f"{prefix}_{n}" for n in range(1, len(columns) + 1)]


@dataclass(frozen=True)
class ReferenceCapture:
    """What logs the values written into one foreign key during a swap."""

    reference: Reference
    log: Relation
    function: Relation
    trigger: str

    @classmethod
    def of(cls, reference: Reference, archive_schema: str) -> ReferenceCapture:
        table, name = reference.table, reference.constraint
        return cls(reference,
                   Relation(archive_schema, pg_name(table.schema, table.name, name, "references")),
                   Relation(archive_schema, pg_name(table.schema, table.name, name,
                                                    "references_capture")),
                   pg_name("dedup_references", name))


@dataclass(frozen=True)
class Repointing:
    """One reference into a table the swap replaces, and where its work is kept."""

    reference: Reference
    live: Relation
    shadow: Relation
    spec: DedupSpec
    columns: tuple[Column, ...]
    """The live table's."""
    capture: ReferenceCapture
    record: Relation
    """In the archive schema: each moved row by its primary key, the value it pointed at and
    the one it points at now."""

    @classmethod
    def of(cls, reference: Reference, live: Relation, shadow: Relation, spec: DedupSpec,
           columns: tuple[Column, ...], archive: Relation) -> Repointing:
        return cls(reference, live, shadow, spec, columns,
                   ReferenceCapture.of(reference, archive.schema),
                   Relation(archive.schema, pg_name(archive.name, reference.table.name,
                                                    reference.constraint)))

    def _temp(self, what: str) -> sql.Identifier:
        return sql.Identifier("pg_temp", pg_name(
            what, self.reference.table.schema, self.reference.table.name,
            self.reference.constraint))

    @property
    def queue(self) -> sql.Identifier:
        return self._temp("dedup_pointed")

    @property
    def survivors(self) -> sql.Identifier:
        return self._temp("dedup_survivors")

    @property
    def unkept_trigger(self) -> str:
        return pg_name("dedup_unkept", self.reference.table.name, self.reference.constraint)

    @property
    def unkept_function(self) -> sql.Identifier:
        return self._temp("dedup_unkept")

    def referenced(self, alias: str) -> list[sql.Composed]:
        return [_columns(alias)(c) for c in self.reference.referenced]

    def pointing(self, alias: str) -> list[sql.Composed]:
        return [_columns(alias)(c) for c in self.reference.columns]

    def numbered(self, prefix: str) -> list[str]:
        return _numbered(prefix, self.reference.columns)

    def numbered_key(self) -> list[str]:
        return _numbered("row_key", self.reference.row_key)


def capture_install(c: ReferenceCapture) -> list[sql.Composed]:
    """What logs the values written into the foreign key, committed before the swap's
    transaction so that every write after it is seen; needs a short SHARE ROW EXCLUSIVE on the
    referencing table."""
    table, log = _id(c.reference.table), _id(c.log)
    body = sql.SQL("begin insert into {} (new_row) values (new); return null; end").format(log)
    return [
        *capture_remove(c),
        sql.SQL("create table {} (change_id bigint generated always as identity primary key,"
                " new_row {})").format(log, table),
        # As the change capture's: the writers need no right in the archive schema.
        sql.SQL("create function {}() returns trigger language plpgsql security definer"
                " set search_path = pg_catalog, pg_temp as {}").format(
                    _id(c.function), sql.Literal(body.as_string())),
        sql.SQL("create trigger {} after insert or update of {} on {} for each row"
                " execute function {}()").format(
                    sql.Identifier(c.trigger), _names(list(c.reference.columns)),
                    table, _id(c.function)),
        sql.SQL("alter table {} enable always trigger {}").format(table, sql.Identifier(c.trigger)),
    ]


def capture_remove(c: ReferenceCapture) -> list[sql.Composed]:
    """The capture of a foreign key, as far as it is there: a swap that gave up left it."""
    return [
        sql.SQL("drop trigger if exists {} on {}").format(sql.Identifier(c.trigger),
                                                          _id(c.reference.table)),
        sql.SQL("drop function if exists {}()").format(_id(c.function)),
        sql.SQL("drop table if exists {}").format(_id(c.log)),
    ]


def setup(r: Repointing) -> list[sql.Composed]:
    """In the swap's transaction, once the new table is filled: the queue, the trigger that
    feeds it what leaves the new table, the record, and every value to move so far."""
    shadow = _id(r.shadow)
    body = sql.SQL("begin insert into {queue} select {values} from gone; return null; end").format(
        queue=r.queue, values=_list(r.referenced("gone")))
    return [
        sql.SQL("create temp table {} on commit drop as select {} from {} with no data").format(
            r.queue, _list([sql.Identifier(c) for c in r.reference.referenced]), _id(r.live)),
        sql.SQL("create function {}() returns trigger language plpgsql as {}").format(
            r.unkept_function, sql.Literal(body.as_string())),
        sql.SQL("create trigger {} after delete on {} referencing old table as gone"
                " for each statement execute function {}()").format(
                    sql.Identifier(r.unkept_trigger), shadow, r.unkept_function),
        sql.SQL("drop table if exists {}").format(_id(r.record)),
        sql.SQL("create table {record} as select {row_key}, {was}, {now} from {table} as r"
                " with no data").format(
            record=_id(r.record),
            row_key=_renamed([_columns("r")(k) for k in r.reference.row_key], r.numbered_key()),
            was=_renamed(r.pointing("r"), r.numbered("was")),
            now=_renamed(r.pointing("r"), r.numbered("now")),
            table=_id(r.reference.table)),
        sql.SQL("alter table {} add primary key ({})").format(_id(r.record),
                                                              _names(r.numbered_key())),
        sql.SQL("insert into {queue} select distinct {values} from {live} as t"
                " where exists (select from {table} as r where {points})"
                " and not exists (select from {shadow} as k where k.{tb} = t.{tb})").format(
            queue=r.queue, values=_list(r.referenced("t")), live=_id(r.live),
            table=_id(r.reference.table), points=_equal(r.pointing("r"), r.referenced("t")),
            shadow=shadow, tb=sql.Identifier(r.spec.tiebreaker)),
    ]


def _survivors(r: Repointing) -> sql.Composed:
    """Each queued value whose row the new table does not keep, with the one of its key the
    new table keeps, where that one is in the live table too; one query per shape of key, so
    that the new table's unique index finds it."""
    not_null = {c.name for c in r.columns if c.not_null}
    per_shape = [
        sql.SQL(
            "select distinct {old}, {new} from (select distinct * from {queue}) as q"
            " join {live} as t on {pointed}"
            " join {shadow} as s on {shape} and {same_key}"
            " where not exists (select from {shadow} as k where k.{tb} = t.{tb})"
            " and exists (select from {live} as l where {survivor_live})"
        ).format(
            old=_renamed(r.referenced("t"), r.numbered("was")),
            new=_renamed(r.referenced("s"), r.numbered("now")),
            queue=r.queue, live=_id(r.live), shadow=_id(r.shadow),
            pointed=_equal(r.referenced("t"), r.referenced("q")),
            shape=nulls_exactly(_columns("t"), shape),
            same_key=shape_matches(r.spec, _columns("s"), _columns("t"), shape),
            tb=sql.Identifier(r.spec.tiebreaker),
            survivor_live=_equal(r.referenced("l"), r.referenced("s")))
        for shape in key_shapes(r.spec, not_null)]
    return sql.SQL("create temp table {} on commit drop as {}").format(
        r.survivors, sql.SQL(" union all ").join(per_shape))


def move(r: Repointing) -> list[sql.Composed]:
    """One round: the values written since the last, then every queued value that can move,
    moved and recorded; what cannot move yet stays queued."""
    written = [sql.SQL("({}).{}").format(sql.Identifier("new_row"), sql.Identifier(c))
               for c in r.reference.columns]
    was = [_columns("m")(n) for n in r.numbered("was")]
    now = r.numbered("now")
    return [
        sql.SQL("with taken as (delete from {log} returning new_row)"
                " insert into {queue} select distinct {written} from taken where {present}").format(
            log=_id(r.capture.log), queue=r.queue, written=_list(written),
            present=sql.SQL(" and ").join(sql.SQL("{} is not null").format(w) for w in written)),
        sql.SQL("drop table if exists {}").format(r.survivors),
        _survivors(r),
        # A row moved twice (its new target was replaced in turn) keeps the value it first had.
        sql.SQL(
            "with moved as (update {table} as r set {assign} from {survivors} as m"
            " where {pointing} returning {row_key}, {was}, {now})"
            " insert into {record} select * from moved on conflict ({key}) do update set {later}"
        ).format(
            table=_id(r.reference.table), survivors=r.survivors,
            assign=_list([sql.SQL("{} = m.{}").format(sql.Identifier(c), sql.Identifier(n))
                          for c, n in zip(r.reference.columns, now, strict=True)]),
            pointing=_equal(r.pointing("r"), was),
            row_key=_list([_columns("r")(k) for k in r.reference.row_key]),
            was=_list(was), now=_list([_columns("m")(n) for n in now]),
            record=_id(r.record), key=_names(r.numbered_key()),
            later=_list([sql.SQL("{n} = excluded.{n}").format(n=sql.Identifier(n))
                         for n in now])),
        sql.SQL(
            "delete from {queue} as q where exists (select from {survivors} as m where {moved})"
            " or not exists (select from {live} as t where {pointed} and not exists"
            " (select from {shadow} as k where k.{tb} = t.{tb}))"
        ).format(
            queue=r.queue, survivors=r.survivors,
            moved=_equal(r.referenced("q"), was),
            live=_id(r.live), pointed=_equal(r.referenced("t"), r.referenced("q")),
            shadow=_id(r.shadow), tb=sql.Identifier(r.spec.tiebreaker)),
    ]


def nothing_left(r: Repointing) -> sql.Composed:
    """A check under the lock, after the last round: no reference is left to move."""
    return sql.SQL("select count(*) = 0, count(*) as references_left from {}").format(r.queue)


def moved_rows(r: Repointing) -> sql.Composed:
    return sql.SQL("select count(*) from {}").format(_id(r.record))


def cutover(r: Repointing, drop: bool) -> list[sql.Composed]:
    """Under the lock: `drop`, before the original leaves, the foreign key that follows it;
    else, once the new table has the live name, the same key again against it, NOT VALID, its
    rows checked after the commit; and the capture and trigger that fed the queue go."""
    table = _id(r.reference.table)
    if drop:
        return [sql.SQL("drop trigger {} on {}").format(sql.Identifier(r.unkept_trigger),
                                                        _id(r.shadow)),
                sql.SQL("alter table {} drop constraint {}").format(
                    table, sql.Identifier(r.reference.constraint))]
    return [add_again(r.reference), *capture_remove(r.capture)]


def add_again(reference: Reference) -> sql.Composed:
    """The foreign key, dropped, added again against the table that now has the name it
    references, NOT VALID: its rows are checked after the commit, which blocks no writer."""
    return sql.SQL("alter table {} add constraint {} {} not valid").format(
        _id(reference.table), sql.Identifier(reference.constraint),
        sql.SQL(reference.definition.removesuffix(" NOT VALID")))


def put_back(reference: Reference, record: Relation) -> sql.Composed:
    """For a rollback: each row a swap re-pointed, and nobody moved since, points where it
    pointed before the swap."""
    was, now = _numbered("was", reference.columns), _numbered("now", reference.columns)
    return sql.SQL("update {table} as r set {assign} from {record} as m where {same_row}"
                   " and {still}").format(
        table=_id(reference.table), record=_id(record),
        assign=_list([sql.SQL("{} = m.{}").format(sql.Identifier(c), sql.Identifier(w))
                      for c, w in zip(reference.columns, was, strict=True)]),
        same_row=_equal(
            [_columns("r")(k) for k in reference.row_key],
            [_columns("m")(n) for n in _numbered("row_key", reference.row_key)]),
        still=_equal([_columns("r")(c) for c in reference.columns],
                     [_columns("m")(n) for n in now]))
