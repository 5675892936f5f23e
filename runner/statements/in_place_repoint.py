"""Re-pointing in place: the rows of other tables that point at a duplicate an in-place run
removes move to the kept row of its key first, in the transaction that removes it. Every foreign
key stays as it is, enforced throughout, and no delete of a duplicate fails or cascades.

  lock      before a key's losing rows leave (in a batch of the remove step, or in the guard as
            the ETL writes the key), all the key's rows are locked FOR UPDATE: no writer can
            point a row at one of them, or delete the kept one, until the commit;
  move      each row that points at a losing row then points at the kept row of its key, and the
            record keeps the value it had, for a rollback to put back;
  delete    a losing row leaves only if nothing points at it still (a trigger or a row security
            policy of the referencing table could have kept a row from moving): the delete never
            fails and never cascades. The remove step checks it, and stops with the count;
  redirect  until the unique index keeps the key, a row the ETL writes pointing at a removed row
            (it read the id before the row left, or got it back from a re-sent copy that the
            guard sent straight to the archive) is pointed at the kept row of that row's key,
            before its foreign key is checked.

Each statement is built from facts alone; runner.statements.in_place places them in its steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, Relation
from runner.declaration.names import pg_name
from runner.server.catalog import Reference
from runner.statements.keys import KeyShape, beats, keep_order, nulls_exactly, shape_matches
from runner.statements.repoint import (
    all_equal,
    column_of,
    comma_list,
    names_list,
    numbered,
    renamed,
)

REDIRECT_TRIGGER = "dedup_in_place_redirect"


def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def _terms(of: Callable[[str], sql.Composed], names: tuple[str, ...] | list[str]
           ) -> list[sql.Composed]:
    return [of(n) for n in names]


@dataclass(frozen=True)
class KeysOf:
    """Where a statement reads the keys whose losing rows it handles: the trigger's new row, or
    the keys to visit of one batch."""

    key_of: str
    """The alias whose columns hold the key: `new`, or `k`."""
    source: sql.Composable
    """What the FROM list needs before the live table, ending in a comma, or nothing."""
    where: sql.Composable


@dataclass(frozen=True)
class InPlaceRepointing:
    """One foreign key that points at a table deduplicated in place, and where the run keeps
    what it moved."""

    reference: Reference
    live: Relation
    spec: DedupSpec
    shapes: tuple[KeyShape, ...]
    archive: Relation
    """The run's archive of removed rows, as it works."""
    record: Relation
    """Each moved row by its primary key, the value it pointed at and the one it points at now;
    dated with the archive at the cut-over."""
    redirect: Relation
    """The function of the trigger that redirects what the ETL writes meanwhile."""

    @classmethod
    def of(cls, reference: Reference, live: Relation, spec: DedupSpec,
           shapes: tuple[KeyShape, ...], archive: Relation) -> InPlaceRepointing:
        table, name = reference.table, reference.constraint
        return cls(reference, live, spec, shapes, archive,
                   Relation(archive.schema, pg_name(archive.name, table.name, name)),
                   Relation(archive.schema, pg_name(table.schema, table.name, name, "redirect")))

    @property
    def trigger(self) -> sql.Identifier:
        return sql.Identifier(pg_name(REDIRECT_TRIGGER, self.reference.constraint))

    def _index_names(self, archive: Relation) -> tuple[str, str]:
        """The record's index on the moved rows' primary key, and the archive's on the columns
        this key points at, named after the tables they index at the time."""
        return (pg_name(pg_name(archive.name, self.reference.table.name,
                                self.reference.constraint), "row_key"),
                pg_name(archive.name, self.reference.constraint, "pointed_at"))

    def _pointing(self, alias: str) -> list[sql.Composed]:
        return _terms(column_of(alias), self.reference.columns)

    def _pointed(self, alias: str) -> list[sql.Composed]:
        return _terms(column_of(alias), self.reference.referenced)

    def _row_key(self) -> list[str]:
        return numbered("row_key", self.reference.row_key)

    def setup(self) -> list[sql.Composed]:
        """In the guard's transaction, each safe to run again: the record, the archive's index
        on the columns pointed at (the redirect looks removed rows up by them), and the
        redirect's function and trigger, which needs a moment's SHARE ROW EXCLUSIVE on the
        referencing table."""
        r, table = self.reference, _id(self.reference.table)
        row_key_index, pointed_index = self._index_names(self.archive)
        body = self._redirect_body()
        return [
            sql.SQL("create table if not exists {record} as select {row_key}, {was}, {now}"
                    " from {table} as r with no data").format(
                record=_id(self.record), table=table,
                row_key=renamed(_terms(column_of("r"), r.row_key), self._row_key()),
                was=renamed(self._pointing("r"), numbered("was", r.columns)),
                now=renamed(self._pointing("r"), numbered("now", r.columns))),
            sql.SQL("create unique index if not exists {} on {} ({})").format(
                sql.Identifier(row_key_index), _id(self.record), names_list(self._row_key())),
            sql.SQL("create index if not exists {} on {} ({})").format(
                sql.Identifier(pointed_index), _id(self.archive), names_list(list(r.referenced))),
            # SECURITY DEFINER, as the guard: the ETL's role needs no right in the archive
            # schema, and the fixed search_path keeps it from running anything a path offers.
            sql.SQL("create or replace function {}() returns trigger language plpgsql"
                    " security definer set search_path = pg_catalog, pg_temp as {}").format(
                _id(self.redirect), sql.Literal(body.as_string())),
            sql.SQL("drop trigger if exists {} on {}").format(self.trigger, table),
            sql.SQL("create trigger {} before insert or update of {} on {} for each row"
                    " execute function {}()").format(
                self.trigger, names_list(list(r.columns)), table, _id(self.redirect)),
        ]

    def _redirect_body(self) -> sql.Composed:
        """A row written pointing at a row the run removed points at the kept row of that row's
        key instead, where the key has one, and the record says so; anything else passes as it
        is, for the foreign key to judge."""
        r = self.reference
        new = self._pointing("new")
        kept = _terms(column_of("kept"), r.referenced)
        found_kept = [sql.SQL(
            "if {shape} then select {pointed} into kept from {live} as w where {same_key}"
            " order by {keep} limit 1 for key share; found_kept := found; end if;").format(
                shape=nulls_exactly(column_of("gone"), shape),
                pointed=names_list(list(r.referenced)), live=_id(self.live),
                same_key=shape_matches(self.spec, column_of("w"), column_of("gone"), shape),
                keep=keep_order(self.spec))
            for shape in self.shapes]
        return sql.SQL(
            "declare gone record; kept record; found_kept boolean := false; begin"
            " if {any_null} then return new; end if;"
            # Locked, a live row stays until the writer commits; one a batch is removing is
            # waited for, and then found gone.
            " perform 1 from {live} as l where {live_row} for key share;"
            " if found then return new; end if;"
            " select * into gone from {archive} as a where {archived} limit 1;"
            " if not found then return new; end if;"
            " {found_kept}"
            " if not found_kept then return new; end if;"
            # Pointed first, so that a primary key holding the foreign key is recorded as the
            # row has it; where it pointed is the removed row's.
            " {assign} insert into {record} values ({row_key}, {was}, {kept})"
            " on conflict ({key}) do update set {again}; return new; end"
        ).format(
            any_null=sql.SQL(" or ").join(sql.SQL("{} is null").format(n) for n in new),
            live=_id(self.live), live_row=all_equal(self._pointed("l"), new),
            archive=_id(self.archive), archived=all_equal(self._pointed("a"), new),
            found_kept=sql.SQL(" ").join(found_kept), record=_id(self.record),
            row_key=comma_list(_terms(column_of("new"), r.row_key)),
            was=comma_list(self._pointed("gone")),
            kept=comma_list(kept),
            key=names_list(self._row_key()),
            # What the ETL wrote last is what a rollback puts back.
            again=comma_list([sql.SQL("{n} = excluded.{n}").format(n=sql.Identifier(n))
                         for n in (*numbered("was", r.columns), *numbered("now", r.columns))]),
            assign=sql.SQL(" ").join(sql.SQL("new.{} := {};").format(sql.Identifier(c), k)
                                     for c, k in zip(r.columns, kept, strict=True)))

    def _losing(self, shape: KeyShape, keys: KeysOf) -> sql.Composed:
        """The FROM list and conditions of the live rows `l` of the keys that lose to the key's
        kept row `w`."""
        live = _id(self.live)
        key = column_of(keys.key_of)
        return sql.SQL(
            "{source}{live} as l, lateral (select * from {live} as w where {w_same_key}"
            " order by {keep} limit 1) as w where {where} and {nulls} and {l_matches}"
            " and {beats}").format(
            source=keys.source, live=live,
            w_same_key=shape_matches(self.spec, column_of("w"), column_of("l"), shape),
            keep=keep_order(self.spec), where=keys.where, nulls=nulls_exactly(key, shape),
            l_matches=shape_matches(self.spec, column_of("l"), key, shape),
            beats=beats(self.spec.keep, column_of("w"), column_of("l")))

    def move(self, shape: KeyShape, keys: KeysOf) -> sql.Composed:
        """The rows that point at a losing row of the keys point at the kept row of its key,
        recorded; one moved again keeps the value it had first."""
        r = self.reference
        now = numbered("now", r.columns)
        return sql.SQL(
            "with moved as (update {table} as r set {assign} from {losing} and {points}"
            " and {kept_present} returning {row_key}, {was}, {now})"
            " insert into {record} select * from moved on conflict ({key}) do update set {later}"
        ).format(
            table=_id(r.table),
            assign=comma_list([sql.SQL("{} = {}").format(sql.Identifier(c), p)
                          for c, p in zip(r.columns, self._pointed("w"), strict=True)]),
            losing=self._losing(shape, keys),
            points=all_equal(self._pointing("r"), self._pointed("l")),
            kept_present=sql.SQL(" and ").join(sql.SQL("{} is not null").format(p)
                                               for p in self._pointed("w")),
            row_key=comma_list(_terms(column_of("r"), r.row_key)),
            was=comma_list(self._pointed("l")),
            now=comma_list(self._pointed("w")), record=_id(self.record),
            key=names_list(self._row_key()),
            later=comma_list([sql.SQL("{n} = excluded.{n}").format(n=sql.Identifier(n))
                              for n in now]))

    def still_pointing(self, shape: KeyShape, keys: KeysOf) -> tuple[str, sql.Composed]:
        """A check after the moves: no row points at a losing row still."""
        return (f"no row of {self.reference.shown} points at a duplicate of the batch still (a "
                f"trigger or row security policy of {self.reference.table} would keep one from "
                f"moving, as would a kept row without ({', '.join(self.reference.referenced)}))",
                sql.SQL("select count(*) = 0, count(*) as rows_pointing_at_duplicates"
                        " from {table} as r, {losing} and {points}").format(
                    table=_id(self.reference.table), losing=self._losing(shape, keys),
                    points=all_equal(self._pointing("r"), self._pointed("l"))))

    def unreferenced(self, alias: str) -> sql.Composed:
        """The live row `alias` is not pointed at by this key: it may leave without the
        foreign key acting."""
        return sql.SQL("not exists (select from {} as r where {})").format(
            _id(self.reference.table), all_equal(self._pointing("r"), self._pointed(alias)))

    def undo(self) -> list[sql.Composed]:
        return [sql.SQL("drop trigger if exists {} on {}").format(self.trigger,
                                                                  _id(self.reference.table)),
                sql.SQL("drop function if exists {}()").format(_id(self.redirect))]

    def at(self, archive: Relation) -> InPlaceRepointing:
        """The same, once the archive has the dated name `archive`."""
        return InPlaceRepointing.of(self.reference, self.live, self.spec, self.shapes, archive)

    def dated(self, archive: Relation) -> tuple[Relation, list[sql.Composed]]:
        """At the cut-over, with the archive that takes its dated name: the record's dated
        name, and the renames that give it and the indexes the run made theirs."""
        dated = self.at(archive)
        renamed = zip(self._index_names(self.archive), dated._index_names(archive), strict=True)
        return dated.record, [
            sql.SQL("alter table {} rename to {}").format(_id(self.record),
                                                          sql.Identifier(dated.record.name)),
            *(sql.SQL("alter index {} rename to {}").format(
                sql.Identifier(self.archive.schema, old), sql.Identifier(new))
              for old, new in renamed)]
