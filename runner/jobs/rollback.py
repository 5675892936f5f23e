"""Undo a swap: the original table back in place, duplicates and all, with every write made to
the deduplicated table since the swap, proven before the commit.

The swap started a change capture on the deduplicated table in its own transaction, so the
rollback knows, rather than infers, what the ETL inserted, updated and deleted since. In one
transaction it counts the original against the rows the swap recorded at its commit, carries
the captured writes over to it batch by batch (runner.statements.restore, each batch proven),
proves every row of the deduplicated table to be in it, then takes the lock, carries over the
last few writes, and puts the original back under the live name. The deduplicated table moves to the
archive schema, where it constrains and fires nothing; `runner cleanup` drops what is kept
past a retention age.

Statements are built from facts alone, so that --dry-run prints exactly what runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.declaration.names import null_key_index_names, pg_name
from runner.errors import RunnerError
from runner.execution import executor, locking
from runner.execution.executor import ASYNC_COMMIT, NO_JIT, run_batched, run_steps
from runner.execution.locking import lock_timeout
from runner.server import catalog, privileges, swap_log
from runner.server.captures import Registered, registered_captures
from runner.server.catalog import Index, LiveTable
from runner.server.swap_log import LogEntry, when
from runner.statements import capture, repoint, restore
from runner.statements.plan import (
    Step,
    left_to_validate,
    materialized_views_read,
    not_valid,
    own_triggers,
    recreate_materialized_views,
    recreate_view,
    validate_steps,
)

ROLLED_BACK = "rolled_back"
# Carry over outside the lock until fewer changes than this wait.


@dataclass(frozen=True)
class RollbackOptions:
    select: list[str] | None = None
    archive_schema: str = swap_log.DEFAULT_ARCHIVE_SCHEMA
    lock_timeout_ms: int = 100
    """How long one attempt waits for the lock: the longest anyone queues behind the runner."""
    lock_wait_s: float = 60.0
    """How long all attempts together may take before the runner gives up."""
    postpone: Path | None = None
    """While this file exists, the rollback catches up with the ETL instead of cutting over."""


@dataclass
class TableRollback:
    entry: LogEntry
    rolled_back: Relation | None = None
    """Where the deduplicated table is kept after the rollback."""
    archive: Relation | None = None
    restore: restore.Restore | None = None
    materialized_views: tuple[Relation, ...] = ()
    """The materialized views the cut-over creates again: their readers can hold it off too."""
    repointed: tuple[swap_log.Repointed, ...] = ()
    """The foreign keys whose rows the swap re-pointed, and that still point at the table:
    added again against the original, and their rows put back."""
    prepare: list[Step] = field(default_factory=list)
    """Before the lock, with the archive locked."""
    locked: list[Step] = field(default_factory=list)
    """Under the lock, before any row is written: statements that lock other tables."""
    cutover: list[Step] = field(default_factory=list)
    validate: list[Step] = field(default_factory=list)
    """After the commit, one transaction each: foreign keys checked without blocking writers."""
    notes: list[str] = field(default_factory=list)
    finishing: bool = False
    """Rolled back already, by a run stopped before it checked the foreign keys: only those."""


@dataclass(frozen=True)
class RollbackResult:
    plans: list[TableRollback]
    lock_ms: float
    """How long the tables were held under ACCESS EXCLUSIVE, until the commit."""
    attempts: int
    carried: dict[Relation, tuple[int, int, int, int]]
    """Rows inserted, updated and deleted since the swap, carried over to the original, and
    the rows the restored table has."""
    notes: list[str] = field(default_factory=list)
    """What the commit left to do by hand: foreign keys that could not be validated."""


def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def _regclass(relation: Relation) -> sql.Composed:
    return sql.SQL("{}::regclass").format(sql.Literal(_id(relation).as_string()))


def choose(entries: list[LogEntry], select: list[str] | None, archive_schema: str,
           finishing: frozenset[Relation] = frozenset()) -> list[LogEntry]:
    """The entries to roll back: the named tables', or every one not rolled back yet; and the
    rolled back ones whose foreign keys a stopped run left unchecked (`finishing`)."""
    log = f"{archive_schema}.{swap_log.SWAP_LOG}"
    if not entries:
        raise RunnerError(f"nothing to roll back: {log} records no swap")
    if not select:
        chosen = [e for e in entries if e.rolled_back_at is None or e.live in finishing]
        if not chosen:
            raise RunnerError(f"nothing to roll back: every swap in {log} was rolled back "
                              "already")
        return chosen
    chosen = swap_log.selected(entries, select, archive_schema)
    for entry in chosen:
        if entry.rolled_back_at is not None and entry.live not in finishing:
            raise RunnerError(f"nothing to roll back for {entry.live}: its latest swap, at "
                              f"{when(entry.swapped_at)}, was rolled back at "
                              f"{when(entry.rolled_back_at)}")
    _refuse_to_leave_behind_a_later_swap(entries, chosen)
    return chosen


def _refuse_to_leave_behind_a_later_swap(entries: list[LogEntry],
                                         chosen: list[LogEntry]) -> None:
    """A table swapped after one whose run re-pointed its rows may keep some of them in its
    archive, where re-pointing back cannot reach them: it is rolled back first, or with it."""
    for entry in chosen:
        pointing = {r.reference.table for r in entry.repointed}
        later = [e for e in entries if e.live in pointing and e.rolled_back_at is None
                 and e.swapped_at > entry.swapped_at and e not in chosen]
        if later:
            raise RunnerError(
                f"cannot roll back {entry.live} alone: {later[0].live} was deduplicated after "
                f"it and may keep in its archive rows that {entry.live}'s run re-pointed; "
                f"nothing was changed: roll back {later[0].live} first, or both together")


def _undo_order(plans: list[TableRollback]) -> list[TableRollback]:
    """The latest swap undone first: a table deduplicated after another whose run re-pointed
    its rows puts back its archived rows before that one points them back where they were."""
    return sorted(plans, key=lambda plan: plan.entry.swapped_at, reverse=True)


def _signature(index: Index) -> tuple:
    return (index.unique, index.method, index.constraint is not None, index.constraint_definition)


def match_indexes(live: LiveTable, archive: LiveTable, natural_key: str
                  ) -> tuple[list[tuple[Index, Index]], list[Index], list[Index]]:
    """Pairs (archive index, live index) of the same definition, then the unmatched of each.

    The swap gave the archive's index at position p the name pg_name(archive, p), p counting
    the original names in order, and gave the new table the original names: pairing same
    definitions in those two orders returns each name to its index, even for duplicate indexes.
    """
    positions = {pg_name(archive.relation.name, str(p)): p
                 for p in range(len(archive.indexes) + len(live.indexes))}
    archived = sorted(archive.indexes, key=lambda i: (positions.get(i.name, len(positions)),
                                                      i.name))
    # The swap's own: the natural key's constraint, and the partial indexes beside it before 15.
    partial = null_key_index_names(live.relation.name)
    candidates = [i for i in live.indexes if i.constraint != natural_key
                  and i.name not in partial]
    pairs, unmatched = [], []
    for index in archived:
        match = next((c for c in candidates if _signature(c) == _signature(index)), None)
        if match is None:
            unmatched.append(index)
        else:
            candidates.remove(match)
            pairs.append((index, match))
    return pairs, unmatched, candidates


def _rename_index(table: sql.Identifier, schema: str, index: Index, new: str) -> sql.Composed:
    # A constraint and its index share the name; renaming the constraint renames both.
    if index.constraint:
        return sql.SQL("alter table {} rename constraint {} to {}").format(
            table, sql.Identifier(index.constraint), sql.Identifier(new))
    return sql.SQL("alter index {} rename to {}").format(
        sql.Identifier(schema, index.name), sql.Identifier(new))


def _mark(entry: LogEntry, archive_schema: str, rolled_back: Relation | None) -> Step:
    return Step(f"record the rollback of {entry.live}",
                swap_log.mark_rolled_back(entry, archive_schema, rolled_back))


def _column_list(relation: Relation) -> sql.Composed:
    return sql.SQL(
        "array(select format('%I %s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),"
        " case when a.attgenerated <> '' then ' generated' else '' end,"
        " case when a.attidentity <> '' then ' identity ' || a.attidentity::text else '' end)"
        " from pg_attribute as a where a.attrelid = {} and a.attnum > 0 and not a.attisdropped"
        " order by a.attnum)").format(_regclass(relation))


def _columns(table: LiveTable) -> list[tuple]:
    return [(c.name, c.type, c.generated, c.identity) for c in table.columns]


def plan_constraint(entry: LogEntry, live: LiveTable, archive_schema: str) -> TableRollback:
    """The swap only added the natural key's constraint (and, before PostgreSQL 15, partial
    unique indexes for the keys with NULLs): drop them."""
    partial = null_key_index_names(entry.live.name)
    return TableRollback(entry, cutover=[
        Step("the table was never replaced; only its natural key's constraint was added",
             sql.SQL("alter table {} drop constraint if exists {}").format(
                 _id(entry.live), sql.Identifier(entry.constraint_name))),
        *(Step("with the partial unique index that kept its key where it has NULLs",
               sql.SQL("drop index {}").format(sql.Identifier(entry.live.schema, index.name)))
          for index in live.indexes if index.name in partial),
        _mark(entry, archive_schema, None),
    ])


def plan_in_place(entry: LogEntry, live: LiveTable, archive_schema: str) -> TableRollback:
    """The table was never replaced: its constraint goes, and the rows the run removed come
    back from the archive with their own values, identity columns included. They are kept
    there too, until `runner cleanup` drops the archive. The rows of other tables the run
    moved to kept rows, and nobody moved since, point where they did."""
    columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in live.columns if not c.generated)
    plan = plan_constraint(entry, live, archive_schema)
    plan.repointed = _still_pointing(entry, live)
    plan.cutover[-1:-1] = [
        Step(f"the rows the run removed go back into {entry.live} as the archive holds them, "
             f"as many and with the same checksum (a trigger of {entry.live} that changes or "
             "skips a row put back would fail it: disable it for the rollback)",
             _put_back(entry, columns, bool(live.identity_sequences)), check=True),
        *(Step(f"the rows of {r.reference.table} the run re-pointed point where they did "
               "before it", repoint.put_back(r.reference, Relation(archive_schema, r.record)))
          for r in plan.repointed)]
    return plan


def _put_back(entry: LogEntry, columns: sql.Composable, identity: bool) -> sql.Composed:
    """The archived rows inserted into the live table, and checked as they went in (RETURNING
    gives them after its BEFORE triggers): as many as the archive holds, and the same sum of
    their hashes. The archive is read once, under the lock, for both."""
    def counted(rows: str) -> sql.Composed:
        return sql.SQL("select count(*) as rows, coalesce(sum(hashtextextended(row({})::text, 0)),"
                       " 0) as checksum from {}").format(columns, sql.Identifier(rows))

    return sql.SQL(
        "with removed as materialized (select {columns} from {archive}),"
        " put_back as (insert into {live} ({columns}){overriding} select {columns} from removed"
        " returning {columns}), inserted as ({inserted}), archived as ({archived})"
        " select inserted.rows = archived.rows and inserted.checksum = archived.checksum,"
        " archived.rows as archived_rows, inserted.rows as rows_put_back,"
        " inserted.checksum = archived.checksum as same_checksum from inserted, archived"
    ).format(live=_id(entry.live), columns=columns, archive=_id(entry.archive),
             overriding=sql.SQL(" overriding system value" if identity else ""),
             inserted=counted("put_back"), archived=counted("removed"))


def _still_pointing(entry: LogEntry, live: LiveTable) -> tuple[swap_log.Repointed, ...]:
    """The foreign keys whose rows the run re-pointed that still point at the table."""
    pointing_now = {reference.named_by for reference in live.references}
    return tuple(r for r in entry.repointed if r.reference.named_by in pointing_now)


def check_capture(entry: LogEntry, registered: Registered | None) -> None:
    """The capture since the swap is whole: else a rollback would lose the writes it missed."""
    where = (f"cannot roll back {entry.live}: nothing was changed; the original rows stay in "
             f"{entry.archive}")
    if registered is None or registered.capture.since_swap_of != entry.archive_table:
        raise RunnerError(f"{where}, but the writes made since the swap are no longer "
                          "captured (its capture was stopped), so a rollback would lose them: "
                          "restore them by hand, or leave the table out with --select")
    if registered.trigger not in ("O", "A") or not registered.log_exists:
        broken = ("its log is missing" if not registered.log_exists
                  else "its trigger is missing" if registered.trigger is None
                  else "its trigger was disabled")
        raise RunnerError(f"{where}, but the capture of the writes since the swap is broken "
                          f"({broken}), so some may be missing: restore them by hand, or leave "
                          "the table out with --select")


def _refuse_unsafe(entry: LogEntry, live: LiveTable, archive: LiveTable) -> None:
    """What would make the rollback lose writes or leave others reading the wrong table."""
    if _columns(live) != _columns(archive):
        raise RunnerError(f"the columns of {entry.live} changed since the swap, so its rows no "
                          f"longer fit the original table {archive.relation}: roll it back by "
                          "hand, or leave it out with --select")
    repointed = {r.reference.named_by for r in entry.repointed}
    added_since = [r.shown for r in live.references
                   if r.named_by not in repointed]
    if added_since:
        raise RunnerError(f"foreign keys now point at {entry.live} ({', '.join(added_since)}) "
                          "that the swap did not re-point, and would keep pointing at the "
                          "deduplicated table: drop them, roll back, then create them again")
    read_in_turn = materialized_views_read(live)
    if read_in_turn:
        raise RunnerError(f"cannot roll back {entry.live}: {'; '.join(read_in_turn)}, and "
                          "would keep reading the one it drops: drop them, roll back, then "
                          "create them again")
    tiebreaker = entry.tiebreaker or ""
    if not any(i.unique and i.valid and not i.partial and i.key_columns == (tiebreaker,)
               for i in archive.indexes):
        raise RunnerError(f"cannot roll back {entry.live}: the original {archive.relation} has "
                          f"no valid unique index on its tie-breaker {tiebreaker!r} any more, "
                          "which the rollback finds its rows by; rebuild it, then run again")


def plan_table(entry: LogEntry, live: LiveTable, archive: LiveTable, registered: Registered,
               stamp: datetime, archive_schema: str) -> TableRollback:
    """The rollback of one swapped table, from swap_log's entry and the catalog."""
    _refuse_unsafe(entry, live, archive)
    rolled_back = Relation(archive_schema, pg_name(entry.live.name,
                                                   stamp.strftime("%Y%m%d%H%M%S"), ROLLED_BACK))
    plan = TableRollback(
        entry, rolled_back=rolled_back, archive=archive.relation,
        materialized_views=tuple(view.relation for view in live.materialized_views),
        restore=restore.restore(entry.live, archive.relation, registered.capture.log,
                                live.columns, entry.tiebreaker or "", entry.backfilled,
                                entry.rows_before))
    archive_id = _id(archive.relation)
    plan.prepare = [
        Step(f"nothing fires in {archive.relation} while the writes are carried over; the "
             "triggers it had come back as they were with it",
             sql.SQL("alter table {} disable trigger user").format(archive_id)),
        Step(f"{archive.relation} still holds the rows it had at the swap's commit",
             plan.restore.archive_rows, check=True),
    ]
    plan.locked, revalidated = _foreign_keys_back(entry, archive_id)
    plan.validate = validate_steps(entry.live, revalidated)
    plan.repointed = _still_pointing(entry, live)
    for r in plan.repointed:
        if r.reference.validated:
            plan.validate += validate_steps(r.reference.table, [r.reference.constraint])
    plan.cutover = _cutover_steps(plan, live, archive, registered, archive_schema)
    return plan


def _foreign_keys_back(entry: LogEntry, archive_id: sql.Identifier
                       ) -> tuple[list[Step], list[str]]:
    """The original's foreign keys again, NOT VALID under the lock; and those to validate
    after the commit, the ones that were valid at the swap."""
    steps, revalidated = [], []
    for key in entry.archive_foreign_keys:
        definition, validated = not_valid(key.definition)
        steps.append(Step(
            f"foreign key {key.name} of the original again, NOT VALID: validated after the "
            "commit, so that checking the original's rows holds no lock",
            sql.SQL("alter table {} add constraint {} {} not valid").format(
                archive_id, sql.Identifier(key.name), sql.SQL(definition))))
        if validated:
            revalidated.append(key.name)
    return steps, revalidated


def _cutover_steps(plan: TableRollback, live: LiveTable, archive: LiveTable,
                   registered: Registered, archive_schema: str) -> list[Step]:
    """Under the lock: the original takes the live name and all that went with it back, and
    the deduplicated table goes to the archive schema."""
    entry, rolled_back = plan.entry, plan.rolled_back
    schema, name = entry.live.schema, entry.live.name
    live_id, archive_id = _id(entry.live), _id(archive.relation)
    return [
        Step(f"{entry.live} still has the columns of {archive.relation}",
             sql.SQL("select l = a, l::text as live_columns, a::text as archive_columns"
                     " from (select {} as l, {} as a) as c").format(
                 _column_list(entry.live), _column_list(archive.relation)), check=True),
        *(Step("the change capture since the swap ends with the rollback", statement)
          for statement in capture.remove(registered.capture, entry.live)),
        *(Step(f"{r.reference.shown} would follow the deduplicated table to the archive: it "
               "goes, and comes back against the original",
               sql.SQL("alter table {} drop constraint {}").format(
                   _id(r.reference.table), sql.Identifier(r.reference.constraint)))
          for r in plan.repointed),
        *_inert_steps(live),
        *_set_aside_steps(entry, live, rolled_back),
        Step("the original table comes back to the live schema, with its own owner, grants, "
             "comment and policies",
             sql.SQL("alter table {} set schema {}").format(archive_id, sql.Identifier(schema))),
        Step("under its own name",
             sql.SQL("alter table {} rename to {}").format(
                 sql.Identifier(schema, archive.relation.name), sql.Identifier(name))),
        *_names_back_steps(plan, entry, live, archive, rolled_back),
        *(step for r in plan.repointed for step in _references_back(r, entry.archive_schema)),
        *_trigger_steps(entry),
        Step("the deduplicated table is kept in the archive schema, never dropped by a rollback",
             sql.SQL("alter table {} set schema {}").format(
                 sql.Identifier(schema, rolled_back.name), sql.Identifier(archive_schema))),
        *(Step(f"publication {publication} publishes the original table again",
               sql.SQL("alter publication {} add table {}").format(
                   sql.Identifier(publication), live_id))
          for publication in live.publications),
        *(recreate_view(view, f"view {view.relation} reads the original table again")
          for view in live.views),
        *recreate_materialized_views(live, "the original table again"),
        _mark(entry, archive_schema, rolled_back),
    ]


def _references_back(repointed: swap_log.Repointed, archive_schema: str) -> list[Step]:
    """A foreign key the swap re-pointed points at the original again, NOT VALID, checked
    after the commit; each row the swap moved, and nobody moved since, points where it did."""
    r = repointed.reference
    return [
        Step(f"{r.shown} points at the original again, its rows checked after the commit",
             repoint.add_again(r)),
        Step(f"the rows of {r.table} the swap re-pointed point where they did before it",
             repoint.put_back(r, Relation(archive_schema, repointed.record))),
    ]


def _inert_steps(live: LiveTable) -> list[Step]:
    """The deduplicated table, bound for the archive, constrains and fires nothing there."""
    live_id = _id(live.relation)
    return [
        *(Step(f"the deduplicated table holds no parent row in the archive: {name} goes",
               sql.SQL("alter table {} drop constraint {}").format(live_id, sql.Identifier(name)))
          for name, _, _ in live.foreign_keys),
        *(Step(f"trigger {trigger.name} of the deduplicated table fires no more",
               sql.SQL("alter table {} disable trigger {}").format(
                   live_id, sql.Identifier(trigger.name)))
          for trigger in own_triggers(live) if trigger.enabled != "D"),
        *(Step(f"publication {publication} stops publishing the deduplicated table",
               sql.SQL("alter publication {} drop table {}").format(
                   sql.Identifier(publication), live_id))
          for publication in live.publications),
    ]


def _set_aside_steps(entry: LogEntry, live: LiveTable, rolled_back: Relation) -> list[Step]:
    """The deduplicated table frees every name the original is to take back."""
    schema, live_id = entry.live.schema, _id(entry.live)
    return [
        *(Step(f"free the name {index.name} in {schema}",
               _rename_index(live_id, schema, index, pg_name(rolled_back.name, str(p))))
          for p, index in enumerate(live.indexes)),
        *(Step(f"free the name of identity sequence {s.name}",
               sql.SQL("alter sequence {} rename to {}").format(
                   sql.Identifier(s.schema, s.name),
                   sql.Identifier(pg_name(rolled_back.name, s.column, "seq"))))
          for s in live.identity_sequences),
        Step("the deduplicated table steps aside, renamed first so that no name in the archive "
             "schema can be in its way",
             sql.SQL("alter table {} rename to {}").format(
                 live_id, sql.Identifier(rolled_back.name))),
    ]


def _names_back_steps(plan: TableRollback, entry: LogEntry, live: LiveTable,
                      archive: LiveTable, rolled_back: Relation) -> list[Step]:
    """The original's indexes and identity sequences take their names back; its sequences go
    on from where the deduplicated table's left off."""
    schema, live_id = entry.live.schema, _id(entry.live)
    pairs, unmatched, left = match_indexes(live, archive, entry.constraint_name)
    steps = [Step(f"{original.name} gets its name back",
                  _rename_index(live_id, schema, archived, original.name))
             for archived, original in pairs]
    plan.notes += [f"index {i.name} of {entry.live} has no counterpart on the deduplicated "
                   "table, so it keeps its archive name" for i in unmatched]
    plan.notes += [f"index {i.name}, created on the deduplicated {entry.live} after the swap, "
                   f"stays with it in {rolled_back}" for i in left]
    for s in live.identity_sequences:
        original = next((a for a in archive.identity_sequences if a.column == s.column), None)
        if original is None:
            raise RunnerError(f"identity column {s.column} of {entry.live} has no sequence on "
                              f"{archive.relation}: roll it back by hand")
        steps += [
            Step(f"identity sequence {s.name} gets its name back",
                 sql.SQL("alter sequence {} rename to {}").format(
                     sql.Identifier(schema, original.name), sql.Identifier(s.name))),
            Step("and goes on from where the deduplicated table's left off",
                 sql.SQL("select setval({}::regclass, s.last_value, s.is_called) from {} as s")
                 .format(sql.Literal(sql.Identifier(schema, s.name).as_string()),
                         sql.Identifier(s.schema, pg_name(rolled_back.name, s.column, "seq")))),
        ]
    steps += [
        Step(f"sequence {seq} numbers the original table again",
             sql.SQL("alter sequence {} owned by {}.{}").format(
                 sql.Identifier(seq_schema, seq), live_id, sql.Identifier(column)))
        for seq_schema, seq, column, identity in live.owned_sequences if not identity
    ]
    return steps


def _trigger_steps(entry: LogEntry) -> list[Step]:
    """The original's triggers fire again as they did before the swap."""
    enable = {"O": "enable trigger", "R": "enable replica trigger", "A": "enable always trigger"}
    return [Step(f"trigger {t.name} as it was before the swap",
                 sql.SQL("alter table {} {} {}").format(
                     _id(entry.live), sql.SQL(enable[t.enabled]), sql.Identifier(t.name)))
            for t in entry.archive_triggers if t.enabled in enable]


def make_plans(conn: psycopg.Connection, options: RollbackOptions,
               stamp: datetime | None = None) -> list[TableRollback]:
    """Read swap_log and the catalog, refuse what cannot be rolled back, plan every table."""
    stamp = stamp or datetime.now(timezone.utc)
    latest = swap_log.latest_swaps(conn, options.archive_schema)
    unchecked = {entry.live: left_to_validate(catalog.read_live_table(conn, entry.live), entry)
                 for entry in latest
                 if entry.rolled_back_at is not None and catalog.exists(conn, entry.live)}
    entries = choose(latest, options.select, options.archive_schema,
                     frozenset(live for live, steps in unchecked.items() if steps))
    captures = {r.capture.live: r
                for r in registered_captures(conn, options.archive_schema)}
    plans = []
    for entry in entries:
        if entry.rolled_back_at is not None:
            plans.append(TableRollback(entry, validate=unchecked[entry.live], finishing=True))
            continue
        if not catalog.exists(conn, entry.live):
            raise RunnerError(f"cannot roll back {entry.live}: the table does not exist any "
                              "more; nothing was changed; leave it out with --select")
        if entry.action == "constraint":
            plans.append(plan_constraint(entry, catalog.read_live_table(conn, entry.live),
                                         options.archive_schema))
            continue
        if entry.cleaned_at is not None:
            raise RunnerError(f"cannot roll back {entry.live}: runner cleanup dropped its "
                              f"archive {entry.archive} at {when(entry.cleaned_at)}, so the "
                              "original rows are gone; leave it out with --select")
        if not entry.archive or not catalog.exists(conn, entry.archive):
            raise RunnerError(f"cannot roll back {entry.live}: its archive {entry.archive} is "
                              "missing (dropped by hand?); nothing was changed; restore it or "
                              "leave the table out with --select")
        if entry.action == "in_place":
            missing = [r.record for r in entry.repointed
                       if not catalog.exists(conn, Relation(options.archive_schema, r.record))]
            if missing:
                raise RunnerError(f"cannot roll back {entry.live}: nothing was changed; "
                                  f"{', '.join(missing)}, where the rows the run re-pointed "
                                  "pointed before it, is missing (dropped by hand?): restore "
                                  "it, or leave the table out with --select")
            plans.append(plan_in_place(entry, catalog.read_live_table(conn, entry.live),
                                       options.archive_schema))
            continue
        registered = captures.get(entry.live)
        check_capture(entry, registered)
        plans.append(plan_table(entry, catalog.read_live_table(conn, entry.live),
                                catalog.read_live_table(conn, entry.archive), registered,
                                stamp, options.archive_schema))
    return plans


def _cutting_over(plans: list[TableRollback]) -> list[TableRollback]:
    return [p for p in plans if not p.finishing]


def _restoring(plans: list[TableRollback]) -> list[TableRollback]:
    return [p for p in plans if p.restore is not None]


def _locked(plans: list[TableRollback]) -> list[Relation]:
    tables = []
    for plan in plans:
        tables.append(plan.entry.live)
        if plan.archive:
            tables.append(plan.archive)
        tables += [r.reference.table for r in plan.repointed]
    return list(dict.fromkeys(tables))


def _lock(tables: list[Relation], why: str) -> Step:
    return Step(why, sql.SQL("lock table {} in access exclusive mode").format(
        sql.SQL(", ").join(_id(t) for t in tables)))


def _phases(plans: list[TableRollback], options: RollbackOptions
            ) -> tuple[list[Step], list[Step], list[Step]]:
    """Before the lock; taking it; and under it, before any row is written."""
    archives = [p.archive for p in _restoring(plans)]
    before = [ASYNC_COMMIT, NO_JIT,
              Step("wait at most this long for each lock, so no session queues behind the "
                   "runner for longer; on timeout, try again",
                   lock_timeout(options.lock_timeout_ms)),
              Step("", restore.counts_table())]
    if archives:
        before.append(_lock(archives, "the originals, which nobody else may change meanwhile"))
    for plan in plans:
        before += plan.prepare
    locking_steps = [
        Step("wait at most this long for the lock, so no session queues behind the runner for "
             "longer; on timeout, carry over and try again",
             lock_timeout(options.lock_timeout_ms)),
        _lock(_locked(plans), "the live tables and their originals, all at once"),
    ]
    locked = [step for plan in plans for step in plan.locked]
    return before, locking_steps, locked


def _restore_lines(conn: psycopg.Connection, plan: TableRollback, under_lock: bool) -> list[str]:
    r = plan.restore
    check = r.touched_rows_in_archive if under_lock else r.touched_rows_settled
    return [
        f"-- carry the writes captured on {plan.entry.live} since the swap over to "
        f"{plan.archive}, a batch at a time, until the log is empty",
        *(statement.as_string(conn) + ";" for statement in r.take_batch),
        "-- a TRUNCATE stops the rollback: " + r.truncated.as_string(conn) + ";",
        "-- must be true: " + r.no_reused_tiebreaker.as_string(conn) + ";",
        *(statement.as_string(conn) + ";" for statement in r.apply),
        "-- after each batch, must be true: " + r.batch_applied.as_string(conn) + ";",
        "-- and: " + check.as_string(conn) + ";",
        *([] if under_lock else
          ["-- then must be true: " + r.all_rows_in_archive.as_string(conn) + ";"]),
    ]


def render(conn: psycopg.Connection, plans: list[TableRollback],
           options: RollbackOptions) -> str:
    """The exact SQL `execute` would run, in order, with why each statement is there."""
    validate = [step for plan in plans for step in plan.validate]
    plans = _cutting_over(plans)
    lines = [f"-- note: {note}" for plan in plans for note in plan.notes]
    if not plans:
        return "\n".join(lines + [line for step in validate
                                  for line in executor.explained(conn, step)])
    before, locking_steps, locked = _phases(plans, options)
    lines += executor.script(
        conn, before,
        lambda under_lock: [line for plan in _restoring(plans)
                            for line in _restore_lines(conn, plan, under_lock)],
        [*locking_steps, *locked], [step for plan in _undo_order(plans) for step in plan.cutover],
        validate)
    return "\n".join(lines)


def _carry_over(conn: psycopg.Connection, plan: TableRollback, *, under_lock: bool,
                for_at_most_s: float | None = None) -> int:
    """Carry a table's captured writes over to its original until the log is empty (under the
    lock) or the remaining writes are few, or, outside the lock, `for_at_most_s` has passed,
    each batch proven; returns how many it carried."""
    r, live = plan.restore, plan.entry.live
    carried = 0
    deadline = None if for_at_most_s is None else time.monotonic() + for_at_most_s
    if under_lock:
        executor.check_few_under_lock(conn.execute(r.pending).fetchone()[0])
    while conn.execute(r.anything_pending).fetchone()[0]:
        run_batched(conn, [Step("", statement) for statement in r.take_batch])
        taken = conn.execute(r.taken).fetchone()[0]
        if taken == 0:
            return carried
        carried += taken
        if conn.execute(r.truncated).fetchone()[0]:
            raise RunnerError(f"cannot roll back {live}: it was truncated since the swap, and "
                              "which rows that took is nowhere recorded; nothing was changed; "
                              f"the original rows stay in {plan.archive}")
        run_steps(conn, [
            Step(f"no row written to {live} since the swap reuses the tie-breaker of a row the "
                 "swap removed, which the original still holds", r.no_reused_tiebreaker,
                 check=True)])
        run_batched(conn, [Step("", statement) for statement in r.apply])
        run_steps(conn, [
            Step(f"the batch took from {plan.archive} exactly the rows it names and gave it "
                 "exactly their final versions", r.batch_applied, check=True),
            Step(f"every row of {live} the batch touched is in {plan.archive} as it is now"
                 + ("" if under_lock else ", unless a captured write waits to explain it"),
                 r.touched_rows_in_archive if under_lock else r.touched_rows_settled,
                 check=True)])
        if not under_lock and executor.caught_up(conn.execute(r.pending).fetchone()[0],
                                                 deadline):
            return carried
    return carried


def needs(plans: list[TableRollback], options: RollbackOptions) -> list[privileges.Need]:
    """What the role must be allowed for every change the plans make."""
    found = []
    for plan in plans:
        found.append(privileges.act_as_owner(plan.entry.live))
        if plan.finishing:
            continue
        found += [privileges.archive_schema(options.archive_schema),
                  privileges.create_in(plan.entry.live.schema)]
        found += [privileges.act_as_owner(plan.archive)] if plan.archive else []
    return found


def execute(conn: psycopg.Connection, plans: list[TableRollback], options: RollbackOptions,
            after_step: Callable[[str], None] | None = None) -> RollbackResult:
    """Roll every planned table back in one transaction; any failed check changes nothing.

    `after_step` is called with a label after each step and each lock try that timed out."""
    privileges.check(conn, "runner rollback", needs(plans, options))
    step_done = after_step or (lambda label: None)
    validate = [step for plan in plans for step in plan.validate]
    everything, plans = plans, _cutting_over(plans)
    if not plans:
        with locking.one_runner(conn):
            return RollbackResult(everything, 0.0, 0, {}, executor.validate_after_commit(
                conn, validate, options.lock_timeout_ms, options.lock_wait_s))
    restoring = _restoring(plans)
    before, locking_steps, locked = _phases(plans, options)
    carried: dict[Relation, tuple[int, int, int, int]] = {}
    carried_between_tries = 0
    held = [*_locked(plans), *(view for plan in plans for view in plan.materialized_views)]
    gave_up = locking.could_not_lock(conn, held, options.lock_timeout_ms, options.lock_wait_s,
                                     writes_between_tries=lambda: carried_between_tries)

    def carry_all(under_lock: bool = False) -> int:
        return sum(_carry_over(conn, plan, under_lock=under_lock,
                               for_at_most_s=None if under_lock else options.lock_wait_s)
                   for plan in restoring)

    def carry_between_tries() -> None:
        nonlocal carried_between_tries
        carried_between_tries += carry_all()

    def prepare(plan: TableRollback) -> None:
        _carry_over(conn, plan, under_lock=False, for_at_most_s=options.lock_wait_s)
        run_steps(conn, [Step(f"every row of {plan.entry.live} is in {plan.archive} as it is "
                              "now, unless a captured write waits to explain it",
                              plan.restore.all_rows_in_archive, check=True)])

    def cut_over() -> None:
        # Before any row is written: these lock the parents of the foreign keys, and a
        # timeout here must leave nothing to undo but the savepoint.
        run_steps(conn, locked)
        carry_all(under_lock=True)
        for plan in restoring:
            carried[plan.entry.live] = tuple(conn.execute(plan.restore.carried).fetchone())
        run_batched(conn, [step for plan in _undo_order(plans) for step in plan.cutover])

    with locking.one_runner(conn):
        result = executor.cut_over(conn, executor.CutOver(
            command="rollback", before=before,
            prepare=[(f"carried over to {plan.archive}", lambda plan=plan: prepare(plan))
                     for plan in restoring],
            catch_up=carry_all, between_tries=carry_between_tries, take_lock=locking_steps,
            under_lock=cut_over,
            lock_wait_s=options.lock_wait_s, gave_up=gave_up,
            gave_up_before=lambda step: gave_up, validate=validate,
            lock_timeout_ms=options.lock_timeout_ms, postpone=options.postpone), step_done)
    return RollbackResult(everything, result.lock_ms, result.attempts, carried, result.notes)


def report(result: RollbackResult) -> list[str]:
    """What the rollback did, one line per table, for the command's output."""
    lines = []
    for plan in result.plans:
        entry = plan.entry
        if plan.finishing:
            lines.append(f"{entry.live}: rolled back already; the foreign keys a stopped run "
                         f"left unchecked were checked now ({len(plan.validate)}).")
            continue
        if entry.action == "in_place":
            lines.append(f"{entry.live}: dropped the constraint {entry.constraint_name}, and put "
                         f"back the {entry.rows_before - entry.rows_after:,} rows removed in "
                         f"place, which {entry.archive} keeps too.")
            continue
        if plan.rolled_back is None:
            lines.append(f"{entry.live}: dropped the constraint {entry.constraint_name}.")
            continue
        inserted, updated, deleted, rows = result.carried.get(entry.live, (0, 0, 0, 0))
        lines.append(f"{entry.live}: the original table is live again, {rows:,} rows, with the "
                     f"writes made since the swap ({inserted:,} inserted, {updated:,} updated, "
                     f"{deleted:,} deleted rows); the deduplicated table is kept as "
                     f"{plan.rolled_back}.")
        lines += [f"  note: {note}" for note in plan.notes]
    lines += [f"Note: {note}" for note in result.notes]
    if result.attempts:
        lines.append(f"Live tables locked for {result.lock_ms:.0f} ms ({result.attempts} "
                     f"{'try' if result.attempts == 1 else 'tries'}).")
    if any(p.rolled_back for p in result.plans):
        lines.append("To swap again: `runner capture`, `dbt build`, then `runner swap`.")
    return lines
