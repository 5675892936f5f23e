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
is recorded with the value it had, for a rollback to put back. A moved row belongs with the
kept row of the key its original row has at the commit: when the ETL re-keys the original, or
the kept row it was moved to, the replay notes the change and the row moves again. Under the
lock the queue ends empty, the foreign key is added again against the new table, NOT VALID,
and checked after the commit. Every statement here is built from facts alone; runner.jobs.swap
runs them.
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


def column_of(alias: str) -> Callable[[str], sql.Composed]:
    return lambda name: sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(name))


def comma_list(terms: list[sql.Composable]) -> sql.Composed:
    return sql.SQL(", ").join(terms)


def names_list(names: list[str]) -> sql.Composed:
    return comma_list([sql.Identifier(n) for n in names])


def renamed(terms: list[sql.Composable], names: list[str]) -> sql.Composed:
    return comma_list([sql.SQL("{} as {}").format(t, sql.Identifier(n))
                  for t, n in zip(terms, names, strict=True)])


def all_equal(left: list[sql.Composable], right: list[sql.Composable]) -> sql.Composed:
    return sql.SQL(" and ").join(sql.SQL("{} = {}").format(a, b)
                                 for a, b in zip(left, right, strict=True))


def numbered(prefix: str, columns: tuple[str, ...]) -> list[str]:
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
    def changed(self) -> sql.Identifier:
        return self._temp("dedup_changed")

    @property
    def again(self) -> sql.Identifier:
        return self._temp("dedup_again")

    @property
    def unkept_trigger(self) -> str:
        return pg_name("dedup_unkept", self.reference.table.name, self.reference.constraint)

    @property
    def unkept_function(self) -> sql.Identifier:
        return self._temp("dedup_unkept")

    def referenced(self, alias: str) -> list[sql.Composed]:
        return [column_of(alias)(c) for c in self.reference.referenced]

    def pointing(self, alias: str) -> list[sql.Composed]:
        return [column_of(alias)(c) for c in self.reference.columns]

    def numbered(self, prefix: str) -> list[str]:
        return numbered(prefix, self.reference.columns)

    def numbered_key(self) -> list[str]:
        return numbered("row_key", self.reference.row_key)


def capture_install(c: ReferenceCapture) -> list[sql.Composed]:
    """What logs the values written into the foreign key, committed before the swap's
    transaction so that every write after it is seen; needs a short SHARE ROW EXCLUSIVE on the
    referencing table. The log holds the foreign key's columns alone, each of its own type, so
    that a partitioned referencing table, whose partitions' rows are of their own types, logs
    the same."""
    table, log = _id(c.reference.table), _id(c.log)
    columns = list(c.reference.columns)
    logged = numbered("pointed", c.reference.columns)
    body = sql.SQL("begin insert into {} ({}) values ({}); return null; end").format(
        log, names_list(logged), comma_list([sql.SQL("new.{}").format(sql.Identifier(n))
                                     for n in columns]))
    return [
        *capture_remove(c),
        sql.SQL("create table {} as select {} from {} as r with no data").format(
            log, renamed([column_of("r")(n) for n in columns], logged), table),
        sql.SQL("alter table {} add column change_id bigint generated always as identity"
                " primary key").format(log),
        # As the change capture's: the writers need no right in the archive schema.
        sql.SQL("create function {}() returns trigger language plpgsql security definer"
                " set search_path = pg_catalog, pg_temp as {}").format(
                    _id(c.function), sql.Literal(body.as_string())),
        sql.SQL("create trigger {} after insert or update of {} on {} for each row"
                " execute function {}()").format(
                    sql.Identifier(c.trigger), names_list(columns), table, _id(c.function)),
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
        queue=r.queue, values=comma_list(r.referenced("gone")))
    referenced = names_list(list(r.reference.referenced))
    return [
        *(sql.SQL("create temp table {} on commit drop as select {} from {} with no data").format(
            table, referenced, _id(r.live)) for table in (r.queue, r.changed)),
        sql.SQL("create function {}() returns trigger language plpgsql as {}").format(
            r.unkept_function, sql.Literal(body.as_string())),
        sql.SQL("create trigger {} after delete on {} referencing old table as gone"
                " for each statement execute function {}()").format(
                    sql.Identifier(r.unkept_trigger), shadow, r.unkept_function),
        sql.SQL("drop table if exists {}").format(_id(r.record)),
        sql.SQL("create table {record} as select {row_key}, {was}, {now} from {table} as r"
                " with no data").format(
            record=_id(r.record),
            row_key=renamed([column_of("r")(k) for k in r.reference.row_key], r.numbered_key()),
            was=renamed(r.pointing("r"), r.numbered("was")),
            now=renamed(r.pointing("r"), r.numbered("now")),
            table=_id(r.reference.table)),
        sql.SQL("alter table {} add primary key ({})").format(_id(r.record),
                                                              names_list(r.numbered_key())),
        # The rows to move again are found by where they pointed and where they point.
        *(sql.SQL("create index on {} ({})").format(_id(r.record), names_list(r.numbered(prefix)))
          for prefix in ("was", "now")),
        sql.SQL("insert into {queue} select distinct {values} from {live} as t"
                " where exists (select from {table} as r where {points})"
                " and not exists (select from {shadow} as k where k.{tb} = t.{tb})").format(
            queue=r.queue, values=comma_list(r.referenced("t")), live=_id(r.live),
            table=_id(r.reference.table), points=all_equal(r.pointing("r"), r.referenced("t")),
            shadow=shadow, tb=sql.Identifier(r.spec.tiebreaker)),
    ]


def note_changed(r: Repointing, batch: sql.Identifier) -> sql.Composed:
    """After each replayed batch of the live table's changes: the rows it updated, any of
    which may be a moved row's original or the kept row it was moved to, and may have a key of
    its own now."""
    def values(row: str) -> sql.Composed:
        return comma_list([sql.SQL("({}).{}").format(sql.Identifier(row), sql.Identifier(c))
                      for c in r.reference.referenced])
    return sql.SQL("insert into {changed} select {old} from {batch} where op = 'U'"
                   " union select {new} from {batch} where op = 'U'").format(
        changed=r.changed, old=values("old_row"), new=values("new_row"), batch=batch)


def _per_shape(r: Repointing, template: str, **parts: sql.Composable) -> sql.Composed:
    """`template` once per shape of key, with `shape` (the live row `t`'s key has it) and
    `same_key` (the new table's row `s` has that key), so that the new table's unique index
    finds `s`; the queries joined by UNION ALL."""
    not_null = {c.name for c in r.columns if c.not_null}
    return sql.SQL(" union all ").join(
        sql.SQL(template).format(
            shape=nulls_exactly(column_of("t"), shape),
            same_key=shape_matches(r.spec, column_of("s"), column_of("t"), shape), **parts)
        for shape in key_shapes(r.spec, not_null))


def _move_again(r: Repointing) -> list[sql.Composed]:
    """The moved rows whose original or new target the ETL changed since: each moves to the
    kept row of the key its original has now, once that row is in the live table too."""
    was, now = r.numbered("was"), r.numbered("now")
    target = r.numbered("target")
    related = sql.SQL(" or ").join(
        sql.SQL("exists (select from {} as c where {})").format(
            r.changed, all_equal(r.referenced("c"), [column_of("m")(n) for n in names]))
        for names in (was, now))
    return [
        sql.SQL("drop table if exists {}").format(r.again),
        sql.SQL("create temp table {} on commit drop as {}").format(r.again, _per_shape(
            r, "select {row_key}, {was}, {now}, {target},"
               " exists (select from {live} as l where {kept_live}) as ready"
               " from {record} as m join {live} as t on {original}"
               " join {shadow} as s on {shape} and {same_key} where {related}",
            row_key=comma_list([column_of("m")(n) for n in r.numbered_key()]),
            was=comma_list([column_of("m")(n) for n in was]),
            now=comma_list([column_of("m")(n) for n in now]),
            target=renamed(r.referenced("s"), target), live=_id(r.live),
            kept_live=all_equal(r.referenced("l"), r.referenced("s")), record=_id(r.record),
            original=all_equal(r.referenced("t"), [column_of("m")(n) for n in was]),
            shadow=_id(r.shadow), related=related)),
        sql.SQL(
            "with moved as (update {table} as r set {assign} from {again} as a"
            " where a.ready and ({targets}) <> ({nows}) and {same_row} and {still}"
            " returning {row_key}, {moved_to})"
            " update {record} as m set {record_now} from moved where {recorded}"
        ).format(
            table=_id(r.reference.table), again=r.again,
            assign=comma_list([sql.SQL("{} = a.{}").format(sql.Identifier(c), sql.Identifier(t))
                          for c, t in zip(r.reference.columns, target, strict=True)]),
            targets=comma_list([column_of("a")(t) for t in target]),
            nows=comma_list([column_of("a")(n) for n in now]),
            same_row=all_equal([column_of("r")(k) for k in r.reference.row_key],
                            [column_of("a")(n) for n in r.numbered_key()]),
            still=all_equal(r.pointing("r"), [column_of("a")(n) for n in now]),
            row_key=comma_list([column_of("a")(n) for n in r.numbered_key()]),
            moved_to=comma_list([column_of("a")(t) for t in target]), record=_id(r.record),
            record_now=comma_list([sql.SQL("{} = moved.{}").format(sql.Identifier(n),
                                                              sql.Identifier(t))
                              for n, t in zip(now, target, strict=True)]),
            recorded=all_equal([column_of("m")(n) for n in r.numbered_key()],
                            [column_of("moved")(n) for n in r.numbered_key()])),
        # What waits for its kept row to reach the live table stays noted for the next round.
        sql.SQL("delete from {changed} as c where not exists (select from {again} as a"
                " where not a.ready and ({was_match} or {now_match}))").format(
            changed=r.changed, again=r.again,
            was_match=all_equal(r.referenced("c"), [column_of("a")(n) for n in was]),
            now_match=all_equal(r.referenced("c"), [column_of("a")(n) for n in now])),
    ]


def _survivors(r: Repointing) -> sql.Composed:
    """Each queued value whose row the new table does not keep, with the one of its key the
    new table keeps, where that one is in the live table too."""
    return sql.SQL("create temp table {} on commit drop as {}").format(r.survivors, _per_shape(
        r, "select distinct {old}, {new} from (select distinct * from {queue}) as q"
           " join {live} as t on {pointed} join {shadow} as s on {shape} and {same_key}"
           " where not exists (select from {shadow} as k where k.{tb} = t.{tb})"
           " and exists (select from {live} as l where {survivor_live})",
        old=renamed(r.referenced("t"), r.numbered("was")),
        new=renamed(r.referenced("s"), r.numbered("now")),
        queue=r.queue, live=_id(r.live), shadow=_id(r.shadow),
        pointed=all_equal(r.referenced("t"), r.referenced("q")),
        tb=sql.Identifier(r.spec.tiebreaker),
        survivor_live=all_equal(r.referenced("l"), r.referenced("s"))))


def move(r: Repointing) -> list[sql.Composed]:
    """One round: the moved rows whose targets changed move again; then the values written
    since the last round are queued, and every queued value that can move is moved and
    recorded; what cannot move yet stays queued."""
    written = [sql.Identifier(n) for n in numbered("pointed", r.reference.columns)]
    was = [column_of("m")(n) for n in r.numbered("was")]
    now = r.numbered("now")
    return [
        *_move_again(r),
        sql.SQL("with taken as (delete from {log} returning {written})"
                " insert into {queue} select distinct {written} from taken where {present}").format(
            log=_id(r.capture.log), queue=r.queue, written=comma_list(written),
            present=sql.SQL(" and ").join(sql.SQL("{} is not null").format(w) for w in written)),
        # The queue held every value to move at first: without fresh statistics the planner
        # would take its few left under the lock for as many, and scan the tables for them.
        sql.SQL("analyze {}").format(r.queue),
        sql.SQL("drop table if exists {}").format(r.survivors),
        _survivors(r),
        # A row moved twice (its new target was replaced in turn) keeps the value it first had.
        sql.SQL(
            "with moved as (update {table} as r set {assign} from {survivors} as m"
            " where {pointing} returning {row_key}, {was}, {now})"
            " insert into {record} select * from moved on conflict ({key}) do update set {later}"
        ).format(
            table=_id(r.reference.table), survivors=r.survivors,
            assign=comma_list([sql.SQL("{} = m.{}").format(sql.Identifier(c), sql.Identifier(n))
                          for c, n in zip(r.reference.columns, now, strict=True)]),
            pointing=all_equal(r.pointing("r"), was),
            row_key=comma_list([column_of("r")(k) for k in r.reference.row_key]),
            was=comma_list(was), now=comma_list([column_of("m")(n) for n in now]),
            record=_id(r.record), key=names_list(r.numbered_key()),
            later=comma_list([sql.SQL("{n} = excluded.{n}").format(n=sql.Identifier(n))
                         for n in now])),
        # Two statements, not one with OR: an OR of sublinks is planned as hashed subplans,
        # each a scan of a whole table.
        sql.SQL("delete from {queue} as q using {survivors} as m where {moved}").format(
            queue=r.queue, survivors=r.survivors, moved=all_equal(r.referenced("q"), was)),
        sql.SQL(
            "delete from {queue} as q where not exists (select from {live} as t where {pointed}"
            " and not exists (select from {shadow} as k where k.{tb} = t.{tb}))"
        ).format(
            queue=r.queue, live=_id(r.live),
            pointed=all_equal(r.referenced("t"), r.referenced("q")),
            shadow=_id(r.shadow), tb=sql.Identifier(r.spec.tiebreaker)),
    ]


def all_moved(r: Repointing) -> sql.Composed:
    """A check after each round: no row points at a value the round moved, unless the ETL
    wrote that value again since (its next round moves it). A trigger of the referencing
    table that kept its row from changing, or a policy that hid it, would leave it dangling."""
    pointed = [column_of("g")(n) for n in numbered("pointed", r.reference.columns)]
    return sql.SQL(
        "select count(*) = 0, count(*) as rows_left_pointing_at_removed_rows"
        " from {table} as r join {survivors} as m on {moved}"
        " where not exists (select from {log} as g where {written_again})"
    ).format(table=_id(r.reference.table), survivors=r.survivors,
             moved=all_equal(r.pointing("r"), [column_of("m")(n) for n in r.numbered("was")]),
             log=_id(r.capture.log), written_again=all_equal(pointed, r.pointing("r")))


def nothing_left(r: Repointing) -> sql.Composed:
    """A check under the lock, after the last round: no reference is left to move."""
    return sql.SQL("select count(*) = 0, count(*) as references_left from (select from {}"
                   " union all select from {}) as waiting").format(r.queue, r.changed)


def moved_rows(record: Relation) -> sql.Composed:
    return sql.SQL("select count(*) from {}").format(_id(record))


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
    was, now = numbered("was", reference.columns), numbered("now", reference.columns)
    return sql.SQL("update {table} as r set {assign} from {record} as m where {same_row}"
                   " and {still}").format(
        table=_id(reference.table), record=_id(record),
        assign=comma_list([sql.SQL("{} = m.{}").format(sql.Identifier(c), sql.Identifier(w))
                      for c, w in zip(reference.columns, was, strict=True)]),
        same_row=all_equal(
            [column_of("r")(k) for k in reference.row_key],
            [column_of("m")(n) for n in numbered("row_key", reference.row_key)]),
        still=all_equal([column_of("r")(c) for c in reference.columns],
                     [column_of("m")(n) for n in now]))
