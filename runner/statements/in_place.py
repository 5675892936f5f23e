"""Deduplication in place, as statements built from facts alone: the table is never replaced.

For a table with few duplicates, copying every kept row into a new table costs far more than
removing the few others. In place, in named steps, each safe to stop and to run again:

  guard    a trigger on the live table (its key found by an index on the natural key, built
           first without blocking writers) resolves each key the ETL writes under the keep
           rule as the row lands, serialised per key by an advisory lock: a re-sent copy that
           loses goes to the archive at once, and one that wins sends the older copies there;
  keys     the keys to visit: those dbt's key groups found with more than one row, and those
           the change capture saw written since (before the guard was in place), in batches
           of whole keys;
  remove   a batch at a time, in a transaction of its own, every row beaten by another live
           row of its key moves to the archive: `DELETE ... RETURNING` feeding `INSERT`, one
           statement, so a row is in exactly one of them at every commit; rows of other tables
           that point at it move to the kept row of its key first, in the same transaction
           (runner.statements.in_place_repoint);
  index    the natural key's unique index, built CONCURRENTLY; once valid it keeps the key,
           and the guard goes;
  cut-over under a short lock: the index becomes the constraint, the archive takes its dated
           name and swap_log records it all.

A stop anywhere leaves every row in the live table or in the archive; the next `runner swap`
goes on from there (deleting only rows a live row beats, it never removes one twice).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, Relation
from runner.declaration.names import pg_name
from runner.server.catalog import LiveTable
from runner.statements import repoint
from runner.statements.capture import (
    COUNTS,
    REMOVING_IN_PLACE,
    columns_of,
    counts_key,
    fields_of,
)
from runner.statements.in_place_repoint import InPlaceRepointing, KeysOf
from runner.statements.keys import (
    KeyShape,
    beats,
    key_shapes,
    key_terms,
    nulls_exactly,
    shape_matches,
)

GUARD_TRIGGER = "dedup_in_place_guard"
BATCH_ROWS = 20_000
"""Rows per transaction of the remove step, as the key groups count them: each batch holds
whole keys, up to this many of their rows together, so that its time, its row locks and its
WAL stay bounded whether a key has two rows or thousands."""
REPOINTING_BATCH_SHARE = 4
"""Where foreign keys point at the table a batch also locks its keys' rows, moves the rows
that point at the losing ones and checks them: about four times the work a row, so it takes
a quarter of the rows, and a writer of its keys waits about as long (measured with
bench/strategies.py --referenced 10 at 15%: the writer's worst write 1.0 s at the full batch,
0.21 s at a quarter, the run 14% longer)."""


def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def _removing(verb: str, state: str) -> sql.Composed:
    """Turns REMOVING_IN_PLACE on or off until the transaction ends."""
    return sql.SQL("{} set_config({}, {}, true)").format(
        sql.SQL(verb), sql.Literal(REMOVING_IN_PLACE), sql.Literal(state))


@dataclass(frozen=True)
class InPlace:
    """Where an in-place run of one table keeps what it works with, by name, so that the next
    run finds what a stopped one left."""

    live: Relation
    spec: DedupSpec
    shapes: tuple[KeyShape, ...]
    archive: Relation
    """Where the removed rows go while the run works: dated at the cut-over."""
    keys: Relation
    """The keys the remove step visits, numbered in batches."""
    guard: Relation
    """The guard trigger's function."""
    repointings: tuple[InPlaceRepointing, ...] = ()
    """The foreign keys that point at the table, whose rows follow a removed row to the kept
    row of its key (runner.statements.in_place_repoint)."""

    @classmethod
    def of(cls, live: LiveTable, spec: DedupSpec, archive_schema: str) -> InPlace:
        name = live.relation.name
        shapes = tuple(key_shapes(spec, {c.name for c in live.columns if c.not_null}))
        archive = Relation(archive_schema, pg_name(live.relation.schema, name, "removing"))
        return cls(live.relation, spec, shapes, archive,
                   Relation(archive_schema, pg_name(live.relation.schema, name,
                                                    "keys_to_visit")),
                   Relation(archive_schema, pg_name(live.relation.schema, name, "guard")),
                   tuple(InPlaceRepointing.of(reference, live.relation, spec, shapes, archive)
                         for reference in live.references))

    def _keys_of(self, key_of: str) -> KeysOf:
        """The guard's new row, or the keys to visit of batch `%(batch)s`."""
        if key_of == "new":
            return KeysOf("new", sql.SQL(""), sql.SQL("true"))
        return KeysOf(key_of, sql.SQL("{} as {}, ").format(_id(self.keys),
                                                          sql.Identifier(key_of)),
                      sql.SQL("{}.dedup_batch = {}").format(sql.Identifier(key_of),
                                                            sql.Placeholder("batch")))

    def _beaten(self, shape: KeyShape, keys: KeysOf, lock_beating: bool) -> sql.Composed:
        """The live row `l`, of a key of `shape` read from `keys`, is beaten by another live
        row `w` of the same key (under keep: any, equalled); `lock_beating`: `w` is
        share-locked, so the ETL cannot delete it before the commit."""
        key = columns_of(keys.key_of)
        return sql.SQL(
            "{nulls} and {l_matches} and exists (select from {live} as w where {w_matches} and"
            " {beats}{equal}{lock})"
        ).format(nulls=nulls_exactly(key, shape), live=_id(self.live),
                 l_matches=shape_matches(self.spec, columns_of("l"), key, shape),
                 w_matches=shape_matches(self.spec, columns_of("w"), key, shape),
                 beats=beats(self.spec.keep, columns_of("w"), columns_of("l")),
                 equal=self._equal_copies("w", "l"),
                 lock=sql.SQL(" for key share of w") if lock_beating else sql.SQL(""))

    def _remove_losers(self, shape: KeyShape, keys: KeysOf) -> sql.Composed:
        """Every live row of a key of `shape` (the key read from `keys`) that another live
        row of the same key beats, moved to the archive in one statement; one a foreign key
        still points at stays. The beating row is share-locked, so the ETL cannot delete it
        before the commit: no key loses its last row to a run that saw two."""
        return sql.SQL(
            "with removed as (delete from {live} as l{using} where {where} and {beaten}"
            "{unreferenced} returning l.*) insert into {archive} select * from removed"
        ).format(
            live=_id(self.live), archive=_id(self.archive),
            using=sql.SQL("") if keys.key_of == "new" else sql.SQL(" using {} as {}").format(
                _id(self.keys), sql.Identifier(keys.key_of)),
            where=keys.where, beaten=self._beaten(shape, keys, lock_beating=True),
            unreferenced=sql.SQL("").join(sql.SQL(" and {}").format(r.unreferenced("l"))
                                          for r in self.repointings))

    def _beaten_left(self, shape: KeyShape, keys: KeysOf) -> sql.Composed:
        """A check after the move: no live row of the keys is beaten still. The DELETE skips
        a row that a trigger (BEFORE DELETE, returning NULL), a rule or a row security policy
        of the table keeps; its key would stay duplicated, and the unique index could never be
        built."""
        return sql.SQL(
            "select count(*) = 0, count(*) as beaten_rows_not_deleted from {source}{live} as l"
            " where {where} and {beaten}"
        ).format(source=keys.source, live=_id(self.live), where=keys.where,
                 beaten=self._beaten(shape, keys, lock_beating=False))

    def _lock_keys(self, verb: str, shape: KeyShape, keys: KeysOf) -> sql.Composed:
        """Every live row of the keys, locked until the commit, before their rows that lose
        are re-pointed and removed: meanwhile no writer points a row at one, changes one, or
        deletes the one kept."""
        key = columns_of(keys.key_of)
        return sql.SQL("{verb} 1 from {source}{live} as l where {where} and {nulls} and"
                       " {l_matches} for update of l").format(
            verb=sql.SQL(verb), source=keys.source, live=_id(self.live), where=keys.where,
            nulls=nulls_exactly(key, shape),
            l_matches=shape_matches(self.spec, columns_of("l"), key, shape))

    def _repoint_and_remove(self, verb: str, shape: KeyShape, keys: KeysOf
                            ) -> list[sql.Composed]:
        """The losing rows of the keys, re-pointed where foreign keys point at them, then
        moved to the archive."""
        if not self.repointings:
            return [self._remove_losers(shape, keys)]
        moves = [r.move(shape, keys) for r in self.repointings]
        if keys.key_of == "new":
            # A move that would give a referencing table two rows with one key is left out,
            # never the ETL's write: its row keeps pointing at the losing one, which stays, and
            # the remove step's batch then names the key.
            moves = [sql.SQL("begin {}; exception when unique_violation then null; end").format(
                move) for move in moves]
        return [self._lock_keys(verb, shape, keys), *moves, self._remove_losers(shape, keys)]

    def _equal_copies(self, kept: str, removed: str) -> sql.Composable:
        """Under keep: any, a copy leaves only for one equal to it in every column (as text, as
        dbt's test compares them): one the ETL wrote differently stays, and the unique index
        then refuses to be built."""
        if not self.spec.any_copy:
            return sql.SQL("")
        # row(x.*), not x: a column named as the alias would be read instead of the row.
        return sql.SQL(" and row({}.*)::text = row({}.*)::text").format(
            sql.Identifier(kept), sql.Identifier(removed))

    def archive_table(self) -> sql.Composed:
        # The live table's columns alone, generated ones as plain values: the rows as they
        # were, nothing that could fire, constrain or number anything.
        return sql.SQL("create table if not exists {} (like {})").format(
            _id(self.archive), _id(self.live))

    def guard_function(self) -> sql.Composed:
        """The trigger function: after a row of the live table is inserted, or its key
        changed, the key's rows the keep rule does not keep move to the archive."""
        # The capture leaves these deletes out of its log (REMOVING_IN_PLACE), for them alone:
        # the ETL's own writes in the same transaction are logged before and after.
        branches = [sql.SQL("if {} then {}; {}; {}; end if;").format(
            nulls_exactly(columns_of("new"), shape), _removing("perform", "on"),
            sql.SQL("; ").join(self._repoint_and_remove("perform", shape,
                                                        self._keys_of("new"))),
            _removing("perform", "off"))
            for shape in self.shapes]
        key = sql.SQL(", ").join(key_terms(self.spec, columns_of("new")))
        body = sql.SQL(
            # Per key, one writer at a time: the second sees the first's row once it commits.
            "begin perform pg_advisory_xact_lock(hashtextextended(row({key})::text,"
            " tg_relid::bigint)); {branches} return null; end"
        ).format(key=key, branches=sql.SQL(" ").join(branches))
        # SECURITY DEFINER: the ETL's role needs no right in the archive schema; the fixed
        # search_path keeps it from running anything a writer's path could offer.
        return sql.SQL(
            "create or replace function {}() returns trigger language plpgsql security definer"
            " set search_path = pg_catalog, pg_temp as {}"
        ).format(_id(self.guard), sql.Literal(body.as_string()))

    def guard_trigger(self) -> list[sql.Composed]:
        live = _id(self.live)
        return [
            sql.SQL("drop trigger if exists {} on {}").format(sql.Identifier(GUARD_TRIGGER), live),
            sql.SQL("create trigger {} after insert or update of {} on {} for each row"
                    " execute function {}()").format(
                sql.Identifier(GUARD_TRIGGER),
                sql.SQL(", ").join(sql.Identifier(c) for c in self.spec.key_columns), live,
                _id(self.guard)),
        ]

    def collect_keys(self, key_groups: Relation, log: Relation,
                     snapshot: str | None) -> list[sql.Composed]:
        """The keys to visit, numbered in batches: the key groups' duplicated keys, and every
        key the capture logged an insert or update of since the build."""
        names = self.spec.key_columns
        grouped = [*(sql.Identifier(c) for c in self.spec.natural_key),
                   *(sql.SQL("dedup_alternative_{}").format(sql.SQL(str(n)))
                     for n in range(1, len(self.spec.told_apart_by) + 1))]
        unseen = sql.SQL("") if snapshot is None else sql.SQL(
            " and not pg_visible_in_snapshot(xid, {}::pg_snapshot)").format(sql.Literal(snapshot))
        keys = _id(self.keys)
        return [
            sql.SQL("drop table if exists {}").format(keys),
            # A key's batch: where its first row falls in a running count of the rows.
            sql.SQL(
                "create unlogged table {keys} as select div(sum(dedup_rows) over (rows between"
                " unbounded preceding and current row) - dedup_rows, {per_batch})::bigint"
                " as dedup_batch, {names} from (select {names}, max(dedup_rows) as dedup_rows"
                " from (select {grouped}, dedup_rows from {groups} where dedup_rows > 1"
                " union all select {logged}, 1 from {log} where op in ('I', 'U'){unseen})"
                " as k ({names}, dedup_rows) group by {names}) as k"
            ).format(
                keys=keys, per_batch=sql.Literal(
                    BATCH_ROWS // REPOINTING_BATCH_SHARE if self.repointings else BATCH_ROWS),
                grouped=sql.SQL(", ").join(grouped), groups=_id(key_groups),
                logged=sql.SQL(", ").join(key_terms(self.spec, fields_of("new_row"))),
                log=_id(log), unseen=unseen,
                names=sql.SQL(", ").join(sql.Identifier(c) for c in names)),
            sql.SQL("create index on {} (dedup_batch)").format(keys),
            sql.SQL("analyze {}").format(keys),
        ]

    def batches(self) -> sql.Composed:
        return sql.SQL("select coalesce(max(dedup_batch) + 1, 0) from {}").format(_id(self.keys))

    def remove_batch(self) -> list[tuple[str, sql.Composed, bool]]:
        """One batch of keys, `%(batch)s`, as (why, statement, whether it checks): per shape of
        key, its losing rows re-pointed where foreign keys point at them, checked to be
        pointed at no more, and moved to the archive, the deletes left out of the capture's
        log."""
        keys = self._keys_of("k")
        why = "the batch's rows that a live row of their key beats move to the archive"
        steps = [(why, _removing("select", "on"), False)]
        for shape in self.shapes:
            *repointed, removed = self._repoint_and_remove("select", shape, keys)
            steps += [("the batch's keys' rows, locked, and the rows that point at those that "
                       "lose, moved to the kept row of their key", statement, False)
                      for statement in repointed]
            steps += [(why_not, check, True) for why_not, check in (
                r.still_pointing(shape, keys) for r in self.repointings)]
            steps.append((why, removed, False))
            steps.append((f"every row of the batch's keys that a live row beats was deleted (a "
                          f"trigger, rule or row security policy of {self.live} keeps the rest: "
                          f"swap the table, strategy: swap, or disable it for the run)",
                          self._beaten_left(shape, keys), True))
        return steps

    def archive_proven(self, log: Relation) -> list[tuple[str, sql.Composed]]:
        """Checks before the cut-over, each true or the run stops: no archived row is live
        still; and every archived row lost to a live row of its key, unless the ETL itself
        deleted or changed a row of that key since. Under keep: any, a copy equal to a live row
        is that row in every way that tells: the second check alone applies, with equal in
        place of beats."""
        if self.spec.any_copy:
            return [("every archived copy is equal to a live row of its key",
                     self._unexplained(log, "archived_copies_equal_to_no_live_row"))]
        tiebreaker = sql.Identifier(self.spec.tiebreaker)
        in_both = sql.SQL(
            "select count(*) = 0, count(*) as archived_rows_live_still from {archive}"
            " as a where exists (select from {live} as l where l.{t} = a.{t})").format(
                archive=_id(self.archive), live=_id(self.live), t=tiebreaker)
        return [("no archived row is live still", in_both),
                ("every archived row lost to a live row of its key", self._unexplained(
                    log, "archived_rows_no_live_row_beats"))]

    def _unexplained(self, log: Relation, counted_as: str) -> sql.Composed:
        """True when every archived row has a live row of its key that wins over it (beats it;
        under keep: any, equals it), or the capture logged the ETL deleting or changing a row
        of that key (one the archive does not hold, where a tie-breaker tells rows apart)."""
        archive, live = _id(self.archive), _id(self.live)
        if self.spec.any_copy:
            wins, not_archived = self._equal_copies("w", "l"), sql.SQL("")
        else:
            t = sql.Identifier(self.spec.tiebreaker)
            wins = sql.SQL(" and {}").format(beats(self.spec.keep, columns_of("w"),
                                                   columns_of("l")))
            not_archived = sql.SQL(" and not exists (select from {} as a where a.{} ="
                                   " (c.old_row).{})").format(archive, t, t)
        # OFFSET 0 keeps each NOT EXISTS a probe per archived row, by the key's index: as an
        # anti join the planner hashed the whole live table (0.9 s of 2 million rows, for
        # 20,000 archived), so the check cost what the table holds, not what was removed.
        counts = [sql.SQL(
            "select count(*) from {archive} as l where {nulls} and not exists (select from"
            " {live} as w where {w_matches}{wins} offset 0) and not exists (select from {log}"
            " as c where c.op in ('D', 'U') and {c_matches}{not_archived})").format(
                archive=archive, live=live, log=_id(log), wins=wins, not_archived=not_archived,
                nulls=nulls_exactly(columns_of("l"), shape),
                w_matches=shape_matches(self.spec, columns_of("w"), columns_of("l"), shape),
                c_matches=shape_matches(self.spec, fields_of("c.old_row"), columns_of("l"),
                                        shape))
            for shape in self.shapes]
        # OFFSET 0: the count once, not once for each column that reads it.
        return sql.SQL("select n = 0, n as {} from (select {} as n offset 0) as counted").format(
            sql.Identifier(counted_as), sql.SQL(" + ").join(sql.SQL("({})").format(c)
                                                            for c in counts))

    def count_removed(self) -> sql.Composed:
        """Before the lock, with the guard gone and the archive final: the rows it holds.
        (The capture's log is counted under the lock: its change ids are not in commit order,
        so no part of it read before could be told apart from what came after. It holds the
        ETL's writes alone, not the run's deletes, so that count stays small.)"""
        return sql.SQL(
            "insert into pg_temp.{counts} (live, removed_rows) select {key}, count(*)"
            " from {archive}").format(counts=sql.Identifier(COUNTS), key=counts_key(self.live),
                 archive=_id(self.archive))

    def removed_rows(self) -> sql.Composed:
        return sql.SQL("(select removed_rows from pg_temp.{} where live = {})").format(
            sql.Identifier(COUNTS), counts_key(self.live))

    def undo_guard(self) -> list[sql.Composed]:
        return [sql.SQL("drop trigger if exists {} on {}").format(
                    sql.Identifier(GUARD_TRIGGER), _id(self.live)),
                sql.SQL("drop function if exists {}()").format(_id(self.guard)),
                *(statement for r in self.repointings for statement in r.undo()),
                # `runner capture` logs what the ETL writes into them for a swap to read.
                *(statement for r in self.repointings for statement in repoint.capture_remove(
                    repoint.ReferenceCapture.of(r.reference, self.archive.schema))),
                sql.SQL("drop table if exists {}").format(_id(self.keys))]
